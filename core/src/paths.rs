//! Unauthenticated paths: authentik's `skip_path_regex`, compiled at configuration time.

use regex::{Regex, RegexSet};

#[derive(Debug, thiserror::Error)]
#[error("invalid regex \"{pattern}\": {reason}")]
pub struct PathError {
    pub pattern: String,
    pub reason: String,
}

/// A list of unanchored regexes (RE2 syntax via the `regex` crate), matched like authentik does:
/// against the path in proxy/forward_single mode, against the full URL in forward_domain mode.
/// Blank patterns are rejected at compile time (authentik's empty line matches everything: a bug).
#[derive(Debug, Clone, Default)]
pub struct UnauthPaths {
    /// One set per compiled list; `extend` concatenates lists without recompiling them.
    sets: Vec<RegexSet>,
}

impl UnauthPaths {
    /// Compiles every pattern; the first bad one is the error.
    pub fn compile<S: AsRef<str>>(patterns: &[S]) -> Result<UnauthPaths, PathError> {
        for pattern in patterns {
            check_pattern(pattern.as_ref())?;
        }
        if patterns.is_empty() {
            return Ok(UnauthPaths::default());
        }
        let set = RegexSet::new(patterns.iter().map(AsRef::as_ref)).map_err(|e| PathError {
            pattern: patterns.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" "),
            reason: e.to_string(),
        })?;
        Ok(UnauthPaths { sets: vec![set] })
    }
    /// Concatenation of two lists (provider-wide + server/location level).
    pub fn extend(&self, other: &UnauthPaths) -> UnauthPaths {
        UnauthPaths { sets: self.sets.iter().chain(&other.sets).cloned().collect() }
    }
    pub fn is_empty(&self) -> bool {
        self.sets.iter().all(RegexSet::is_empty)
    }
    /// `subject` is the percent-decoded path (proxy, forward_single) or the full URL
    /// `scheme://host/uri?args` (forward_domain). Unanchored search.
    pub fn matches(&self, subject: &str) -> bool {
        self.sets.iter().any(|set| set.is_match(subject))
    }

    /// Whether a request may skip authentication. `raw_target` is the request target as the
    /// client sent it (path and query, what `proxy_pass` without a URI part sends upstream);
    /// `normalised_path` is nginx's decoded, dot-resolved, slash-merged `$uri`. See
    /// [`exemption_subject`] for the rule; in forward_domain mode `origin` (`scheme://host`, the
    /// host nginx routed the request on) prefixes the subject.
    pub fn exempts(&self, raw_target: &[u8], normalised_path: &[u8], origin: Option<&str>) -> bool {
        let Some(raw) = exemption_subject(raw_target) else {
            return false;
        };
        let Ok(normalised) = core::str::from_utf8(normalised_path) else {
            return false;
        };
        match origin {
            // authentik matches the full URL in forward_domain mode: the query takes part.
            Some(origin) => {
                // A query that is not UTF-8 cannot take part in the subject: no exemption.
                let Ok(query) = query_of(raw_target) else {
                    return false;
                };
                let with = |path: &str| match query {
                    Some(q) => format!("{origin}{path}?{q}"),
                    None => format!("{origin}{path}"),
                };
                self.matches(&with(&raw)) && self.matches(&with(normalised))
            }
            None => self.matches(&raw) && self.matches(normalised),
        }
    }
}

/// The path of `raw_target` (a request target in origin form: `/path?query`), percent-decoded,
/// if nothing in it can be read two ways; `None` refuses the exemption.
///
/// An upstream may see the raw path (`proxy_pass` without a URI part) while nginx matched its
/// normalised `$uri`, so a pattern may only exempt a request whose raw path means the same to
/// everyone. Refused: a target not starting with `/`; encoded `/`, `\`, `.` or `%` (`%2F`,
/// `%5C`, `%2E`, `%25`: decoded a second time by some upstreams); control bytes and encoded
/// NUL; a backslash; `//`; `;` (path parameters); dot-segments (`/./`, `/../`, a final `/.`
/// or `/..`); malformed escapes; bytes that do not decode to UTF-8; a `#` anywhere.
pub fn exemption_subject(raw_target: &[u8]) -> Option<String> {
    // A client never sends a fragment; nginx ends `$uri` at `#` while the upstream gets the rest.
    if raw_target.contains(&b'#') {
        return None;
    }
    let path = match raw_target.iter().position(|&b| b == b'?') {
        Some(end) => &raw_target[..end],
        None => raw_target,
    };
    if path.first() != Some(&b'/') {
        return None;
    }
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        match b {
            b'\\' | b';' => return None,
            0..=0x20 | 0x7f => return None,
            b'%' => {
                let hex = path.get(i + 1..i + 3)?;
                let value = u8::from_str_radix(core::str::from_utf8(hex).ok()?, 16).ok()?;
                if matches!(value, b'/' | b'\\' | b'.' | b'%' | b';' | b'?' | b'#')
                    || value < 0x20
                    || value == 0x7f
                {
                    return None;
                }
                decoded.push(value);
                i += 3;
                continue;
            }
            _ => decoded.push(b),
        }
        i += 1;
    }
    let path = String::from_utf8(decoded).ok()?;
    let has_dot_segment = path.split('/').skip(1).any(|segment| segment == "." || segment == "..");
    if path.contains("//") || has_dot_segment {
        return None;
    }
    Some(path)
}

