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

/// What the request's session cookie(s) say.
pub struct CookieScan {
    /// The first copy that names a live session of this provider.
    pub session: Option<SessionView<'static>>,
    /// How many copies of the cookie the request carries (a browser sends one per scope).
    pub copies: usize,
    /// The first well-formed session id that is not in the zone (for the shared store).
    pub missed: Option<SessionId>,
}

/// Every value of the provider's session cookie in the request, in order (usually one).
pub fn session_cookies<'a>(
    r: &'a ngx_http_request_t,
    provider: &'a Provider,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let name = provider.cookie_name.as_bytes();
    http::request_headers(r, b"cookie").flat_map(move |header| cookie::find_cookies(header, name))
}

/// Scans the session cookie's copies; with `lookup`, looks them up in order until one names a
/// live session of this provider. Allocates nothing.
pub fn scan(r: &ngx_http_request_t, provider: &Provider, lookup: bool) -> CookieScan {
    let mut scan = CookieScan { session: None, copies: 0, missed: None };
    for value in session_cookies(r, provider) {
        scan.copies += 1;
        if lookup && scan.session.is_none() {
            let Some(id) = SessionId::from_cookie_value(value) else { continue };
            scan.session = session_bytes(r, provider, &id).and_then(SessionView::parse);
            if scan.session.is_none() && scan.missed.is_none() {
                scan.missed = Some(id);
            }
        }
    }
    scan
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
