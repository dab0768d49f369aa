//! The callback's work, run on a thread-pool thread: code -> tokens -> validated claims ->
//! session record.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use super::client::{ProviderClient, ProviderError, TokenResponse};
use super::discovery::{Discovery, Jwks};
use super::jwt::{numeric_date, peek_header, validate_id_token, ExpectedClaims, TokenError};
use super::login::PendingLogin;
use super::metadata::MetadataCache;
use crate::config::ProviderSettings;
use crate::identity::Identity;
use crate::session::SessionRecord;
use crate::UnixTime;

/// A login's provider calls (discovery, token, JWKS, userinfo) end within this many provider
/// timeouts (`timeout`), all together.
pub const LOGIN_TIMEOUTS: u32 = 2;

/// One provider's settings, HTTP client and metadata cache, borrowed together: what a login
/// talks to the provider with. [`crate::provider::ProviderRuntime::context`] lends its own.
#[derive(Debug, Clone, Copy)]
pub struct ProviderContext<'a> {
    pub settings: &'a ProviderSettings,
    pub client: &'a ProviderClient,
    /// Discovery and JWKS, per worker.
    pub cache: &'a MetadataCache,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("userinfo \"sub\" does not match the id_token")]
    UserinfoSubject,
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
    provider: ProviderContext<'_>,
    login: &PendingLogin,
    code: &str,
    max_lifetime: i64,
    now: UnixTime,
) -> Result<SessionRecord, LoginError> {
    let budget = provider.client.timeout().saturating_mul(LOGIN_TIMEOUTS);
    let deadline_client = match Instant::now().checked_add(budget) {
        Some(deadline) => provider.client.with_deadline(deadline),
        None => provider.client.clone(),
    };
    // Every call of the login, the JWKS fetch in `validated_claims` too, has that deadline.
    let provider = ProviderContext { client: &deadline_client, ..provider };
    let ProviderContext { settings, client, cache } = provider;
    let discovery = cache.discovery(client, settings, now)?;
    let tokens =
        client.exchange_code(settings, &discovery, code, &login.verifier, &login.redirect_uri)?;
    let id_claims = validated_claims(provider, &discovery, login, &tokens, now)?;
    let mut claims = id_claims.clone();
    if let Some(endpoint) = discovery.userinfo_endpoint.as_deref() {
        let userinfo = client.userinfo(endpoint, &tokens.access_token)?;
        if userinfo.get("sub") != id_claims.get("sub") {
            return Err(LoginError::UserinfoSubject);
        }
        claims.extend(userinfo);
    }
    let expires_at = session_expiry(&tokens, &id_claims, max_lifetime, now);
    let mut identity = Identity::from_claims(&claims, &tokens.access_token);
    if let Some(attributes) = &settings.basic_auth {
        identity.add_basic_auth(&claims, attributes);
    }
    identity.add_meta_jwks(discovery.jwks_uri.as_deref());
    let mut record = SessionRecord {
        sub: string_claim(&id_claims, "sub").unwrap_or_default(),
        sid: string_claim(&id_claims, "sid"),
        expires_at,
        identity,
        id_token: tokens.id_token,
        claims_json: Value::Object(claims).to_string(),
    };
    record.compact(&settings.client_id);
    Ok(record)
}

