//! Writes the generated part of the seed corpora (records made by the encoders, id_tokens
//! signed by the fixed provider) into `fuzz/corpus/<target>/`. Hand-written seeds live there
//! beside them. Run by `fuzz/run.sh gen-corpus`; the output is committed.

use std::fs;
use std::path::{Path, PathBuf};

use authentik_core::identity::Identity;
use authentik_core::oidc::PendingLogin;
use authentik_core::session::{SessionId, SessionRecord};
use authentik_fuzz::{b64, good_claims, keys, sign_raw, signed_tokens, CLIENT_ID};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("corpus file");
}

/// A base64url value of 43 characters from a label (deterministic, realistic-looking).
fn token43(label: &str) -> String {
    let mut bytes = [0u8; 32];
    for (i, b) in label.bytes().cycle().take(32).enumerate() {
        bytes[i] = b.wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(17));
    }
    b64(&bytes)
}

fn records() -> Vec<(&'static str, SessionRecord)> {
    let access = sign_raw(
        br#"{"alg":"HS256","typ":"JWT"}"#,
        json!({"iss": authentik_fuzz::ISSUER, "sub": "4f6c8a2e", "aud": CLIENT_ID,
               "scope": "openid profile email ak_proxy", "exp": authentik_fuzz::NOW + 300})
        .to_string()
        .as_bytes(),
        &keys().hmac,
        Algorithm::HS256,
    );
    let claims = good_claims();
    let map = claims.as_object().expect("object").clone();
    let typical = SessionRecord {
        sub: map["sub"].as_str().unwrap_or_default().to_owned(),
        sid: map.get("sid").and_then(Value::as_str).map(str::to_owned),
        expires_at: authentik_fuzz::NOW + 300,
        identity: Identity::from_claims(&map, &access),
        id_token: signed_tokens()[2].1.clone(),
        claims_json: claims.to_string(),
    };
    let mut compacted = typical.clone();
    compacted.compact(CLIENT_ID);
    let mut no_sid = typical.clone();
    no_sid.sid = None;
    no_sid.sub = "other-sub".into();
    no_sid.identity.additional = vec![
        ("X-Team".into(), "blue".into()),
        ("X-Employee-Id".into(), "7".into()),
        ("X-Roles".into(), r#"["a","b"]"#.into()),
    ];
    vec![
        ("typical", typical),
        ("compacted", compacted),
        ("no_sid_three_headers", no_sid),
        ("empty", SessionRecord::default()),
    ]
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));

    for (name, record) in records() {
        let bytes = record.encode();
        write(&dir, "session_record", &format!("gen_{name}"), &bytes);
    }

    let login = PendingLogin {
        state: token43("state"),
        binding: token43("binding"),
        verifier: token43("verifier"),
        nonce: token43("nonce"),
        return_to: "https://app.example.com/d/abc?orgId=1".into(),
        redirect_uri:
            "https://app.example.com/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
                .into(),
        created_at: authentik_fuzz::NOW,
    };
    write(&dir, "pending_login", "gen_login", &login.encode());
    let empty = PendingLogin { return_to: String::new(), redirect_uri: String::new(), ..login };
    write(&dir, "pending_login", "gen_empty_urls", &empty.encode());

    let id = SessionId([0x5a; 32]).to_cookie_value();
    let cookie =
        format!("authentik_proxy_1a2b3c4d={id}; _ga=GA1.2.1234567890.1700000000; csrftoken=x1Y2z3");
    write(&dir, "cookie", "gen_session", cookie.as_bytes());
    let login_cookie = format!(
        "grafana_session=0123abcd; authentik_proxy_1a2b3c4d_login_{}={}; authentik_proxy_1a2b3c4d={id}",
        &token43("state")[..12],
        token43("binding")
    );
    write(&dir, "cookie", "gen_login_cookie", login_cookie.as_bytes());

    for (name, token) in signed_tokens() {
        let mut raw = vec![0u8];
        raw.extend_from_slice(token.as_bytes());
        write(&dir, "id_token", &format!("gen_raw_{name}"), &raw);
        if name.ends_with("valid") || name.ends_with("no_kid") {
            write(&dir, "jwt_header", &format!("gen_{name}"), token.as_bytes());
        }
    }
    let claims = good_claims().to_string();
    for (mode, name, header) in [
        (3u8, "hs256", r#"{"alg":"HS256","typ":"JWT"}"#),
        (4, "es256", r#"{"alg":"ES256","typ":"JWT","kid":"ec-kid"}"#),
        (5, "forged_hs256", r#"{"alg":"HS256","typ":"JWT"}"#),
        (6, "confused_hs256", r#"{"alg":"HS256","typ":"JWT","kid":"rsa-kid"}"#),
        (7, "forged_es256", r#"{"alg":"ES256","typ":"JWT","kid":"ec-kid"}"#),
    ] {
        let mut input = vec![mode];
        input.extend_from_slice(header.as_bytes());
        input.push(0);
        input.extend_from_slice(claims.as_bytes());
        write(&dir, "id_token", &format!("gen_sign_{name}"), &input);
    }

    write(&dir, "jwks", "gen_provider_jwks.json", keys().jwks_json.as_bytes());
    let token = &signed_tokens()[0].1;
    let response = json!({
        "access_token": signed_tokens()[2].1,
        "token_type": "Bearer",
        "scope": "openid profile email entitlements ak_proxy",
        "expires_in": 300,
        "id_token": token,
        "refresh_token": token43("refresh"),
    });
    write(&dir, "token_response", "gen_authentik.json", response.to_string().as_bytes());
    write(&dir, "identity", "gen_id_token_claims.json", claims.as_bytes());
}
