//! The request's session: the session cookie's values and their lookup in the provider's
//! zone (bound to the provider), copied into the request pool.

use authentik_core::cookie;
use authentik_core::session::{SessionId, SessionView};
use nginx_sys::ngx_http_request_t;

use crate::http;
use crate::provider::Provider;
use crate::store::SessionStore;

/// nginx's cached clock, seconds.
pub fn now() -> i64 {
    nginx_sys::ngx_time() as i64
}

/// Every value of the provider's session cookie in the request, in order (usually one).
pub fn session_cookies<'a>(r: &ngx_http_request_t, provider: &Provider) -> Vec<&'a [u8]> {
    let name = provider.cookie_name.as_bytes();
    let mut found = Vec::new();
    for header in http::request_headers(r, b"cookie") {
        found.extend(cookie::find_cookies(header, name));
    }
    found
}

/// The first of `cookies` that names a live session of this provider.
pub fn find_first_session(
    r: &ngx_http_request_t,
    provider: &Provider,
    cookies: &[&[u8]],
) -> Option<SessionView<'static>> {
    cookies.iter().find_map(|value| {
        let id = SessionId::from_cookie_value(value)?;
        SessionView::parse(session_bytes(r, provider, &id)?)
    })
}

/// The session's encoded record, copied from the zone into the request pool. `'static` stands
/// for "as long as the request": the bytes are freed with the request pool.
pub fn session_bytes(
    r: &ngx_http_request_t,
    provider: &Provider,
    id: &SessionId,
) -> Option<&'static [u8]> {
    let pool = r.pool;
    provider.zone().lookup(id, provider.key, now(), |len| {
        // SAFETY: allocates from the request pool; nginx frees it with the request.
        let p = unsafe { nginx_sys::ngx_pnalloc(pool, len.max(1)) } as *mut u8;
        // SAFETY: `p` has room for `len` bytes and is exclusively ours.
        (!p.is_null()).then(|| unsafe { core::slice::from_raw_parts_mut(p, len) })
    })
}
