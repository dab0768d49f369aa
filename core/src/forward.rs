//! Forward auth for other proxies (authentik's `/outpost.goauthentik.io/auth/{nginx,traefik,
//! caddy,envoy}`): which endpoint a path names, the URL the proxy is asking about (built from
//! the headers each proxy sends), whether that URL belongs to the provider, and the login and
//! logout signatures inside it.
//!
//! authentik takes the forwarded URL as it comes; here a URL outside the provider's external
//! host (proxy, forward_single) or cookie domain (forward_domain) is refused.

use url::Url;

use crate::config::{is_host_in_domain, Mode, ProviderSettings};
use crate::request::{decode_query_value, query_arg};

/// The forward-auth endpoints, after `/outpost.goauthentik.io/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardEndpoint {
    /// `auth/nginx`: an nginx `auth_request` (`X-Original-URI` or `X-Original-URL`).
    Nginx,
    /// `auth/traefik`: Traefik's forwardAuth (`X-Forwarded-Proto`, `-Host`, `-Uri`).
    Traefik,
    /// `auth/caddy`: Caddy's forward_auth (same headers as Traefik).
    Caddy,
    /// `auth/envoy<original path>`: Envoy's ext_authz HTTP service (prefix route; the
    /// original host is the request's `Host`).
    Envoy,
}

impl ForwardEndpoint {
    /// The forward-auth endpoint `endpoint` (the path after `/outpost.goauthentik.io/`) names.
    pub fn of(endpoint: &[u8]) -> Option<ForwardEndpoint> {
        match endpoint {
            b"auth/nginx" => Some(ForwardEndpoint::Nginx),
            b"auth/traefik" => Some(ForwardEndpoint::Traefik),
            b"auth/caddy" => Some(ForwardEndpoint::Caddy),
            _ => {
                let rest = endpoint.strip_prefix(b"auth/envoy")?;
                (rest.is_empty() || rest[0] == b'/').then_some(ForwardEndpoint::Envoy)
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ForwardEndpoint::Nginx => "nginx",
            ForwardEndpoint::Traefik => "traefik",
            ForwardEndpoint::Caddy => "caddy",
            ForwardEndpoint::Envoy => "envoy",
        }
    }
}

/// The forward-auth endpoint a request path names under any base path, if any: used to choose
/// the provider of `auth_authentik auto` by the forwarded host.
pub fn endpoint_in_path(uri: &[u8]) -> Option<ForwardEndpoint> {
    const PREFIX: &[u8] = b"/outpost.goauthentik.io/";
    let at = uri.windows(PREFIX.len()).position(|w| w == PREFIX)?;
    ForwardEndpoint::of(&uri[at + PREFIX.len()..])
}

/// What a forward-auth request says about the original request: its headers (absent ones
/// `None`) and what to assume where the proxy sends only a path.
#[derive(Debug, Default, Clone)]
pub struct ForwardHeaders<'a> {
    pub original_uri: Option<&'a [u8]>,
    pub original_url: Option<&'a [u8]>,
    pub forwarded_proto: Option<&'a [u8]>,
    pub forwarded_host: Option<&'a [u8]>,
    pub forwarded_uri: Option<&'a [u8]>,
    /// The forward-auth request's own `Host` (Envoy sends the original host there).
    pub host: Option<&'a [u8]>,
    /// Envoy: the forward-auth request's target after `auth/envoy` (original path and query).
    pub envoy_target: &'a [u8],
    /// `scheme://host[:port]` a bare path (`X-Original-URI`) is resolved against.
    pub path_origin: &'a str,
    /// The scheme of an Envoy request that has no `X-Forwarded-Proto`.
    pub default_scheme: &'a str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    /// authentik's `500 configuration error`: the proxy is not set up to send the URL.
    #[error("forward auth request has no {0} header")]
    Missing(&'static str),
    /// Also `500 configuration error` (authentik answers a URL it cannot parse so).
    #[error("forward auth request has an invalid {0}: \"{1}\"")]
    Invalid(&'static str, String),
    /// authentik's `400 invalid envoy request`.
    #[error("envoy forward auth request has no Host header")]
    NoEnvoyHost,
}

/// The original request's URL, as the proxy forwarded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardUrl {
    /// The parsed URL (scheme, host and port are compared through it).
    pub url: Url,
    /// The request target as the proxy forwarded it (path and query, not normalised): what the
    /// upstream will see, and what unauthenticated paths are matched against.
    pub target: String,
    /// `scheme://host[:port]` as forwarded (lowercased scheme and host).
    pub origin: String,
}

/// A login or logout signature inside the forwarded URL (Traefik and Caddy only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// `?X-authentik-auth-callback=true`: the login callback, forwarded.
    Callback,
    /// `?X-authentik-logout=true`: sign out.
    Logout,
}

