//! Forward auth for other proxies: `/outpost.goauthentik.io/auth/nginx` (nginx `auth_request`),
//! `auth/traefik`, `auth/caddy` and `auth/envoy<path>`, answered with the status codes, bodies
//! and headers of authentik's outpost.
//!
//! The proxy names the original URL in headers (see `authentik_core::forward`); a URL outside
//! the provider's external origin (proxy, forward_single) or cookie domain (forward_domain) gets
//! `403`. Then: Traefik and Caddy's login callback or logout inside the URL; a session gives
//! `200` with the identity headers on the response; an unauthenticated path `200` without
//! them; otherwise nginx gets `401` (its `error_page 401` sends the browser to `/start`), the
//! others a `302` straight to the provider's login, returning to the forwarded URL.

use authentik_core::config::Mode;
use authentik_core::forward::{
    canonical_header_name, endpoint_in_path, lookup_host, ForwardEndpoint, ForwardError,
    ForwardHeaders, ForwardUrl, Signature,
};
use authentik_core::identity::{header_names_equal, IDENTITY_FIELDS, META_JWKS};
use authentik_core::outpost::META_VERSION;
use authentik_core::paths::{exemption_subject, UnauthPaths};
use authentik_core::redirect::validate_return_to;
use authentik_core::session::SessionView;
use nginx_sys::{
    ngx_http_request_t, ngx_int_t, NGX_HTTP_BAD_REQUEST, NGX_HTTP_FORBIDDEN,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_OK, NGX_HTTP_UNAUTHORIZED, NGX_LOG_ERR,
};
use ngx::http::HttpModuleLocationConf;

use crate::conf::LocationConf;
use crate::header_auth::{self, HeaderAuth};
use crate::log::action;
use crate::provider::Provider;
use crate::response::{self, INTERNAL_ERROR};
use crate::{http, login, request_log, session, HttpAuthentikModule};

/// Answers the forward-auth endpoint `endpoint` (the path after `/outpost.goauthentik.io/`),
/// or `None` when it names none.
pub fn answer(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    endpoint: &[u8],
) -> Option<ngx_int_t> {
    let endpoint = ForwardEndpoint::of(endpoint)?;
    Some(answer_endpoint(r, provider, endpoint))
}

