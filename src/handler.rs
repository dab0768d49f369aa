//! The access-phase handler: session check, identity headers, the login redirect, and the
//! `/outpost.goauthentik.io/*` endpoints (start, callback, sign_out, ping).
//!
//! Data flows one way: cookie -> session lookup (shared memory) -> record -> headers -> upstream.
//! The login path (start -> provider -> callback -> session) sits beside it and is the only
//! place that waits for the network, on the thread pool (see `task`).

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use authentik_core::config::Mode;
use authentik_core::cookie::{self, CookieAttributes};
use authentik_core::identity::{header_names_equal, is_forged_identity_header, IDENTITY_HEADERS};
use authentik_core::oidc::{authorize_url, LoginError, PendingLogin};
use authentik_core::page::error_page;
use authentik_core::paths::UnauthPaths;
use authentik_core::redirect::validate_return_to;
use authentik_core::redirect::MAX_RETURN_URL;
use authentik_core::request::{decode_query_value, encode_query_value, is_navigation, query_arg};
use authentik_core::session::{SessionId, SessionRecord, SessionView};
use nginx_sys::{
    ngx_array_push, ngx_conf_t, ngx_http_handler_pt, ngx_http_phases_NGX_HTTP_ACCESS_PHASE,
    ngx_http_request_t, ngx_int_t, ngx_pool_cleanup_add, ngx_pool_cleanup_t, NGX_AGAIN,
    NGX_DECLINED, NGX_HTTP_BAD_REQUEST, NGX_HTTP_FORBIDDEN, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_MOVED_TEMPORARILY, NGX_HTTP_NOT_FOUND, NGX_HTTP_NO_CONTENT,
    NGX_HTTP_SERVICE_UNAVAILABLE, NGX_HTTP_UNAUTHORIZED, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_WARN,
};
use ngx::core::Status;
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};
use ngx::ngx_log_error;

use crate::conf::{LocationConf, Provider};
use crate::http::{self, HeaderName};
use crate::task::{self, AfterDiscovery, Call, CallError, CallHandle, Finished};
use crate::zone::{SessionZone, ZoneError};
use crate::HttpAuthentikModule;

const OUTPOST_PREFIX: &str = "/outpost.goauthentik.io/";
const OUTPOST_NAME: &str = "nginx-authentik";
const OUTPOST_VERSION: &str =
    concat!("goauthentik.io/outpost/nginx-authentik-", env!("CARGO_PKG_VERSION"));

static IDENTITY_HEADER_NAMES: [HeaderName; 7] = [
    HeaderName::new(IDENTITY_HEADERS[0], "x-authentik-username"),
    HeaderName::new(IDENTITY_HEADERS[1], "x-authentik-groups"),
    HeaderName::new(IDENTITY_HEADERS[2], "x-authentik-entitlements"),
    HeaderName::new(IDENTITY_HEADERS[3], "x-authentik-email"),
    HeaderName::new(IDENTITY_HEADERS[4], "x-authentik-name"),
    HeaderName::new(IDENTITY_HEADERS[5], "x-authentik-uid"),
    HeaderName::new(IDENTITY_HEADERS[6], "x-authentik-jwt"),
];
const META_OUTPOST: HeaderName =
    HeaderName::new("X-authentik-meta-outpost", "x-authentik-meta-outpost");
const META_PROVIDER: HeaderName =
    HeaderName::new("X-authentik-meta-provider", "x-authentik-meta-provider");
const META_APP: HeaderName = HeaderName::new("X-authentik-meta-app", "x-authentik-meta-app");
const META_VERSION: HeaderName =
    HeaderName::new("X-authentik-meta-version", "x-authentik-meta-version");
const FORWARDED_HOST: HeaderName = HeaderName::new("X-Forwarded-Host", "x-forwarded-host");

/* per-request state */

/// Per-request state. Kept in the request pool (dropped by a pool cleanup) and found again
/// after an internal redirect, which clears `r->ctx`.
pub struct RequestCtx {
    /// The session, when the request is authenticated (variables read it); its bytes live in
    /// the request pool.
    pub session: Option<SessionView<'static>>,
    /// The provider whose access decision let the request through; later passes through a
    /// location of the same provider keep it, a location of another provider decides again.
    done_for: *const Provider,
    /// The provider call the request is suspended on (see `task`).
    call: *mut CallHandle,
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx { session: None, done_for: ptr::null(), call: ptr::null_mut() }
    }
}

