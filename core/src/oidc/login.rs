//! Starting a login: PKCE, state, nonce, the authorize URL, and the pending-login record kept
//! in shared memory until the callback (so the verifier and nonce never appear in a URL).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use url::Url;

use crate::request::encode_query_value;
use crate::wire::{self, Reader, WireError};
use crate::UnixTime;

/// How long a started login may take before its callback is refused.
pub const LOGIN_TTL: i64 = 600;

/// Version byte of the current [`PendingLogin`] encoding.
const LOGIN_VERSION: u8 = 1;

/// One started login. Stored in shared memory under `state`; removed at its callback (one use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLogin {
    /// 256-bit random, base64url (43 chars): the `state` parameter and the lookup key.
    pub state: String,
    /// 256-bit random, base64url: value of the login cookie that binds this login to the browser.
    pub binding: String,
    /// PKCE code_verifier (43 chars base64url of 32 random bytes).
    pub verifier: String,
    /// 256-bit random, base64url.
    pub nonce: String,
    /// Absolute URL to land on after login (already validated).
    pub return_to: String,
    /// The redirect_uri sent in the authorize request (sent again at the token endpoint).
    pub redirect_uri: String,
    pub created_at: UnixTime,
}

/// 32 bytes from the OS CSPRNG, base64url without padding (43 characters).
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random number generator works");
    URL_SAFE_NO_PAD.encode(bytes)
}

impl PendingLogin {
    /// Fresh random state, binding, verifier and nonce from the OS CSPRNG.
    pub fn new(return_to: String, redirect_uri: String, now: UnixTime) -> PendingLogin {
        PendingLogin {
            state: random_token(),
            binding: random_token(),
            verifier: random_token(),
            nonce: random_token(),
            return_to,
            redirect_uri,
            created_at: now,
        }
    }
    /// S256 code_challenge of the verifier.
    pub fn code_challenge(&self) -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(self.verifier.as_bytes()))
    }
    /// Constant-time comparison of the login cookie value with `binding`.
    pub fn binding_matches(&self, cookie_value: &[u8]) -> bool {
        !self.binding.is_empty() && bool::from(self.binding.as_bytes().ct_eq(cookie_value))
    }
    /// First 8 bytes of the decoded state as a little-endian u64 (rbtree key); `None` when
    /// `state` is not 43 chars of base64url.
    pub fn key_of(state: &str) -> Option<u64> {
        if state.len() != 43 {
            return None;
        }
        let mut decoded = [0u8; 32];
        let written = URL_SAFE_NO_PAD.decode_slice(state, &mut decoded).ok()?;
        if written != decoded.len() {
            return None;
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&decoded[..8]);
        Some(u64::from_le_bytes(first))
    }
    /// Version byte, the six strings (u32 LE length + UTF-8), then `created_at` (i64 LE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        wire::put_u8(&mut out, LOGIN_VERSION);
        for field in self.text_fields() {
            wire::put_str(&mut out, field);
        }
        wire::put_i64(&mut out, self.created_at);
        out
    }
    fn text_fields(&self) -> [&str; 6] {
        [
            &self.state,
            &self.binding,
            &self.verifier,
            &self.nonce,
            &self.return_to,
            &self.redirect_uri,
        ]
    }
    /// Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Option<PendingLogin> {
        Self::read(&mut Reader::new(bytes)).ok()
    }
    fn read(reader: &mut Reader<'_>) -> Result<PendingLogin, WireError> {
        if reader.u8()? != LOGIN_VERSION {
            return Err(WireError::Truncated);
        }
        let mut text = || reader.str().map(str::to_owned);
        let (state, binding, verifier, nonce) = (text()?, text()?, text()?, text()?);
        let (return_to, redirect_uri) = (text()?, text()?);
        let created_at = reader.i64()?;
        if !reader.is_empty() {
            return Err(WireError::Truncated);
        }
        Ok(PendingLogin { state, binding, verifier, nonce, return_to, redirect_uri, created_at })
    }
}

