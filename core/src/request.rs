//! Classifying requests.

use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986 unreserved characters (ALPHA / DIGIT / `-` / `.` / `_` / `~`).
const QUERY_VALUE: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Whether an unauthenticated request should be redirected to the login page (a top-level page
/// navigation) or get a 401 (XHR, fetch, API clients):
/// - `Sec-Fetch-Mode` present: navigation iff it equals `navigate` (case-insensitive);
/// - `X-Requested-With` present (any value): not a navigation;
/// - otherwise: navigation iff `Accept` is absent or contains `text/html`.
pub fn is_navigation(
    sec_fetch_mode: Option<&[u8]>,
    x_requested_with: Option<&[u8]>,
    accept: Option<&[u8]>,
) -> bool {
    if let Some(mode) = sec_fetch_mode {
        return mode.trim_ascii().eq_ignore_ascii_case(b"navigate");
    }
    if x_requested_with.is_some() {
        return false;
    }
    let Some(accept) = accept else {
        return true;
    };
    contains_ignore_ascii_case(accept, b"text/html")
}

fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window.eq_ignore_ascii_case(needle))
}

/// Value of query argument `name` (raw, not decoded) in `args` (`a=1&b=2`); exact name match.
/// An argument without `=` has an empty value; the first occurrence wins.
pub fn query_arg<'a>(args: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    args.split(|&b| b == b'&').find_map(|pair| {
        let (arg_name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (arg_name == name).then_some(value)
    })
}

/// Percent-decodes a query value (`+` is a space). `None` on invalid UTF-8.
/// Malformed escapes (`%zz`, a trailing `%`) are kept as they are.
pub fn decode_query_value(value: &[u8]) -> Option<String> {
    let spaced: Vec<u8> = value.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect();
    let decoded: Vec<u8> = percent_decode(&spaced).collect();
    String::from_utf8(decoded).ok()
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
pub fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec_fetch_mode_decides_when_present() {
        assert!(is_navigation(Some(b"navigate"), None, None));
        assert!(is_navigation(
            Some(b"Navigate"),
            Some(b"XMLHttpRequest"),
            Some(b"application/json")
        ));
        assert!(!is_navigation(Some(b"cors"), None, Some(b"text/html")));
        assert!(!is_navigation(Some(b"no-cors"), None, None));
        assert!(!is_navigation(Some(b""), None, None));
    }

    #[test]
    fn x_requested_with_means_api_call() {
        assert!(!is_navigation(None, Some(b"XMLHttpRequest"), Some(b"text/html")));
        assert!(!is_navigation(None, Some(b""), None));
    }

    #[test]
    fn accept_decides_last() {
        assert!(is_navigation(None, None, None));
        assert!(is_navigation(None, None, Some(b"text/html,application/xhtml+xml,*/*;q=0.8")));
        assert!(is_navigation(None, None, Some(b"TEXT/HTML")));
        assert!(!is_navigation(None, None, Some(b"*/*")));
        assert!(!is_navigation(None, None, Some(b"application/json")));
        assert!(!is_navigation(None, None, Some(b"")));
    }

    #[test]
    fn query_arg_matches_exact_names() {
        let args = b"rd=%2Fapp&x=1&rdx=2&flag&rd=second&=empty";
        assert_eq!(query_arg(args, b"rd"), Some(&b"%2Fapp"[..]));
        assert_eq!(query_arg(args, b"x"), Some(&b"1"[..]));
        assert_eq!(query_arg(args, b"rdx"), Some(&b"2"[..]));
        assert_eq!(query_arg(args, b"flag"), Some(&b""[..]));
        assert_eq!(query_arg(args, b"RD"), None);
        assert_eq!(query_arg(args, b"missing"), None);
        assert_eq!(query_arg(b"", b"rd"), None);
        assert_eq!(query_arg(b"a=b=c", b"a"), Some(&b"b=c"[..]));
    }

    #[test]
    fn decode_query_value_handles_plus_and_escapes() {
        assert_eq!(decode_query_value(b"a+b%20c%2Fd").as_deref(), Some("a b c/d"));
        assert_eq!(decode_query_value(b"%C3%A9").as_deref(), Some("é"));
        assert_eq!(decode_query_value(b"%2B").as_deref(), Some("+"));
        assert_eq!(decode_query_value(b"100%").as_deref(), Some("100%"));
        assert_eq!(decode_query_value(b"%zz").as_deref(), Some("%zz"));
        assert_eq!(decode_query_value(b"%ff"), None);
        assert_eq!(decode_query_value(&[0xc3]), None);
    }

    #[test]
    fn encode_query_value_keeps_only_unreserved() {
        assert_eq!(encode_query_value("aZ09-._~"), "aZ09-._~");
        assert_eq!(
            encode_query_value("https://a.example/x?y=1&z=2 é+"),
            "https%3A%2F%2Fa.example%2Fx%3Fy%3D1%26z%3D2%20%C3%A9%2B"
        );
        let original = "a b&c=d/é+%";
        assert_eq!(
            decode_query_value(encode_query_value(original).as_bytes()).as_deref(),
            Some(original)
        );
    }
}