/// The cleanup handler that marks a pool cleanup entry as this module's request context;
/// read through this static so that registration and lookup use the same address.
static DROP_CTX: unsafe extern "C" fn(*mut c_void) = drop_ctx;

unsafe extern "C" fn drop_ctx(data: *mut c_void) {
    // SAFETY: `data` is the RequestCtx written by `ctx_create`.
    unsafe { ptr::drop_in_place(data as *mut RequestCtx) };
}

/// The request's context, if one was created (also after an internal redirect).
pub fn ctx_get(r: &mut ngx_http_request_t) -> Option<&mut RequestCtx> {
    let index = HttpAuthentikModule::module().ctx_index;
    // SAFETY: r->ctx has one slot per http module.
    let slot = unsafe { &mut *r.ctx.add(index) };
    if !slot.is_null() {
        // SAFETY: only this module writes its slot, with a RequestCtx.
        return Some(unsafe { &mut *(*slot as *mut RequestCtx) });
    }
    // SAFETY: walks the request pool's cleanup list.
    let mut cln: *mut ngx_pool_cleanup_t = unsafe { (*r.pool).cleanup };
    while !cln.is_null() {
        // SAFETY: live cleanup entries of the pool.
        let c = unsafe { &*cln };
        if c.handler.is_some_and(|h| ptr::fn_addr_eq(h, DROP_CTX)) {
            *slot = c.data;
            // SAFETY: a RequestCtx written by `ctx_create`.
            return Some(unsafe { &mut *(c.data as *mut RequestCtx) });
        }
        cln = c.next;
    }
    None
}

fn ctx_create(r: &mut ngx_http_request_t) -> Option<&mut RequestCtx> {
    // SAFETY: allocates the context with a cleanup that drops it with the request pool.
    unsafe {
        let cln = ngx_pool_cleanup_add(r.pool, size_of::<RequestCtx>());
        if cln.is_null() {
            return None;
        }
        ptr::write((*cln).data as *mut RequestCtx, RequestCtx::default());
        (*cln).handler = Some(DROP_CTX);
        let index = HttpAuthentikModule::module().ctx_index;
        *r.ctx.add(index) = (*cln).data;
        Some(&mut *((*cln).data as *mut RequestCtx))
    }
}

/* registration */

pub fn register_access_handler(cf: &mut ngx_conf_t) -> Status {
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
    let log = unsafe { (*r.connection).log };
    match catch_unwind(AssertUnwindSafe(|| access(r))) {
        Ok(rc) => rc,
        Err(_) => {
            ngx_log_error!(NGX_LOG_ALERT, log, "authentik access handler panicked");
            NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
        }
    }
}

