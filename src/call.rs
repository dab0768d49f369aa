//! Calls to the identity provider, run on nginx's thread pool.
//!
//! Why a thread pool: the provider's answers (discovery, token, JWKS, userinfo) are needed
//! only at login, a few times per user per day, while the event loop serves every other
//! request. A blocking client on nginx's own `thread_pool` keeps the event loop free without
//! reimplementing an HTTP/TLS client on nginx connections, and a stalled provider only ties up
//! pool threads, and only as many as `max_pending_calls` allows per provider and worker.
//!
//! One [`Call`] is one round trip: the work and what the request does with its result, in one
//! value, so impossible pairs cannot be written. The call is a heap object shared by the
//! request (through its context) and the thread pool's completion event; whichever of the two
//! ends last frees it. The request is not `blocked` while it waits: when its client goes away
//! nginx frees it at once (`ngx_http_test_reading` watches the connection), and the completion
//! event then only frees the call.
//!
//! Lookups in the shared session store (`store=`) are calls too: an L1 miss
//! (`StoreSession`) and a callback whose login started on another node (`StoreLogin`); their
//! deadline is `store_timeout`.
//!
//! Discovery is single-flight per provider and worker: while one fetch is in flight, other
//! requests that need the document wait on the event loop (no thread each) and are woken when
//! it ends; after a failure the metadata cache answers fast for a few seconds.

use core::ffi::c_void;
use core::ptr;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

use authentik_core::oidc::header_auth::{self, Credentials, HeaderAuthError};
use authentik_core::oidc::{LoginError, PendingLogin, ProviderError};
use authentik_core::provider::ProviderRuntime;
use authentik_core::remote::{RemoteStore, StoreError, StoredSession};
use authentik_core::session::{SessionId, SessionRecord};
use nginx_sys::{
    ngx_event_t, ngx_http_block_reading, ngx_http_request_t, ngx_http_run_posted_requests,
    ngx_http_test_reading, ngx_log_t, ngx_pool_cleanup_add, ngx_thread_pool_t,
    ngx_thread_task_post, ngx_thread_task_t, NGX_OK,
};

use crate::provider::Provider;
use crate::remote::SessionWrite;

/// Requests that may wait for one provider's discovery fetch in one worker; beyond, 503.
pub const MAX_DISCOVERY_WAITERS: usize = 256;

/// What the request does once the provider's discovery document is known (or known to be
/// unavailable).
pub enum AfterDiscovery {
    StartLogin { return_to: String, stale_cookie: bool },
    SignOut { id_token: Option<String> },
}

/// One provider round trip and its result. A new kind of provider call is one new variant
/// here and one arm in `run`.
pub enum Call {
    /// Fetch the discovery document into the metadata cache, then continue. A waiter (not
    /// posted, woken by the fetch in flight) has `result: None` when it ends.
    Discovery { then: AfterDiscovery, result: Option<Result<(), ProviderError>> },
    /// Redeem an authorization code and build the session record, then create the session.
    Login {
        login: Box<PendingLogin>,
        code: String,
        max_lifetime: i64,
        login_cookie: String,
        result: Option<Result<Box<SessionRecord>, LoginError>>,
        /// With a shared store, the new session is written there too (see `remote`).
        store_write: Option<Box<SessionWrite>>,
    },
    /// Look a session cookie that missed the zone up in the shared store.
    StoreSession {
        store: Arc<RemoteStore>,
        id: SessionId,
        result: Option<Result<Option<StoredSession>, StoreError>>,
    },
    /// Take a pending login that is not in the zone from the shared store (a callback on
    /// another node than the start), then go on with the callback.
    StoreLogin {
        store: Arc<RemoteStore>,
        state: String,
        code: Option<String>,
        error: Option<String>,
        result: Option<Result<Option<Vec<u8>>, StoreError>>,
    },
    /// Check an `Authorization` header with the provider (introspection, or authentik's app
    /// password grant), then cache the answer under `cache_id` and continue.
    HeaderAuth {
        credentials: Credentials,
        cache_id: SessionId,
        result: Option<Result<Box<SessionRecord>, HeaderAuthError>>,
    },
}

/// Why a call could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("too many calls to the identity provider are in progress")]
    Busy,
    #[error("cannot post a task to the thread pool")]
    Post,
    #[error("out of memory")]
    NoMemory,
}

