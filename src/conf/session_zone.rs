//! `authentik_session_zone zone=NAME:SIZE [timeout=TIME] [max_record=SIZE] [store=URL
//! [store_password_file=FILE] [store_prefix=PREFIX] [store_timeout=TIME]]`.

use core::ffi::{c_char, c_void};

use nginx_sys::{ngx_command_t, ngx_conf_t, ngx_parse_size, ngx_parse_time, ngx_str_t, NGX_ERROR};

use super::{arg_str, args, conf_error, conf_guard, main_conf, CONF_OK};
use std::time::Duration;

use authentik_core::remote::{RemoteStore, StoreSettings};

use crate::store::{Remote, SessionZone, SharedZoneError};

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
        let mut timeout_given = false;
        let mut max_record = None;
        let mut store = StoreArgs::default();

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
                timeout_given = true;
            } else if let Some(parsed) = store.parse(value) {
                if let Err(msg) = parsed {
                    return emerg!(cf, "{}", msg);
                }
            } else {
                return emerg!(cf, "invalid parameter \"{}\"", value);
            }
        }
        let remote = match store.build(cf) {
            Ok(remote) => remote,
            Err(msg) => return emerg!(cf, "{}", msg),
        };

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
            Ok(mut zone) => {
                zone.timeout_given = timeout_given;
                zone.remote = remote;
                mcf.zones.push(zone);
                CONF_OK
            }
            Err(e @ SharedZoneError::Duplicate(_)) => emerg!(cf, "{}", e),
            // ngx_shared_memory_add() has logged why.
            Err(SharedZoneError::NotAdded(_)) => conf_error(),
        }
    })
}

/// The `store*=` parameters, until the whole directive is read.
#[derive(Default)]
struct StoreArgs {
    url: Option<String>,
    password_file: Option<String>,
    prefix: Option<String>,
    timeout_ms: Option<u64>,
}

/// Default `store_timeout=`.
const DEFAULT_STORE_TIMEOUT_MS: u64 = 200;

impl StoreArgs {
    /// `None` when `value` is not a store parameter.
    fn parse(&mut self, value: &str) -> Option<Result<(), String>> {
        if let Some(url) = value.strip_prefix("store=") {
            self.url = Some(url.to_string());
        } else if let Some(file) = value.strip_prefix("store_password_file=") {
            self.password_file = Some(file.to_string());
        } else if let Some(prefix) = value.strip_prefix("store_prefix=") {
            self.prefix = Some(prefix.to_string());
        } else if let Some(t) = value.strip_prefix("store_timeout=") {
            let mut s = ngx_str_t { len: t.len(), data: t.as_ptr() as *mut u8 };
            // SAFETY: `s` points at a live string.
            let parsed = unsafe { ngx_parse_time(&mut s, 0) };
            if parsed == NGX_ERROR as isize || parsed <= 0 {
                return Some(Err(format!("invalid store_timeout \"{t}\"")));
            }
            self.timeout_ms = Some(parsed as u64);
        } else {
            return None;
        }
        Some(Ok(()))
    }

    /// The store client, when `store=` is given. The password file is read here, once, at
    /// configuration time (relative to the prefix, like nginx's files); its content is never
    /// logged.
    fn build(self, cf: &mut ngx_conf_t) -> Result<Remote, String> {
        let Some(url) = self.url else {
            if self.password_file.is_some() || self.prefix.is_some() || self.timeout_ms.is_some() {
                return Err("\"store_*\" parameters need \"store=\"".to_string());
            }
            return Ok(None);
        };
        let password = match &self.password_file {
            Some(file) => Some(read_password(cf, file)?),
            None => None,
        };
        let timeout = Duration::from_millis(self.timeout_ms.unwrap_or(DEFAULT_STORE_TIMEOUT_MS));
        let prefix = self.prefix.as_deref().unwrap_or("authentik:");
        let settings =
            StoreSettings::parse(&url, password, prefix, timeout).map_err(|e| e.to_string())?;
        let shown = settings.display_url();
        let store = RemoteStore::new(settings).map_err(|e| format!("store {shown}: {e}"))?;
        Ok(Some(store))
    }
}

fn read_password(cf: &mut ngx_conf_t, file: &str) -> Result<String, String> {
    let path = super::conf_path(cf, file);
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("cannot read store_password_file \"{}\": {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("store_password_file \"{}\" is not UTF-8", path.display()))?;
    let password = text.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        return Err(format!("store_password_file \"{}\" is empty", path.display()));
    }
    Ok(password)
}
