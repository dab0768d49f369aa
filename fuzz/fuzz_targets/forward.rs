//! Forward auth: `forward::ForwardUrl::from_headers` on the headers a proxy sends (the input is
//! split at `\n` into X-Original-URI, X-Original-URL, X-Forwarded-Proto, -Host, -Uri, Host and
//! Envoy's path; its first byte picks the endpoint and which headers are present), then
//! `within` on the fixed sites; and `start_return_target` (`/start`'s `rd`) on the rest.
//! A URL built is absolute http(s) without userinfo, its target a path (not `//`) without
//! control bytes, `\`, spaces or `#`; one `within` a site stays on it (the external origin, or
//! a host inside the cookie domain), and is accepted as the return URL of a login unless too
//! long (as forwarded or as serialised).
#![no_main]

use authentik_core::config::{parse_cookie_domain, parse_http_url, Mode, ProviderSettings};
use authentik_core::forward::{start_return_target, ForwardEndpoint, ForwardHeaders, ForwardUrl};
use authentik_core::redirect::{validate_return_to, MAX_RETURN_URL};
use authentik_core::request::query_arg;
use authentik_fuzz::SITES;
use libfuzzer_sys::fuzz_target;
use url::Url;

const ENDPOINTS: [ForwardEndpoint; 4] = [
    ForwardEndpoint::Nginx,
    ForwardEndpoint::Traefik,
    ForwardEndpoint::Caddy,
    ForwardEndpoint::Envoy,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // /start's `rd` on the same bytes: a target kept whole is the query's own tail.
    if let Some(target) = start_return_target(rest) {
        if query_arg(rest, b"rd").is_some_and(|raw| raw.contains(&b'?')) {
            assert!(rest.ends_with(target.as_bytes()), "{target:?}");
        }
    }
    let endpoint = ENDPOINTS[usize::from(selector & 3)];
    let present = |bit: u8| selector & (4 << bit) != 0 || bit >= 6;
    let mut fields = rest.split(|&b| b == b'\n');
    let mut next = |bit: u8| fields.next().filter(|_| present(bit));
    let site = &SITES[usize::from(selector >> 5) % SITES.len()];
    let original_uri = next(0);
    let original_url = next(1);
    let forwarded_proto = next(2);
    let forwarded_host = next(3);
    let forwarded_uri = next(4);
    let host = next(5);
    let envoy_target = next(6).unwrap_or(b"");
    let headers = ForwardHeaders {
        original_uri,
        original_url,
        forwarded_proto,
        forwarded_host,
        forwarded_uri,
        host,
        envoy_target,
        path_origin: site.origin,
        default_scheme: "https",
    };
    let Ok(forward) = ForwardUrl::from_headers(endpoint, &headers) else {
        return;
    };
    let whole = forward.as_string();
    let url = Url::parse(&whole).expect("a forward URL parses");
    assert!(matches!(url.scheme(), "http" | "https"), "{whole}");
    assert!(url.username().is_empty() && url.password().is_none(), "{whole}");
    assert!(forward.target.starts_with('/') && !forward.target.starts_with("//"), "{whole}");
    assert!(!whole.contains(|c: char| c.is_control() || matches!(c, '\\' | ' ' | '#')), "{whole}");
    assert_eq!(url.origin(), forward.url.origin(), "{whole}");

    let settings = settings(site.mode, site.origin, site.cookie_domain);
    if !forward.within(&settings, site.origin) {
        return;
    }
    let host = url.host_str().expect("a host").to_ascii_lowercase();
    match site.mode {
        Mode::Proxy | Mode::ForwardSingle => {
            let origin = Url::parse(site.origin).expect("site origin").origin();
            assert_eq!(url.origin(), origin, "{whole} leaves {}", site.origin);
        }
        Mode::ForwardDomain => {
            let domain = settings.cookie_domain.as_deref().expect("a cookie domain");
            assert!(
                host == domain || host.ends_with(&format!(".{domain}")),
                "{whole} leaves {domain}"
            );
        }
    }
    let accepted = validate_return_to(&whole, site.mode, site.origin, site.cookie_domain);
    // The cap applies to the URL as forwarded and as serialised (non-ASCII percent-encoded: up
    // to 3 times longer; dot-segments resolved: shorter).
    assert!(
        accepted.is_some() || whole.len().max(url.as_str().len()) > MAX_RETURN_URL,
        "{whole} is within the site but refused as a return URL"
    );
});

fn settings(mode: Mode, origin: &str, cookie_domain: Option<&str>) -> ProviderSettings {
    ProviderSettings {
        name: "fuzz".into(),
        issuer: parse_http_url(authentik_fuzz::ISSUER).expect("issuer"),
        client_id: authentik_fuzz::CLIENT_ID.into(),
        client_secret: authentik_fuzz::CLIENT_SECRET.into(),
        external_host: Some(parse_http_url(origin).expect("site origin")),
        mode,
        cookie_domain: cookie_domain.map(|d| parse_cookie_domain(d).expect("cookie domain")),
        scopes: Vec::new(),
        timeout_ms: 1000,
        ca_file: None,
        post_logout_redirect: None,
        trusted_audiences: Vec::new(),
        meta: Default::default(),
        backchannel_host: None,
        basic_auth: None,
    }
}
