//! The outpost's shared memory, `authentik_outpost`: the last configuration fetched from
//! authentik (a [`Snapshot`](authentik_core::outpost::api::Snapshot) as JSON), written by the
//! background task in worker 0 and read by every worker.
//!
//! Two buffers: the writer fills the one not in use, then flips `active` and bumps
//! `generation`, all under the slab pool's mutex. A worker compares `generation` (one atomic
//! load, the only cost on the request path) with the one it built its providers from, and
//! copies the active buffer out under the mutex only when it changed. The zone is reused across
//! reloads (same name, size and tag), so a reload keeps the configuration without a fetch.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr::{self, addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_t,
    ngx_shmtx_trylock, ngx_shmtx_unlock, ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, NGX_ERROR,
    NGX_OK,
};

/// The zone's name (nginx refuses another zone of this name with another tag).
const ZONE_NAME: &str = "authentik_outpost";
/// Room for one configuration, bytes: about 1500 providers.
pub const CAPACITY: usize = 4 << 20;
/// The zone: two buffers and the slab pool's own pages.
const ZONE_SIZE: usize = 2 * CAPACITY + (256 << 10);
static ZONE_TAG: u8 = 0;
/// Checked when the zone's memory is reused; bumped with the layout.
const MAGIC: u64 = 0x6e61_6b5f_6f70_0001;
/// How long the writer tries to take the mutex before it gives up on one write.
const LOCK_ATTEMPTS: u32 = 1000;
const LOCK_RETRY: Duration = Duration::from_millis(1);

/// The zone's contents, behind the slab pool header.
#[repr(C)]
struct Header {
    magic: u64,
    /// Bumped after a new configuration is in place; 0: none yet.
    generation: AtomicU64,
    /// 1 while the websocket to authentik is open.
    connected: AtomicU32,
    /// Unix time of the last successful fetch.
    fetched_at: AtomicU64,
    /// Under the mutex: which buffer holds the configuration, and its length.
    active: usize,
    len: [usize; 2],
    buf: [*mut u8; 2],
}

/// The zone as one process sees it (the pointers are the same in every process: nginx maps
/// shared memory before it forks).
#[derive(Clone, Copy)]
pub struct OutpostZone {
    shpool: *mut ngx_slab_pool_t,
    header: *mut Header,
}

// SAFETY: both pointers point into shared memory mapped for the life of the process; the
// buffers are only touched with the zone's mutex held, the rest are atomics.
unsafe impl Send for OutpostZone {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutpostZoneError {
    #[error("the configuration of {0} bytes is larger than the outpost zone's {1} bytes")]
    TooLarge(usize, usize),
    #[error("the outpost zone's mutex stayed busy")]
    Busy,
}

/// Registers the zone; nginx maps it and calls `init_zone` after the configuration is read.
pub fn add(cf: &mut ngx_conf_t) -> *mut ngx_shm_zone_t {
    let mut name = ngx_str_t { len: ZONE_NAME.len(), data: ZONE_NAME.as_ptr() as *mut u8 };
    let tag = addr_of!(ZONE_TAG) as *mut c_void;
    // SAFETY: registers a zone; nginx keeps `name`, which points at a static string.
    let shm_zone = unsafe { ngx_shared_memory_add(cf, &mut name, ZONE_SIZE, tag) };
    if !shm_zone.is_null() {
        // SAFETY: `shm_zone` is valid for the cycle.
        unsafe { (*shm_zone).init = Some(init_zone) };
    }
    shm_zone
}

unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with the zone registered by `add`; a panic fails the zone.
    std::panic::catch_unwind(|| unsafe { init_zone_inner(&mut *shm_zone, data as *mut Header) })
        .unwrap_or(NGX_ERROR as ngx_int_t)
}

/// # Safety
/// `shm_zone` is ours and mapped; `old` is null or the previous cycle's `Header` in it.
unsafe fn init_zone_inner(shm_zone: &mut ngx_shm_zone_t, old: *mut Header) -> ngx_int_t {
    let shpool = shm_zone.shm.addr as *mut ngx_slab_pool_t;
    let existing = if !old.is_null() {
        old
    } else if shm_zone.shm.exists != 0 {
        // SAFETY: `shpool` is the zone's slab pool, whose `data` this module set.
        unsafe { (*shpool).data as *mut Header }
    } else {
        ptr::null_mut()
    };
    // SAFETY: a non-null `existing` points at a `Header` this module allocated in the zone.
    if !existing.is_null() && unsafe { (*existing).magic } == MAGIC {
        shm_zone.data = existing as *mut c_void;
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: allocates from the fresh zone's slab pool (takes the pool's mutex itself); no
    // worker runs yet.
    unsafe {
        let header = ngx_slab_alloc(shpool, size_of::<Header>()) as *mut Header;
        let a = ngx_slab_alloc(shpool, CAPACITY) as *mut u8;
        let b = ngx_slab_alloc(shpool, CAPACITY) as *mut u8;
        if header.is_null() || a.is_null() || b.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        header.write(Header {
            magic: MAGIC,
            generation: AtomicU64::new(0),
            connected: AtomicU32::new(0),
            fetched_at: AtomicU64::new(0),
            active: 0,
            len: [0, 0],
            buf: [a, b],
        });
        (*shpool).data = header as *mut c_void;
        shm_zone.data = header as *mut c_void;
    }
    NGX_OK as ngx_int_t
}

