//! Calls to the identity provider, run on nginx's thread pool.
//!
//! Why a thread pool: the provider's answers (discovery, token, JWKS, userinfo) are needed
//! only at login, a few times per user per day, while the event loop serves every other
//! request. A blocking client on nginx's own `thread_pool` keeps the event loop free without
//! reimplementing an HTTP/TLS client on nginx connections, and a stalled provider only ties up
//! pool threads. The request waits suspended (`r->main->blocked`), exactly like nginx's
//! `aio threads` file reads; when the work is done, the completion event runs the phase
//! handlers again and the access handler picks up the outcome.

use core::ffi::c_void;
use core::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use authentik_core::config::ProviderSettings;
use authentik_core::oidc::discovery::Discovery;
use authentik_core::oidc::{
    complete_login, LoginError, MetadataCache, PendingLogin, ProviderClient, ProviderError,
};
use authentik_core::session::SessionRecord;
use nginx_sys::{
    ngx_event_t, ngx_http_request_t, ngx_http_run_posted_requests, ngx_log_t, ngx_pool_cleanup_add,
    ngx_thread_pool_t, ngx_thread_task_alloc, ngx_thread_task_post, NGX_OK,
};

use crate::conf::Provider;

/// What to do off the event loop.
pub enum Work {
    /// Make sure a fresh discovery document is cached.
    Discovery,
    /// Redeem an authorization code and build the session record.
    Login { login: PendingLogin, code: String, max_lifetime: i64 },
}

/// The result, handed back to the access handler.
pub enum Outcome {
    Discovery(Result<Arc<Discovery>, ProviderError>),
    Login(Result<Box<SessionRecord>, LoginError>),
    /// The work panicked (a bug); the panic was contained in the thread. Its message.
    Panicked(String),
}

/// Owned by the request (freed by a pool cleanup); the thread fills `outcome`.
pub struct TaskData {
    work: Work,
    settings: Arc<ProviderSettings>,
    cache: Arc<MetadataCache>,
    client: ProviderClient,
    outcome: Option<Outcome>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TaskData {
    fn run(&mut self) -> Outcome {
        let now = unix_now();
        match &self.work {
            Work::Discovery => {
                Outcome::Discovery(self.cache.discovery(&self.client, &self.settings, now))
            }
            Work::Login { login, code, max_lifetime } => Outcome::Login(
                complete_login(
                    &self.settings,
                    &self.cache,
                    &self.client,
                    login,
                    code,
                    *max_lifetime,
                    now,
                )
                .map(Box::new),
            ),
        }
    }
}

/// Posts `work` to the thread pool and suspends the request. On success the access handler
/// must return `NGX_AGAIN`; `on_done` is the completion handler that resumes it.
pub fn post(
    r: &mut ngx_http_request_t,
    pool: *mut ngx_thread_pool_t,
    provider: &Provider,
    work: Work,
    slot: &mut *mut TaskData,
) -> bool {
    let data = Box::into_raw(Box::new(TaskData {
        work,
        settings: provider.settings.clone(),
        cache: provider.cache.clone(),
        client: provider.client.clone(),
        outcome: None,
    }));
    // SAFETY: the cleanup frees `data` with the request pool, i.e. after the task completed
    // (a blocked request is never freed while its task runs).
    unsafe {
        let cln = ngx_pool_cleanup_add(r.pool, 0);
        if cln.is_null() {
            drop(Box::from_raw(data));
            return false;
        }
        (*cln).handler = Some(free_task_data);
        (*cln).data = data as *mut c_void;
    }
    *slot = data;

    // SAFETY: allocates and posts an nginx thread task; its context holds the data pointer.
    unsafe {
        let task = ngx_thread_task_alloc(r.pool, size_of::<*mut TaskData>());
        if task.is_null() {
            return false;
        }
        *((*task).ctx as *mut *mut TaskData) = data;
        (*task).handler = Some(run_task);
        (*task).event.data = r as *mut ngx_http_request_t as *mut c_void;
        (*task).event.handler = Some(task_done);
        if ngx_thread_task_post(pool, task) != NGX_OK as isize {
            return false;
        }
        let main = &mut *r.main;
        main.set_blocked(main.blocked() + 1);
        r.set_aio(1);
    }
    true
}

/// Takes the outcome of a finished task.
pub fn take_outcome(data: *mut TaskData) -> Option<Outcome> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the task has completed (we are on the event loop after `task_done`).
    unsafe { (*data).outcome.take() }
}

unsafe extern "C" fn free_task_data(data: *mut c_void) {
    // SAFETY: `data` is the Box leaked in `post`.
    drop(unsafe { Box::from_raw(data as *mut TaskData) });
}

/// Runs on a pool thread: no nginx calls here.
unsafe extern "C" fn run_task(ctx: *mut c_void, _log: *mut ngx_log_t) {
    // SAFETY: `ctx` holds the TaskData pointer written in `post`; only this thread touches it
    // until the completion event.
    let data = unsafe { &mut **(ctx as *mut *mut TaskData) };
    let outcome = catch_unwind(AssertUnwindSafe(|| data.run())).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Outcome::Panicked(msg)
    });
    data.outcome = Some(outcome);
}

/// Completion event on the worker's event loop: resume the request's phase handlers.
unsafe extern "C" fn task_done(ev: *mut ngx_event_t) {
    // SAFETY: event data is the request that posted the task; it is alive (blocked).
    let r = unsafe { &mut *((*ev).data as *mut ngx_http_request_t) };
    let c = r.connection;
    // SAFETY: undoes the suspension done in `post`.
    unsafe {
        let main = &mut *r.main;
        main.set_blocked(main.blocked() - 1);
        r.set_aio(0);
    }
    if let Some(ctx) = crate::handler::ctx_get(r) {
        ctx.task_finished = true;
    }
    if let Some(handler) = r.write_event_handler {
        // SAFETY: during the phases the write handler is ngx_http_core_run_phases.
        unsafe { handler(r) };
    }
    // SAFETY: the connection outlives this call.
    unsafe { ngx_http_run_posted_requests(c) };
}
