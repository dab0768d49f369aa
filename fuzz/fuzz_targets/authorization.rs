//! `header_auth::parse_authorization`: the client's `Authorization` header, read before any
//! provider call (header authentication).
#![no_main]

use authentik_core::oidc::header_auth::{cache_id, parse_authorization, Credentials};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(credentials) = parse_authorization(data) else {
        return;
    };
    // Accepted: UTF-8, a Bearer or Basic scheme, no control bytes in what goes to the provider.
    let text = std::str::from_utf8(data).expect("accepted values are UTF-8");
    let scheme = text.trim().split(' ').next().unwrap_or_default().to_ascii_lowercase();
    match &credentials {
        Credentials::Bearer(token) => {
            assert_eq!(scheme, "bearer");
            assert!(!token.is_empty() && !token.contains(|c: char| c.is_control()));
            assert_eq!(format!("{credentials:?}"), "Bearer(..)");
        }
        Credentials::Basic { username, password } => {
            assert_eq!(scheme, "basic");
            assert!(!username.is_empty() && !password.is_empty());
            assert!(!username.contains(':'));
            // The Debug form shows the username only, never the password.
            assert_eq!(format!("{credentials:?}"), format!("Basic({username:?}, ..)"));
        }
    }
    // The cache key depends on the exact value.
    assert_eq!(cache_id(7, data), cache_id(7, data));
});
