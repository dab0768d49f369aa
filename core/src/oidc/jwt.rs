//! id_token validation (OIDC Core 3.1.3.7) with the `jsonwebtoken` crate.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::discovery::{same_issuer, Jwks};
use crate::config::ProviderSettings;
use crate::UnixTime;

/// Clock skew tolerated on `exp`, in seconds.
pub const EXP_LEEWAY: i64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed id_token")]
    Malformed,
    #[error("id_token algorithm \"{0}\" is not accepted")]
    Algorithm(String),
    #[error("id_token key \"{0}\" not found in JWKS")]
    UnknownKey(String),
    #[error("id_token signature is invalid")]
    Signature,
    #[error("id_token issuer \"{0}\" does not match")]
    Issuer(String),
    #[error("id_token audience does not include the client id")]
    Audience,
    #[error("id_token audience \"{0}\" is not trusted")]
    UntrustedAudience(String),
    #[error("id_token has several audiences and no \"azp\" claim")]
    NoAuthorizedParty,
    #[error("id_token has expired")]
    Expired,
    #[error("id_token nonce does not match")]
    Nonce,
    #[error("id_token has no \"sub\" claim")]
    NoSubject,
    #[error("id_token has no \"iat\" claim")]
    NoIssuedAt,
}

/// What a valid id_token says besides its signature: the values [`validate_id_token`] checks.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedClaims<'a> {
    /// `iss` (one trailing `/` ignored).
    pub issuer: &'a str,
    /// Must be one of the audiences, and `azp` when there is one.
    pub client_id: &'a str,
    /// Audiences the token may name besides `client_id` (`trusted_audiences`).
    pub trusted_audiences: &'a [String],
    /// The login's nonce; an empty one matches nothing.
    pub nonce: &'a str,
    /// The clock `exp` is checked against.
    pub now: UnixTime,
}

impl<'a> ExpectedClaims<'a> {
    /// The claims expected from `settings`' provider for the login with `nonce`.
    pub fn new(settings: &'a ProviderSettings, nonce: &'a str, now: UnixTime) -> Self {
        ExpectedClaims {
            issuer: settings.issuer.as_str(),
            client_id: &settings.client_id,
            trusted_audiences: &settings.trusted_audiences,
            nonce,
            now,
        }
    }
}

/// The `kid` and `alg` of a JWT's header, without verifying anything.
///
/// Read by hand (rather than with `jsonwebtoken::decode_header`) so that algorithms
/// `jsonwebtoken` does not know, such as `none`, are reported by name; the signature is still
/// verified by `jsonwebtoken::decode`, which parses the header again.
pub fn peek_header(token: &str) -> Result<(Option<String>, String), TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    let Some(Value::String(alg)) = header.get("alg") else {
        return Err(TokenError::Malformed);
    };
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    Ok((kid, alg.clone()))
}

/// Verifies `id_token` and returns its claims (OIDC Core 3.1.3.7).
/// Accepted algorithms: RS256, ES256 (key from `jwks`, by `kid`; a token without `kid` needs a
/// JWKS with exactly one key of its algorithm, it is refused when there are several) and HS256
/// (key = `client_secret` bytes, as authentik signs proxy providers); `none` and every other
/// algorithm are refused.
/// Checks `iss` == `expected.issuer` (ignoring one trailing `/`); `aud` contains `client_id` and
/// nothing but `client_id` and `trusted_audiences`; with several audiences, `azp` is present;
/// `azp`, when present, is `client_id`; `exp` > now (60 s leeway); `iat` present and numeric;
/// `nonce` == `expected.nonce` (constant-time); `sub` a non-empty string.
pub fn validate_id_token(
    id_token: &str,
    jwks: &Jwks,
    client_secret: &str,
    expected: &ExpectedClaims<'_>,
) -> Result<Map<String, Value>, TokenError> {
    let claims = validate_grant_id_token(id_token, jwks, client_secret, expected)?;
    check_nonce(&claims, expected.nonce)?;
    Ok(claims)
}

