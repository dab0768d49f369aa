//! The login round trip: start (pending login + redirect to the provider), callback (state
//! and browser checks, then the code redeemed on the thread pool), the new session, and
//! sign-out. Every wait for the provider is a `call::Call` started here and continued in
//! `resume`.

use authentik_core::cookie::{self, CookieAttributes};
use authentik_core::identity::check_proxy_overrides;
use authentik_core::oidc::login::end_session_url;
use authentik_core::oidc::{authorize_url, LoginError, PendingLogin};
use authentik_core::redirect::{validate_return_to, MAX_RETURN_URL};
use authentik_core::remote::Revocation;
use authentik_core::request::{decode_query_value, query_arg};
use authentik_core::session::{SessionId, SessionRecord};
use nginx_sys::{
    ngx_http_request_t, ngx_int_t, NGX_AGAIN, NGX_HTTP_BAD_GATEWAY, NGX_HTTP_BAD_REQUEST,
    NGX_HTTP_FORBIDDEN, NGX_HTTP_SERVICE_UNAVAILABLE, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_WARN,
};
use ngx::http::HttpModuleMainConf;

use crate::call::{self, AfterDiscovery, Call, CallError, Finished};
use crate::log::action;
use crate::metrics::{self, LoginFailure};
use crate::provider::Provider;
use crate::remote;
use crate::response::{self, INTERNAL_ERROR};
use crate::session::{self, now};
use crate::store::{Eviction, SessionStore, ZoneError};
use crate::{ctx, http, request_log, HttpAuthentikModule};

/// Where the user should land after logging in from this request: its URL in the provider's
/// mode, if it passes the open-redirect check and is at most `MAX_RETURN_URL` long; else the
/// external host's root.
pub fn return_url(r: &ngx_http_request_t, provider: &Provider) -> String {
    let settings = provider.settings();
    let (scheme, host) = (http::scheme(r), http::host(r));
    let target = String::from_utf8_lossy(http::bytes_of(&r.unparsed_uri));
    let url = settings.request_url(scheme, &host, &target);
    if url.len() > MAX_RETURN_URL {
        return settings.home_url(scheme, &host);
    }
    let external = settings.external_origin(scheme, &host);
    validate_return_to(&url, settings.mode, &external, settings.cookie_domain.as_deref())
        .unwrap_or_else(|| settings.home_url(scheme, &host))
}

/// Redirects to the provider's authorization endpoint (fetching discovery first if needed).
pub fn start(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    return_to: String,
    stale_cookie: bool,
) -> ngx_int_t {
    let cache = &provider.runtime.cache;
    let failure = cache.discovery_failure(now());
    // A fetch failed moments ago: a stale document, or the failure, is the answer at once.
    let usable = cache
        .fresh_discovery(now())
        .or_else(|| failure.as_ref().and_then(|_| cache.any_discovery()));
    let Some(discovery) = usable else {
        if let Some(failure) = failure {
            request_log!(r, NGX_LOG_ERR, action::DISCOVERY, "{failure}");
            metrics::login_failed(provider, LoginFailure::ProviderUnavailable);
            return response::provider_unavailable(r, provider);
        }
        let then = AfterDiscovery::StartLogin { return_to, stale_cookie };
        return start_call(r, provider, Call::Discovery { then, result: None });
    };
    let settings = provider.settings();
    let redirect_uri = settings.redirect_uri(http::scheme(r), &http::host(r));
    let login = PendingLogin::new(return_to, redirect_uri, now());
    if let Err(e) = provider.zone().insert_login(&login, provider.login_timeout, now()) {
        request_log!(r, NGX_LOG_ERR, action::START_LOGIN, "{e}");
        if let ZoneError::TooLarge(..) = e {
            metrics::login_failed(provider, LoginFailure::BadRequest);
            let msg = "This request is too large to log in from.";
            return response::page(r, provider, NGX_HTTP_BAD_REQUEST, "Bad request", msg, true);
        }
        metrics::login_failed(provider, LoginFailure::Busy);
        return response::busy(r, provider);
    }
    remote::put_login(provider, &login.state, login.encode(), now());
    let url = authorize_url(
        &discovery.authorization_endpoint,
        &settings.client_id,
        &settings.scopes,
        &login,
    );
    let login_path = response::login_cookie_path(provider);
    let attrs =
        CookieAttributes { path: &login_path, ..response::session_cookie_attributes(r, provider) };
    let name = cookie::login_cookie_name(&provider.cookie_name, &login.state);
    let set = cookie::set_cookie(&name, &login.binding, provider.login_timeout, &attrs);
    if stale_cookie {
        response::expire_session_cookie(r, provider);
    }
    response::set_cookie(r, &set);
    metrics::login_started(provider);
    response::redirect(r, &url)
}