fn now() -> i64 {
    nginx_sys::ngx_time() as i64
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
    // SAFETY: zones live in the main configuration for the cycle's lifetime.
    let zone: &SessionZone = unsafe { &*provider.zone };

    if ctx_get(r).is_none() && ctx_create(r).is_none() {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    let ctx = ctx_get(r).expect("request ctx");
    if ptr::eq(ctx.done_for, provider) {
        return NGX_DECLINED as ngx_int_t;
    }
    if !ctx.call.is_null() {
        // SAFETY: the handle lives until both the request and the call are done with it.
        let handle = unsafe { &mut *ctx.call };
        if !handle.is_finished() {
            return NGX_AGAIN as ngx_int_t;
        }
        ctx.call = ptr::null_mut();
        return match handle.take() {
            Some(Finished::Done(call)) => resume(r, provider, zone, call),
            Some(Finished::Panicked(msg)) => {
                let msg = format!("provider task panicked: {msg}");
                log_error(r, NGX_LOG_ALERT, &msg, "talking to the authentik provider");
                NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
            }
            None => NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t,
        };
    }
    // An internal redirect moved an authenticated request into a location of another
    // provider: that provider decides, and the first one's headers go.
    let previous = (!ctx.done_for.is_null()).then(|| {
        ctx.done_for = ptr::null();
        ctx.session.take()
    });
    if let Some(previous) = previous {
        if !remove_previous_identity(r, previous.as_ref()) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
    }

    let uri = http::bytes_of(&r.uri);
    let args = http::bytes_of(&r.args);
    let endpoint = outpost_endpoint_name(uri, &provider.base_path);
    let is_callback = endpoint.is_none()
        && !args.is_empty()
        && query_arg(args, b"X-authentik-auth-callback")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"true"));

    let cookies = session_cookies(r, provider);
    let session = match (endpoint, is_callback) {
        (None, false) => find_first_session(r, provider, zone, &cookies),
        _ => None,
    };
    let cookie = cookies.first().copied();

    // Client-sent identity headers never reach the upstream, authenticated or not; nor, when
    // the module sets them, client copies of X-Forwarded-Host and additionalHeaders.
    if !remove_forged_headers(r, provider, session.as_ref()) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    if let Some(endpoint) = endpoint {
        return outpost_endpoint(r, provider, zone, endpoint);
    }
    if is_callback {
        return callback(r, provider, zone);
    }
    if cookies.len() > 1 {
        // Copies of the cookie from other scopes (authentik's own outpost sets `Domain=`):
        // expire them where they may live, so the browser stops sending them.
        expire_stale_cookie_scopes(r, provider);
    }
    if let Some(session) = session {
        return pass_authenticated(r, provider, session);
    }
    let stale_cookie = cookie.is_some();

    if !lcf.unauth.is_empty() && exempt(r, provider, &lcf.unauth) {
        return NGX_DECLINED as ngx_int_t;
    }

    let navigation = is_navigation(
        http::request_header(r, b"sec-fetch-mode"),
        http::request_header(r, b"x-requested-with"),
        http::request_header(r, b"accept"),
    );
    if !navigation {
        if stale_cookie {
            expire_session_cookie(r, provider);
        }
        let challenge = format!("Bearer realm=\"{}\"", provider.settings.name);
        http::add_response_header(r, &http::WWW_AUTHENTICATE, challenge.as_bytes());
        return NGX_HTTP_UNAUTHORIZED as ngx_int_t;
    }

    let return_to = current_url(r, provider);
    start_login(r, provider, zone, return_to, stale_cookie)
}

/// The `/outpost.goauthentik.io/` endpoint `uri` names, at the root or under `external_host`'s
/// path.
fn outpost_endpoint_name<'a>(uri: &'a [u8], base_path: &str) -> Option<&'a [u8]> {
    let prefix = OUTPOST_PREFIX.as_bytes();
    uri.strip_prefix(prefix).or_else(|| {
        let rest = uri.strip_prefix(base_path.as_bytes()).filter(|_| !base_path.is_empty())?;
        rest.strip_prefix(prefix)
    })
}

/// Every value of the provider's session cookie in the request, in order (usually one).
fn session_cookies<'a>(r: &ngx_http_request_t, provider: &Provider) -> Vec<&'a [u8]> {
    let name = provider.cookie_name.as_bytes();
    let mut found = Vec::new();
    for header in http::request_headers(r, b"cookie") {
        found.extend(cookie::find_cookies(header, name));
    }
    found
}

/// The first of `cookies` that names a live session of this provider.
fn find_first_session(
    r: &ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    cookies: &[&[u8]],
) -> Option<SessionView<'static>> {
    cookies.iter().find_map(|value| {
        let id = SessionId::from_cookie_value(value)?;
        find_session(r, provider, zone, &id)
    })
}

/// The session's record, copied from the zone into the request pool and viewed in place.
/// `'static` stands for "as long as the request": the bytes are freed with the request pool.
fn find_session(
    r: &ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    id: &SessionId,
) -> Option<SessionView<'static>> {
    SessionView::parse(session_bytes(r, provider, zone, id)?)
}

/// The session's encoded record, copied into the request pool.
fn session_bytes(
    r: &ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    id: &SessionId,
) -> Option<&'static [u8]> {
    let pool = r.pool;
    zone.lookup(id, provider.key, now(), |len| {
        // SAFETY: allocates from the request pool; nginx frees it with the request.
        let p = unsafe { nginx_sys::ngx_pnalloc(pool, len.max(1)) } as *mut u8;
        // SAFETY: `p` has room for `len` bytes and is exclusively ours.
        (!p.is_null()).then(|| unsafe { core::slice::from_raw_parts_mut(p, len) })
    })
}

/// Removes forged identity headers (see `access`).
fn remove_forged_headers(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    session: Option<&SessionView<'static>>,
) -> bool {
    let Some(session) = session else {
        return http::remove_request_headers(r, |name, _| is_forged_identity_header(name, &[]));
    };
    let extra: &[&str] =
        if provider.settings.mode == Mode::Proxy { &["x-forwarded-host"] } else { &[] };
    http::remove_request_headers(r, |name, _| {
        is_forged_identity_header(name, extra)
            || session.additional().any(|(own, _)| header_names_equal(own, name))
    })
}

