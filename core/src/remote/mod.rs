//! The shared session store of several nginx nodes (`authentik_session_zone ... store=`): a
//! Valkey or Redis server behind each node's shared-memory zone, which stays the L1 cache.
//!
//! What lives there, under `store_prefix` (default `authentik:`):
//! - `<prefix>s:<64 hex session id>`: a session, [`StoredSession`] bytes, TTL = the session's
//!   remaining lifetime (the store never holds more than the live sessions);
//! - `<prefix>l:<state>`: a pending login ([`crate::oidc::PendingLogin`] bytes), TTL =
//!   `login_timeout`, taken with `GETDEL` (one use across nodes);
//! - `<prefix>u:<sub>` and `<prefix>d:<sid>`: sets of the session ids of a user and of an
//!   authentik session, for sign-out and SESSION_END, TTL = their longest session's;
//! - the channel `<prefix>revoke`: [`Revocation`]s published when sessions end, which every
//!   node's background task applies to its zone.
//!
//! Everything here is blocking (thread-pool calls and background threads) and free of nginx.

mod client;
mod writer;

use std::time::Duration;

pub use client::{RemoteStore, StoreError};
pub use writer::{unix_now, Job, Writer};

use crate::UnixTime;

/// `store=`, `store_password_file=`, `store_prefix=`, `store_timeout=` as configured.
#[derive(Clone)]
pub struct StoreSettings {
    /// `redis://` or `rediss://` (TLS with certificate and host name verification).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
    /// ACL user (`redis://user@host`); the password only ever comes from a file.
    pub username: Option<String>,
    pub password: Option<String>,
    pub prefix: String,
    /// One deadline per store operation (connect included).
    pub timeout: Duration,
}

impl core::fmt::Debug for StoreSettings {
    /// Never shows the password.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.display_url())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreConfigError {
    #[error("invalid store URL \"{0}\"")]
    Url(String),
    #[error("store URL \"{0}\" must be redis:// or rediss://")]
    Scheme(String),
    #[error("store URL must not contain a password, use \"store_password_file=\"")]
    PasswordInUrl,
    #[error("invalid database number in store URL \"{0}\"")]
    Db(String),
    #[error("invalid store_prefix \"{0}\"")]
    Prefix(String),
}

impl StoreSettings {
    /// Parses `redis://[user@]host[:port][/db]` or `rediss://...`; the port defaults to 6379.
    pub fn parse(
        url: &str,
        password: Option<String>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<StoreSettings, StoreConfigError> {
        let parsed = url::Url::parse(url).map_err(|_| StoreConfigError::Url(url.to_string()))?;
        let tls = match parsed.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err(StoreConfigError::Scheme(url.to_string())),
        };
        if parsed.password().is_some() {
            return Err(StoreConfigError::PasswordInUrl);
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(StoreConfigError::Url(url.to_string()));
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(StoreConfigError::Url(url.to_string())),
        };
        let db = match parsed.path().trim_start_matches('/') {
            "" => 0,
            n => n
                .parse::<i64>()
                .ok()
                .filter(|d| (0..=1_000_000).contains(d))
                .ok_or_else(|| StoreConfigError::Db(url.to_string()))?,
        };
        if prefix.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(StoreConfigError::Prefix(prefix.to_string()));
        }
        let username = (!parsed.username().is_empty()).then(|| parsed.username().to_string());
        Ok(StoreSettings {
            tls,
            host,
            port: parsed.port().unwrap_or(6379),
            db,
            username,
            password,
            prefix: prefix.to_string(),
            timeout,
        })
    }

    /// The URL for logs: no password (there is none in it).
    pub fn display_url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host =
            if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("{scheme}://{host}:{}/{}", self.port, self.db)
    }

    pub fn session_key(&self, id: &[u8; 32]) -> Vec<u8> {
        let mut key = format!("{}s:", self.prefix).into_bytes();
        key.extend(hex(id).bytes());
        key
    }
    pub fn login_key(&self, state: &str) -> Vec<u8> {
        format!("{}l:{state}", self.prefix).into_bytes()
    }
    pub fn sub_key(&self, sub: &str) -> Vec<u8> {
        format!("{}u:{sub}", self.prefix).into_bytes()
    }
    pub fn sid_key(&self, sid: &str) -> Vec<u8> {
        format!("{}d:{sid}", self.prefix).into_bytes()
    }
    pub fn revoke_channel(&self) -> String {
        format!("{}revoke", self.prefix)
    }
    /// The keyspace-notification channels of expired and evicted keys of the store's database.
    pub fn keyevent_channels(&self) -> [String; 2] {
        [format!("__keyevent@{}__:expired", self.db), format!("__keyevent@{}__:evicted", self.db)]
    }

    /// The session id of a key name from a keyspace notification, if it is one of our sessions.
    pub fn session_of_key(&self, key: &[u8]) -> Option<[u8; 32]> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?.strip_prefix(b"s:")?;
        unhex(rest)
    }
}

