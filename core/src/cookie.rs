//! Cookie names, lookup in `Cookie` headers, and `Set-Cookie` values.

use cookie::time::{Duration, OffsetDateTime};
use cookie::{Cookie, SameSite};
use sha2::{Digest, Sha256};

/// `authentik_proxy_` + first 8 hex of sha256(client_id): authentik's session cookie name.
pub fn session_cookie_name(client_id: &str) -> String {
    let digest = Sha256::digest(client_id.as_bytes());
    let mut name = String::from("authentik_proxy_");
    for byte in &digest[..4] {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

/// Name of the cookie that binds one pending login to the browser that started it:
/// `<session cookie name>_login_<first 12 chars of the state>`. One per login, so tabs never
/// overwrite each other's.
pub fn login_cookie_name(session_cookie_name: &str, state: &str) -> String {
    let state_prefix: String = state.chars().take(12).collect();
    format!("{session_cookie_name}_login_{state_prefix}")
}

// The request side (`cookie_pairs` and its users) stays hand-written rather than using the
// `cookie` crate: it runs for every `Cookie` header of every request, works on raw bytes (a
// header need not be UTF-8), returns sub-slices of the header without allocating, and
// `remove_cookie_into` writes into a buffer the glue takes from the request's pool.

/// The `name=value` pairs of a `Cookie` header, each trimmed; pairs without `=` have an empty
/// value. Empty pieces are skipped.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8], &[u8])> {
    header.split(|&b| b == b';').filter_map(|piece| {
        let piece = piece.trim_ascii();
        if piece.is_empty() {
            return None;
        }
        let (name, value) = match piece.iter().position(|&b| b == b'=') {
            Some(eq) => (&piece[..eq], &piece[eq + 1..]),
            None => (piece, &piece[piece.len()..]),
        };
        Some((piece, name.trim_ascii(), value.trim_ascii()))
    })
}

/// Finds the value of cookie `name` in one `Cookie` header value (`a=1; b=2`). Exact,
/// case-sensitive name match; surrounding whitespace trimmed; the first occurrence wins.
pub fn find_cookie<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    cookie_pairs(header).find(|(_, cookie_name, _)| *cookie_name == name).map(|(_, _, v)| v)
}

/// Every value of cookies named `name` in one `Cookie` header, in order (a browser sends one
/// per scope: path, domain).
pub fn find_cookies<'a, 'n>(
    header: &'a [u8],
    name: &'n [u8],
) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
    cookie_pairs(header).filter(move |(_, cookie_name, _)| *cookie_name == name).map(|(_, _, v)| v)
}

/// The `Domain=` scopes in which a stale copy of a cookie for `host` may live, other than
/// `own_domain` (the scope the module sets): `host` itself and each parent domain with at least
/// two labels. Expiring the cookie in each lets a browser that carries an old cookie (authentik's
/// outpost sets `Domain=`) stop sending it. `host` may carry a port, which is dropped.
pub fn stale_cookie_domains<'a>(host: &'a str, own_domain: Option<&'a str>) -> Vec<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    if host.is_empty()
        || host.starts_with('[')
        || host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Vec::new();
    }
    let own = own_domain.map(|d| d.trim_start_matches('.'));
    let mut domains = Vec::new();
    let mut rest = host;
    while rest.contains('.') {
        if own.is_none_or(|own| !own.eq_ignore_ascii_case(rest)) {
            domains.push(rest);
        }
        rest = rest.split_once('.').map_or("", |(_, parent)| parent);
    }
    domains
}

/// Writes the `Cookie` header value with every cookie named `name` removed into `out` (which
/// must hold `2 * header.len()` bytes: kept cookies are re-joined with `"; "`) and returns the
/// length written: `None` when nothing was removed (or `out` is too small), `Some(0)` when
/// nothing is left. For callers that allocate from their own pool.
pub fn remove_cookie_into(header: &[u8], name: &[u8], out: &mut [u8]) -> Option<usize> {
    if out.len() < 2 * header.len() {
        return None;
    }
    let mut len = 0;
    let mut removed = false;
    for (piece, cookie_name, _) in cookie_pairs(header) {
        if cookie_name == name {
            removed = true;
            continue;
        }
        if len > 0 {
            out[len..len + 2].copy_from_slice(b"; ");
            len += 2;
        }
        out[len..len + piece.len()].copy_from_slice(piece);
        len += piece.len();
    }
    removed.then_some(len)
}

