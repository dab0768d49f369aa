//! The blocking client of the shared store: a few idle connections per process, one deadline
//! (`store_timeout`) per operation, and a circuit breaker: after a failure the store counts as
//! down for `RETRY_AFTER`, and operations fail at once instead of each waiting the timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use super::writer::{Job, Writer};
use super::{Revocation, StoreSettings, StoredSession};

/// How long the store counts as down after a failed operation.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How often, at most, a process says that the store is still down.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Idle connections kept per process.
const MAX_IDLE: usize = 8;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("session store {0} is down, not tried")]
    Down(String),
    #[error("session store {0} failed: {1}")]
    Failed(String, String),
}

/// One configured store, per process (copied into each worker by fork, unused before).
pub struct RemoteStore {
    pub settings: StoreSettings,
    info: ConnectionInfo,
    idle: Mutex<Vec<redis::Connection>>,
    /// Milliseconds since `epoch` until which the store counts as down.
    down_until: AtomicU64,
    epoch: Instant,
    /// Whether the last operation failed, and the error not yet reported.
    down: AtomicBool,
    report: Mutex<Report>,
    pub(super) writer: OnceLock<Writer>,
}

#[derive(Default)]
struct Report {
    error: Option<String>,
    last: Option<Instant>,
    recovered: bool,
}

