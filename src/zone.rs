//! The session zone: sessions and pending logins in nginx shared memory, seen by every worker.
//!
//! Layout (one slab pool per `authentik_session_zone`): a header with
//! - `index`: open-addressing hash table (linear probing, backward-shift deletion) of the
//!   sessions, keyed by the first 8 bytes of the random session id: a lookup touches one or two
//!   cache lines whatever the number of sessions (an rbtree over a million 2 KB entries costs a
//!   cache miss per level),
//! - `by_sub`: rbtree of the same entries keyed by a hash of the `sub` claim (sign_out),
//! - `lru`: queue of sessions, most recently used first (eviction when the zone is full),
//! - `logins` and `login_lru`: pending logins keyed by their random `state`, in a fixed array
//!   of `LOGIN_SLOT`-byte slots (about a quarter of the zone) allocated when the zone is
//!   created: a flood of unauthenticated logins only recycles the oldest pending logins and can
//!   never take memory from sessions.
//!
//! Every session is bound to the provider that created it (`Entry::provider`, a hash of issuer
//! and client_id): a lookup through another provider does not find it.
//!
//! Every operation holds the slab pool's mutex (`ngx_shmtx`, which the master releases if a
//! worker dies holding it) for a short, allocation-free, panic-free critical section, except
//! that record bytes are copied out to process memory before decoding.

use core::ffi::c_void;
use core::mem::{offset_of, size_of};
use core::ptr::{self, NonNull};

use authentik_core::oidc::PendingLogin;
use authentik_core::session::{SessionId, SessionRecord};
use authentik_core::UnixTime;
use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_queue_empty, ngx_queue_init, ngx_queue_insert_after,
    ngx_queue_remove, ngx_queue_t, ngx_rbtree_delete, ngx_rbtree_init, ngx_rbtree_insert,
    ngx_rbtree_insert_value, ngx_rbtree_next, ngx_rbtree_node_t, ngx_rbtree_t,
    ngx_shared_memory_add, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc,
    ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t, ngx_str_t, NGX_ERROR,
    NGX_LOG_EMERG, NGX_OK,
};

use crate::conf::ConfError;
use crate::HttpAuthentikModule;
use ngx::http::HttpModule;

/// Bumped whenever the shared layout changes: a reload that loads a module with another layout
/// must not reuse the old zone's memory.
const MAGIC: u64 = 0x6e61_6b5f_7a6f_6e03;

/// Bytes of one pending-login slot, header included.
const LOGIN_SLOT: usize = 3072;
/// The most a pending login's record may take.
pub const MAX_LOGIN_RECORD: usize = LOGIN_SLOT - size_of::<Entry>();

/// One slot of the session index; `entry` null means empty.
#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    entry: *mut Entry,
}

const EMPTY: Slot = Slot { key: 0, entry: ptr::null_mut() };

/// One `authentik_session_zone`, per configuration cycle.
pub struct SessionZone {
    pub name: String,
    pub size: usize,
    /// Upper bound of any session's lifetime, seconds.
    pub timeout: i64,
    /// The largest session record stored, bytes (`max_record=`).
    pub max_record: usize,
    shm_zone: *mut ngx_shm_zone_t,
    shpool: *mut ngx_slab_pool_t,
    header: *mut ZoneHeader,
}

#[repr(C)]
struct ZoneHeader {
    magic: u64,
    /// `index_mask + 1` slots; at most 3/4 used (older sessions are evicted first).
    index: *mut Slot,
    index_mask: usize,
    by_sub: ngx_rbtree_t,
    by_sub_sentinel: ngx_rbtree_node_t,
    lru: ngx_queue_t,
    logins: ngx_rbtree_t,
    logins_sentinel: ngx_rbtree_node_t,
    login_lru: ngx_queue_t,
    /// Unused pending-login slots.
    login_free: ngx_queue_t,
    session_count: usize,
    /// When the last "zone is full" warning was logged (any worker), seconds.
    last_full_warning: i64,
}