/// The id_token's claims after full validation, with the JWKS from the cache when the token is
/// signed with a provider key.
fn validated_claims(
    provider: ProviderContext<'_>,
    discovery: &Discovery,
    login: &PendingLogin,
    tokens: &TokenResponse,
    now: UnixTime,
) -> Result<Map<String, Value>, LoginError> {
    let ProviderContext { settings, client, cache } = provider;
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use super::*;
    use crate::oidc::jwt::tests::{jwks_json, public_jwk, sign, CLIENT_ID};
    use crate::oidc::metadata::JWKS_REFETCH_INTERVAL;
    use crate::oidc::test_server::{Reply, TestServer};
    use crate::oidc::test_support::{
        discovery_json, hs256_provider, id_claims, jwks_fetches, jwks_provider, login, paths,
        provider, settings, RelyingParty, NOW,
    };

    const MAX_LIFETIME: i64 = 86_400;

    #[test]
    fn complete_login_builds_the_session_record() {
        let login = login();
        let userinfo = json!({"sub": "user-1", "preferred_username": "akadmin", "email": "a@example.com",
            "ak_proxy": {"user_attributes": {"additionalHeaders": {"X-Team": "blue"}}}});
        let server = hs256_provider(login.nonce.clone(), userinfo, Some(300));
        let rp = RelyingParty::new(settings(&server));

        let record = complete_login(rp.context(), &login, "code-1", MAX_LIFETIME, NOW).unwrap();

        assert_eq!(record.sub, "user-1");
        assert_eq!(record.sid.as_deref(), Some("session-7"));
        assert_eq!(record.expires_at, NOW + 300);
        assert_eq!(record.identity.username(), "akadmin");
        assert_eq!(record.identity.values[1], "admins|users");
        assert_eq!(record.identity.values[3], "a@example.com");
        assert_eq!(record.identity.values[5], "user-1");
        assert_eq!(record.identity.values[6], "access-1");
        assert_eq!(record.identity.additional[0], ("X-Team".to_owned(), "blue".to_owned()));
        // the provider's keys travel with the session (empty: this provider has no jwks_uri)
        assert_eq!(record.identity.additional[1].0, "X-authentik-meta-jwks");
        assert_eq!(record.identity.additional.len(), 2);
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
        assert!(rp.cache.fresh_discovery(NOW).is_some());
    }

    /// rp-userinfo-bad-sub-claim.
    #[test]
    fn userinfo_subject_must_match() {
        let login = login();
        let server = hs256_provider(login.nonce.clone(), json!({"sub": "someone-else"}), None);
        let rp = RelyingParty::new(settings(&server));
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
        assert!(matches!(result, Err(LoginError::UserinfoSubject)), "{result:?}");
        let server = hs256_provider(login.nonce.clone(), json!({"name": "no sub"}), None);
        let rp = RelyingParty::new(settings(&server));
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
        assert!(matches!(result, Err(LoginError::UserinfoSubject)), "{result:?}");
    }

    #[test]
    fn expiry_comes_from_exp_without_expires_in_and_is_capped() {
        let login = login();
        let server = hs256_provider(login.nonce.clone(), json!({"sub": "user-1"}), None);
        let rp = RelyingParty::new(settings(&server));
        let record = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW).unwrap();
        assert_eq!(record.expires_at, NOW + 600);
        let record = complete_login(rp.context(), &login, "c", 60, NOW).unwrap();
        assert_eq!(record.expires_at, NOW + 60);
    }

    /// rp-nonce-invalid.
    #[test]
    fn wrong_nonce_fails_the_login() {
        let login = login();
        let server = hs256_provider("another-nonce".into(), json!({"sub": "user-1"}), None);
        let rp = RelyingParty::new(settings(&server));
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
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
        let rp = RelyingParty::new(settings(&server));
        for _ in 0..2 {
            let record = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW).unwrap();
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
        let rp = RelyingParty::new(settings(&server));
        let jwks_fetches = || paths(&server).iter().filter(|p| *p == "/jwks/").count();
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
        assert!(
            matches!(result, Err(LoginError::Token(TokenError::UnknownKey(ref k))) if k == "rotated-kid"),
            "{result:?}"
        );
        assert_eq!(jwks_fetches(), 1);
        let _ = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW + 10);
        assert_eq!(jwks_fetches(), 1);
        let _ =
            complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW + JWKS_REFETCH_INTERVAL);
        assert_eq!(jwks_fetches(), 2);
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
        let rp = RelyingParty::new(settings(&server));
        complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW).unwrap();
        assert_eq!(jwks_fetches(&server), 1);
        rotated.store(true, Ordering::SeqCst);
        let record = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW + 1).unwrap();
        assert_eq!(peek_header(&record.id_token).unwrap().0.as_deref(), Some("key-b"));
        assert_eq!(jwks_fetches(&server), 2);
        // Both keys are now cached.
        complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW + 2).unwrap();
        assert_eq!(jwks_fetches(&server), 2);
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
        let rp = RelyingParty::new(settings);
        let started = Instant::now();
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
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
        let fresh_cache = MetadataCache::default();
        let provider = ProviderContext { cache: &fresh_cache, ..rp.context() };
        complete_login(provider, &login, "c", MAX_LIFETIME, NOW).unwrap();
    }

    #[test]
    fn rp_id_token_kid_absent_single_jwks() {
        let login = login();
        let nonce = login.nonce.clone();
        let server = jwks_provider(
            || json!({"keys": [public_jwk(Algorithm::RS256, "only")]}),
            move |base| sign(&id_claims(base, &nonce), Algorithm::RS256, None),
        );
        let rp = RelyingParty::new(settings(&server));
        for at in [NOW, NOW + 1] {
            complete_login(rp.context(), &login, "c", MAX_LIFETIME, at).unwrap();
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
        let rp = RelyingParty::new(settings(&server));
        for at in [NOW, NOW + 1] {
            let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, at);
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
        let rp = RelyingParty::new(settings(&server));
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
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
        let mut rp = RelyingParty::new(settings(&server));
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
        assert!(
            matches!(result, Err(LoginError::Token(TokenError::UntrustedAudience(ref aud))) if aud == "other"),
            "{result:?}"
        );
        rp.settings.trusted_audiences = vec!["other".into()];
        complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW).unwrap();
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
        let rp = RelyingParty::new(settings(&server));
        let result = complete_login(rp.context(), &login, "c", MAX_LIFETIME, NOW);
        assert!(matches!(result, Err(LoginError::Token(TokenError::NoIssuedAt))), "{result:?}");
    }
}
