//! Fixtures shared by the tests of the login flow and the metadata cache: settings for a
//! provider served by a [`TestServer`], its discovery document, a pending login, id_token
//! claims, and test providers that answer discovery, token, userinfo and JWKS requests.

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use super::client::ProviderClient;
use super::discovery::Discovery;
use super::flow::ProviderContext;
use super::jwt::tests::{jwks_json, sign, CLIENT_ID, SECRET};
use super::login::PendingLogin;
use super::metadata::MetadataCache;
use super::test_server::{Reply, Request, TestServer};
use crate::config::{parse_http_url, Mode, ProviderSettings};

/// The tests' clock.
pub(crate) const NOW: i64 = 1_700_000_000;

/// Provider `app` with issuer `<server>/o/app/` and the test client id and secret.
pub(crate) fn settings(server: &TestServer) -> ProviderSettings {
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
        meta: Default::default(),
        backchannel_host: None,
        basic_auth: None,
    }
}

/// What a worker holds for one provider, owned: settings, the client built from them, a cache.
pub(crate) struct RelyingParty {
    pub settings: ProviderSettings,
    pub client: ProviderClient,
    pub cache: MetadataCache,
}

impl RelyingParty {
    /// With an empty cache.
    pub(crate) fn new(settings: ProviderSettings) -> RelyingParty {
        let client = ProviderClient::new(&settings).unwrap();
        RelyingParty { settings, client, cache: MetadataCache::default() }
    }
    pub(crate) fn context(&self) -> ProviderContext<'_> {
        ProviderContext { settings: &self.settings, client: &self.client, cache: &self.cache }
    }
}

/// The discovery document of a provider at `base` (issuer `<base>/o/app/`), with userinfo and
/// JWKS endpoints.
pub(crate) fn discovery_json(base: &str) -> Value {
    json!({
        "issuer": format!("{base}/o/app/"),
        "authorization_endpoint": format!("{base}/authorize/"),
        "token_endpoint": format!("{base}/token/"),
        "userinfo_endpoint": format!("{base}/userinfo/"),
        "jwks_uri": format!("{base}/jwks/"),
    })
}

/// [`discovery_json`] of `server`, parsed.
pub(crate) fn parsed_discovery(server: &TestServer) -> Discovery {
    serde_json::from_value(discovery_json(&server.url(""))).unwrap()
}

/// A login started 5 seconds before [`NOW`].
pub(crate) fn login() -> PendingLogin {
    PendingLogin::new("https://app.example/".into(), "https://app.example/cb".into(), NOW - 5)
}

/// Valid id_token claims for [`login`]'s `nonce` from the provider at `base`.
pub(crate) fn id_claims(base: &str, nonce: &str) -> Value {
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
pub(crate) fn provider(
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

/// [`provider`] with HS256 id_tokens (signed with the client secret) for `nonce`.
pub(crate) fn hs256_provider(
    nonce: String,
    userinfo: Value,
    expires_in: Option<i64>,
) -> TestServer {
    provider(
        move |base| sign(&id_claims(base, &nonce), Algorithm::HS256, None),
        userinfo,
        expires_in,
    )
}

/// A provider whose JWKS is `keys` and whose id_tokens are made by `id_token(base)`; no
/// userinfo endpoint.
pub(crate) fn jwks_provider(
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

/// The paths `server` was asked for, in order.
pub(crate) fn paths(server: &TestServer) -> Vec<String> {
    server.requests().iter().map(|r| r.path().to_owned()).collect()
}

/// How many times `server` was asked for the JWKS.
pub(crate) fn jwks_fetches(server: &TestServer) -> usize {
    paths(server).iter().filter(|p| *p == "/jwks/").count()
}