/// A session or a pending login in the slab; the record's bytes follow the struct.
#[repr(C)]
struct Entry {
    node: ngx_rbtree_node_t,
    /// Sessions only: node in `by_sub`, keyed by `sub_key(sub)`.
    sub_node: ngx_rbtree_node_t,
    lru: ngx_queue_t,
    /// Sessions: the session id. Logins: unused.
    id: [u8; 32],
    expires_at: i64,
    len: u32,
    /// Sessions: the key of the provider that created it (see `SessionZone::lookup`).
    provider: u32,
}

// A typical authentik session record is at most 2048 - 144 bytes (see the core test
// `typical_authentik_session_fits_a_2k_slot`), so with this header it takes one 2 KB slab slot.
const _: () = assert!(size_of::<Entry>() <= 144);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZoneError {
    #[error("session zone \"{0}\" has no room for this record")]
    NoMemory(String),
    #[error("session id collision")]
    Collision,
    #[error("record of {0} bytes is larger than the limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// What an insert had to do to find room.
#[derive(Debug, Default)]
pub struct Eviction {
    pub evicted: usize,
    /// `true` at most once a minute for the whole zone: log the warning then.
    pub warn: bool,
}

fn sub_key(sub: &str) -> u64 {
    // FNV-1a: spreads `sub` values over the index; collisions are resolved by comparing `sub`.
    sub.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
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
    let zone = unsafe { &mut *(shm_zone.data as *mut SessionZone) };
    let shpool = shm_zone.shm.addr as *mut ngx_slab_pool_t;
    zone.shpool = shpool;

    if !data.is_null() {
        // SAFETY: `data` is the old cycle's SessionZone, alive until the new cycle is set up.
        let old = unsafe { &*(data as *const SessionZone) };
        // SAFETY: the old header lives in the reused shared memory.
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

    // SAFETY: allocates from the fresh slab pool (takes the pool mutex itself).
    let header = unsafe { ngx_slab_alloc(shpool, size_of::<ZoneHeader>()) } as *mut ZoneHeader;
    if header.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    // One slot per KiB of zone (rounded up to a power of two): a typical session takes a 2 KiB
    // slab slot, so the index stays under half full; at 3/4 the oldest sessions are evicted.
    let slots = (zone.size / 1024).next_power_of_two().max(64);
    // SAFETY: allocates the index from the fresh slab pool.
    let index = unsafe { ngx_slab_alloc(shpool, slots * size_of::<Slot>()) } as *mut Slot;
    if index.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: `header` and `index` are fresh, exclusively owned allocations of the right size.
    unsafe {
        for i in 0..slots {
            index.add(i).write(EMPTY);
        }
        ptr::write_bytes(header, 0, 1);
        let h = &mut *header;
        h.magic = MAGIC;
        h.index = index;
        h.index_mask = slots - 1;
        ngx_rbtree_init(&mut h.by_sub, &mut h.by_sub_sentinel, Some(ngx_rbtree_insert_value));
        ngx_rbtree_init(&mut h.logins, &mut h.logins_sentinel, Some(ngx_rbtree_insert_value));
        ngx_queue_init(&mut h.lru);
        ngx_queue_init(&mut h.login_lru);
        ngx_queue_init(&mut h.login_free);
    }
    // Pending logins get a fixed quarter of the zone, allocated now and never given back.
    let login_slots = (zone.size / 4 / LOGIN_SLOT).max(4);
    // SAFETY: allocates the login slots from the fresh slab pool.
    let slots_mem = unsafe { ngx_slab_alloc(shpool, login_slots * LOGIN_SLOT) } as *mut u8;
    if slots_mem.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    for i in 0..login_slots {
        let entry = slots_mem.wrapping_add(i * LOGIN_SLOT) as *mut Entry;
        // SAFETY: each slot is a fresh, exclusively owned LOGIN_SLOT-byte part of the array.
        unsafe {
            ptr::write_bytes(entry, 0, 1);
            ngx_queue_insert_after(&mut (*header).login_free, &mut (*entry).lru);
        }
    }
    pool.data = header as *mut c_void;
    // The module evicts on allocation failure itself: no "ngx_slab_alloc() failed" alerts.
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

/// Holds the zone's mutex for the guard's lifetime.
struct Locked<'a> {
    zone: &'a SessionZone,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: the mutex was locked by `SessionZone::lock`.
        unsafe { ngx_shmtx_unlock(&mut (*self.zone.shpool).mutex) };
    }
}

impl SessionZone {
    /// Registers the shared memory zone; nginx maps it and calls `init_zone` later.
    pub fn add(
        cf: &mut ngx_conf_t,
        name: String,
        size: usize,
        timeout: i64,
        max_record: usize,
    ) -> Result<Box<SessionZone>, ConfError> {
        let mut zone = Box::new(SessionZone {
            name,
            size,
            timeout,
            max_record,
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
            return Err(ConfError);
        }
        // SAFETY: shm_zone is valid for the cycle.
        let shm = unsafe { &mut *shm_zone };
        if !shm.data.is_null() {
            ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "duplicate zone \"{}\"", zone.name);
            return Err(ConfError);
        }
        shm.init = Some(init_zone);
        shm.data = &mut *zone as *mut SessionZone as *mut c_void;
        zone.shm_zone = shm_zone;
        Ok(zone)
    }

    fn lock(&self) -> Locked<'_> {
        // SAFETY: the pool exists once the zone is initialised (before any request).
        unsafe { ngx_shmtx_lock(&mut (*self.shpool).mutex) };
        Locked { zone: self }
    }

    fn header<'l>(&self, _lock: &'l mut Locked<'_>) -> &'l mut ZoneHeader {
        // SAFETY: the header is initialised and the caller holds the zone's mutex.
        unsafe { &mut *self.header }
    }

    /* sessions */

    /// Copies the session's record bytes into memory from `alloc` (called under the lock, must
    /// not block), if the session exists, was created by `provider` and has not expired; marks
    /// it used.
    pub fn lookup<'a>(
        &self,
        id: &SessionId,
        provider: u32,
        now: UnixTime,
        alloc: impl FnOnce(usize) -> Option<&'a mut [u8]>,
    ) -> Option<&'a [u8]> {
        let mut lock = self.lock();
        let h = self.header(&mut lock);
        let entry = index_find(h, id.key())?;
        // SAFETY: `entry` is a live session entry in the locked zone.
        let e = unsafe { &mut *entry };
        if !constant_time_eq(&e.id, &id.0) || e.provider != provider {
            return None;
        }
        if e.expires_at <= now {
            self.delete_session(h, entry);
            return None;
        }
        // SAFETY: moving a live entry to the head of the LRU queue under the lock.
        unsafe {
            ngx_queue_remove(&mut e.lru);
            ngx_queue_insert_after(&mut h.lru, &mut e.lru);
        }
        let data = entry_data(entry);
        let out = alloc(data.len())?;
        out.copy_from_slice(data);
        Some(out)
    }

    /// Stores a new session of `provider`; evicts expired and then least recently used sessions
    /// for room. A record over `max_record` bytes is refused before anything is evicted.
    pub fn insert(
        &self,
        id: &SessionId,
        provider: u32,
        record: &SessionRecord,
        now: UnixTime,
    ) -> Result<Eviction, ZoneError> {
        let bytes = record.encode();
        if bytes.len() > self.max_record {
            return Err(ZoneError::TooLarge(bytes.len(), self.max_record));
        }
        let mut lock = self.lock();
        let h = self.header(&mut lock);
        if index_find(h, id.key()).is_some() {
            return Err(ZoneError::Collision);
        }
        self.expire_sessions(h, now, 2);
        let mut eviction = Eviction::default();
        // Keep the index at most 3/4 full.
        while (h.session_count + 1) * 4 > (h.index_mask + 1) * 3 {
            if !self.evict_oldest_session(h) {
                break;
            }
            eviction.evicted += 1;
        }
        let entry = loop {
            if let Some(entry) = self.alloc_entry(bytes.len()) {
                break entry;
            }
            if !self.evict_oldest_session(h) {
                return Err(ZoneError::NoMemory(self.name.clone()));
            }
            eviction.evicted += 1;
        };
        if eviction.evicted > 0 && now - h.last_full_warning >= 60 {
            h.last_full_warning = now;
            eviction.warn = true;
        }
        // SAFETY: `entry` is a fresh allocation with room for the header and the record.
        unsafe {
            let e = &mut *entry;
            e.node.key = id.key() as _;
            e.sub_node.key = sub_key(&record.sub) as _;
            e.id = id.0;
            e.expires_at = record.expires_at;
            e.len = bytes.len() as u32;
            e.provider = provider;
            ptr::copy_nonoverlapping(bytes.as_ptr(), entry_data_ptr(entry), bytes.len());
            index_insert(h, id.key(), entry);
            ngx_rbtree_insert(&mut h.by_sub, &mut e.sub_node);
            ngx_queue_insert_after(&mut h.lru, &mut e.lru);
        }
        h.session_count += 1;
        Ok(eviction)
    }

    /// Deletes every session whose `sub` is `sub`; returns how many.
    pub fn remove_by_sub(&self, sub: &str) -> usize {
        let key = sub_key(sub);
        let mut lock = self.lock();
        let h = self.header(&mut lock);
        let mut doomed = Vec::new();
        let sentinel = h.by_sub.sentinel;
        // Leftmost node with a key >= `key`, then walk equal keys in order.
        let mut node = h.by_sub.root;
        let mut first = ptr::null_mut();
        while node != sentinel {
            // SAFETY: walking live nodes of the locked tree.
            let n = unsafe { &*node };
            if n.key as u64 >= key {
                first = node;
                node = n.left;
            } else {
                node = n.right;
            }
        }
        let mut node = first;
        // SAFETY: nodes of `by_sub` are `sub_node` fields of live entries.
        while !node.is_null() && unsafe { (*node).key } as u64 == key {
            // SAFETY: `node` is the `sub_node` of a live entry (see above).
            let entry = unsafe { entry_of_sub_node(node) };
            if SessionRecord::peek_sub(entry_data(entry)) == Some(sub) {
                doomed.push(entry);
            }
            // SAFETY: in-order successor in the locked tree; null after the last node.
            node = unsafe { ngx_rbtree_next(&mut h.by_sub, node) };
        }
        for entry in &doomed {
            self.delete_session(h, *entry);
        }
        doomed.len()
    }

    /// Live (possibly expired, not yet collected) sessions, free and total slab pages.
    #[cfg(feature = "bench")]
    pub fn stats(&self) -> (usize, usize, usize) {
        let mut lock = self.lock();
        let sessions = self.header(&mut lock).session_count;
        // SAFETY: the slab pool's counters are read under its mutex.
        let pool = unsafe { &*self.shpool };
        let total = (pool.end as usize - pool.start as usize) / 4096;
        (sessions, pool.pfree, total)
    }

    fn delete_session(&self, h: &mut ZoneHeader, entry: *mut Entry) {
        // SAFETY: `entry` is a live session in the locked zone; it is unlinked then freed.
        unsafe {
            let e = &mut *entry;
            index_remove(h, e.node.key as u64, entry);
            ngx_rbtree_delete(&mut h.by_sub, &mut e.sub_node);
            ngx_queue_remove(&mut e.lru);
            ngx_slab_free_locked(self.shpool, entry as *mut c_void);
        }
        h.session_count -= 1;
    }

    /// Drops up to `n` expired sessions from the LRU tail.
    fn expire_sessions(&self, h: &mut ZoneHeader, now: UnixTime, n: usize) {
        for _ in 0..n {
            let Some(entry) = lru_tail(&mut h.lru) else { return };
            // SAFETY: a live entry of the locked zone.
            if unsafe { (*entry).expires_at } > now {
                return;
            }
            self.delete_session(h, entry);
        }
    }

    fn evict_oldest_session(&self, h: &mut ZoneHeader) -> bool {
        let Some(entry) = lru_tail(&mut h.lru) else { return false };
        self.delete_session(h, entry);
        true
    }

    fn alloc_entry(&self, len: usize) -> Option<*mut Entry> {
        // SAFETY: called with the zone's mutex held.
        let p = unsafe { ngx_slab_alloc_locked(self.shpool, size_of::<Entry>() + len) };
        NonNull::new(p as *mut Entry).map(NonNull::as_ptr)
    }

    /* pending logins */

    /// Stores a started login until its callback (at most `ttl` seconds) in a login slot;
    /// expired and then the oldest pending logins make room. Never touches sessions.
    pub fn insert_login(
        &self,
        login: &PendingLogin,
        ttl: i64,
        now: UnixTime,
    ) -> Result<(), ZoneError> {
        let Some(key) = PendingLogin::key_of(&login.state) else {
            return Err(ZoneError::Collision);
        };
        let bytes = login.encode();
        if bytes.len() > MAX_LOGIN_RECORD {
            return Err(ZoneError::TooLarge(bytes.len(), MAX_LOGIN_RECORD));
        }
        let mut lock = self.lock();
        let h = self.header(&mut lock);
        if find(&mut h.logins, key).is_some() {
            return Err(ZoneError::Collision);
        }
        while let Some(entry) = lru_tail(&mut h.login_lru) {
            // SAFETY: a live login entry of the locked zone.
            if unsafe { (*entry).expires_at } > now {
                break;
            }
            self.delete_login(h, entry);
        }
        if lru_tail(&mut h.login_free).is_none() {
            let Some(oldest) = lru_tail(&mut h.login_lru) else {
                return Err(ZoneError::NoMemory(self.name.clone()));
            };
            self.delete_login(h, oldest);
        }
        let Some(entry) = lru_tail(&mut h.login_free) else {
            return Err(ZoneError::NoMemory(self.name.clone()));
        };
        // SAFETY: `entry` is a free slot of LOGIN_SLOT bytes, moved from the free queue to the
        // pending logins.
        unsafe {
            let e = &mut *entry;
            ngx_queue_remove(&mut e.lru);
            e.node.key = key as _;
            e.expires_at = now + ttl;
            e.len = bytes.len() as u32;
            ptr::copy_nonoverlapping(bytes.as_ptr(), entry_data_ptr(entry), bytes.len());
            ngx_rbtree_insert(&mut h.logins, &mut e.node);
            ngx_queue_insert_after(&mut h.login_lru, &mut e.lru);
        }
        Ok(())
    }

    /// Removes and returns the pending login for `state` (one use), unless it has expired.
    pub fn take_login(&self, state: &str, now: UnixTime) -> Option<PendingLogin> {
        let key = PendingLogin::key_of(state)?;
        let (bytes, expires_at) = {
            let mut lock = self.lock();
            let h = self.header(&mut lock);
            let entry = find(&mut h.logins, key)?;
            let bytes = entry_data(entry).to_vec();
            // SAFETY: a live login entry of the locked zone.
            let expires_at = unsafe { (*entry).expires_at };
            self.delete_login(h, entry);
            (bytes, expires_at)
        };
        let login = PendingLogin::decode(&bytes)?;
        if login.state != state || expires_at <= now {
            return None;
        }
        Some(login)
    }

    fn delete_login(&self, h: &mut ZoneHeader, entry: *mut Entry) {
        // SAFETY: `entry` is a live login in the locked zone; its slot goes back to the free
        // queue.
        unsafe {
            let e = &mut *entry;
            ngx_rbtree_delete(&mut h.logins, &mut e.node);
            ngx_queue_remove(&mut e.lru);
            e.len = 0;
            ngx_queue_insert_after(&mut h.login_free, &mut e.lru);
        }
    }
}

