//! `jwt::peek_header`: the unverified `kid`/`alg` read of a compact JWT.
#![no_main]

use authentik_core::oidc::jwt::peek_header;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((kid, alg)) = peek_header(token) else {
        return;
    };
    // Three parts; the first is base64url JSON with a string `alg` and a string or no `kid`.
    assert_eq!(token.split('.').count(), 3);
    let header = token.split('.').next().unwrap_or_default();
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
        .expect("header is base64url");
    let json: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes).expect("header is a JSON object");
    assert_eq!(json.get("alg").and_then(Value::as_str), Some(alg.as_str()));
    assert_eq!(json.get("kid").and_then(Value::as_str), kid.as_deref());
});
