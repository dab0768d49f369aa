//! `/.well-known/openid-configuration` and JWKS documents.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid discovery document: {0}")]
    Invalid(String),
    #[error("discovery issuer \"{found}\" does not match configured issuer \"{expected}\"")]
    IssuerMismatch { expected: String, found: String },
}

/// The fields of a discovery document the module uses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// RFC 7662 token introspection (header authentication with a Bearer token).
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    #[serde(default)]
    pub id_token_signing_alg_values_supported: Vec<String>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// `a` and `b` are the same issuer, ignoring one trailing `/` on each.
pub(crate) fn same_issuer(a: &str, b: &str) -> bool {
    a.strip_suffix('/').unwrap_or(a) == b.strip_suffix('/').unwrap_or(b)
}

fn is_http_url(value: &str) -> bool {
    url::Url::parse(value)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
}

impl Discovery {
    /// Parses and checks the document: issuer equal to `expected_issuer` (ignoring one trailing
    /// `/` on both), endpoints absolute http(s) URLs.
    pub fn parse(body: &[u8], expected_issuer: &str) -> Result<Discovery, DiscoveryError> {
        let discovery: Discovery =
            serde_json::from_slice(body).map_err(|e| DiscoveryError::Invalid(e.to_string()))?;
        if !same_issuer(&discovery.issuer, expected_issuer) {
            return Err(DiscoveryError::IssuerMismatch {
                expected: expected_issuer.to_owned(),
                found: discovery.issuer,
            });
        }
        discovery.check_endpoints()?;
        Ok(discovery)
    }

    pub(crate) fn check_endpoints(&self) -> Result<(), DiscoveryError> {
        let required = [
            ("authorization_endpoint", Some(&self.authorization_endpoint)),
            ("token_endpoint", Some(&self.token_endpoint)),
            ("userinfo_endpoint", self.userinfo_endpoint.as_ref()),
            ("end_session_endpoint", self.end_session_endpoint.as_ref()),
            ("jwks_uri", self.jwks_uri.as_ref()),
            ("introspection_endpoint", self.introspection_endpoint.as_ref()),
        ];
        for (name, value) in required {
            let Some(value) = value else {
                continue;
            };
            if !is_http_url(value) {
                return Err(DiscoveryError::Invalid(format!(
                    "\"{name}\" is not an absolute http(s) URL"
                )));
            }
        }
        Ok(())
    }

    /// `client_secret_basic` unless the provider lists only `client_secret_post`.
    pub fn use_basic_auth(&self) -> bool {
        let lists =
            |method: &str| self.token_endpoint_auth_methods_supported.iter().any(|m| m == method);
        lists("client_secret_basic") || !lists("client_secret_post")
    }
}

/// One verification key of a JWKS, ready to use.
#[derive(Debug, Clone)]
struct VerificationKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// A parsed JWK set (RSA and EC P-256 signing keys; others ignored).
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<VerificationKey>,
}

impl Jwks {
    pub fn parse(body: &[u8]) -> Result<Jwks, DiscoveryError> {
        let invalid = |reason: String| DiscoveryError::Invalid(format!("JWKS: {reason}"));
        let document: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
        let Some(entries) = document.get("keys").and_then(Value::as_array) else {
            return Err(invalid("no \"keys\" array".to_owned()));
        };
        let keys = entries
            .iter()
            .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
            .filter_map(|jwk| verification_key(&jwk))
            .collect();
        Ok(Jwks { keys })
    }
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// The key for a token signed with `algorithm`: the key with this `kid`, or without a `kid`
    /// the only key of that algorithm.
    pub(crate) fn key_for(&self, kid: Option<&str>, algorithm: Algorithm) -> Option<&DecodingKey> {
        let mut candidates = self.keys.iter().filter(|k| k.algorithm == algorithm);
        let found = match kid {
            Some(kid) => candidates.find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let only = candidates.next();
                candidates.next().is_none().then_some(only).flatten()
            }
        };
        found.map(|k| &k.key)
    }
}