/// The redirect URI: checks state (one use, not expired) and the login-binding cookie, then
/// redeems the code on the thread pool.
pub fn callback(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    let args = http::bytes_of(&r.args);
    let state = query_arg(args, b"state").and_then(decode_query_value);
    let code = query_arg(args, b"code").and_then(decode_query_value);
    let error = query_arg(args, b"error").and_then(decode_query_value);

    let Some(state) = state else {
        return response::invalid_state(r, provider, "the login request has no state");
    };
    let Some(login) = provider.zone().take_login(&state, now()) else {
        if let Some(store) = &provider.zone().remote {
            // The login may have started on another node.
            let store = store.clone();
            let call = Call::StoreLogin { store, state, code, error, result: None };
            return start_call(r, provider, call);
        }
        let reason = "login state is unknown, expired or already used";
        return response::invalid_state(r, provider, reason);
    };
    remote::forget_login(provider, &state, now());
    callback_with(r, provider, &state, login, code, error)
}

/// The callback once its pending login is found: the browser check, then the code redeemed.
fn callback_with(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    state: &str,
    login: PendingLogin,
    code: Option<String>,
    error: Option<String>,
) -> ngx_int_t {
    let login_cookie = cookie::login_cookie_name(&provider.cookie_name, state);
    let binding = http::request_headers(r, b"cookie")
        .find_map(|h| cookie::find_cookie(h, login_cookie.as_bytes()));
    if !binding.is_some_and(|b| login.binding_matches(b)) {
        let reason = "login state does not belong to this browser";
        return response::invalid_state(r, provider, reason);
    }
    if let Some(error) = error {
        let error = error.escape_default();
        request_log!(
            r,
            NGX_LOG_WARN,
            action::CALLBACK,
            "identity provider refused the login: \"{error}\""
        );
        response::expire_cookie(r, provider, &login_cookie, &response::login_cookie_path(provider));
        metrics::login_failed(provider, LoginFailure::ProviderDenied);
        let msg = "The identity provider did not allow this login.";
        return response::page(r, provider, NGX_HTTP_FORBIDDEN, "Access denied", msg, true);
    }
    let Some(code) = code else {
        return response::invalid_state(r, provider, "the login response has no code");
    };
    let login = Box::new(login);
    let max_lifetime = provider.session_lifetime();
    let store_write = remote::session_write(provider);
    let call = Call::Login { login, code, max_lifetime, login_cookie, result: None, store_write };
    start_call(r, provider, call)
}

/// Deletes the user's sessions in the zone, expires the cookie, and sends the browser to the
/// provider's end-session endpoint.
pub fn sign_out(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    let record = session::scan(r, provider, true).session;
    let id_token = record.map(|rec| String::from_utf8_lossy(rec.logout_hint()).into_owned());
    if let Some(rec) = &record {
        let sub = String::from_utf8_lossy(rec.sub);
        provider.zone().remove_by_sub(&sub);
        remote::revoke(&provider.zone().remote, Revocation::Sub(sub.into_owned()), now());
    } else if let Some(id) = session::scan(r, provider, false).missed {
        // Not in this node's zone: the session may live in the store and on other nodes.
        remote::revoke(&provider.zone().remote, Revocation::Id(id.0), now());
    }
    response::expire_session_cookie(r, provider);
    if record.is_none() {
        return response::redirect(r, "/");
    }
    let cache = &provider.runtime.cache;
    if let Some(discovery) = cache.any_discovery() {
        return finish_sign_out(r, provider, discovery.end_session_endpoint.as_deref(), id_token);
    }
    if cache.discovery_failure(now()).is_some() {
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
        return response::redirect(r, "/");
    };
    let settings = provider.settings();
    let post_logout = match &settings.post_logout_redirect {
        Some(url) => url.to_string(),
        None => format!("{}/", response::external_origin(r, provider)),
    };
    let url = end_session_url(endpoint, id_token.as_deref(), &settings.client_id, &post_logout);
    response::redirect(r, &url)
}

/* provider calls */

