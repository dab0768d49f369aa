//! The heartbeat: the first background task, and the proof that the mechanism works. Every
//! `INTERVAL` the task in worker 0 writes a beat (a counter, the unix time, its pid) into a
//! small shared zone of its own, `authentik_background`; `$authentik_background_heartbeat`
//! reads it in every worker as `<beats> <unix time of the last beat> <pid>`.
//!
//! The zone is reused across reloads (same name, size and tag), so the counter keeps counting
//! when a new worker 0 takes over; it starts again from zero only when nginx restarts.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr::{self, addr_of, addr_of_mut};
use std::time::Duration;

use nginx_sys::{
    ngx_conf_t, ngx_cycle_t, ngx_int_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_shmtx_lock,
    ngx_shmtx_t, ngx_shmtx_trylock, ngx_shmtx_unlock, ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t,
    NGX_ERROR, NGX_OK,
};
use ngx::core::Status;

use super::{Context, Level, Task};

/// Time between two beats.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long the task tries to take the zone's mutex before it skips a beat.
const LOCK_ATTEMPTS: u32 = 100;
const LOCK_RETRY: Duration = Duration::from_millis(1);

/// The zone's name. Users cannot take it for a zone of another module (nginx refuses a zone
/// declared twice for different uses), nor for a session zone (different tag).
const ZONE_NAME: &str = "authentik_background";
/// The zone's tag: the address of this static, unlike any other zone's.
static ZONE_TAG: u8 = 0;
/// Checked when the zone's memory is reused.
const MAGIC: u64 = 0x6e61_6b5f_6862_0001;

/// The zone's contents, behind the slab pool header. Read and written under the pool's mutex.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Beat {
    magic: u64,
    beats: u64,
    time: i64,
    pid: u64,
}

/// The zone as this process sees it: valid while the cycle that created it is nginx's cycle
/// (a worker's whole life).
#[derive(Clone, Copy)]
pub struct Zone {
    shpool: *mut ngx_slab_pool_t,
    beat: *mut Beat,
}

// SAFETY: both pointers point into shared memory mapped for the life of the worker process;
// `Beat` is only read or written with the zone's `ngx_shmtx` held.
unsafe impl Send for Zone {}

/// Registers the heartbeat zone; nginx maps it and calls `init_zone` after the configuration
/// is read. Registered with the module's variables (`preconfiguration`) so that no other file
/// needs to know about it; it is a few pages (8 * page size).
pub fn add_zone(cf: &mut ngx_conf_t) -> Status {
    let mut name = ngx_str_t { len: ZONE_NAME.len(), data: ZONE_NAME.as_ptr() as *mut u8 };
    // SAFETY: ngx_pagesize is set at startup.
    let size = 8 * unsafe { nginx_sys::ngx_pagesize };
    let tag = addr_of!(ZONE_TAG) as *mut c_void;
    // SAFETY: registers a zone; nginx keeps `name`, which points at a static string.
    let shm_zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, tag) };
    if shm_zone.is_null() {
        return Status::NGX_ERROR;
    }
    // SAFETY: `shm_zone` is valid for the cycle.
    unsafe { (*shm_zone).init = Some(init_zone) };
    Status::NGX_OK
}

/// Shared-memory init callback; `data` is the previous cycle's `Beat` when the memory is
/// reused by a reload.
unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with the zone registered by `add_zone`; a panic fails the zone.
    std::panic::catch_unwind(|| unsafe { init_zone_inner(&mut *shm_zone, data as *mut Beat) })
        .unwrap_or(NGX_ERROR as ngx_int_t)
}

/// # Safety
/// `shm_zone` is ours and mapped; `old` is null or the previous cycle's `Beat` in it.
unsafe fn init_zone_inner(shm_zone: &mut ngx_shm_zone_t, old: *mut Beat) -> ngx_int_t {
    let shpool = shm_zone.shm.addr as *mut ngx_slab_pool_t;
    // The previous cycle's memory (a reload that reuses the zone), or, on systems where
    // shared memory outlives the master, the zone as created earlier.
    let existing = if !old.is_null() {
        old
    } else if shm_zone.shm.exists != 0 {
        // SAFETY: `shpool` is the zone's slab pool, whose `data` this module set.
        unsafe { (*shpool).data as *mut Beat }
    } else {
        ptr::null_mut()
    };
    // SAFETY: a non-null `existing` points at a `Beat` this module allocated in the zone.
    if !existing.is_null() && unsafe { (*existing).magic } == MAGIC {
        shm_zone.data = existing as *mut c_void;
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: allocates from the zone's slab pool (takes the pool's mutex itself).
    let beat = unsafe { ngx_slab_alloc(shpool, size_of::<Beat>()) } as *mut Beat;
    if beat.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: `beat` is a fresh allocation of the right size; no worker runs yet.
    unsafe {
        beat.write(Beat { magic: MAGIC, ..Beat::default() });
        (*shpool).data = beat as *mut c_void;
    }
    shm_zone.data = beat as *mut c_void;
    NGX_OK as ngx_int_t
}

