//! The shared store behind a zone (`store=`), seen from the event loop: the zone is the L1
//! cache, the store the shared source of truth (`authentik_core::remote`).
//!
//! - An L1 miss: a well-formed session cookie that is not in the zone is looked up in the store
//!   by a `Call::StoreSession` on nginx's thread pool (the request waits with `NGX_AGAIN`, at
//!   most `store_timeout`), the zone is filled, and the access decision runs again. Ids the
//!   store does not know are remembered by this worker for `MISS_TTL`, so garbage cookies reach
//!   the store once per id and worker. While the store is down (its circuit breaker is open)
//!   misses are not looked up at all.
//! - Writes that no request needs to wait for (pending logins, revocations, retries of failed
//!   session writes) go to this process's writer thread, which retries them while the store is
//!   down.
//! - The store's health is logged from here, at most once per interval per worker.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use authentik_core::remote::{Job, RemoteStore, Revocation, StoreError, StoredSession};
use authentik_core::session::{SessionId, SessionRecord};
use nginx_sys::{
    ngx_http_request_t, ngx_int_t, NGX_AGAIN, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE,
};
use ngx::http::HttpModuleMainConf;

use crate::call::{self, Call};
use crate::log::action;
use crate::provider::Provider;
use crate::session::now;
use crate::store::{SessionStore, ZoneError};
use crate::{ctx, request_log, HttpAuthentikModule};

/// How long an id the store does not know is answered "no session" without asking, seconds.
const MISS_TTL: i64 = 10;
/// Ids remembered as misses per worker, at most.
const MAX_MISSES: usize = 100_000;
/// How long a revocation is retried while the store is down, at most, seconds.
const REVOKE_RETRY: i64 = 24 * 3600;

thread_local! {
    /// Session ids the store did not know, and until when that answer holds.
    static MISSES: RefCell<HashMap<[u8; 32], i64>> = RefCell::new(HashMap::new());
}

fn missed_recently(id: &SessionId, now: i64) -> bool {
    MISSES.with(|m| m.borrow().get(&id.0).is_some_and(|until| *until > now))
}

fn remember_miss(id: &SessionId, now: i64) {
    MISSES.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= MAX_MISSES {
            m.retain(|_, until| *until > now);
            if m.len() >= MAX_MISSES {
                m.clear();
            }
        }
        m.insert(id.0, now + MISS_TTL);
    });
}

/// A session written to the store by the login's thread-pool call, before the zone has it.
pub struct SessionWrite {
    pub store: Arc<RemoteStore>,
    pub provider: u32,
    /// The session id, chosen before the write (the zone takes the same one).
    pub id: SessionId,
    pub result: Option<Result<(), StoreError>>,
}

impl SessionWrite {
    /// Runs on the pool thread: no nginx calls.
    pub fn run(&mut self, record: &SessionRecord, now: i64) {
        let value = StoredSession::encode(self.provider, record.expires_at, &record.encode());
        let ttl = record.expires_at - now;
        let sid = record.sid.as_deref();
        self.result = Some(self.store.put_session(&self.id.0, &record.sub, sid, &value, ttl));
    }

    /// The session went into the zone under another id: write that one (in the background).
    pub fn retry_as(mut self, id: SessionId, record: &SessionRecord) {
        self.id = id;
        self.retry(record);
    }

    /// The write failed: the writer thread retries it while the session lives.
    pub fn retry(&self, record: &SessionRecord) {
        let value = StoredSession::encode(self.provider, record.expires_at, &record.encode());
        enqueue(
            &self.store,
            Job::Session {
                id: self.id.0,
                sub: record.sub.clone(),
                sid: record.sid.clone(),
                value,
                expires_at: record.expires_at,
            },
        );
    }
}

/// The write of a new session of `provider` to its zone's store, if it has one.
pub fn session_write(provider: &Provider) -> Option<Box<SessionWrite>> {
    let store = provider.zone().remote.as_ref()?.clone();
    let write =
        SessionWrite { store, provider: provider.key, id: SessionId::generate(), result: None };
    Some(Box::new(write))
}