/// Per-worker state of one provider's calls (the provider's configuration is copied into every
/// worker by fork, so this is never shared between processes).
#[derive(Default)]
pub struct CallState {
    /// Calls this worker may have on the thread pool at once (`max_pending_calls`).
    max_in_flight: usize,
    /// Calls posted to the thread pool and not yet completed.
    in_flight: Cell<usize>,
    /// A discovery fetch is in flight; these calls wait for it.
    discovery_waiters: RefCell<Option<Vec<*mut CallHandle>>>,
    /// Header authentications in flight, by cache id, with the calls waiting for each: many
    /// requests with the same `Authorization` (a cache entry that just expired) make one call.
    header_waiters: RefCell<Vec<([u8; 32], Vec<*mut CallHandle>)>>,
}

/// The heap object behind a call: nginx's thread task and the call, shared by the request and
/// the completion event.
pub struct CallHandle {
    task: ngx_thread_task_t,
    /// The suspended request; null once it has been freed.
    request: *mut ngx_http_request_t,
    runtime: Arc<ProviderRuntime>,
    /// The provider's `CallState`: in the configuration as long as the worker, or in an
    /// outpost provider that `keep` holds.
    state: *const CallState,
    /// An outpost provider (reference-counted, see `outpost`) kept alive while the call is,
    /// even after its request is gone and a new configuration replaced it. Only held.
    #[allow(dead_code)]
    keep: Option<Rc<Provider>>,
    call: Option<Call>,
    /// The thread panicked (a bug); its message. Set before the completion event.
    panicked: Option<String>,
    /// The completion event ran (or a waiter was woken).
    finished: bool,
    /// Counted in `CallState::in_flight`.
    posted: bool,
}

/// How a finished call ended, for the request.
pub enum Finished {
    Done(Call),
    Panicked(String),
}

impl CallHandle {
    /// Whether the call has ended; until then the request stays suspended even if nginx runs
    /// its phase handlers again (a write event on the connection does that).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The ended call, taken once.
    pub fn take(&mut self) -> Option<Finished> {
        if let Some(msg) = self.panicked.take() {
            self.call = None;
            return Some(Finished::Panicked(msg));
        }
        self.call.take().map(Finished::Done)
    }
}

/// Starts `call` for `r` against `runtime`: posts it to `pool`, or, for a discovery while one
/// is in flight, queues it behind that fetch. On success the access handler returns
/// `NGX_AGAIN`; the handle is the request's until its call ends.
pub fn start(
    r: &mut ngx_http_request_t,
    pool: *mut ngx_thread_pool_t,
    runtime: &Arc<ProviderRuntime>,
    state: &CallState,
    keep: Option<Rc<Provider>>,
    call: Call,
) -> Result<*mut CallHandle, CallError> {
    let header_key = header_key(&call);
    let wait = match header_key {
        Some(key) => state.header_in_flight(&key),
        None => matches!(call, Call::Discovery { .. }) && state.discovery_in_flight(),
    };
    let waiting = match header_key {
        Some(key) => state.header_waiter_count(&key),
        None => state.waiter_count(),
    };
    if wait && waiting >= MAX_DISCOVERY_WAITERS {
        return Err(CallError::Busy);
    }
    if !wait && state.in_flight.get() >= state.max_in_flight {
        return Err(CallError::Busy);
    }
    let handle = new_handle(r, runtime, state, keep, call)?;
    if wait {
        match header_key {
            Some(key) => state.push_header_waiter(&key, handle),
            None => state.push_waiter(handle),
        }
    } else {
        // SAFETY: `handle` is live; on failure the request's cleanup frees it (not finished,
        // so mark it finished first: nothing else will complete it).
        if let Err(e) = unsafe { post(handle, pool) } {
            // SAFETY: the handle was never posted; the cleanup frees it with the request.
            unsafe { (*handle).finished = true };
            return Err(e);
        }
    }
    suspend(r);
    Ok(handle)
}

impl CallState {
    /// No calls yet; at most `max_in_flight` on the thread pool at once.
    pub fn new(max_in_flight: usize) -> CallState {
        CallState { max_in_flight, ..CallState::default() }
    }

