//! Directives: `authentik_session_zone`, the `authentik_provider NAME { ... }` block,
//! `auth_authentik`, `authentik_unauth_paths`; merging and cross-checks at configuration time so
//! that every mistake fails `nginx -t` with the file and line.

use core::ffi::{c_char, c_void};
use core::ptr;
use std::path::PathBuf;

use authentik_core::paths::UnauthPaths;
use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_parse_time, ngx_str_t, ngx_thread_pool_add, ngx_thread_pool_t,
    NGX_ERROR, NGX_LOG_EMERG,
};
use ngx::core::NGX_CONF_ERROR;
use ngx::http::HttpModuleMainConf;

use crate::provider::Provider;
use crate::store::SessionZone;
use crate::HttpAuthentikModule;

const CONF_OK: *mut c_char = ptr::null_mut();

pub(crate) fn conf_error() -> *mut c_char {
    NGX_CONF_ERROR as *mut c_char
}

/// Runs a configuration handler; a panic (a bug) fails the configuration instead of unwinding
/// into nginx.
pub(crate) fn conf_guard(f: impl FnOnce() -> *mut c_char) -> *mut c_char {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| conf_error())
}

/* configuration types */

/// `http`-level state: the session zones and the providers.
#[derive(Default)]
pub struct MainConf {
    /// Boxed so that `shm_zone->data` can point at them for the cycle's lifetime.
    #[allow(clippy::vec_box)]
    pub zones: Vec<Box<SessionZone>>,
    /// Boxed so that location configurations can point at them.
    #[allow(clippy::vec_box)]
    pub providers: Vec<Box<Provider>>,
    /// nginx's `default` thread pool, used for every call to a provider.
    pub thread_pool: *mut ngx_thread_pool_t,
    /// `authentik_outpost`: providers fetched from authentik at run time.
    pub outpost: Option<Box<OutpostConf>>,
    /// The metrics zone, when some location has `authentik_metrics`.
    pub metrics: Option<Box<crate::metrics::MetricsZone>>,
}

/// Where a directive was written, for errors reported after the fact.
#[derive(Clone, Debug, Default)]
struct ConfOrigin {
    file: String,
    line: usize,
}

impl ConfOrigin {
    fn of(cf: &ngx_conf_t) -> ConfOrigin {
        if cf.conf_file.is_null() {
            return ConfOrigin::default();
        }
        // SAFETY: conf_file is valid while a configuration file is being parsed.
        let file = unsafe { &*cf.conf_file };
        ConfOrigin { file: file.file.name.to_string(), line: file.line }
    }
}

impl core::fmt::Display for ConfOrigin {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A provider named by `auth_authentik` that only authentik's API knows, found per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutpostTarget {
    /// The application slug or provider name.
    Named(String),
    /// `auto`: the provider whose external host (or forward_domain cookie domain) the request's
    /// host is on.
    Auto,
}

#[derive(Clone, Default)]
enum AuthSetting {
    #[default]
    Unset,
    Off,
    Provider(String, ConfOrigin),
}

/// `server`/`location`-level state.
#[derive(Default)]
pub struct LocationConf {
    auth: AuthSetting,
    own_unauth: Option<UnauthPaths>,
    /// The provider protecting this location (null: off or `target`); set by merging.
    pub provider: *const Provider,
    /// Set by merging when the provider is chosen per request (outpost providers, `auto`).
    pub target: Option<OutpostTarget>,
    /// This location's own unauthenticated paths (added to a per-request provider's).
    pub own_unauth_paths: UnauthPaths,
    /// Provider-wide plus server/location unauthenticated paths; set by merging.
    pub unauth: UnauthPaths,
    /// `authentik_require` at this level, or inherited; see `authorize`.
    pub own_requirements: Option<crate::authorize::Requirements>,
    /// The rules every authenticated request here must satisfy; set by merging.
    pub rules: authentik_core::rules::Rules,
}

/// `file:line` of the directive being parsed, for errors reported when merging.
pub(crate) fn origin_of(cf: &ngx_conf_t) -> String {
    ConfOrigin::of(cf).to_string()
}

/* helpers */

fn args<'a>(cf: &ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: cf.args is an array of ngx_str_t set up by the configuration parser.
    unsafe { (*cf.args).as_slice() }
}

fn arg_str(s: &ngx_str_t) -> Result<&str, ()> {
    s.to_str().map_err(|_| ())
}

/// Logs an `emerg` configuration error with the file and line; evaluates to NGX_CONF_ERROR.
macro_rules! emerg {
    ($cf:expr, $($arg:tt)+) => {{
        let cf: &mut ::nginx_sys::ngx_conf_t = $cf;
        ::ngx::ngx_conf_log_error!(
            ::nginx_sys::NGX_LOG_EMERG,
            cf as *mut ::nginx_sys::ngx_conf_t,
            $($arg)+
        );
        $crate::conf::conf_error()
    }};
}

