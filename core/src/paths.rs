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
}

fn check_pattern(pattern: &str) -> Result<(), PathError> {
    let error = |reason: String| PathError { pattern: pattern.to_owned(), reason };
    if pattern.trim().is_empty() {
        return Err(error("empty pattern would match every path".to_owned()));
    }
    Regex::new(pattern).map(drop).map_err(|e| error(e.to_string()))
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
