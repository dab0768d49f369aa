//! One `authentik_provider` block at run time, as every worker sees it: the shared runtime
//! object (settings, HTTP client, metadata cache, unauthenticated paths), the session zone it
//! stores sessions in, and this worker's calls to the provider.

use std::sync::Arc;

use authentik_core::config::ProviderSettings;
use authentik_core::outpost::provider::HeaderAuth;
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
    /// What authentik's API said beyond the settings, for a provider of `authentik_outpost`.
    pub outpost: Option<FromOutpost>,
    /// A refused `Authorization` header gets a `401` page instead of the login redirect
    /// (authentik's `intercept_header_auth`).
    pub intercept_header_auth: bool,
    /// Its counters in the metrics zone (also timing its HTTP client's calls).
    pub metrics: Arc<crate::metrics::ProviderMetrics>,
}

/// The parts of an outpost provider that are not provider settings.
pub struct FromOutpost {
    /// `assigned_application_slug`.
    pub slug: String,
    /// `access_token_validity`, seconds.
    pub session_lifetime: Option<i64>,
    /// What authentik said about `Authorization` headers (its `intercept` is copied into
    /// `Provider::intercept_header_auth`; the rest is kept for reference).
    #[allow(dead_code)]
    pub header_auth: HeaderAuth,
}

impl Provider {
    pub fn settings(&self) -> &ProviderSettings {
        &self.runtime.settings
    }

    /// The name `auth_authentik` finds it by: the application slug, or the block's name.
    pub fn slug(&self) -> &str {
        self.outpost.as_ref().map_or(&self.settings().name, |o| &o.slug)
    }

    /// The longest a session may live: the zone's `timeout`, or for an outpost provider its
    /// `access_token_validity` (capped by `timeout` only when the zone sets one).
    pub fn session_lifetime(&self) -> i64 {
        let zone = self.zone();
        match self.outpost.as_ref().and_then(|o| o.session_lifetime) {
            Some(lifetime) if zone.timeout_given => lifetime.min(zone.timeout),
            Some(lifetime) => lifetime,
            None => zone.timeout,
        }
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
