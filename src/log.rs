//! Logging in nginx's phrasing: "<message> while <action>, client: ..., server: ...,
//! request: ...". One helper for every request-time message; it allocates nothing (the
//! message is formatted on the stack, and only when the level is enabled).

use core::ffi::CStr;
use core::fmt;

use nginx_sys::ngx_http_request_t;

/// What the module was doing; becomes the "while ..." part of the line.
pub mod action {
    use core::ffi::CStr;

    pub const ACCESS: &CStr = c"checking authentik session";
    pub const START_LOGIN: &CStr = c"starting authentik login";
    pub const DISCOVERY: &CStr = c"fetching authentik provider discovery";
    pub const CALLBACK: &CStr = c"completing authentik login";
    pub const REDEEM: &CStr = c"redeeming authentik login code";
    pub const VALIDATE: &CStr = c"validating authentik login tokens";
    pub const CREATE_SESSION: &CStr = c"creating authentik session";
    pub const SIGN_OUT: &CStr = c"signing out of authentik";
    pub const PROVIDER_CALL: &CStr = c"talking to the authentik provider";
    pub const HEADER_AUTH: &CStr = c"checking authorization header with authentik";
    pub const FORWARD_AUTH: &CStr = c"answering an authentik forward auth request";
    pub const AUTHORIZE: &CStr = c"checking authentik_require rules";
    pub const METRICS: &CStr = c"serving authentik metrics";
    pub const STORE: &CStr = c"reading the authentik session store";
}

/// Logs `args` at `level` on the request's connection log with `action` as its context.
pub fn request(
    r: &mut ngx_http_request_t,
    level: u32,
    action: &'static CStr,
    args: fmt::Arguments,
) {
    // SAFETY: the connection and its log outlive the request.
    let log = unsafe { &mut *(*r.connection).log };
    let saved = log.action;
    log.action = action.as_ptr() as *mut _;
    let logp: *mut nginx_sys::ngx_log_t = log;
    ngx::ngx_log_error!(level, logp, "{}", args);
    log.action = saved;
}

/// The message of a caught panic (`&str` or `String` payloads; "" for others), for the alert
/// that reports it.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// `log::request` with `format_args!`: `request_log!(r, NGX_LOG_ERR, action::CALLBACK, "...")`.
#[macro_export]
macro_rules! request_log {
    ($r:expr, $level:expr, $action:expr, $($arg:tt)+) => {
        $crate::log::request($r, $level as u32, $action, format_args!($($arg)+))
    };
}
