//! The access decision, in the access phase of every request where `auth_authentik` is on:
//!
//! cookie -> session lookup (shared memory, bound to the provider) -> forged headers removed ->
//! an outpost endpoint or the login callback (see `router`), or identity headers set and on to
//! the content phase, or an unauthenticated path passed, or `401` (not a navigation), or the
//! login redirect (see `login`).

use core::ptr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use authentik_core::config::Mode;
use authentik_core::page::error_page;
use authentik_core::paths::UnauthPaths;
use authentik_core::request::{is_navigation, query_arg};
use authentik_core::rules::Credential;
use authentik_core::session::SessionView;
use nginx_sys::{
    ngx_array_push, ngx_conf_t, ngx_http_handler_pt, ngx_http_phases_NGX_HTTP_ACCESS_PHASE,
    ngx_http_request_t, ngx_int_t, NGX_AGAIN, NGX_DECLINED, NGX_HTTP_NOT_FOUND,
    NGX_HTTP_SERVICE_UNAVAILABLE, NGX_HTTP_UNAUTHORIZED, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_INFO,
};
use ngx::core::Status;
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

use crate::call::{Call, Finished};
use crate::conf::{LocationConf, MainConf, OutpostTarget};
use crate::header_auth::{self, HeaderAuth};
use crate::log::action;
use crate::metrics::{self, Outcome};
use crate::outpost::{self, ByHost, Found};
use crate::provider::Provider;
use crate::remote;
use crate::response::{self, INTERNAL_ERROR};
use crate::session;
use crate::HttpAuthentikModule;
use crate::{authorize, ctx, forward, headers, http, login, request_log, router};

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
    let provider: &Provider = if !lcf.provider.is_null() {
        // SAFETY: providers live in the main configuration for the cycle's lifetime.
        unsafe { &*lcf.provider }
    } else if let Some(target) = &lcf.target {
        match per_request_provider(r, target) {
            // SAFETY: a block provider (main configuration) or an outpost provider that the
            // request context holds until the request ends.
            Ok(p) => unsafe { &*p },
            Err(rc) => return rc,
        }
    } else {
        return NGX_DECLINED as ngx_int_t;
    };

    let Some(ctx) = ctx::get_or_create(r) else {
        return INTERNAL_ERROR;
    };
    ctx.deferred = None;
    if ptr::eq(ctx.done_for, provider) {
        // Authenticated by this provider already (an internal redirect): this location's
        // rules decide.
        let credential = credential_of(ctx.header_auth.is_some());
        return authorize::authorized(r, lcf, provider, credential, true);
    }
    if !ctx.call.is_null() {
        // SAFETY: the handle lives until both the request and the call are done with it.
        let handle = unsafe { &mut *ctx.call };
        if !handle.is_finished() {
            return NGX_AGAIN as ngx_int_t;
        }
        ctx.call = ptr::null_mut();
        match handle.take() {
            Some(Finished::Done(Call::HeaderAuth { cache_id, result, .. })) => {
                // The answer is cached and kept in the request context: the decision below
                // runs again and finds it, without another provider call.
                header_auth::finished(r, provider, &cache_id, result);
            }
            // An L1 miss answered by the shared store: the zone is filled, decide again.
            Some(Finished::Done(Call::StoreSession { store, id, result })) => {
                remote::lookup_done(r, provider, &store, &id, result);
            }
            Some(Finished::Done(call)) => return login::resume(r, provider, call),
            Some(Finished::Panicked(msg)) => {
                request_log!(
                    r,
                    NGX_LOG_ALERT,
                    action::PROVIDER_CALL,
                    "provider task panicked: {msg}"
                );
                return INTERNAL_ERROR;
            }
            None => return INTERNAL_ERROR,
        }
    }
    let Some(ctx) = ctx::get(r) else {
        return INTERNAL_ERROR;
    };
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
    if let (None, Some(id)) = (&session, cookies.missed) {
        if let Some(rc) = remote::lookup_on_miss(r, provider, id) {
            return rc;
        }
    }

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
    // authentik's sign-out signature, on any URL (forward auth passes it through).
    if !args.is_empty()
        && query_arg(args, b"X-authentik-logout").is_some_and(|v| v.eq_ignore_ascii_case(b"true"))
    {
        return login::sign_out(r, provider);
    }
    if cookies.copies > 1 {
        // Copies of the cookie from other scopes (authentik's own outpost sets `Domain=`):
        // expire them where they may live, so the browser stops sending them.
        response::expire_stale_cookie_scopes(r, provider);
    }
    if let Some(session) = session {
        return pass(r, lcf, provider, session, false);
    }
    let stale_cookie = cookies.copies > 0;
    match header_auth::authenticate(r, provider) {
        HeaderAuth::Absent => unauthenticated(r, lcf, provider, stale_cookie, false),
        HeaderAuth::Authenticated(view) => pass(r, lcf, provider, view, true),
        HeaderAuth::Failed => unauthenticated(r, lcf, provider, stale_cookie, true),
        HeaderAuth::Pending(rc) => rc,
    }
}

