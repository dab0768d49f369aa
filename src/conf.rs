//! Directives: `authentik_session_zone`, the `authentik_provider NAME { ... }` block,
//! `auth_authentik`, `authentik_unauth_paths`; merging and cross-checks at configuration time so
//! that every mistake fails `nginx -t` with the file and line.

use core::ffi::{c_char, c_void};
use core::ptr;
use std::path::PathBuf;
use std::sync::Arc;

use authentik_core::provider::ProviderRuntime;

use authentik_core::config::{
    parse_cookie_domain, parse_http_url, Mode, ProviderSettings, DEFAULT_SCOPES,
};
use authentik_core::cookie::session_cookie_name;
use authentik_core::oidc::login::LOGIN_TTL;
use authentik_core::paths::UnauthPaths;
use nginx_sys::{
    ngx_command_t, ngx_conf_parse, ngx_conf_t, ngx_parse_size, ngx_parse_time, ngx_str_t,
    ngx_thread_pool_add, ngx_thread_pool_t, NGX_ERROR, NGX_LOG_EMERG,
};
use ngx::core::NGX_CONF_ERROR;
use ngx::http::HttpModuleMainConf;
use ngx::ngx_conf_log_error;
use url::Url;

use crate::call::CallState;
use crate::provider::Provider;
use crate::zone::SessionZone;
use crate::HttpAuthentikModule;

const CONF_OK: *mut c_char = ptr::null_mut();

fn conf_error() -> *mut c_char {
    NGX_CONF_ERROR as *mut c_char
}

/// Runs a configuration handler; a panic (a bug) fails the configuration instead of unwinding
/// into nginx.
fn conf_guard(f: impl FnOnce() -> *mut c_char) -> *mut c_char {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| conf_error())
}

/// Internal marker for "the error was already logged".
#[derive(Debug)]
pub struct ConfError;

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
    /// The provider protecting this location (null: off); set by merging.
    pub provider: *const Provider,
    /// Provider-wide plus server/location unauthenticated paths; set by merging.
    pub unauth: UnauthPaths,
}

/* helpers */

fn args<'a>(cf: &ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: cf.args is an array of ngx_str_t set up by the configuration parser.
    unsafe { (*cf.args).as_slice() }
}

fn arg_str(s: &ngx_str_t) -> Result<&str, ()> {
    s.to_str().map_err(|_| ())
}

macro_rules! emerg {
    ($cf:expr, $($arg:tt)+) => {{
        let cf: &mut ngx_conf_t = $cf;
        ngx_conf_log_error!(NGX_LOG_EMERG, cf as *mut ngx_conf_t, $($arg)+);
        conf_error()
    }};
}

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

/* authentik_session_zone zone=NAME:SIZE [timeout=TIME] [max_record=SIZE] */

/// Default of `max_record=`: the largest session record stored.
const DEFAULT_MAX_RECORD: usize = 16 * 1024;