impl RemoteStore {
    pub fn new(settings: StoreSettings) -> Result<Arc<RemoteStore>, String> {
        let addr = if settings.tls {
            ConnectionAddr::TcpTls {
                host: settings.host.clone(),
                port: settings.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(settings.host.clone(), settings.port)
        };
        let mut redis = RedisConnectionInfo::default().set_db(settings.db).set_skip_set_lib_name();
        if let Some(user) = &settings.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &settings.password {
            redis = redis.set_password(password);
        }
        let info =
            addr.into_connection_info().map_err(|e| e.to_string())?.set_redis_settings(redis);
        Ok(Arc::new(RemoteStore {
            settings,
            info,
            idle: Mutex::new(Vec::new()),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            down: AtomicBool::new(false),
            report: Mutex::default(),
            writer: OnceLock::new(),
        }))
    }

    fn url(&self) -> String {
        self.settings.display_url()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the circuit breaker lets an operation try the store now.
    pub fn available(&self) -> bool {
        self.now_ms() >= self.down_until.load(Ordering::Relaxed)
    }

    /// A fresh connection with the deadline's time left as its timeouts.
    pub(super) fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.info.clone())?;
        // redis 1.2 unwraps a failed TLS handshake (an untrusted certificate) on this path:
        // the panic stays here and becomes the error it should have been.
        let connect = std::panic::AssertUnwindSafe(|| client.get_connection_with_timeout(timeout));
        std::panic::catch_unwind(connect).unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown error");
            let detail = tls_failure(msg);
            Err(redis::RedisError::from((redis::ErrorKind::Io, "TLS handshake failed", detail)))
        })
    }

    fn failed(&self, e: &redis::RedisError) -> StoreError {
        let now = self.now_ms();
        self.down_until.store(now + RETRY_AFTER.as_millis() as u64, Ordering::Relaxed);
        self.down.store(true, Ordering::Relaxed);
        let msg = e.to_string();
        let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        report.error = Some(msg.clone());
        report.recovered = false;
        StoreError::Failed(self.url(), msg)
    }

    fn succeeded(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
            report.recovered = true;
            report.error = None;
        }
    }

    /// What the event loop should log about the store's health now, at most once per
    /// `REPORT_INTERVAL` while it is down, and once when it is back.
    pub fn take_report(&self) -> Option<String> {
        let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        if report.recovered {
            report.recovered = false;
            report.last = None;
            return Some(format!("session store {} is reachable again", self.url()));
        }
        let error = report.error.as_ref()?;
        if report.last.is_some_and(|last| last.elapsed() < REPORT_INTERVAL) {
            return None;
        }
        let msg = format!(
            "session store {} is unreachable: {error}; sessions and logins are node-local until it returns",
            self.url()
        );
        report.last = Some(Instant::now());
        Some(msg)
    }

    /// Runs `op` on an idle or a new connection within `store_timeout`. A pooled connection
    /// that turns out dead (the server restarted) is replaced once.
    fn with_connection<T>(
        &self,
        op: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        if !self.available() {
            return Err(StoreError::Down(self.url()));
        }
        let timeout = self.settings.timeout;
        let deadline = Instant::now() + timeout;
        let pooled = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let left =
            || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let attempt = |conn: &mut redis::Connection| {
            conn.set_read_timeout(Some(left()))?;
            conn.set_write_timeout(Some(left()))?;
            op(conn)
        };
        let (conn, result) = match pooled {
            Some(mut conn) => {
                let result = attempt(&mut conn);
                match result {
                    Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                        match self.connect(left()) {
                            Ok(mut fresh) => {
                                let result = attempt(&mut fresh);
                                (fresh, result)
                            }
                            Err(e) => return Err(self.failed(&e)),
                        }
                    }
                    result => (conn, result),
                }
            }
            None => match self.connect(left()) {
                Ok(mut conn) => {
                    let result = attempt(&mut conn);
                    (conn, result)
                }
                Err(e) => return Err(self.failed(&e)),
            },
        };
        match result {
            Ok(value) => {
                self.succeeded();
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                if idle.len() < MAX_IDLE {
                    idle.push(conn);
                }
                Ok(value)
            }
            Err(e) => {
                drop(conn);
                Err(self.failed(&e))
            }
        }
    }

    /// The session `id` in the store, if there is one this version can read.
    pub fn get_session(&self, id: &[u8; 32]) -> Result<Option<StoredSession>, StoreError> {
        let key = self.settings.session_key(id);
        let bytes: Option<Vec<u8>> =
            self.with_connection(|c| redis::cmd("GET").arg(&key).query(c))?;
        Ok(bytes.and_then(|b| StoredSession::decode(&b)))
    }

    /// Stores a session until it expires, indexed by its user and authentik session.
    pub fn put_session(
        &self,
        id: &[u8; 32],
        sub: &str,
        sid: Option<&str>,
        value: &[u8],
        ttl: i64,
    ) -> Result<(), StoreError> {
        if ttl <= 0 {
            return Ok(());
        }
        let s = &self.settings;
        let key = s.session_key(id);
        let member = &key[s.prefix.len() + 2..];
        let mut sets = vec![s.sub_key(sub)];
        sets.extend(sid.map(|sid| s.sid_key(sid)));
        self.with_connection(|c| {
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("SET").arg(&key).arg(value).arg("EX").arg(ttl).ignore();
            for set in &sets {
                pipe.cmd("SADD").arg(set).arg(member).ignore();
                pipe.cmd("EXPIRE").arg(set).arg(ttl).arg("NX").ignore();
                pipe.cmd("EXPIRE").arg(set).arg(ttl).arg("GT").ignore();
            }
            pipe.exec(c)
        })
    }

    pub fn put_login(&self, state: &str, bytes: &[u8], ttl: i64) -> Result<(), StoreError> {
        let key = self.settings.login_key(state);
        let ttl = ttl.max(1);
        self.with_connection(|c| redis::cmd("SET").arg(&key).arg(bytes).arg("EX").arg(ttl).exec(c))
    }

    /// Removes and returns a pending login (one use, whichever node asks first).
    pub fn take_login(&self, state: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.settings.login_key(state);
        self.with_connection(|c| redis::cmd("GETDEL").arg(&key).query(c))
    }

    pub fn forget_login(&self, state: &str) -> Result<(), StoreError> {
        let key = self.settings.login_key(state);
        self.with_connection(|c| redis::cmd("DEL").arg(&key).exec(c))
    }

    /// Deletes the revoked sessions from the store and tells every node.
    pub fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let s = &self.settings;
        let channel = s.revoke_channel();
        let message = revocation.encode();
        let set = match revocation {
            Revocation::Id(id) => {
                let key = s.session_key(id);
                return self.with_connection(|c| {
                    redis::pipe()
                        .cmd("DEL")
                        .arg(&key)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(&channel)
                        .arg(&message)
                        .ignore()
                        .exec(c)
                });
            }
            Revocation::Sub(sub) => s.sub_key(sub),
            Revocation::Sid(sid) => s.sid_key(sid),
        };
        self.with_connection(|c| {
            let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS").arg(&set).query(c)?;
            let mut pipe = redis::pipe();
            for member in &members {
                let mut key = format!("{}s:", s.prefix).into_bytes();
                key.extend_from_slice(member);
                pipe.cmd("DEL").arg(key).ignore();
            }
            pipe.cmd("DEL").arg(&set).ignore();
            pipe.cmd("PUBLISH").arg(&channel).arg(&message).ignore();
            pipe.exec(c)
        })
    }

    /// Queues a write for this process's writer thread (retried while the store is down);
    /// `false` when the writer is not started or its queue is full.
    pub fn enqueue(&self, job: Job) -> bool {
        self.writer.get().is_some_and(|w| w.send(job))
    }

    /// Listens on the revocation channel and the expired/evicted keyspace notifications until
    /// `stop()` says so or the connection fails; `on` gets every revocation. Reads time out
    /// every second so that `stop` is checked. Returns why it ended (`None`: asked to stop).
    pub fn listen(
        &self,
        mut stop: impl FnMut() -> bool,
        mut subscribed: impl FnMut(),
        mut on: impl FnMut(Revocation),
    ) -> Option<StoreError> {
        let mut conn = match self.connect(self.settings.timeout.max(Duration::from_secs(1))) {
            Ok(conn) => conn,
            Err(e) => return Some(StoreError::Failed(self.url(), e.to_string())),
        };
        let fail = |e: redis::RedisError| Some(StoreError::Failed(self.url(), e.to_string()));
        let mut pubsub = conn.as_pubsub();
        let channel = self.settings.revoke_channel();
        let [expired, evicted] = self.settings.keyevent_channels();
        if let Err(e) = pubsub.subscribe(&[channel.as_str(), expired.as_str(), evicted.as_str()]) {
            return fail(e);
        }
        if let Err(e) = pubsub.set_read_timeout(Some(Duration::from_secs(1))) {
            return fail(e);
        }
        subscribed();
        loop {
            if stop() {
                return None;
            }
            let msg = match pubsub.get_message() {
                Ok(msg) => msg,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return fail(e),
            };
            let payload = msg.get_payload_bytes();
            let revocation = if msg.get_channel_name() == channel {
                Revocation::decode(payload)
            } else {
                self.settings.session_of_key(payload).map(Revocation::Id)
            };
            if let Some(revocation) = revocation {
                on(revocation);
            }
        }
    }
}

