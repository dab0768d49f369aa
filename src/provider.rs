//! One `authentik_provider` block at run time, as every worker sees it: the shared runtime
//! object (settings, HTTP client, metadata cache, unauthenticated paths), the session zone it
//! stores sessions in, and this worker's calls to the provider.

use std::sync::Arc;

use authentik_core::config::ProviderSettings;
use authentik_core::provider::ProviderRuntime;

use crate::call::CallState;
use crate::store::SessionZone;

/// Where the outpost endpoints live (under `external_host`'s path, if any).
pub const OUTPOST_PREFIX: &str = "/outpost.goauthentik.io/";

pub struct Provider {
    /// Shared with the thread-pool threads; replacing a provider at run time swaps this.
    pub runtime: Arc<ProviderRuntime>,
    pub cookie_name: String,
    /// How long a started login may take before its callback is refused, seconds.
    pub login_timeout: i64,
    /// Binds sessions to this provider in the zone: a hash of issuer and client_id, unique
    /// among the zone's providers (checked at configuration time).
    pub key: u32,
    /// `external_host`'s path without a trailing `/` ("" for none): the outpost endpoints and
    /// the login cookie live under `<base_path>/outpost.goauthentik.io/`.
    pub base_path: String,
    /// This worker's calls in flight (at most `max_pending_calls`) and discovery waiters.
    pub calls: CallState,
    /// The session zone; set when the `http` block's configuration is complete.
    pub zone: *const SessionZone,
    /// `session_zone`, until resolved.
    pub zone_name: Option<String>,
    /// `file:line` of the block, for errors found after it was parsed.
    pub declared_at: String,
    /// Its counters in the metrics zone (also timing its HTTP client's calls).
    pub metrics: Arc<crate::metrics::ProviderMetrics>,
}

impl Provider {
    pub fn settings(&self) -> &ProviderSettings {
        &self.runtime.settings
    }

    pub fn zone(&self) -> &SessionZone {
        // SAFETY: set at configuration time for every provider (nginx -t fails otherwise);
        // zones live in the main configuration as long as the provider.
        unsafe { &*self.zone }
    }

    /// The `/outpost.goauthentik.io/` endpoint `uri` names, at the root or under
    /// `external_host`'s path.
    pub fn endpoint<'a>(&self, uri: &'a [u8]) -> Option<&'a [u8]> {
        let prefix = OUTPOST_PREFIX.as_bytes();
        uri.strip_prefix(prefix).or_else(|| {
            let base = self.base_path.as_bytes();
            let rest = uri.strip_prefix(base).filter(|_| !base.is_empty())?;
            rest.strip_prefix(prefix)
        })
    }
}