/// Starts a provider call and suspends the request; a full queue or a failed post answers
/// with a page.
pub fn start_call(r: &mut ngx_http_request_t, provider: &Provider, call: Call) -> ngx_int_t {
    let Some(mcf) = HttpAuthentikModule::main_conf(r) else {
        return INTERNAL_ERROR;
    };
    let pool = mcf.thread_pool;
    let what = match &call {
        Call::Login { .. } | Call::StoreLogin { .. } => action::CALLBACK,
        Call::HeaderAuth { .. } => action::HEADER_AUTH,
        Call::StoreSession { .. } => action::STORE,
        Call::Discovery { then: AfterDiscovery::SignOut { .. }, .. } => action::SIGN_OUT,
        Call::Discovery { .. } => action::START_LOGIN,
    };
    // An outpost provider stays alive with the call (the request may go first).
    let keep = ctx::held(r, provider);
    match call::start(r, pool, &provider.runtime, &provider.calls, keep, call) {
        Ok(handle) => {
            let Some(ctx) = ctx::get(r) else {
                return INTERNAL_ERROR;
            };
            ctx.call = handle;
            NGX_AGAIN as ngx_int_t
        }
        Err(e @ CallError::Busy) => {
            request_log!(r, NGX_LOG_ERR, what, "{e}");
            if !std::ptr::eq(what, action::SIGN_OUT) {
                metrics::login_failed(provider, LoginFailure::Busy);
            }
            response::busy(r, provider)
        }
        Err(e) => {
            request_log!(r, NGX_LOG_ALERT, what, "{e}");
            INTERNAL_ERROR
        }
    }
}

/// Continues a request suspended on a provider call: `NGX_AGAIN` until the call has ended.
pub fn resume_call(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    let Some(ctx) = ctx::get(r) else {
        return INTERNAL_ERROR;
    };
    // SAFETY: the handle lives until both the request and the call are done with it.
    let handle = unsafe { &mut *ctx.call };
    if !handle.is_finished() {
        return NGX_AGAIN as ngx_int_t;
    }
    ctx.call = core::ptr::null_mut();
    match handle.take() {
        Some(Finished::Done(call)) => resume(r, provider, call),
        Some(Finished::Panicked(msg)) => {
            request_log!(r, NGX_LOG_ALERT, action::PROVIDER_CALL, "provider task panicked: {msg}");
            INTERNAL_ERROR
        }
        None => INTERNAL_ERROR,
    }
}

/// Continues a request whose provider call ended.
pub fn resume(r: &mut ngx_http_request_t, provider: &Provider, call: Call) -> ngx_int_t {
    match call {
        Call::Discovery {
            then: AfterDiscovery::StartLogin { return_to, stale_cookie },
            result,
        } => {
            let cache = &provider.runtime.cache;
            if result.as_ref().is_some_and(Result::is_ok)
                || cache.fresh_discovery(now()).is_some()
                || cache.discovery_failure(now()).is_some()
            {
                // `start` answers from the cache: the document or the recent failure.
                return start(r, provider, return_to, stale_cookie);
            }
            let reason = match result {
                Some(Err(e)) => e.to_string(),
                _ => "discovery document is unavailable".to_string(),
            };
            request_log!(r, NGX_LOG_ERR, action::DISCOVERY, "{reason}");
            metrics::login_failed(provider, LoginFailure::ProviderUnavailable);
            response::provider_unavailable(r, provider)
        }
        Call::Discovery { then: AfterDiscovery::SignOut { id_token }, .. } => {
            let discovery = provider.runtime.cache.any_discovery();
            let end = discovery.as_ref().and_then(|d| d.end_session_endpoint.as_deref());
            finish_sign_out(r, provider, end, id_token)
        }
        Call::StoreLogin { store, state, code, error, result } => {
            crate::remote::report(r, &store);
            let found = match result {
                Some(Ok(Some(bytes))) => PendingLogin::decode(&bytes),
                _ => None,
            };
            let Some(login) = found.filter(|l| l.created_at + provider.login_timeout > now())
            else {
                let reason = "login state is unknown, expired or already used";
                return response::invalid_state(r, provider, reason);
            };
            callback_with(r, provider, &state, login, code, error)
        }
        // Handled by the access decision, which goes on with the filled zone.
        Call::StoreSession { .. } => INTERNAL_ERROR,
        Call::Login { login, login_cookie, result, store_write, .. } => {
            let path = response::login_cookie_path(provider);
            response::expire_cookie(r, provider, &login_cookie, &path);
            match result {
                Some(Ok(record)) => {
                    create_session(r, provider, *record, &login.return_to, store_write)
                }
                Some(Err(e)) => {
                    let (what, reason) = match &e {
                        LoginError::Provider(_) => {
                            (action::REDEEM, LoginFailure::ProviderUnavailable)
                        }
                        _ => (action::VALIDATE, LoginFailure::TokenInvalid),
                    };
                    request_log!(r, NGX_LOG_ERR, what, "{e}");
                    metrics::login_failed(provider, reason);
                    response::provider_unavailable(r, provider)
                }
                None => INTERNAL_ERROR,
            }
        }
        // Resumed by the access handler itself (see `access`).
        Call::HeaderAuth { .. } => INTERNAL_ERROR,
    }
}

