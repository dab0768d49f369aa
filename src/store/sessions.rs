//! Sessions in the zone: an open-addressing index keyed by the first 8 bytes of the random
//! session id (`authentik_core::store::index`), an rbtree keyed by a hash of `sub` (sign-out),
//! and an LRU queue, most recently used first. When an insert needs room, `make_room` is the one
//! place that expires and evicts sessions.

use core::mem::{offset_of, size_of};
use core::ptr::{self, NonNull};

use authentik_core::session::{SessionId, SessionRecord};
use authentik_core::store::index::{self, Slot};
use authentik_core::UnixTime;
use nginx_sys::{
    ngx_queue_init, ngx_queue_insert_after, ngx_queue_remove, ngx_queue_t, ngx_rbtree_delete,
    ngx_rbtree_init, ngx_rbtree_insert, ngx_rbtree_insert_value, ngx_rbtree_next,
    ngx_rbtree_node_t, ngx_rbtree_t, ngx_slab_alloc, ngx_slab_pool_t,
};

use super::entry::{lru_tail, Entry};
use super::zone::{LockedPool, SessionZone};
use super::{Eviction, ZoneError};

type IndexSlot = Slot<NonNull<Entry>>;

/// The sessions' part of the zone header.
#[repr(C)]
pub(super) struct SessionTable {
    /// `index_len` slots, at most 3/4 used (see `make_room`).
    index: *mut IndexSlot,
    index_len: usize,
    by_sub: ngx_rbtree_t,
    by_sub_sentinel: ngx_rbtree_node_t,
    /// Sessions with a `sid`, keyed by a hash of it (authentik's SESSION_END); an entry's
    /// `node.data` is 1 while it is in this tree.
    by_sid: ngx_rbtree_t,
    by_sid_sentinel: ngx_rbtree_node_t,
    lru: ngx_queue_t,
    count: usize,
    /// When the last "zone is full" warning was logged (any worker), seconds.
    last_full_warning: i64,
}

/// Copies the session's record bytes into memory from `alloc` (called under the lock, must not
/// block), if the session exists, was created by `provider` and has not expired; marks it used.
pub(super) fn lookup<'a>(
    zone: &SessionZone,
    id: &SessionId,
    provider: u32,
    now: UnixTime,
    alloc: impl FnOnce(usize) -> Option<&'a mut [u8]>,
) -> Option<&'a [u8]> {
    let lock = zone.lock();
    let table = &mut lock.header.sessions;
    let entry = index::find(table.index(), id.key())?;
    // SAFETY: entries of the index are live sessions of the locked zone.
    let e = unsafe { entry.as_ref() };
    if !constant_time_eq(&e.id, &id.0) || e.provider != provider {
        return None;
    }
    if e.expires_at <= now {
        table.delete(&lock.pool, entry);
        return None;
    }
    table.mark_used(entry);
    // SAFETY: a live entry; its bytes are copied out before the lock is released.
    let record = unsafe { Entry::record(entry) };
    let out = alloc(record.len())?;
    out.copy_from_slice(record);
    Some(out)
}

/// Stores a new session of `provider`. A record over `max_record` bytes is refused before
/// anything is evicted.
pub(super) fn insert(
    zone: &SessionZone,
    id: &SessionId,
    provider: u32,
    record: &SessionRecord,
    now: UnixTime,
) -> Result<Eviction, ZoneError> {
    let bytes = record.encode();
    let fields =
        Fields { sub: &record.sub, sid: record.sid.as_deref(), expires_at: record.expires_at };
    insert_encoded(zone, id, provider, &bytes, fields, now)
}

/// What the zone's trees need of a record besides its bytes.
pub(super) struct Fields<'a> {
    pub(super) sub: &'a str,
    pub(super) sid: Option<&'a str>,
    pub(super) expires_at: UnixTime,
}

/// Stores an encoded session record (a new one, or one read from the shared store).
pub(super) fn insert_encoded(
    zone: &SessionZone,
    id: &SessionId,
    provider: u32,
    bytes: &[u8],
    fields: Fields<'_>,
    now: UnixTime,
) -> Result<Eviction, ZoneError> {
    if bytes.len() > zone.max_record {
        return Err(ZoneError::TooLarge(bytes.len(), zone.max_record));
    }
    let lock = zone.lock();
    let (table, pool) = (&mut lock.header.sessions, &lock.pool);
    if index::find(table.index(), id.key()).is_some() {
        return Err(ZoneError::Collision);
    }
    let no_memory = || ZoneError::NoMemory(zone.name.clone());
    let (entry, evicted) = table.make_room(pool, bytes.len(), now).ok_or_else(no_memory)?;
    // SAFETY: `entry` is a fresh allocation with room for the header and the record.
    unsafe {
        let e = entry.as_ptr();
        ptr::write_bytes(e, 0, 1);
        (*e).sub_node.key = sub_key(fields.sub) as _;
        if let Some(sid) = fields.sid {
            (*e).node.key = sub_key(sid) as _;
            (*e).node.data = 1;
        }
        (*e).id = id.0;
        (*e).expires_at = fields.expires_at;
        (*e).provider = provider;
        Entry::set_record(entry, bytes);
    }
    if index::insert(table.index_mut(), id.key(), entry).is_err() {
        // Not reached: `make_room` kept the index under its cap and the id is not in it.
        // SAFETY: the fresh entry is linked nowhere.
        unsafe { pool.free(entry.cast()) };
        return Err(no_memory());
    }
    // SAFETY: links the entry into the locked zone's tree and queue.
    unsafe {
        let e = entry.as_ptr();
        ngx_rbtree_insert(&mut table.by_sub, &mut (*e).sub_node);
        if (*e).node.data == 1 {
            ngx_rbtree_insert(&mut table.by_sid, &mut (*e).node);
        }
        ngx_queue_insert_after(&mut table.lru, &mut (*e).lru);
    }
    table.count += 1;
    let mut eviction = Eviction { evicted, warn: false };
    if evicted > 0 && now - table.last_full_warning >= 60 {
        table.last_full_warning = now;
        eviction.warn = true;
    }
    Ok(eviction)
}

