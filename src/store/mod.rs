//! The session store: sessions and pending logins, seen by every worker.
//!
//! The handlers use it through [`SessionStore`]. Today its one implementation is
//! [`SessionZone`], an `authentik_session_zone` in nginx shared memory; a second tier (a remote
//! store) can implement the same trait behind the handlers.
//!
//! The zone (one slab pool per `authentik_session_zone`) starts with a header (`zone`) that
//! holds:
//! - the sessions (`sessions`): an open-addressing hash index keyed by the first 8 bytes of the
//!   random session id, so a lookup touches one or two cache lines whatever the number of
//!   sessions (an rbtree over a million 2 KB entries costs a cache miss per level); an rbtree of
//!   the same entries keyed by a hash of the `sub` claim (sign-out), one keyed by a hash of the
//!   `sid` claim (authentik's SESSION_END); an LRU queue (eviction when
//!   the zone is full). Every session is bound to the provider that created it (a hash of issuer
//!   and client_id): a lookup through another provider does not find it.
//! - the pending logins (`logins`): a fixed array of slots allocated with the zone, so logins
//!   never take memory from sessions.
//!
//! Every operation holds the slab pool's mutex for a short, allocation-free, panic-free critical
//! section, except that record bytes are copied out to process memory before decoding.

mod entry;
mod logins;
mod sessions;
mod usage;
mod zone;

use authentik_core::oidc::PendingLogin;
use authentik_core::remote::{RemoteStore, StoredSession};
use authentik_core::session::{SessionId, SessionRecord, SessionView};
use authentik_core::UnixTime;

pub use usage::ZoneUsage;
pub use zone::{SessionZone, SharedZoneError};

/// The shared store behind a zone (`store=`), if any.
pub type Remote = Option<std::sync::Arc<RemoteStore>>;

/// What the handlers need from a session store. Sessions are bound to a provider key: a lookup
/// with another key does not find them.
pub trait SessionStore {
    /// Copies the session's record bytes into memory from `alloc` (which must not block), if
    /// the session exists, was created by `provider` and has not expired; marks it used.
    fn lookup<'a>(
        &self,
        id: &SessionId,
        provider: u32,
        now: UnixTime,
        alloc: impl FnOnce(usize) -> Option<&'a mut [u8]>,
    ) -> Option<&'a [u8]>;

    /// Stores a new session of `provider`, evicting expired and then least recently used
    /// sessions for room; a record over the store's limit is refused before anything is evicted.
    fn insert(
        &self,
        id: &SessionId,
        provider: u32,
        record: &SessionRecord,
        now: UnixTime,
    ) -> Result<Eviction, ZoneError>;

    /// Deletes every session whose `sub` is `sub`; returns how many.
    fn remove_by_sub(&self, sub: &str) -> usize;

    /// Deletes the session `id` (a revocation from the shared store); whether it was there.
    fn remove_by_id(&self, id: &SessionId) -> bool;

    /// Stores a session read from the shared store (an L1 miss), unless it has expired or its
    /// record is not one this version reads.
    fn insert_stored(
        &self,
        id: &SessionId,
        stored: &StoredSession,
        now: UnixTime,
    ) -> Result<Eviction, ZoneError>;

    /// Deletes every session whose `sid` is `sid` (authentik's SESSION_END); returns how many.
    fn remove_by_sid(&self, sid: &str) -> usize;

    /// Stores a started login until its callback, at most `ttl` seconds; expired and then the
    /// oldest pending logins make room, never sessions.
    fn insert_login(&self, login: &PendingLogin, ttl: i64, now: UnixTime) -> Result<(), ZoneError>;

    /// Removes and returns the pending login for `state` (one use), unless it has expired.
    fn take_login(&self, state: &str, now: UnixTime) -> Option<PendingLogin>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZoneError {
    #[error("session zone \"{0}\" has no room for this record")]
    NoMemory(String),
    #[error("session id collision")]
    Collision,
    #[error("record of {0} bytes is larger than the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("session record from the store is expired or unreadable")]
    Unreadable,
}

/// What an insert had to do to find room.
#[derive(Debug, Default)]
pub struct Eviction {
    pub evicted: usize,
    /// `true` at most once a minute for the whole zone: log the warning then.
    pub warn: bool,
}

impl SessionStore for SessionZone {
    fn lookup<'a>(
        &self,
        id: &SessionId,
        provider: u32,
        now: UnixTime,
        alloc: impl FnOnce(usize) -> Option<&'a mut [u8]>,
    ) -> Option<&'a [u8]> {
        sessions::lookup(self, id, provider, now, alloc)
    }

    fn insert(
        &self,
        id: &SessionId,
        provider: u32,
        record: &SessionRecord,
        now: UnixTime,
    ) -> Result<Eviction, ZoneError> {
        sessions::insert(self, id, provider, record, now)
    }

    fn remove_by_sub(&self, sub: &str) -> usize {
        sessions::remove_by_sub(self, sub)
    }

    fn remove_by_sid(&self, sid: &str) -> usize {
        sessions::remove_by_sid(self, sid)
    }

    fn remove_by_id(&self, id: &SessionId) -> bool {
        sessions::remove_by_id(self, id)
    }

    fn insert_stored(
        &self,
        id: &SessionId,
        stored: &StoredSession,
        now: UnixTime,
    ) -> Result<Eviction, ZoneError> {
        let bytes = &stored.record;
        let (Some(_), Some(sub)) = (SessionView::parse(bytes), SessionRecord::peek_sub(bytes))
        else {
            return Err(ZoneError::Unreadable);
        };
        if stored.expires_at <= now {
            return Err(ZoneError::Unreadable);
        }
        let sid = SessionRecord::peek_sid(bytes).and_then(|s| core::str::from_utf8(s).ok());
        let fields = sessions::Fields { sub, sid, expires_at: stored.expires_at };
        sessions::insert_encoded(self, id, stored.provider, bytes, fields, now)
    }

    fn insert_login(&self, login: &PendingLogin, ttl: i64, now: UnixTime) -> Result<(), ZoneError> {
        logins::insert(self, login, ttl, now)
    }

    fn take_login(&self, state: &str, now: UnixTime) -> Option<PendingLogin> {
        logins::take(self, state, now)
    }
}

#[cfg(feature = "bench")]
impl SessionZone {
    /// Live (possibly expired, not yet collected) sessions, free and total slab pages.
    pub fn stats(&self) -> (usize, usize, usize) {
        sessions::stats(self)
    }
}
