//! The header rules: which client headers never reach the upstream, and which identity
//! headers the module sets for an authenticated request.
//!
//! Removed on every request where the module is on: every header whose name is an identity
//! header (`X-authentik-*`, any case, `_` read as `-`); with a session also client copies of
//! `X-Forwarded-Host` (proxy mode) and of the session's additionalHeaders names. Set for an
//! authenticated request: the identity fields of `authentik_core::identity::IDENTITY_FIELDS`,
//! the `X-authentik-meta-*` headers, `X-Forwarded-Host` (proxy mode) and additionalHeaders.

use authentik_core::config::Mode;
use authentik_core::identity::{header_names_equal, is_forged_identity_header, IDENTITY_FIELDS};
use authentik_core::session::SessionView;
use nginx_sys::ngx_http_request_t;

use crate::http::{self, HeaderName};
use crate::provider::Provider;

use authentik_core::outpost;

/// The identity headers with their precomputed hashes, in `IDENTITY_FIELDS` order.
static IDENTITY_HEADER_NAMES: [HeaderName; IDENTITY_FIELDS.len()] = identity_header_names();

const fn identity_header_names() -> [HeaderName; IDENTITY_FIELDS.len()] {
    let mut names = [HeaderName::new("", ""); IDENTITY_FIELDS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = HeaderName::new(IDENTITY_FIELDS[i].header, IDENTITY_FIELDS[i].lowercase);
        i += 1;
    }
    names
}

const META_OUTPOST: HeaderName =
    HeaderName::new("X-authentik-meta-outpost", "x-authentik-meta-outpost");
const META_PROVIDER: HeaderName =
    HeaderName::new("X-authentik-meta-provider", "x-authentik-meta-provider");
const META_APP: HeaderName = HeaderName::new("X-authentik-meta-app", "x-authentik-meta-app");
const META_VERSION: HeaderName =
    HeaderName::new("X-authentik-meta-version", "x-authentik-meta-version");
const FORWARDED_HOST: HeaderName = HeaderName::new("X-Forwarded-Host", "x-forwarded-host");

/// Removes forged identity headers; with a `session`, also the client's copies of the headers
/// the module will set for it. `false` when memory ran out.
pub fn remove_forged(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    session: Option<&SessionView<'static>>,
) -> bool {
    let Some(session) = session else {
        return http::remove_request_headers(r, |name, _| is_forged_identity_header(name, &[]));
    };
    let extra: &[&str] =
        if provider.settings().mode == Mode::Proxy { &["x-forwarded-host"] } else { &[] };
    http::remove_request_headers(r, |name, _| {
        is_forged_identity_header(name, extra)
            || session.additional().any(|(own, _)| header_names_equal(own, name))
    })
}

/// Removes the identity an earlier pass set for another provider (after an internal redirect):
/// every `X-authentik-*` header, that session's additionalHeaders and X-Forwarded-Host.
pub fn remove_previous_identity(
    r: &mut ngx_http_request_t,
    previous: Option<&SessionView<'static>>,
) -> bool {
    http::remove_request_headers(r, |name, _| {
        is_forged_identity_header(name, &["x-forwarded-host"])
            || previous
                .is_some_and(|s| s.additional().any(|(own, _)| header_names_equal(own, name)))
    })
}

/// Sets the identity headers of `session` for the upstream and hides the session cookie from
/// it. Values are borrowed, not copied: they live in the request pool (the session's bytes, the
/// request's own headers), the configuration or static memory. `false` when memory ran out.
pub fn set_identity(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    session: &SessionView<'static>,
) -> bool {
    let meta = &provider.settings().meta;
    let host = http::host_bytes(r);
    // An additionalHeaders entry named like a standard header replaces it.
    let replaced = |name: &HeaderName| {
        session.additional().any(|(own, _)| header_names_equal(own, name.lowercase.as_bytes()))
    };
    let mut ok = true;
    // SAFETY: every borrowed value outlives the request's headers (see above).
    unsafe {
        for (name, value) in IDENTITY_HEADER_NAMES.iter().zip(session.values.iter()) {
            if !replaced(name) {
                ok &= http::add_request_header_borrowed(r, name, value);
            }
        }
        let metas = [
            (&META_OUTPOST, meta.outpost.as_bytes()),
            (&META_PROVIDER, meta.provider.as_bytes()),
            (&META_APP, meta.app.as_bytes()),
            (&META_VERSION, outpost::META_VERSION.as_bytes()),
        ];
        for (name, value) in metas {
            if !replaced(name) {
                ok &= http::add_request_header_borrowed(r, name, value);
            }
        }
        if provider.settings().mode == Mode::Proxy && !replaced(&FORWARDED_HOST) {
            ok &= http::add_request_header_borrowed(r, &FORWARDED_HOST, host);
        }
    }
    for (name, value) in session.additional() {
        ok &= http::add_request_header_dyn(r, name, value);
    }
    ok && http::remove_cookie_from_headers(r, provider.cookie_name.as_bytes())
}
