//! One provider at run time: its settings, HTTP client, metadata cache and compiled
//! unauthenticated paths, in one value shared behind an `Arc` by the event loop and the
//! threads that talk to the provider. Replacing a provider's configuration at run time is
//! swapping that `Arc`: calls in flight keep the runtime they started with.

use std::sync::Arc;

use crate::config::ProviderSettings;
use crate::oidc::{complete_login, Discovery, LoginError, MetadataCache, PendingLogin};
use crate::oidc::{CallTimer, ProviderClient, ProviderContext, ProviderError};
use crate::paths::UnauthPaths;
use crate::session::SessionRecord;
use crate::UnixTime;

#[derive(Debug)]
pub struct ProviderRuntime {
    pub settings: ProviderSettings,
    pub client: ProviderClient,
    /// Discovery and keys, per worker.
    pub cache: MetadataCache,
    /// Provider-wide unauthenticated paths.
    pub unauth: UnauthPaths,
}

impl ProviderRuntime {
    /// Builds the client (reads `ca_file`); nothing contacts the provider.
    pub fn new(
        settings: ProviderSettings,
        unauth: UnauthPaths,
    ) -> Result<ProviderRuntime, ProviderError> {
        let client = ProviderClient::new(&settings)?;
        Ok(ProviderRuntime { settings, client, cache: MetadataCache::default(), unauth })
    }

    /// A runtime whose discovery document is given (an outpost provider: authentik's API sends
    /// every endpoint), so no call fetches it.
    pub fn with_discovery(
        settings: ProviderSettings,
        unauth: UnauthPaths,
        discovery: Discovery,
    ) -> Result<ProviderRuntime, ProviderError> {
        let client = ProviderClient::new(&settings)?;
        Ok(ProviderRuntime {
            settings,
            client,
            cache: MetadataCache::with_discovery(discovery),
            unauth,
        })
    }

    /// This runtime, with every call to the provider timed by `timer`.
    pub fn with_timer(mut self, timer: Arc<dyn CallTimer>) -> ProviderRuntime {
        self.client.set_timer(timer);
        self
    }

    /// Its settings, client and cache, borrowed together for the provider calls of a login.
    pub fn context(&self) -> ProviderContext<'_> {
        ProviderContext { settings: &self.settings, client: &self.client, cache: &self.cache }
    }

    /// Makes sure a discovery document is cached (blocking; thread pool only).
    pub fn fetch_discovery(&self, now: UnixTime) -> Result<Arc<Discovery>, ProviderError> {
        self.cache.discovery(&self.client, &self.settings, now)
    }

    /// Redeems `code` for `login` and builds the session record (blocking; thread pool only).
    pub fn complete_login(
        &self,
        login: &PendingLogin,
        code: &str,
        max_lifetime: i64,
        now: UnixTime,
    ) -> Result<SessionRecord, LoginError> {
        complete_login(self.context(), login, code, max_lifetime, now)
    }
}