pub unsafe extern "C" fn cmd_add_session_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: nginx passes a valid configuration context.
        let cf = unsafe { &mut *cf };
        let mut name = None;
        let mut size = 0usize;
        let mut timeout: i64 = 24 * 3600;
        let mut max_record = None;

        for arg in &args(cf)[1..] {
            let Ok(value) = arg_str(arg) else {
                return emerg!(cf, "invalid parameter \"{}\"", arg);
            };
            if let Some(zone) = value.strip_prefix("zone=") {
                let Some((zname, zsize)) = zone.rsplit_once(':') else {
                    return emerg!(cf, "invalid zone size in \"{}\"", value);
                };
                let mut s = ngx_str_t { len: zsize.len(), data: zsize.as_ptr() as *mut u8 };
                // SAFETY: `s` points at a live string.
                let parsed = unsafe { ngx_parse_size(&mut s) };
                if zname.is_empty() || parsed <= 0 {
                    return emerg!(cf, "invalid zone size in \"{}\"", value);
                }
                name = Some(zname.to_string());
                size = parsed as usize;
            } else if let Some(m) = value.strip_prefix("max_record=") {
                let mut s = ngx_str_t { len: m.len(), data: m.as_ptr() as *mut u8 };
                // SAFETY: `s` points at a live string.
                let parsed = unsafe { ngx_parse_size(&mut s) };
                if parsed < 1024 {
                    return emerg!(cf, "invalid max_record \"{}\", minimum is 1k", m);
                }
                max_record = Some(parsed as usize);
            } else if let Some(t) = value.strip_prefix("timeout=") {
                let mut s = ngx_str_t { len: t.len(), data: t.as_ptr() as *mut u8 };
                // SAFETY: `s` points at a live string.
                let parsed = unsafe { ngx_parse_time(&mut s, 1) };
                if parsed == NGX_ERROR as isize || parsed <= 0 {
                    return emerg!(cf, "invalid timeout \"{}\"", t);
                }
                timeout = parsed as i64;
            } else {
                return emerg!(cf, "invalid parameter \"{}\"", value);
            }
        }

        let Some(name) = name else {
            return emerg!(cf, "\"zone\" parameter is required");
        };
        // SAFETY: ngx_pagesize is set at startup.
        let min = 8 * unsafe { nginx_sys::ngx_pagesize };
        if size < min {
            return emerg!(cf, "zone \"{}\" is too small, minimum is {}k", name, min / 1024);
        }
        let max_record = max_record.unwrap_or(DEFAULT_MAX_RECORD.min(size / 8));
        if max_record > size / 8 {
            return emerg!(
                cf,
                "max_record={}k is too large for zone \"{}\", maximum is an eighth of the zone",
                max_record / 1024,
                name
            );
        }
        let mcf = main_conf(cf);
        if mcf.zones.iter().any(|z| z.name == name) {
            return emerg!(cf, "duplicate zone \"{}\"", name);
        }
        match SessionZone::add(cf, name, size, timeout, max_record) {
            Ok(zone) => {
                mcf.zones.push(zone);
                CONF_OK
            }
            Err(ConfError) => conf_error(),
        }
    })
}

/* authentik_provider NAME { ... } */

/// Collects the block's directives before the provider is validated as a whole.
#[derive(Default)]
struct ProviderBlock {
    issuer: Option<Url>,
    client_id: Option<String>,
    client_secret: Option<String>,
    external_host: Option<Url>,
    mode: Option<Mode>,
    cookie_domain: Option<String>,
    scopes: Option<Vec<String>>,
    unauth: Option<UnauthPaths>,
    session_zone: Option<String>,
    timeout_ms: Option<u64>,
    login_timeout: Option<i64>,
    ca_file: Option<PathBuf>,
    post_logout_redirect: Option<Url>,
    trusted_audiences: Option<Vec<String>>,
    max_pending_calls: Option<usize>,
}

pub unsafe extern "C" fn cmd_add_provider(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: nginx passes a valid configuration context.
        let cf = unsafe { &mut *cf };
        let Ok(name) = arg_str(&args(cf)[1]).map(str::to_string) else {
            return emerg!(cf, "invalid provider name");
        };
        if name.is_empty() || name == "off" {
            return emerg!(cf, "invalid provider name \"{}\"", name);
        }
        if main_conf(cf).providers.iter().any(|p| p.settings().name == name) {
            return emerg!(cf, "duplicate authentik_provider \"{}\"", name);
        }
        let origin = ConfOrigin::of(cf);

        let mut block = ProviderBlock::default();
        let saved = (cf.handler, cf.handler_conf);
        cf.handler = Some(provider_directive);
        cf.handler_conf = ptr::addr_of_mut!(block) as *mut c_void;
        // SAFETY: parses the block's contents with our handler; state restored below.
        let rv = unsafe { ngx_conf_parse(cf, ptr::null_mut()) };
        (cf.handler, cf.handler_conf) = saved;
        if !rv.is_null() {
            return rv;
        }

        match build_provider(cf, name, block, origin) {
            Ok(provider) => {
                main_conf(cf).providers.push(Box::new(provider));
                CONF_OK
            }
            Err(rv) => rv,
        }
    })
}

