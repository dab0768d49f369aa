//! Request classification: `request::is_navigation` (Sec-Fetch-Mode, X-Requested-With,
//! Accept), `query_arg` and `decode_query_value`. Input: up to four `\n`-separated fields
//! (sec-fetch-mode, x-requested-with, accept, query string); an empty field is an absent header.
#![no_main]

use authentik_core::request::{decode_query_value, encode_query_value, is_navigation, query_arg};
use libfuzzer_sys::fuzz_target;

fn within(part: &[u8], whole: &[u8]) -> bool {
    let (start, end) = (whole.as_ptr() as usize, whole.as_ptr() as usize + whole.len());
    let p = part.as_ptr() as usize;
    p >= start && p + part.len() <= end
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.splitn(4, |&b| b == b'\n');
    let mut next = || fields.next().filter(|f| !f.is_empty());
    let (mode, requested_with, accept, args) = (next(), next(), next(), next().unwrap_or(data));

    let navigation = is_navigation(mode, requested_with, accept);
    match mode {
        Some(mode) => assert_eq!(navigation, mode.trim_ascii().eq_ignore_ascii_case(b"navigate")),
        None if requested_with.is_some() => assert!(!navigation),
        None => {
            let html = accept.is_none_or(|a| {
                String::from_utf8_lossy(a).to_ascii_lowercase().contains("text/html")
            });
            // Lossy conversion can only hide a match (replacement chars), never create one.
            if html {
                assert!(navigation);
            }
        }
    }

    for name in [&b"rd"[..], b"X-authentik-auth-callback", b"code", b"state", b""] {
        let Some(value) = query_arg(args, name) else {
            continue;
        };
        assert!(within(value, args));
        assert!(!value.contains(&b'&'));
        if let Some(decoded) = decode_query_value(value) {
            // What decodes re-encodes to something that decodes the same.
            let encoded = encode_query_value(&decoded);
            assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            assert_eq!(decode_query_value(encoded.as_bytes()).as_deref(), Some(&*decoded));
        }
    }
    if let Some(decoded) = decode_query_value(args) {
        assert!(decoded.len() <= args.len());
    }
});
