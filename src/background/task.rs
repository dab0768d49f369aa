//! The thread side of a background task: what a task's thread and worker 0's event loop share
//! (stop flag, condvar, queued log messages, how it ended), the task's `Context`, and the
//! spawn with nginx's signals blocked.

use core::ffi::c_int;
use core::ptr;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nginx_sys::{
    pthread_sigmask, sigdelset, sigfillset, sigset_t, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_NOTICE,
    NGX_LOG_WARN, SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIG_BLOCK, SIG_SETMASK,
};

/// Messages a task may queue between two supervisor ticks; more are counted and dropped.
const MAX_QUEUED_MESSAGES: usize = 64;

/// The level of a message a task queues for the error log.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // Alert is for the tasks to come.
pub enum Level {
    Notice,
    Warn,
    Error,
    Alert,
}

impl Level {
    pub(super) fn ngx(self) -> u32 {
        match self {
            Level::Notice => NGX_LOG_NOTICE,
            Level::Warn => NGX_LOG_WARN,
            Level::Error => NGX_LOG_ERR,
            Level::Alert => NGX_LOG_ALERT,
        }
    }
}

/// What a task's thread and the event loop share.
#[derive(Default)]
pub(super) struct State {
    pub(super) stop: bool,
    pub(super) finished: bool,
    pub(super) panicked: Option<String>,
    pub(super) messages: VecDeque<(Level, String)>,
    pub(super) dropped: usize,
}

#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    pub(super) wake: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Never held across code that can panic; a poisoned lock still holds valid data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn request_stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    /// Waits until the thread has finished or `deadline` passes; whether it finished.
    pub(super) fn wait_finished(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while !st.finished {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.wake.wait_timeout(st, deadline - now) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// A running task's view of its supervisor.
pub struct Context {
    shared: Arc<Shared>,
}

impl Context {
    /// Whether the task has been asked to stop.
    pub fn stopping(&self) -> bool {
        self.shared.lock().stop
    }

    /// Sleeps for `d`, or less if the task is asked to stop; `true` if the task should go on.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = self.shared.lock();
        loop {
            if st.stop {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            st = match self.shared.wake.wait_timeout(st, deadline - now) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Queues a message for the error log (written by the event loop within a second).
    pub fn log(&self, level: Level, message: String) {
        let mut st = self.shared.lock();
        if st.messages.len() < MAX_QUEUED_MESSAGES {
            st.messages.push_back((level, message));
        } else {
            st.dropped += 1;
        }
    }
}

/// A task: its name (in logs), its body, run once on a thread of its own, and what the
/// supervisor runs for it on the event loop at every tick (to act on what the thread found).
pub struct Task {
    pub name: &'static str,
    pub run: Box<dyn FnOnce(&Context) + Send>,
    pub tick: Option<Box<dyn FnMut()>>,
}

/// Starts `run` on a thread that has every asynchronous signal blocked, so that nginx's
/// signals (the master's SIGQUIT, SIGHUP, SIGTERM...) are always delivered to the event loop
/// thread, as nginx's own thread pool threads arrange.
pub(super) fn spawn(
    name: &'static str,
    shared: Arc<Shared>,
    run: Box<dyn FnOnce(&Context) + Send>,
) -> std::io::Result<JoinHandle<()>> {
    let ctx = Context { shared };
    spawn_with_signals_blocked(format!("ak-{name}"), move || {
        let ran = catch_unwind(AssertUnwindSafe(|| run(&ctx)));
        let mut st = ctx.shared.lock();
        if let Err(panic) = ran {
            let msg = crate::log::panic_message(&*panic);
            st.panicked = Some(msg);
        }
        st.finished = true;
        drop(st);
        ctx.shared.wake.notify_all();
    })
}

/// Starts a thread of this worker's own (not a supervised task: the store's writer) with
/// nginx's signals blocked; a panic in it is caught and ends the thread.
pub fn spawn_detached(name: &str, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    spawn_with_signals_blocked(format!("ak-{name}"), move || {
        let _ = catch_unwind(AssertUnwindSafe(body));
    })
    .map(drop)
}

/// Starts `body` on a thread that has every asynchronous signal blocked.
fn spawn_with_signals_blocked(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: plain sigset_t values, filled by sigfillset/pthread_sigmask before use.
    let (mut all, mut old): (sigset_t, sigset_t) = unsafe { core::mem::zeroed() };
    // SAFETY: `all` and `old` are valid sigsets; the mask is restored right after the spawn
    // (the new thread inherits the blocked mask).
    unsafe {
        sigfillset(&mut all);
        for sig in [SIGILL, SIGFPE, SIGSEGV, SIGBUS] {
            sigdelset(&mut all, sig as c_int);
        }
        pthread_sigmask(SIG_BLOCK as c_int, &all, &mut old);
    }
    let thread = std::thread::Builder::new().name(name).spawn(body);
    // SAFETY: restores this thread's mask saved above.
    unsafe { pthread_sigmask(SIG_SETMASK as c_int, &old, ptr::null_mut()) };
    thread
}
