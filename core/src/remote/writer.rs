//! Writes that no request waits for (pending logins, revocations, sessions whose write failed
//! at login), done by one thread per process in order, and retried while the store is down so
//! that a node catches up when it returns. Each job has a deadline after which it is moot.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use super::{RemoteStore, Revocation};
use crate::UnixTime;

/// Jobs waiting for the writer thread, at most (beyond, new jobs are dropped).
const QUEUE: usize = 1024;
/// Jobs kept for retry while the store is down, at most (the oldest go first).
const MAX_PENDING: usize = 10_000;

/// One write.
pub enum Job {
    Session { id: [u8; 32], sub: String, sid: Option<String>, value: Vec<u8>, expires_at: UnixTime },
    Login { state: String, bytes: Vec<u8>, expires_at: UnixTime },
    ForgetLogin { state: String, expires_at: UnixTime },
    Revoke { revocation: Revocation, until: UnixTime },
}

impl Job {
    fn deadline(&self) -> UnixTime {
        match self {
            Job::Session { expires_at, .. }
            | Job::Login { expires_at, .. }
            | Job::ForgetLogin { expires_at, .. } => *expires_at,
            Job::Revoke { until, .. } => *until,
        }
    }
}

/// The sending side, kept in the `RemoteStore` of the process.
pub struct Writer {
    tx: SyncSender<Job>,
}

impl Writer {
    pub(super) fn send(&self, job: Job) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

impl RemoteStore {
    /// Sets up this process's writer; returns the body for its thread the first time.
    pub fn start_writer(self: &Arc<Self>) -> Option<Box<dyn FnOnce() + Send>> {
        if self.writer.get().is_some() {
            return None;
        }
        let (tx, rx) = sync_channel(QUEUE);
        self.writer.set(Writer { tx }).ok()?;
        let store = self.clone();
        Some(Box::new(move || store.write_loop(rx)))
    }

    fn write_loop(&self, rx: Receiver<Job>) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        loop {
            let wait = if pending.is_empty() {
                Duration::from_secs(3600)
            } else {
                super::client::RETRY_AFTER
            };
            match rx.recv_timeout(wait) {
                Ok(job) => pending.push_back(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(job) = rx.try_recv() {
                pending.push_back(job);
            }
            while pending.len() > MAX_PENDING {
                pending.pop_front();
            }
            while let Some(job) = pending.front() {
                if job.deadline() <= unix_now() {
                    pending.pop_front();
                    continue;
                }
                if !self.available() || self.apply(job).is_err() {
                    break;
                }
                pending.pop_front();
            }
        }
    }

    fn apply(&self, job: &Job) -> Result<(), super::StoreError> {
        let ttl = |deadline: UnixTime| deadline - unix_now();
        match job {
            Job::Session { id, sub, sid, value, expires_at } => {
                self.put_session(id, sub, sid.as_deref(), value, ttl(*expires_at))
            }
            Job::Login { state, bytes, expires_at } => {
                self.put_login(state, bytes, ttl(*expires_at))
            }
            Job::ForgetLogin { state, .. } => self.forget_login(state),
            Job::Revoke { revocation, .. } => self.revoke(revocation),
        }
    }
}

pub fn unix_now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