/// Deletes the session `id` (of any provider); whether it was there.
pub(super) fn remove_by_id(zone: &SessionZone, id: &SessionId) -> bool {
    let lock = zone.lock();
    let (table, pool) = (&mut lock.header.sessions, &lock.pool);
    let Some(entry) = index::find(table.index(), id.key()) else {
        return false;
    };
    // SAFETY: entries of the index are live sessions of the locked zone.
    if !constant_time_eq(&unsafe { entry.as_ref() }.id, &id.0) {
        return false;
    }
    table.delete(pool, entry);
    true
}

/// Deletes every session whose `sub` is `sub`; returns how many.
pub(super) fn remove_by_sub(zone: &SessionZone, sub: &str) -> usize {
    let key = sub_key(sub);
    let lock = zone.lock();
    let (table, pool) = (&mut lock.header.sessions, &lock.pool);
    let mut removed = 0;
    let mut node = first_at_least(&table.by_sub, key);
    // SAFETY: nodes of `by_sub` are live nodes of the locked tree.
    while !node.is_null() && unsafe { (*node).key } as u64 == key {
        // Deleting a node relinks the tree but moves no other node: its successor stays valid.
        // SAFETY: in-order successor in the locked tree; null after the last node.
        let next = unsafe { ngx_rbtree_next(&mut table.by_sub, node) };
        // SAFETY: nodes of `by_sub` are the `sub_node` fields of live sessions.
        let entry = unsafe { entry_of_sub_node(node) };
        // SAFETY: a live entry of the locked zone.
        if SessionRecord::peek_sub(unsafe { Entry::record(entry) }) == Some(sub) {
            table.delete(pool, entry);
            removed += 1;
        }
        node = next;
    }
    removed
}

/// Deletes every session whose `sid` is `sid`; returns how many.
pub(super) fn remove_by_sid(zone: &SessionZone, sid: &str) -> usize {
    let key = sub_key(sid);
    let lock = zone.lock();
    let (table, pool) = (&mut lock.header.sessions, &lock.pool);
    let mut removed = 0;
    let mut node = first_at_least(&table.by_sid, key);
    // SAFETY: nodes of `by_sid` are live nodes of the locked tree.
    while !node.is_null() && unsafe { (*node).key } as u64 == key {
        // SAFETY: in-order successor in the locked tree; null after the last node.
        let next = unsafe { ngx_rbtree_next(&mut table.by_sid, node) };
        // SAFETY: nodes of `by_sid` are the `node` fields of live sessions.
        let entry = unsafe { entry_of_sid_node(node) };
        // SAFETY: a live entry of the locked zone.
        if SessionRecord::peek_sid(unsafe { Entry::record(entry) }) == Some(sid.as_bytes()) {
            table.delete(pool, entry);
            removed += 1;
        }
        node = next;
    }
    removed
}

/// Live (possibly expired, not yet collected) sessions, free and total slab pages.
#[cfg(feature = "bench")]
pub(super) fn stats(zone: &SessionZone) -> (usize, usize, usize) {
    let lock = zone.lock();
    let (free, total) = lock.pool.pages();
    (lock.header.sessions.count, free, total)
}

