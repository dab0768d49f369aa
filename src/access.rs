//! The access decision, in the access phase of every request where `auth_authentik` is on:
//!
//! cookie -> session lookup (shared memory, bound to the provider) -> forged headers removed ->
//! an outpost endpoint or the login callback (see `router`), or identity headers set and on to
//! the content phase, or an unauthenticated path passed, or `401` (not a navigation), or the
//! login redirect (see `login`).

use core::ptr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use authentik_core::config::Mode;
use authentik_core::paths::UnauthPaths;
use authentik_core::request::{is_navigation, query_arg};
use authentik_core::rules::Credential;
use nginx_sys::{
    ngx_array_push, ngx_conf_t, ngx_http_handler_pt, ngx_http_phases_NGX_HTTP_ACCESS_PHASE,
    ngx_http_request_t, ngx_int_t, NGX_DECLINED, NGX_HTTP_UNAUTHORIZED, NGX_LOG_ALERT,
};
use ngx::core::Status;
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

use crate::conf::LocationConf;
use crate::log::action;
use crate::metrics::{self, Outcome};
use crate::provider::Provider;
use crate::response::{self, INTERNAL_ERROR};
use crate::session;
use crate::{authorize, ctx, headers, http, login, request_log, router, HttpAuthentikModule};

pub fn register_handler(cf: &mut ngx_conf_t) -> Status {
    let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(cf) else {
        return Status::NGX_ERROR;
    };
    let phase = &mut cmcf.phases[ngx_http_phases_NGX_HTTP_ACCESS_PHASE as usize];
    // SAFETY: appends to nginx's array of access-phase handlers during postconfiguration.
    let h = unsafe { ngx_array_push(&mut phase.handlers) } as *mut ngx_http_handler_pt;
    if h.is_null() {
        return Status::NGX_ERROR;
    }
    // SAFETY: `h` is a fresh slot in the handlers array.
    unsafe { *h = Some(access_handler) };
    Status::NGX_OK
}

/// The access-phase entry point. Panics are contained here: nothing unwinds into nginx.
unsafe extern "C" fn access_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed.
    let r = unsafe { &mut *r };
    match catch_unwind(AssertUnwindSafe(|| access(&mut *r))) {
        Ok(rc) => rc,
        Err(_) => {
            request_log!(r, NGX_LOG_ALERT, action::ACCESS, "authentik access handler panicked");
            INTERNAL_ERROR
        }
    }
}

fn access(r: &mut ngx_http_request_t) -> ngx_int_t {
    if !ptr::eq(r.main, r) {
        return NGX_DECLINED as ngx_int_t;
    }
    let Some(lcf) = HttpAuthentikModule::location_conf(r) else {
        return NGX_DECLINED as ngx_int_t;
    };
    let lcf: &LocationConf = lcf;
    if lcf.provider.is_null() {
        return NGX_DECLINED as ngx_int_t;
    }
    // SAFETY: providers live in the main configuration for the cycle's lifetime.
    let provider: &Provider = unsafe { &*lcf.provider };

    let Some(ctx) = ctx::get_or_create(r) else {
        return INTERNAL_ERROR;
    };
    ctx.deferred = None;
    if ptr::eq(ctx.done_for, provider) {
        // Authenticated by this provider already (an internal redirect): this location's
        // rules decide.
        return authorize::authorized(r, lcf, provider, Credential::BrowserSession, true);
    }
    if !ctx.call.is_null() {
        return login::resume_call(r, provider);
    }
    // An internal redirect moved an authenticated request into a location of another
    // provider: that provider decides, and the first one's headers go.
    if !ctx.done_for.is_null() {
        ctx.done_for = ptr::null();
        let previous = ctx.session.take();
        if !headers::remove_previous_identity(r, previous.as_ref()) {
            return INTERNAL_ERROR;
        }
    }

    let uri = http::bytes_of(&r.uri);
    let args = http::bytes_of(&r.args);
    let endpoint = provider.endpoint(uri);
    let is_callback = endpoint.is_none()
        && !args.is_empty()
        && query_arg(args, b"X-authentik-auth-callback")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"true"));

    let cookies = session::scan(r, provider, endpoint.is_none() && !is_callback);
    let session = cookies.session;

    // Client-sent identity headers never reach the upstream, authenticated or not; nor, when
    // the module sets them, client copies of X-Forwarded-Host and additionalHeaders.
    if !headers::remove_forged(r, provider, session.as_ref()) {
        return INTERNAL_ERROR;
    }
    if let Some(endpoint) = endpoint {
        return router::endpoint(r, provider, endpoint);
    }
    if is_callback {
        return login::callback(r, provider);
    }
    if cookies.copies > 1 {
        // Copies of the cookie from other scopes (authentik's own outpost sets `Domain=`):
        // expire them where they may live, so the browser stops sending them.
        response::expire_stale_cookie_scopes(r, provider);
    }
    if let Some(session) = session {
        if !headers::set_identity(r, provider, &session) {
            return INTERNAL_ERROR;
        }
        let Some(ctx) = ctx::get(r) else {
            return INTERNAL_ERROR;
        };
        ctx.session = Some(session);
        ctx.done_for = provider;
        return authorize::authorized(r, lcf, provider, Credential::BrowserSession, false);
    }
    let stale_cookie = cookies.copies > 0;

    if !lcf.unauth.is_empty() && exempt(r, provider, &lcf.unauth) {
        metrics::request(provider, Outcome::UnauthPath);
        return NGX_DECLINED as ngx_int_t;
    }

    let navigation = is_navigation(
        http::request_header(r, b"sec-fetch-mode"),
        http::request_header(r, b"x-requested-with"),
        http::request_header(r, b"accept"),
    );
    if !navigation {
        let deferred = authorize::unauthenticated(r, false, stale_cookie);
        if stale_cookie {
            response::expire_session_cookie(r, provider);
        }
        let challenge = format!("Bearer realm=\"{}\"", provider.settings().name);
        http::add_response_header(r, &http::WWW_AUTHENTICATE, challenge.as_bytes());
        if let Some(rc) = deferred {
            // Another access module may still grant the request: its body stays unread.
            return rc;
        }
        response::discard_body(r);
        metrics::request(provider, Outcome::Unauthorized);
        return NGX_HTTP_UNAUTHORIZED as ngx_int_t;
    }
    if let Some(rc) = authorize::unauthenticated(r, true, stale_cookie) {
        return rc;
    }
    metrics::request(provider, Outcome::LoginRedirect);
    let return_to = login::return_url(r, provider);
    login::start(r, provider, return_to, stale_cookie)
}

/// Whether the request may pass without a session: the unauthenticated-path patterns must
/// match both what the upstream can see (the raw request target, decoded, and refused when it
/// can be read two ways; see `UnauthPaths::exempts`) and nginx's normalised `$uri`. In
/// forward_domain mode the subject is the URL on the host nginx routed the request on.
fn exempt(r: &ngx_http_request_t, provider: &Provider, unauth: &UnauthPaths) -> bool {
    let raw = http::bytes_of(&r.unparsed_uri);
    let uri = http::bytes_of(&r.uri);
    match provider.settings().mode {
        Mode::ForwardDomain => {
            let origin = format!("{}://{}", http::scheme(r), http::routed_host(r));
            unauth.exempts(raw, uri, Some(&origin))
        }
        _ => unauth.exempts(raw, uri, None),
    }
}