impl ForwardUrl {
    /// Builds the forwarded URL the way `endpoint`'s proxy sends it:
    /// - nginx: `X-Original-URI` (a path, resolved against `path_origin`), else `X-Original-URL`;
    /// - traefik, caddy: `X-Forwarded-Proto` + `://` + `X-Forwarded-Host` + `X-Forwarded-Uri`;
    /// - envoy: `X-Forwarded-Proto` (else `default_scheme`) + `://` + `Host` + the target after
    ///   the endpoint.
    pub fn from_headers(
        endpoint: ForwardEndpoint,
        h: &ForwardHeaders<'_>,
    ) -> Result<ForwardUrl, ForwardError> {
        match endpoint {
            ForwardEndpoint::Nginx => {
                if let Some(uri) = h.original_uri.filter(|v| !v.is_empty()) {
                    let (scheme, authority) = split_origin(h.path_origin)
                        .ok_or_else(|| invalid("origin", h.path_origin.as_bytes()))?;
                    return build(
                        scheme,
                        authority,
                        text("X-Original-URI", uri)?,
                        "X-Original-URI",
                    );
                }
                let url = h
                    .original_url
                    .filter(|v| !v.is_empty())
                    .ok_or(ForwardError::Missing("X-Original-URI or X-Original-URL"))?;
                let url = text("X-Original-URL", url)?;
                let (scheme, rest) = url
                    .split_once("://")
                    .ok_or_else(|| invalid("X-Original-URL", url.as_bytes()))?;
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                build(scheme, &rest[..end], &rest[end..], "X-Original-URL")
            }
            ForwardEndpoint::Traefik | ForwardEndpoint::Caddy => {
                let proto = h.forwarded_proto.ok_or(ForwardError::Missing("X-Forwarded-Proto"))?;
                let host = h.forwarded_host.ok_or(ForwardError::Missing("X-Forwarded-Host"))?;
                let uri = h.forwarded_uri.unwrap_or(b"/");
                let proto = text("X-Forwarded-Proto", proto)?;
                let host = text("X-Forwarded-Host", host)?;
                build(proto, host, text("X-Forwarded-Uri", uri)?, "X-Forwarded-Uri")
            }
            ForwardEndpoint::Envoy => {
                let host = h.host.filter(|v| !v.is_empty()).ok_or(ForwardError::NoEnvoyHost)?;
                let scheme = match h.forwarded_proto {
                    Some(proto) => text("X-Forwarded-Proto", proto)?,
                    None => h.default_scheme,
                };
                let host = text("Host", host)?;
                build(scheme, host, text("envoy path", h.envoy_target)?, "envoy path")
            }
        }
    }

    /// The whole URL as forwarded (`origin` + `target`): the return URL of a login.
    pub fn as_string(&self) -> String {
        format!("{}{}", self.origin, self.target)
    }

    /// The login or logout signature in the URL's query, if any.
    pub fn signature(&self) -> Option<Signature> {
        let query = self.target.split_once('?')?.1.as_bytes();
        let is_true =
            |name: &[u8]| query_arg(query, name).is_some_and(|v| v.eq_ignore_ascii_case(b"true"));
        if is_true(b"X-authentik-auth-callback") {
            Some(Signature::Callback)
        } else if is_true(b"X-authentik-logout") {
            Some(Signature::Logout)
        } else {
            None
        }
    }

    /// The query of the forwarded URL ("" for none): what a forwarded callback reads.
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// `true` when the path is one of the outpost's own (`<base_path>/outpost.goauthentik.io`):
    /// authentik's nginx endpoint lets those through unauthenticated.
    pub fn is_outpost_path(&self, base_path: &str) -> bool {
        self.target
            .strip_prefix(base_path)
            .is_some_and(|rest| rest.starts_with("/outpost.goauthentik.io"))
    }

