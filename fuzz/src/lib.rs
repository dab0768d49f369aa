//! Helpers shared by the fuzz targets and by `gen_corpus`: the fixed provider the id_token
//! target validates against (test keys, JWKS, secret, issuer, client, nonce, clock), the
//! id_tokens that key legitimately signed, and the fixed sites of the redirect target.

use std::collections::HashSet;
use std::sync::OnceLock;

use authentik_core::config::Mode;
use authentik_core::oidc::Jwks;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Map, Value};

/// The provider's keys: core's test keys (never used outside tests).
pub const RSA_PEM: &[u8] = include_bytes!("../../core/tests/data/rsa_private.pem");
pub const EC_PEM: &[u8] = include_bytes!("../../core/tests/data/ec_private.pem");
/// A P-256 key the provider does not have: what an attacker can sign with.
pub const ATTACKER_EC_PEM: &[u8] = include_bytes!("../data/attacker_ec_private.pem");

pub const ISSUER: &str = "https://auth.example.com/application/o/grafana/";
pub const CLIENT_ID: &str = "grafana-client-id";
pub const CLIENT_SECRET: &str = "grafana-client-secret-0123456789abcdef";
pub const ATTACKER_SECRET: &str = "not-the-client-secret";
pub const NONCE: &str = "Zk9nQ2V4aGJ4b3Fwb1lYS1dGN0hMa3JqZ0RqQkFnbW8";
pub const NOW: i64 = 1_767_139_200;
pub const RSA_KID: &str = "rsa-kid";
pub const EC_KID: &str = "ec-kid";

/// The signing keys of the fixed provider, plus the attacker's.
pub struct Keys {
    pub rsa: EncodingKey,
    pub ec: EncodingKey,
    pub hmac: EncodingKey,
    pub attacker_ec: EncodingKey,
    pub attacker_hmac: EncodingKey,
    /// HS256 keyed with the RSA public key's modulus: the classic algorithm-confusion forgery.
    pub confused_hmac: EncodingKey,
    pub jwks_json: String,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let rsa = EncodingKey::from_rsa_pem(RSA_PEM).expect("test RSA key");
        let ec = EncodingKey::from_ec_pem(EC_PEM).expect("test EC key");
        let public = |key: &EncodingKey, alg: Algorithm, kid: &str| {
            let mut jwk = serde_json::to_value(Jwk::from_encoding_key(key, alg).expect("jwk"))
                .expect("jwk json");
            jwk["kid"] = json!(kid);
            jwk["use"] = json!("sig");
            jwk
        };
        let rsa_jwk = public(&rsa, Algorithm::RS256, RSA_KID);
        let modulus = rsa_jwk["n"].as_str().expect("n").to_owned();
        let jwks_json =
            json!({"keys": [rsa_jwk, public(&ec, Algorithm::ES256, EC_KID)]}).to_string();
        Keys {
            rsa,
            ec,
            hmac: EncodingKey::from_secret(CLIENT_SECRET.as_bytes()),
            attacker_ec: EncodingKey::from_ec_pem(ATTACKER_EC_PEM).expect("attacker EC key"),
            attacker_hmac: EncodingKey::from_secret(ATTACKER_SECRET.as_bytes()),
            confused_hmac: EncodingKey::from_secret(modulus.as_bytes()),
            jwks_json,
        }
    })
}

/// The provider's JWKS (RSA `rsa-kid`, EC `ec-kid`).
pub fn jwks() -> &'static Jwks {
    static JWKS: OnceLock<Jwks> = OnceLock::new();
    JWKS.get_or_init(|| Jwks::parse(keys().jwks_json.as_bytes()).expect("fixed JWKS parses"))
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `b64(header).b64(payload).signature` with the raw header and payload bytes as given.
pub fn sign_raw(header: &[u8], payload: &[u8], key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign");
    format!("{message}.{signature}")
}