    fn discovery_in_flight(&self) -> bool {
        self.discovery_waiters.borrow().is_some()
    }
    fn waiter_count(&self) -> usize {
        self.discovery_waiters.borrow().as_ref().map_or(0, Vec::len)
    }
    fn push_waiter(&self, handle: *mut CallHandle) {
        if let Some(waiters) = self.discovery_waiters.borrow_mut().as_mut() {
            waiters.push(handle);
        }
    }
    fn header_in_flight(&self, key: &[u8; 32]) -> bool {
        self.header_waiters.borrow().iter().any(|(k, _)| k == key)
    }
    fn header_waiter_count(&self, key: &[u8; 32]) -> usize {
        self.header_waiters.borrow().iter().find(|(k, _)| k == key).map_or(0, |(_, w)| w.len())
    }
    fn push_header_waiter(&self, key: &[u8; 32], handle: *mut CallHandle) {
        if let Some((_, waiters)) =
            self.header_waiters.borrow_mut().iter_mut().find(|(k, _)| k == key)
        {
            waiters.push(handle);
        }
    }
}

/// The cache id of a header authentication (its single-flight key).
fn header_key(call: &Call) -> Option<[u8; 32]> {
    match call {
        Call::HeaderAuth { cache_id, .. } => Some(cache_id.0),
        _ => None,
    }
}

fn new_handle(
    r: &mut ngx_http_request_t,
    runtime: &Arc<ProviderRuntime>,
    state: &CallState,
    keep: Option<Rc<Provider>>,
    call: Call,
) -> Result<*mut CallHandle, CallError> {
    // SAFETY: a zeroed ngx_thread_task_t is what ngx_thread_task_alloc() hands out.
    let task: ngx_thread_task_t = unsafe { core::mem::zeroed() };
    let handle = Box::into_raw(Box::new(CallHandle {
        task,
        request: r,
        runtime: runtime.clone(),
        state,
        keep,
        call: Some(call),
        panicked: None,
        finished: false,
        posted: false,
    }));
    // SAFETY: registers the request side's release of the handle with the request pool.
    let cln = unsafe { ngx_pool_cleanup_add(r.pool, 0) };
    if cln.is_null() {
        // SAFETY: nothing else knows the handle yet.
        drop(unsafe { Box::from_raw(handle) });
        return Err(CallError::NoMemory);
    }
    // SAFETY: `cln` is a fresh cleanup entry of the request pool.
    unsafe {
        (*cln).handler = Some(request_gone);
        (*cln).data = handle as *mut c_void;
    }
    Ok(handle)
}

/// # Safety
/// `handle` is a live handle that was not posted yet.
unsafe fn post(handle: *mut CallHandle, pool: *mut ngx_thread_pool_t) -> Result<(), CallError> {
    // SAFETY: the caller guarantees `handle` is live.
    let h = unsafe { &mut *handle };
    // SAFETY: the state lives in the configuration as long as the worker.
    let state = unsafe { &*h.state };
    h.task.ctx = handle as *mut c_void;
    h.task.handler = Some(run_in_thread);
    h.task.event.data = handle as *mut c_void;
    h.task.event.handler = Some(completed);
    if matches!(h.call, Some(Call::Discovery { .. })) {
        *state.discovery_waiters.borrow_mut() = Some(Vec::new());
    }
    let key = h.call.as_ref().and_then(header_key);
    if let Some(key) = key {
        state.header_waiters.borrow_mut().push((key, Vec::new()));
    }
    // SAFETY: posts the handle's own task; it stays allocated until the completion event.
    if unsafe { ngx_thread_task_post(pool, &mut h.task) } != NGX_OK as isize {
        if matches!(h.call, Some(Call::Discovery { .. })) {
            wake_waiters(state);
        }
        if let Some(key) = key {
            wake_header_waiters(state, &key);
        }
        return Err(CallError::Post);
    }
    h.posted = true;
    state.in_flight.set(state.in_flight.get() + 1);
    Ok(())
}

/// While suspended, a closed client connection finalizes (and frees) the request.
fn suspend(r: &mut ngx_http_request_t) {
    r.read_event_handler = Some(ngx_http_test_reading);
}

/// Runs on a pool thread: no nginx calls here.
unsafe extern "C" fn run_in_thread(ctx: *mut c_void, _log: *mut ngx_log_t) {
    // SAFETY: `ctx` is the handle; until the completion event only this thread touches its
    // call (the event loop reads `request`/`finished` only, which the thread never touches).
    let handle = unsafe { &mut *(ctx as *mut CallHandle) };
    let runtime = &handle.runtime;
    let Some(call) = handle.call.as_mut() else { return };
    let ran = catch_unwind(AssertUnwindSafe(|| run(runtime, call)));
    if let Err(panic) = ran {
        let msg = crate::log::panic_message(&*panic);
        handle.panicked = Some(msg);
    }
}

