//! Long-lived background work: tasks that run for the whole life of one worker process.
//!
//! Where: in worker 0 only (`ngx_worker == 0` in a process that is a worker: not the master,
//! not the cache manager or loader, which also run `init_process` with `ngx_worker == 0`, and
//! not `master_process off`), and only when the module is in use (an `authentik_session_zone`
//! exists). nginx respawns a dead worker under the same slot number, so a respawned worker 0
//! starts the tasks again. After a reload the new worker 0 starts its own tasks, and the old
//! worker 0 stops its tasks as soon as it begins to shut down, not when its last connection
//! closes (that can take as long as `worker_shutdown_timeout`).
//!
//! How: each task is a dedicated OS thread running blocking code (why: README, "Background
//! work"). A task may touch only what it owns and shared memory, under the zone's `ngx_shmtx`
//! taken with `ngx_shmtx_trylock` (atomics only, see `heartbeat.rs`). It never calls anything
//! else of nginx: no logging, no pools, no events, no configuration (the configuration lives in
//! the cycle pool, which nginx destroys before the process exits). What a task wants logged it
//! queues in its [`Context`]; the supervisor, a cancelable timer on worker 0's event loop, logs
//! the queue every `SUPERVISOR_INTERVAL`, reports a task that ended or panicked, and tells the
//! tasks to stop when the worker starts a graceful shutdown.
//!
//! Stopping: `exit_process` (or the supervisor, at the start of a graceful shutdown) sets each
//! task's stop flag and wakes its condvar; a task polls [`Context::stopping`] or sleeps with
//! [`Context::sleep`], which returns at once. A task must notice within a second (blocking
//! clients: read timeouts of a second at most). `exit_process` waits `EXIT_GRACE` for the
//! threads and joins them; a thread still running then is left to end with the process, and
//! the module is pinned in memory first so that nginx's `dlclose()` of the module at exit
//! cannot unmap code the thread still runs.

use core::ffi::{c_int, c_void};
use core::ptr::{self, addr_of, addr_of_mut};
use core::sync::atomic::{AtomicPtr, Ordering};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nginx_sys::{
    dladdr, dlopen, ngx_add_timer, ngx_cycle_t, ngx_del_timer, ngx_event_t, ngx_int_t, ngx_log_t,
    ngx_msec_t, Dl_info, NGX_LOG_ALERT, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK, NGX_PROCESS_WORKER,
    RTLD_NODELETE, RTLD_NOLOAD, RTLD_NOW,
};
use ngx::http::HttpModuleMainConf;
use ngx::ngx_log_error;

use crate::HttpAuthentikModule;

mod heartbeat;
mod outpost;
mod store_sync;
mod task;

pub use heartbeat::{add_zone, heartbeat_value};
use task::{spawn, Shared};
pub use task::{spawn_detached, Context, Level, Task};

/// How often the supervisor logs what the tasks queued, runs their ticks (authentik's
/// SESSION_END is acted on then) and checks for a shutdown.
const SUPERVISOR_INTERVAL: ngx_msec_t = 250;
/// How long `exit_process` waits for the tasks' threads.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// One started task, seen from the event loop.
struct Handle {
    name: &'static str,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Its end was logged.
    reported: bool,
    tick: Option<Box<dyn FnMut()>>,
}

/// The tasks of this worker and the supervisor's timer. Lives from `init_process` to
/// `exit_process`, at a fixed address (the timer points at it).
struct Running {
    timer: ngx_event_t,
    tasks: Vec<Handle>,
    /// The start of a graceful shutdown was seen and the tasks were told to stop.
    stopping: bool,
}

/// This process's `Running`, if it runs the tasks. Only the event loop thread touches it.
static RUNNING: AtomicPtr<Running> = AtomicPtr::new(ptr::null_mut());

/* nginx hooks */

/// `init_process`: starts the tasks in worker 0. Never fails the worker: without its
/// background tasks a worker still serves requests, and a worker that fails `init_process`
/// is not respawned.
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the worker's cycle, valid for the life of the process.
    let cycle = unsafe { &*cycle };
    let log = cycle.log;
    if catch_unwind(AssertUnwindSafe(|| start(cycle))).is_err() {
        ngx_log_error!(NGX_LOG_ALERT, log, "authentik: panic while starting background tasks");
    }
    NGX_OK as ngx_int_t
}