/// Compares session ids in constant time, so timing reveals nothing about a guess.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a[..], &b[..]).into()
}

/* the session index; all callers hold the zone's mutex */

fn slot(h: &ZoneHeader, i: usize) -> *mut Slot {
    h.index.wrapping_add(i & h.index_mask)
}

fn index_find(h: &ZoneHeader, key: u64) -> Option<*mut Entry> {
    let mut i = key as usize;
    loop {
        // SAFETY: `slot` stays inside the index; the table always has an empty slot.
        let s = unsafe { *slot(h, i) };
        if s.entry.is_null() {
            return None;
        }
        if s.key == key {
            return Some(s.entry);
        }
        i = i.wrapping_add(1);
    }
}

fn index_insert(h: &mut ZoneHeader, key: u64, entry: *mut Entry) {
    let mut i = key as usize;
    // SAFETY: probing inside the index, which is at most 3/4 full.
    unsafe {
        while !(*slot(h, i)).entry.is_null() {
            i = i.wrapping_add(1);
        }
        *slot(h, i) = Slot { key, entry };
    }
}

/// Removes `entry` and shifts later slots of the same probe run back (no tombstones).
fn index_remove(h: &mut ZoneHeader, key: u64, entry: *mut Entry) {
    let mask = h.index_mask;
    let mut i = key as usize & mask;
    // SAFETY: probing inside the index; `entry` is in it.
    unsafe {
        while (*slot(h, i)).entry != entry {
            if (*slot(h, i)).entry.is_null() {
                return;
            }
            i = (i + 1) & mask;
        }
        loop {
            let mut j = i;
            loop {
                j = (j + 1) & mask;
                let s = *slot(h, j);
                if s.entry.is_null() {
                    *slot(h, i) = EMPTY;
                    return;
                }
                let home = s.key as usize & mask;
                // The slot at j may move to i unless its home lies cyclically in (i, j].
                let stays = if i <= j { home > i && home <= j } else { home > i || home <= j };
                if !stays {
                    *slot(h, i) = s;
                    i = j;
                    break;
                }
            }
        }
    }
}