fn answer_endpoint(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    endpoint: ForwardEndpoint,
) -> ngx_int_t {
    let settings = provider.settings();
    let external_origin = response::external_origin(r, provider);
    let path_origin = match settings.mode {
        Mode::ForwardDomain => format!("{}://{}", http::scheme(r), http::host(r)),
        _ => external_origin.clone(),
    };
    let default_scheme = settings.external_host.as_ref().map_or(http::scheme(r), |u| u.scheme());
    let envoy_target = match endpoint {
        ForwardEndpoint::Envoy => match envoy_target(r, provider) {
            Some(target) => target,
            None => {
                let raw = String::from_utf8_lossy(http::bytes_of(&r.unparsed_uri));
                let raw = raw.escape_default();
                request_log!(
                    r,
                    NGX_LOG_ERR,
                    action::FORWARD_AUTH,
                    "envoy forward auth request target \"{raw}\" is not in its raw form"
                );
                return response::send_text(r, NGX_HTTP_BAD_REQUEST, "invalid envoy request\n");
            }
        },
        _ => b"",
    };
    let headers = ForwardHeaders {
        envoy_target,
        path_origin: &path_origin,
        default_scheme,
        ..request_headers(r)
    };
    let forward = match ForwardUrl::from_headers(endpoint, &headers) {
        Ok(forward) => forward,
        Err(e) => {
            request_log!(r, NGX_LOG_ERR, action::FORWARD_AUTH, "{e}");
            return match e {
                ForwardError::NoEnvoyHost => {
                    response::send_text(r, NGX_HTTP_BAD_REQUEST, "invalid envoy request\n")
                }
                _ => {
                    response::send_text(r, NGX_HTTP_INTERNAL_SERVER_ERROR, "configuration error\n")
                }
            };
        }
    };
    if !forward.within(settings, &external_origin) {
        let url = forward.as_string();
        let url = url.escape_default();
        let (name, scope) = match settings.mode {
            Mode::ForwardDomain => {
                ("cookie domain", settings.cookie_domain.as_deref().unwrap_or(""))
            }
            _ => ("external host", external_origin.as_str()),
        };
        request_log!(
            r,
            NGX_LOG_ERR,
            action::FORWARD_AUTH,
            "forward auth URL \"{url}\" is outside the {name} \"{scope}\" of authentik provider \"{}\"",
            settings.name
        );
        return response::send_text(r, NGX_HTTP_FORBIDDEN, "forward URL outside the provider\n");
    }
    if matches!(endpoint, ForwardEndpoint::Traefik | ForwardEndpoint::Caddy) {
        match forward.signature() {
            Some(Signature::Callback) => {
                // The login callback reads the request's arguments: here they are the
                // forwarded URL's. The request is answered by the callback, so nothing else
                // reads them.
                let Some(args) = http::pool_str(r, forward.query().as_bytes()) else {
                    return INTERNAL_ERROR;
                };
                r.args = args;
                return login::callback(r, provider);
            }
            Some(Signature::Logout) => return login::sign_out(r, provider),
            None => {}
        }
    }

    let cookies = session::scan(r, provider, true);
    let session = match cookies.session {
        Some(session) => Some(session),
        // Header authentication on the forwarded request's `Authorization`; a refused header
        // gets what a request without credentials gets (authentik's table: 401 for nginx, the
        // login for the others).
        None => match header_auth::authenticate(r, provider) {
            HeaderAuth::Authenticated(view) => Some(view),
            HeaderAuth::Pending(rc) => return rc,
            HeaderAuth::Absent | HeaderAuth::Failed => None,
        },
    };
    if let Some(session) = session {
        if !set_identity_response_headers(r, provider, &session) {
            return INTERNAL_ERROR;
        }
        return response::send_empty(r, NGX_HTTP_OK as usize);
    }
    if exempt(r, provider, &forward) {
        return response::send_empty(r, NGX_HTTP_OK as usize);
    }
    if endpoint == ForwardEndpoint::Nginx {
        if forward.is_outpost_path(&provider.base_path) {
            return response::send_empty(r, NGX_HTTP_OK as usize);
        }
        if cookies.copies > 0 {
            response::expire_session_cookie(r, provider);
        }
        return response::send_text(r, NGX_HTTP_UNAUTHORIZED, "unauthorized request\n");
    }
    let domain = settings.cookie_domain.as_deref();
    let return_to =
        validate_return_to(&forward.as_string(), settings.mode, &external_origin, domain)
            .unwrap_or_else(|| response::home_url(r, provider));
    login::start(r, provider, return_to, cookies.copies > 0)
}

/// The forward-auth headers of the request (`path_origin` and the Envoy fields left empty).
fn request_headers<'a>(r: &ngx_http_request_t) -> ForwardHeaders<'a> {
    ForwardHeaders {
        original_uri: http::request_header(r, b"x-original-uri"),
        original_url: http::request_header(r, b"x-original-url"),
        forwarded_proto: http::request_header(r, b"x-forwarded-proto"),
        forwarded_host: http::request_header(r, b"x-forwarded-host"),
        forwarded_uri: http::request_header(r, b"x-forwarded-uri"),
        host: http::request_header(r, b"host"),
        ..ForwardHeaders::default()
    }
}

/// The host a forward-auth request asks about, when the request is one (for choosing the
/// provider of `auth_authentik auto`): the forwarded host, never the request's own `Host`.
pub fn lookup_host_of(r: &ngx_http_request_t) -> Option<String> {
    let endpoint = endpoint_in_path(http::bytes_of(&r.uri))?;
    lookup_host(endpoint, &request_headers(r))
}

