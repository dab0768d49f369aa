//! id_token validation (`jwt::validate_id_token`) against a fixed provider: JWKS with one RSA
//! and one EC key, an HS256 client secret, issuer, client id, nonce and clock.
//!
//! The first input byte picks how the rest becomes a token:
//! - raw: the rest is the token. Only tokens the provider signed ([`signed_inputs`]) may pass.
//! - signed: the rest is `header JSON \0 claims JSON`, signed by the harness with the
//!   provider's HS256 secret or EC key; may pass, when the claims are right.
//! - forged: the same, signed with a key the provider does not have (another secret, the RSA
//!   modulus as HMAC secret, another EC key): must never pass.
//!
//! Whatever passes must satisfy every claim rule (`assert_claims_valid`).
#![no_main]

use authentik_core::oidc::jwt::peek_header;
use authentik_fuzz::{assert_claims_valid, keys, sign_raw, signed_inputs, validate, CLIENT_SECRET};
use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;

fn split_header(rest: &[u8], default_alg: &str) -> (Vec<u8>, Vec<u8>) {
    match rest.iter().position(|&b| b == 0) {
        Some(at) => (rest[..at].to_vec(), rest[at + 1..].to_vec()),
        None => (format!(r#"{{"alg":"{default_alg}","typ":"JWT"}}"#).into_bytes(), rest.to_vec()),
    }
}

fn check_raw(token: &str, secret: &str) {
    let Ok(claims) = validate(token, secret) else {
        return;
    };
    let (signed, _) = token.rsplit_once('.').expect("an accepted token has three parts");
    assert!(
        signed_inputs().contains(signed),
        "accepted a token the provider never signed: {token}"
    );
    if secret.is_empty() {
        let alg = peek_header(token).expect("an accepted token has a header").1;
        assert_ne!(alg, "HS256", "HS256 accepted without a client secret: {token}");
    }
    assert_claims_valid(&claims, token);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let k = keys();
    match mode % 8 {
        0 | 1 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                check_raw(token, CLIENT_SECRET);
            }
        }
        2 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                // Without a client secret no HS256 token passes (the empty key is not a key).
                check_raw(token, "");
            }
        }
        3 | 4 => {
            let (alg, key, default) = if mode % 8 == 3 {
                (Algorithm::HS256, &k.hmac, "HS256")
            } else {
                (Algorithm::ES256, &k.ec, "ES256")
            };
            let (header, payload) = split_header(rest, default);
            let token = sign_raw(&header, &payload, key, alg);
            if let Ok(claims) = validate(&token, CLIENT_SECRET) {
                assert_claims_valid(&claims, &token);
            }
        }
        forged => {
            let (alg, key, default) = match forged {
                5 => (Algorithm::HS256, &k.attacker_hmac, "HS256"),
                6 => (Algorithm::HS256, &k.confused_hmac, "HS256"),
                _ => (Algorithm::ES256, &k.attacker_ec, "ES256"),
            };
            let (header, payload) = split_header(rest, default);
            let token = sign_raw(&header, &payload, key, alg);
            let result = validate(&token, CLIENT_SECRET);
            assert!(result.is_err(), "accepted a forged token: {token}");
        }
    }
});
