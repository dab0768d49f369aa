//! JWKS documents: `Jwks::parse`, then the key lookups the id_token check makes.
#![no_main]

use authentik_core::oidc::Jwks;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let Ok(jwks) = Jwks::parse(body) else {
        return;
    };
    if jwks.is_empty() {
        assert!(!jwks.has_kid("rsa-kid") && !jwks.has_kid("ec-kid") && !jwks.has_kid(""));
    }
    // Usable keys never outnumber the document's entries.
    let entries = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|d| d.get("keys").and_then(Value::as_array).map(Vec::len))
        .expect("an accepted JWKS has a keys array");
    assert!(jwks.len() <= entries);
    for kid in ["rsa-kid", "ec-kid", "", "k"] {
        let _ = jwks.has_kid(kid);
    }
});
