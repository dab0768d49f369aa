//! Session records read back from shared memory: `SessionRecord::decode`, `SessionView::parse`
//! and `peek_sub`, on arbitrary bytes. Whatever decodes must agree with the zero-copy
//! view and re-encode to a record that decodes to the same value.
#![no_main]

use authentik_core::session::{RecordError, SessionRecord, SessionView};
use libfuzzer_sys::fuzz_target;

const CLAIMS: [&str; 9] =
    ["sub", "sid", "groups", "email", "preferred_username", "name", "entitlements", "age", "x"];

fuzz_target!(|bytes: &[u8]| {
    let decoded = SessionRecord::decode(bytes);
    let view = SessionView::parse(bytes);
    let peek_sub = SessionRecord::peek_sub(bytes);
    if let Some(view) = &view {
        let _ = view.additional().count();
        let _ = view.logout_hint();
        for name in CLAIMS {
            let _ = view.claim(name);
        }
        // The peek reads `sub` as UTF-8 (the view does not check it).
        assert_eq!(peek_sub, std::str::from_utf8(view.sub).ok());
    }
    match decoded {
        Ok(record) => {
            let view = view.expect("a record that decodes has a view");
            assert_eq!(view.expires_at, record.expires_at);
            assert_eq!(view.sub, record.sub.as_bytes());
            assert_eq!(view.sid, record.sid.as_deref().map(str::as_bytes));
            for (v, r) in view.values.iter().zip(&record.identity.values) {
                assert_eq!(*v, r.as_bytes());
            }
            let additional: Vec<(&[u8], &[u8])> = view.additional().collect();
            let expected: Vec<(&[u8], &[u8])> = record
                .identity
                .additional
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .collect();
            assert_eq!(additional, expected);
            assert_eq!(view.id_token, record.id_token.as_bytes());
            assert_eq!(view.claims_json, record.claims_json.as_bytes());
            assert_eq!(view.logout_hint(), record.logout_hint().as_bytes());
            for name in CLAIMS {
                assert_eq!(view.claim(name), record.claim(name), "claim {name}");
            }
            assert_eq!(peek_sub, Some(record.sub.as_str()));
            // Re-encoding: the same record again (the bytes may differ only by the `sub` that
            // the encoder stores once when it equals the uid).
            let encoded = record.encode();
            assert_eq!(SessionRecord::decode(&encoded).as_ref(), Ok(&record));
            assert!(encoded.len() <= bytes.len());
            if encoded.len() == bytes.len() {
                assert_eq!(encoded, bytes);
            }
        }
        Err(RecordError::Version(v)) => {
            assert_ne!(v, 1);
            assert!(view.is_none());
            assert_eq!(peek_sub, None);
        }
        Err(RecordError::Truncated | RecordError::Utf8) => {
            if view.is_some() {
                // The view skips the UTF-8 check and nothing else.
                assert_eq!(SessionRecord::decode(bytes), Err(RecordError::Utf8));
            }
        }
    }
});