/// An authenticated request goes on: identity headers set (and, after header authentication,
/// `Authorization` removed), the session remembered for variables and later passes.
fn pass(
    r: &mut ngx_http_request_t,
    lcf: &LocationConf,
    provider: &Provider,
    session: SessionView<'static>,
    by_header: bool,
) -> ngx_int_t {
    if by_header && !header_auth::remove_authorization(r) {
        return INTERNAL_ERROR;
    }
    if !headers::set_identity(r, provider, &session) {
        return INTERNAL_ERROR;
    }
    let Some(ctx) = ctx::get(r) else {
        return INTERNAL_ERROR;
    };
    ctx.session = Some(session);
    ctx.done_for = provider;
    authorize::authorized(r, lcf, provider, credential_of(by_header), false)
}

fn credential_of(by_header: bool) -> Credential {
    match by_header {
        true => Credential::HeaderAuth,
        false => Credential::BrowserSession,
    }
}

/// No session: an unauthenticated path passes; a refused `Authorization` header gets a `401`
/// page when the provider intercepts header authentication; else `401` (not a navigation) or
/// the login redirect.
fn unauthenticated(
    r: &mut ngx_http_request_t,
    lcf: &LocationConf,
    provider: &Provider,
    stale_cookie: bool,
    header_refused: bool,
) -> ngx_int_t {
    let exempted = if lcf.target.is_none() {
        !lcf.unauth.is_empty() && exempt(r, provider, &lcf.unauth)
    } else {
        let own = &lcf.own_unauth_paths;
        let shared = &provider.runtime.unauth;
        (!shared.is_empty() && exempt(r, provider, shared))
            || (!own.is_empty() && exempt(r, provider, own))
    };
    if exempted {
        metrics::request(provider, Outcome::UnauthPath);
        return NGX_DECLINED as ngx_int_t;
    }
    let navigation = is_navigation(
        http::request_header(r, b"sec-fetch-mode"),
        http::request_header(r, b"x-requested-with"),
        http::request_header(r, b"accept"),
    );
    let intercepted = header_refused && provider.intercept_header_auth;
    if !navigation || intercepted {
        let deferred = authorize::unauthenticated(r, false, stale_cookie);
        if stale_cookie {
            response::expire_session_cookie(r, provider);
        }
        add_challenges(r, provider);
        if let Some(rc) = deferred {
            // Another access module may still grant the request: its body stays unread.
            return rc;
        }
        metrics::request(provider, Outcome::Unauthorized);
        if intercepted {
            let msg = "The Authorization header was not accepted, so no login redirect is made.";
            return response::page(
                r,
                provider,
                NGX_HTTP_UNAUTHORIZED,
                "Unauthenticated",
                msg,
                false,
            );
        }
        response::discard_body(r);
        return NGX_HTTP_UNAUTHORIZED as ngx_int_t;
    }
    if let Some(rc) = authorize::unauthenticated(r, true, stale_cookie) {
        return rc;
    }
    metrics::request(provider, Outcome::LoginRedirect);
    let return_to = login::return_url(r, provider);
    login::start(r, provider, return_to, stale_cookie)
}