    /// Whether the URL belongs to the provider: in proxy and forward_single mode the external
    /// origin (`external_origin`: scheme, host and port); in forward_domain mode a host in the
    /// cookie domain.
    pub fn within(&self, settings: &ProviderSettings, external_origin: &str) -> bool {
        let Some(host) = self.url.host_str() else {
            return false;
        };
        match settings.mode {
            Mode::ForwardDomain => settings
                .cookie_domain
                .as_deref()
                .is_some_and(|domain| is_host_in_domain(&host.to_ascii_lowercase(), domain)),
            Mode::Proxy | Mode::ForwardSingle => {
                let Ok(origin) = Url::parse(external_origin) else {
                    return false;
                };
                self.url.scheme() == origin.scheme()
                    && origin.host_str().is_some_and(|o| o.eq_ignore_ascii_case(host))
                    && self.url.port_or_known_default() == origin.port_or_known_default()
            }
        }
    }
}

/// The host (without port, lowercased) a forward-auth request asks about, for choosing the
/// provider of `auth_authentik auto`: `X-Forwarded-Host` (traefik, caddy), the host of
/// `X-Original-URL` (nginx, when there is no `X-Original-URI`); `None` otherwise (the request's
/// own host decides).
pub fn lookup_host(endpoint: ForwardEndpoint, h: &ForwardHeaders<'_>) -> Option<String> {
    let authority = match endpoint {
        ForwardEndpoint::Traefik | ForwardEndpoint::Caddy => h.forwarded_host?,
        ForwardEndpoint::Nginx if h.original_uri.is_none_or(<[u8]>::is_empty) => {
            let url = h.original_url?;
            let at = url.windows(3).position(|w| w == b"://")? + 3;
            let rest = &url[at..];
            let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
            &rest[..end]
        }
        _ => return None,
    };
    let authority = core::str::from_utf8(authority).ok()?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    Some(host.to_ascii_lowercase())
}

/// The post-login target `rd` of `/start`, percent-decoded; but when its raw value holds a `?`,
/// the rest of the query as it is: authentik's nginx snippet sends `rd=$request_uri` without
/// escaping it, and the original URL's other arguments and escapes then survive the login
/// (authentik's outpost keeps only the first argument, decoded). The result is checked by
/// `validate_return_to` like any `rd`.
pub fn start_return_target(args: &[u8]) -> Option<String> {
    let mut offset = 0;
    for pair in args.split(|&b| b == b'&') {
        let name_end = pair.iter().position(|&b| b == b'=').unwrap_or(pair.len());
        if &pair[..name_end] == b"rd" {
            let value = pair.get(name_end + 1..).unwrap_or_default();
            if !value.contains(&b'?') {
                return decode_query_value(value);
            }
            let rest = &args[offset + name_end + 1..];
            return core::str::from_utf8(rest).ok().map(str::to_owned);
        }
        offset += pair.len() + 1;
    }
    None
}

/// Go's canonical header case (`textproto.CanonicalMIMEHeaderKey`): the first letter and every
/// letter after `-` upper case, the rest lower case; a name with a byte that is not a token
/// character is left as it is.
pub fn canonical_header_name(name: &str) -> String {
    if !crate::identity::is_token(name) {
        return name.to_owned();
    }
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() };
            upper = c == '-';
            out
        })
        .collect()
}

fn invalid(what: &'static str, value: &[u8]) -> ForwardError {
    let shown: String =
        String::from_utf8_lossy(&value[..value.len().min(200)]).escape_default().collect();
    ForwardError::Invalid(what, shown)
}

/// A header value as text: UTF-8 without control characters (a proxy sends nothing else).
fn text<'a>(what: &'static str, value: &'a [u8]) -> Result<&'a str, ForwardError> {
    match core::str::from_utf8(value) {
        Ok(s) if !s.contains(|c: char| c.is_control()) => Ok(s),
        _ => Err(invalid(what, value)),
    }
}

fn split_origin(origin: &str) -> Option<(&str, &str)> {
    let (scheme, authority) = origin.split_once("://")?;
    Some((scheme, authority.trim_end_matches('/')))
}