mod outpost;
mod provider_block;
mod session_zone;

pub use outpost::{cmd_set_outpost, OutpostConf};
pub use provider_block::{cmd_add_provider, provider_key};
pub use session_zone::cmd_add_session_zone;

fn main_conf(cf: &ngx_conf_t) -> &'static mut MainConf {
    HttpAuthentikModule::main_conf_mut(cf).expect("authentik main conf")
}

/// A positive nginx time value (`10s`, `5m`, `1h30m`) in seconds or milliseconds.
fn parse_time(value: &str, seconds: bool) -> Option<i64> {
    let mut s = ngx_str_t { len: value.len(), data: value.as_ptr() as *mut u8 };
    // SAFETY: `s` points at a live string that nginx only reads.
    let parsed = unsafe { ngx_parse_time(&mut s, seconds as _) };
    (parsed != NGX_ERROR as isize && parsed > 0).then_some(parsed as i64)
}

/// Absolute path of a file named in the configuration, relative to nginx's prefix like nginx does.
fn conf_path(cf: &ngx_conf_t, name: &str) -> PathBuf {
    let path = PathBuf::from(name);
    if path.is_absolute() {
        return path;
    }
    // SAFETY: the cycle is valid during configuration parsing.
    let prefix = unsafe { (*cf.cycle).conf_prefix };
    PathBuf::from(prefix.to_string()).join(path)
}

/* auth_authentik NAME | off */

pub unsafe extern "C" fn cmd_set_auth(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: `conf` is this module's LocationConf for the current context.
        let (cf, lcf) = unsafe { (&mut *cf, &mut *(conf as *mut LocationConf)) };
        if !matches!(lcf.auth, AuthSetting::Unset) {
            return c"is duplicate".as_ptr() as *mut c_char;
        }
        let Ok(value) = arg_str(&args(cf)[1]) else {
            return c"invalid value".as_ptr() as *mut c_char;
        };
        lcf.auth = if value == "off" {
            AuthSetting::Off
        } else {
            AuthSetting::Provider(value.to_string(), ConfOrigin::of(cf))
        };
        CONF_OK
    })
}

/* authentik_unauth_paths REGEX ... */

pub unsafe extern "C" fn cmd_add_unauth_paths(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: `conf` is this module's LocationConf for the current context.
        let (cf, lcf) = unsafe { (&mut *cf, &mut *(conf as *mut LocationConf)) };
        let patterns: Vec<String> = args(cf)[1..].iter().map(|a| a.to_string()).collect();
        let paths = match UnauthPaths::compile(&patterns) {
            Ok(p) => p,
            Err(e) => return emerg!(cf, "{}", e),
        };
        lcf.own_unauth = Some(match lcf.own_unauth.take() {
            Some(existing) => existing.extend(&paths),
            None => paths,
        });
        CONF_OK
    })
}

/// Logs an `emerg` error whose message names the directive's own `file:line` (found when
/// merging, when nginx's position is elsewhere); evaluates to NGX_CONF_ERROR.
fn emerg_at_origin(cf: &ngx_conf_t, msg: &str) -> *mut c_char {
    let cmsg = std::ffi::CString::new(msg).unwrap_or_default();
    // SAFETY: logs a formatted message with the configuration's log.
    unsafe {
        nginx_sys::ngx_log_error_core(
            NGX_LOG_EMERG as usize,
            cf.log,
            0,
            c"%s".as_ptr(),
            cmsg.as_ptr(),
        )
    };
    conf_error()
}

/* init and merge */

const SEVERAL_ZONES: &str = "\"session_zone\" is required when several zones exist";
const SEVERAL_ZONES_OUTPOST: &str = "\"session_zone=\" is required when several zones exist";

/// The session zone a provider or the outpost names, else the only one; why not, in `nginx -t`'s
/// words (`several`: what to say when several zones exist and none is named).
#[allow(clippy::vec_box)]
fn session_zone_named(
    zones: &[Box<SessionZone>],
    name: Option<&str>,
    several: &str,
) -> Result<*const SessionZone, String> {
    let zone = match name {
        Some(name) => zones.iter().find(|z| z.name == name),
        None if zones.len() == 1 => zones.first(),
        None => None,
    };
    match (zone, name, zones.len()) {
        (Some(zone), _, _) => Ok(&**zone as *const SessionZone),
        (None, Some(name), _) => Err(format!("unknown session zone \"{name}\"")),
        (None, None, 0) => Err("no \"authentik_session_zone\" is defined".to_string()),
        (None, None, _) => Err(several.to_string()),
    }
}