impl Zone {
    /// The heartbeat zone of `cycle`.
    fn of(cycle: &ngx_cycle_t) -> Option<Zone> {
        let mut part = addr_of!(cycle.shared_memory.part);
        while !part.is_null() {
            // SAFETY: `part` is a part of the cycle's list of ngx_shm_zone_t, alive with it.
            let p = unsafe { &*part };
            let zones = p.elts as *const ngx_shm_zone_t;
            for i in 0..p.nelts {
                // SAFETY: `i < nelts`.
                let zone = unsafe { &*zones.add(i) };
                if zone.tag == addr_of!(ZONE_TAG) as *mut c_void && !zone.data.is_null() {
                    return Some(Zone {
                        shpool: zone.shm.addr as *mut ngx_slab_pool_t,
                        beat: zone.data as *mut Beat,
                    });
                }
            }
            part = p.next;
        }
        None
    }

    fn mutex(&self) -> *mut ngx_shmtx_t {
        // SAFETY: only computes the address of the pool's mutex.
        unsafe { addr_of_mut!((*self.shpool).mutex) }
    }

    /// On the event loop: a copy of the last beat.
    fn read(&self) -> Beat {
        // SAFETY: the zone is mapped; the mutex is nginx's, held only for the copy.
        unsafe {
            ngx_shmtx_lock(self.mutex());
            let beat = ptr::read(self.beat);
            ngx_shmtx_unlock(self.mutex());
            beat
        }
    }

    /// On the background thread: writes one beat; `false` if the mutex stayed busy.
    ///
    /// Thread-safety: `ngx_shmtx_trylock` is one atomic compare-and-set. `ngx_shmtx_unlock` is
    /// an atomic compare-and-set, then, if a process sleeps on the mutex's semaphore,
    /// `sem_post()` (thread-safe); it calls nginx's logger only if `sem_post()` fails, which
    /// it does only on a corrupted semaphore (nginx's own thread-pool threads log the same
    /// way). `ngx_shmtx_lock` is never used here: it may sleep in `sem_wait()` and log.
    fn write_beat(&self, pid: u64, time: i64) -> bool {
        for _ in 0..LOCK_ATTEMPTS {
            // SAFETY: the zone is mapped; the mutex is nginx's and lock-free to try.
            if unsafe { ngx_shmtx_trylock(self.mutex()) } != 0 {
                // SAFETY: the mutex is held; the critical section is three stores.
                unsafe {
                    let b = &mut *self.beat;
                    b.beats = b.beats.wrapping_add(1);
                    b.time = time;
                    b.pid = pid;
                    ngx_shmtx_unlock(self.mutex());
                }
                return true;
            }
            std::thread::sleep(LOCK_RETRY);
        }
        false
    }
}

/// The heartbeat task of `cycle`, if its zone exists.
pub fn task(cycle: &ngx_cycle_t) -> Option<Task> {
    let zone = Zone::of(cycle)?;
    Some(Task { name: "heartbeat", run: Box::new(move |ctx| run(ctx, zone)), tick: None })
}

fn run(ctx: &Context, zone: Zone) {
    let pid = u64::from(std::process::id());
    loop {
        if !zone.write_beat(pid, unix_now()) {
            ctx.log(Level::Warn, "heartbeat skipped, the zone's mutex stayed busy".to_string());
        }
        if !ctx.sleep(INTERVAL) {
            return;
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `$authentik_background_heartbeat`: `<beats> <unix time> <pid>` of the last beat, read in
/// the current cycle's zone; `None` before the first beat.
pub fn heartbeat_value() -> Option<String> {
    // SAFETY: ngx_cycle is the process's current cycle, set before any request.
    let cycle = unsafe { ptr::read_volatile(addr_of!(nginx_sys::ngx_cycle)).as_ref()? };
    let beat = Zone::of(cycle)?.read();
    if beat.beats == 0 {
        return None;
    }
    Some(format!("{} {} {}", beat.beats, beat.time, beat.pid))
}