impl SessionTable {
    /// Live (possibly expired, not yet collected) sessions.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Sets up an empty table in a fresh zone of `zone_size` bytes; `false` when the slab has no
    /// room for the index.
    ///
    /// # Safety
    /// `self` is in the fresh zone's header (it never moves) and `shpool` is that zone's slab
    /// pool, not locked.
    pub(super) unsafe fn init(&mut self, shpool: *mut ngx_slab_pool_t, zone_size: usize) -> bool {
        // One slot per KiB of zone (rounded up to a power of two): a typical session takes a
        // 2 KiB slab slot, so the index stays under half full; at 3/4 the oldest are evicted.
        let len = (zone_size / 1024).next_power_of_two().max(64);
        // SAFETY: allocates from the fresh slab pool (takes the pool mutex itself).
        let slots = unsafe { ngx_slab_alloc(shpool, len * size_of::<IndexSlot>()) };
        let Some(slots) = NonNull::new(slots as *mut IndexSlot) else {
            return false;
        };
        // SAFETY: `slots` is a fresh, exclusively owned allocation of `len` slots; the tree, its
        // sentinel and the queue head live in the header, which never moves.
        unsafe {
            for i in 0..len {
                slots.add(i).write(Slot::EMPTY);
            }
            ngx_rbtree_init(
                &mut self.by_sub,
                &mut self.by_sub_sentinel,
                Some(ngx_rbtree_insert_value),
            );
            ngx_rbtree_init(
                &mut self.by_sid,
                &mut self.by_sid_sentinel,
                Some(ngx_rbtree_insert_value),
            );
            ngx_queue_init(&mut self.lru);
        }
        self.index = slots.as_ptr();
        self.index_len = len;
        true
    }

    fn index(&self) -> &[IndexSlot] {
        // SAFETY: `index` holds `index_len` slots in the zone (see `init`), and the table is only
        // reached through the zone's lock.
        unsafe { core::slice::from_raw_parts(self.index, self.index_len) }
    }

    fn index_mut(&mut self) -> &mut [IndexSlot] {
        // SAFETY: as in `index`, and `&mut self` is the only way to the slots.
        unsafe { core::slice::from_raw_parts_mut(self.index, self.index_len) }
    }

    /// Finds room for a record of `len` bytes: drops up to two expired sessions, then evicts the
    /// least recently used ones until the index is under its cap and the slab has the bytes.
    /// Returns the allocation and how many sessions were evicted; `None` once nothing is left.
    fn make_room(
        &mut self,
        pool: &LockedPool,
        len: usize,
        now: UnixTime,
    ) -> Option<(NonNull<Entry>, usize)> {
        for _ in 0..2 {
            let Some(oldest) = lru_tail(&self.lru) else { break };
            // SAFETY: a live entry of the locked zone.
            if unsafe { oldest.as_ref() }.expires_at > now {
                break;
            }
            self.delete(pool, oldest);
        }
        let mut evicted = 0;
        loop {
            if self.count < index::max_entries(self.index_len) {
                if let Some(p) = pool.alloc(size_of::<Entry>() + len) {
                    return Some((p.cast(), evicted));
                }
            }
            let oldest = lru_tail(&self.lru)?;
            self.delete(pool, oldest);
            evicted += 1;
        }
    }

    /// Moves a live session to the head of the LRU queue.
    fn mark_used(&mut self, entry: NonNull<Entry>) {
        // SAFETY: a live entry and the queue of the locked zone.
        unsafe {
            let e = entry.as_ptr();
            ngx_queue_remove(&mut (*e).lru);
            ngx_queue_insert_after(&mut self.lru, &mut (*e).lru);
        }
    }

    /// Unlinks a live session and frees it.
    fn delete(&mut self, pool: &LockedPool, entry: NonNull<Entry>) {
        // SAFETY: a live session of the locked zone; it is unlinked before it is freed.
        unsafe {
            let e = entry.as_ptr();
            index::remove(self.index_mut(), SessionId((*e).id).key());
            ngx_rbtree_delete(&mut self.by_sub, &mut (*e).sub_node);
            if (*e).node.data == 1 {
                ngx_rbtree_delete(&mut self.by_sid, &mut (*e).node);
            }
            ngx_queue_remove(&mut (*e).lru);
            pool.free(entry.cast());
        }
        self.count -= 1;
    }
}

/// The leftmost node of `tree` (of the locked zone) with a key >= `key`; null if none.
fn first_at_least(tree: &ngx_rbtree_t, key: u64) -> *mut ngx_rbtree_node_t {
    let sentinel = tree.sentinel;
    let mut node = tree.root;
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
    first
}

fn sub_key(sub: &str) -> u64 {
    // FNV-1a: spreads `sub` values over the tree; collisions are resolved by comparing `sub`.
    sub.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Compares session ids in constant time, so timing reveals nothing about a guess.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a[..], &b[..]).into()
}

/// # Safety
/// `node` is the `node` field of a live session `Entry` (in `by_sid`).
unsafe fn entry_of_sid_node(node: *mut ngx_rbtree_node_t) -> NonNull<Entry> {
    // SAFETY: the caller guarantees `node` is inside an Entry, so the result is not null.
    unsafe { NonNull::new_unchecked((node as *mut u8).sub(offset_of!(Entry, node)) as _) }
}

/// # Safety
/// `node` is the `sub_node` field of a live `Entry`.
unsafe fn entry_of_sub_node(node: *mut ngx_rbtree_node_t) -> NonNull<Entry> {
    // SAFETY: the caller guarantees `node` is inside an Entry, so the result is not null.
    unsafe { NonNull::new_unchecked((node as *mut u8).sub(offset_of!(Entry, sub_node)) as _) }
}
