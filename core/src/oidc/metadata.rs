//! The per-worker, per-provider cache of the provider's discovery document and JWKS: filled
//! from thread-pool threads (one fetch in flight at a time), read from the event loop without
//! I/O, with a negative cache for failed fetches and a per-kid rate limit on JWKS refetches.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::client::{ProviderClient, ProviderError};
use super::discovery::{Discovery, Jwks};
use crate::config::ProviderSettings;
use crate::UnixTime;

/// How long a fetched discovery document is used before it is fetched again.
pub const DISCOVERY_TTL: i64 = 3600;
/// After a failed discovery or JWKS fetch, how long the failure is the answer (no new fetch),
/// seconds: the stale document when there is one, else the error.
pub const FETCH_RETRY_AFTER: i64 = 5;
/// An unknown `kid` refetches the JWKS at most this often, per kid.
pub const JWKS_REFETCH_INTERVAL: i64 = 30;
/// How many kids the unknown-kid rate limit remembers; beyond, the oldest is forgotten.
pub const MAX_KID_REFETCHES: usize = 64;

/// Longest prefix of a `kid` the rate limit keys on (kids are short; this bounds its memory).
const MAX_KID_KEY: usize = 128;

/// Per-worker, per-provider cache of the provider's metadata. Lazily filled from threads; read
/// from the event loop without I/O. Shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct MetadataCache {
    inner: Mutex<CacheState>,
    /// Held while a thread fetches discovery or JWKS: one fetch in flight per worker
    /// (single-flight); a thread that needs the same document waits for it, then finds it in
    /// the cache. Never taken on the event loop.
    fetching: Mutex<()>,
}

impl MetadataCache {
    /// A cache whose discovery document is `discovery`, for good: nothing fetches it.
    pub fn with_discovery(discovery: Discovery) -> MetadataCache {
        let cache = MetadataCache::default();
        {
            let mut state = cache.state();
            state.discovery = Some((Arc::new(discovery), 0));
            state.pinned = true;
        }
        cache
    }