fn build_provider(
    cf: &mut ngx_conf_t,
    name: String,
    block: ProviderBlock,
    origin: ConfOrigin,
) -> Result<Provider, *mut c_char> {
    let Some(issuer) = block.issuer else {
        return Err(emerg!(cf, "\"issuer\" is missing in authentik_provider \"{}\"", name));
    };
    let Some(client_id) = block.client_id else {
        return Err(emerg!(cf, "\"client_id\" is missing in authentik_provider \"{}\"", name));
    };
    let Some(client_secret) = block.client_secret else {
        return Err(emerg!(
            cf,
            "\"client_secret\" or \"client_secret_file\" is missing in authentik_provider \"{}\"",
            name
        ));
    };
    let unauth = block.unauth.unwrap_or_default();

    let settings = ProviderSettings {
        name,
        issuer,
        client_id,
        client_secret,
        external_host: block.external_host,
        mode: block.mode.unwrap_or_default(),
        cookie_domain: block.cookie_domain,
        scopes: block
            .scopes
            .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()),
        timeout_ms: block.timeout_ms.unwrap_or(10_000),
        ca_file: block.ca_file,
        post_logout_redirect: block.post_logout_redirect,
        trusted_audiences: block.trusted_audiences.unwrap_or_default(),
    };
    if let Err(e) = settings.validate() {
        return Err(emerg!(cf, "authentik_provider \"{}\": {}", settings.name, e));
    }
    let base_path = settings
        .external_host
        .as_ref()
        .map_or("", |url| url.path().trim_end_matches('/'))
        .to_string();
    let key = provider_key(settings.issuer.as_str(), &settings.client_id);
    let cookie_name = session_cookie_name(&settings.client_id);
    let name = settings.name.clone();
    let runtime = ProviderRuntime::new(settings, unauth)
        .map_err(|e| emerg!(cf, "authentik_provider \"{}\": {}", name, e))?;
    let max_in_flight = block.max_pending_calls.unwrap_or(DEFAULT_MAX_PENDING_CALLS);
    Ok(Provider {
        runtime: Arc::new(runtime),
        cookie_name,
        login_timeout: block.login_timeout.unwrap_or(LOGIN_TTL),
        key,
        base_path,
        calls: CallState::new(max_in_flight),
        zone: ptr::null(),
        zone_name: block.session_zone,
        declared_at: origin.to_string(),
    })
}

/// Default of `max_pending_calls`: half of nginx's default thread pool (32 threads), so one
/// stalled provider leaves threads for the others.
const DEFAULT_MAX_PENDING_CALLS: usize = 16;

/// FNV-1a of `issuer NUL client_id`, folded to 32 bits.
fn provider_key(issuer: &str, client_id: &str) -> u32 {
    let bytes = issuer.bytes().chain([0]).chain(client_id.bytes());
    let h =
        bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (h ^ (h >> 32)) as u32
}