/// A session as stored: the provider key and expiry the zone needs, then the record bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct StoredSession {
    pub provider: u32,
    pub expires_at: UnixTime,
    pub record: Vec<u8>,
}

const STORED_VERSION: u8 = 1;
const STORED_HEADER: usize = 1 + 4 + 8;

impl StoredSession {
    pub fn encode(provider: u32, expires_at: UnixTime, record: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(STORED_HEADER + record.len());
        out.push(STORED_VERSION);
        out.extend_from_slice(&provider.to_le_bytes());
        out.extend_from_slice(&expires_at.to_le_bytes());
        out.extend_from_slice(record);
        out
    }

    /// `None` for bytes this version did not write (another version, damage).
    pub fn decode(bytes: &[u8]) -> Option<StoredSession> {
        if bytes.len() < STORED_HEADER || bytes[0] != STORED_VERSION {
            return None;
        }
        let provider = u32::from_le_bytes(bytes[1..5].try_into().ok()?);
        let expires_at = i64::from_le_bytes(bytes[5..13].try_into().ok()?);
        Some(StoredSession { provider, expires_at, record: bytes[STORED_HEADER..].to_vec() })
    }
}

/// Sessions that ended, as published on `<prefix>revoke` and applied by every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// One session (sign-out without a record in this node's zone; store expiry or eviction).
    Id([u8; 32]),
    /// Every session of a user (sign-out).
    Sub(String),
    /// Every session of an authentik session (SESSION_END).
    Sid(String),
}

impl Revocation {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Revocation::Id(id) => format!("id {}", hex(id)).into_bytes(),
            Revocation::Sub(sub) => format!("sub {sub}").into_bytes(),
            Revocation::Sid(sid) => format!("sid {sid}").into_bytes(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Revocation> {
        let text = core::str::from_utf8(bytes).ok()?;
        let (kind, value) = text.split_once(' ')?;
        match kind {
            "id" => unhex(value.as_bytes()).map(Revocation::Id),
            "sub" if !value.is_empty() => Some(Revocation::Sub(value.to_string())),
            "sid" if !value.is_empty() => Some(Revocation::Sid(value.to_string())),
            _ => None,
        }
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let s = core::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> Result<StoreSettings, StoreConfigError> {
        StoreSettings::parse(url, None, "authentik:", Duration::from_millis(200))
    }

    #[test]
    fn urls() {
        let s = settings("redis://10.0.0.5:6379/0").unwrap();
        assert_eq!((s.tls, s.host.as_str(), s.port, s.db), (false, "10.0.0.5", 6379, 0));
        let s = settings("rediss://user@cache.example/3").unwrap();
        assert_eq!((s.tls, s.port, s.db, s.username.as_deref()), (true, 6379, 3, Some("user")));
        assert_eq!(s.display_url(), "rediss://cache.example:6379/3");
        assert_eq!(settings("redis://:secret@h/0").unwrap_err(), StoreConfigError::PasswordInUrl);
        assert!(matches!(settings("http://h/0"), Err(StoreConfigError::Scheme(_))));
        assert!(matches!(settings("redis://h/x"), Err(StoreConfigError::Db(_))));
        assert!(matches!(settings("redis://h/0#insecure"), Err(StoreConfigError::Url(_))));
        assert!(matches!(settings("redis:///0"), Err(StoreConfigError::Url(_))));
        assert!(matches!(settings("nonsense"), Err(StoreConfigError::Url(_))));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let s = StoreSettings::parse(
            "redis://h/0",
            Some("hunter2".into()),
            "p:",
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn keys_and_notifications() {
        let s = settings("redis://h/2").unwrap();
        let id = [0xab; 32];
        let key = s.session_key(&id);
        assert_eq!(key.len(), "authentik:s:".len() + 64);
        assert_eq!(s.session_of_key(&key), Some(id));
        assert_eq!(s.session_of_key(b"authentik:l:abc"), None);
        assert_eq!(s.session_of_key(b"other:s:ab"), None);
        assert_eq!(s.keyevent_channels()[0], "__keyevent@2__:expired");
    }

    #[test]
    fn stored_sessions_round_trip() {
        let bytes = StoredSession::encode(7, 1_700_000_000, b"record");
        let back = StoredSession::decode(&bytes).unwrap();
        assert_eq!(
            back,
            StoredSession { provider: 7, expires_at: 1_700_000_000, record: b"record".to_vec() }
        );
        assert_eq!(StoredSession::decode(&bytes[..5]), None);
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(StoredSession::decode(&other), None);
    }

    #[test]
    fn revocations_round_trip() {
        for r in
            [Revocation::Id([1; 32]), Revocation::Sub("u 1".into()), Revocation::Sid("s".into())]
        {
            assert_eq!(Revocation::decode(&r.encode()), Some(r));
        }
        assert_eq!(Revocation::decode(b"sub "), None);
        assert_eq!(Revocation::decode(b"id 12"), None);
        assert_eq!(Revocation::decode(b"what x"), None);
    }
}
