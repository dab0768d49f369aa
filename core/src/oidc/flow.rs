//! The callback's work, run on a thread-pool thread: code -> tokens -> validated claims ->
//! session record. Plus the per-worker cache of discovery and JWKS documents.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Map, Value};

use super::client::{ProviderClient, ProviderError, TokenResponse};
use super::discovery::{Discovery, Jwks};
use super::jwt::{numeric_date, peek_header, validate_id_token, ExpectedClaims, TokenError};
use super::login::PendingLogin;
use crate::config::ProviderSettings;
use crate::identity::Identity;
use crate::session::SessionRecord;
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
/// A login's provider calls (discovery, token, JWKS, userinfo) end within this many provider
/// timeouts (`timeout`), all together.
pub const LOGIN_TIMEOUTS: u32 = 2;

/// Longest prefix of a `kid` the rate limit keys on (kids are short; this bounds its memory).
const MAX_KID_KEY: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("userinfo \"sub\" does not match the id_token")]
    UserinfoSubject,
}

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

impl MetadataCache {
    /// The cached discovery document if it is younger than `DISCOVERY_TTL`. Never does I/O.
    pub fn fresh_discovery(&self, now: UnixTime) -> Option<Arc<Discovery>> {
        let state = self.state();
        let (discovery, fetched_at) = state.discovery.as_ref()?;
        (now.saturating_sub(*fetched_at) < DISCOVERY_TTL).then(|| discovery.clone())
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
    /// `true` when [`Self::discovery`] would fetch: no fresh document and no fetch failed in the
    /// last `FETCH_RETRY_AFTER` seconds (with a stale document and a recent failure it is
    /// `false`: the stale document is the answer). No I/O; for the event loop, which starts at
    /// most one fetch per worker when this is `true`.
    pub fn needs_discovery_fetch(&self, now: UnixTime) -> bool {
        self.cached_discovery(now).is_none()
    }
    /// What [`Self::discovery`] answers without fetching: the fresh document; within
    /// `FETCH_RETRY_AFTER` of a failed fetch, the stale document or else that failure; `None`
    /// when a fetch is needed. No I/O.
    pub fn cached_discovery(&self, now: UnixTime) -> Option<Result<Arc<Discovery>, ProviderError>> {
        let state = self.state();
        let cached = state.discovery.as_ref();
        if let Some((discovery, fetched_at)) = cached {
            if now.saturating_sub(*fetched_at) < DISCOVERY_TTL {
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

    fn fetching(&self) -> std::sync::MutexGuard<'_, ()> {
        self.fetching.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state; a panic in another thread while holding the lock leaves valid data behind
    /// (each field is valid on its own whatever the others hold), so poisoning is ignored.
    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Redeems `code` for `login` and builds the session record:
/// discovery (cache) -> token exchange (PKCE verifier, login.redirect_uri) -> id_token
/// validation (JWKS by kid, refetched once on an unknown kid; HS256 with the client secret;
/// iss/aud/azp/exp/iat/nonce/sub) -> userinfo when the provider has an endpoint (its `sub` must
/// match; its claims are merged over the id_token's) -> [`SessionRecord`] with identity headers
/// from the merged claims and the access token, `expires_at` = now + expires_in (else id_token
/// exp), capped at now + `max_lifetime`.
///
/// Each provider call ends within the client's timeout, and all of them together within
/// `LOGIN_TIMEOUTS` timeouts from the start: a provider that answers each call slowly cannot
/// hold the login (and its thread) longer.
pub fn complete_login(
    settings: &ProviderSettings,
    cache: &MetadataCache,
    client: &ProviderClient,
    login: &PendingLogin,
    code: &str,
    max_lifetime: i64,
    now: UnixTime,
) -> Result<SessionRecord, LoginError> {
    let budget = client.timeout().saturating_mul(LOGIN_TIMEOUTS);
    let client = &match Instant::now().checked_add(budget) {
        Some(deadline) => client.with_deadline(deadline),
        None => client.clone(),
    };
    let discovery = cache.discovery(client, settings, now)?;
    let tokens =
        client.exchange_code(settings, &discovery, code, &login.verifier, &login.redirect_uri)?;
    let id_claims = validated_claims(settings, cache, client, &discovery, login, &tokens, now)?;
    let mut claims = id_claims.clone();
    if let Some(endpoint) = discovery.userinfo_endpoint.as_deref() {
        let userinfo = client.userinfo(endpoint, &tokens.access_token)?;
        if userinfo.get("sub") != id_claims.get("sub") {
            return Err(LoginError::UserinfoSubject);
        }
        claims.extend(userinfo);
    }
    let expires_at = session_expiry(&tokens, &id_claims, max_lifetime, now);
    let mut record = SessionRecord {
        sub: string_claim(&id_claims, "sub").unwrap_or_default(),
        sid: string_claim(&id_claims, "sid"),
        expires_at,
        identity: Identity::from_claims(&claims, &tokens.access_token),
        id_token: tokens.id_token,
        claims_json: Value::Object(claims).to_string(),
    };
    record.compact(&settings.client_id);
    Ok(record)
}

/// The id_token's claims after full validation, with the JWKS from the cache when the token is
/// signed with a provider key.
fn validated_claims(
    settings: &ProviderSettings,
    cache: &MetadataCache,
    client: &ProviderClient,
    discovery: &Discovery,
    login: &PendingLogin,
    tokens: &TokenResponse,
    now: UnixTime,
) -> Result<Map<String, Value>, LoginError> {
    let (kid, alg) = peek_header(&tokens.id_token)?;
    let jwks = match alg.as_str() {
        "RS256" | "ES256" => cache.jwks(client, discovery, kid.as_deref(), now)?,
        _ => Arc::new(Jwks::default()),
    };
    let expected = ExpectedClaims::new(settings, &login.nonce, now);
    let claims = validate_id_token(&tokens.id_token, &jwks, &settings.client_secret, &expected)?;
    Ok(claims)
}

/// now + expires_in when the provider gives a positive one, else the id_token's `exp`; never
/// later than now + `max_lifetime`.
fn session_expiry(
    tokens: &TokenResponse,
    id_claims: &Map<String, Value>,
    max_lifetime: i64,
    now: UnixTime,
) -> UnixTime {
    let token_expiry = match tokens.expires_in {
        Some(seconds) if seconds > 0 => Some(now.saturating_add(seconds)),
        _ => id_claims.get("exp").and_then(numeric_date),
    };
    let cap = now.saturating_add(max_lifetime);
    token_expiry.map_or(cap, |expiry| expiry.min(cap))
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use super::*;
    use crate::config::{parse_http_url, Mode};
    use crate::oidc::jwt::tests::{jwks_json, public_jwk, sign, CLIENT_ID, SECRET};
    use crate::oidc::test_server::{refused_url, Reply, Request, TestServer};

    const NOW: i64 = 1_700_000_000;
    const MAX_LIFETIME: i64 = 86_400;

    fn settings(server: &TestServer) -> ProviderSettings {
        ProviderSettings {
            name: "app".into(),
            issuer: parse_http_url(&server.url("/o/app/")).unwrap(),
            client_id: CLIENT_ID.into(),
            client_secret: SECRET.into(),
            external_host: None,
            mode: Mode::Proxy,
            cookie_domain: None,
            scopes: vec!["openid".into()],
            timeout_ms: 2_000,
            ca_file: None,
            post_logout_redirect: None,
            trusted_audiences: Vec::new(),
        }
    }

    fn login() -> PendingLogin {
        PendingLogin::new("https://app.example/".into(), "https://app.example/cb".into(), NOW - 5)
    }

    fn discovery_json(base: &str) -> Value {
        json!({
            "issuer": format!("{base}/o/app/"),
            "authorization_endpoint": format!("{base}/authorize/"),
            "token_endpoint": format!("{base}/token/"),
            "userinfo_endpoint": format!("{base}/userinfo/"),
            "jwks_uri": format!("{base}/jwks/"),
        })
    }

    fn id_claims(base: &str, nonce: &str) -> Value {
        json!({
            "iss": format!("{base}/o/app/"),
            "aud": CLIENT_ID,
            "sub": "user-1",
            "sid": "session-7",
            "exp": NOW + 600,
            "iat": NOW,
            "nonce": nonce,
            "preferred_username": "from-id-token",
            "groups": ["admins", "users"],
        })
    }

    /// A provider answering discovery, token (an id_token made by `id_token(base)`), userinfo
    /// (`userinfo`) and JWKS.
    fn provider(
        id_token: impl Fn(&str) -> String + Send + Sync + 'static,
        userinfo: Value,
        expires_in: Option<i64>,
    ) -> TestServer {
        TestServer::start(move |request: &Request, base| match request.path() {
            "/o/app/.well-known/openid-configuration" => Reply::json(200, discovery_json(base)),
            "/token/" => {
                let mut body = json!({"access_token": "access-1", "id_token": id_token(base), "token_type": "Bearer"});
                if let Some(seconds) = expires_in {
                    body["expires_in"] = json!(seconds);
                }
                Reply::json(200, body)
            }
            "/userinfo/" => Reply::json(200, userinfo.clone()),
            "/jwks/" => Reply::json(200, jwks_json()),
            _ => Reply::raw(404, "text/plain", "not found"),
        })
    }

    fn hs256_provider(nonce: String, userinfo: Value, expires_in: Option<i64>) -> TestServer {
        provider(
            move |base| sign(&id_claims(base, &nonce), Algorithm::HS256, None),
            userinfo,
            expires_in,
        )
    }

    fn paths(server: &TestServer) -> Vec<String> {
        server.requests().iter().map(|r| r.path().to_owned()).collect()
    }

    #[test]
    fn complete_login_builds_the_session_record() {
        let login = login();
        let userinfo = json!({"sub": "user-1", "preferred_username": "akadmin", "email": "a@example.com",
            "ak_proxy": {"user_attributes": {"additionalHeaders": {"X-Team": "blue"}}}});
        let server = hs256_provider(login.nonce.clone(), userinfo, Some(300));
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();

        let record =
            complete_login(&settings, &cache, &client, &login, "code-1", MAX_LIFETIME, NOW)
                .unwrap();

        assert_eq!(record.sub, "user-1");
        assert_eq!(record.sid.as_deref(), Some("session-7"));
        assert_eq!(record.expires_at, NOW + 300);
        assert_eq!(record.identity.username(), "akadmin");
        assert_eq!(record.identity.values[1], "admins|users");
        assert_eq!(record.identity.values[3], "a@example.com");
        assert_eq!(record.identity.values[5], "user-1");
        assert_eq!(record.identity.values[6], "access-1");
        assert_eq!(record.identity.additional, vec![("X-Team".to_owned(), "blue".to_owned())]);
        assert_eq!(peek_header(&record.id_token).unwrap().1, "HS256");
        assert_eq!(record.claim("preferred_username").as_deref(), Some("akadmin"));
        // the login's nonce was checked, then dropped from the stored record (compact)
        assert_eq!(record.claim("nonce"), None);
        assert_eq!(record.claim("sid").as_deref(), Some("session-7"));
        assert_eq!(SessionRecord::decode(&record.encode()).unwrap(), record);

        // HS256 needs no JWKS; the token request carries the PKCE verifier and redirect_uri.
        assert_eq!(
            paths(&server),
            ["/o/app/.well-known/openid-configuration", "/token/", "/userinfo/"]
        );
        let form = server.requests()[1].form();
        assert!(form.contains(&("code".into(), "code-1".into())));
        assert!(form.contains(&("code_verifier".into(), login.verifier.clone())));
        assert!(form.contains(&("redirect_uri".into(), login.redirect_uri.clone())));
        assert!(cache.fresh_discovery(NOW).is_some());
    }

    /// rp-userinfo-bad-sub-claim.
    #[test]
    fn userinfo_subject_must_match() {
        let login = login();
        let server = hs256_provider(login.nonce.clone(), json!({"sub": "someone-else"}), None);
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let result = complete_login(
            &settings,
            &MetadataCache::default(),
            &client,
            &login,
            "c",
            MAX_LIFETIME,
            NOW,
        );
        assert!(matches!(result, Err(LoginError::UserinfoSubject)), "{result:?}");
        let server = hs256_provider(login.nonce.clone(), json!({"name": "no sub"}), None);
        let settings = self::settings(&server);
        let result = complete_login(
            &settings,
            &MetadataCache::default(),
            &client,
            &login,
            "c",
            MAX_LIFETIME,
            NOW,
        );
        assert!(matches!(result, Err(LoginError::UserinfoSubject)), "{result:?}");
    }

    #[test]
    fn expiry_comes_from_exp_without_expires_in_and_is_capped() {
        let login = login();
        let server = hs256_provider(login.nonce.clone(), json!({"sub": "user-1"}), None);
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        let record =
            complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW).unwrap();
        assert_eq!(record.expires_at, NOW + 600);
        let record = complete_login(&settings, &cache, &client, &login, "c", 60, NOW).unwrap();
        assert_eq!(record.expires_at, NOW + 60);
    }

    /// rp-nonce-invalid.
    #[test]
    fn wrong_nonce_fails_the_login() {
        let login = login();
        let server = hs256_provider("another-nonce".into(), json!({"sub": "user-1"}), None);
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let result = complete_login(
            &settings,
            &MetadataCache::default(),
            &client,
            &login,
            "c",
            MAX_LIFETIME,
            NOW,
        );
        assert!(matches!(result, Err(LoginError::Token(TokenError::Nonce))), "{result:?}");
        assert_eq!(result.unwrap_err().to_string(), "id_token nonce does not match");
    }

    #[test]
    fn rs256_login_fetches_and_caches_the_jwks() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = provider(
            move |base| sign(&id_claims(base, &nonce), Algorithm::RS256, Some("rsa-kid")),
            json!({"sub": "user-1"}),
            Some(300),
        );
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        for _ in 0..2 {
            let record =
                complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW).unwrap();
            assert_eq!(record.identity.username(), "from-id-token");
        }
        let jwks_fetches = paths(&server).iter().filter(|p| *p == "/jwks/").count();
        let discovery_fetches = paths(&server).iter().filter(|p| p.contains("well-known")).count();
        assert_eq!((jwks_fetches, discovery_fetches), (1, 1));
    }

    #[test]
    fn unknown_kid_refetches_at_most_once_per_interval() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = provider(
            move |base| sign(&id_claims(base, &nonce), Algorithm::RS256, Some("rotated-kid")),
            json!({"sub": "user-1"}),
            None,
        );
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        let jwks_fetches = || paths(&server).iter().filter(|p| *p == "/jwks/").count();
        let result = complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW);
        assert!(
            matches!(result, Err(LoginError::Token(TokenError::UnknownKey(ref k))) if k == "rotated-kid"),
            "{result:?}"
        );
        assert_eq!(jwks_fetches(), 1);
        let _ = complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW + 10);
        assert_eq!(jwks_fetches(), 1);
        let _ = complete_login(
            &settings,
            &cache,
            &client,
            &login,
            "c",
            MAX_LIFETIME,
            NOW + JWKS_REFETCH_INTERVAL,
        );
        assert_eq!(jwks_fetches(), 2);
    }

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
        let mut discovery: Discovery =
            serde_json::from_value(discovery_json(&server.url(""))).unwrap();
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
        let discovery: Discovery = serde_json::from_value(discovery_json(&server.url(""))).unwrap();
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

    /// A provider whose JWKS is `keys` and whose id_tokens are made by `id_token(base)`; no
    /// userinfo endpoint.
    fn jwks_provider(
        keys: impl Fn() -> Value + Send + Sync + 'static,
        id_token: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> TestServer {
        TestServer::start(move |request: &Request, base| match request.path() {
            "/o/app/.well-known/openid-configuration" => {
                let mut discovery = discovery_json(base);
                discovery.as_object_mut().unwrap().remove("userinfo_endpoint");
                Reply::json(200, discovery)
            }
            "/token/" => Reply::json(200, json!({"access_token": "a", "id_token": id_token(base)})),
            "/jwks/" => Reply::json(200, keys()),
            _ => Reply::raw(404, "text/plain", "not found"),
        })
    }

    fn jwks_fetches(server: &TestServer) -> usize {
        paths(server).iter().filter(|p| *p == "/jwks/").count()
    }

    /// After the worker's first JWKS fetch (key A), the provider publishes key B and signs with
    /// it: the first login with kid B refetches and succeeds at once.
    #[test]
    fn rp_key_rotation_op_sign_key() {
        let login = login();
        let nonce = login.nonce.clone();
        let rotated = Arc::new(AtomicBool::new(false));
        let (keys_rotated, token_rotated) = (rotated.clone(), rotated.clone());
        let server = jwks_provider(
            move || {
                let mut keys = vec![public_jwk(Algorithm::RS256, "key-a")];
                if keys_rotated.load(Ordering::SeqCst) {
                    keys.push(public_jwk(Algorithm::ES256, "key-b"));
                }
                json!({ "keys": keys })
            },
            move |base| match token_rotated.load(Ordering::SeqCst) {
                false => sign(&id_claims(base, &nonce), Algorithm::RS256, Some("key-a")),
                true => sign(&id_claims(base, &nonce), Algorithm::ES256, Some("key-b")),
            },
        );
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW).unwrap();
        assert_eq!(jwks_fetches(&server), 1);
        rotated.store(true, Ordering::SeqCst);
        let record =
            complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW + 1).unwrap();
        assert_eq!(peek_header(&record.id_token).unwrap().0.as_deref(), Some("key-b"));
        assert_eq!(jwks_fetches(&server), 2);
        // Both keys are now cached.
        complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW + 2).unwrap();
        assert_eq!(jwks_fetches(&server), 2);
    }

    /// The unknown-kid rate limit is per kid: neither the first fetch nor another kid's refetch
    /// holds back a new kid.
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
        let discovery: Discovery = serde_json::from_value(discovery_json(&server.url(""))).unwrap();
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
        let discovery: Discovery = serde_json::from_value(discovery_json(&server.url(""))).unwrap();
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
        let discovery: Discovery = serde_json::from_value(discovery_json(&server.url(""))).unwrap();
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
        assert!(cache.needs_discovery_fetch(NOW));
        assert_eq!(cache.discovery_failure(NOW), None);
        assert!(cache.cached_discovery(NOW).is_none());

        let error = cache.discovery(&client, &settings, NOW).unwrap_err();
        assert!(matches!(error, ProviderError::Status { status: 503, .. }), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for at in [NOW, NOW + FETCH_RETRY_AFTER - 1] {
            assert!(!cache.needs_discovery_fetch(at));
            assert_eq!(cache.discovery_failure(at), Some(error.to_string()));
            assert!(matches!(cache.cached_discovery(at), Some(Err(ProviderError::Status { .. }))));
            // No I/O inside the window: the remembered error, as it was.
            let again = cache.discovery(&client, &settings, at).unwrap_err();
            assert_eq!(again.to_string(), error.to_string());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A clock that went back does not stretch the window.
        assert!(cache.needs_discovery_fetch(NOW - 10));

        let retry = NOW + FETCH_RETRY_AFTER;
        assert!(cache.needs_discovery_fetch(retry));
        assert_eq!(cache.discovery_failure(retry), None);
        assert!(cache.discovery(&client, &settings, retry).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A success forgets the failure.
        let later = retry + FETCH_RETRY_AFTER;
        let fetched = cache.discovery(&client, &settings, later).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.discovery_failure(later), None);
        assert!(!cache.needs_discovery_fetch(later));
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
        assert!(cache.needs_discovery_fetch(stale));
        assert!(Arc::ptr_eq(&cache.discovery(&client, &settings, stale).unwrap(), &first));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(!cache.needs_discovery_fetch(stale + 1));
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
        let discovery: Discovery = serde_json::from_value(discovery_json(&server.url(""))).unwrap();
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

    /// Each call answers in 300 ms, under the 400 ms timeout; together they would take 900 ms:
    /// the login ends at its 800 ms deadline (`LOGIN_TIMEOUTS` timeouts).
    #[test]
    fn complete_login_has_an_overall_deadline() {
        let login = login();
        let nonce = login.nonce.clone();
        let slow = Arc::new(AtomicBool::new(true));
        let delay = slow.clone();
        let server = TestServer::start(move |request, base| {
            if delay.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(300));
            }
            match request.path() {
                "/o/app/.well-known/openid-configuration" => Reply::json(200, discovery_json(base)),
                "/token/" => {
                    let id_token = sign(&id_claims(base, &nonce), Algorithm::HS256, None);
                    Reply::json(200, json!({"access_token": "a", "id_token": id_token}))
                }
                _ => Reply::json(200, json!({"sub": "user-1"})),
            }
        });
        let mut settings = settings(&server);
        settings.timeout_ms = 400;
        let client = ProviderClient::new(&settings).unwrap();
        let started = Instant::now();
        let result = complete_login(
            &settings,
            &MetadataCache::default(),
            &client,
            &login,
            "c",
            MAX_LIFETIME,
            NOW,
        );
        let elapsed = started.elapsed();
        assert!(
            matches!(result, Err(LoginError::Provider(ProviderError::Unreachable { ref url, ref reason }))
                if url.ends_with("/userinfo/") && reason.contains("timeout")),
            "{result:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(750) && elapsed < Duration::from_millis(1_100),
            "{elapsed:?}"
        );
        // The same provider at full speed: the login works.
        slow.store(false, Ordering::SeqCst);
        let cache = MetadataCache::default();
        complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW).unwrap();
    }

    #[test]
    fn rp_id_token_kid_absent_single_jwks() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = jwks_provider(
            || json!({"keys": [public_jwk(Algorithm::RS256, "only")]}),
            move |base| sign(&id_claims(base, &nonce), Algorithm::RS256, None),
        );
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        for at in [NOW, NOW + 1] {
            complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, at).unwrap();
        }
        assert_eq!(jwks_fetches(&server), 1);
    }

    /// No kid and several keys of the token's algorithm: refused (the RP test allows refusing
    /// or trying every key), without refetching the set.
    #[test]
    fn rp_id_token_kid_absent_multiple_jwks() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = jwks_provider(
            || {
                json!({"keys": [
                    public_jwk(Algorithm::RS256, "a"),
                    public_jwk(Algorithm::RS256, "b"),
                ]})
            },
            move |base| sign(&id_claims(base, &nonce), Algorithm::RS256, None),
        );
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        for at in [NOW, NOW + 1] {
            let result = complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, at);
            assert!(
                matches!(result, Err(LoginError::Token(TokenError::UnknownKey(ref kid))) if kid.is_empty()),
                "{result:?}"
            );
        }
        assert_eq!(jwks_fetches(&server), 1);
    }

    /// An unsigned id_token is refused before any JWKS fetch.
    #[test]
    fn rp_id_token_sig_none() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = jwks_provider(jwks_json, move |base| {
            let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
            format!("{}.{}.", part(&json!({"alg": "none"})), part(&id_claims(base, &nonce)))
        });
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        let result = complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW);
        assert!(
            matches!(result, Err(LoginError::Token(TokenError::Algorithm(ref alg))) if alg == "none"),
            "{result:?}"
        );
        assert_eq!(jwks_fetches(&server), 0);
    }

    /// `trusted_audiences` from the settings reach the id_token validation.
    #[test]
    fn rp_id_token_aud_trusted_audiences_come_from_the_settings() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = jwks_provider(jwks_json, move |base| {
            let mut claims = id_claims(base, &nonce);
            claims["aud"] = json!([CLIENT_ID, "other"]);
            claims["azp"] = json!(CLIENT_ID);
            sign(&claims, Algorithm::HS256, None)
        });
        let mut settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let cache = MetadataCache::default();
        let result = complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW);
        assert!(
            matches!(result, Err(LoginError::Token(TokenError::UntrustedAudience(ref aud))) if aud == "other"),
            "{result:?}"
        );
        settings.trusted_audiences = vec!["other".into()];
        complete_login(&settings, &cache, &client, &login, "c", MAX_LIFETIME, NOW).unwrap();
    }

    #[test]
    fn rp_id_token_iat_missing_fails_the_login() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = jwks_provider(jwks_json, move |base| {
            let mut claims = id_claims(base, &nonce);
            claims.as_object_mut().unwrap().remove("iat");
            sign(&claims, Algorithm::HS256, None)
        });
        let settings = settings(&server);
        let client = ProviderClient::new(&settings).unwrap();
        let result = complete_login(
            &settings,
            &MetadataCache::default(),
            &client,
            &login,
            "c",
            MAX_LIFETIME,
            NOW,
        );
        assert!(matches!(result, Err(LoginError::Token(TokenError::NoIssuedAt))), "{result:?}");
    }
}