impl OutpostZone {
    /// The zone of `shm_zone` once nginx has initialised it.
    pub fn of(shm_zone: *mut ngx_shm_zone_t) -> Option<OutpostZone> {
        if shm_zone.is_null() {
            return None;
        }
        // SAFETY: a zone registered by `add`, valid for the cycle.
        let z = unsafe { &*shm_zone };
        if z.data.is_null() {
            return None;
        }
        Some(OutpostZone {
            shpool: z.shm.addr as *mut ngx_slab_pool_t,
            header: z.data as *mut Header,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the header lives in the mapped zone; its non-atomic fields are only read
        // under the mutex (see `read` and `write`).
        unsafe { &*self.header }
    }

    fn mutex(&self) -> *mut ngx_shmtx_t {
        // SAFETY: only computes the address of the pool's mutex.
        unsafe { addr_of_mut!((*self.shpool).mutex) }
    }

    /// The generation of the configuration in place (0: none). One atomic load.
    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Acquire)
    }

    pub fn connected(&self) -> bool {
        self.header().connected.load(Ordering::Relaxed) != 0
    }

    pub fn set_connected(&self, connected: bool) {
        self.header().connected.store(connected as u32, Ordering::Relaxed);
    }

    pub fn fetched_at(&self) -> u64 {
        self.header().fetched_at.load(Ordering::Relaxed)
    }

    /// On the event loop: the configuration in place and its generation; `None` before the
    /// first one.
    pub fn read(&self) -> Option<(u64, Vec<u8>)> {
        // SAFETY: the zone is mapped; the mutex is held for the copy only.
        unsafe {
            ngx_shmtx_lock(self.mutex());
            let h = &*self.header;
            let generation = h.generation.load(Ordering::Acquire);
            let len = h.len[h.active];
            let bytes = core::slice::from_raw_parts(h.buf[h.active], len).to_vec();
            ngx_shmtx_unlock(self.mutex());
            (generation != 0).then_some((generation, bytes))
        }
    }

    /// On the background thread: the configuration in place, if any.
    pub fn snapshot_bytes(&self) -> Result<Option<Vec<u8>>, OutpostZoneError> {
        self.locked(|h| {
            // SAFETY: the active buffer holds `len` bytes; the mutex is held.
            let bytes = unsafe { core::slice::from_raw_parts(h.buf[h.active], h.len[h.active]) };
            (h.generation.load(Ordering::Acquire) != 0).then(|| bytes.to_vec())
        })
    }

    /// On the background thread: whether `bytes` is already the configuration in place.
    pub fn holds(&self, bytes: &[u8]) -> Result<bool, OutpostZoneError> {
        self.locked(|h| {
            // SAFETY: the active buffer holds `len` bytes; the mutex is held.
            let current = unsafe { core::slice::from_raw_parts(h.buf[h.active], h.len[h.active]) };
            h.generation.load(Ordering::Acquire) != 0 && current == bytes
        })
    }

    /// On the background thread: puts `bytes` in place as a new generation.
    pub fn write(&self, bytes: &[u8], fetched_at: u64) -> Result<u64, OutpostZoneError> {
        if bytes.len() > CAPACITY {
            return Err(OutpostZoneError::TooLarge(bytes.len(), CAPACITY));
        }
        self.header().fetched_at.store(fetched_at, Ordering::Relaxed);
        self.locked(|h| {
            let next = 1 - h.active;
            // SAFETY: the inactive buffer has CAPACITY bytes and nobody reads it: the mutex is
            // held and readers only read the active one.
            unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), h.buf[next], bytes.len()) };
            h.len[next] = bytes.len();
            h.active = next;
            h.generation.fetch_add(1, Ordering::AcqRel) + 1
        })
    }

    /// Runs `f` with the mutex held, taken with `ngx_shmtx_trylock` (see `background`: a
    /// thread never sleeps in `ngx_shmtx_lock`, which may log).
    fn locked<T>(&self, f: impl FnOnce(&mut Header) -> T) -> Result<T, OutpostZoneError> {
        for _ in 0..LOCK_ATTEMPTS {
            // SAFETY: the zone is mapped; trying the mutex is one atomic compare-and-set.
            if unsafe { ngx_shmtx_trylock(self.mutex()) } != 0 {
                // SAFETY: the mutex is held: this is the only reference to the header's
                // non-atomic fields. `ngx_shmtx_unlock` is thread-safe (see heartbeat.rs).
                let out = f(unsafe { &mut *self.header });
                // SAFETY: releases the mutex taken above.
                unsafe { ngx_shmtx_unlock(self.mutex()) };
                return Ok(out);
            }
            std::thread::sleep(LOCK_RETRY);
        }
        Err(OutpostZoneError::Busy)
    }
}
