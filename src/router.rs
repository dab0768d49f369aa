//! The `/outpost.goauthentik.io/*` endpoints: ping, start, callback, sign_out, the
//! forward-auth endpoints `auth/*` (see `forward`) (and, in the bench build only, bench/fill);
//! anything else there is a `404`.

use authentik_core::forward::start_return_target;
use authentik_core::redirect::validate_return_to;
#[cfg(feature = "bench")]
use authentik_core::request::query_arg;
use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_HTTP_NOT_FOUND, NGX_HTTP_NO_CONTENT};

use crate::provider::Provider;
use crate::{forward, http, login, response, session};

pub fn endpoint(r: &mut ngx_http_request_t, provider: &Provider, endpoint: &[u8]) -> ngx_int_t {
    match endpoint {
        b"ping" => response::send_empty(r, NGX_HTTP_NO_CONTENT as usize),
        b"start" => {
            let settings = provider.settings();
            let origin = response::external_origin(r, provider);
            let rd = start_return_target(http::bytes_of(&r.args));
            let return_to = rd
                .and_then(|rd| {
                    let domain = settings.cookie_domain.as_deref();
                    validate_return_to(&rd, settings.mode, &origin, domain)
                })
                .unwrap_or_else(|| response::home_url(r, provider));
            let stale = session::session_cookies(r, provider).next().is_some();
            login::start(r, provider, return_to, stale)
        }
        b"callback" => login::callback(r, provider),
        b"sign_out" => login::sign_out(r, provider),
        #[cfg(feature = "bench")]
        b"bench/fill" => bench_fill(r, provider),
        other => {
            if let Some(rc) = forward::answer(r, provider, other) {
                return rc;
            }
            response::discard_body(r);
            NGX_HTTP_NOT_FOUND as ngx_int_t
        }
    }
}

/// BENCH-ONLY (cargo feature `bench`, never in release packages): copies the caller's session
/// `n` times under fresh random ids, so `make bench` can measure lookups with a large zone
/// without running a million logins. Answers with the zone's session count and free pages.
#[cfg(feature = "bench")]
fn bench_fill(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    use authentik_core::session::{SessionId, SessionRecord};

    use crate::store::SessionStore;

    let Some(record) = session::session_cookies(r, provider)
        .next()
        .and_then(SessionId::from_cookie_value)
        .and_then(|id| session::session_bytes(r, provider, &id))
        .and_then(|bytes| SessionRecord::decode(bytes).ok())
    else {
        return nginx_sys::NGX_HTTP_UNAUTHORIZED as ngx_int_t;
    };
    let n = query_arg(http::bytes_of(&r.args), b"n")
        .and_then(|v| core::str::from_utf8(v).ok()?.parse::<usize>().ok())
        .unwrap_or(1000);
    let zone = provider.zone();
    let mut evicted = 0;
    for _ in 0..n {
        if let Ok(e) = zone.insert(&SessionId::generate(), provider.key, &record, session::now()) {
            evicted += e.evicted;
        }
    }
    let (sessions, free_pages, total_pages) = zone.stats();
    let body = format!(
        "inserted {n}\nevicted {evicted}\nsessions {sessions}\nfree_pages {free_pages}\n\
         total_pages {total_pages}\nrecord_bytes {}\n",
        record.encode().len()
    );
    response::send_page(r, 200, &body)
}