/// [`validate_id_token`] without the `nonce` check, for an id_token from a grant that sends
/// none (authentik's `client_credentials` with an app password).
pub fn validate_grant_id_token(
    id_token: &str,
    jwks: &Jwks,
    client_secret: &str,
    expected: &ExpectedClaims<'_>,
) -> Result<Map<String, Value>, TokenError> {
    let (kid, alg) = peek_header(id_token)?;
    let (algorithm, key) = verification_key(&alg, kid.as_deref(), jwks, client_secret)?;
    let claims = verify_signature_and_audience(id_token, algorithm, &key, expected.client_id)?;
    check_issuer(&claims, expected.issuer)?;
    check_audience(&claims, expected.client_id, expected.trusted_audiences)?;
    check_expiry(&claims, expected.now)?;
    check_issued_at(&claims)?;
    check_subject(&claims)?;
    Ok(claims)
}

fn verification_key(
    alg: &str,
    kid: Option<&str>,
    jwks: &Jwks,
    client_secret: &str,
) -> Result<(Algorithm, DecodingKey), TokenError> {
    let algorithm = match alg {
        "HS256" if !client_secret.is_empty() => {
            return Ok((Algorithm::HS256, DecodingKey::from_secret(client_secret.as_bytes())));
        }
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        other => return Err(TokenError::Algorithm(other.to_owned())),
    };
    let Some(key) = jwks.key_for(kid, algorithm) else {
        return Err(TokenError::UnknownKey(kid.unwrap_or_default().to_owned()));
    };
    Ok((algorithm, key.clone()))
}

/// Signature (only `algorithm` accepted) and `aud` (required, must contain `client_id`), by
/// `jsonwebtoken`. Time claims are checked by the caller against the pinned `now`.
fn verify_signature_and_audience(
    id_token: &str,
    algorithm: Algorithm,
    key: &DecodingKey,
    client_id: &str,
) -> Result<Map<String, Value>, TokenError> {
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    validation.required_spec_claims = HashSet::from(["aud".to_owned()]);
    validation.set_audience(&[client_id]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(id_token, key, &validation)
        .map_err(|e| token_error(e.kind(), algorithm))?;
    Ok(data.claims)
}

fn token_error(kind: &ErrorKind, algorithm: Algorithm) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => TokenError::Signature,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => TokenError::Audience,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::Algorithm(format!("{algorithm:?}"))
        }
        _ => TokenError::Malformed,
    }
}

fn check_issuer(claims: &Map<String, Value>, issuer: &str) -> Result<(), TokenError> {
    match claims.get("iss") {
        Some(Value::String(iss)) if same_issuer(iss, issuer) => Ok(()),
        Some(Value::String(iss)) => Err(TokenError::Issuer(iss.clone())),
        _ => Err(TokenError::Issuer(String::new())),
    }
}

/// OIDC Core 3.1.3.7 (3, 4, 5): `aud` (a string or an array of strings) contains `client_id`
/// and no audience but `client_id` and the trusted ones; with several audiences `azp` is
/// required; `azp`, when present, must be the client.
fn check_audience(
    claims: &Map<String, Value>,
    client_id: &str,
    trusted_audiences: &[String],
) -> Result<(), TokenError> {
    let mut audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(values)) => {
            let Some(audiences) = values.iter().map(Value::as_str).collect() else {
                return Err(TokenError::Audience);
            };
            audiences
        }
        _ => return Err(TokenError::Audience),
    };
    audiences.sort_unstable();
    audiences.dedup();
    if !audiences.contains(&client_id) {
        return Err(TokenError::Audience);
    }
    match claims.get("azp") {
        None if audiences.len() > 1 => return Err(TokenError::NoAuthorizedParty),
        None => {}
        Some(Value::String(azp)) if azp == client_id => {}
        Some(_) => return Err(TokenError::Audience),
    }
    let trusted = |aud: &str| aud == client_id || trusted_audiences.iter().any(|t| t == aud);
    if let Some(untrusted) = audiences.into_iter().find(|aud| !trusted(aud)) {
        return Err(TokenError::UntrustedAudience(untrusted.to_owned()));
    }
    Ok(())
}

fn check_expiry(claims: &Map<String, Value>, now: UnixTime) -> Result<(), TokenError> {
    let Some(exp) = claims.get("exp").and_then(numeric_date) else {
        return Err(TokenError::Malformed);
    };
    if now >= exp.saturating_add(EXP_LEEWAY) {
        return Err(TokenError::Expired);
    }
    Ok(())
}