/// Removes the identity an earlier pass set for another provider (see `access`): every
/// `X-authentik-*` header, that session's additionalHeaders and X-Forwarded-Host.
fn remove_previous_identity(
    r: &mut ngx_http_request_t,
    previous: Option<&SessionView<'static>>,
) -> bool {
    http::remove_request_headers(r, |name, _| {
        is_forged_identity_header(name, &["x-forwarded-host"])
            || previous
                .is_some_and(|s| s.additional().any(|(own, _)| header_names_equal(own, name)))
    })
}

/* authenticated requests */

fn pass_authenticated(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    session: SessionView<'static>,
) -> ngx_int_t {
    let provider_name = provider.settings.name.as_bytes();
    let host = http::host_bytes(r);

    let mut ok = true;
    // SAFETY: every borrowed value lives in the request pool (the session's bytes, the request's
    // own headers), the configuration or static memory, all of which outlive the request's
    // headers.
    unsafe {
        for (name, value) in IDENTITY_HEADER_NAMES.iter().zip(session.values.iter()) {
            ok &= http::add_request_header_borrowed(r, name, value);
        }
        ok &= http::add_request_header_borrowed(r, &META_OUTPOST, OUTPOST_NAME.as_bytes());
        ok &= http::add_request_header_borrowed(r, &META_PROVIDER, provider_name);
        ok &= http::add_request_header_borrowed(r, &META_APP, provider_name);
        ok &= http::add_request_header_borrowed(r, &META_VERSION, OUTPOST_VERSION.as_bytes());
        if provider.settings.mode == Mode::Proxy {
            ok &= http::add_request_header_borrowed(r, &FORWARDED_HOST, host);
        }
    }
    for (name, value) in session.additional() {
        ok &= http::add_request_header_dyn(r, name, value);
    }
    ok &= http::remove_cookie_from_headers(r, provider.cookie_name.as_bytes());
    if !ok {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    let ctx = ctx_get(r).expect("request ctx");
    ctx.session = Some(session);
    ctx.done_for = provider;
    NGX_DECLINED as ngx_int_t
}

/* endpoints */

fn outpost_endpoint(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    endpoint: &[u8],
) -> ngx_int_t {
    match endpoint {
        b"ping" => http::send_empty(r, NGX_HTTP_NO_CONTENT as usize),
        b"start" => {
            let origin = external_origin(r, provider);
            let rd = query_arg(http::bytes_of(&r.args), b"rd").and_then(decode_query_value);
            let return_to = rd
                .and_then(|rd| {
                    validate_return_to(
                        &rd,
                        provider.settings.mode,
                        &origin,
                        provider.settings.cookie_domain.as_deref(),
                    )
                })
                .unwrap_or_else(|| home_url(r, provider));
            let stale = !session_cookies(r, provider).is_empty();
            start_login(r, provider, zone, return_to, stale)
        }
        b"callback" => callback(r, provider, zone),
        b"sign_out" => sign_out(r, provider, zone),
        #[cfg(feature = "bench")]
        b"bench/fill" => bench_fill(r, provider, zone),
        _ => NGX_HTTP_NOT_FOUND as ngx_int_t,
    }
}

/// Starts a provider call and suspends the request; a full queue or a failed post answers
/// with a page.
fn start_call(r: &mut ngx_http_request_t, provider: &Provider, call: Call) -> ngx_int_t {
    let Some(mcf) = HttpAuthentikModule::main_conf(r) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    let pool = mcf.thread_pool;
    let action = match &call {
        Call::Login { .. } => "completing authentik login",
        Call::Discovery { then: AfterDiscovery::SignOut { .. }, .. } => "signing out of authentik",
        Call::Discovery { .. } => "starting authentik login",
    };
    match task::start(r, pool, provider, call) {
        Ok(handle) => {
            ctx_get(r).expect("request ctx").call = handle;
            NGX_AGAIN as ngx_int_t
        }
        Err(e @ CallError::Busy) => {
            log_error(r, NGX_LOG_ERR, &format!("{e}"), action);
            page(
                r,
                provider,
                NGX_HTTP_SERVICE_UNAVAILABLE,
                "Service unavailable",
                "Too many logins are in progress. Try again in a moment.",
                true,
            )
        }
        Err(e) => {
            log_error(r, NGX_LOG_ALERT, &format!("{e}"), action);
            NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
        }
    }
}

/// Redirects to the provider's authorization endpoint (fetching discovery first if needed).
fn start_login(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    return_to: String,
    stale_cookie: bool,
) -> ngx_int_t {
    let failure = provider.cache.discovery_failure(now());
    // A fetch failed moments ago: a stale document, or the failure, is the answer at once.
    let usable = provider
        .cache
        .fresh_discovery(now())
        .or_else(|| failure.as_ref().and_then(|_| provider.cache.any_discovery()));
    let Some(discovery) = usable else {
        if let Some(failure) = failure {
            log_error(r, NGX_LOG_ERR, &failure, "fetching authentik provider discovery");
            return provider_unavailable(r, provider);
        }
        let then = AfterDiscovery::StartLogin { return_to, stale_cookie };
        return start_call(r, provider, Call::Discovery { then, result: None });
    };
    let (scheme, host) = (http::scheme(r), http::host(r));
    let redirect_uri = provider.settings.redirect_uri(scheme, &host);
    let login = PendingLogin::new(return_to, redirect_uri, now());
    if let Err(e) = zone.insert_login(&login, provider.login_timeout, now()) {
        log_error(r, NGX_LOG_ERR, &format!("{e}"), "starting authentik login");
        let (status, title, message) = match e {
            ZoneError::TooLarge(..) => {
                (NGX_HTTP_BAD_REQUEST, "Bad request", "This request is too large to log in from.")
            }
            _ => (
                NGX_HTTP_SERVICE_UNAVAILABLE,
                "Service unavailable",
                "Too many logins are in progress. Try again in a moment.",
            ),
        };
        return page(r, provider, status, title, message, true);
    }
    let url = authorize_url(
        &discovery.authorization_endpoint,
        &provider.settings.client_id,
        &provider.settings.scopes,
        &login,
    );
    let login_path = login_cookie_path(provider);
    let attrs = CookieAttributes { path: &login_path, ..session_cookie_attributes(r, provider) };
    let name = cookie::login_cookie_name(&provider.cookie_name, &login.state);
    let set = cookie::set_cookie(&name, &login.binding, provider.login_timeout, &attrs);
    if stale_cookie {
        expire_session_cookie(r, provider);
    }
    http::add_response_header(r, &http::SET_COOKIE, set.as_bytes());
    redirect(r, &url)
}

fn callback(r: &mut ngx_http_request_t, provider: &Provider, zone: &SessionZone) -> ngx_int_t {
    let args = http::bytes_of(&r.args);
    let state = query_arg(args, b"state").and_then(decode_query_value);
    let code = query_arg(args, b"code").and_then(decode_query_value);
    let error = query_arg(args, b"error").and_then(decode_query_value);

    let Some(state) = state else {
        return invalid_state(r, provider, "the login request has no state");
    };
    let Some(login) = zone.take_login(&state, now()) else {
        return invalid_state(r, provider, "login state is unknown, expired or already used");
    };
    let login_cookie = cookie::login_cookie_name(&provider.cookie_name, &state);
    let binding = http::request_headers(r, b"cookie")
        .find_map(|h| cookie::find_cookie(h, login_cookie.as_bytes()));
    if !binding.is_some_and(|b| login.binding_matches(b)) {
        return invalid_state(r, provider, "login state does not belong to this browser");
    }
    if let Some(error) = error {
        let msg = format!("identity provider refused the login: \"{}\"", error.escape_default());
        log_error(r, NGX_LOG_WARN, &msg, "completing authentik login");
        expire_cookie(r, provider, &login_cookie, &login_cookie_path(provider));
        return page(
            r,
            provider,
            NGX_HTTP_FORBIDDEN,
            "Access denied",
            "The identity provider did not allow this login.",
            true,
        );
    }
    let Some(code) = code else {
        return invalid_state(r, provider, "the login response has no code");
    };
    let login = Box::new(login);
    let max_lifetime = zone.timeout;
    start_call(r, provider, Call::Login { login, code, max_lifetime, login_cookie, result: None })
}

fn sign_out(r: &mut ngx_http_request_t, provider: &Provider, zone: &SessionZone) -> ngx_int_t {
    let cookies = session_cookies(r, provider);
    let record = find_first_session(r, provider, zone, &cookies);
    let id_token = record.map(|rec| String::from_utf8_lossy(rec.logout_hint()).into_owned());
    if let Some(rec) = &record {
        zone.remove_by_sub(&String::from_utf8_lossy(rec.sub));
    }
    expire_session_cookie(r, provider);
    if record.is_none() {
        return redirect(r, "/");
    }
    if let Some(discovery) = provider.cache.any_discovery() {
        return finish_sign_out(r, provider, discovery.end_session_endpoint.as_deref(), id_token);
    }
    if provider.cache.discovery_failure(now()).is_some() {
        return finish_sign_out(r, provider, None, id_token);
    }
    let then = AfterDiscovery::SignOut { id_token };
    start_call(r, provider, Call::Discovery { then, result: None })
}

fn finish_sign_out(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    end_session: Option<&str>,
    id_token: Option<String>,
) -> ngx_int_t {
    let Some(endpoint) = end_session else {
        return redirect(r, "/");
    };
    let post_logout = match &provider.settings.post_logout_redirect {
        Some(url) => url.to_string(),
        None => format!("{}/", external_origin(r, provider)),
    };
    let mut url = endpoint.to_string();
    url.push(if url.contains('?') { '&' } else { '?' });
    if let Some(token) = id_token.filter(|t| !t.is_empty()) {
        url.push_str("id_token_hint=");
        url.push_str(&encode_query_value(&token));
        url.push('&');
    }
    url.push_str("client_id=");
    url.push_str(&encode_query_value(&provider.settings.client_id));
    url.push_str("&post_logout_redirect_uri=");
    url.push_str(&encode_query_value(&post_logout));
    redirect(r, &url)
}

/* thread-pool round trips */

/// Continues a request whose provider call ended.
fn resume(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    call: Call,
) -> ngx_int_t {
    match call {
        Call::Discovery {
            then: AfterDiscovery::StartLogin { return_to, stale_cookie },
            result,
        } => {
            if result.as_ref().is_some_and(Result::is_ok)
                || provider.cache.fresh_discovery(now()).is_some()
                || provider.cache.discovery_failure(now()).is_some()
            {
                // start_login answers from the cache: the document or the recent failure.
                return start_login(r, provider, zone, return_to, stale_cookie);
            }
            let reason = match result {
                Some(Err(e)) => e.to_string(),
                _ => provider
                    .cache
                    .discovery_failure(now())
                    .unwrap_or_else(|| "discovery document is unavailable".to_string()),
            };
            log_error(r, NGX_LOG_ERR, &reason, "fetching authentik provider discovery");
            provider_unavailable(r, provider)
        }
        Call::Discovery { then: AfterDiscovery::SignOut { id_token }, .. } => {
            let discovery = provider.cache.any_discovery();
            let end = discovery.as_ref().and_then(|d| d.end_session_endpoint.as_deref());
            finish_sign_out(r, provider, end, id_token)
        }
        Call::Login { login, login_cookie, result, .. } => {
            expire_cookie(r, provider, &login_cookie, &login_cookie_path(provider));
            match result {
                Some(Ok(record)) => create_session(r, provider, zone, *record, &login.return_to),
                Some(Err(e)) => {
                    let what = match &e {
                        LoginError::Provider(_) => "redeeming authentik login code",
                        _ => "validating authentik login tokens",
                    };
                    log_error(r, NGX_LOG_ERR, &format!("{e}"), what);
                    provider_unavailable(r, provider)
                }
                None => NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t,
            }
        }
    }
}

fn create_session(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    zone: &SessionZone,
    record: SessionRecord,
    return_to: &str,
) -> ngx_int_t {
    let now = now();
    let mut attempt = 0;
    let (id, eviction) = loop {
        let id = SessionId::generate();
        match zone.insert(&id, provider.key, &record, now) {
            Ok(eviction) => break (id, eviction),
            Err(ZoneError::Collision) if attempt < 3 => attempt += 1,
            Err(e @ ZoneError::TooLarge(..)) => {
                let msg = format!("session of \"{}\" not stored: {e}", record.sub.escape_default());
                log_error(r, NGX_LOG_ERR, &msg, "creating authentik session");
                return page(
                    r,
                    provider,
                    nginx_sys::NGX_HTTP_BAD_GATEWAY,
                    "Login unavailable",
                    "Your account carries more identity data than this site can store. \
                     Ask your administrator.",
                    false,
                );
            }
            Err(e) => {
                log_error(r, NGX_LOG_ERR, &format!("{e}"), "creating authentik session");
                return page(
                    r,
                    provider,
                    NGX_HTTP_SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    "The session store is full. Try again in a moment.",
                    true,
                );
            }
        }
    };
    warn_eviction(r, zone, &eviction, "creating authentik session");
    let attrs = session_cookie_attributes(r, provider);
    let max_age = record.expires_at - now;
    let set = cookie::set_cookie(&provider.cookie_name, &id.to_cookie_value(), max_age, &attrs);
    http::add_response_header(r, &http::SET_COOKIE, set.as_bytes());
    redirect(r, return_to)
}

/// Logs that the zone was full (at most once a minute for the whole zone).
fn warn_eviction(
    r: &mut ngx_http_request_t,
    zone: &SessionZone,
    eviction: &crate::zone::Eviction,
    action: &str,
) {
    if eviction.warn {
        let msg = format!(
            "authentik session zone \"{}\" is full, evicted {} least recently used session(s)",
            zone.name, eviction.evicted
        );
        log_error(r, NGX_LOG_WARN, &msg, action);
    }
}

/* responses */

fn redirect(r: &mut ngx_http_request_t, url: &str) -> ngx_int_t {
    if !http::set_location(r, url) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    http::add_response_header(r, &http::CACHE_CONTROL, b"no-store");
    // nginx's special response discards the request body too; done here so that no path
    // through this module leaves a body on a keep-alive connection.
    http::discard_body(r);
    NGX_HTTP_MOVED_TEMPORARILY as ngx_int_t
}

fn page(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    status: u32,
    title: &str,
    message: &str,
    retry: bool,
) -> ngx_int_t {
    let start = format!("{}{OUTPOST_PREFIX}start", provider.base_path);
    let link = retry.then_some((start.as_str(), "Log in again"));
    let html = error_page(title, message, link);
    http::send_page(r, status as usize, &html)
}

fn invalid_state(r: &mut ngx_http_request_t, provider: &Provider, reason: &str) -> ngx_int_t {
    log_error(r, NGX_LOG_WARN, reason, "completing authentik login");
    page(
        r,
        provider,
        NGX_HTTP_BAD_REQUEST,
        "Login expired",
        "This login link is invalid or has expired. Please start again.",
        true,
    )
}

fn provider_unavailable(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    page(
        r,
        provider,
        nginx_sys::NGX_HTTP_BAD_GATEWAY,
        "Login unavailable",
        "The identity provider could not be reached or gave an invalid answer. Try again later.",
        true,
    )
}

/// Logs `msg` in nginx's phrasing: "<msg> while <action>, client: ..., server: ..., request: ...".
fn log_error(r: &mut ngx_http_request_t, level: u32, msg: &str, action: &str) {
    // SAFETY: the connection and its log outlive the request.
    let log = unsafe { &mut *(*r.connection).log };
    let saved = log.action;
    let action = std::ffi::CString::new(action).unwrap_or_default();
    log.action = action.as_ptr() as *mut _;
    let logp: *mut nginx_sys::ngx_log_t = log;
    ngx_log_error!(level, logp, "{}", msg);
    log.action = saved;
}

/* cookies */

fn session_cookie_attributes<'a>(
    r: &ngx_http_request_t,
    provider: &'a Provider,
) -> CookieAttributes<'a> {
    CookieAttributes {
        path: "/",
        domain: cookie_domain(provider),
        secure: provider.settings.is_secure(http::scheme(r)),
    }
}