/// `exit_process`: stops the tasks and waits for them (at most `EXIT_GRACE`).
pub unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    // SAFETY: nginx passes the worker's cycle; its log is valid until the process exits.
    let log = unsafe { (*cycle).log };
    if catch_unwind(AssertUnwindSafe(|| stop(log))).is_err() {
        ngx_log_error!(NGX_LOG_ALERT, log, "authentik: panic while stopping background tasks");
    }
}

fn start(cycle: &ngx_cycle_t) {
    // SAFETY: nginx sets these process globals before `init_process`.
    let (process, worker) = unsafe {
        (
            ngx_sys_read(addr_of!(nginx_sys::ngx_process)),
            ngx_sys_read(addr_of!(nginx_sys::ngx_worker)),
        )
    };
    if process != NGX_PROCESS_WORKER as usize || worker != 0 {
        return;
    }
    let Some(mcf) = HttpAuthentikModule::main_conf(cycle) else { return };
    if mcf.zones.is_empty() {
        return; // the module is loaded but not used
    }
    let log = cycle.log;
    let tasks = tasks(cycle, mcf);
    let mut running = Box::new(Running {
        // SAFETY: a zeroed event is what nginx's own code starts from (ngx_pcalloc).
        timer: unsafe { core::mem::zeroed() },
        tasks: Vec::with_capacity(tasks.len()),
        stopping: false,
    });
    for task in tasks {
        let shared = Arc::new(Shared::default());
        match spawn(task.name, shared.clone(), task.run) {
            Ok(thread) => {
                ngx_log_error!(
                    NGX_LOG_NOTICE,
                    log,
                    "authentik: background task \"{}\" started",
                    task.name
                );
                running.tasks.push(Handle {
                    name: task.name,
                    shared,
                    thread: Some(thread),
                    reported: false,
                    tick: task.tick,
                });
            }
            Err(err) => {
                ngx_log_error!(
                    NGX_LOG_ALERT,
                    log,
                    "authentik: cannot start background task \"{}\": {}",
                    task.name,
                    err
                );
            }
        }
    }
    if running.tasks.is_empty() {
        return;
    }
    let running = Box::into_raw(running);
    // SAFETY: `running` is a fresh, leaked Box (freed in `stop`); the timer lives inside it.
    unsafe {
        let ev = &mut (*running).timer;
        ev.handler = Some(supervise);
        ev.data = running as *mut c_void;
        ev.log = log;
        // A pending supervisor tick must not keep a gracefully exiting worker alive.
        ev.set_cancelable(1);
        ngx_add_timer(ev, SUPERVISOR_INTERVAL);
    }
    RUNNING.store(running, Ordering::Release);
}

/// The tasks worker 0 runs.
fn tasks(cycle: &ngx_cycle_t, mcf: &crate::conf::MainConf) -> Vec<Task> {
    let mut tasks = Vec::new();
    if let Some(task) = outpost::task(cycle, mcf) {
        tasks.push(task);
    }
    tasks.extend(store_sync::tasks(cycle, mcf));
    match heartbeat::task(cycle) {
        Some(task) => tasks.push(task),
        None => {
            ngx_log_error!(
                NGX_LOG_ALERT,
                cycle.log,
                "authentik: background zone missing, heartbeat not started"
            );
        }
    }
    tasks
}

/// Reads a process global that only the event loop thread writes.
///
/// # Safety
/// `p` points at a live, aligned value.
unsafe fn ngx_sys_read<T: Copy>(p: *const T) -> T {
    // SAFETY: see the function's contract; volatile because signal handlers write some of them.
    unsafe { ptr::read_volatile(p) }
}

/// The supervisor's timer handler, on worker 0's event loop.
unsafe extern "C" fn supervise(ev: *mut ngx_event_t) {
    // SAFETY: the timer's log is the cycle log, valid while the timer can fire.
    let log = unsafe { (*ev).log };
    // SAFETY: `ev` is the timer inside the live `Running` that `data` points at.
    if catch_unwind(AssertUnwindSafe(|| unsafe { supervise_inner(ev) })).is_err() {
        ngx_log_error!(NGX_LOG_ALERT, log, "authentik: background supervisor panicked");
    }
}