/// OIDC Core 2: `iat` is required, a NumericDate.
fn check_issued_at(claims: &Map<String, Value>) -> Result<(), TokenError> {
    match claims.get("iat").and_then(numeric_date) {
        Some(_) => Ok(()),
        None => Err(TokenError::NoIssuedAt),
    }
}

/// A JWT NumericDate: an integer, or a float truncated to seconds.
pub(crate) fn numeric_date(value: &Value) -> Option<i64> {
    let number = value.as_number()?;
    // `as` saturates for out-of-range floats; NaN cannot come out of JSON.
    number.as_i64().or_else(|| number.as_f64().map(|f| f as i64))
}

fn check_nonce(claims: &Map<String, Value>, nonce: &str) -> Result<(), TokenError> {
    let Some(Value::String(found)) = claims.get("nonce") else {
        return Err(TokenError::Nonce);
    };
    if nonce.is_empty() || !bool::from(found.as_bytes().ct_eq(nonce.as_bytes())) {
        return Err(TokenError::Nonce);
    }
    Ok(())
}

fn check_subject(claims: &Map<String, Value>) -> Result<(), TokenError> {
    match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => Ok(()),
        _ => Err(TokenError::NoSubject),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    pub(crate) const RSA_PEM: &[u8] = include_bytes!("../../tests/data/rsa_private.pem");
    pub(crate) const EC_PEM: &[u8] = include_bytes!("../../tests/data/ec_private.pem");
    pub(crate) const ISSUER: &str = "https://auth.example.com/application/o/app/";
    pub(crate) const CLIENT_ID: &str = "client-id";
    pub(crate) const SECRET: &str = "client-secret-of-at-least-some-length";
    pub(crate) const NONCE: &str = "n-0S6_WzA2Mj";
    pub(crate) const NOW: i64 = 1_700_000_000;

    pub(crate) fn claims() -> Value {
        json!({
            "iss": ISSUER,
            "sub": "user-1",
            "aud": CLIENT_ID,
            "exp": NOW + 300,
            "iat": NOW,
            "nonce": NONCE,
            "preferred_username": "akadmin",
        })
    }

    pub(crate) fn sign(claims: &Value, alg: Algorithm, kid: Option<&str>) -> String {
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS512 => EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::RS256 | Algorithm::RS384 => EncodingKey::from_rsa_pem(RSA_PEM).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PEM).unwrap(),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    pub(crate) fn public_jwk(alg: Algorithm, kid: &str) -> Value {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PEM).unwrap(),
            _ => EncodingKey::from_ec_pem(EC_PEM).unwrap(),
        };
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk
    }

    /// JWKS document with the test RSA key as `rsa-kid` and the EC key as `ec-kid`.
    pub(crate) fn jwks_json() -> Value {
        json!({"keys": [public_jwk(Algorithm::RS256, "rsa-kid"), public_jwk(Algorithm::ES256, "ec-kid")]})
    }

    const EXPECTED: ExpectedClaims<'static> = ExpectedClaims {
        issuer: ISSUER,
        client_id: CLIENT_ID,
        trusted_audiences: &[],
        nonce: NONCE,
        now: NOW,
    };

    fn jwks() -> Jwks {
        Jwks::parse(jwks_json().to_string().as_bytes()).unwrap()
    }

    fn validate(token: &str) -> Result<Map<String, Value>, TokenError> {
        validate_id_token(token, &jwks(), SECRET, &EXPECTED)
    }

    fn with(changes: Value) -> Value {
        let mut claims = claims();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    fn unsigned(header: Value, claims: &Value) -> String {
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", part(&header), part(claims))
    }

    #[test]
    fn accepts_rs256_es256_and_hs256() {
        for (alg, kid) in [
            (Algorithm::RS256, Some("rsa-kid")),
            (Algorithm::ES256, Some("ec-kid")),
            (Algorithm::HS256, None),
        ] {
            let claims =
                validate(&sign(&claims(), alg, kid)).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(claims["sub"], "user-1");
            assert_eq!(claims["preferred_username"], "akadmin");
        }
    }

    /// rp-id_token-kid-absent-single-jwks (accepted) and rp-id_token-kid-absent-multiple-jwks
    /// (refused: the RP test allows refusing or trying each key).
    #[test]
    fn token_without_kid_uses_the_only_key_of_its_algorithm() {
        assert!(validate(&sign(&claims(), Algorithm::RS256, None)).is_ok());
        assert!(validate(&sign(&claims(), Algorithm::ES256, None)).is_ok());
        let doubled =
            json!({"keys": [public_jwk(Algorithm::RS256, "a"), public_jwk(Algorithm::RS256, "b")]});
        let jwks = Jwks::parse(doubled.to_string().as_bytes()).unwrap();
        let token = sign(&claims(), Algorithm::RS256, None);
        assert_eq!(
            validate_id_token(&token, &jwks, SECRET, &EXPECTED),
            Err(TokenError::UnknownKey(String::new()))
        );
    }

    #[test]
    fn unknown_kid_is_reported_for_refetch() {
        let token = sign(&claims(), Algorithm::RS256, Some("rotated"));
        assert_eq!(validate(&token), Err(TokenError::UnknownKey("rotated".into())));
        let token = sign(&claims(), Algorithm::RS256, Some("rsa-kid"));
        assert_eq!(
            validate_id_token(&token, &Jwks::default(), SECRET, &EXPECTED),
            Err(TokenError::UnknownKey("rsa-kid".into()))
        );
        // An RS256 token naming the EC key's kid does not get the EC key.
        let token = sign(&claims(), Algorithm::RS256, Some("ec-kid"));
        assert_eq!(validate(&token), Err(TokenError::UnknownKey("ec-kid".into())));
    }

    /// Includes rp-id_token-sig-none.
    #[test]
    fn other_algorithms_are_refused() {
        assert_eq!(
            validate(&sign(&claims(), Algorithm::HS512, None)),
            Err(TokenError::Algorithm("HS512".into()))
        );
        assert_eq!(
            validate(&sign(&claims(), Algorithm::RS384, Some("rsa-kid"))),
            Err(TokenError::Algorithm("RS384".into()))
        );
        let none = unsigned(json!({"alg": "none", "typ": "JWT"}), &claims());
        assert_eq!(validate(&none), Err(TokenError::Algorithm("none".into())));
        let none_upper = unsigned(json!({"alg": "None"}), &claims());
        assert_eq!(validate(&none_upper), Err(TokenError::Algorithm("None".into())));
    }

    #[test]
    fn hs256_needs_a_client_secret() {
        let token = sign(&claims(), Algorithm::HS256, None);
        assert_eq!(
            validate_id_token(&token, &jwks(), "", &EXPECTED),
            Err(TokenError::Algorithm("HS256".into()))
        );
        assert_eq!(
            validate_id_token(&token, &jwks(), "other-secret", &EXPECTED),
            Err(TokenError::Signature)
        );
    }

    /// rp-id_token-bad-sig-rs256, -es256, -hs256.
    #[test]
    fn bad_signatures_are_refused() {
        for (alg, kid) in [
            (Algorithm::RS256, Some("rsa-kid")),
            (Algorithm::ES256, Some("ec-kid")),
            (Algorithm::HS256, None),
        ] {
            let token = sign(&claims(), alg, kid);
            let (message, signature) = token.rsplit_once('.').unwrap();
            let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
            sig[5] ^= 1;
            let tampered_sig = format!("{message}.{}", URL_SAFE_NO_PAD.encode(&sig));
            assert_eq!(validate(&tampered_sig), Err(TokenError::Signature), "{alg:?}");
            // Claims swapped under a valid signature.
            let other = sign(&with(json!({"sub": "admin"})), alg, kid);
            let mut parts: Vec<&str> = token.split('.').collect();
            parts[1] = other.split('.').nth(1).unwrap();
            assert_eq!(validate(&parts.join(".")), Err(TokenError::Signature), "{alg:?}");
        }
    }

    #[test]
    fn hs256_token_signed_with_the_public_key_is_refused() {
        // Algorithm confusion: an HS256 token whose "secret" is the RSA public key.
        let jwk = public_jwk(Algorithm::RS256, "rsa-kid");
        let fake_secret = jwk["n"].as_str().unwrap();
        let header = Header { kid: Some("rsa-kid".into()), ..Header::new(Algorithm::HS256) };
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(fake_secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(validate(&token), Err(TokenError::Signature));
    }

    /// rp-id_token-issuer-mismatch.
    #[test]
    fn issuer_must_match() {
        let token = sign(&with(json!({"iss": "https://evil.example/"})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Issuer("https://evil.example/".into())));
        let token = sign(&with(json!({"iss": null})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Issuer(String::new())));
        let without_slash = ISSUER.trim_end_matches('/');
        let token = sign(&with(json!({"iss": without_slash})), Algorithm::HS256, None);
        assert!(validate(&token).is_ok());
    }

    /// rp-id_token-aud.
    #[test]
    fn audience_must_include_the_client() {
        let token = sign(&with(json!({"aud": "someone-else"})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Audience));
        let token = sign(&with(json!({"aud": null})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Audience));
        // Several audiences: only with azp = the client, and only trusted ones.
        let trusted = ["other".to_owned()];
        let trusting = ExpectedClaims { trusted_audiences: &trusted, ..EXPECTED };
        let token = sign(
            &with(json!({"aud": ["other", CLIENT_ID], "azp": CLIENT_ID})),
            Algorithm::HS256,
            None,
        );
        assert!(validate_id_token(&token, &jwks(), SECRET, &trusting).is_ok());
        assert_eq!(validate(&token), Err(TokenError::UntrustedAudience("other".into())));
        let token = sign(
            &with(json!({"aud": ["other", CLIENT_ID], "azp": "other"})),
            Algorithm::HS256,
            None,
        );
        assert_eq!(validate(&token), Err(TokenError::Audience));
    }

    /// An array holding the client and an untrusted party, without azp, was accepted.
    #[test]
    fn rp_id_token_aud_untrusted_party_is_refused() {
        let token = sign(&with(json!({"aud": ["other", CLIENT_ID]})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::NoAuthorizedParty));
        assert_eq!(
            TokenError::NoAuthorizedParty.to_string(),
            "id_token has several audiences and no \"azp\" claim"
        );
        // Trusting the other party does not make azp optional.
        let trusted = ["other".to_owned()];
        let trusting = ExpectedClaims { trusted_audiences: &trusted, ..EXPECTED };
        assert_eq!(
            validate_id_token(&token, &jwks(), SECRET, &trusting),
            Err(TokenError::NoAuthorizedParty)
        );
        // With azp = the client, the other audience must still be trusted.
        let token = sign(
            &with(json!({"aud": ["other", CLIENT_ID, "third"], "azp": CLIENT_ID})),
            Algorithm::HS256,
            None,
        );
        assert_eq!(
            validate_id_token(&token, &jwks(), SECRET, &trusting),
            Err(TokenError::UntrustedAudience("third".into()))
        );
        assert_eq!(
            TokenError::UntrustedAudience("third".into()).to_string(),
            "id_token audience \"third\" is not trusted"
        );
        // A single audience that is the client, in an array or repeated, is one audience.
        for aud in [json!([CLIENT_ID]), json!([CLIENT_ID, CLIENT_ID])] {
            let token = sign(&with(json!({ "aud": aud })), Algorithm::HS256, None);
            assert!(validate(&token).is_ok(), "{aud}");
        }
        // azp, when present with one audience, is still the client.
        let token = sign(&with(json!({"azp": "other"})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Audience));
        for aud in [json!([]), json!([CLIENT_ID, 5]), json!({"aud": CLIENT_ID})] {
            let token = sign(&with(json!({ "aud": aud })), Algorithm::HS256, None);
            assert!(validate(&token).is_err(), "{aud}");
        }
    }

    #[test]
    fn rp_id_token_iat_is_required() {
        let token = sign(&with(json!({"iat": null})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::NoIssuedAt));
        for iat in [json!("1700000000"), json!(true), json!([NOW]), json!({})] {
            let token = sign(&with(json!({ "iat": iat })), Algorithm::HS256, None);
            assert_eq!(validate(&token), Err(TokenError::NoIssuedAt), "{iat}");
        }
        let token = sign(&with(json!({"iat": NOW as f64 + 0.5})), Algorithm::HS256, None);
        assert!(validate(&token).is_ok());
        assert_eq!(TokenError::NoIssuedAt.to_string(), "id_token has no \"iat\" claim");
    }

    #[test]
    fn expected_claims_come_from_the_settings() {
        let settings = ProviderSettings {
            name: "app".into(),
            issuer: crate::config::parse_http_url(ISSUER).unwrap(),
            client_id: CLIENT_ID.into(),
            client_secret: SECRET.into(),
            external_host: None,
            mode: crate::config::Mode::Proxy,
            cookie_domain: None,
            scopes: vec!["openid".into()],
            timeout_ms: 1_000,
            ca_file: None,
            post_logout_redirect: None,
            trusted_audiences: vec!["other".into()],
            meta: Default::default(),
            backchannel_host: None,
            basic_auth: None,
        };
        let expected = ExpectedClaims::new(&settings, NONCE, NOW);
        assert_eq!(expected.issuer, ISSUER);
        assert_eq!(expected.client_id, CLIENT_ID);
        assert_eq!(expected.trusted_audiences, ["other".to_owned()]);
        assert_eq!((expected.nonce, expected.now), (NONCE, NOW));
        let token = sign(
            &with(json!({"aud": [CLIENT_ID, "other"], "azp": CLIENT_ID})),
            Algorithm::HS256,
            None,
        );
        assert!(validate_id_token(&token, &jwks(), SECRET, &expected).is_ok());
    }

    #[test]
    fn expiry_uses_the_given_clock_with_leeway() {
        let token = sign(&with(json!({"exp": NOW - 59})), Algorithm::HS256, None);
        assert!(validate(&token).is_ok());
        let token = sign(&with(json!({"exp": NOW - 60})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Expired));
        let token = sign(&with(json!({"exp": NOW - 3600})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Expired));
        let token = sign(&with(json!({"exp": null})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Malformed));
        let token = sign(&with(json!({"exp": "soon"})), Algorithm::HS256, None);
        assert!(validate(&token).is_err());
        // A token long expired by the wall clock is accepted at a pinned `now` before its exp.
        let token = sign(&with(json!({"exp": 1000})), Algorithm::HS256, None);
        let at_900 = ExpectedClaims { now: 900, ..EXPECTED };
        assert!(validate_id_token(&token, &jwks(), SECRET, &at_900).is_ok());
    }

    /// rp-nonce-invalid.
    #[test]
    fn nonce_must_match() {
        let token = sign(&with(json!({"nonce": "other"})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Nonce));
        let token = sign(&with(json!({"nonce": null})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Nonce));
        let token = sign(&with(json!({"nonce": 5})), Algorithm::HS256, None);
        assert_eq!(validate(&token), Err(TokenError::Nonce));
        let token = sign(&with(json!({"nonce": ""})), Algorithm::HS256, None);
        assert_eq!(
            validate_id_token(&token, &jwks(), SECRET, &ExpectedClaims { nonce: "", ..EXPECTED }),
            Err(TokenError::Nonce)
        );
    }

    /// rp-id_token-sub.
    #[test]
    fn subject_is_required() {
        for sub in [Value::Null, json!(""), json!(42)] {
            let token = sign(&with(json!({ "sub": sub })), Algorithm::HS256, None);
            assert_eq!(validate(&token), Err(TokenError::NoSubject), "{sub}");
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for token in ["", "a", "a.b", "a.b.c.d", "!!!.b.c", "e30.e30.", "bnVsbA.e30.x"] {
            assert!(validate(token).is_err(), "{token}");
        }
        assert_eq!(peek_header("e30.e30.x"), Err(TokenError::Malformed));
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":5}"#);
        assert_eq!(peek_header(&format!("{header}.e30.x")), Err(TokenError::Malformed));
        let token = sign(&claims(), Algorithm::HS256, None);
        let (header, rest) = token.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        assert_eq!(
            validate(&format!("{header}.bm90IGpzb24.{signature}")),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn peek_header_reads_kid_and_alg() {
        let token = sign(&claims(), Algorithm::RS256, Some("k1"));
        assert_eq!(peek_header(&token), Ok((Some("k1".into()), "RS256".into())));
        let token = sign(&claims(), Algorithm::HS256, None);
        assert_eq!(peek_header(&token), Ok((None, "HS256".into())));
    }
}