/// The query of `raw_target` (after its first `?`), if any; an error when it is not UTF-8.
fn query_of(raw_target: &[u8]) -> Result<Option<&str>, core::str::Utf8Error> {
    match raw_target.iter().position(|&b| b == b'?') {
        Some(at) => core::str::from_utf8(&raw_target[at + 1..]).map(Some),
        None => Ok(None),
    }
}

/// Why a pattern is too broad to be meant: it matches every subject (`^`, `.*`, `a|`), every
/// path a browser can send (`/`, `^/`), or every URL (`^https?://`; forward_domain subjects).
/// `None` for a pattern that leaves something protected.
pub fn overly_broad(pattern: &str) -> Option<&'static str> {
    let Ok(regex) = Regex::new(pattern) else {
        return None;
    };
    if regex.is_match("") {
        return Some("matches every path (it matches the empty string)");
    }
    const PATHS: &[&str] = &["/", "/private", "/admin/x", "/a.b/c-d_e"];
    const URLS: &[&str] =
        &["https://app.example.com/", "http://a.b/c?d=e", "https://x.example.org/admin/x"];
    let all = |probes: &[&str]| probes.iter().all(|probe| regex.is_match(probe));
    if all(PATHS) || all(URLS) {
        return Some("matches every path");
    }
    None
}

