//! The shared memory of one `authentik_session_zone`: registration at configuration time,
//! creation or reuse when nginx maps it (start and reload), and the lock that every store
//! operation holds.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::mem::size_of;
use core::ptr::{self, NonNull};

use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_unlock,
    ngx_slab_alloc, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t, ngx_str_t,
    NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};
use ngx::http::HttpModule;

use super::logins::LoginSlots;
use super::sessions::SessionTable;
use crate::HttpAuthentikModule;

/// Bumped whenever the shared layout changes: a reload that loads a module with another layout
/// must not reuse the old zone's memory.
const MAGIC: u64 = 0x6e61_6b5f_7a6f_6e05;

/// One `authentik_session_zone`, per configuration cycle.
pub struct SessionZone {
    pub name: String,
    pub size: usize,
    /// Upper bound of any session's lifetime, seconds.
    pub timeout: i64,
    /// `timeout=` was written (else it is the default, which an outpost provider's
    /// `access_token_validity` replaces).
    pub timeout_given: bool,
    /// The largest session record stored, bytes (`max_record=`).
    pub max_record: usize,
    /// The shared store behind the zone (`store=`): the zone is its L1 cache.
    pub remote: super::Remote,
    shm_zone: *mut ngx_shm_zone_t,
    shpool: *mut ngx_slab_pool_t,
    header: *mut ZoneHeader,
}

/// The start of the zone (`shpool->data`); `magic` stays the first field in every layout.
#[repr(C)]
pub(super) struct ZoneHeader {
    magic: u64,
    pub(super) sessions: SessionTable,
    pub(super) logins: LoginSlots,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SharedZoneError {
    #[error("duplicate zone \"{0}\"")]
    Duplicate(String),
    /// `ngx_shared_memory_add()` has logged why.
    #[error("shared memory zone \"{0}\" cannot be added")]
    NotAdded(String),
}

impl SessionZone {
    /// Registers the shared memory zone; nginx maps it and calls `init_zone` later.
    pub fn add(
        cf: &mut ngx_conf_t,
        name: String,
        size: usize,
        timeout: i64,
        max_record: usize,
    ) -> Result<Box<SessionZone>, SharedZoneError> {
        let mut zone = Box::new(SessionZone {
            name,
            size,
            timeout,
            timeout_given: false,
            max_record,
            remote: None,
            shm_zone: ptr::null_mut(),
            shpool: ptr::null_mut(),
            header: ptr::null_mut(),
        });
        let mut name = ngx_str_t { len: zone.name.len(), data: zone.name.as_ptr() as *mut u8 };
        let tag = HttpAuthentikModule::module() as *const _ as *mut c_void;
        // SAFETY: registers a zone; nginx copies nothing but keeps `name` (owned by the Box,
        // which lives as long as the cycle's configuration).
        let shm_zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, tag) };
        if shm_zone.is_null() {
            return Err(SharedZoneError::NotAdded(zone.name.clone()));
        }
        // SAFETY: shm_zone is valid for the cycle.
        let shm = unsafe { &mut *shm_zone };
        if !shm.data.is_null() {
            return Err(SharedZoneError::Duplicate(zone.name.clone()));
        }
        shm.init = Some(init_zone);
        shm.data = &mut *zone as *mut SessionZone as *mut c_void;
        zone.shm_zone = shm_zone;
        Ok(zone)
    }

    /// Takes the zone's mutex (`ngx_shmtx`, which the master releases if a worker dies holding
    /// it) until the guard is dropped.
    pub(super) fn lock(&self) -> Locked<'_> {
        // SAFETY: nginx initialises every zone (`init_zone`) before any request, so `shpool` is
        // the zone's slab pool.
        unsafe { ngx_shmtx_lock(&mut (*self.shpool).mutex) };
        Locked {
            // SAFETY: the header was created or checked by `init_zone`; the mutex makes this the
            // only reference to it (a worker runs one store operation at a time, none nested).
            header: unsafe { &mut *self.header },
            pool: LockedPool { shpool: self.shpool, _locked: PhantomData },
        }
    }
}

/// Shared-memory init callback; `data` is the previous cycle's `SessionZone` on reload.
unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: see init_zone_inner; a panic fails the zone instead of unwinding into nginx.
    std::panic::catch_unwind(|| unsafe { init_zone_inner(shm_zone, data) })
        .unwrap_or(NGX_ERROR as ngx_int_t)
}

