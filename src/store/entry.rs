//! The slab entry that holds a session or a pending login, and the queue helper both use.
//! Entries are only touched with the zone's mutex held.

use core::mem::{offset_of, size_of};
use core::ptr::{self, NonNull};

use nginx_sys::{ngx_queue_empty, ngx_queue_t, ngx_rbtree_node_t};

/// A session or a pending login in the slab; the record's bytes follow the struct.
#[repr(C)]
pub(super) struct Entry {
    /// Logins: node in the pending-login tree, keyed by the state's key. Sessions with a
    /// `sid`: node in `by_sid` (`data` is 1 then).
    pub(super) node: ngx_rbtree_node_t,
    /// Sessions: node in `by_sub`, keyed by a hash of `sub`. Logins: unused.
    pub(super) sub_node: ngx_rbtree_node_t,
    /// Sessions: link in the LRU queue. Logins: link in the LRU or the free queue.
    pub(super) lru: ngx_queue_t,
    /// Sessions: the session id. Logins: unused.
    pub(super) id: [u8; 32],
    pub(super) expires_at: i64,
    /// Bytes of the record that follows.
    pub(super) len: u32,
    /// Sessions: the key of the provider that created it (see `sessions::lookup`).
    pub(super) provider: u32,
}

// A typical authentik session record is at most 2048 - 144 bytes (see the core test
// `typical_authentik_session_fits_a_2k_slot`), so with this header it takes one 2 KB slab slot.
const _: () = assert!(size_of::<Entry>() <= 144);

impl Entry {
    /// The record's bytes.
    ///
    /// # Safety
    /// `entry` is a live entry of a locked zone, and the zone stays locked while the slice is
    /// used.
    pub(super) unsafe fn record<'a>(entry: NonNull<Entry>) -> &'a [u8] {
        // SAFETY: a live entry is followed by its `len` record bytes (see `set_record`).
        unsafe {
            let len = (*entry.as_ptr()).len as usize;
            core::slice::from_raw_parts(entry.as_ptr().add(1) as *const u8, len)
        }
    }

    /// Copies `bytes` behind the entry as its record.
    ///
    /// # Safety
    /// `entry` is an entry of a locked zone with room for `bytes.len()` bytes after it.
    pub(super) unsafe fn set_record(entry: NonNull<Entry>, bytes: &[u8]) {
        // SAFETY: the caller guarantees the room; `bytes` is process memory, not the slab.
        unsafe {
            (*entry.as_ptr()).len = bytes.len() as u32;
            let data = entry.as_ptr().add(1) as *mut u8;
            ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
        }
    }
}

/// The entry whose `lru` link is last in `queue` (the least recently used one), if any.
pub(super) fn lru_tail(queue: &ngx_queue_t) -> Option<NonNull<Entry>> {
    // SAFETY: `queue` is a live list head of the locked zone.
    if unsafe { ngx_queue_empty(queue) } {
        return None;
    }
    NonNull::new((queue.prev as *mut u8).wrapping_sub(offset_of!(Entry, lru)) as *mut Entry)
}