/// Claims of a valid login at [`NOW`] for [`CLIENT_ID`] with [`NONCE`].
pub fn good_claims() -> Value {
    json!({
        "iss": ISSUER,
        "sub": "4f6c8a2e9d1b3c5a7e9f0b2d4c6e8a1f3b5d7e9c0a2b4d6f8e1c3a5b7d9f0e2a",
        "aud": CLIENT_ID,
        "exp": NOW + 300,
        "iat": NOW,
        "auth_time": NOW - 10,
        "acr": "goauthentik.io/providers/oauth2/default",
        "amr": ["pwd"],
        "nonce": NONCE,
        "sid": "9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d",
        "email": "alice@example.com",
        "email_verified": true,
        "name": "Alice Anderson",
        "preferred_username": "alice",
        "groups": ["authentik Admins", "grafana-editors"],
        "ak_proxy": {"user_attributes": {"additionalHeaders": {"X-Team": "blue"}}},
    })
}

fn with(changes: Value) -> Value {
    let mut claims = good_claims();
    for (k, v) in changes.as_object().expect("object") {
        if v.is_null() {
            claims.as_object_mut().expect("object").remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

/// Every id_token the fixed provider ever signed: (name, token). The seeds of the id_token
/// target, and the only signing inputs it may accept from raw fuzzer input.
pub fn signed_tokens() -> &'static [(String, String)] {
    static TOKENS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let k = keys();
        let header = |alg: &str, kid: Option<&str>| match kid {
            Some(kid) => json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string(),
            None => json!({"alg": alg, "typ": "JWT"}).to_string(),
        };
        let claim_sets = [
            ("valid", good_claims()),
            ("aud_list", with(json!({"aud": ["grafana-api", CLIENT_ID], "azp": CLIENT_ID}))),
            ("untrusted_aud", with(json!({"aud": ["other", CLIENT_ID], "azp": CLIENT_ID}))),
            ("expired", with(json!({"exp": NOW - 3600}))),
            ("wrong_nonce", with(json!({"nonce": "other"}))),
            ("wrong_iss", with(json!({"iss": "https://evil.example.com/"}))),
            ("no_sub", with(json!({"sub": null}))),
            ("float_exp", with(json!({"exp": (NOW + 100) as f64 + 0.5}))),
        ];
        let mut tokens = Vec::new();
        for (name, claims) in &claim_sets {
            let payload = claims.to_string();
            let signers: [(&str, &EncodingKey, Algorithm, Option<&str>); 3] = [
                ("rs256", &k.rsa, Algorithm::RS256, Some(RSA_KID)),
                ("es256", &k.ec, Algorithm::ES256, Some(EC_KID)),
                ("hs256", &k.hmac, Algorithm::HS256, None),
            ];
            for (alg_name, key, alg, kid) in signers {
                let alg_text = format!("{alg:?}");
                let token =
                    sign_raw(header(&alg_text, kid).as_bytes(), payload.as_bytes(), key, alg);
                tokens.push((format!("{alg_name}_{name}"), token));
            }
        }
        // RS256 without a kid: the only RSA key of the set.
        let token = sign_raw(
            header("RS256", None).as_bytes(),
            good_claims().to_string().as_bytes(),
            &k.rsa,
            Algorithm::RS256,
        );
        tokens.push(("rs256_no_kid".into(), token));
        tokens
    })
}

/// `header.payload` of every token in [`signed_tokens`].
pub fn signed_inputs() -> &'static HashSet<String> {
    static INPUTS: OnceLock<HashSet<String>> = OnceLock::new();
    INPUTS.get_or_init(|| {
        signed_tokens()
            .iter()
            .map(|(_, token)| token.rsplit_once('.').expect("three parts").0.to_owned())
            .collect()
    })
}