/* intrusive-structure helpers; all callers hold the zone's mutex */

fn find(tree: &mut ngx_rbtree_t, key: u64) -> Option<*mut Entry> {
    let sentinel = tree.sentinel;
    let mut node = tree.root;
    while node != sentinel {
        // SAFETY: walking live nodes of a locked tree.
        let n = unsafe { &*node };
        let k = n.key as u64;
        if key < k {
            node = n.left;
        } else if key > k {
            node = n.right;
        } else {
            // `node` is the first field of Entry.
            return Some(node as *mut Entry);
        }
    }
    None
}

fn lru_tail(queue: &mut ngx_queue_t) -> Option<*mut Entry> {
    // SAFETY: the queue is a live list head in the locked zone.
    if unsafe { ngx_queue_empty(queue) } {
        return None;
    }
    let last = queue.prev;
    Some((last as *mut u8).wrapping_sub(offset_of!(Entry, lru)) as *mut Entry)
}

/// # Safety
/// `node` must be the `sub_node` field of a live `Entry`.
unsafe fn entry_of_sub_node(node: *mut ngx_rbtree_node_t) -> *mut Entry {
    (node as *mut u8).wrapping_sub(offset_of!(Entry, sub_node)) as *mut Entry
}

fn entry_data_ptr(entry: *mut Entry) -> *mut u8 {
    (entry as *mut u8).wrapping_add(size_of::<Entry>())
}

fn entry_data<'a>(entry: *mut Entry) -> &'a [u8] {
    // SAFETY: the entry's record bytes follow it; the caller holds the lock while using them.
    unsafe { core::slice::from_raw_parts(entry_data_ptr(entry), (*entry).len as usize) }
}