/// `<authorization_endpoint>?response_type=code&client_id=..&redirect_uri=..&scope=..&state=..
/// &nonce=..&code_challenge=..&code_challenge_method=S256`, keeping any query the endpoint
/// already has.
pub fn authorize_url(
    authorization_endpoint: &str,
    client_id: &str,
    scopes: &[String],
    login: &PendingLogin,
) -> String {
    let scope = scopes.join(" ");
    let challenge = login.code_challenge();
    let params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", login.redirect_uri.as_str()),
        ("scope", scope.as_str()),
        ("state", login.state.as_str()),
        ("nonce", login.nonce.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let Ok(mut url) = Url::parse(authorization_endpoint) else {
        // Discovery only accepts absolute URLs; this keeps a bad endpoint from panicking anyway.
        return append_query(authorization_endpoint, &params);
    };
    url.query_pairs_mut().extend_pairs(params);
    url.to_string()
}

/// `<end_session_endpoint>?[id_token_hint=..&]client_id=..&post_logout_redirect_uri=..`
/// (RP-initiated logout), keeping any query the endpoint already has; an empty hint is left out.
pub fn end_session_url(
    end_session_endpoint: &str,
    id_token_hint: Option<&str>,
    client_id: &str,
    post_logout_redirect: &str,
) -> String {
    let hint = id_token_hint.filter(|hint| !hint.is_empty()).map(|hint| ("id_token_hint", hint));
    let params: Vec<(&str, &str)> = hint
        .into_iter()
        .chain([("client_id", client_id), ("post_logout_redirect_uri", post_logout_redirect)])
        .collect();
    append_query(end_session_endpoint, &params)
}

fn append_query(base: &str, params: &[(&str, &str)]) -> String {
    let mut out = base.to_owned();
    for (i, (name, value)) in params.iter().enumerate() {
        let separator = if i == 0 && !base.contains('?') { '?' } else { '&' };
        out.push(separator);
        out.push_str(name);
        out.push('=');
        out.push_str(&encode_query_value(value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_session_url_carries_hint_client_and_return() {
        let url = end_session_url("https://idp/end", Some("tok.en"), "c id", "https://app/");
        assert_eq!(
            url,
            "https://idp/end?id_token_hint=tok.en&client_id=c%20id&post_logout_redirect_uri=https%3A%2F%2Fapp%2F"
        );
        let url = end_session_url("https://idp/end?x=1", Some(""), "c", "https://app/");
        assert_eq!(
            url,
            "https://idp/end?x=1&client_id=c&post_logout_redirect_uri=https%3A%2F%2Fapp%2F"
        );
    }

    fn login() -> PendingLogin {
        PendingLogin::new(
            "https://app.example.com/x?y=1".into(),
            "https://app.example.com/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
                .into(),
            1_000,
        )
    }

    fn is_base64url_43(s: &str) -> bool {
        s.len() == 43 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    #[test]
    fn new_logins_are_random_and_well_formed() {
        let (a, b) = (login(), login());
        for value in [&a.state, &a.binding, &a.verifier, &a.nonce] {
            assert!(is_base64url_43(value), "{value}");
        }
        assert_ne!(a.state, b.state);
        assert_ne!(a.state, a.binding);
        assert_ne!(a.verifier, a.nonce);
        assert_eq!(a.created_at, 1_000);
    }

    #[test]
    fn code_challenge_is_rfc7636_s256() {
        // RFC 7636 appendix B.
        let mut l = login();
        l.verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into();
        assert_eq!(l.code_challenge(), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn binding_comparison() {
        let l = login();
        assert!(l.binding_matches(l.binding.as_bytes()));
        assert!(!l.binding_matches(l.state.as_bytes()));
        assert!(!l.binding_matches(&l.binding.as_bytes()[..42]));
        assert!(!l.binding_matches(b""));
        let empty = PendingLogin { binding: String::new(), ..login() };
        assert!(!empty.binding_matches(b""));
    }

    #[test]
    fn key_of_decodes_the_state() {
        let state = URL_SAFE_NO_PAD.encode([
            1u8, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0,
        ]);
        assert_eq!(PendingLogin::key_of(&state), Some(0x0807_0605_0403_0201));
        assert!(PendingLogin::key_of(&login().state).is_some());
        assert_eq!(PendingLogin::key_of(&state[..42]), None);
        assert_eq!(PendingLogin::key_of(&format!("{state}=")), None);
        assert_eq!(PendingLogin::key_of(&format!("+{}", &state[1..])), None);
        assert_eq!(PendingLogin::key_of(""), None);
        assert_eq!(PendingLogin::key_of("ééééééééééééééééééééé_"), None);
    }

    #[test]
    fn record_round_trips() {
        let l = login();
        assert_eq!(PendingLogin::decode(&l.encode()), Some(l));
    }

    #[test]
    fn decode_refuses_damaged_records() {
        let bytes = login().encode();
        for len in 0..bytes.len() {
            assert_eq!(PendingLogin::decode(&bytes[..len]), None, "prefix of {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(PendingLogin::decode(&longer), None);
        let mut version = bytes.clone();
        version[0] = 2;
        assert_eq!(PendingLogin::decode(&version), None);
        let mut state: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut corrupt = bytes.clone();
            let at = (state as usize) % corrupt.len();
            corrupt[at] = (state >> 32) as u8;
            let _ = PendingLogin::decode(&corrupt);
        }
    }

    #[test]
    fn authorize_url_encodes_every_parameter() {
        let l = login();
        let url = authorize_url(
            "https://auth.example.com/application/o/authorize/",
            "client id&x",
            &["openid".to_string(), "profile".to_string()],
            &l,
        );
        let parsed = Url::parse(&url).unwrap();
        assert_eq!(parsed.path(), "/application/o/authorize/");
        let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        let expected = [
            ("response_type", "code"),
            ("client_id", "client id&x"),
            ("redirect_uri", l.redirect_uri.as_str()),
            ("scope", "openid profile"),
            ("state", l.state.as_str()),
            ("nonce", l.nonce.as_str()),
            ("code_challenge", l.code_challenge().as_str()),
            ("code_challenge_method", "S256"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(pairs, expected);
        assert!(url.contains("client_id=client+id%26x"));
        assert!(url.contains(
            "redirect_uri=https%3A%2F%2Fapp.example.com%2Foutpost.goauthentik.io%2Fcallback%3FX-authentik-auth-callback%3Dtrue"
        ));
    }

    #[test]
    fn authorize_url_keeps_an_existing_query() {
        let l = login();
        let url = authorize_url("https://auth.example.com/authorize?tenant=a%20b", "id", &[], &l);
        assert!(
            url.starts_with("https://auth.example.com/authorize?tenant=a%20b&response_type=code&")
        );
        let fallback = authorize_url("not a url?x=1", "id", &[], &l);
        assert!(fallback.starts_with("not a url?x=1&response_type=code&client_id=id&"));
    }
}