/// Attributes of a cookie the module sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieAttributes<'a> {
    pub path: &'a str,
    pub domain: Option<&'a str>,
    pub secure: bool,
}

/// `name=value` with `Path`, `Domain` (when set), `Max-Age=N`, `HttpOnly`, `Secure` (when set)
/// and `SameSite=Lax`, in the `cookie` crate's attribute order. `max_age` is clamped to >= 0.
pub fn set_cookie(name: &str, value: &str, max_age: i64, attrs: &CookieAttributes<'_>) -> String {
    let mut cookie = module_cookie(name, value, attrs);
    cookie.set_max_age(Duration::seconds(max_age.max(0)));
    cookie.to_string()
}

/// A `Set-Cookie` that deletes the cookie: empty value, `Max-Age=0` and an `Expires` in 1970,
/// with the same Path/Domain so the browser matches it.
pub fn expire_cookie(name: &str, attrs: &CookieAttributes<'_>) -> String {
    let mut cookie = module_cookie(name, "", attrs);
    cookie.set_max_age(Duration::ZERO);
    cookie.set_expires(OffsetDateTime::UNIX_EPOCH);
    cookie.to_string()
}

/// A cookie with the attributes every cookie the module sets has. The crate writes `Domain`
/// without a leading dot, which browsers ignore anyway (RFC 6265 5.2.3).
fn module_cookie<'c>(name: &'c str, value: &'c str, attrs: &CookieAttributes<'c>) -> Cookie<'c> {
    let mut cookie = Cookie::new(name, value);
    cookie.set_path(attrs.path);
    if let Some(domain) = attrs.domain {
        cookie.set_domain(domain);
    }
    cookie.set_http_only(true);
    cookie.set_secure(attrs.secure);
    cookie.set_same_site(SameSite::Lax);
    cookie
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_copy() {
        let header = b"a=1; s=stale; b=2; s=good;s=third";
        let all: Vec<&[u8]> = find_cookies(header, b"s").collect();
        assert_eq!(all, [&b"stale"[..], b"good", b"third"]);
        assert_eq!(find_cookies(b"a=1", b"s").count(), 0);
    }

    #[test]
    fn stale_domains_skip_own_scope_and_single_labels() {
        assert_eq!(
            stale_cookie_domains("app.example.com:8443", None),
            ["app.example.com", "example.com"]
        );
        assert_eq!(
            stale_cookie_domains("app.example.com", Some(".example.com")),
            ["app.example.com"]
        );
        assert!(stale_cookie_domains("localhost", None).is_empty());
        assert!(stale_cookie_domains("127.0.0.1:80", None).is_empty());
        assert!(stale_cookie_domains("[::1]:80", None).is_empty());
    }

    #[test]
    fn remove_cookie_into_handles_tight_separators() {
        // Re-joining with "; " can make the result longer than the input's remaining bytes.
        let header = b"a=1;b=2;c=3;d=4;e=5;f=6;ours=x";
        let mut out = vec![0u8; 2 * header.len()];
        let len = remove_cookie_into(header, b"ours", &mut out).expect("removed");
        assert_eq!(&out[..len], b"a=1; b=2; c=3; d=4; e=5; f=6");
        assert_eq!(remove_cookie_into(header, b"ours", &mut [0u8; 4]), None, "buffer too small");
        assert_eq!(remove_cookie_into(b"a=1", b"ours", &mut [0u8; 6]), None, "nothing removed");
        assert_eq!(remove_cookie_into(b"ours=1", b"ours", &mut [0u8; 12]), Some(0));
    }

    #[test]
    fn session_cookie_name_is_authentiks() {
        // sha256("abc") = ba7816bf...
        assert_eq!(session_cookie_name("abc"), "authentik_proxy_ba7816bf");
        assert_eq!(session_cookie_name("abc").len(), "authentik_proxy_".len() + 8);
        assert_ne!(session_cookie_name("abc"), session_cookie_name("abd"));
    }

    #[test]
    fn login_cookie_name_uses_twelve_chars_of_state() {
        let name = login_cookie_name("authentik_proxy_ba7816bf", "0123456789abcdefXYZ");
        assert_eq!(name, "authentik_proxy_ba7816bf_login_0123456789ab");
        assert_eq!(login_cookie_name("c", "short"), "c_login_short");
    }

    #[test]
    fn find_cookie_exact_first_trimmed() {
        let header = b"a=1; session=abc ;  session=second; Session=upper";
        assert_eq!(find_cookie(header, b"session"), Some(&b"abc"[..]));
        assert_eq!(find_cookie(header, b"Session"), Some(&b"upper"[..]));
        assert_eq!(find_cookie(header, b"a"), Some(&b"1"[..]));
        assert_eq!(find_cookie(header, b"sess"), None);
        assert_eq!(find_cookie(header, b"ession"), None);
        assert_eq!(find_cookie(b"", b"a"), None);
        assert_eq!(find_cookie(b";;flag; x=", b"flag"), Some(&b""[..]));
        assert_eq!(find_cookie(b";;flag; x=", b"x"), Some(&b""[..]));
        assert_eq!(find_cookie(b"a=b=c", b"a"), Some(&b"b=c"[..]));
        assert_eq!(find_cookie(b"\ta=1\t", b"a"), Some(&b"1"[..]));
    }

    /// [`remove_cookie_into`] with a buffer of the documented size; the bytes written.
    fn remove_cookie(header: &[u8], name: &[u8]) -> Option<Vec<u8>> {
        let mut kept = vec![0u8; 2 * header.len()];
        let len = remove_cookie_into(header, name, &mut kept)?;
        kept.truncate(len);
        Some(kept)
    }

    #[test]
    fn remove_cookie_into_removes_every_occurrence() {
        assert_eq!(remove_cookie(b"a=1; s=2; b=3; s=4", b"s"), Some(b"a=1; b=3".to_vec()));
        assert_eq!(remove_cookie(b"s=2", b"s"), Some(Vec::new()));
        assert_eq!(remove_cookie(b"a=1; b=2", b"s"), None);
        assert_eq!(remove_cookie(b"", b"s"), None);
        assert_eq!(remove_cookie(b"  s=1 ;a=2", b"s"), Some(b"a=2".to_vec()));
    }

    /// The `name=value` pair of a `Set-Cookie` value and its attributes, sorted: equal for two
    /// values that differ only in attribute order.
    fn attributes(set_cookie: &str) -> (&str, Vec<&str>) {
        let mut parts = set_cookie.split("; ");
        let pair = parts.next().unwrap_or_default();
        let mut attributes: Vec<&str> = parts.collect();
        attributes.sort_unstable();
        (pair, attributes)
    }

    #[test]
    fn set_cookie_has_every_attribute() {
        let attrs = CookieAttributes { path: "/", domain: Some("example.com"), secure: true };
        assert_eq!(
            attributes(&set_cookie("n", "v", 3600, &attrs)),
            attributes(
                "n=v; Path=/; Domain=example.com; Max-Age=3600; HttpOnly; Secure; SameSite=Lax"
            )
        );
        let attrs = CookieAttributes { path: "/app", domain: None, secure: false };
        assert_eq!(
            attributes(&set_cookie("n", "v", -5, &attrs)),
            attributes("n=v; Path=/app; Max-Age=0; HttpOnly; SameSite=Lax")
        );
    }

    #[test]
    fn expire_cookie_matches_path_and_domain() {
        let attrs = CookieAttributes { path: "/", domain: Some("example.com"), secure: true };
        assert_eq!(
            attributes(&expire_cookie("n", &attrs)),
            attributes(
                "n=; Path=/; Domain=example.com; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; \
                 HttpOnly; Secure; SameSite=Lax"
            )
        );
    }
}