/// On an L1 miss of the well-formed session id `id`: starts its lookup in the store and
/// returns `NGX_AGAIN`, or `None` when there is nothing to ask (no store, looked up already,
/// a recent miss, the store known to be down, no room for a call).
pub fn lookup_on_miss(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    id: SessionId,
) -> Option<ngx_int_t> {
    let store = provider.zone().remote.as_ref()?;
    let ctx = ctx::get(r)?;
    if ctx.store_checked || missed_recently(&id, now()) {
        return None;
    }
    ctx.store_checked = true;
    if !store.available() {
        report(r, store);
        return None;
    }
    let pool = HttpAuthentikModule::main_conf(r)?.thread_pool;
    let lookup = Call::StoreSession { store: store.clone(), id, result: None };
    // An outpost provider stays alive with the call (the request may go first).
    let keep = ctx::held(r, provider);
    match call::start(r, pool, &provider.runtime, &provider.calls, keep, lookup) {
        Ok(handle) => {
            ctx::get(r)?.call = handle;
            Some(NGX_AGAIN as ngx_int_t)
        }
        Err(e) => {
            // A full queue (`max_pending_calls`) under a flood of unknown cookies: no session.
            request_log!(r, NGX_LOG_INFO, action::STORE, "{e}, session looked up in the zone only");
            None
        }
    }
}

/// The store's answer to an L1 miss: fills the zone (the access decision then finds the
/// session there) or remembers the miss.
pub fn lookup_done(
    r: &mut ngx_http_request_t,
    provider: &Provider,
    store: &RemoteStore,
    id: &SessionId,
    result: Option<Result<Option<StoredSession>, StoreError>>,
) {
    let now = now();
    match result {
        // Another provider's session is no session here.
        Some(Ok(Some(stored))) if stored.provider != provider.key => remember_miss(id, now),
        Some(Ok(Some(stored))) => {
            // Expired, or a record this version cannot read: no session. (A collision means a
            // concurrent request of the same user filled the zone first.)
            let inserted = provider.zone().insert_stored(id, &stored, now);
            if let Err(ZoneError::Unreadable) = inserted {
                remember_miss(id, now);
            }
        }
        Some(Ok(None)) => remember_miss(id, now),
        Some(Err(_)) | None => {}
    }
    report(r, store);
}

/// Logs the store's health if there is news (at most once per interval while it is down).
pub fn report(r: &mut ngx_http_request_t, store: &RemoteStore) {
    if let Some(msg) = store.take_report() {
        let level = if store.available() { NGX_LOG_NOTICE } else { NGX_LOG_ERR };
        request_log!(r, level, action::STORE, "{msg}");
    }
}

/// Hands `job` to this process's writer thread (started on first use).
pub fn enqueue(store: &Arc<RemoteStore>, job: Job) {
    if let Some(body) = store.start_writer() {
        // The writer never ends: keep the module mapped at exit (see `background`).
        crate::background::pin_module();
        if crate::background::spawn_detached("store-writer", body).is_err() {
            return;
        }
    }
    store.enqueue(job);
}

/// A pending login started on this node, for a callback that lands on another.
pub fn put_login(provider: &Provider, state: &str, bytes: Vec<u8>, now: i64) {
    if let Some(store) = &provider.zone().remote {
        let expires_at = now + provider.login_timeout;
        enqueue(store, Job::Login { state: state.to_string(), bytes, expires_at });
    }
}

/// A pending login used on this node: no other node may use it again.
pub fn forget_login(provider: &Provider, state: &str, now: i64) {
    if let Some(store) = &provider.zone().remote {
        let expires_at = now + provider.login_timeout;
        enqueue(store, Job::ForgetLogin { state: state.to_string(), expires_at });
    }
}

/// Sessions ended on this node: delete them in the store and tell every node.
pub fn revoke(zone_remote: &Option<Arc<RemoteStore>>, revocation: Revocation, now: i64) {
    if let Some(store) = zone_remote {
        enqueue(store, Job::Revoke { revocation, until: now + REVOKE_RETRY });
    }
}
