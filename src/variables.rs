//! `$authentik_username`, `$authentik_groups`, `$authentik_entitlements`, `$authentik_email`,
//! `$authentik_name`, `$authentik_uid`, `$authentik_jwt` and `$authentik_claim_<name>`.
//! Empty (not found) until the access phase has authenticated the request.
//! `$authentik_backend`, `$authentik_host_header`: the session's `ak_proxy.backend_override`
//! and `ak_proxy.host_header` (checked at login).
//! `$authentik_background_heartbeat`: the background heartbeat, in any phase (background.rs).
//! `$authentik_outpost_status`: `<generation> <unix time of the last fetch> <websocket 0|1>`
//! of the `authentik_outpost` configuration, in any phase (outpost/zone.rs).

use std::panic::{catch_unwind, AssertUnwindSafe};

use nginx_sys::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_int_t, ngx_str_t,
    ngx_variable_value_t, NGX_HTTP_VAR_NOCACHEABLE, NGX_HTTP_VAR_PREFIX, NGX_OK,
};
use ngx::core::Status;

use authentik_core::identity::{claim_at, BACKEND_OVERRIDE, HOST_HEADER, IDENTITY_FIELDS};

use ngx::http::HttpModuleMainConf;

use crate::{ctx, http, HttpAuthentikModule};

const CLAIM_PREFIX: &str = "authentik_claim_";
const HEARTBEAT_VARIABLE: &str = "authentik_background_heartbeat";
const OUTPOST_VARIABLE: &str = "authentik_outpost_status";
/// `ak_proxy.backend_override` and `ak_proxy.host_header` of the session.
const PROXY_VARIABLES: [(&str, &str); 2] =
    [("authentik_backend", BACKEND_OVERRIDE), ("authentik_host_header", HOST_HEADER)];

pub fn register(cf: &mut ngx_conf_t) -> Status {
    for (index, field) in IDENTITY_FIELDS.iter().enumerate() {
        if !add(cf, field.variable, NGX_HTTP_VAR_NOCACHEABLE, identity_variable, index) {
            return Status::NGX_ERROR;
        }
    }
    let flags = NGX_HTTP_VAR_NOCACHEABLE | NGX_HTTP_VAR_PREFIX;
    if !add(cf, CLAIM_PREFIX, flags, claim_variable, 0) {
        return Status::NGX_ERROR;
    }
    if !add(cf, HEARTBEAT_VARIABLE, NGX_HTTP_VAR_NOCACHEABLE, heartbeat_variable, 0) {
        return Status::NGX_ERROR;
    }
    if !add(cf, OUTPOST_VARIABLE, NGX_HTTP_VAR_NOCACHEABLE, outpost_variable, 0) {
        return Status::NGX_ERROR;
    }
    for (index, (name, _)) in PROXY_VARIABLES.iter().enumerate() {
        if !add(cf, name, NGX_HTTP_VAR_NOCACHEABLE, proxy_variable, index) {
            return Status::NGX_ERROR;
        }
    }
    Status::NGX_OK
}

type GetHandler =
    unsafe extern "C" fn(*mut ngx_http_request_t, *mut ngx_variable_value_t, usize) -> ngx_int_t;

fn add(cf: &mut ngx_conf_t, name: &'static str, flags: u32, get: GetHandler, data: usize) -> bool {
    let mut name = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: registers a variable during preconfiguration; nginx copies the name.
    let v = unsafe { ngx_http_add_variable(cf, &mut name, flags as _) };
    if v.is_null() {
        return false;
    }
    // SAFETY: `v` is the variable nginx just registered.
    unsafe {
        (*v).get_handler = Some(get);
        (*v).data = data;
    }
    true
}

fn set_value(v: &mut ngx_variable_value_t, value: Option<ngx_str_t>) {
    match value {
        Some(s) => {
            v.set_len(s.len as u32);
            v.data = s.data;
            v.set_valid(1);
            v.set_no_cacheable(0);
            v.set_not_found(0);
        }
        None => v.set_not_found(1),
    }
}

unsafe extern "C" fn identity_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes the request and a value slot to fill.
    let (r, v) = unsafe { (&mut *r, &mut *v) };
    let value = catch_unwind(AssertUnwindSafe(|| {
        let ctx = ctx::get(r)?;
        let record = ctx.session.as_ref()?;
        let value = record.values.get(data)?;
        // Points into the session's bytes in the request pool.
        Some(ngx_str_t { len: value.len(), data: value.as_ptr() as *mut u8 })
    }));
    set_value(v, value.ok().flatten());
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn claim_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: for prefix variables nginx passes a pointer to the full variable name as data.
    let (r, v, name) = unsafe { (&mut *r, &mut *v, &*(data as *const ngx_str_t)) };
    let value = catch_unwind(AssertUnwindSafe(|| {
        let claim = http::bytes_of(name).strip_prefix(CLAIM_PREFIX.as_bytes())?;
        let claim = core::str::from_utf8(claim).ok()?;
        let ctx = ctx::get(r)?;
        let value = ctx.session.as_ref()?.claim(claim)?;
        http::pool_str(r, value.as_bytes())
    }));
    set_value(v, value.ok().flatten());
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn heartbeat_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes the request and a value slot to fill.
    let (r, v) = unsafe { (&mut *r, &mut *v) };
    let value = catch_unwind(AssertUnwindSafe(|| {
        http::pool_str(r, crate::background::heartbeat_value()?.as_bytes())
    }));
    set_value(v, value.ok().flatten());
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn outpost_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes the request and a value slot to fill.
    let (r, v) = unsafe { (&mut *r, &mut *v) };
    let value = catch_unwind(AssertUnwindSafe(|| {
        let mcf: &crate::conf::MainConf = HttpAuthentikModule::main_conf(r)?;
        let zone = crate::outpost::zone::OutpostZone::of(mcf.outpost.as_ref()?.shm_zone)?;
        let status =
            format!("{} {} {}", zone.generation(), zone.fetched_at(), zone.connected() as u8);
        http::pool_str(r, status.as_bytes())
    }));
    set_value(v, value.ok().flatten());
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn proxy_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes the request and a value slot to fill.
    let (r, v) = unsafe { (&mut *r, &mut *v) };
    let value = catch_unwind(AssertUnwindSafe(|| {
        let (_, pointer) = PROXY_VARIABLES.get(data)?;
        let ctx = ctx::get(r)?;
        let value = claim_at(ctx.session.as_ref()?.claims_json, pointer)?;
        http::pool_str(r, value.as_bytes())
    }));
    set_value(v, value.ok().flatten());
    NGX_OK as ngx_int_t
}
