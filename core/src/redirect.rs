//! Open-redirect protection for the post-login target (`rd`).

use url::Url;

use crate::config::{is_host_in_domain, Mode};

/// The longest post-login URL kept with a pending login; a longer one is refused (the user
/// lands on the external host's root), so that pending logins stay small and bounded.
pub const MAX_RETURN_URL: usize = 2048;

/// Returns the absolute URL to send the user to after login, or `None` when `target` must be
/// refused (also when it, or the URL it resolves to, is longer than [`MAX_RETURN_URL`]). `target` is an absolute URL or an absolute path (`/x?y`); a path is resolved against
/// `external_origin` (scheme://host[:port]).
/// - proxy, forward_single: the scheme, host and port must equal the external origin's.
/// - forward_domain: the hostname must equal `cookie_domain` or end with `.` + `cookie_domain`.
///
/// Schemes other than http/https, userinfo (`user@`), backslashes, control characters and
/// scheme-relative `//host` targets are refused.
pub fn validate_return_to(
    target: &str,
    mode: Mode,
    external_origin: &str,
    cookie_domain: Option<&str>,
) -> Option<String> {
    // The URL parser silently drops tabs and newlines and reads `\` as `/`: refuse them first.
    if target.is_empty()
        || target.len() > MAX_RETURN_URL
        || target.contains(|c: char| c.is_control() || c == '\\')
    {
        return None;
    }
    let origin = Url::parse(external_origin).ok()?;
    let url = if target.starts_with('/') {
        if target.starts_with("//") {
            return None;
        }
        origin.join(target).ok()?
    } else {
        Url::parse(target).ok()?
    };
    if !matches!(url.scheme(), "http" | "https") || has_userinfo(&url) {
        return None;
    }
    let allowed = match mode {
        Mode::Proxy | Mode::ForwardSingle => same_host_and_port(&url, &origin),
        Mode::ForwardDomain => host_in_cookie_domain(&url, cookie_domain?),
    };
    let url = url.to_string();
    (allowed && url.len() <= MAX_RETURN_URL).then_some(url)
}