/// Where the login-binding cookie lives: the callback's directory, under `external_host`'s path.
fn login_cookie_path(provider: &Provider) -> String {
    format!("{}{OUTPOST_PREFIX}", provider.base_path)
}

/// Expires the session cookie in every `Domain=` scope a stale copy may live in, other than
/// the one the module sets.
fn expire_stale_cookie_scopes(r: &mut ngx_http_request_t, provider: &Provider) {
    let host = http::host(r);
    let attrs = session_cookie_attributes(r, provider);
    let mut sets = Vec::new();
    for domain in cookie::stale_cookie_domains(&host, attrs.domain) {
        let scope = CookieAttributes { domain: Some(domain), ..attrs.clone() };
        sets.push(cookie::expire_cookie(&provider.cookie_name, &scope));
    }
    if attrs.domain.is_some() {
        // The module's cookie carries Domain=: a host-only copy is stale.
        let scope = CookieAttributes { domain: None, ..attrs.clone() };
        sets.push(cookie::expire_cookie(&provider.cookie_name, &scope));
    }
    for set in sets {
        http::add_response_header(r, &http::SET_COOKIE, set.as_bytes());
    }
}

fn cookie_domain(provider: &Provider) -> Option<&str> {
    match provider.settings.mode {
        Mode::ForwardDomain => provider.settings.cookie_domain.as_deref(),
        _ => None,
    }
}

