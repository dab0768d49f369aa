//! Pending-login records read back from shared memory: `PendingLogin::decode` on arbitrary
//! bytes. The encoding is canonical: what decodes re-encodes to the same bytes.
#![no_main]

use authentik_core::oidc::PendingLogin;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some(login) = PendingLogin::decode(bytes) else {
        return;
    };
    assert_eq!(login.encode(), bytes, "canonical encoding");
    let _ = PendingLogin::key_of(&login.state);
    let _ = login.binding_matches(login.state.as_bytes());
    assert!(login.binding.is_empty() || login.binding_matches(login.binding.as_bytes()));
    let _ = login.code_challenge();
});