/// The JWK as a verification key for RS256 or ES256, or `None` when the module cannot use it.
fn verification_key(jwk: &Jwk) -> Option<VerificationKey> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    let declared_matches = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
        Some(_) => false,
    };
    if !declared_matches {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerificationKey { kid: jwk.common.key_id.clone(), algorithm, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn document(issuer: &str) -> Value {
        json!({
            "issuer": issuer,
            "authorization_endpoint": "https://auth.example.com/application/o/authorize/",
            "token_endpoint": "https://auth.example.com/application/o/token/",
            "userinfo_endpoint": "https://auth.example.com/application/o/userinfo/",
            "end_session_endpoint": "https://auth.example.com/application/o/app/end-session/",
            "jwks_uri": "https://auth.example.com/application/o/app/jwks/",
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "extra_field": {"ignored": true},
        })
    }

    fn parse(doc: &Value, expected: &str) -> Result<Discovery, DiscoveryError> {
        Discovery::parse(doc.to_string().as_bytes(), expected)
    }

    #[test]
    fn parses_an_authentik_document() {
        let d = parse(
            &document("https://auth.example.com/application/o/app/"),
            "https://auth.example.com/application/o/app/",
        )
        .unwrap();
        assert_eq!(d.token_endpoint, "https://auth.example.com/application/o/token/");
        assert_eq!(d.jwks_uri.as_deref(), Some("https://auth.example.com/application/o/app/jwks/"));
        assert!(d.use_basic_auth());
    }

    #[test]
    fn issuer_ignores_one_trailing_slash() {
        assert!(parse(
            &document("https://auth.example.com/o/app/"),
            "https://auth.example.com/o/app"
        )
        .is_ok());
        assert!(parse(
            &document("https://auth.example.com/o/app"),
            "https://auth.example.com/o/app/"
        )
        .is_ok());
        let error = parse(
            &document("https://auth.example.com/o/other/"),
            "https://auth.example.com/o/app/",
        )
        .unwrap_err();
        assert!(
            matches!(error, DiscoveryError::IssuerMismatch { ref found, .. } if found == "https://auth.example.com/o/other/")
        );
        assert!(parse(
            &document("https://auth.example.com/o/app//"),
            "https://auth.example.com/o/app"
        )
        .is_err());
    }

    #[test]
    fn refuses_bad_documents() {
        assert!(matches!(Discovery::parse(b"not json", "x"), Err(DiscoveryError::Invalid(_))));
        assert!(matches!(Discovery::parse(b"[]", "x"), Err(DiscoveryError::Invalid(_))));
        let mut doc = document("https://a.example");
        doc.as_object_mut().unwrap().remove("token_endpoint");
        assert!(matches!(parse(&doc, "https://a.example"), Err(DiscoveryError::Invalid(_))));
        let mut doc = document("https://a.example");
        doc["token_endpoint"] = json!("/relative/token");
        let error = parse(&doc, "https://a.example").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid discovery document: \"token_endpoint\" is not an absolute http(s) URL"
        );
        let mut doc = document("https://a.example");
        doc["jwks_uri"] = json!("file:///etc/passwd");
        assert!(parse(&doc, "https://a.example").is_err());
        let mut doc = document("https://a.example");
        doc["userinfo_endpoint"] = Value::Null;
        assert_eq!(parse(&doc, "https://a.example").unwrap().userinfo_endpoint, None);
    }

    #[test]
    fn basic_auth_unless_only_post() {
        let mut d = parse(&document("https://a.example"), "https://a.example").unwrap();
        d.token_endpoint_auth_methods_supported = vec!["client_secret_post".into()];
        assert!(!d.use_basic_auth());
        d.token_endpoint_auth_methods_supported =
            vec!["private_key_jwt".into(), "client_secret_post".into()];
        assert!(!d.use_basic_auth());
        d.token_endpoint_auth_methods_supported = vec![];
        assert!(d.use_basic_auth());
        d.token_endpoint_auth_methods_supported = vec!["client_secret_basic".into()];
        assert!(d.use_basic_auth());
    }

    // A real P-256 public key (RFC 7515 appendix A.3) and RSA public key (RFC 7517 appendix A.1).
    const EC_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const EC_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
    const RSA_N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

    #[test]
    fn jwks_keeps_only_usable_keys() {
        let body = json!({"keys": [
            {"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256", "n": RSA_N, "e": "AQAB"},
            {"kty": "EC", "kid": "ec1", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "rs384", "alg": "RS384", "n": RSA_N, "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": EC_X, "y": EC_Y},
            {"kty": "weird", "kid": "unknown"},
            {"kid": "no-kty"},
            "not an object",
        ]});
        let jwks = Jwks::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(jwks.len(), 2);
        assert!(jwks.has_kid("rsa1"));
        assert!(jwks.has_kid("ec1"));
        for ignored in ["enc", "rs384", "hmac", "p384", "unknown", "no-kty"] {
            assert!(!jwks.has_kid(ignored), "{ignored}");
        }
        assert!(jwks.key_for(Some("rsa1"), Algorithm::RS256).is_some());
        assert!(jwks.key_for(Some("rsa1"), Algorithm::ES256).is_none());
        assert!(jwks.key_for(None, Algorithm::ES256).is_some());
        assert!(jwks.key_for(Some("missing"), Algorithm::RS256).is_none());
    }

    #[test]
    fn jwks_without_kid_needs_a_single_candidate() {
        let one = json!({"keys": [{"kty": "RSA", "n": RSA_N, "e": "AQAB"}]});
        let jwks = Jwks::parse(one.to_string().as_bytes()).unwrap();
        assert!(jwks.key_for(None, Algorithm::RS256).is_some());
        let two = json!({"keys": [
            {"kty": "RSA", "kid": "a", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "b", "n": RSA_N, "e": "AQAB"},
        ]});
        let jwks = Jwks::parse(two.to_string().as_bytes()).unwrap();
        assert!(jwks.key_for(None, Algorithm::RS256).is_none());
    }

    #[test]
    fn jwks_refuses_documents_without_keys() {
        assert!(Jwks::parse(b"{}").is_err());
        assert!(Jwks::parse(b"{\"keys\": {}}").is_err());
        assert!(Jwks::parse(b"garbage").is_err());
        let empty = Jwks::parse(b"{\"keys\": []}").unwrap();
        assert!(empty.is_empty());
        assert!(Jwks::default().is_empty());
    }
}