/// The readable part of a failed TLS handshake's debug dump: OpenSSL's reason and the
/// certificate verification result, else the whole message.
fn tls_failure(msg: &str) -> String {
    let quoted_after = |key: &str| {
        let start = msg.find(key)? + key.len();
        let end = msg[start..].find('"')?;
        Some(&msg[start..start + end])
    };
    match (quoted_after("reason: \""), quoted_after("error: \"")) {
        (Some(reason), Some(verify)) => format!("{reason} ({verify})"),
        (Some(reason), None) => reason.to_string(),
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::tls_failure;

    #[test]
    fn tls_failures_read_like_openssl() {
        let dump = r#"called `Result::unwrap()` on an `Err` value: Failure(Ssl(Error { code: ErrorCode(1), cause: Some(Ssl(ErrorStack([Error { code: 167772294, library: "SSL routines", function: "tls_post_process_server_certificate", reason: "certificate verify failed", file: "../ssl/statem/statem_clnt.c", line: 1889 }]))) }, X509VerifyResult { code: 19, error: "self-signed certificate in certificate chain" }))"#;
        assert_eq!(
            tls_failure(dump),
            "certificate verify failed (self-signed certificate in certificate chain)"
        );
        assert_eq!(tls_failure("something else"), "something else");
    }
}
