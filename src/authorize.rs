//! Authorization below the application: `authentik_require` rules, checked in the access
//! phase once the request is authenticated, and how the module's answers combine with nginx's
//! other access modules (`allow`/`deny`, `auth_basic`, `auth_request`) under `satisfy`.
//!
//! nginx runs the access handlers in reverse order of registration, and this module registers
//! last (it is loaded after nginx's own modules), so `access::access_handler` runs first:
//! identity headers forged by the client are removed whatever the other modules decide. Its
//! results, as nginx's access checker (`ngx_http_core_access_phase`) reads them:
//! - authenticated and every rule holds: `NGX_OK`. Under `satisfy all` the next access module
//!   decides too; under `satisfy any` access is granted and the other modules are skipped.
//! - `satisfy all`, anything else: the answer at once (the login redirect, `401`, the `403`
//!   page), as before.
//! - `satisfy any`, not authenticated or a rule fails: `401` or `403` and the decision is
//!   deferred: the other modules may still grant access (`allow`, valid Basic credentials). If
//!   none does, nginx reaches [`finish_handler`], registered to run after every other access
//!   handler, which gives the deferred answer: the login redirect for a page navigation, `401`
//!   otherwise, the `403` page for a rule. A module that grants access skips it.
//! - an unauthenticated path: `NGX_DECLINED`: the module does not restrict the request and the
//!   other modules decide as if it were not there.

use core::ffi::{c_char, c_void};
use core::ptr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use authentik_core::page::error_page;
use authentik_core::rules::{Credential, Denial, Rule, Rules, Subject};
use nginx_sys::{
    ngx_array_push, ngx_command_t, ngx_conf_t, ngx_http_handler_pt,
    ngx_http_phases_NGX_HTTP_ACCESS_PHASE, ngx_http_request_t, ngx_int_t, NGX_DECLINED,
    NGX_HTTP_FORBIDDEN, NGX_HTTP_LOC_CONF, NGX_HTTP_SATISFY_ANY, NGX_HTTP_UNAUTHORIZED,
    NGX_LOG_ALERT, NGX_LOG_INFO, NGX_OK,
};
use ngx::core::Status;
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

use crate::conf::LocationConf;
use crate::log::action;
use crate::metrics::{self, Outcome};
use crate::provider::{Provider, OUTPOST_PREFIX};
use crate::response::{self, INTERNAL_ERROR};
use crate::{ctx, http, login, request_log, HttpAuthentikModule};

/// `authentik_require` as written at one level: its rules, or `off`, and where.
#[derive(Clone, Default)]
pub struct Requirements {
    pub rules: Rules,
    /// `authentik_require off;`: no rule here, none inherited.
    pub off: bool,
    /// Written in a `location` block (not `server`/`http`), at `declared_at`.
    pub in_location: bool,
    pub declared_at: String,
}

/// What the access handler left for [`finish_handler`] under `satisfy any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// A page navigation without a session: the login redirect.
    Login { stale_cookie: bool },
    /// Not a navigation, no session: `401` (already carrying `WWW-Authenticate`).
    Unauthorized,
    /// Authenticated, but a rule does not hold.
    Forbidden(Credential),
}

/* the directive */

/// `authentik_require group NAME... | entitlement NAME... | claim CLAIM VALUE... | off;`
pub unsafe extern "C" fn cmd_require(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::conf::conf_guard(|| {
        // SAFETY: `conf` is this module's LocationConf for the current context.
        let (cf, lcf) = unsafe { (&mut *cf, &mut *(conf as *mut LocationConf)) };
        // SAFETY: cf.args is an array of ngx_str_t set up by the configuration parser.
        let raw = unsafe { (*cf.args).as_slice::<nginx_sys::ngx_str_t>() };
        let Ok(args) = raw[1..].iter().map(|a| a.to_str()).collect::<Result<Vec<&str>, _>>() else {
            return c"invalid value".as_ptr() as *mut c_char;
        };
        let own = lcf.own_requirements.get_or_insert_with(Requirements::default);
        if args == ["off"] {
            if !own.rules.is_empty() || own.off {
                return emerg(cf, "\"off\" cannot be combined with other \"authentik_require\"");
            }
            own.off = true;
        } else {
            if own.off {
                return emerg(cf, "\"off\" cannot be combined with other \"authentik_require\"");
            }
            match Rule::parse(&args) {
                Ok(rule) => own.rules.0.push(rule),
                Err(e) => return emerg(cf, &e.to_string()),
            }
        }
        own.in_location = cf.cmd_type & NGX_HTTP_LOC_CONF as usize != 0;
        own.declared_at = crate::conf::origin_of(cf);
        ptr::null_mut()
    })
}