/// Envoy's original path and query: the raw request target after the endpoint's prefix; `None`
/// when the raw target does not start with it (an encoded prefix).
fn envoy_target<'a>(r: &ngx_http_request_t, provider: &Provider) -> Option<&'a [u8]> {
    let raw = http::bytes_of(&r.unparsed_uri);
    provider.endpoint(raw)?.strip_prefix(b"auth/envoy")
}

/// Whether the forwarded URL is an unauthenticated path of the location's provider: matched
/// like a request's own target (see `UnauthPaths::exempts`), with the forwarded origin in
/// forward_domain mode.
fn exempt(r: &ngx_http_request_t, provider: &Provider, forward: &ForwardUrl) -> bool {
    let Some(lcf) = HttpAuthentikModule::location_conf(r) else {
        return false;
    };
    let lcf: &LocationConf = lcf;
    let raw = forward.target.as_bytes();
    let Some(path) = exemption_subject(raw) else {
        return false;
    };
    let origin =
        (provider.settings().mode == Mode::ForwardDomain).then_some(forward.origin.as_str());
    let exempts =
        |paths: &UnauthPaths| !paths.is_empty() && paths.exempts(raw, path.as_bytes(), origin);
    if lcf.target.is_none() {
        exempts(&lcf.unauth)
    } else {
        exempts(&provider.runtime.unauth) || exempts(&lcf.own_unauth_paths)
    }
}

/// Sets the identity headers of `session` on the response of a forward-auth request, as
/// authentik's outpost does: the `IDENTITY_FIELDS` and the `X-authentik-meta-*` headers (all of
/// them, empty ones too), then additionalHeaders (which replace a standard header of the same
/// name), in Go's canonical case; names with `_` are left out; `User-Agent` is copied from the
/// request. Client-sent `X-authentik-*` headers never come back: every value is the
/// session's or the configuration's. `false` when memory ran out.
///
/// Header authentication calls it with the session it found, and a basic-auth `Authorization`
/// for the upstream comes with the additionalHeaders (it is one of them in the record).
pub fn set_identity_response_headers(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    session: &SessionView<'_>,
) -> bool {
    let meta = &provider.settings().meta;
    let is_jwks = |name: &[u8]| header_names_equal(name, META_JWKS.as_bytes());
    // The provider's keys travel with the session (see `Identity::add_meta_jwks`); they go
    // in authentik's place, after the JWT.
    let jwks = session.additional().find(|(name, _)| is_jwks(name)).map_or(&b""[..], |(_, v)| v);
    let meta_headers: [(&str, &[u8]); 5] = [
        (META_JWKS, jwks),
        ("X-authentik-meta-outpost", meta.outpost.as_bytes()),
        ("X-authentik-meta-provider", meta.provider.as_bytes()),
        ("X-authentik-meta-app", meta.app.as_bytes()),
        ("X-authentik-meta-version", META_VERSION.as_bytes()),
    ];
    let standard = IDENTITY_FIELDS
        .iter()
        .map(|field| field.header)
        .zip(session.values.iter().copied())
        .chain(meta_headers);
    let overridden = |name: &str| {
        !is_jwks(name.as_bytes())
            && session.additional().any(|(own, _)| header_names_equal(own, name.as_bytes()))
    };
    let mut ok = true;
    for (name, value) in standard {
        if !overridden(name) {
            ok &= add_canonical(r, name.as_bytes(), value);
        }
    }
    for (name, value) in session.additional() {
        if !name.contains(&b'_') && !is_jwks(name) {
            ok &= add_canonical(r, name, value);
        }
    }
    if let Some(user_agent) = http::request_header(r, b"user-agent") {
        ok &= add_canonical(r, b"User-Agent", user_agent);
    }
    ok
}

fn add_canonical(r: &mut ngx_http_request_t, name: &[u8], value: &[u8]) -> bool {
    let name = canonical_header_name(&String::from_utf8_lossy(name));
    http::add_response_header_dyn(r, name.as_bytes(), value)
}
