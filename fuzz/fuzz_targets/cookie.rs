//! `Cookie` header parsing: `find_cookie`, `remove_cookie_into`, and
//! `SessionId::from_cookie_value` on what they find. Input: one raw `Cookie` header value.
#![no_main]

use authentik_core::cookie::{find_cookie, remove_cookie_into};
use authentik_core::session::SessionId;
use authentik_fuzz::SESSION_COOKIE;
use libfuzzer_sys::fuzz_target;

/// Is `part` a sub-slice of `whole` (same memory)?
fn within(part: &[u8], whole: &[u8]) -> bool {
    let (start, end) = (whole.as_ptr() as usize, whole.as_ptr() as usize + whole.len());
    let p = part.as_ptr() as usize;
    p >= start && p + part.len() <= end
}

/// The names worth looking up: the session cookie, a login cookie, and the names the header
/// itself uses (first and last pair, whatever their bytes).
fn names(header: &[u8]) -> Vec<Vec<u8>> {
    let mut names =
        vec![SESSION_COOKIE.as_bytes().to_vec(), b"authentik_proxy_1a2b3c4d_login_abc".to_vec()];
    let pieces: Vec<&[u8]> = header.split(|&b| b == b';').collect();
    for piece in [pieces.first(), pieces.last()].into_iter().flatten() {
        let name = piece.split(|&b| b == b'=').next().unwrap_or_default();
        names.push(name.trim_ascii().to_vec());
    }
    names
}

fn check_id(value: &[u8]) {
    if let Some(id) = SessionId::from_cookie_value(value) {
        // Strict inverse: one cookie value per id.
        assert_eq!(id.to_cookie_value().as_bytes(), value);
        let _ = id.key();
    }
}

fuzz_target!(|header: &[u8]| {
    check_id(header);
    for name in names(header) {
        let found = find_cookie(header, &name);
        if let Some(value) = found {
            assert!(within(value, header));
            assert_eq!(value.trim_ascii(), value, "values are trimmed");
            assert!(!value.contains(&b';'));
            check_id(value);
        }
        let mut out = vec![0u8; 2 * header.len()];
        let written = remove_cookie_into(header, &name, &mut out);
        assert_eq!(written.is_some(), found.is_some(), "removes iff present");
        let mut roomy = vec![0u8; 2 * header.len() + 7];
        let again = remove_cookie_into(header, &name, &mut roomy);
        assert_eq!(again.map(|len| &roomy[..len]), written.map(|len| &out[..len]));
        if let Some(len) = written {
            let kept = &out[..len];
            assert!(len <= out.len());
            assert_eq!(find_cookie(kept, &name), None, "every occurrence removed");
            // Every other cookie keeps its (first) value.
            for other in names(header) {
                if other != name {
                    assert_eq!(find_cookie(kept, &other), find_cookie(header, &other));
                }
            }
            // One byte short of the documented size is refused, never overflowed.
            if !header.is_empty() {
                let mut short = vec![0u8; 2 * header.len() - 1];
                assert_eq!(remove_cookie_into(header, &name, &mut short), None);
            }
        }
    }
});