/// The claim rules `validate_id_token` promises, checked again on what it accepted.
pub fn assert_claims_valid(claims: &Map<String, Value>, token: &str) {
    let same_issuer = |a: &str| a.strip_suffix('/').unwrap_or(a) == ISSUER.trim_end_matches('/');
    match claims.get("iss") {
        Some(Value::String(iss)) if same_issuer(iss) => {}
        other => panic!("accepted iss {other:?}: {token}"),
    }
    // `aud`: the client, plus only trusted audiences; several need `azp`, which is the client.
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud],
        Some(Value::Array(auds)) => auds
            .iter()
            .map(|a| a.as_str().unwrap_or_else(|| panic!("accepted aud item {a}: {token}")))
            .collect(),
        other => panic!("accepted aud {other:?}: {token}"),
    };
    assert!(audiences.contains(&CLIENT_ID), "accepted aud without the client: {token}");
    for aud in &audiences {
        assert!(
            *aud == CLIENT_ID || TRUSTED_AUDIENCES.contains(aud),
            "untrusted aud {aud}: {token}"
        );
    }
    let distinct: HashSet<&str> = audiences.iter().copied().collect();
    match claims.get("azp") {
        None => assert!(distinct.len() == 1, "several audiences without azp: {token}"),
        Some(Value::String(azp)) if azp == CLIENT_ID => {}
        other => panic!("accepted azp {other:?}: {token}"),
    }
    let numeric = |v: &Value| v.as_number().is_some();
    assert!(
        claims.get("iat").is_some_and(numeric),
        "accepted iat {:?}: {token}",
        claims.get("iat")
    );
    let exp = claims
        .get("exp")
        .and_then(Value::as_number)
        .and_then(|n| n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)));
    match exp {
        Some(exp) => assert!(NOW < exp.saturating_add(60), "accepted exp {exp}: {token}"),
        None => panic!("accepted exp {:?}: {token}", claims.get("exp")),
    }
    assert_eq!(claims.get("nonce").and_then(Value::as_str), Some(NONCE), "nonce: {token}");
    match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => {}
        other => panic!("accepted sub {other:?}: {token}"),
    }
}

/// One site the redirect target validates return URLs for.
pub struct Site {
    pub mode: Mode,
    pub origin: &'static str,
    pub cookie_domain: Option<&'static str>,
}

pub const SITES: &[Site] = &[
    Site { mode: Mode::Proxy, origin: "https://app.example.com", cookie_domain: None },
    Site { mode: Mode::ForwardSingle, origin: "http://app.example.com:8080", cookie_domain: None },
    Site { mode: Mode::Proxy, origin: "https://[2001:db8::1]:8443", cookie_domain: None },
    Site {
        mode: Mode::ForwardDomain,
        origin: "https://auth.example.com",
        cookie_domain: Some("example.com"),
    },
    Site {
        mode: Mode::ForwardDomain,
        origin: "https://auth.corp.example.org",
        cookie_domain: Some(".Corp.Example.org"),
    },
];

/// authentik's session cookie name for [`CLIENT_ID`]'s sibling used in the corpora.
pub const SESSION_COOKIE: &str = "authentik_proxy_1a2b3c4d";

/// Audiences an id_token may name besides [`CLIENT_ID`].
pub const TRUSTED_AUDIENCES: &[&str] = &["grafana-api"];

/// `validate_id_token` against the fixed provider, with `client_secret` (the HS256 key).
pub fn validate(
    token: &str,
    client_secret: &str,
) -> Result<Map<String, Value>, authentik_core::oidc::jwt::TokenError> {
    static TRUSTED: OnceLock<Vec<String>> = OnceLock::new();
    let trusted = TRUSTED.get_or_init(|| TRUSTED_AUDIENCES.iter().map(|a| a.to_string()).collect());
    let expected = authentik_core::oidc::jwt::ExpectedClaims {
        issuer: ISSUER,
        client_id: CLIENT_ID,
        trusted_audiences: trusted,
        nonce: NONCE,
        now: NOW,
    };
    authentik_core::oidc::jwt::validate_id_token(token, jwks(), client_secret, &expected)
}