fn check_pattern(pattern: &str) -> Result<(), PathError> {
    let error = |reason: String| PathError { pattern: pattern.to_owned(), reason };
    if pattern.trim().is_empty() {
        return Err(error("empty pattern would match every path".to_owned()));
    }
    Regex::new(pattern).map_err(|e| error(e.to_string()))?;
    match overly_broad(pattern) {
        Some(reason) => {
            Err(error(format!("{reason}; use \"auth_authentik off\" to make a location public")))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_unanchored() {
        let paths = UnauthPaths::compile(&["^/public/", "\\.css$", "health"]).unwrap();
        assert!(!paths.is_empty());
        assert!(paths.matches("/public/index.html"));
        assert!(paths.matches("/app/style.css"));
        assert!(paths.matches("/api/healthz"));
        assert!(!paths.matches("/private/public/"));
        assert!(!paths.matches("/app/style.css.map"));
    }

    #[test]
    fn full_url_subjects_work() {
        let paths = UnauthPaths::compile(&["^https://static\\.example\\.com/"]).unwrap();
        assert!(paths.matches("https://static.example.com/a.png?x=1"));
        assert!(!paths.matches("https://app.example.com/static.example.com/"));
    }

    #[test]
    fn empty_list_matches_nothing() {
        let paths = UnauthPaths::compile::<&str>(&[]).unwrap();
        assert!(paths.is_empty());
        assert!(!paths.matches("/"));
        assert!(UnauthPaths::default().is_empty());
    }

    #[test]
    fn blank_and_invalid_patterns_are_errors() {
        let error = UnauthPaths::compile(&["^/ok", "  "]).unwrap_err();
        assert_eq!(error.pattern, "  ");
        let error = UnauthPaths::compile(&["^/ok", "(", "["]).unwrap_err();
        assert_eq!(error.pattern, "(");
        assert!(error.to_string().starts_with("invalid regex \"(\": "));
    }

    #[test]
    fn patterns_matching_everything_are_errors() {
        for pattern in
            ["^", ".*", "a|", "|", "(?:)", "x*", "^/", "/", "(?s).", "^.*$", "^https?://"]
        {
            let error = UnauthPaths::compile(&[pattern]).unwrap_err();
            assert_eq!(error.pattern, pattern);
            assert!(error.reason.contains("matches every path"), "{pattern}: {error}");
        }
        for pattern in ["^/public/", "\\.css$", "health", "^https://static\\.example\\.com/"] {
            UnauthPaths::compile(&[pattern]).unwrap();
        }
    }

    #[test]
    fn exemption_subject_refuses_ambiguous_paths() {
        for raw in [
            "/private/..%2Fpublic/x",
            "/private/%2e%2e/public/x",
            "/private/%2E%2E/public/x",
            "/private/../public/x",
            "/private/./../public/x",
            "/public/..",
            "/public/.",
            "//public/x",
            "/private//public/x",
            "/private;/public/x",
            "/public/x;jsessionid=1",
            "/private\\..\\public/x",
            "/private/..%5Cpublic/x",
            "/private/%252e%252e/public/x",
            "/public/%00",
            "/public/%0a",
            "/public/%zz",
            "/public/%2",
            "/public/%ff",
            "public/x",
            "http://h/public/x",
            "",
            "/public/\x01",
        ] {
            assert_eq!(exemption_subject(raw.as_bytes()), None, "{raw}");
        }
        assert_eq!(exemption_subject(b"/public/x").as_deref(), Some("/public/x"));
        assert_eq!(exemption_subject(b"/public/a%20b?x=..%2F").as_deref(), Some("/public/a b"));
        assert_eq!(exemption_subject(b"/public/%C3%A9").as_deref(), Some("/public/\u{e9}"));
        assert_eq!(exemption_subject(b"/public/...x").as_deref(), Some("/public/...x"));
    }

    /// Found by fuzz/ (unauth_paths): nginx ends `$uri` at `#` but `proxy_pass` without a URI
    /// part sends the rest upstream; a forward_domain subject dropped a non-UTF-8 query.
    #[test]
    fn fragments_and_unreadable_queries_are_never_exempt() {
        for raw in ["/public/x#/../../admin", "/public/x?a=1#/../admin", "/public/#", "/#"] {
            assert_eq!(exemption_subject(raw.as_bytes()), None, "{raw}");
        }
        let paths = UnauthPaths::compile(&["^/public/"]).unwrap();
        assert!(!paths.exempts(b"/public/x#/../../admin", b"/public/x", None));
        let exact = UnauthPaths::compile(&["^https://status\\.example\\.com/health$"]).unwrap();
        let status = Some("https://status.example.com");
        assert!(exact.exempts(b"/health", b"/health", status));
        assert!(!exact.exempts(b"/health?a", b"/health", status));
        assert!(!exact.exempts(b"/health?\xff", b"/health", status), "query dropped");
        let crash = b"/public/%C3%A9t%C3%A9/1c/?pi/v;\0\0\0\x92\x8e";
        let query = UnauthPaths::compile(&["^https://status\\.example\\.com/public/"]).unwrap();
        assert!(!query.exempts(crash, "/public/\u{e9}t\u{e9}/1c/".as_bytes(), status));
    }

    #[test]
    fn exempts_needs_raw_and_normalised_to_match() {
        let paths = UnauthPaths::compile(&["^/public/"]).unwrap();
        assert!(paths.exempts(b"/public/x?a=1", b"/public/x", None));
        // nginx normalised /private/..%2Fpublic/x to /public/x: the raw path decides.
        assert!(!paths.exempts(b"/private/..%2Fpublic/x", b"/public/x", None));
        assert!(!paths.exempts(b"/private/%2e%2e/public/x", b"/public/x", None));
        assert!(!paths.exempts(b"/public/x", b"/private/x", None));
        let urls = UnauthPaths::compile(&["^https://status\\.example\\.com/"]).unwrap();
        let status = Some("https://status.example.com");
        assert!(urls.exempts(b"/health?x=1", b"/health", status));
        assert!(!urls.exempts(b"/health", b"/health", Some("https://app1.example.com")));
        assert!(!urls.exempts(b"/a/../health", b"/health", status));
        let query = UnauthPaths::compile(&["\\?public=1$"]).unwrap();
        assert!(query.exempts(b"/x?public=1", b"/x", Some("https://a.example.com")));
        assert!(!query.exempts(b"/x?public=1", b"/x", None));
    }

    #[test]
    fn extend_concatenates() {
        let provider = UnauthPaths::compile(&["^/a"]).unwrap();
        let location = UnauthPaths::compile(&["^/b"]).unwrap();
        let both = provider.extend(&location);
        assert!(both.matches("/a") && both.matches("/b"));
        assert!(!both.matches("/c"));
        assert!(!provider.matches("/b"));
        assert!(provider.extend(&UnauthPaths::default()).matches("/a"));
        assert!(UnauthPaths::default().extend(&UnauthPaths::default()).is_empty());
    }
}
