//! Small helpers over `ngx_http_request_t`: reading request headers, adding or removing
//! headers, and sending the module's own responses (redirects, status codes, short pages).

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr;

use nginx_sys::{
    ngx_http_request_t, ngx_list_part_t, ngx_list_push, ngx_palloc, ngx_pnalloc, ngx_str_t,
    ngx_table_elt_t, ngx_uint_t,
};

/// nginx's `ngx_hash()` over a lowercase header name: what `proxy_set_header` matching expects.
pub const fn header_hash(lowercase: &[u8]) -> ngx_uint_t {
    let mut h: ngx_uint_t = 0;
    let mut i = 0;
    while i < lowercase.len() {
        h = h.wrapping_mul(31).wrapping_add(lowercase[i] as ngx_uint_t);
        i += 1;
    }
    h
}

/// Every element of an `ngx_list_t` of headers, including those marked deleted (`hash == 0`,
/// nginx's convention, which other modules may use); readers below skip those.
pub fn header_elts(list: &nginx_sys::ngx_list_t) -> impl Iterator<Item = *mut ngx_table_elt_t> {
    let mut part: *const ngx_list_part_t = &list.part;
    let mut i = 0usize;
    core::iter::from_fn(move || loop {
        // SAFETY: walks the list's parts as nginx lays them out.
        let p = unsafe { &*part };
        if i < p.nelts {
            let elt = (p.elts as *mut ngx_table_elt_t).wrapping_add(i);
            i += 1;
            return Some(elt);
        }
        if p.next.is_null() {
            return None;
        }
        part = p.next;
        i = 0;
    })
}

/// Bytes of an `ngx_str_t` that lives as long as the request.
pub fn bytes_of<'a>(s: &ngx_str_t) -> &'a [u8] {
    if s.len == 0 || s.data.is_null() {
        return &[];
    }
    // SAFETY: an ngx_str_t of a live request points at `len` readable bytes.
    unsafe { core::slice::from_raw_parts(s.data, s.len) }
}

/// The first live request header named `lowercase` (exact, lowercase).
pub fn request_header<'a>(r: &ngx_http_request_t, lowercase: &'static [u8]) -> Option<&'a [u8]> {
    request_headers(r, lowercase).next()
}

/// Every live request header named `lowercase`.
pub fn request_headers<'a>(
    r: &ngx_http_request_t,
    lowercase: &'static [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    header_elts(&r.headers_in.headers).filter_map(move |elt| {
        // SAFETY: elements of the request's header list.
        let h = unsafe { &*elt };
        if h.hash == 0 || !bytes_of(&h.key).eq_ignore_ascii_case(lowercase) {
            return None;
        }
        Some(bytes_of(&h.value))
    })
}

/// Copies `bytes` into the request pool.
pub fn pool_str(r: &ngx_http_request_t, bytes: &[u8]) -> Option<ngx_str_t> {
    if bytes.is_empty() {
        return Some(ngx_str_t { len: 0, data: ptr::null_mut() });
    }
    // SAFETY: allocates from the request's pool, freed with the request.
    let data = unsafe { ngx_pnalloc(r.pool, bytes.len()) } as *mut u8;
    if data.is_null() {
        return None;
    }
    // SAFETY: `data` has room for `bytes`.
    unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len()) };
    Some(ngx_str_t { len: bytes.len(), data })
}

/// A header name known at compile time with its lowercase form and hash.
#[derive(Clone, Copy)]
pub struct HeaderName {
    pub name: &'static str,
    pub lowercase: &'static str,
    hash: ngx_uint_t,
}

impl HeaderName {
    pub const fn new(name: &'static str, lowercase: &'static str) -> HeaderName {
        assert!(name.len() == lowercase.len());
        HeaderName { name, lowercase, hash: header_hash(lowercase.as_bytes()) }
    }
}