fn run(runtime: &ProviderRuntime, call: &mut Call) {
    let now = unix_now();
    match call {
        Call::Discovery { result, .. } => {
            *result = Some(runtime.fetch_discovery(now).map(drop));
        }
        Call::Login { login, code, max_lifetime, result, store_write, .. } => {
            let record = runtime.complete_login(login, code, *max_lifetime, now);
            if let (Ok(record), Some(write)) = (&record, store_write.as_mut()) {
                write.run(record, now);
            }
            *result = Some(record.map(Box::new));
        }
        Call::HeaderAuth { credentials, result, .. } => {
            let record = header_auth::authenticate(runtime.context(), credentials, now);
            *result = Some(record.map(Box::new));
        }
        Call::StoreSession { store, id, result } => *result = Some(store.get_session(&id.0)),
        Call::StoreLogin { store, state, result, .. } => *result = Some(store.take_login(state)),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Completion event on the worker's event loop.
unsafe extern "C" fn completed(ev: *mut ngx_event_t) {
    // SAFETY: the event's data is the handle posted in `post`.
    let handle = unsafe { (*ev).data as *mut CallHandle };
    let (state, was_discovery, key, _keep) = {
        // SAFETY: the handle is live until both sides are done with it.
        let h = unsafe { &mut *handle };
        // SAFETY: the state lives in the configuration as long as the worker, or in the
        // outpost provider `keep` holds (held here until the waiters are woken).
        let state = unsafe { &*h.state };
        if h.posted {
            h.posted = false;
            state.in_flight.set(state.in_flight.get().saturating_sub(1));
        }
        let key = h.call.as_ref().and_then(header_key);
        (state, matches!(h.call, Some(Call::Discovery { .. })), key, h.keep.clone())
    };
    // SAFETY: `handle` is live; `finish` may free it.
    unsafe { finish(handle) };
    if was_discovery {
        wake_waiters(state);
    }
    if let Some(key) = key {
        wake_header_waiters(state, &key);
    }
}

/// Wakes the requests waiting for the header authentication of `key`: they find its answer
/// in the zone's cache.
fn wake_header_waiters(state: &CallState, key: &[u8; 32]) {
    let waiters = {
        let mut all = state.header_waiters.borrow_mut();
        match all.iter().position(|(k, _)| k == key) {
            Some(i) => all.swap_remove(i).1,
            None => Vec::new(),
        }
    };
    for handle in waiters {
        // SAFETY: waiters stay allocated until woken (see `request_gone`).
        unsafe { finish(handle) };
    }
}

/// Wakes every request waiting for the provider's discovery fetch.
fn wake_waiters(state: &CallState) {
    let waiters = state.discovery_waiters.borrow_mut().take().unwrap_or_default();
    for handle in waiters {
        // SAFETY: waiters stay allocated until woken (see `request_gone`).
        unsafe { finish(handle) };
    }
}

/// Marks the call finished and resumes its request, or frees the call if the request is gone.
///
/// # Safety
/// `handle` is live; it may be freed here.
unsafe fn finish(handle: *mut CallHandle) {
    // SAFETY: the caller guarantees `handle` is live.
    let h = unsafe { &mut *handle };
    h.finished = true;
    if h.request.is_null() {
        // SAFETY: the request already released its side; this was the last owner.
        drop(unsafe { Box::from_raw(handle) });
        return;
    }
    // SAFETY: `request` is non-null, so the request is alive (its cleanup nulls it).
    let r = unsafe { &mut *h.request };
    let c = r.connection;
    r.read_event_handler = Some(ngx_http_block_reading);
    if let Some(handler) = r.write_event_handler {
        // SAFETY: during the phases the write handler is ngx_http_core_run_phases.
        unsafe { handler(r) };
    }
    // SAFETY: the connection outlives this call.
    unsafe { ngx_http_run_posted_requests(c) };
}

/// Request pool cleanup: the request side lets go of the handle.
unsafe extern "C" fn request_gone(data: *mut c_void) {
    let handle = data as *mut CallHandle;
    // SAFETY: the handle is live until both sides are done with it.
    let h = unsafe { &mut *handle };
    if h.finished {
        // SAFETY: the call ended; this was the last owner.
        drop(unsafe { Box::from_raw(handle) });
        return;
    }
    // Still running in a thread or waiting for a fetch: the completion frees it.
    h.request = ptr::null_mut();
}