/* the new session */

fn create_session(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    mut record: SessionRecord,
    return_to: &str,
    store_write: Option<Box<crate::remote::SessionWrite>>,
) -> ngx_int_t {
    let now = now();
    // `ak_proxy.backend_override` and `host_header` become $authentik_backend and
    // $authentik_host_header: only usable values are kept, said once here.
    let (checked, warnings) = check_proxy_overrides(&record.claims_json);
    for warning in warnings {
        let sub = record.sub.escape_default();
        request_log!(r, NGX_LOG_WARN, action::CREATE_SESSION, "session of \"{sub}\": {warning}");
    }
    if let Some(claims_json) = checked {
        record.claims_json = claims_json;
    }
    let zone = provider.zone();
    let mut attempt = 0;
    // With a store, the id the thread wrote there comes first.
    let mut stored_id = store_write.as_ref().map(|w| w.id);
    let (id, eviction) = loop {
        let id = stored_id.take().unwrap_or_else(SessionId::generate);
        match zone.insert(&id, provider.key, &record, now) {
            Ok(eviction) => break (id, eviction),
            Err(ZoneError::Collision) if attempt < 3 => attempt += 1,
            Err(e @ ZoneError::TooLarge(..)) => {
                let sub = record.sub.escape_default();
                request_log!(
                    r,
                    NGX_LOG_ERR,
                    action::CREATE_SESSION,
                    "session of \"{sub}\" not stored: {e}"
                );
                metrics::login_failed(provider, LoginFailure::SessionTooLarge);
                let msg = "Your account carries more identity data than this site can store. \
                           Ask your administrator.";
                return response::page(
                    r,
                    provider,
                    NGX_HTTP_BAD_GATEWAY,
                    "Login unavailable",
                    msg,
                    false,
                );
            }
            Err(e) => {
                request_log!(r, NGX_LOG_ERR, action::CREATE_SESSION, "{e}");
                metrics::login_failed(provider, LoginFailure::StoreFull);
                let msg = "The session store is full. Try again in a moment.";
                let title = "Service unavailable";
                return response::page(r, provider, NGX_HTTP_SERVICE_UNAVAILABLE, title, msg, true);
            }
        }
    };
    warn_eviction(r, provider, &eviction);
    if let Some(write) = store_write {
        crate::remote::report(r, &write.store);
        if write.id != id {
            // The zone refused the id the store has (never seen: 256 random bits).
            (*write).retry_as(id, &record);
        } else if !matches!(write.result, Some(Ok(()))) {
            let sub = record.sub.escape_default();
            request_log!(
                r,
                NGX_LOG_WARN,
                action::CREATE_SESSION,
                "session of \"{sub}\" is on this node only until the session store returns"
            );
            write.retry(&record);
        }
    }
    metrics::evicted(provider, eviction.evicted);
    metrics::login_completed(provider);
    let attrs = response::session_cookie_attributes(r, provider);
    let max_age = record.expires_at - now;
    let set = cookie::set_cookie(&provider.cookie_name, &id.to_cookie_value(), max_age, &attrs);
    response::set_cookie(r, &set);
    response::redirect(r, return_to)
}

/// Logs that the zone was full (at most once a minute for the whole zone).
fn warn_eviction(r: &mut ngx_http_request_t, provider: &Provider, eviction: &Eviction) {
    if eviction.warn {
        let (name, evicted) = (&provider.zone().name, eviction.evicted);
        request_log!(
            r,
            NGX_LOG_WARN,
            action::CREATE_SESSION,
            "authentik session zone \"{name}\" is full, evicted {evicted} least recently used session(s)"
        );
    }
}