fn expire_session_cookie(r: &mut ngx_http_request_t, provider: &Provider) {
    let name = provider.cookie_name.clone();
    expire_cookie(r, provider, &name, "/");
}

fn expire_cookie(r: &mut ngx_http_request_t, provider: &Provider, name: &str, path: &str) {
    let attrs = CookieAttributes { path, ..session_cookie_attributes(r, provider) };
    let set = cookie::expire_cookie(name, &attrs);
    http::add_response_header(r, &http::SET_COOKIE, set.as_bytes());
}

/* URLs */

fn external_origin(r: &ngx_http_request_t, provider: &Provider) -> String {
    provider.settings.external_origin(http::scheme(r), &http::host(r))
}

/// The external host's root (with `external_host`'s path): where a refused or over-long return
/// URL lands.
fn home_url(r: &ngx_http_request_t, provider: &Provider) -> String {
    format!("{}{}/", external_origin(r, provider), provider.base_path)
}

/// Where the user should land after logging in: this request's URL (the external host's root
/// when it is longer than `MAX_RETURN_URL`).
fn current_url(r: &ngx_http_request_t, provider: &Provider) -> String {
    let uri = String::from_utf8_lossy(http::bytes_of(&r.unparsed_uri));
    let external = external_origin(r, provider);
    let url = match provider.settings.mode {
        Mode::ForwardDomain => format!("{}://{}{uri}", http::scheme(r), http::host(r)),
        _ => format!("{external}{uri}"),
    };
    if url.len() > MAX_RETURN_URL {
        return home_url(r, provider);
    }
    let mode = provider.settings.mode;
    validate_return_to(&url, mode, &external, provider.settings.cookie_domain.as_deref())
        .unwrap_or_else(|| home_url(r, provider))
}

