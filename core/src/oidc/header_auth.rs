//! Header authentication, as authentik's outpost does it for scripts and apps that cannot log
//! in with a browser: `Authorization: Bearer <token>` is checked at the provider's
//! introspection endpoint (only `active: true` passes); `Authorization: Basic` runs authentik's
//! `client_credentials` grant with the username and an app password (username
//! `goauthentik.io/token`: the password is a token, introspected first) and verifies the
//! id_token it returns like a login's. The result is a session record the glue caches in the
//! session zone under a hash of the header value (never the value itself).

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::client::ProviderError;
use super::discovery::Jwks;
use super::flow::ProviderContext;
use super::jwt::{numeric_date, peek_header, validate_grant_id_token, ExpectedClaims, TokenError};
use crate::config::BasicAuthAttributes;
use crate::identity::Identity;
use crate::session::{SessionId, SessionRecord};
use crate::UnixTime;

/// A successful header login is reused for this long, seconds (authentik's 60 s).
pub const CACHE_TTL: i64 = 60;
/// A failed one is the answer for this long, seconds: a wrong token does not turn every
/// request into a call to the provider.
pub const FAILURE_TTL: i64 = 10;
/// The Basic username that makes the password a token.
pub const TOKEN_USERNAME: &str = "goauthentik.io/token";
/// Longest `Authorization` value considered (a JWT with many claims is a few KiB).
pub const MAX_AUTHORIZATION: usize = 16 * 1024;

/// What an `Authorization` header carries.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Bearer(String),
    Basic { username: String, password: String },
}

impl core::fmt::Debug for Credentials {
    /// Never shows a secret.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Credentials::Bearer(_) => f.write_str("Bearer(..)"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username:?}, ..)"),
        }
    }
}

/// Parses an `Authorization` value: `Bearer <token>` or `Basic <base64 user:password>`
/// (schemes case-insensitive); `None` for any other scheme or a malformed value.
pub fn parse_authorization(value: &[u8]) -> Option<Credentials> {
    if value.len() > MAX_AUTHORIZATION {
        return None;
    }
    let value = core::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if rest.is_empty() || rest.contains(|c: char| c.is_control()) {
        return None;
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Credentials::Bearer(rest.to_owned()));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(rest).ok()?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    if username.is_empty() || password.is_empty() || decoded.contains(|c: char| c.is_control()) {
        return None;
    }
    Some(Credentials::Basic { username: username.to_owned(), password: password.to_owned() })
}

/// Where the result of a header login is cached: a hash of the provider and the header value,
/// in the form of a session id (nobody can present it as a cookie without knowing the value).
pub fn cache_id(provider_key: u32, value: &[u8]) -> SessionId {
    let mut h = Sha256::new();
    h.update(b"nginx-authentik header auth\0");
    h.update(provider_key.to_le_bytes());
    h.update(value);
    SessionId(h.finalize().into())
}