/// The name of a header being added.
enum Key<'a> {
    Known(&'a HeaderName),
    /// Known only at run time (additionalHeaders): copied and lowercased into the pool.
    Dynamic(&'a [u8]),
}

/// A header value: copied into the request pool, or borrowed from memory that outlives the
/// request (configuration, the session record kept in the request context).
enum Value<'a> {
    Copy(&'a [u8]),
    Borrow(&'a [u8]),
}

fn push_header(
    r: &mut ngx_http_request_t,
    list: *mut nginx_sys::ngx_list_t,
    name: Key<'_>,
    value: Value<'_>,
) -> Option<*mut ngx_table_elt_t> {
    let value = match value {
        Value::Copy(v) => pool_str(r, v)?,
        Value::Borrow(v) => ngx_str_t { len: v.len(), data: v.as_ptr() as *mut u8 },
    };
    let (key, lowcase, hash) = match name {
        Key::Known(h) => (
            ngx_str_t { len: h.name.len(), data: h.name.as_ptr() as *mut u8 },
            h.lowercase.as_ptr() as *mut u8,
            h.hash,
        ),
        Key::Dynamic(name) => {
            let lowercase = name.to_ascii_lowercase();
            let key = pool_str(r, name)?;
            let lc = pool_str(r, &lowercase)?;
            (key, lc.data, header_hash(&lowercase))
        }
    };
    // SAFETY: pushes onto a live header list of this request.
    let elt = unsafe { ngx_list_push(list) } as *mut ngx_table_elt_t;
    if elt.is_null() {
        return None;
    }
    // SAFETY: `elt` is a fresh, uninitialised list element; every field is written.
    unsafe {
        ptr::write_bytes(elt, 0, 1);
        (*elt).hash = hash;
        (*elt).key = key;
        (*elt).value = value;
        (*elt).lowcase_key = lowcase;
    }
    Some(elt)
}

/// Adds a header to the request as the upstream will see it, without copying `value`.
///
/// # Safety
/// `value` must stay valid and unchanged until the request is freed (static data, the
/// configuration, or data owned by the request's context).
pub unsafe fn add_request_header_borrowed(
    r: &mut ngx_http_request_t,
    name: &HeaderName,
    value: &[u8],
) -> bool {
    let list = &mut r.headers_in.headers as *mut _;
    push_header(r, list, Key::Known(name), Value::Borrow(value)).is_some()
}

/// Adds a request header whose name is only known at run time (additionalHeaders); both
/// name and value are copied.
pub fn add_request_header_dyn(r: &mut ngx_http_request_t, name: &[u8], value: &[u8]) -> bool {
    let list = &mut r.headers_in.headers as *mut _;
    push_header(r, list, Key::Dynamic(name), Value::Copy(value)).is_some()
}

/// Adds a response header (the value is copied).
pub fn add_response_header(r: &mut ngx_http_request_t, name: &HeaderName, value: &[u8]) -> bool {
    let list = &mut r.headers_out.headers as *mut _;
    push_header(r, list, Key::Known(name), Value::Copy(value)).is_some()
}

/// Adds a response header whose name is only known at run time; both name and value are copied.
pub fn add_response_header_dyn(r: &mut ngx_http_request_t, name: &[u8], value: &[u8]) -> bool {
    let list = &mut r.headers_out.headers as *mut _;
    push_header(r, list, Key::Dynamic(name), Value::Copy(value)).is_some()
}

/// Removes every request header for which `doomed(name, value)` holds from the list the
/// upstream modules (proxy, fastcgi, uwsgi, scgi, grpc) copy headers from. Returns false when
/// memory ran out (some headers may then remain).
pub fn remove_request_headers(
    r: &mut ngx_http_request_t,
    doomed: impl Fn(&[u8], &[u8]) -> bool,
) -> bool {
    let list = &mut r.headers_in.headers;
    let mut found = Vec::new();
    let mut part: *mut ngx_list_part_t = &mut list.part;
    while !part.is_null() {
        // SAFETY: walks the parts of the request's header list.
        let p = unsafe { &*part };
        for i in 0..p.nelts {
            // SAFETY: `i` < nelts.
            let h = unsafe { &*(p.elts as *const ngx_table_elt_t).add(i) };
            if doomed(bytes_of(&h.key), bytes_of(&h.value)) {
                found.push((part, i));
            }
        }
        part = p.next;
    }
    // Highest index first within a part, so earlier indices stay valid.
    found.iter().rev().all(|&(part, i)| unlink_list_elt(list, part, i))
}

/// Unlinks element `i` of `part` from `list` without moving any element: nginx keeps typed
/// pointers (`headers_in.host`, `cookie`, ...) into the list's memory, so elements must stay
/// where they are. The part is shortened or split instead; when the last part changes,
/// `nalloc` is lowered so that the next `ngx_list_push` allocates a fresh part rather than
/// writing into memory that still holds live elements.
fn unlink_list_elt(list: &mut nginx_sys::ngx_list_t, part: *mut ngx_list_part_t, i: usize) -> bool {
    let first: *mut ngx_list_part_t = &mut list.part;
    // SAFETY: `part` is a live part of `list` and `i` < its nelts.
    let p = unsafe { &mut *part };
    let was_last = list.last == part;
    if p.nelts == 1 && part != first {
        // Drop the whole part; find its predecessor.
        let mut prev = first;
        // SAFETY: walking the list's parts.
        while unsafe { (*prev).next } != part {
            prev = unsafe { (*prev).next };
        }
        // SAFETY: `prev` precedes `part`.
        unsafe { (*prev).next = p.next };
        if was_last {
            list.last = prev;
        }
    } else if i == 0 {
        p.elts = (p.elts as *mut u8).wrapping_add(list.size) as *mut c_void;
        p.nelts -= 1;
    } else if i == p.nelts - 1 {
        p.nelts -= 1;
    } else {
        // SAFETY: allocates the new part from the request pool.
        let n =
            unsafe { ngx_palloc(list.pool, size_of::<ngx_list_part_t>()) } as *mut ngx_list_part_t;
        if n.is_null() {
            return false;
        }
        // SAFETY: `n` is a fresh allocation, fully initialised here.
        unsafe {
            (*n).elts = (p.elts as *mut u8).wrapping_add((i + 1) * list.size) as *mut c_void;
            (*n).nelts = p.nelts - i - 1;
            (*n).next = p.next;
        }
        p.nelts = i;
        p.next = n;
        if was_last {
            list.last = n;
        }
    }
    if list.last == part || was_last {
        // SAFETY: `list.last` is a live part.
        list.nalloc = unsafe { (*list.last).nelts }.max(1);
    }
    true
}

/// Removes cookie `name` from every `Cookie` header the upstream will see, writing the
/// shortened values into the request pool; a header left empty is removed.
pub fn remove_cookie_from_headers(r: &mut ngx_http_request_t, name: &[u8]) -> bool {
    let mut emptied = false;
    for elt in header_elts(&r.headers_in.headers) {
        // SAFETY: elements of the request's header list, modified in place.
        let h = unsafe { &mut *elt };
        if h.hash == 0 || !bytes_of(&h.key).eq_ignore_ascii_case(b"cookie") {
            continue;
        }
        let value = bytes_of(&h.value);
        // SAFETY: allocates from the request pool, freed with the request.
        let out = unsafe { ngx_pnalloc(r.pool, 2 * value.len() + 1) } as *mut u8;
        if out.is_null() {
            return false;
        }
        // SAFETY: `out` has room for 2 * value.len() bytes and is exclusively ours.
        let buf = unsafe { core::slice::from_raw_parts_mut(out, 2 * value.len()) };
        let Some(len) = authentik_core::cookie::remove_cookie_into(value, name, buf) else {
            continue;
        };
        emptied |= len == 0;
        h.value = ngx_str_t { len, data: out };
    }
    if !emptied {
        return true;
    }
    // A `Cookie` header left empty is removed (its element keeps the empty value for the
    // typed pointers nginx holds).
    remove_request_headers(r, |name, value| {
        value.is_empty() && name.eq_ignore_ascii_case(b"cookie")
    })
}

pub const LOCATION: HeaderName = HeaderName::new("Location", "location");
pub const SET_COOKIE: HeaderName = HeaderName::new("Set-Cookie", "set-cookie");
pub const CACHE_CONTROL: HeaderName = HeaderName::new("Cache-Control", "cache-control");
pub const WWW_AUTHENTICATE: HeaderName = HeaderName::new("WWW-Authenticate", "www-authenticate");

/// Sets `Location` (the caller then answers with a 3xx status).
pub fn set_location(r: &mut ngx_http_request_t, url: &str) -> bool {
    let list = &mut r.headers_out.headers as *mut _;
    let Some(elt) = push_header(r, list, Key::Known(&LOCATION), Value::Copy(url.as_bytes())) else {
        return false;
    };
    r.headers_out.location = elt;
    true
}

/// `https` when the connection is TLS, else `http`.
pub fn scheme(r: &ngx_http_request_t) -> &'static str {
    // SAFETY: the connection outlives the request.
    let c = unsafe { &*r.connection };
    if c.ssl.is_null() {
        "http"
    } else {
        "https"
    }
}

/// The `Host` header as the client sent it (nginx validated its syntax), else the server name
/// nginx selected; request memory, valid as long as the request.
pub fn host_bytes<'a>(r: &ngx_http_request_t) -> &'a [u8] {
    if r.headers_in.host.is_null() {
        return bytes_of(&r.headers_in.server);
    }
    // SAFETY: nginx's pointer to the request's Host header element, valid with the request.
    bytes_of(unsafe { &(*r.headers_in.host).value })
}

/// The request's `Host` with its port, as the client sent it, if it looks like a host;
/// otherwise the server name nginx selected.
pub fn host(r: &ngx_http_request_t) -> String {
    if let Some(h) = request_header(r, b"host") {
        let ok =
            !h.is_empty() && h.iter().all(|c| c.is_ascii_alphanumeric() || b".-:[]_".contains(c));
        if ok {
            return String::from_utf8_lossy(h).to_ascii_lowercase();
        }
    }
    String::from_utf8_lossy(bytes_of(&r.headers_in.server)).into_owned()
}

/// The host nginx routed the request on (the request line's host for an absolute-form target,
/// else the `Host` header; validated and lowercased by nginx), with the `Host` header's port
/// when that header names the same host. Never the client's `Host` alone when the request line
/// says otherwise.
pub fn routed_host(r: &ngx_http_request_t) -> String {
    let server = String::from_utf8_lossy(bytes_of(&r.headers_in.server)).to_ascii_lowercase();
    let Some(header) = request_header(r, b"host") else {
        return server;
    };
    let header = String::from_utf8_lossy(header).to_ascii_lowercase();
    match header.rsplit_once(':') {
        Some((name, port)) if name == server && port.bytes().all(|b| b.is_ascii_digit()) => header,
        _ => server,
    }
}
