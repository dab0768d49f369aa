//! The responses the module builds itself: redirects, short HTML pages, the 204 of `ping`,
//! and the cookies they carry. Every one reads and discards the request body first.

use core::ptr;

use authentik_core::config::Mode;
use authentik_core::cookie::{self, CookieAttributes};
use authentik_core::page::error_page;
use nginx_sys::{
    ngx_buf_t, ngx_chain_t, ngx_http_discard_request_body, ngx_http_finalize_request,
    ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_pcalloc,
    ngx_str_t, ngx_uint_t, NGX_DONE, NGX_ERROR, NGX_HTTP_BAD_GATEWAY, NGX_HTTP_BAD_REQUEST,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_MOVED_TEMPORARILY, NGX_HTTP_SERVICE_UNAVAILABLE,
    NGX_LOG_WARN, NGX_OK,
};

use crate::http;
use crate::log::action;
use crate::provider::{Provider, OUTPOST_PREFIX};
use crate::request_log;

/// The status code an access handler returns when it cannot go on (out of memory, a bug).
pub const INTERNAL_ERROR: ngx_int_t = NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;

/// Reads and drops the request body, as nginx's own handlers do before answering without
/// reading it: otherwise, on a keep-alive connection, the body would be parsed as the next
/// request (request smuggling). HTTP/1.x `Content-Length` and chunked bodies, and HTTP/2 and
/// HTTP/3 streams, are handled by nginx; if discarding fails the connection is not kept alive.
pub fn discard_body(r: &mut ngx_http_request_t) {
    // SAFETY: `r` is the live request being answered; discarding twice is a no-op in nginx.
    if unsafe { ngx_http_discard_request_body(r) } != NGX_OK as ngx_int_t {
        r.set_keepalive(0);
    }
}

/// Sends `status` with no body (ping's 204) and finalizes the request.
pub fn send_empty(r: &mut ngx_http_request_t, status: usize) -> ngx_int_t {
    discard_body(r);
    r.headers_out.status = status as ngx_uint_t;
    r.headers_out.content_length_n = 0;
    r.set_header_only(1);
    let rp = r as *mut ngx_http_request_t;
    // SAFETY: sends the header of the request we were handed.
    let rc = unsafe { ngx_http_send_header(r) };
    // SAFETY: finalizes the request we were handed; it is not used afterwards.
    unsafe { ngx_http_finalize_request(rp, rc) };
    NGX_DONE as ngx_int_t
}

/// Sends `status` with an HTML body and finalizes the request; the access handler then returns
/// the result (NGX_DONE) so that phase processing stops. The request body is discarded first.
pub fn send_page(r: &mut ngx_http_request_t, status: usize, html: &str) -> ngx_int_t {
    send_body(r, status, "text/html; charset=utf-8", html)
}

/// Sends `status` with a `text/plain` body (authentik's `http.Error` answers of the
/// forward-auth endpoints) and finalizes the request, as `send_page` does.
pub fn send_text(r: &mut ngx_http_request_t, status: u32, text: &str) -> ngx_int_t {
    send_body(r, status as usize, "text/plain; charset=utf-8", text)
}

fn send_body(r: &mut ngx_http_request_t, status: usize, ct: &'static str, body: &str) -> ngx_int_t {
    discard_body(r);
    let rp = r as *mut ngx_http_request_t;
    let rc = write_body(r, status, ct, body);
    // SAFETY: finalizes the request we were handed; it is not used afterwards.
    unsafe { ngx_http_finalize_request(rp, rc) };
    NGX_DONE as ngx_int_t
}

/// Sends `status` with `body` (headers and the whole body) and returns nginx's result, without
/// finalizing: for a content handler (nginx finalizes with the result), or `send_body`.
pub fn write_body(
    r: &mut ngx_http_request_t,
    status: usize,
    ct: &'static str,
    body: &str,
) -> ngx_int_t {
    let Some(body) = http::pool_str(r, body.as_bytes()) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    http::add_response_header(r, &http::CACHE_CONTROL, b"no-store");
    r.headers_out.status = status as ngx_uint_t;
    r.headers_out.content_length_n = body.len as i64;
    r.headers_out.content_type = ngx_str_t { len: ct.len(), data: ct.as_ptr() as *mut u8 };
    r.headers_out.content_type_len = ct.len();
    r.headers_out.content_type_lowcase = ptr::null_mut();

    // SAFETY: sends the header of the request we own.
    let rc = unsafe { ngx_http_send_header(r) };
    if rc == NGX_ERROR as ngx_int_t || rc > 0 || r.header_only() != 0 {
        return rc;
    }
    // SAFETY: buffer and chain are allocated from the request pool.
    unsafe {
        let b = ngx_pcalloc(r.pool, core::mem::size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
        if b.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*b).pos = body.data;
        (*b).last = body.data.add(body.len);
        (*b).set_memory(1);
        (*b).set_last_buf(1);
        (*b).set_last_in_chain(1);
        let mut out = ngx_chain_t { buf: b, next: ptr::null_mut() };
        ngx_http_output_filter(r, &mut out)
    }
}