/// # Safety
/// `ev` is the timer of the live `Running` its `data` points at.
unsafe fn supervise_inner(ev: *mut ngx_event_t) {
    // SAFETY: see the function's contract; only the event loop thread uses `Running`.
    let running = unsafe { &mut *((*ev).data as *mut Running) };
    let log = running.timer.log;
    // SAFETY: process globals written by the event loop thread and its signal handlers.
    let shutting_down = unsafe {
        ngx_sys_read(addr_of!(nginx_sys::ngx_exiting)) != 0
            || ngx_sys_read(addr_of!(nginx_sys::ngx_quit)) != 0
            || ngx_sys_read(addr_of!(nginx_sys::ngx_terminate)) != 0
    };
    if shutting_down && !running.stopping {
        running.stopping = true;
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "authentik: worker is shutting down, stopping background tasks"
        );
        for task in &running.tasks {
            task.shared.request_stop();
        }
    }
    let mut alive = false;
    for task in &mut running.tasks {
        if let Some(tick) = task.tick.as_mut() {
            tick();
        }
        alive |= !drain(task, log, running.stopping);
    }
    if alive {
        // SAFETY: re-arms this timer, which lives as long as `Running`.
        unsafe { ngx_add_timer(addr_of_mut!(running.timer), SUPERVISOR_INTERVAL) };
    }
}

/// Logs what the task queued, and its end once; whether it has finished.
fn drain(task: &mut Handle, log: *mut ngx_log_t, stopping: bool) -> bool {
    let (messages, dropped, finished, panicked) = {
        let mut st = task.shared.lock();
        let dropped = core::mem::take(&mut st.dropped);
        (core::mem::take(&mut st.messages), dropped, st.finished, st.panicked.take())
    };
    for (level, msg) in messages {
        ngx_log_error!(level.ngx(), log, "authentik: background task \"{}\": {}", task.name, msg);
    }
    if dropped > 0 {
        ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "authentik: background task \"{}\": {} messages dropped",
            task.name,
            dropped
        );
    }
    if let Some(msg) = panicked {
        task.reported = true;
        ngx_log_error!(
            NGX_LOG_ALERT,
            log,
            "authentik: background task \"{}\" panicked: {}",
            task.name,
            msg
        );
    } else if finished && !stopping && !task.reported {
        task.reported = true;
        ngx_log_error!(
            NGX_LOG_ALERT,
            log,
            "authentik: background task \"{}\" ended unexpectedly",
            task.name
        );
    }
    finished
}

/// Stops this worker's tasks, if it runs them.
fn stop(log: *mut ngx_log_t) {
    let running = RUNNING.swap(ptr::null_mut(), Ordering::AcqRel);
    if running.is_null() {
        return;
    }
    // SAFETY: `running` was leaked by `start` and is taken out of RUNNING exactly once.
    let mut running = unsafe { Box::from_raw(running) };
    if running.timer.timer_set() != 0 {
        // SAFETY: the timer is armed (timer_set), so it is in nginx's timer tree.
        unsafe { ngx_del_timer(&mut running.timer) };
    }
    for task in &running.tasks {
        task.shared.request_stop();
    }
    let deadline = Instant::now() + EXIT_GRACE;
    for task in &mut running.tasks {
        let finished = task.shared.wait_finished(deadline);
        drain(task, log, true);
        let Some(thread) = task.thread.take() else { continue };
        if finished {
            // Cannot block: the thread has returned from its body (a panic was caught there).
            let _ = thread.join();
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "authentik: background task \"{}\" stopped",
                task.name
            );
            continue;
        }
        let pinned = pin_module();
        ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "authentik: background task \"{}\" did not stop within {:?}, it ends with the \
             process{}",
            task.name,
            EXIT_GRACE,
            if pinned { "" } else { " (cannot pin the module: the exit may crash)" }
        );
        drop(thread); // detached
    }
}

/// Keeps this module mapped until the process exits, although nginx `dlclose()`s it when it
/// destroys the cycle on the way out: a thread still running must not lose its code. (glibc
/// also refuses to unload an object while a live thread has thread-local destructors of it
/// pending, which Rust's std registers for its threads, and no crash was seen without the
/// pin; that is an implementation detail, so the pin states the intent.)
pub fn pin_module() -> bool {
    // SAFETY: `Dl_info` is plain data, filled by dladdr.
    let mut info: Dl_info = unsafe { core::mem::zeroed() };
    let addr = pin_module as fn() -> bool as *const c_void;
    // SAFETY: asks the dynamic linker which object holds one of our functions.
    if unsafe { dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    let flags = (RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE) as c_int;
    // SAFETY: the module is loaded (RTLD_NOLOAD: no new load); the reference is never closed.
    !unsafe { dlopen(info.dli_fname, flags) }.is_null()
}
