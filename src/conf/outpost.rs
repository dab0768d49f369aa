//! `authentik_outpost URL token_file=PATH [browser_url=URL] [ca_file=PATH] [refresh=TIME]
//! [state_file=PATH] [session_zone=NAME] [timeout=TIME]`: nginx as the authentik outpost the
//! token belongs to. Everything is checked here (the token file is read now, so `nginx -t`
//! reports a missing one); nothing contacts authentik at configuration time.

use core::ffi::{c_char, c_void};
use core::ptr;
use std::path::PathBuf;
use std::time::Duration;

use authentik_core::config::parse_http_url;
use authentik_core::outpost::OutpostOptions;
use nginx_sys::{ngx_command_t, ngx_conf_t, ngx_shm_zone_t};
use url::Url;

use super::{arg_str, args, conf_guard, conf_path, main_conf, parse_time, CONF_OK};
use crate::outpost::zone;
use crate::store::SessionZone;

/// The outpost as configured, in the main configuration.
pub struct OutpostConf {
    pub options: OutpostOptions,
    pub state_file: Option<PathBuf>,
    /// `session_zone=`, until resolved.
    pub zone_name: Option<String>,
    /// Where the outpost's providers keep sessions; set when the `http` block is complete.
    pub session_zone: *const SessionZone,
    /// The `authentik_outpost` shared zone (configuration fetched from authentik).
    pub shm_zone: *mut ngx_shm_zone_t,
    pub declared_at: String,
}

/// Default time each call to authentik may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub unsafe extern "C" fn cmd_set_outpost(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: nginx passes a valid configuration context.
        let cf = unsafe { &mut *cf };
        match parse(cf) {
            Ok(outpost) => {
                main_conf(cf).outpost = Some(Box::new(outpost));
                CONF_OK
            }
            Err(msg) => emerg!(cf, "{}", msg),
        }
    })
}

fn parse(cf: &mut ngx_conf_t) -> Result<OutpostConf, String> {
    if main_conf(cf).outpost.is_some() {
        return Err("\"authentik_outpost\" directive is duplicate".to_owned());
    }
    let a = args(cf);
    let raw_url = arg_str(&a[1]).map_err(|_| "invalid URL".to_owned())?;
    let url = outpost_url(raw_url)?;
    let mut token_file = None;
    let mut browser_url = None;
    let mut ca_file = None;
    let mut refresh = None;
    let mut state_file = None;
    let mut zone_name = None;
    let mut timeout = DEFAULT_TIMEOUT;
    for arg in &a[2..] {
        let value = arg_str(arg).map_err(|_| format!("invalid parameter \"{arg}\""))?;
        let (key, v) = value.split_once('=').unwrap_or((value, ""));
        if v.is_empty() {
            return Err(format!("invalid parameter \"{value}\""));
        }
        match key {
            "token_file" => token_file = Some(conf_path(cf, v)),
            "browser_url" => browser_url = Some(outpost_url(v)?),
            "ca_file" => ca_file = Some(conf_path(cf, v)),
            "state_file" => state_file = Some(conf_path(cf, v)),
            "session_zone" => zone_name = Some(v.to_owned()),
            "refresh" => {
                let s = parse_time(v, true).ok_or_else(|| format!("invalid refresh \"{v}\""))?;
                refresh = Some(Duration::from_secs(s as u64));
            }
            "timeout" => {
                let ms = parse_time(v, false).ok_or_else(|| format!("invalid timeout \"{v}\""))?;
                timeout = Duration::from_millis(ms as u64);
            }
            _ => return Err(format!("invalid parameter \"{value}\"")),
        }
    }
    let Some(token_file) = token_file else {
        return Err("\"token_file\" parameter is required".to_owned());
    };
    // The token is a secret: messages name the file, never its contents.
    let token = std::fs::read_to_string(&token_file)
        .map_err(|e| format!("cannot read token_file \"{}\": {}", token_file.display(), e))?;
    let token = token.trim().to_owned();
    if token.is_empty() || token.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("token_file \"{}\" does not hold one token", token_file.display()));
    }
    if let Some(ca) = &ca_file {
        std::fs::metadata(ca)
            .map_err(|e| format!("cannot read ca_file \"{}\": {}", ca.display(), e))?;
    }
    // SAFETY: the cycle is valid during configuration parsing; nginx set its hostname.
    let hostname = unsafe { (*cf.cycle).hostname }.to_string();
    let shm_zone = zone::add(cf);
    if shm_zone.is_null() {
        return Err("cannot add the \"authentik_outpost\" shared memory zone".to_owned());
    }
    let options = OutpostOptions { url, token, browser_url, ca_file, refresh, timeout, hostname };
    Ok(OutpostConf {
        options,
        state_file,
        zone_name,
        session_zone: ptr::null(),
        shm_zone,
        declared_at: super::ConfOrigin::of(cf).to_string(),
    })
}

/// An http(s) URL without query or fragment; its path gets a trailing `/` (authentik's API
/// and websocket live under it).
fn outpost_url(s: &str) -> Result<Url, String> {
    let mut url = parse_http_url(s).map_err(|e| e.to_string())?;
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}