fn emerg(cf: &mut ngx_conf_t, msg: &str) -> *mut c_char {
    ngx::ngx_conf_log_error!(nginx_sys::NGX_LOG_EMERG, cf as *mut ngx_conf_t, "{}", msg);
    crate::conf::conf_error()
}

/// Merging: an inner level with its own `authentik_require` replaces the outer level's rules
/// (like `allow`/`deny`). Rules written in a location where the module is off protect nothing:
/// that is a configuration error, not a silent pass.
pub fn merge(prev: &LocationConf, conf: &mut LocationConf, protected: bool) -> Result<(), String> {
    if let Some(own) = &conf.own_requirements {
        if own.in_location && !protected && !own.off {
            return Err(format!(
                "\"authentik_require\" in {} has no effect without \"auth_authentik\"",
                own.declared_at
            ));
        }
    } else {
        conf.own_requirements = prev.own_requirements.clone();
    }
    conf.rules = match &conf.own_requirements {
        Some(own) if !own.off => own.rules.clone(),
        _ => Rules::default(),
    };
    Ok(())
}

/* the access decision */

fn satisfy_any(r: &ngx_http_request_t) -> bool {
    NgxHttpCoreModule::location_conf(r)
        .is_some_and(|clcf| clcf.satisfy == NGX_HTTP_SATISFY_ANY as usize)
}

/// The authenticated request's rules: `NGX_OK` when they hold, else the `403` (deferred under
/// `satisfy any`). The session is the one in the request context. `again`: checked once more
/// after an internal redirect (a request passing twice is counted once).
pub fn authorized(
    r: &mut ngx_http_request_t,
    lcf: &LocationConf,
    provider: &Provider,
    credential: Credential,
    again: bool,
) -> ngx_int_t {
    let Some(failing) = failing_rule(r, &lcf.rules) else {
        if !again {
            metrics::request(provider, Outcome::for_credential(credential));
        }
        return NGX_OK as ngx_int_t;
    };
    if satisfy_any(r) {
        return defer(r, Deferred::Forbidden(credential));
    }
    deny(r, provider, &failing, credential)
}

/// The first rule the request's session does not satisfy (a copy, for the log line).
fn failing_rule(r: &mut ngx_http_request_t, rules: &Rules) -> Option<Rule> {
    if rules.is_empty() {
        return None;
    }
    let Some(session) = ctx::get(r).and_then(|ctx| ctx.session) else {
        // Not reached: authenticated requests carry their session.
        return rules.0.first().cloned();
    };
    let subject = Subject::new(&session);
    rules.first_failing(&subject).cloned()
}

/// No session: the login redirect (a navigation) or `401`, deferred under `satisfy any`.
pub fn unauthenticated(
    r: &mut ngx_http_request_t,
    navigation: bool,
    stale_cookie: bool,
) -> Option<ngx_int_t> {
    if !satisfy_any(r) {
        return None;
    }
    let deferred =
        if navigation { Deferred::Login { stale_cookie } } else { Deferred::Unauthorized };
    Some(defer(r, deferred))
}

fn defer(r: &mut ngx_http_request_t, deferred: Deferred) -> ngx_int_t {
    let Some(ctx) = ctx::get(r) else {
        return INTERNAL_ERROR;
    };
    ctx.deferred = Some(deferred);
    match deferred {
        Deferred::Forbidden(_) => NGX_HTTP_FORBIDDEN as ngx_int_t,
        _ => NGX_HTTP_UNAUTHORIZED as ngx_int_t,
    }
}

/// The answer to a request that fails `rule`: one `info` line, then the `403` page naming the
/// user with a sign-out link (a browser session) or nginx's plain `403` (header auth).
fn deny(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    rule: &Rule,
    credential: Credential,
) -> ngx_int_t {
    metrics::request(provider, Outcome::Forbidden);
    let user = ctx::get(r)
        .and_then(|ctx| ctx.session)
        .map(|s| String::from_utf8_lossy(s.values[0]).into_owned())
        .unwrap_or_default();
    let escaped = user.escape_default();
    request_log!(
        r,
        NGX_LOG_INFO,
        action::AUTHORIZE,
        "access forbidden by \"authentik_require {rule}\" for user \"{escaped}\""
    );
    match credential.denial() {
        Denial::Plain => {
            response::discard_body(r);
            NGX_HTTP_FORBIDDEN as ngx_int_t
        }
        Denial::Page => {
            let sign_out = format!("{}{OUTPOST_PREFIX}sign_out", provider.base_path);
            let shown =
                if user.is_empty() { "this account".to_string() } else { format!("\"{user}\"") };
            let message = format!("You are signed in as {shown}, which may not open this page.");
            let html = error_page("Access denied", &message, Some((&sign_out, "Sign out")));
            response::send_page(r, NGX_HTTP_FORBIDDEN as usize, &html)
        }
    }
}

