//! The callback's work, run on a thread-pool thread: code -> tokens -> validated claims ->
//! session record. Plus the per-worker cache of discovery and JWKS documents.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::client::{ProviderClient, ProviderError, TokenResponse};
use super::discovery::{Discovery, Jwks};
use super::jwt::{numeric_date, peek_header, validate_id_token, TokenError};
use super::login::PendingLogin;
use crate::config::ProviderSettings;
use crate::identity::Identity;
use crate::session::SessionRecord;
use crate::UnixTime;

/// How long a fetched discovery document is used before it is fetched again.
pub const DISCOVERY_TTL: i64 = 3600;
/// After a failed discovery fetch, how long the failure is the answer (no new fetch), seconds.
pub const FETCH_RETRY_AFTER: i64 = 5;
/// An unknown `kid` refetches the JWKS at most this often.
pub const JWKS_REFETCH_INTERVAL: i64 = 30;

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
}

#[derive(Debug, Default)]
struct CacheState {
    discovery: Option<(Arc<Discovery>, UnixTime)>,
    jwks: Option<(Arc<Jwks>, UnixTime)>,
    /// Last JWKS fetch attempt, successful or not: the unknown-kid rate limit.
    jwks_attempted_at: Option<UnixTime>,
    /// The last discovery fetch failed: when, and why.
    discovery_failed: Option<(UnixTime, String)>,
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
    /// Why the last discovery fetch failed, if it did less than `FETCH_RETRY_AFTER` seconds
    /// ago: callers answer with it (or a stale document) instead of fetching again. No I/O.
    pub fn discovery_failure(&self, now: UnixTime) -> Option<String> {
        let state = self.state();
        let (at, reason) = state.discovery_failed.as_ref()?;
        (now.saturating_sub(*at) < FETCH_RETRY_AFTER).then(|| reason.clone())
    }
    /// Fresh cached document, else fetches (blocking). On fetch failure a stale cached document
    /// is returned if there is one; otherwise the error. Within `FETCH_RETRY_AFTER` of a failed
    /// fetch, no new fetch is made.
    pub fn discovery(
        &self,
        client: &ProviderClient,
        settings: &ProviderSettings,
        now: UnixTime,
    ) -> Result<Arc<Discovery>, ProviderError> {
        if let Some(fresh) = self.fresh_discovery(now) {
            return Ok(fresh);
        }
        if let Some(reason) = self.discovery_failure(now) {
            let url = settings.issuer.to_string();
            return self.any_discovery().ok_or(ProviderError::Unreachable { url, reason });
        }
        // The fetch runs without the lock: other threads keep reading the old document.
        match client.fetch_discovery(settings) {
            Ok(discovery) => {
                let discovery = Arc::new(discovery);
                let mut state = self.state();
                state.discovery = Some((discovery.clone(), now));
                state.discovery_failed = None;
                Ok(discovery)
            }
            Err(error) => {
                self.state().discovery_failed = Some((now, error.to_string()));
                self.any_discovery().ok_or(error)
            }
        }
    }
    /// JWKS for verifying a token with `kid`: cached unless missing or lacking `kid`, in which
    /// case it is fetched (an unknown kid at most once per `JWKS_REFETCH_INTERVAL`). Returns an
    /// empty set when the provider has no `jwks_uri`.
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
        let cached = self.state().jwks.clone();
        if let Some((jwks, fetched_at)) = &cached {
            let has_key = kid.map_or(!jwks.is_empty(), |kid| jwks.has_kid(kid));
            if has_key && now.saturating_sub(*fetched_at) < DISCOVERY_TTL {
                return Ok(jwks.clone());
            }
            if !has_key && self.refetched_recently(now) {
                return Ok(jwks.clone());
            }
        }
        self.state().jwks_attempted_at = Some(now);
        match client.fetch_jwks(jwks_uri) {
            Ok(jwks) => {
                let jwks = Arc::new(jwks);
                self.state().jwks = Some((jwks.clone(), now));
                Ok(jwks)
            }
            // An old set that still has the key beats failing the login.
            Err(error) => match cached {
                Some((jwks, _)) if kid.is_some_and(|kid| jwks.has_kid(kid)) => Ok(jwks),
                _ => Err(error),
            },
        }
    }

    fn refetched_recently(&self, now: UnixTime) -> bool {
        self.state()
            .jwks_attempted_at
            .is_some_and(|at| now.saturating_sub(at) < JWKS_REFETCH_INTERVAL)
    }

    /// The state; a panic in another thread while holding the lock leaves valid data behind
    /// (every update is a single assignment), so poisoning is ignored.
    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Redeems `code` for `login` and builds the session record:
/// discovery (cache) -> token exchange (PKCE verifier, login.redirect_uri) -> id_token
/// validation (JWKS by kid, refetched once on an unknown kid; HS256 with the client secret;
/// iss/aud/exp/nonce) -> userinfo when the provider has an endpoint (its `sub` must match; its
/// claims are merged over the id_token's) -> [`SessionRecord`] with identity headers from the
/// merged claims and the access token, `expires_at` = now + expires_in (else id_token exp),
/// capped at now + `max_lifetime`.
pub fn complete_login(
    settings: &ProviderSettings,
    cache: &MetadataCache,
    client: &ProviderClient,
    login: &PendingLogin,
    code: &str,
    max_lifetime: i64,
    now: UnixTime,
) -> Result<SessionRecord, LoginError> {
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
    let claims = validate_id_token(
        &tokens.id_token,
        &jwks,
        &settings.client_secret,
        settings.issuer.as_str(),
        &settings.client_id,
        &login.nonce,
        now,
    )?;
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use super::*;
    use crate::config::{parse_http_url, Mode};
    use crate::oidc::jwt::tests::{jwks_json, sign, CLIENT_ID, SECRET};
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
}