pub unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: `conf` is the MainConf this module's create_main_conf returned.
        let (cf, conf) = unsafe { (&mut *cf, &mut *(conf as *mut MainConf)) };
        for provider in conf.providers.iter_mut() {
            let zone =
                session_zone_named(&conf.zones, provider.zone_name.as_deref(), SEVERAL_ZONES);
            let zone = match zone {
                Ok(zone) => zone,
                Err(reason) => {
                    return emerg!(
                        cf,
                        "authentik_provider \"{}\" defined in {}: {}",
                        provider.settings().name,
                        provider.declared_at,
                        reason
                    );
                }
            };
            provider.zone = zone;
        }
        // Sessions are bound to (issuer, client_id) by a 32-bit key: two different pairs on one
        // zone must not share a key.
        for (i, a) in conf.providers.iter().enumerate() {
            let same_app = |b: &Provider| {
                a.settings().issuer == b.settings().issuer
                    && a.settings().client_id == b.settings().client_id
            };
            let clash = conf.providers[..i]
                .iter()
                .find(|b| b.zone == a.zone && b.key == a.key && !same_app(b));
            if let Some(b) = clash {
                return emerg!(
                    cf,
                    "authentik_providers \"{}\" and \"{}\" cannot share a session zone, \
                     give one of them another \"session_zone\"",
                    b.settings().name,
                    a.settings().name
                );
            }
        }
        if let Some(outpost) = conf.outpost.as_mut() {
            let zone = session_zone_named(
                &conf.zones,
                outpost.zone_name.as_deref(),
                SEVERAL_ZONES_OUTPOST,
            );
            match zone {
                Ok(zone) => outpost.session_zone = zone,
                Err(reason) => {
                    return emerg!(
                        cf,
                        "authentik_outpost defined in {}: {}",
                        outpost.declared_at,
                        reason
                    );
                }
            }
        }
        // Background work (and its heartbeat zone) exists wherever sessions do.
        if !conf.zones.is_empty() && !crate::background::add_zone(cf).is_ok() {
            return conf_error();
        }
        if !conf.providers.is_empty() || conf.outpost.is_some() {
            // SAFETY: registers (or finds) nginx's "default" thread pool during configuration.
            conf.thread_pool = unsafe { ngx_thread_pool_add(cf, ptr::null_mut()) };
            if conf.thread_pool.is_null() {
                return conf_error();
            }
        }
        CONF_OK
    })
}

pub unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: both pointers are LocationConf values created by create_loc_conf.
        let (cf, prev, conf) = unsafe {
            (&mut *cf, &*(prev as *const LocationConf), &mut *(conf as *mut LocationConf))
        };
        if matches!(conf.auth, AuthSetting::Unset) {
            conf.auth = prev.auth.clone();
        }
        if conf.own_unauth.is_none() {
            conf.own_unauth = prev.own_unauth.clone();
        }
        conf.target = None;
        conf.own_unauth_paths = conf.own_unauth.clone().unwrap_or_default();
        let protected = matches!(conf.auth, AuthSetting::Provider(..));
        if let Err(msg) = crate::authorize::merge(prev, conf, protected) {
            return emerg_at_origin(cf, &msg);
        }
        let AuthSetting::Provider(name, origin) = &conf.auth else {
            conf.provider = ptr::null();
            return CONF_OK;
        };
        let mcf = main_conf(cf);
        let Some(provider) = mcf.providers.iter().find(|p| &p.settings().name == name) else {
            if name == "auto" {
                conf.provider = ptr::null();
                conf.target = Some(OutpostTarget::Auto);
                return CONF_OK;
            }
            if mcf.outpost.is_some() {
                conf.provider = ptr::null();
                conf.target = Some(OutpostTarget::Named(name.clone()));
                return CONF_OK;
            }
            // Reported with the directive's own position, like nginx does for unknown references.
            let msg = format!("unknown authentik_provider \"{name}\" in {origin}");
            let cmsg = std::ffi::CString::new(msg).unwrap_or_default();
            // SAFETY: logs a formatted message with the configuration's log.
            unsafe {
                nginx_sys::ngx_log_error_core(
                    NGX_LOG_EMERG as usize,
                    cf.log,
                    0,
                    c"%s".as_ptr(),
                    cmsg.as_ptr(),
                )
            };
            return conf_error();
        };
        conf.provider = &**provider as *const Provider;
        conf.unauth = match &conf.own_unauth {
            Some(own) => provider.runtime.unauth.extend(own),
            None => provider.runtime.unauth.clone(),
        };
        CONF_OK
    })
}
