//! nginx as an authentik outpost: the outpost API (providers), the websocket (live updates,
//! session end), and turning authentik's provider objects into providers the module runs.
//! Protocol facts: `../shared/docs/authentik-outpost-protocol.md` (b1, b2).

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

pub mod api;
pub mod provider;
pub mod sync;
pub mod ws;

/// The module's version, as authentik's outpost list shows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `X-authentik-meta-version`, in authentik's form.
pub const META_VERSION: &str = concat!("goauthentik.io/outpost/", env!("CARGO_PKG_VERSION"));

/// `authentik_outpost URL token_file=... [browser_url=] [ca_file=] [refresh=]`, as the
/// background task needs it.
#[derive(Debug, Clone)]
pub struct OutpostOptions {
    /// Where nginx reaches authentik; ends with `/`.
    pub url: Url,
    pub token: String,
    /// Where browsers reach authentik, when that differs.
    pub browser_url: Option<Url>,
    pub ca_file: Option<PathBuf>,
    /// `refresh=`; without it, authentik's `refresh_interval_s`.
    pub refresh: Option<Duration>,
    /// Each API call's total time; also the providers' call timeout.
    pub timeout: Duration,
    /// This machine's name (HELLO).
    pub hostname: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OutpostError {
    #[error("{url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered {status}: the token is not valid for an outpost")]
    Rejected { url: String, status: u16 },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent an invalid response: {reason}")]
    Invalid { url: String, reason: String },
    #[error("no outpost belongs to this token")]
    NoOutpost,
    #[error("cannot use \"ca_file\": {0}")]
    CaFile(String),
}