/// The record cached for a failed header login: no `sub`, so it names nobody.
pub fn failure_record(now: UnixTime) -> SessionRecord {
    SessionRecord {
        sub: String::new(),
        sid: None,
        expires_at: now.saturating_add(FAILURE_TTL),
        identity: Identity::from_claims(&Map::new(), ""),
        id_token: String::new(),
        claims_json: "{}".to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderAuthError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("the token is not active")]
    Inactive,
    #[error("the token was issued to another client")]
    OtherClient,
    #[error("the provider has no introspection endpoint")]
    NoIntrospection,
    #[error("invalid id_token: {0}")]
    Token(#[from] TokenError),
    #[error("the claims have no \"sub\"")]
    NoSubject,
}

/// Checks `credentials` with the provider (blocking; thread pool only) and builds the record
/// to cache: expires after `CACHE_TTL` or with the token, whichever is first.
pub fn authenticate(
    provider: ProviderContext<'_>,
    credentials: &Credentials,
    now: UnixTime,
) -> Result<SessionRecord, HeaderAuthError> {
    match credentials {
        Credentials::Bearer(token) => introspected(provider, token, now),
        Credentials::Basic { username, password } if username == TOKEN_USERNAME => {
            introspected(provider, password, now)
                .or_else(|_| app_password(provider, username, password, now))
        }
        Credentials::Basic { username, password } => {
            app_password(provider, username, password, now)
        }
    }
}

/// Bearer: the introspection answer's claims (authentik fills them with the token's id_token
/// claims); `X-authentik-jwt` is the bearer token.
fn introspected(
    provider: ProviderContext<'_>,
    token: &str,
    now: UnixTime,
) -> Result<SessionRecord, HeaderAuthError> {
    let ProviderContext { settings, client, cache } = provider;
    let discovery = cache.discovery(client, settings, now)?;
    let Some(endpoint) = discovery.introspection_endpoint.as_deref() else {
        return Err(HeaderAuthError::NoIntrospection);
    };
    let mut claims = client.introspect(settings, &discovery, endpoint, token)?;
    if claims.get("active") != Some(&Value::Bool(true)) {
        return Err(HeaderAuthError::Inactive);
    }
    // A provider may let one client introspect another's tokens (oidc-provider does, for
    // confidential clients): a token issued to another client is not for this application.
    if let Some(Value::String(issued_to)) = claims.get("client_id") {
        if issued_to != &settings.client_id {
            return Err(HeaderAuthError::OtherClient);
        }
    }
    if let Some(exp) = claims.get("exp").and_then(numeric_date) {
        if exp <= now {
            return Err(HeaderAuthError::Inactive);
        }
    }
    for field in ["active", "client_id", "token_type"] {
        claims.remove(field);
    }
    let mut record = record(claims, token, String::new(), settings.basic_auth.as_ref(), now)?;
    record.identity.add_meta_jwks(discovery.jwks_uri.as_deref());
    Ok(record)
}

/// Basic: the `client_credentials` grant, then the id_token verified like a login's (without
/// a nonce: none was sent); `X-authentik-jwt` is the id_token.
fn app_password(
    provider: ProviderContext<'_>,
    username: &str,
    password: &str,
    now: UnixTime,
) -> Result<SessionRecord, HeaderAuthError> {
    let ProviderContext { settings, client, cache } = provider;
    let discovery = cache.discovery(client, settings, now)?;
    let tokens = client.client_credentials(settings, &discovery, username, password)?;
    let (kid, alg) = peek_header(&tokens.id_token)?;
    let jwks = match alg.as_str() {
        "RS256" | "ES256" => cache.jwks(client, &discovery, kid.as_deref(), now)?,
        _ => Arc::new(Jwks::default()),
    };
    let expected = ExpectedClaims::new(settings, "", now);
    let claims =
        validate_grant_id_token(&tokens.id_token, &jwks, &settings.client_secret, &expected)?;
    let id_token = tokens.id_token.clone();
    let mut record = record(claims, &tokens.id_token, id_token, settings.basic_auth.as_ref(), now)?;
    record.identity.add_meta_jwks(discovery.jwks_uri.as_deref());
    Ok(record)
}

fn record(
    claims: Map<String, Value>,
    jwt: &str,
    id_token: String,
    basic_auth: Option<&BasicAuthAttributes>,
    now: UnixTime,
) -> Result<SessionRecord, HeaderAuthError> {
    let Some(sub) = claims.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty()) else {
        return Err(HeaderAuthError::NoSubject);
    };
    let cap = now.saturating_add(CACHE_TTL);
    let expires_at = claims.get("exp").and_then(numeric_date).map_or(cap, |exp| exp.min(cap));
    let mut identity = Identity::from_claims(&claims, jwt);
    if let Some(attributes) = basic_auth {
        identity.add_basic_auth(&claims, attributes);
    }
    Ok(SessionRecord {
        sub: sub.to_owned(),
        sid: claims.get("sid").and_then(Value::as_str).map(str::to_owned),
        expires_at,
        identity,
        id_token,
        claims_json: Value::Object(claims).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_values_parse() {
        assert_eq!(
            parse_authorization(b"Bearer abc.def"),
            Some(Credentials::Bearer("abc.def".into()))
        );
        assert_eq!(parse_authorization(b"bearer  tok "), Some(Credentials::Bearer("tok".into())));
        let basic = format!("Basic {}", STANDARD.encode("alice:pw:with:colons"));
        assert_eq!(
            parse_authorization(basic.as_bytes()),
            Some(Credentials::Basic {
                username: "alice".into(),
                password: "pw:with:colons".into()
            })
        );
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Digest abc",
            b"Basic !!!",
            b"Basic Og==", // ":"
            b"\xff\xfe",
            b"Bearer a\x01b",
        ] {
            assert_eq!(parse_authorization(bad), None, "{bad:?}");
        }
        let no_colon = format!("Basic {}", STANDARD.encode("alice"));
        assert_eq!(parse_authorization(no_colon.as_bytes()), None);
        assert_eq!(parse_authorization(&vec![b'a'; MAX_AUTHORIZATION + 1]), None);
    }

    #[test]
    fn credentials_never_show_secrets() {
        let c = Credentials::Basic { username: "alice".into(), password: "secret".into() };
        assert!(!format!("{c:?}").contains("secret"));
        assert!(!format!("{:?}", Credentials::Bearer("tok-secret".into())).contains("secret"));
    }

    #[test]
    fn cache_ids_depend_on_provider_and_value() {
        let a = cache_id(1, b"Bearer x");
        assert_eq!(a, cache_id(1, b"Bearer x"));
        assert_ne!(a, cache_id(2, b"Bearer x"));
        assert_ne!(a, cache_id(1, b"Bearer y"));
    }

    #[test]
    fn records_expire_with_the_cache_or_the_token() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"sub":"u","exp":1030,"preferred_username":"alice"}"#).unwrap();
        let r = record(claims, "jwt", String::new(), None, 1000).unwrap();
        assert_eq!(r.expires_at, 1030);
        assert_eq!(r.identity.username(), "alice");
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"sub":"u","exp":99999}"#).unwrap();
        assert_eq!(
            record(claims, "jwt", String::new(), None, 1000).unwrap().expires_at,
            1000 + CACHE_TTL
        );
        let claims: Map<String, Value> = serde_json::from_str(r#"{"exp":99999}"#).unwrap();
        assert!(matches!(
            record(claims, "jwt", String::new(), None, 1000),
            Err(HeaderAuthError::NoSubject)
        ));
        assert!(failure_record(1000).sub.is_empty());
    }
}