    /// The cached discovery document if it is younger than `DISCOVERY_TTL`. Never does I/O.
    pub fn fresh_discovery(&self, now: UnixTime) -> Option<Arc<Discovery>> {
        let state = self.state();
        let (discovery, fetched_at) = state.discovery.as_ref()?;
        (state.pinned || now.saturating_sub(*fetched_at) < DISCOVERY_TTL).then(|| discovery.clone())
    }
    /// The cached discovery document, whatever its age (sign_out uses it when the provider is down).
    pub fn any_discovery(&self) -> Option<Arc<Discovery>> {
        self.state().discovery.as_ref().map(|(discovery, _)| discovery.clone())
    }
    /// Why the last discovery fetch failed, if it ended less than `FETCH_RETRY_AFTER` seconds
    /// ago: callers answer with it (or with the stale document, [`Self::any_discovery`], when
    /// there is one) instead of fetching again. No I/O.
    pub fn discovery_failure(&self, now: UnixTime) -> Option<String> {
        let state = self.state();
        let (error, at) = state.discovery_failed.as_ref()?;
        within(*at, now, FETCH_RETRY_AFTER).then(|| error.to_string())
    }
    /// What [`Self::discovery`] answers without fetching: the fresh document; within
    /// `FETCH_RETRY_AFTER` of a failed fetch, the stale document or else that failure; `None`
    /// when a fetch is needed. No I/O.
    pub fn cached_discovery(&self, now: UnixTime) -> Option<Result<Arc<Discovery>, ProviderError>> {
        let state = self.state();
        let cached = state.discovery.as_ref();
        if let Some((discovery, fetched_at)) = cached {
            if state.pinned || now.saturating_sub(*fetched_at) < DISCOVERY_TTL {
                return Some(Ok(discovery.clone()));
            }
        }
        let (error, failed_at) = state.discovery_failed.as_ref()?;
        if !within(*failed_at, now, FETCH_RETRY_AFTER) {
            return None;
        }
        Some(cached.map(|(discovery, _)| discovery.clone()).ok_or_else(|| error.clone()))
    }
    /// [`Self::cached_discovery`]'s answer, else fetches (blocking). On fetch failure a stale
    /// cached document is returned if there is one; otherwise the error. The failure is
    /// remembered: no new fetch for `FETCH_RETRY_AFTER` seconds.
    pub fn discovery(
        &self,
        client: &ProviderClient,
        settings: &ProviderSettings,
        now: UnixTime,
    ) -> Result<Arc<Discovery>, ProviderError> {
        if let Some(answer) = self.cached_discovery(now) {
            return answer;
        }
        let _fetching = self.fetching();
        if let Some(answer) = self.cached_discovery(now) {
            return answer;
        }
        // The fetch runs without the state lock: other threads keep reading the old document.
        let started = Instant::now();
        match client.fetch_discovery(settings) {
            Ok(discovery) => {
                let discovery = Arc::new(discovery);
                let mut state = self.state();
                state.discovery = Some((discovery.clone(), now));
                state.discovery_failed = None;
                Ok(discovery)
            }
            Err(error) => {
                let mut state = self.state();
                state.discovery_failed = Some((error.clone(), ended_at(now, started)));
                state.discovery.as_ref().map(|(stale, _)| stale.clone()).ok_or(error)
            }
        }
    }
    /// JWKS for verifying a token with `kid`: the cached set while it has the key (younger than
    /// `DISCOVERY_TTL`), else fetched. A kid the set lacks refetches at most once per
    /// `JWKS_REFETCH_INTERVAL` for that kid: fetches made for other kids (the first fetch
    /// included) do not hold it back. After a failed fetch with no set cached, the failure is
    /// returned for `FETCH_RETRY_AFTER` seconds without I/O; with a set that has the key, the
    /// set. Returns an empty set when the provider has no `jwks_uri`.
    pub fn jwks(
        &self,
        client: &ProviderClient,
        discovery: &Discovery,
        kid: Option<&str>,
        now: UnixTime,
    ) -> Result<Arc<Jwks>, ProviderError> {
        let Some(jwks_uri) = discovery.jwks_uri.as_deref() else {
            return Ok(Arc::new(Jwks::default()));
        };
        // One fetch at a time; a waiter then finds the set (or the failure) in the cache.
        let _fetching = self.fetching();
        let has_key = |jwks: &Jwks| kid.map_or(!jwks.is_empty(), |kid| jwks.has_kid(kid));
        let cached = {
            let mut state = self.state();
            let failed = state.jwks_failed.as_ref();
            let failed_recently = failed.is_some_and(|(_, at)| within(*at, now, FETCH_RETRY_AFTER));
            match (&state.jwks, failed) {
                (None, Some((error, _))) if failed_recently => return Err(error.clone()),
                (None, _) => {}
                // A stale set that has the key is used while a refresh failed moments ago.
                (Some((jwks, fetched_at)), _) if has_key(jwks) => {
                    if failed_recently || now.saturating_sub(*fetched_at) < DISCOVERY_TTL {
                        return Ok(jwks.clone());
                    }
                }
                (Some((jwks, _)), _) => {
                    if state.fetched_for_kid_recently(kid, now) {
                        return Ok(jwks.clone());
                    }
                }
            }
            // Recorded before fetching: a concurrent login with the same kid does not fetch too.
            state.record_kid_fetch(kid, now);
            state.jwks.clone()
        };
        let started = Instant::now();
        match client.fetch_jwks(jwks_uri) {
            Ok(jwks) => {
                let jwks = Arc::new(jwks);
                let mut state = self.state();
                state.jwks = Some((jwks.clone(), now));
                state.jwks_failed = None;
                Ok(jwks)
            }
            Err(error) => {
                self.state().jwks_failed = Some((error.clone(), ended_at(now, started)));
                // An old set that still has the key beats failing the login.
                match cached {
                    Some((jwks, _)) if has_key(&jwks) => Ok(jwks),
                    _ => Err(error),
                }
            }
        }
    }

    fn fetching(&self) -> MutexGuard<'_, ()> {
        self.fetching.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state; a panic in another thread while holding the lock leaves valid data behind
    /// (each field is valid on its own whatever the others hold), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug, Default)]
struct CacheState {
    discovery: Option<(Arc<Discovery>, UnixTime)>,
    /// The last discovery fetch failed: why, and when it ended.
    discovery_failed: Option<(ProviderError, UnixTime)>,
    jwks: Option<(Arc<Jwks>, UnixTime)>,
    /// The last JWKS fetch failed: why, and when it ended.
    jwks_failed: Option<(ProviderError, UnixTime)>,
    /// JWKS fetches made for a kid ("" for a token without one), oldest first, at most
    /// `MAX_KID_REFETCHES`: the per-kid rate limit of unknown kids.
    kid_fetches: VecDeque<(String, UnixTime)>,
    /// The discovery document was given, not fetched (authentik's API hands it to an outpost):
    /// it never goes stale.
    pinned: bool,
}

impl CacheState {
    fn fetched_for_kid_recently(&self, kid: Option<&str>, now: UnixTime) -> bool {
        let key = kid_key(kid);
        self.kid_fetches.iter().any(|(k, at)| k == key && within(*at, now, JWKS_REFETCH_INTERVAL))
    }