fn build(
    scheme: &str,
    authority: &str,
    target: &str,
    target_name: &'static str,
) -> Result<ForwardUrl, ForwardError> {
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "http" | "https") {
        return Err(invalid("scheme", scheme.as_bytes()));
    }
    let authority_ok = !authority.is_empty()
        && authority.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    if !authority_ok {
        return Err(invalid("host", authority.as_bytes()));
    }
    let target = match target.as_bytes().first() {
        None => "/".to_owned(),
        Some(b'?') => format!("/{target}"),
        Some(b'/') if !target.starts_with("//") => target.to_owned(),
        _ => return Err(invalid(target_name, target.as_bytes())),
    };
    if target.contains(['\\', ' ', '#']) {
        return Err(invalid(target_name, target.as_bytes()));
    }
    let origin = format!("{scheme}://{}", authority.to_ascii_lowercase());
    let url = Url::parse(&format!("{origin}{target}"))
        .map_err(|_| invalid(target_name, format!("{origin}{target}").as_bytes()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("host", authority.as_bytes()));
    }
    Ok(ForwardUrl { url, target, origin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_http_url, ProviderMeta};

    fn settings(mode: Mode, external_host: &str, cookie_domain: Option<&str>) -> ProviderSettings {
        ProviderSettings {
            name: "app".into(),
            issuer: parse_http_url("https://idp.example.com/").unwrap(),
            client_id: "c".into(),
            client_secret: "s".into(),
            external_host: Some(parse_http_url(external_host).unwrap()),
            mode,
            cookie_domain: cookie_domain.map(str::to_owned),
            scopes: vec![],
            timeout_ms: 1000,
            ca_file: None,
            post_logout_redirect: None,
            trusted_audiences: vec![],
            meta: ProviderMeta::default(),
            backchannel_host: None,
            basic_auth: None,
        }
    }

    fn traefik(proto: &str, host: &str, uri: &str) -> Result<ForwardUrl, ForwardError> {
        let h = ForwardHeaders {
            forwarded_proto: Some(proto.as_bytes()),
            forwarded_host: Some(host.as_bytes()),
            forwarded_uri: Some(uri.as_bytes()),
            ..Default::default()
        };
        ForwardUrl::from_headers(ForwardEndpoint::Traefik, &h)
    }

    #[test]
    fn endpoints_are_recognised() {
        assert_eq!(ForwardEndpoint::of(b"auth/nginx"), Some(ForwardEndpoint::Nginx));
        assert_eq!(ForwardEndpoint::of(b"auth/traefik"), Some(ForwardEndpoint::Traefik));
        assert_eq!(ForwardEndpoint::of(b"auth/caddy"), Some(ForwardEndpoint::Caddy));
        assert_eq!(ForwardEndpoint::of(b"auth/envoy"), Some(ForwardEndpoint::Envoy));
        assert_eq!(ForwardEndpoint::of(b"auth/envoy/app?x"), Some(ForwardEndpoint::Envoy));
        assert_eq!(ForwardEndpoint::of(b"auth/envoyx"), None);
        assert_eq!(ForwardEndpoint::of(b"auth/nginx/"), None);
        assert_eq!(ForwardEndpoint::of(b"auth"), None);
        let of = endpoint_in_path;
        assert_eq!(of(b"/outpost.goauthentik.io/auth/caddy"), Some(ForwardEndpoint::Caddy));
        assert_eq!(of(b"/base/outpost.goauthentik.io/auth/envoy/x"), Some(ForwardEndpoint::Envoy));
        assert_eq!(of(b"/outpost.goauthentik.io/start"), None);
    }

    #[test]
    fn nginx_prefers_the_original_uri() {
        let h = ForwardHeaders {
            original_uri: Some(b"/app/x?a=%2F"),
            original_url: Some(b"https://evil.example.net/other"),
            path_origin: "https://app.example.com",
            ..Default::default()
        };
        let f = ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h).unwrap();
        assert_eq!(f.as_string(), "https://app.example.com/app/x?a=%2F");
        assert_eq!(f.target, "/app/x?a=%2F");
        let h = ForwardHeaders { original_uri: None, ..h };
        let f = ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h).unwrap();
        assert_eq!(f.as_string(), "https://evil.example.net/other");
        let h = ForwardHeaders { original_url: Some(b"HTTP://App.Example.com:8080?q"), ..h };
        let f = ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h).unwrap();
        assert_eq!(f.as_string(), "http://app.example.com:8080/?q");
    }

    #[test]
    fn missing_headers_are_configuration_errors() {
        let h = ForwardHeaders { path_origin: "https://a.example.com", ..Default::default() };
        assert!(matches!(
            ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h),
            Err(ForwardError::Missing(_))
        ));
        let h = ForwardHeaders { original_uri: Some(b""), original_url: Some(b""), ..h };
        assert!(matches!(
            ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h),
            Err(ForwardError::Missing(_))
        ));
        let h = ForwardHeaders { forwarded_host: Some(b"a.example.com"), ..Default::default() };
        assert_eq!(
            ForwardUrl::from_headers(ForwardEndpoint::Caddy, &h),
            Err(ForwardError::Missing("X-Forwarded-Proto"))
        );
        assert_eq!(
            ForwardUrl::from_headers(ForwardEndpoint::Envoy, &ForwardHeaders::default()),
            Err(ForwardError::NoEnvoyHost)
        );
    }

    #[test]
    fn traefik_and_caddy_join_proto_host_and_uri() {
        let f = traefik("https", "App.Example.com", "/p/q?x=1&y=%20").unwrap();
        assert_eq!(f.as_string(), "https://app.example.com/p/q?x=1&y=%20");
        assert_eq!(f.origin, "https://app.example.com");
        let h = ForwardHeaders {
            forwarded_proto: Some(b"http"),
            forwarded_host: Some(b"a.example.com:81"),
            ..Default::default()
        };
        let f = ForwardUrl::from_headers(ForwardEndpoint::Traefik, &h).unwrap();
        assert_eq!(f.as_string(), "http://a.example.com:81/");
    }

    #[test]
    fn hostile_urls_are_refused() {
        for (proto, host, uri) in [
            ("javascript", "a.example.com", "/"),
            ("", "a.example.com", "/"),
            ("https", "", "/"),
            ("https", "user@a.example.com", "/"),
            ("https", "a.example.com/x", "/"),
            ("https", "a.example.com", "//evil.example.net/"),
            ("https", "a.example.com", "evil"),
            ("https", "a.example.com", "/a\\b"),
            ("https", "a.example.com", "/a b"),
            ("https", "a.example.com", "/a\r\nX: y"),
            ("https", "a.example.com", "/#frag"),
            ("https", "a.example.com:99999", "/"),
        ] {
            assert!(traefik(proto, host, uri).is_err(), "{proto} {host} {uri}");
        }
        let h = ForwardHeaders { original_url: Some(b"/only/a/path"), ..Default::default() };
        assert!(ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h).is_err());
        let h = ForwardHeaders { original_url: Some(b"https://a\xff.example.com/"), ..h };
        assert!(ForwardUrl::from_headers(ForwardEndpoint::Nginx, &h).is_err());
    }

    #[test]
    fn envoy_uses_host_and_the_path_after_the_prefix() {
        let h = ForwardHeaders {
            host: Some(b"app.example.com"),
            envoy_target: b"/x/y?z=1",
            default_scheme: "https",
            ..Default::default()
        };
        let f = ForwardUrl::from_headers(ForwardEndpoint::Envoy, &h).unwrap();
        assert_eq!(f.as_string(), "https://app.example.com/x/y?z=1");
        let h = ForwardHeaders { forwarded_proto: Some(b"http"), envoy_target: b"", ..h };
        let f = ForwardUrl::from_headers(ForwardEndpoint::Envoy, &h).unwrap();
        assert_eq!(f.as_string(), "http://app.example.com/");
    }

    #[test]
    fn urls_outside_the_provider_are_not_within() {
        let single = settings(Mode::ForwardSingle, "https://app.example.com/", None);
        let origin = "https://app.example.com";
        assert!(traefik("https", "app.example.com", "/x").unwrap().within(&single, origin));
        assert!(traefik("https", "APP.example.com:443", "/x").unwrap().within(&single, origin));
        assert!(!traefik("http", "app.example.com", "/x").unwrap().within(&single, origin));
        assert!(!traefik("https", "app.example.com:8443", "/").unwrap().within(&single, origin));
        assert!(!traefik("https", "evil.example.net", "/").unwrap().within(&single, origin));
        assert!(!traefik("https", "app.example.com.evil.net", "/")
            .unwrap()
            .within(&single, origin));

        let domain =
            settings(Mode::ForwardDomain, "https://auth.example.com/", Some("example.com"));
        let origin = "https://auth.example.com";
        assert!(traefik("http", "one.example.com:8080", "/").unwrap().within(&domain, origin));
        assert!(traefik("https", "example.com", "/").unwrap().within(&domain, origin));
        assert!(!traefik("https", "badexample.com", "/").unwrap().within(&domain, origin));
        assert!(!traefik("https", "example.com.evil.net", "/").unwrap().within(&domain, origin));
    }

    #[test]
    fn signatures_are_read_from_the_forwarded_query() {
        let sig = |uri: &str| traefik("https", "a.example.com", uri).unwrap().signature();
        assert_eq!(
            sig("/outpost.goauthentik.io/callback?X-authentik-auth-callback=true&code=c"),
            Some(Signature::Callback)
        );
        assert_eq!(sig("/?a=1&X-authentik-logout=true"), Some(Signature::Logout));
        assert_eq!(sig("/?X-authentik-logout=false"), None);
        assert_eq!(sig("/X-authentik-logout=true"), None);
        assert_eq!(sig("/"), None);
        let f = traefik("https", "a.example.com", "/cb?state=s&code=c").unwrap();
        assert_eq!(f.query(), "state=s&code=c");
        assert!(traefik("https", "a.example.com", "/outpost.goauthentik.io/x")
            .unwrap()
            .is_outpost_path(""));
        assert!(!traefik("https", "a.example.com", "/app/outpost.goauthentik.io")
            .unwrap()
            .is_outpost_path(""));
        assert!(traefik("https", "a.example.com", "/app/outpost.goauthentik.io")
            .unwrap()
            .is_outpost_path("/app"));
    }

    #[test]
    fn lookup_host_names_the_forwarded_host() {
        let h =
            ForwardHeaders { forwarded_host: Some(b"App.Example.com:8443"), ..Default::default() };
        assert_eq!(lookup_host(ForwardEndpoint::Caddy, &h).as_deref(), Some("app.example.com"));
        let h = ForwardHeaders {
            original_url: Some(b"http://B.example.com:80/x"),
            ..Default::default()
        };
        assert_eq!(lookup_host(ForwardEndpoint::Nginx, &h).as_deref(), Some("b.example.com"));
        let h = ForwardHeaders { original_uri: Some(b"/x"), ..h };
        assert_eq!(lookup_host(ForwardEndpoint::Nginx, &h), None);
        assert_eq!(lookup_host(ForwardEndpoint::Envoy, &h), None);
    }

    #[test]
    fn start_keeps_an_unescaped_return_target_whole() {
        let rd = |args: &str| start_return_target(args.as_bytes());
        assert_eq!(rd("rd=%2Fa%3Fb%3D1%26c%3D2").as_deref(), Some("/a?b=1&c=2"));
        assert_eq!(rd("rd=/a?b=1&c=%2F").as_deref(), Some("/a?b=1&c=%2F"));
        assert_eq!(rd("x=1&rd=/p?q=1&r=2").as_deref(), Some("/p?q=1&r=2"));
        assert_eq!(rd("x=1&rd=/plain&y=2").as_deref(), Some("/plain"));
        assert_eq!(rd("rdx=/a?b&y=1"), None);
        assert_eq!(rd("rd").as_deref(), Some(""));
        assert_eq!(rd(""), None);
        assert_eq!(start_return_target(b"rd=/a?\xff"), None);
    }

    #[test]
    fn header_names_get_go_canonical_case() {
        assert_eq!(canonical_header_name("X-authentik-username"), "X-Authentik-Username");
        assert_eq!(canonical_header_name("x-authentik-meta-app"), "X-Authentik-Meta-App");
        assert_eq!(canonical_header_name("user-agent"), "User-Agent");
        assert_eq!(canonical_header_name("bad header"), "bad header");
    }
}