/// `WWW-Authenticate` for what header authentication accepts: a Bearer token, or Basic with
/// an authentik app password.
fn add_challenges(r: &mut ngx_http_request_t, provider: &Provider) {
    let realm = provider.settings().name.replace(['"', '\\'], "");
    for scheme in ["Bearer", "Basic"] {
        let challenge = format!("{scheme} realm=\"{realm}\"");
        http::add_response_header(r, &http::WWW_AUTHENTICATE, challenge.as_bytes());
    }
}

/// The provider of a location whose provider is chosen per request (`auth_authentik auto`, or
/// a name only authentik's API knows). While the request waits for a provider call it keeps
/// the provider it started with, whatever a new configuration says.
fn per_request_provider(
    r: &mut ngx_http_request_t,
    target: &OutpostTarget,
) -> Result<*const Provider, ngx_int_t> {
    let Some(mcf) = HttpAuthentikModule::main_conf(r) else {
        return Err(INTERNAL_ERROR);
    };
    let mcf: &MainConf = mcf;
    let Some(ctx) = ctx::get_or_create(r) else {
        return Err(INTERNAL_ERROR);
    };
    if !ctx.call.is_null() {
        if let Some(p) = ctx.held.last() {
            return Ok(Rc::as_ptr(p));
        }
    }
    let found = match target {
        OutpostTarget::Named(name) => outpost::find(mcf, name),
        OutpostTarget::Auto => {
            // A forward-auth request asks about the forwarded host (checked against the
            // provider's scope in `forward`); any other request is about its own.
            let host = forward::lookup_host_of(r).unwrap_or_else(|| {
                String::from_utf8_lossy(http::bytes_of(&r.headers_in.server)).to_ascii_lowercase()
            });
            match outpost::find_by_host(mcf, &host) {
                Some(ByHost::Block(p)) => {
                    if let Some(ctx) = ctx::get(r) {
                        ctx.chosen = p;
                    }
                    return Ok(p);
                }
                Some(ByHost::Outpost(p)) => Found::Provider(p),
                None => {
                    request_log!(
                        r,
                        NGX_LOG_INFO,
                        action::ACCESS,
                        "no authentik provider for host \"{host}\""
                    );
                    let msg = "No application is set up for this address.";
                    return Err(response::send_page(
                        r,
                        NGX_HTTP_NOT_FOUND as usize,
                        &error_page("Not found", msg, None),
                    ));
                }
            }
        }
    };
    let name = match target {
        OutpostTarget::Named(name) => name.as_str(),
        OutpostTarget::Auto => "auto",
    };
    match found {
        Found::Provider(p) => {
            let ptr = Rc::as_ptr(&p);
            let Some(ctx) = ctx::get(r) else {
                return Err(INTERNAL_ERROR);
            };
            if !ctx.held.iter().any(|h| Rc::ptr_eq(h, &p)) {
                ctx.held.push(p);
            }
            ctx.chosen = ptr;
            return Ok(ptr);
        }
        Found::Unknown => request_log!(
            r,
            NGX_LOG_ERR,
            action::ACCESS,
            "authentik provider \"{name}\" is not assigned to this outpost"
        ),
        Found::NotFetched => request_log!(
            r,
            NGX_LOG_ERR,
            action::ACCESS,
            "authentik provider \"{name}\" is not known yet: no configuration was fetched from authentik"
        ),
    }
    let msg = "Logging in is not possible right now. Try again in a moment.";
    Err(response::send_page(
        r,
        NGX_HTTP_SERVICE_UNAVAILABLE as usize,
        &error_page("Login unavailable", msg, None),
    ))
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