/// Whether the request may pass without a session: the unauthenticated-path patterns must
/// match both what the upstream can see (the raw request target, decoded, and refused when it
/// can be read two ways; see `UnauthPaths::exempts`) and nginx's normalised `$uri`. In
/// forward_domain mode the subject is the URL on the host nginx routed the request on.
fn exempt(r: &ngx_http_request_t, provider: &Provider, unauth: &UnauthPaths) -> bool {
    let raw = http::bytes_of(&r.unparsed_uri);
    let uri = http::bytes_of(&r.uri);
    match provider.settings.mode {
        Mode::ForwardDomain => {
            let origin = format!("{}://{}", http::scheme(r), http::routed_host(r));
            unauth.exempts(raw, uri, Some(&origin))
        }
        _ => unauth.exempts(raw, uri, None),
    }
}

/// BENCH-ONLY (cargo feature `bench`, never in release packages): copies the caller's session
/// `n` times under fresh random ids, so `make bench` can measure lookups with a large zone
/// without running a million logins. Answers with the zone's session count and free pages.
#[cfg(feature = "bench")]
fn bench_fill(r: &mut ngx_http_request_t, provider: &Provider, zone: &SessionZone) -> ngx_int_t {
    let Some(record) = session_cookies(r, provider)
        .first()
        .and_then(|v| SessionId::from_cookie_value(v))
        .and_then(|id| session_bytes(r, provider, zone, &id))
        .and_then(|bytes| SessionRecord::decode(bytes).ok())
    else {
        return NGX_HTTP_UNAUTHORIZED as ngx_int_t;
    };
    let n = query_arg(http::bytes_of(&r.args), b"n")
        .and_then(|v| core::str::from_utf8(v).ok()?.parse::<usize>().ok())
        .unwrap_or(1000);
    let mut evicted = 0;
    for _ in 0..n {
        if let Ok(e) = zone.insert(&SessionId::generate(), provider.key, &record, now()) {
            evicted += e.evicted;
        }
    }
    let (sessions, free_pages, total_pages) = zone.stats();
    let body = format!(
        "inserted {n}\nevicted {evicted}\nsessions {sessions}\nfree_pages {free_pages}\n\
         total_pages {total_pages}\nrecord_bytes {}\n",
        record.encode().len()
    );
    http::send_page(r, 200, &body)
}
