// nginx-authentik: an nginx dynamic module that makes nginx an authentik outpost.
//
// This file only wires nginx hooks to the modules that do the work:
// - `conf`: directives, the `authentik_provider {}` block, configuration merging;
// - `provider`: one provider at run time (shared runtime object, zone, this worker's calls);
// - `outpost`: providers fetched from authentik (`authentik_outpost`): their shared zone and
//   this worker's table of them;
// - `store`: the session store in shared memory (sessions and pending logins);
// - `access`: the access-phase handler, the access decision for every request;
// - `authorize`: `authentik_require` rules and how the access decision meets `satisfy`;
// - `metrics`: counters in shared memory, `authentik_metrics` (Prometheus text format);
// - `headers`: which client headers are removed, which identity headers are set;
// - `header_auth`: `Authorization: Bearer|Basic` checked with the provider, cached in the zone;
// - `router`: the `/outpost.goauthentik.io/*` endpoints;
// - `login`: the login round trip (start, callback, new session, sign-out);
// - `call`: calls to the identity provider on nginx's thread pool;
// - `session`: the request's session cookie and its lookup in the zone;
// - `ctx`: the request context between passes through the access phase;
// - `response`: redirects, pages and cookies the module sends itself;
// - `http`: helpers over nginx's header lists;
// - `log`: error_log lines in nginx's phrasing;
// - `background`: long-lived work on a thread of worker 0 (the heartbeat, the link to
//   authentik), results in shared memory;
// - `variables`: `$authentik_*` variables.
// The protocol logic lives in the FFI-free `authentik-core` crate.

use core::ffi::{c_char, c_void};
use core::ptr;

use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_str_t, ngx_uint_t,
    NGX_CONF_1MORE, NGX_CONF_2MORE, NGX_CONF_BLOCK, NGX_CONF_NOARGS, NGX_CONF_TAKE1,
    NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET,
    NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF,
};
use ngx::core::Status;
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf};

mod access;
mod authorize;
mod background;
mod call;
mod conf;
mod ctx;
mod forward;
mod header_auth;
mod headers;
mod http;
mod log;
mod login;
mod metrics;
mod outpost;
mod provider;
mod remote;
mod response;
mod router;
mod session;
mod store;
mod variables;

use conf::{LocationConf, MainConf};

/// The module's type for ngx-rust's configuration traits.
pub struct HttpAuthentikModule;

impl HttpModule for HttpAuthentikModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only mutated by nginx while loading the module.
        unsafe { &*ptr::addr_of!(ngx_http_authentik_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx passes a valid configuration context.
        let cf = unsafe { &mut *cf };
        variables::register(cf).into()
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx passes a valid configuration context.
        let cf = unsafe { &mut *cf };
        if !access::register_handler(cf).is_ok() {
            return Status::NGX_ERROR.into();
        }
        authorize::register_finish_handler(cf).into()
    }
}

// SAFETY: the main configuration of this module is always a `MainConf`.
unsafe impl HttpModuleMainConf for HttpAuthentikModule {
    type MainConf = MainConf;
}

// SAFETY: the location configuration of this module is always a `LocationConf`.
unsafe impl HttpModuleLocationConf for HttpAuthentikModule {
    type LocationConf = LocationConf;
}

static NGX_HTTP_AUTHENTIK_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(HttpAuthentikModule::preconfiguration),
    postconfiguration: Some(HttpAuthentikModule::postconfiguration),
    create_main_conf: Some(HttpAuthentikModule::create_main_conf),
    init_main_conf: Some(conf::init_main_conf),
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(HttpAuthentikModule::create_loc_conf),
    merge_loc_conf: Some(conf::merge_loc_conf),
};

/// An `ngx_command_t`; `name` must end with a NUL byte because nginx compares directive names
/// with `strcmp()`.
const fn command(
    name: &'static str,
    type_: u32,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
    conf: usize,
) -> ngx_command_t {
    ngx_command_t {
        name: ngx_str_t { len: name.len() - 1, data: name.as_ptr() as *mut u8 },
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf: conf as ngx_uint_t,
        offset: 0,
        post: ptr::null_mut(),
    }
}

static mut NGX_HTTP_AUTHENTIK_COMMANDS: [ngx_command_t; 8] = [
    command(
        "authentik_session_zone\0",
        NGX_HTTP_MAIN_CONF | NGX_CONF_1MORE,
        conf::cmd_add_session_zone,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        "authentik_provider\0",
        NGX_HTTP_MAIN_CONF | NGX_CONF_BLOCK | NGX_CONF_TAKE1,
        conf::cmd_add_provider,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        "authentik_outpost\0",
        NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
        conf::cmd_set_outpost,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        "auth_authentik\0",
        NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
        conf::cmd_set_auth,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        "authentik_unauth_paths\0",
        NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_1MORE,
        conf::cmd_add_unauth_paths,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        "authentik_require\0",
        NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_1MORE,
        authorize::cmd_require,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        "authentik_metrics\0",
        NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        metrics::cmd_metrics,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    ngx_command_t::empty(),
];

#[no_mangle]
#[used]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_authentik_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_AUTHENTIK_MODULE_CTX) as *mut c_void,
    // SAFETY: takes the address of the static commands array; nothing is read or written here.
    commands: unsafe { ptr::addr_of_mut!(NGX_HTTP_AUTHENTIK_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_process: Some(background::init_process),
    exit_process: Some(background::exit_process),
    ..ngx_module_t::default()
};

ngx::ngx_modules!(ngx_http_authentik_module);