/// Hides every `WWW-Authenticate` response header (nginx skips headers whose hash is 0, as its
/// access checker does when a module grants access under `satisfy any`).
fn drop_challenges(r: &mut ngx_http_request_t) {
    for header in http::header_elts(&r.headers_out.headers) {
        // SAFETY: live elements of the request's response header list.
        let header = unsafe { &mut *header };
        if http::bytes_of(&header.key).eq_ignore_ascii_case(http::WWW_AUTHENTICATE.name.as_bytes())
        {
            header.hash = 0;
        }
    }
}

/* the handler that runs after every other access handler */

/// Registers [`finish_handler`] first in the access phase's array: nginx runs that array from
/// its end, so it runs after every other module's access handler.
pub fn register_finish_handler(cf: &mut ngx_conf_t) -> Status {
    let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(cf) else {
        return Status::NGX_ERROR;
    };
    let handlers = &mut cmcf.phases[ngx_http_phases_NGX_HTTP_ACCESS_PHASE as usize].handlers;
    // SAFETY: appends a slot to nginx's array of access-phase handlers during
    // postconfiguration; the array's elements are `ngx_http_handler_pt`.
    let slot = unsafe { ngx_array_push(handlers) } as *mut ngx_http_handler_pt;
    if slot.is_null() {
        return Status::NGX_ERROR;
    }
    let elts = handlers.elts as *mut ngx_http_handler_pt;
    let len = handlers.nelts;
    // SAFETY: the array holds `len` handlers (the last one the fresh slot); moving the first
    // `len - 1` up by one stays inside it.
    unsafe {
        ptr::copy(elts, elts.add(1), len - 1);
        *elts = Some(finish_handler);
    }
    Status::NGX_OK
}

unsafe extern "C" fn finish_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed.
    let r = unsafe { &mut *r };
    match catch_unwind(AssertUnwindSafe(|| finish(&mut *r))) {
        Ok(rc) => rc,
        Err(_) => {
            request_log!(r, NGX_LOG_ALERT, action::ACCESS, "authentik access handler panicked");
            INTERNAL_ERROR
        }
    }
}

/// Reached under `satisfy any` when no access module granted the request (and under
/// `satisfy all` when all did): gives the answer the access handler deferred.
fn finish(r: &mut ngx_http_request_t) -> ngx_int_t {
    if !ptr::eq(r.main, r) {
        return NGX_DECLINED as ngx_int_t;
    }
    let Some(lcf) = HttpAuthentikModule::location_conf(r) else {
        return NGX_DECLINED as ngx_int_t;
    };
    let lcf: &LocationConf = lcf;
    let Some(ctx) = ctx::get(r) else {
        return NGX_DECLINED as ngx_int_t;
    };
    let provider: *const Provider = if !lcf.provider.is_null() {
        lcf.provider
    } else if lcf.target.is_some() && !ctx.chosen.is_null() {
        // An outpost provider (or `auto`'s choice): the one the access handler chose.
        ctx.chosen
    } else {
        return NGX_DECLINED as ngx_int_t;
    };
    // SAFETY: a block provider lives in the main configuration for the cycle's lifetime; an
    // outpost provider is held by the request context (`held`) until the request ends.
    let provider: &Provider = unsafe { &*provider };
    if !ctx.call.is_null() {
        // The deferred login waits for the provider's discovery document.
        return login::resume_call(r, provider);
    }
    let Some(deferred) = ctx.deferred.take() else {
        return NGX_DECLINED as ngx_int_t;
    };
    match deferred {
        Deferred::Login { stale_cookie } => {
            metrics::request(provider, Outcome::LoginRedirect);
            // The other modules' challenges (`auth_basic`'s) do not belong on a redirect.
            drop_challenges(r);
            let return_to = login::return_url(r, provider);
            login::start(r, provider, return_to, stale_cookie)
        }
        Deferred::Unauthorized => {
            metrics::request(provider, Outcome::Unauthorized);
            response::discard_body(r);
            NGX_HTTP_UNAUTHORIZED as ngx_int_t
        }
        Deferred::Forbidden(credential) => {
            let Some(rule) = failing_rule(r, &lcf.rules) else {
                return NGX_DECLINED as ngx_int_t;
            };
            deny(r, provider, &rule, credential)
        }
    }
}
