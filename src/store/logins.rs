//! Pending logins, keyed by their random `state`, in a fixed array of `LOGIN_SLOT`-byte slots
//! (about a quarter of the zone) allocated when the zone is created: a flood of unauthenticated
//! logins only recycles the oldest pending logins and can never take memory from sessions.

use core::mem::size_of;
use core::ptr::NonNull;

use authentik_core::oidc::PendingLogin;
use authentik_core::UnixTime;
use nginx_sys::{
    ngx_queue_init, ngx_queue_insert_after, ngx_queue_remove, ngx_queue_t, ngx_rbtree_delete,
    ngx_rbtree_init, ngx_rbtree_insert, ngx_rbtree_insert_value, ngx_rbtree_node_t, ngx_rbtree_t,
    ngx_slab_alloc, ngx_slab_pool_t,
};

use super::entry::{lru_tail, Entry};
use super::zone::SessionZone;
use super::ZoneError;

/// Bytes of one pending-login slot, header included.
const LOGIN_SLOT: usize = 3072;
/// The most a pending login's record may take.
const MAX_LOGIN_RECORD: usize = LOGIN_SLOT - size_of::<Entry>();

/// The pending logins' part of the zone header.
#[repr(C)]
pub(super) struct LoginSlots {
    /// Pending logins by the key of their `state`.
    pending: ngx_rbtree_t,
    pending_sentinel: ngx_rbtree_node_t,
    /// Pending logins, most recently started first.
    lru: ngx_queue_t,
    /// Unused slots.
    free: ngx_queue_t,
}

/// Stores a started login until its callback (at most `ttl` seconds) in a login slot; expired
/// and then the oldest pending logins make room. Never touches sessions.
pub(super) fn insert(
    zone: &SessionZone,
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
    let lock = zone.lock();
    let slots = &mut lock.header.logins;
    if slots.find(key).is_some() {
        return Err(ZoneError::Collision);
    }
    slots.expire(now);
    let Some(entry) = slots.take_free_slot() else {
        return Err(ZoneError::NoMemory(zone.name.clone()));
    };
    // SAFETY: `entry` is a slot of LOGIN_SLOT bytes, unlinked by `take_free_slot`, and
    // `MAX_LOGIN_RECORD` leaves room for its header; the tree and queue are the locked zone's.
    unsafe {
        let e = entry.as_ptr();
        (*e).node.key = key as _;
        (*e).expires_at = now + ttl;
        Entry::set_record(entry, &bytes);
        ngx_rbtree_insert(&mut slots.pending, &mut (*e).node);
        ngx_queue_insert_after(&mut slots.lru, &mut (*e).lru);
    }
    Ok(())
}

/// Removes and returns the pending login for `state` (one use), unless it has expired.
pub(super) fn take(zone: &SessionZone, state: &str, now: UnixTime) -> Option<PendingLogin> {
    let key = PendingLogin::key_of(state)?;
    let (bytes, expires_at) = {
        let lock = zone.lock();
        let slots = &mut lock.header.logins;
        let entry = slots.find(key)?;
        // SAFETY: a live login of the locked zone, copied out before it is released.
        let (bytes, expires_at) =
            unsafe { (Entry::record(entry).to_vec(), entry.as_ref().expires_at) };
        slots.release(entry);
        (bytes, expires_at)
    };
    let login = PendingLogin::decode(&bytes)?;
    if login.state != state || expires_at <= now {
        return None;
    }
    Some(login)
}

impl LoginSlots {
    /// Sets up the pending-login slots of a fresh zone of `zone_size` bytes: a quarter of it,
    /// allocated now and never given back; `false` when the slab has no room for them.
    ///
    /// # Safety
    /// `self` is in the fresh zone's header (it never moves) and `shpool` is that zone's slab
    /// pool, not locked.
    pub(super) unsafe fn init(&mut self, shpool: *mut ngx_slab_pool_t, zone_size: usize) -> bool {
        // SAFETY: the tree, its sentinel and the queue heads live in the header.
        unsafe {
            ngx_rbtree_init(
                &mut self.pending,
                &mut self.pending_sentinel,
                Some(ngx_rbtree_insert_value),
            );
            ngx_queue_init(&mut self.lru);
            ngx_queue_init(&mut self.free);
        }
        let count = (zone_size / 4 / LOGIN_SLOT).max(4);
        // SAFETY: allocates from the fresh slab pool (takes the pool mutex itself).
        let array = unsafe { ngx_slab_alloc(shpool, count * LOGIN_SLOT) } as *mut u8;
        if array.is_null() {
            return false;
        }
        for i in 0..count {
            let entry = array.wrapping_add(i * LOGIN_SLOT) as *mut Entry;
            // SAFETY: each slot is a fresh, exclusively owned LOGIN_SLOT-byte part of the array.
            unsafe {
                core::ptr::write_bytes(entry, 0, 1);
                ngx_queue_insert_after(&mut self.free, &mut (*entry).lru);
            }
        }
        true
    }

    /// Pending logins (a walk of the queue: for scrapes, not the hot path).
    pub(super) fn pending(&self) -> usize {
        let head: *const ngx_queue_t = &self.lru;
        let mut count = 0;
        let mut link = self.lru.next as *const ngx_queue_t;
        while !core::ptr::eq(link, head) {
            count += 1;
            // SAFETY: links of the locked zone's queue, ending at its head.
            link = unsafe { (*link).next };
        }
        count
    }

    /// The pending login whose state has `key`.
    fn find(&self, key: u64) -> Option<NonNull<Entry>> {
        let sentinel = self.pending.sentinel;
        let mut node = self.pending.root;
        while node != sentinel {
            // SAFETY: walking live nodes of the locked tree.
            let n = unsafe { &*node };
            let k = n.key as u64;
            if key < k {
                node = n.left;
            } else if key > k {
                node = n.right;
            } else {
                // `node` is the first field of Entry.
                return NonNull::new(node as *mut Entry);
            }
        }
        None
    }

    /// Releases every expired pending login.
    fn expire(&mut self, now: UnixTime) {
        while let Some(oldest) = lru_tail(&self.lru) {
            // SAFETY: a live login of the locked zone.
            if unsafe { oldest.as_ref() }.expires_at > now {
                break;
            }
            self.release(oldest);
        }
    }

    /// An unused slot, unlinked; the oldest pending login gives its slot up when none is free.
    fn take_free_slot(&mut self) -> Option<NonNull<Entry>> {
        if lru_tail(&self.free).is_none() {
            let oldest = lru_tail(&self.lru)?;
            self.release(oldest);
        }
        let slot = lru_tail(&self.free)?;
        // SAFETY: an unused slot of the locked zone, taken off the free queue.
        unsafe { ngx_queue_remove(&mut (*slot.as_ptr()).lru) };
        Some(slot)
    }

    /// Puts a pending login's slot back on the free queue.
    fn release(&mut self, entry: NonNull<Entry>) {
        // SAFETY: a live login of the locked zone; its slot goes back to the free queue.
        unsafe {
            let e = entry.as_ptr();
            ngx_rbtree_delete(&mut self.pending, &mut (*e).node);
            ngx_queue_remove(&mut (*e).lru);
            (*e).len = 0;
            ngx_queue_insert_after(&mut self.free, &mut (*e).lru);
        }
    }
}
