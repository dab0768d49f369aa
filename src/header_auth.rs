//! Header authentication in the access phase (see `authentik_core::oidc::header_auth`): a
//! request without a session but with `Authorization: Bearer|Basic` is checked with the
//! provider on the thread pool, and the answer (a success for 60 s, a failure for 10 s) is
//! cached in the session zone under a hash of the provider and the header value, so every
//! worker reuses it and a wrong value does not turn every request into a provider call.

use std::sync::OnceLock;

use authentik_core::oidc::header_auth::{
    cache_id, failure_record, parse_authorization, Credentials, HeaderAuthError,
};
use authentik_core::session::{SessionId, SessionRecord, SessionView};
use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_LOG_INFO, NGX_LOG_WARN};

use crate::call::Call;
use crate::log::action;
use crate::provider::Provider;
use crate::session::{self, now};
use crate::store::{SessionStore, ZoneError};
use crate::{ctx, http, login, request_log};

/// What header authentication found.
pub enum HeaderAuth {
    /// No `Authorization` header: the session-less path as usual.
    Absent,
    /// A cached success.
    Authenticated(SessionView<'static>),
    /// A wrong, unknown or unusable value (or a cached failure).
    Failed,
    /// A provider call was started; the access handler returns this.
    Pending(ngx_int_t),
}

/// Looks the request's `Authorization` header up in the cache, or starts checking it.
pub fn authenticate(r: &mut ngx_http_request_t, provider: &Provider) -> HeaderAuth {
    let Some(value) = http::request_header(r, b"authorization") else {
        return HeaderAuth::Absent;
    };
    // The provider call for this request is done: its answer.
    if let Some(outcome) = ctx::get(r).and_then(|ctx| ctx.header_auth) {
        return match outcome {
            Some(view) => HeaderAuth::Authenticated(view),
            None => HeaderAuth::Failed,
        };
    }
    let Some(credentials) = parse_authorization(value) else {
        return HeaderAuth::Failed;
    };
    // Where nginx's own `auth_basic` protects the location, Basic credentials are its (checked
    // against `auth_basic_user_file`), not an authentik app password.
    if matches!(credentials, Credentials::Basic { .. }) && auth_basic_on(r) {
        return HeaderAuth::Absent;
    }
    let id = cache_id(provider.key, value);
    if let Some(view) = session::session_bytes(r, provider, &id).and_then(SessionView::parse) {
        return match view.sub.is_empty() {
            true => HeaderAuth::Failed,
            false => HeaderAuth::Authenticated(view),
        };
    }
    let call = Call::HeaderAuth { credentials, cache_id: id, result: None };
    HeaderAuth::Pending(login::start_call(r, provider, call))
}

/// The provider answered: caches the answer and keeps it in the request context, where
/// [`authenticate`] finds it when the access decision runs again.
pub fn finished(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    id: &SessionId,
    result: Option<Result<Box<SessionRecord>, HeaderAuthError>>,
) {
    // A call that waited for another request's identical one has no result: the decision
    // runs again and finds that answer in the zone's cache.
    if result.is_none() {
        return;
    }
    let outcome = outcome(r, provider, id, result);
    if let Some(ctx) = ctx::get(r) {
        ctx.header_auth = Some(outcome);
    }
}

fn outcome(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    id: &SessionId,
    result: Option<Result<Box<SessionRecord>, HeaderAuthError>>,
) -> Option<SessionView<'static>> {
    let now = now();
    let record = match result {
        Some(Ok(record)) => *record,
        Some(Err(e)) => {
            // Never the header's value: the error says what failed, not with what.
            let level = match e {
                HeaderAuthError::Provider(_) | HeaderAuthError::NoIntrospection => NGX_LOG_WARN,
                _ => NGX_LOG_INFO,
            };
            request_log!(r, level, action::HEADER_AUTH, "authorization header refused: {e}");
            cache(r, provider, id, &failure_record(now), now);
            return None;
        }
        None => return None,
    };
    cache(r, provider, id, &record, now);
    let copy = http::pool_str(r, &record.encode())?;
    SessionView::parse(http::bytes_of(&copy))
}

fn cache(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    id: &SessionId,
    record: &SessionRecord,
    now: i64,
) {
    match provider.zone().insert(id, provider.key, record, now) {
        // Another worker cached the same header meanwhile.
        Ok(_) | Err(ZoneError::Collision) => {}
        Err(e) => request_log!(r, NGX_LOG_WARN, action::HEADER_AUTH, "answer not cached: {e}"),
    }
}

/// Removes `Authorization` before the upstream sees the request (also from nginx's typed
/// pointer, so `$http_authorization` and other modules no longer see it); `false` when memory
/// ran out.
pub fn remove_authorization(r: &mut ngx_http_request_t) -> bool {
    r.headers_in.authorization = core::ptr::null_mut();
    http::remove_request_headers(r, |name, _| name.eq_ignore_ascii_case(b"authorization"))
}

/// nginx's `auth_basic` location configuration (`ngx_http_auth_basic_module.c`; the same in
/// every nginx release the module supports).
#[repr(C)]
struct AuthBasicConf {
    realm: *const nginx_sys::ngx_http_complex_value_t,
    user_file: *const nginx_sys::ngx_http_complex_value_t,
}

/// `ngx_http_auth_basic_module`, looked up at run time: an nginx built without it still
/// loads this module.
fn auth_basic_module() -> Option<&'static nginx_sys::ngx_module_t> {
    static MODULE: OnceLock<usize> = OnceLock::new();
    let addr = *MODULE.get_or_init(|| {
        let name = c"ngx_http_auth_basic_module".as_ptr();
        // SAFETY: looks a symbol up in the already loaded objects (RTLD_DEFAULT is null).
        let found = unsafe { nginx_sys::dlsym(core::ptr::null_mut(), name) };
        found as usize
    });
    // SAFETY: a non-null address is nginx's module structure, alive with the process.
    (addr != 0).then(|| unsafe { &*(addr as *const nginx_sys::ngx_module_t) })
}

/// Whether `auth_basic` (with a user file, not `off`) applies to the request's location.
fn auth_basic_on(r: &ngx_http_request_t) -> bool {
    let Some(module) = auth_basic_module() else {
        return false;
    };
    // SAFETY: every http module has a location configuration slot at its ctx_index.
    let conf = unsafe { *r.loc_conf.add(module.ctx_index) } as *const AuthBasicConf;
    if conf.is_null() {
        return false;
    }
    // SAFETY: auth_basic's location configuration is an AuthBasicConf (see the type).
    let conf = unsafe { &*conf };
    if conf.realm.is_null() || conf.user_file.is_null() {
        return false;
    }
    // SAFETY: a configured complex value; its `value` is the directive's argument.
    let realm = http::bytes_of(unsafe { &(*conf.realm).value });
    realm != b"off"
}