fn has_userinfo(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

fn same_host_and_port(url: &Url, origin: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let Some(origin_host) = origin.host_str() else {
        return false;
    };
    // The whole origin: `http://host:443/` is another origin than `https://host` (fuzz/ found
    // it accepted when only host and port were compared).
    url.scheme() == origin.scheme()
        && host.eq_ignore_ascii_case(origin_host)
        && url.port_or_known_default() == origin.port_or_known_default()
}

fn host_in_cookie_domain(url: &Url, cookie_domain: &str) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let domain = cookie_domain.strip_prefix('.').unwrap_or(cookie_domain).to_ascii_lowercase();
    !domain.is_empty() && is_host_in_domain(&host.to_ascii_lowercase(), &domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_targets_are_refused() {
        let ok = format!("/{}", "a".repeat(1000));
        assert!(proxy(&ok).is_some());
        let long = format!("/{}", "a".repeat(MAX_RETURN_URL));
        assert_eq!(proxy(&long), None);
        let absolute = format!("{ORIGIN}/{}", "b".repeat(MAX_RETURN_URL - ORIGIN.len()));
        assert_eq!(proxy(&absolute), None);
    }

    const ORIGIN: &str = "https://app.example.com";

    fn proxy(target: &str) -> Option<String> {
        validate_return_to(target, Mode::Proxy, ORIGIN, None)
    }

    fn domain(target: &str) -> Option<String> {
        validate_return_to(
            target,
            Mode::ForwardDomain,
            "https://auth.example.com",
            Some("example.com"),
        )
    }

    #[test]
    fn paths_resolve_against_the_origin_with_query_preserved() {
        assert_eq!(proxy("/").as_deref(), Some("https://app.example.com/"));
        assert_eq!(
            proxy("/app/page?a=1&b=%2F%20x&c=d#frag").as_deref(),
            Some("https://app.example.com/app/page?a=1&b=%2F%20x&c=d#frag")
        );
        assert_eq!(
            validate_return_to("/x?y=1", Mode::ForwardSingle, "http://app.local:8080", None)
                .as_deref(),
            Some("http://app.local:8080/x?y=1")
        );
    }

    #[test]
    fn absolute_urls_on_the_same_host_are_accepted() {
        assert_eq!(
            proxy("https://app.example.com/p?q=a%26b&r=1").as_deref(),
            Some("https://app.example.com/p?q=a%26b&r=1")
        );
        assert_eq!(
            proxy("https://APP.example.com:443/").as_deref(),
            Some("https://app.example.com/")
        );
    }

    #[test]
    fn proxy_mode_refuses_other_hosts_and_ports() {
        for target in [
            "https://evil.com",
            "https://evil.com/app.example.com",
            "https://app.example.com.evil.com/",
            "https://sub.app.example.com/",
            "https://app.example.com:8443/",
            "http://app.example.com/",
        ] {
            assert_eq!(proxy(target), None, "{target}");
        }
    }

    /// Found by fuzz/ (redirect): same host and port, other scheme, was accepted.
    #[test]
    fn proxy_mode_refuses_another_scheme_on_the_same_port() {
        assert_eq!(proxy("http://app.example.com:443/x"), None);
        let plain = "http://app.example.com:8080";
        assert_eq!(
            validate_return_to("https://app.example.com:8080/", Mode::Proxy, plain, None),
            None
        );
        assert_eq!(
            validate_return_to("http://app.example.com:8080/x", Mode::Proxy, plain, None)
                .as_deref(),
            Some("http://app.example.com:8080/x")
        );
    }

    #[test]
    fn open_redirect_tricks_are_refused() {
        for target in [
            "//evil.com",
            "//evil.com/path",
            "/\\evil.com",
            "\\\\evil.com",
            "https:\\\\evil.com",
            "javascript:alert(1)",
            "JavaScript:alert(1)//app.example.com",
            "data:text/html,<script>alert(1)</script>",
            "https://user@evil.com",
            "https://app.example.com@evil.com/",
            "https://user:pass@app.example.com/",
            "https://user@app.example.com/",
            "/\t/evil.com",
            "/\n/evil.com",
            "https://app.example.com/\r\nSet-Cookie: x=1",
            "/x\u{0}",
            "/x\u{7f}",
            "",
            "relative/path",
            "?query",
            "ftp://app.example.com/",
            "https:",
            "https:///",
        ] {
            assert_eq!(proxy(target), None, "{target:?}");
        }
    }

    #[test]
    fn forward_domain_accepts_hosts_under_the_cookie_domain() {
        assert_eq!(
            domain("https://app.example.com/x?y=1").as_deref(),
            Some("https://app.example.com/x?y=1")
        );
        assert_eq!(domain("https://EXAMPLE.com/").as_deref(), Some("https://example.com/"));
        assert_eq!(
            domain("http://a.b.example.com:8080/").as_deref(),
            Some("http://a.b.example.com:8080/")
        );
        assert_eq!(
            domain("/after?login=1").as_deref(),
            Some("https://auth.example.com/after?login=1")
        );
        assert_eq!(
            validate_return_to(
                "https://a.example.com/",
                Mode::ForwardDomain,
                ORIGIN,
                Some(".Example.com")
            )
            .as_deref(),
            Some("https://a.example.com/")
        );
    }

    #[test]
    fn forward_domain_refuses_lookalikes() {
        for target in [
            "https://evil.com",
            "https://evilexample.com",
            "https://example.com.evil.com",
            "https://example.com@evil.com",
            "https://xn--exmple-cua.com/",
            "//evil.com",
            "javascript:alert(1)",
        ] {
            assert_eq!(domain(target), None, "{target}");
        }
        assert_eq!(
            validate_return_to("https://a.example.com/", Mode::ForwardDomain, ORIGIN, None),
            None
        );
    }

    #[test]
    fn invalid_origin_refuses_everything() {
        assert_eq!(validate_return_to("/x", Mode::Proxy, "not a url", None), None);
    }
}
