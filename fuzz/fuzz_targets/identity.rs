//! Claims (id_token merged with userinfo, as `complete_login` does) to identity headers:
//! `Identity::from_claims`, including `ak_proxy.user_attributes.additionalHeaders`.
//! Input: a JSON document; a claims object is used as is, anything else becomes the
//! additionalHeaders value. Every header name must be an RFC 7230 token, and no value may
//! contain CR, LF or NUL; the resulting session's claim answers neither.
#![no_main]

use authentik_core::identity::{is_forged_identity_header, Identity};
use authentik_core::session::SessionRecord;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn header_safe(value: &str) -> bool {
    !value.contains(['\r', '\n', '\0'])
}

fn check(claims: &Map<String, Value>) {
    let access = claims.get("access_token").and_then(Value::as_str).unwrap_or("at.at.at");
    let identity = Identity::from_claims(claims, access);
    // The seven identity header values (username, groups, entitlements, email, name, uid, jwt).
    for (index, value) in identity.values.iter().enumerate() {
        assert!(header_safe(value), "identity value {index}: {value:?}");
    }
    let names: Vec<String> =
        identity.additional.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    let extra: Vec<&str> = names.iter().map(String::as_str).collect();
    for (name, value) in &identity.additional {
        assert!(!name.is_empty() && name.bytes().all(is_tchar), "header name {name:?}");
        assert!(header_safe(value), "{name}: {value:?}");
        // A client sending the same header is recognised as forging it.
        assert!(is_forged_identity_header(name.as_bytes(), &extra));
    }
    // The record a login would store, and the claim answers read back from it.
    let mut record = SessionRecord {
        sub: claims.get("sub").and_then(Value::as_str).unwrap_or("sub").to_owned(),
        sid: claims.get("sid").and_then(Value::as_str).map(str::to_owned),
        expires_at: authentik_fuzz::NOW,
        identity,
        id_token: String::new(),
        claims_json: Value::Object(claims.clone()).to_string(),
    };
    let before: Vec<Option<String>> = claims.keys().take(16).map(|k| record.claim(k)).collect();
    record.compact(authentik_fuzz::CLIENT_ID);
    assert_eq!(SessionRecord::decode(&record.encode()).as_ref(), Ok(&record));
    for (key, answer) in claims.keys().take(16).zip(before) {
        let after = record.claim(key);
        if let Some(a) = &after {
            assert!(header_safe(a), "claim {key}: {a:?}");
        }
        // compact() drops the login's single-use `nonce` and `at_hash` (documented).
        if key != "nonce" && key != "at_hash" {
            assert_eq!(after, answer, "claim {key} after compact");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match value {
        Value::Object(claims) => check(&claims),
        headers => {
            let claims = json!({"sub": "u", "ak_proxy": {"user_attributes": {"additionalHeaders": headers}}});
            check(claims.as_object().expect("object"));
        }
    }
});
