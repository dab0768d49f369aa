//! What a session zone holds, for `authentik_metrics`: read under the zone's lock at scrape
//! time, never on the request path.

use super::zone::SessionZone;

/// A snapshot of one zone.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZoneUsage {
    /// Sessions stored (expired ones not yet collected included).
    pub sessions: usize,
    /// Logins started and not yet completed (or collected after `login_timeout`).
    pub pending_logins: usize,
    /// Bytes of the slab's pages in use (the pending-login slots are reserved up front).
    pub used_bytes: usize,
    /// Bytes of free pages.
    pub free_bytes: usize,
}

impl SessionZone {
    pub fn usage(&self) -> ZoneUsage {
        let lock = self.lock();
        let (free, total) = lock.pool.pages();
        // SAFETY: ngx_pagesize is set at startup.
        let page = unsafe { nginx_sys::ngx_pagesize };
        ZoneUsage {
            sessions: lock.header.sessions.len(),
            pending_logins: lock.header.logins.pending(),
            used_bytes: total.saturating_sub(free) * page,
            free_bytes: free * page,
        }
    }
}