    /// Remembers a JWKS fetch for `kid` at `now`, forgetting expired entries, and the oldest
    /// entry when `MAX_KID_REFETCHES` are remembered.
    fn record_kid_fetch(&mut self, kid: Option<&str>, now: UnixTime) {
        let key = kid_key(kid);
        self.kid_fetches.retain(|(k, at)| k != key && within(*at, now, JWKS_REFETCH_INTERVAL));
        if self.kid_fetches.len() >= MAX_KID_REFETCHES {
            self.kid_fetches.pop_front();
        }
        self.kid_fetches.push_back((key.to_owned(), now));
    }
}

/// `at` is less than `window` seconds before `now` (a clock that went back ends the window).
fn within(at: UnixTime, now: UnixTime, window: i64) -> bool {
    (0..window).contains(&now.saturating_sub(at))
}

/// `now` advanced by the time since `started`: when a fetch that began at `now` ended.
fn ended_at(now: UnixTime, started: Instant) -> UnixTime {
    now.saturating_add(i64::try_from(started.elapsed().as_secs()).unwrap_or(i64::MAX))
}

/// The rate-limit key of `kid`: at most `MAX_KID_KEY` bytes of it.
fn kid_key(kid: Option<&str>) -> &str {
    let kid = kid.unwrap_or_default();
    let mut end = kid.len().min(MAX_KID_KEY);
    while !kid.is_char_boundary(end) {
        end -= 1;
    }
    &kid[..end]
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use super::*;
    use crate::config::parse_http_url;
    use crate::oidc::jwt::tests::{jwks_json, public_jwk};
    use crate::oidc::test_server::{refused_url, Reply, Request, TestServer};
    use crate::oidc::test_support::{discovery_json, parsed_discovery, settings, NOW};

    #[test]
    fn discovery_is_cached_and_falls_back_to_stale() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = TestServer::start(move |_, base| {
            // First answer succeeds, later ones fail.
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::json(200, discovery_json(base))
            } else {
                Reply::raw(503, "text/plain", "down")
            }
        });
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        assert!(cache.fresh_discovery(NOW).is_none());
        assert!(cache.any_discovery().is_none());
        let first = cache.discovery(&client, &settings, NOW).unwrap();
        let again = cache.discovery(&client, &settings, NOW + DISCOVERY_TTL - 1).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.fresh_discovery(NOW + DISCOVERY_TTL).is_none());
        let stale = cache.discovery(&client, &settings, NOW + DISCOVERY_TTL).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(Arc::ptr_eq(&first, &stale));
        assert!(cache.any_discovery().is_some());
    }

    #[test]
    fn discovery_error_without_cache_is_returned() {
        let base = refused_url();
        let mut settings = ProviderSettings {
            ..settings(&TestServer::start(|_, _| Reply::raw(500, "text/plain", "")))
        };
        settings.issuer = parse_http_url(&format!("{base}/o/app/")).unwrap();
        let client = ProviderClient::new(&settings).unwrap();
        let result = MetadataCache::default().discovery(&client, &settings, NOW);
        assert!(matches!(result, Err(ProviderError::Unreachable { .. })), "{result:?}");
    }

    #[test]
    fn jwks_without_uri_is_empty() {
        let server = TestServer::start(|_, _| Reply::raw(500, "text/plain", ""));
        let client = ProviderClient::new(&settings(&server)).unwrap();
        let mut discovery = parsed_discovery(&server);
        discovery.jwks_uri = None;
        let jwks = MetadataCache::default().jwks(&client, &discovery, Some("k"), NOW).unwrap();
        assert!(jwks.is_empty());
        assert!(server.requests().is_empty());
    }

    #[test]
    fn jwks_failure_keeps_a_cached_set_that_has_the_key() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = TestServer::start(move |_, _| {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::json(200, jwks_json())
            } else {
                Reply::raw(503, "text/plain", "down")
            }
        });
        let client = ProviderClient::new(&settings(&server)).unwrap();
        let discovery = parsed_discovery(&server);
        let cache = MetadataCache::default();
        let first = cache.jwks(&client, &discovery, Some("rsa-kid"), NOW).unwrap();
        // Too old: refetched, fails, the cached set still has the key.
        let later = cache.jwks(&client, &discovery, Some("rsa-kid"), NOW + DISCOVERY_TTL).unwrap();
        assert!(Arc::ptr_eq(&first, &later));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // An unknown kid after the interval: refetched, fails, error.
        let missing = cache.jwks(
            &client,
            &discovery,
            Some("other"),
            NOW + DISCOVERY_TTL + JWKS_REFETCH_INTERVAL,
        );
        assert!(matches!(missing, Err(ProviderError::Status { status: 503, .. })), "{missing:?}");
    }

    #[test]
    fn concurrent_fetches_are_single_flight() {
        let server = TestServer::start(move |request: &Request, base| {
            std::thread::sleep(std::time::Duration::from_millis(300));
            match request.path() {
                "/o/app/.well-known/openid-configuration" => Reply::json(200, discovery_json(base)),
                _ => Reply::json(200, json!({ "keys": [public_jwk(Algorithm::RS256, "key-a")] })),
            }
        });
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let discovery = parsed_discovery(&server);
        let cache = MetadataCache::default();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    assert!(cache
                        .jwks(&client, &discovery, Some("key-a"), NOW)
                        .unwrap()
                        .has_kid("key-a"));
                    assert!(cache.discovery(&client, &settings, NOW).is_ok());
                });
            }
        });
        let paths: Vec<String> = server.requests().iter().map(|r| r.path().to_owned()).collect();
        assert_eq!(
            paths.iter().filter(|p| p.contains("openid-configuration")).count(),
            1,
            "{paths:?}"
        );
        assert_eq!(
            paths.iter().filter(|p| !p.contains("openid-configuration")).count(),
            1,
            "{paths:?}"
        );
    }

    /// The unknown-kid rate limit is per kid: neither the first fetch nor another kid's refetch
    /// holds back a new kid.
    #[test]
    fn unknown_kids_refetch_once_per_interval_each() {
        let published = Arc::new(AtomicBool::new(false));
        let keys = published.clone();
        let server = TestServer::start(move |_, _| {
            let mut set = vec![public_jwk(Algorithm::RS256, "key-a")];
            if keys.load(Ordering::SeqCst) {
                set.push(public_jwk(Algorithm::ES256, "key-b"));
            }
            Reply::json(200, json!({ "keys": set }))
        });
        let client = ProviderClient::new(&settings(&server)).unwrap();
        let discovery = parsed_discovery(&server);
        let cache = MetadataCache::default();
        let fetches = || server.requests().len();
        let jwks =
            |kid: &str, at: UnixTime| cache.jwks(&client, &discovery, Some(kid), at).unwrap();

        assert!(jwks("key-a", NOW).has_kid("key-a"));
        assert_eq!(fetches(), 1);
        published.store(true, Ordering::SeqCst);
        assert!(jwks("key-b", NOW + 1).has_kid("key-b"));
        assert_eq!(fetches(), 2);
        // A bogus kid refetches once, then not again within the interval.
        assert!(!jwks("bogus-1", NOW + 2).has_kid("bogus-1"));
        assert_eq!(fetches(), 3);
        assert!(!jwks("bogus-1", NOW + 3).has_kid("bogus-1"));
        assert!(!jwks("bogus-1", NOW + 1 + JWKS_REFETCH_INTERVAL).has_kid("bogus-1"));
        assert_eq!(fetches(), 3);
        // A second bogus kid still refetches once.
        jwks("bogus-2", NOW + 4);
        assert_eq!(fetches(), 4);
        jwks("bogus-2", NOW + 5);
        assert_eq!(fetches(), 4);
        // Known kids never refetch while the set is fresh; the interval ends per kid.
        jwks("key-a", NOW + 6);
        assert_eq!(fetches(), 4);
        jwks("bogus-1", NOW + 2 + JWKS_REFETCH_INTERVAL);
        assert_eq!(fetches(), 5);
        // A token without kid against a set with keys uses the set.
        cache.jwks(&client, &discovery, None, NOW + 7).unwrap();
        assert_eq!(fetches(), 5);
    }

    #[test]
    fn kid_rate_limit_is_bounded_and_forgets_the_oldest() {
        let server = TestServer::start(|_, _| Reply::json(200, jwks_json()));
        let client = ProviderClient::new(&settings(&server)).unwrap();
        let discovery = parsed_discovery(&server);
        let cache = MetadataCache::default();
        for i in 0..MAX_KID_REFETCHES {
            cache.jwks(&client, &discovery, Some(&format!("bogus-{i}")), NOW).unwrap();
        }
        assert_eq!(server.requests().len(), MAX_KID_REFETCHES);
        assert_eq!(cache.state().kid_fetches.len(), MAX_KID_REFETCHES);
        cache.jwks(&client, &discovery, Some("bogus-0"), NOW + 1).unwrap();
        assert_eq!(server.requests().len(), MAX_KID_REFETCHES);
        // One more kid: the oldest (bogus-0) is forgotten and may refetch again.
        cache.jwks(&client, &discovery, Some("one-more"), NOW + 1).unwrap();
        assert_eq!(cache.state().kid_fetches.len(), MAX_KID_REFETCHES);
        cache.jwks(&client, &discovery, Some("bogus-0"), NOW + 2).unwrap();
        assert_eq!(server.requests().len(), MAX_KID_REFETCHES + 2);
        // Keys are bounded too.
        let long = "k".repeat(10_000);
        cache.jwks(&client, &discovery, Some(&long), NOW + 3).unwrap();
        assert!(cache.state().kid_fetches.iter().all(|(kid, _)| kid.len() <= MAX_KID_KEY));
        assert_eq!(kid_key(Some(&"é".repeat(100))).len(), MAX_KID_KEY);
    }

    #[test]
    fn failed_discovery_is_the_answer_for_a_while() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = TestServer::start(move |_, base| {
            // Two failures, then the document.
            if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                Reply::raw(503, "text/plain", "down")
            } else {
                Reply::json(200, discovery_json(base))
            }
        });
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        assert_eq!(cache.discovery_failure(NOW), None);
        assert!(cache.cached_discovery(NOW).is_none());

        let error = cache.discovery(&client, &settings, NOW).unwrap_err();
        assert!(matches!(error, ProviderError::Status { status: 503, .. }), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for at in [NOW, NOW + FETCH_RETRY_AFTER - 1] {
            assert_eq!(cache.discovery_failure(at), Some(error.to_string()));
            assert!(matches!(cache.cached_discovery(at), Some(Err(ProviderError::Status { .. }))));
            // No I/O inside the window: the remembered error, as it was.
            let again = cache.discovery(&client, &settings, at).unwrap_err();
            assert_eq!(again.to_string(), error.to_string());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A clock that went back does not stretch the window.
        assert!(cache.cached_discovery(NOW - 10).is_none());

        let retry = NOW + FETCH_RETRY_AFTER;
        assert!(cache.cached_discovery(retry).is_none());
        assert_eq!(cache.discovery_failure(retry), None);
        assert!(cache.discovery(&client, &settings, retry).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A success forgets the failure.
        let later = retry + FETCH_RETRY_AFTER;
        let fetched = cache.discovery(&client, &settings, later).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.discovery_failure(later), None);
        assert!(
            matches!(cache.cached_discovery(later), Some(Ok(ref d)) if Arc::ptr_eq(d, &fetched))
        );
    }

    #[test]
    fn failed_refresh_serves_the_stale_document_for_a_while() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = TestServer::start(move |_, base| {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::json(200, discovery_json(base))
            } else {
                Reply::raw(503, "text/plain", "down")
            }
        });
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        let first = cache.discovery(&client, &settings, NOW).unwrap();
        let stale = NOW + DISCOVERY_TTL;
        assert!(cache.cached_discovery(stale).is_none());
        assert!(Arc::ptr_eq(&cache.discovery(&client, &settings, stale).unwrap(), &first));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(cache.discovery_failure(stale + 1).unwrap().contains("answered 503"));
        assert!(
            matches!(cache.cached_discovery(stale + 1), Some(Ok(ref d)) if Arc::ptr_eq(d, &first))
        );
        assert!(Arc::ptr_eq(&cache.discovery(&client, &settings, stale + 1).unwrap(), &first));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn failed_jwks_without_a_set_is_the_answer_for_a_while() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let server = TestServer::start(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            Reply::raw(503, "text/plain", "down")
        });
        let client = ProviderClient::new(&settings(&server)).unwrap();
        let discovery = parsed_discovery(&server);
        let cache = MetadataCache::default();
        let error = cache.jwks(&client, &discovery, Some("a"), NOW).unwrap_err();
        assert!(matches!(error, ProviderError::Status { status: 503, .. }), "{error}");
        // Any kid, no I/O, inside the window.
        for (kid, at) in [(Some("a"), NOW + 1), (Some("b"), NOW + 2), (None, NOW + 4)] {
            let again = cache.jwks(&client, &discovery, kid, at).unwrap_err();
            assert_eq!(again.to_string(), error.to_string());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.jwks(&client, &discovery, Some("c"), NOW + FETCH_RETRY_AFTER).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