/// # Safety
/// Called by nginx with a zone registered by `SessionZone::add`.
unsafe fn init_zone_inner(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with our zone whose `data` is the SessionZone set by `add`.
    let shm_zone = unsafe { &mut *shm_zone };
    // SAFETY: see above.
    let zone = unsafe { &mut *(shm_zone.data as *mut SessionZone) };
    let shpool = shm_zone.shm.addr as *mut ngx_slab_pool_t;
    zone.shpool = shpool;

    if !data.is_null() {
        // SAFETY: `data` is the old cycle's SessionZone, alive until the new cycle is set up.
        let old = unsafe { &*(data as *const SessionZone) };
        // SAFETY: the old header lives in the reused shared memory; `magic` comes first in
        // every layout.
        if old.header.is_null() || unsafe { (*old.header).magic } != MAGIC {
            return reject_zone(shm_zone, zone);
        }
        zone.header = old.header;
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: shpool is the slab pool nginx initialised in this zone.
    let pool = unsafe { &mut *shpool };
    if shm_zone.shm.exists != 0 {
        zone.header = pool.data as *mut ZoneHeader;
        // SAFETY: an existing zone was set up by this module.
        if zone.header.is_null() || unsafe { (*zone.header).magic } != MAGIC {
            return reject_zone(shm_zone, zone);
        }
        return NGX_OK as ngx_int_t;
    }

    // SAFETY: `shpool` is the fresh zone's slab pool, which nothing else uses yet.
    let Some(header) = (unsafe { create_header(shpool, zone.size) }) else {
        return NGX_ERROR as ngx_int_t;
    };
    pool.data = header as *mut c_void;
    // The store evicts on allocation failure itself: no "ngx_slab_alloc() failed" alerts.
    pool.set_log_nomem(0);
    zone.header = header;

    let ctx = format!(" in authentik session zone \"{}\"\0", zone.name);
    // SAFETY: log_ctx is copied into the zone so it outlives this cycle.
    let log_ctx = unsafe { ngx_slab_alloc(shpool, ctx.len()) } as *mut u8;
    if !log_ctx.is_null() {
        // SAFETY: log_ctx has room for ctx.len() bytes.
        unsafe { ptr::copy_nonoverlapping(ctx.as_ptr(), log_ctx, ctx.len()) };
        pool.log_ctx = log_ctx;
    }
    NGX_OK as ngx_int_t
}

/// Allocates and sets up the header of a fresh zone of `size` bytes: the session table, then
/// the pending-login slots.
///
/// # Safety
/// `shpool` is the slab pool of a fresh zone, not locked.
unsafe fn create_header(shpool: *mut ngx_slab_pool_t, size: usize) -> Option<*mut ZoneHeader> {
    // SAFETY: allocates from the fresh slab pool (takes the pool mutex itself).
    let header = unsafe { ngx_slab_alloc(shpool, size_of::<ZoneHeader>()) } as *mut ZoneHeader;
    if header.is_null() {
        return None;
    }
    // SAFETY: `header` is a fresh, exclusively owned allocation of the right size; all-zero is
    // a valid value of its plain C fields.
    let h = unsafe {
        ptr::write_bytes(header, 0, 1);
        &mut *header
    };
    h.magic = MAGIC;
    // SAFETY: the header is in the zone and never moves; `shpool` is not locked.
    unsafe { (h.sessions.init(shpool, size) && h.logins.init(shpool, size)).then_some(header) }
}

fn reject_zone(shm_zone: &ngx_shm_zone_t, zone: &SessionZone) -> ngx_int_t {
    // SAFETY: shm.log is the cycle log while zones are initialised.
    let log = shm_zone.shm.log;
    ngx::ngx_log_error!(
        NGX_LOG_EMERG,
        log,
        "authentik session zone \"{}\" was created by another version of the module, \
         restart nginx to recreate it",
        zone.name
    );
    NGX_ERROR as ngx_int_t
}

/* the locked zone */

/// Holds the zone's mutex for the guard's lifetime: the way to the header and the slab.
pub(super) struct Locked<'a> {
    pub(super) header: &'a mut ZoneHeader,
    pub(super) pool: LockedPool<'a>,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: the mutex was locked by `SessionZone::lock`.
        unsafe { ngx_shmtx_unlock(&mut (*self.pool.shpool).mutex) };
    }
}

/// The zone's slab pool while its mutex is held.
pub(super) struct LockedPool<'a> {
    shpool: *mut ngx_slab_pool_t,
    _locked: PhantomData<&'a ()>,
}

impl LockedPool<'_> {
    /// `size` bytes from the slab; `None` when the zone is full.
    pub(super) fn alloc(&self, size: usize) -> Option<NonNull<u8>> {
        // SAFETY: the guard holds the pool's mutex.
        NonNull::new(unsafe { ngx_slab_alloc_locked(self.shpool, size) } as *mut u8)
    }

    /// # Safety
    /// `p` came from `alloc` of this zone and is no longer linked anywhere.
    pub(super) unsafe fn free(&self, p: NonNull<u8>) {
        // SAFETY: the guard holds the pool's mutex; the caller guarantees `p`.
        unsafe { ngx_slab_free_locked(self.shpool, p.as_ptr() as *mut c_void) };
    }

    /// Free and total pages of the slab.
    pub(super) fn pages(&self) -> (usize, usize) {
        // SAFETY: the slab pool's counters are read under its mutex.
        let pool = unsafe { &*self.shpool };
        (pool.pfree, (pool.end as usize - pool.start as usize) / 4096)
    }
}
