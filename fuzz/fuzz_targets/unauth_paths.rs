//! The subject of `authentik_unauth_paths`: `paths::exemption_subject` and
//! `UnauthPaths::exempts`. Input: `raw request target [\n normalised $uri]`.
//!
//! Invariant: if `exemption_subject(raw)` is `Some(p)`, then `p` starts with `/` and has no
//! `//`, `\`, `;`, `%`, control character or dot-segment, the raw target has no `#`, and
//! percent-decoding the raw path gives `p` (so does decoding `p` again: upstreams that decode
//! twice see the same path). `exempts` is true only when both the raw subject and the
//! normalised path match; in forward_domain mode the subject carries the query as sent.
#![no_main]

use std::sync::OnceLock;

use authentik_core::paths::{exemption_subject, UnauthPaths};
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode;

fn patterns() -> &'static (UnauthPaths, UnauthPaths) {
    static PATHS: OnceLock<(UnauthPaths, UnauthPaths)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let paths =
            UnauthPaths::compile(&["^/public/", "\\.css$", "^/health$", "^/api/v[0-9]+/status"])
                .expect("path patterns compile");
        let urls =
            UnauthPaths::compile(&["^https://status\\.example\\.com/public/", "\\?public=1$"])
                .expect("url patterns compile");
        (paths, urls)
    })
}

fuzz_target!(|data: &[u8]| {
    let (raw, normalised) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let subject = exemption_subject(raw);
    if let Some(p) = &subject {
        // A fragment is never sent by a client, and upstreams disagree on where it ends the path.
        assert!(!raw.contains(&b'#'), "exemption subject {p:?} for a target with '#'");
        assert!(p.starts_with('/'), "{p:?}");
        assert!(
            !p.contains("//") && !p.contains('\\') && !p.contains(';') && !p.contains('%'),
            "{p:?}"
        );
        assert!(!p.chars().any(|c| c.is_ascii_control()), "{p:?}");
        assert!(!p.split('/').any(|s| s == "." || s == ".."), "dot-segment in {p:?}");
        let path = raw.split(|&b| b == b'?' || b == b'#').next().unwrap_or_default();
        let decoded: Vec<u8> = percent_decode(path).collect();
        assert_eq!(decoded, p.as_bytes(), "raw path decodes to the subject");
        let twice: Vec<u8> = percent_decode(p.as_bytes()).collect();
        assert_eq!(twice, p.as_bytes(), "decoding again changes nothing");
    }
    let (paths, urls) = patterns();
    // Without a separate normalised path, nginx's $uri is taken to be the subject itself.
    let normalised = normalised.or(subject.as_deref().map(str::as_bytes)).unwrap_or(raw);
    let exempt = paths.exempts(raw, normalised, None);
    if exempt {
        let p = subject.as_deref().expect("an exempt request has a subject");
        assert!(paths.matches(p));
        assert!(paths.matches(std::str::from_utf8(normalised).expect("utf-8 $uri")));
    } else if let (Some(p), Ok(n)) = (&subject, std::str::from_utf8(normalised)) {
        assert!(!(paths.matches(p) && paths.matches(n)), "both match but not exempt: {p:?}");
    }
    let origin = "https://status.example.com";
    if urls.exempts(raw, normalised, Some(origin)) {
        let p = subject.as_deref().expect("an exempt request has a subject");
        let query = raw.iter().position(|&b| b == b'?').map(|q| &raw[q + 1..]);
        let query = query.map(|q| q.split(|&b| b == b'#').next().unwrap_or_default());
        let full = match query {
            Some(q) => format!("{origin}{p}?{}", std::str::from_utf8(q).expect("utf-8 query")),
            None => format!("{origin}{p}"),
        };
        assert!(urls.matches(&full), "{full}");
    }
});
