//! encode -> decode round trips of the records kept in shared memory, for structured
//! (`arbitrary`) records: `SessionRecord` (also read through `SessionView`) and `PendingLogin`.
#![no_main]

use arbitrary::Arbitrary;
use authentik_core::identity::Identity;
use authentik_core::oidc::PendingLogin;
use authentik_core::session::{SessionRecord, SessionView};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    sub: String,
    sid: Option<String>,
    expires_at: i64,
    values: [String; 7],
    /// `sub` equal to the uid value, as every login makes it.
    sub_is_uid: bool,
    additional: Vec<(String, String)>,
    id_token: String,
    claims_json: String,
    login: [String; 6],
    created_at: i64,
}

fuzz_target!(|input: Input| {
    let mut values = input.values;
    if input.sub_is_uid {
        values[5] = input.sub.clone();
    }
    // A session's `sub` is never empty (validate_id_token refuses such tokens); the encoding
    // relies on that: an empty stored `sub` means "same as the uid".
    if input.sub.is_empty() && !values[5].is_empty() {
        return;
    }
    let record = SessionRecord {
        sub: input.sub,
        sid: input.sid,
        expires_at: input.expires_at,
        identity: Identity { values, additional: input.additional },
        id_token: input.id_token,
        claims_json: input.claims_json,
    };
    let bytes = record.encode();
    assert_eq!(SessionRecord::decode(&bytes).as_ref(), Ok(&record));
    assert_eq!(SessionRecord::peek_sub(&bytes), Some(record.sub.as_str()));
    let view = SessionView::parse(&bytes).expect("an encoded record has a view");
    assert_eq!(view.sub, record.sub.as_bytes());
    assert_eq!(view.sid, record.sid.as_deref().map(str::as_bytes));
    assert_eq!(view.expires_at, record.expires_at);
    for (v, r) in view.values.iter().zip(&record.identity.values) {
        assert_eq!(*v, r.as_bytes());
    }
    assert!(view.additional().eq(record
        .identity
        .additional
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))));
    assert_eq!(view.id_token, record.id_token.as_bytes());
    assert_eq!(view.claims_json, record.claims_json.as_bytes());
    assert_eq!(view.logout_hint(), record.logout_hint().as_bytes());
    for name in ["sub", "sid", "groups", "email", "name", "x"] {
        assert_eq!(view.claim(name), record.claim(name));
    }
    // Every strict prefix is refused.
    if !bytes.is_empty() {
        let cut = (record.expires_at as u64 as usize) % bytes.len();
        assert!(SessionRecord::decode(&bytes[..cut]).is_err());
        assert!(SessionView::parse(&bytes[..cut]).is_none());
    }
    // compact() must not change any claim answer.
    let mut compacted = record.clone();
    let before: Vec<_> = ["sub", "sid", "groups", "email", "name", "preferred_username", "x"]
        .iter()
        .map(|n| record.claim(n))
        .collect();
    compacted.compact(authentik_fuzz::CLIENT_ID);
    let after: Vec<_> = ["sub", "sid", "groups", "email", "name", "preferred_username", "x"]
        .iter()
        .map(|n| compacted.claim(n))
        .collect();
    if serde_json::from_str::<serde_json::Value>(&record.claims_json).is_ok_and(|v| v.is_object()) {
        assert_eq!(before, after, "compact keeps every claim answer");
    }
    assert_eq!(SessionRecord::decode(&compacted.encode()).as_ref(), Ok(&compacted));
    // Claim answers are header values: with identity values as `Identity::from_claims` makes
    // them (no CR/LF/NUL), no answer has one, before or after compact() (`sid` comes raw from
    // the id_token).
    let control = |s: &String| s.contains(['\r', '\n', '\0']);
    if !record.identity.values.iter().any(control) {
        for answer in before.iter().chain(&after).flatten() {
            assert!(!control(answer), "claim answer {answer:?}");
        }
    }

    let [state, binding, verifier, nonce, return_to, redirect_uri] = input.login;
    let login = PendingLogin {
        state,
        binding,
        verifier,
        nonce,
        return_to,
        redirect_uri,
        created_at: input.created_at,
    };
    let bytes = login.encode();
    assert_eq!(PendingLogin::decode(&bytes), Some(login));
    if !bytes.is_empty() {
        let cut = (input.created_at as u64 as usize) % bytes.len();
        assert_eq!(PendingLogin::decode(&bytes[..cut]), None);
    }
});