/// `cf->handler` for the directives inside `authentik_provider { }`.
unsafe extern "C" fn provider_directive(
    cf: *mut ngx_conf_t,
    _dummy: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: `conf` is the ProviderBlock installed by cmd_add_provider for this parse.
        let (cf, block) = unsafe { (&mut *cf, &mut *(conf as *mut ProviderBlock)) };
        let argv: Vec<String> = match args(cf).iter().map(arg_str).collect::<Result<Vec<_>, _>>() {
            Ok(v) => v.into_iter().map(str::to_string).collect(),
            Err(()) => return emerg!(cf, "invalid value"),
        };
        let name = argv[0].as_str();
        let values = &argv[1..];

        let one = |cf: &mut ngx_conf_t| -> Result<String, *mut c_char> {
            if values.len() != 1 {
                return Err(emerg!(cf, "invalid number of arguments in \"{}\" directive", name));
            }
            Ok(values[0].clone())
        };
        let many = |cf: &mut ngx_conf_t| -> Result<Vec<String>, *mut c_char> {
            if values.is_empty() {
                return Err(emerg!(cf, "invalid number of arguments in \"{}\" directive", name));
            }
            Ok(values.to_vec())
        };

        macro_rules! set_once {
            ($field:expr, $value:expr) => {{
                if $field.is_some() {
                    return emerg!(cf, "\"{}\" directive is duplicate", name);
                }
                match $value {
                    Ok(v) => $field = Some(v),
                    Err(rv) => return rv,
                }
            }};
        }

        let url = |cf: &mut ngx_conf_t| -> Result<Url, *mut c_char> {
            let value = one(cf)?;
            parse_http_url(&value).map_err(|e| emerg!(cf, "{}: {}", name, e))
        };
        let duration = |cf: &mut ngx_conf_t, seconds: bool| -> Result<i64, *mut c_char> {
            let value = one(cf)?;
            parse_time(&value, seconds).ok_or_else(|| emerg!(cf, "invalid {} \"{}\"", name, value))
        };

        match name {
            "issuer" => set_once!(block.issuer, url(cf)),
            "client_id" => set_once!(block.client_id, one(cf)),
            "client_secret" => set_once!(block.client_secret, one(cf)),
            "client_secret_file" => {
                let path = match one(cf) {
                    Ok(p) => conf_path(cf, &p),
                    Err(rv) => return rv,
                };
                let secret = match std::fs::read_to_string(&path) {
                    Ok(s) => s.trim_end_matches(['\r', '\n']).to_string(),
                    Err(e) => {
                        return emerg!(
                            cf,
                            "cannot read client_secret_file \"{}\": {}",
                            path.display(),
                            e
                        )
                    }
                };
                if secret.is_empty() {
                    return emerg!(cf, "client_secret_file \"{}\" is empty", path.display());
                }
                set_once!(block.client_secret, Ok::<_, *mut c_char>(secret))
            }
            "external_host" => set_once!(block.external_host, url(cf)),
            "mode" => {
                let value = match one(cf) {
                    Ok(v) => v,
                    Err(rv) => return rv,
                };
                let mode = Mode::parse(&value).map_err(|e| emerg!(cf, "{}", e));
                set_once!(block.mode, mode)
            }
            "cookie_domain" => {
                let value = match one(cf) {
                    Ok(v) => v,
                    Err(rv) => return rv,
                };
                let domain = parse_cookie_domain(&value).map_err(|e| emerg!(cf, "{}", e));
                set_once!(block.cookie_domain, domain)
            }
            "scopes" => set_once!(block.scopes, many(cf)),
            "unauth_paths" => {
                let paths = many(cf).and_then(|patterns| {
                    UnauthPaths::compile(&patterns).map_err(|e| emerg!(cf, "{}", e))
                });
                set_once!(block.unauth, paths)
            }
            "session_zone" => set_once!(block.session_zone, one(cf)),
            "timeout" => {
                set_once!(block.timeout_ms, duration(cf, false).map(|ms| ms as u64))
            }
            "login_timeout" => set_once!(block.login_timeout, duration(cf, true)),
            "ca_file" => {
                let path = match one(cf) {
                    Ok(p) => conf_path(cf, &p),
                    Err(rv) => return rv,
                };
                set_once!(block.ca_file, Ok::<_, *mut c_char>(path))
            }
            "post_logout_redirect" => set_once!(block.post_logout_redirect, url(cf)),
            "trusted_audiences" => set_once!(block.trusted_audiences, many(cf)),
            "max_pending_calls" => {
                let n = one(cf).and_then(|v| match v.parse::<usize>() {
                    Ok(n) if (1..=65536).contains(&n) => Ok(n),
                    _ => Err(emerg!(cf, "invalid max_pending_calls \"{}\"", v)),
                });
                set_once!(block.max_pending_calls, n)
            }
            _ => return emerg!(cf, "unknown directive \"{}\"", name),
        }
        CONF_OK
    })
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

/* init and merge */

pub unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: `conf` is the MainConf this module's create_main_conf returned.
        let (cf, conf) = unsafe { (&mut *cf, &mut *(conf as *mut MainConf)) };
        for provider in conf.providers.iter_mut() {
            let zone = match &provider.zone_name {
                Some(name) => conf.zones.iter().find(|z| &z.name == name),
                None if conf.zones.len() == 1 => conf.zones.first(),
                None => None,
            };
            let Some(zone) = zone else {
                let reason = match (&provider.zone_name, conf.zones.len()) {
                    (Some(name), _) => format!("unknown session zone \"{name}\""),
                    (None, 0) => "no \"authentik_session_zone\" is defined".to_string(),
                    (None, _) => {
                        "\"session_zone\" is required when several zones exist".to_string()
                    }
                };
                return emerg!(
                    cf,
                    "authentik_provider \"{}\" defined in {}: {}",
                    provider.settings().name,
                    provider.declared_at,
                    reason
                );
            };
            provider.zone = &**zone as *const SessionZone;
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
        if !conf.providers.is_empty() {
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
        let AuthSetting::Provider(name, origin) = &conf.auth else {
            conf.provider = ptr::null();
            return CONF_OK;
        };
        let Some(provider) = main_conf(cf).providers.iter().find(|p| &p.settings().name == name)
        else {
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