/// `302` to `url` (the status is returned to nginx, which sends the response).
pub fn redirect(r: &mut ngx_http_request_t, url: &str) -> ngx_int_t {
    if !http::set_location(r, url) {
        return INTERNAL_ERROR;
    }
    http::add_response_header(r, &http::CACHE_CONTROL, b"no-store");
    // nginx's special response discards the request body too; done here so that no path
    // through this module leaves a body on a keep-alive connection.
    discard_body(r);
    NGX_HTTP_MOVED_TEMPORARILY as ngx_int_t
}

/// A short HTML page; `retry` adds a link that starts a fresh login.
pub fn page(
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
    send_page(r, status as usize, &html)
}

/// `400` for a callback whose login state is missing, unknown, expired or not this browser's.
pub fn invalid_state(r: &mut ngx_http_request_t, provider: &Provider, reason: &str) -> ngx_int_t {
    request_log!(r, NGX_LOG_WARN, action::CALLBACK, "{reason}");
    crate::metrics::login_failed(provider, crate::metrics::LoginFailure::InvalidState);
    page(
        r,
        provider,
        NGX_HTTP_BAD_REQUEST,
        "Login expired",
        "This login link is invalid or has expired. Please start again.",
        true,
    )
}

/// `502` when the provider could not be reached or answered something invalid.
pub fn provider_unavailable(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    page(
        r,
        provider,
        NGX_HTTP_BAD_GATEWAY,
        "Login unavailable",
        "The identity provider could not be reached or gave an invalid answer. Try again later.",
        true,
    )
}

/// `503` when too many logins are in progress (calls in flight, pending-login slots).
pub fn busy(r: &mut ngx_http_request_t, provider: &Provider) -> ngx_int_t {
    page(
        r,
        provider,
        NGX_HTTP_SERVICE_UNAVAILABLE,
        "Service unavailable",
        "Too many logins are in progress. Try again in a moment.",
        true,
    )
}

/* cookies */

pub fn session_cookie_attributes<'a>(
    r: &ngx_http_request_t,
    provider: &'a Provider,
) -> CookieAttributes<'a> {
    let settings = &provider.runtime.settings;
    let domain = match settings.mode {
        Mode::ForwardDomain => settings.cookie_domain.as_deref(),
        _ => None,
    };
    CookieAttributes { path: "/", domain, secure: settings.is_secure(http::scheme(r)) }
}

/// Where the login-binding cookie lives: the callback's directory, under `external_host`'s path.
pub fn login_cookie_path(provider: &Provider) -> String {
    format!("{}{OUTPOST_PREFIX}", provider.base_path)
}

pub fn set_cookie(r: &mut ngx_http_request_t, value: &str) {
    http::add_response_header(r, &http::SET_COOKIE, value.as_bytes());
}

pub fn expire_session_cookie(r: &mut ngx_http_request_t, provider: &Provider) {
    expire_cookie(r, provider, &provider.cookie_name, "/");
}

pub fn expire_cookie(r: &mut ngx_http_request_t, provider: &Provider, name: &str, path: &str) {
    let attrs = CookieAttributes { path, ..session_cookie_attributes(r, provider) };
    set_cookie(r, &cookie::expire_cookie(name, &attrs));
}

/// Expires the session cookie in every `Domain=` scope a stale copy may live in, other than
/// the one the module sets.
pub fn expire_stale_cookie_scopes(r: &mut ngx_http_request_t, provider: &Provider) {
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
        set_cookie(r, &set);
    }
}

/* URLs */

pub fn external_origin(r: &ngx_http_request_t, provider: &Provider) -> String {
    provider.runtime.settings.external_origin(http::scheme(r), &http::host(r))
}

/// The external host's root (with `external_host`'s path): where a refused or over-long return
/// URL lands.
pub fn home_url(r: &ngx_http_request_t, provider: &Provider) -> String {
    provider.runtime.settings.home_url(http::scheme(r), &http::host(r))
}
