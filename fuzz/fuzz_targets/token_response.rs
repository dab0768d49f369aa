//! Token endpoint responses: the parser behind `ProviderClient::exchange_code`
//! (`client::parse_token_body`). Accepted answers carry both tokens as non-empty strings.
#![no_main]

use authentik_core::oidc::client::parse_token_body;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let Ok(tokens) = parse_token_body(body) else {
        return;
    };
    let object: serde_json::Map<String, Value> =
        serde_json::from_slice(body).expect("an accepted body is a JSON object");
    assert!(!tokens.access_token.is_empty() && !tokens.id_token.is_empty());
    assert_eq!(object.get("access_token").and_then(Value::as_str), Some(&*tokens.access_token));
    assert_eq!(object.get("id_token").and_then(Value::as_str), Some(&*tokens.id_token));
    if tokens.expires_in.is_some() {
        assert!(matches!(object.get("expires_in"), Some(Value::Number(_) | Value::String(_))));
    }
});
