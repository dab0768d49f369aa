//! Blocking HTTP client for the provider (discovery, JWKS, token, userinfo).
//!
//! Blocking is deliberate: the nginx glue runs these calls on nginx's thread pool, so the
//! worker's event loop never waits on the network. TLS verification is always on (system trust
//! store, or `ca_file` when configured).
//!
//! Every call has one total deadline, from the DNS lookup to the last byte of the body
//! (`settings.timeout_ms`, or less when the client has a login deadline, see
//! [`ProviderClient::with_deadline`]). ureq 3.2's `timeout_global` alone is not one: it bounds
//! each socket read by the time left when the read starts (a read starting after the deadline
//! gets a whole second), and under TLS every socket read of one record gets the time left when
//! the record was first asked for, so a provider that trickles bytes is never cut off.
//! [`DeadlineConnector`] sits between ureq's TCP and TLS layers and bounds every socket read and
//! write by the time left until the call's deadline, failing once it has passed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{Map, Value};
use ureq::http::Response;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::time as ureq_time;
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, NativeTlsConnector, NextTimeout,
    TcpConnector, Transport,
};
use ureq::{Agent, Body, Timeout};
use url::form_urlencoded;

use super::discovery::{Discovery, Jwks};
use crate::config::ProviderSettings;

/// Largest response body accepted from the provider.
pub const MAX_BODY: u64 = 1 << 20;

/// Longest OAuth error text copied from a provider's error body into a log message.
const MAX_DETAIL: usize = 200;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Connection refused, DNS, TLS, timeout: the provider could not be reached.
    #[error("{url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// A non-2xx answer (the body's OAuth `error` and `error_description`, if any, in `detail`).
    #[error("{url} answered {status}{detail}")]
    Status { url: String, status: u16, detail: String },
    /// A 2xx answer that is not what the protocol requires.
    #[error("{url} sent an invalid response: {reason}")]
    Invalid { url: String, reason: String },
    #[error("cannot read \"ca_file\": {0}")]
    CaFile(String),
}

/// A provider endpoint, as the call-latency histogram names it (see [`crate::metrics::ENDPOINTS`],
/// same order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Discovery,
    Jwks,
    Token,
    Userinfo,
    /// Header authentication's Bearer check.
    Introspection,
}

/// Told how long each call to the provider took, whatever its outcome (the glue's latency
/// histogram). Called on the thread that made the call.
pub trait CallTimer: Send + Sync + std::fmt::Debug {
    fn record(&self, endpoint: Endpoint, elapsed: Duration);
}

/// The fields of a token endpoint response the module uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenResponse {
    pub access_token: String,
    pub id_token: String,
    /// Seconds, when the provider says.
    pub expires_in: Option<i64>,
}

/// One per provider per worker; cheap to clone and share between threads.
#[derive(Debug, Clone)]
pub struct ProviderClient {
    agent: Agent,
    /// Total time one call may take (`settings.timeout_ms`).
    timeout: Duration,
    /// When set, no call runs past it (the deadline of a whole login).
    deadline: Option<Instant>,
    /// `Host` and `X-Forwarded-Proto` sent on every call (see `ProviderSettings`).
    backchannel_host: Option<(String, String)>,
    /// Told the duration of every call.
    timer: Option<Arc<dyn CallTimer>>,
}

/// How a form POST authenticates the client.
enum ClientAuth<'a> {
    Basic(&'a str, &'a str),
    Post(&'a str, &'a str),
    None,
}

impl<'a> ClientAuth<'a> {
    /// `client_secret_basic` unless the provider lists only `client_secret_post`.
    fn of(settings: &'a ProviderSettings, discovery: &Discovery) -> ClientAuth<'a> {
        let (id, secret) = (settings.client_id.as_str(), settings.client_secret.as_str());
        if discovery.use_basic_auth() {
            ClientAuth::Basic(id, secret)
        } else {
            ClientAuth::Post(id, secret)
        }
    }
}

/// What every call to a provider or to authentik's API says it is.
pub const USER_AGENT: &str = concat!("nginx-authentik/", env!("CARGO_PKG_VERSION"));

/// An agent for calls to a provider or to authentik's API: per-call total deadline `timeout`,
/// TLS via OpenSSL (native-tls) with the system roots or `ca_file`, no redirects followed, no
/// connection reuse (a pooled connection would keep the deadline of the call that opened it).
pub(crate) fn http_agent(
    timeout: Duration,
    ca_file: Option<&Path>,
    user_agent: &str,
) -> Result<Agent, ProviderError> {
    let root_certs = match ca_file {
        Some(path) => RootCerts::new_with_certs(&read_ca_file(path)?),
        None => RootCerts::PlatformVerifier,
    };
    let tls = TlsConfig::builder().provider(TlsProvider::NativeTls).root_certs(root_certs).build();
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .timeout_global(Some(timeout))
        .tls_config(tls)
        .user_agent(user_agent)
        .build();
    Ok(Agent::with_parts(config, connector(), DefaultResolver::default()))
}

/// A provider answer read to the end.
struct Reply {
    url: String,
    status: u16,
    /// Lowercased media type without parameters.
    mime: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn invalid(&self, reason: impl Into<String>) -> ProviderError {
        ProviderError::Invalid { url: self.url.clone(), reason: reason.into() }
    }

    /// The body as a JSON object.
    fn json_object(&self) -> Result<Map<String, Value>, ProviderError> {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(object)) => Ok(object),
            Ok(_) => Err(self.invalid("not a JSON object")),
            Err(e) => Err(self.invalid(format!("invalid JSON: {e}"))),
        }
    }
}

impl ProviderClient {
    /// Builds the agent: per-call total deadline `settings.timeout_ms`, TLS via OpenSSL
    /// (native-tls) with the system roots or `settings.ca_file`, no redirects followed, bodies
    /// capped at `MAX_BODY`, no connection reuse (a pooled connection would keep the deadline of
    /// the call that opened it; a login makes at most four calls).
    pub fn new(settings: &ProviderSettings) -> Result<ProviderClient, ProviderError> {
        let timeout = Duration::from_millis(settings.timeout_ms.max(1));
        let user_agent = match &settings.meta.user_agent_suffix {
            Some(suffix) => format!("{USER_AGENT} {suffix}"),
            None => USER_AGENT.to_owned(),
        };
        let agent = http_agent(timeout, settings.ca_file.as_deref(), &user_agent)?;
        let backchannel_host = settings.backchannel_host.clone();
        Ok(ProviderClient { agent, timeout, deadline: None, backchannel_host, timer: None })
    }

    /// This client, with no call running past `deadline` (nor past its own timeout); an earlier
    /// deadline already set is kept.
    pub fn with_deadline(&self, deadline: Instant) -> ProviderClient {
        let deadline = self.deadline.map_or(deadline, |earlier| earlier.min(deadline));
        ProviderClient { deadline: Some(deadline), ..self.clone() }
    }

    /// Every call from now on reports its duration to `timer`.
    pub fn set_timer(&mut self, timer: Arc<dyn CallTimer>) {
        self.timer = Some(timer);
    }

    /// Runs one call and reports its duration.
    fn timed<T>(&self, endpoint: Endpoint, call: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = call();
        if let Some(timer) = &self.timer {
            timer.record(endpoint, started.elapsed());
        }
        result
    }

    /// The total time one call may take (`settings.timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Time the next call to `url` may take: the timeout, cut to the deadline.
    fn time_left(&self, url: &str) -> Result<Duration, ProviderError> {
        let now = Instant::now();
        let left = match self.deadline {
            Some(deadline) => self.timeout.min(deadline.saturating_duration_since(now)),
            None => self.timeout,
        };
        if left.is_zero() {
            let reason = "timeout: login deadline reached".to_owned();
            return Err(ProviderError::Unreachable { url: url.to_owned(), reason });
        }
        Ok(left)
    }

    /// GET `<issuer>/.well-known/openid-configuration` (joined without a double slash).
    pub fn fetch_discovery(&self, settings: &ProviderSettings) -> Result<Discovery, ProviderError> {
        let url = discovery_url(settings.issuer.as_str());
        let reply = self.get(Endpoint::Discovery, &url, None)?;
        Discovery::parse(&reply.body, settings.issuer.as_str())
            .map_err(|e| reply.invalid(e.to_string()))
    }

    pub fn fetch_jwks(&self, jwks_uri: &str) -> Result<Jwks, ProviderError> {
        let reply = self.get(Endpoint::Jwks, jwks_uri, None)?;
        Jwks::parse(&reply.body).map_err(|e| reply.invalid(e.to_string()))
    }

    /// POST the authorization_code grant with the PKCE verifier; client authentication by
    /// `client_secret_basic` or `client_secret_post` per [`Discovery::use_basic_auth`].
    /// Requires `access_token` and `id_token` in the answer.
    pub fn exchange_code(
        &self,
        settings: &ProviderSettings,
        discovery: &Discovery,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
    ) -> Result<TokenResponse, ProviderError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("code_verifier", verifier);
        let auth = ClientAuth::of(settings, discovery);
        let reply = self.post_form(Endpoint::Token, &discovery.token_endpoint, form, auth)?;
        parse_token_response(&reply)
    }

    /// RFC 7662 introspection of `token` (client authentication as for the token endpoint);
    /// the answer's JSON object, whatever `active` says.
    pub fn introspect(
        &self,
        settings: &ProviderSettings,
        discovery: &Discovery,
        endpoint: &str,
        token: &str,
    ) -> Result<Map<String, Value>, ProviderError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("token", token);
        let auth = ClientAuth::of(settings, discovery);
        let reply = self.post_form(Endpoint::Introspection, endpoint, form, auth)?;
        reply.json_object()
    }

    /// authentik's app-password login: the `client_credentials` grant with `username`,
    /// `password` and the provider's scopes, and `client_id` but no secret (authentik checks
    /// the user's app password, not the client). Requires an id_token in the answer.
    pub fn client_credentials(
        &self,
        settings: &ProviderSettings,
        discovery: &Discovery,
        username: &str,
        password: &str,
    ) -> Result<TokenResponse, ProviderError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &settings.client_id)
            .append_pair("username", username)
            .append_pair("password", password)
            .append_pair("scope", &settings.scopes.join(" "));
        let reply =
            self.post_form(Endpoint::Token, &discovery.token_endpoint, form, ClientAuth::None)?;
        parse_token_response(&reply)
    }

    fn post_form(
        &self,
        endpoint: Endpoint,
        url: &str,
        mut form: form_urlencoded::Serializer<'_, String>,
        auth: ClientAuth<'_>,
    ) -> Result<Reply, ProviderError> {
        let left = self.time_left(url)?;
        let mut request = self
            .agent
            .post(url)
            .config()
            .timeout_global(Some(left))
            .build()
            .header("Accept", "application/json")
            .header("Content-Type", "application/x-www-form-urlencoded");
        if let Some((host, proto)) = &self.backchannel_host {
            request = request.header("Host", host).header("X-Forwarded-Proto", proto);
        }
        match auth {
            ClientAuth::Basic(id, secret) => {
                request = request.header("Authorization", basic_auth(id, secret));
            }
            ClientAuth::Post(id, secret) => {
                form.append_pair("client_id", id).append_pair("client_secret", secret);
            }
            ClientAuth::None => {}
        }
        let body = form.finish();
        self.timed(endpoint, || read_reply(url, request.send(body.as_bytes())))
    }

    /// GET userinfo with the access token as Bearer; accepts only `application/json` objects.
    pub fn userinfo(
        &self,
        endpoint: &str,
        access_token: &str,
    ) -> Result<Map<String, Value>, ProviderError> {
        let reply = self.get(Endpoint::Userinfo, endpoint, Some(access_token))?;
        if reply.mime.as_deref() != Some("application/json") {
            let found = reply.mime.as_deref().unwrap_or("no content type");
            return Err(reply.invalid(format!("expected application/json, got {found}")));
        }
        reply.json_object()
    }

    fn get(
        &self,
        endpoint: Endpoint,
        url: &str,
        bearer: Option<&str>,
    ) -> Result<Reply, ProviderError> {
        let left = self.time_left(url)?;
        let mut request = self
            .agent
            .get(url)
            .config()
            .timeout_global(Some(left))
            .build()
            .header("Accept", "application/json");
        if let Some(token) = bearer {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some((host, proto)) = &self.backchannel_host {
            request = request.header("Host", host).header("X-Forwarded-Proto", proto);
        }
        self.timed(endpoint, || read_reply(url, request.call()))
    }
}

/// ureq's default connector chain for this build (CONNECT proxy from the environment, TCP,
/// native-tls), with [`DeadlineConnector`] between TCP and TLS so that it also bounds the TLS
/// handshake and the socket reads of every TLS record.
///
/// `ureq::unversioned` is outside ureq's semver promise; ureq is held at 3.2 by nginx-src (see
/// core/Cargo.toml and Cargo.lock), and an API change there fails the build, not the deadline.
fn connector() -> impl Connector {
    ().chain(ConnectProxyConnector::default())
        .chain(TcpConnector::default())
        .chain(DeadlineConnector)
        .chain(NativeTlsConnector::default())
}

/// Wraps each new connection in a [`DeadlineTransport`] that ends at the deadline of the call
/// that opens it: the start of the connection attempt plus the time ureq leaves for it, which is
/// what remains of the call's `timeout_global` (no other ureq timeout is configured).
#[derive(Debug)]
struct DeadlineConnector;

impl<In: Transport> Connector<In> for DeadlineConnector {
    type Out = DeadlineTransport<In>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(inner) = chained else {
            return Ok(None);
        };
        let deadline = match (details.now, details.timeout.after) {
            (ureq_time::Instant::Exact(start), ureq_time::Duration::Exact(left)) => {
                start.checked_add(left)
            }
            _ => None,
        };
        Ok(Some(DeadlineTransport { inner, deadline }))
    }
}

/// A connection whose every read and write waits at most until `deadline`, and fails at once
/// after it.
#[derive(Debug)]
struct DeadlineTransport<T> {
    inner: T,
    deadline: Option<Instant>,
}

impl<T> DeadlineTransport<T> {
    /// `timeout` shortened to the time left; an error when no time is left (ureq turns a zero
    /// timeout into a one-second wait).
    fn bound(&self, timeout: NextTimeout) -> Result<NextTimeout, ureq::Error> {
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let Some(deadline) = self.deadline else {
            return Ok(timeout);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ureq::Error::Timeout(Timeout::Global));
        }
        if *timeout.after <= left {
            return Ok(timeout);
        }
        Ok(NextTimeout { after: ureq_time::Duration::Exact(left), reason: Timeout::Global })
    }
}

impl<T: Transport> Transport for DeadlineTransport<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = self.bound(timeout)?;
        self.inner.transmit_output(amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = self.bound(timeout)?;
        self.inner.await_input(timeout)
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.strip_suffix('/').unwrap_or(issuer))
}

/// RFC 6749 2.3.1: id and secret form-urlencoded, then `id:secret` in base64.
fn basic_auth(client_id: &str, client_secret: &str) -> String {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let credentials = format!("{}:{}", encode(client_id), encode(client_secret));
    format!("Basic {}", STANDARD.encode(credentials))
}

/// Every certificate of the PEM file at `path`; at least one.
fn read_ca_file(path: &Path) -> Result<Vec<Certificate<'static>>, ProviderError> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| ProviderError::CaFile(format!("{shown}: {e}")))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => return Err(ProviderError::CaFile(format!("{shown}: {e}"))),
        }
    }
    if certs.is_empty() {
        return Err(ProviderError::CaFile(format!("{shown}: no certificate found")));
    }
    Ok(certs)
}

/// Reads the answer (body capped at [`MAX_BODY`]) and turns non-2xx statuses into errors.
fn read_reply(
    url: &str,
    result: Result<Response<Body>, ureq::Error>,
) -> Result<Reply, ProviderError> {
    let unreachable =
        |e: ureq::Error| ProviderError::Unreachable { url: url.to_owned(), reason: e.to_string() };
    let mut response = result.map_err(unreachable)?;
    let status = response.status().as_u16();
    let mime = response.body().mime_type().map(str::to_ascii_lowercase);
    let body = match response.body_mut().with_config().limit(MAX_BODY).read_to_vec() {
        Ok(body) => body,
        Err(ureq::Error::BodyExceedsLimit(_)) => {
            let reason = format!("body larger than {MAX_BODY} bytes");
            return Err(ProviderError::Invalid { url: url.to_owned(), reason });
        }
        Err(e) => return Err(unreachable(e)),
    };
    if !(200..300).contains(&status) {
        return Err(ProviderError::Status {
            url: url.to_owned(),
            status,
            detail: oauth_error_detail(&body),
        });
    }
    Ok(Reply { url: url.to_owned(), status, mime, body })
}

/// `: error (error_description)` from an OAuth error body, printable ASCII only; "" otherwise.
fn oauth_error_detail(body: &[u8]) -> String {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let Some(error) = object.get("error").and_then(Value::as_str) else {
        return String::new();
    };
    let detail = match object.get("error_description").and_then(Value::as_str) {
        Some(description) => format!(": {error} ({description})"),
        None => format!(": {error}"),
    };
    detail.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(MAX_DETAIL).collect()
}

fn parse_token_response(reply: &Reply) -> Result<TokenResponse, ProviderError> {
    debug_assert!((200..300).contains(&reply.status));
    let object = reply.json_object()?;
    let required = |name: &str| match object.get(name) {
        Some(Value::String(value)) if !value.is_empty() => Ok(value.clone()),
        _ => Err(reply.invalid(format!("no \"{name}\""))),
    };
    let access_token = required("access_token")?;
    let id_token = required("id_token")?;
    let expires_in = match object.get("expires_in") {
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(TokenResponse { access_token, id_token, expires_in })
}

/// [`parse_token_response`] of a 2xx body, for the fuzz targets (fuzz/).
pub fn parse_token_body(body: &[u8]) -> Result<TokenResponse, ProviderError> {
    parse_token_response(&Reply { url: String::new(), status: 200, mime: None, body: body.into() })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::config::{parse_http_url, Mode};
    use crate::oidc::test_server::{
        refused_url, stalled_server, Reply as Canned, TestServer, Trickle,
    };

    fn settings(issuer: &str) -> ProviderSettings {
        ProviderSettings {
            name: "app".into(),
            issuer: parse_http_url(issuer).unwrap(),
            client_id: "my client".into(),
            client_secret: "s3cr:t&=".into(),
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

    pub(crate) fn discovery_json(base: &str, issuer: &str) -> serde_json::Value {
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{base}/authorize/"),
            "token_endpoint": format!("{base}/token/"),
            "userinfo_endpoint": format!("{base}/userinfo/"),
            "jwks_uri": format!("{base}/jwks/"),
            "end_session_endpoint": format!("{base}/end-session/"),
        })
    }

    fn discovery(base: &str) -> Discovery {
        Discovery::parse(
            discovery_json(base, "https://issuer.example/").to_string().as_bytes(),
            "https://issuer.example/",
        )
        .unwrap()
    }

    fn client(settings: &ProviderSettings) -> ProviderClient {
        ProviderClient::new(settings).unwrap()
    }

    #[test]
    fn fetches_discovery_without_double_slash() {
        let server = TestServer::start(|request, base| match request.path() {
            "/o/app/.well-known/openid-configuration" => {
                Canned::json(200, discovery_json(base, &format!("{base}/o/app/")))
            }
            _ => Canned::raw(404, "text/plain", "nope"),
        });
        let s = settings(&server.url("/o/app/"));
        let d = client(&s).fetch_discovery(&s).unwrap();
        assert_eq!(d.token_endpoint, server.url("/token/"));
        let s = settings(&server.url("/o/app"));
        assert!(client(&s).fetch_discovery(&s).is_ok());
        let requests = server.requests();
        assert_eq!(requests.len(), 2);
        assert!(requests
            .iter()
            .all(|r| r.method == "GET" && r.target == "/o/app/.well-known/openid-configuration"));
        assert_eq!(requests[0].header("accept"), Some("application/json"));
        assert!(requests[0].header("user-agent").unwrap().starts_with("nginx-authentik/"));
    }

    #[derive(Debug, Default)]
    struct Recorded(std::sync::Mutex<Vec<Endpoint>>);

    impl CallTimer for Recorded {
        fn record(&self, endpoint: Endpoint, _elapsed: Duration) {
            self.0.lock().unwrap().push(endpoint);
        }
    }

    #[test]
    fn every_call_is_timed_failed_ones_too() {
        let server = TestServer::start(|req, base| match req.target.as_str() {
            "/.well-known/openid-configuration" => {
                Canned::json(200, discovery_json(base, &format!("{base}/")))
            }
            _ => Canned::raw(500, "text/plain", "down"),
        });
        let s = settings(&server.url("/"));
        let timer = Arc::new(Recorded::default());
        let mut c = client(&s);
        c.set_timer(timer.clone());
        let d = c.fetch_discovery(&s).unwrap();
        assert!(c.fetch_jwks(&server.url("/jwks")).is_err());
        assert!(c.exchange_code(&s, &d, "code", "verifier", "https://app/cb").is_err());
        assert!(c
            .with_deadline(Instant::now() + Duration::from_secs(5))
            .userinfo(&server.url("/ui"), "t")
            .is_err());
        let seen = timer.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [Endpoint::Discovery, Endpoint::Jwks, Endpoint::Token, Endpoint::Userinfo]
        );
    }

    #[test]
    fn discovery_with_wrong_issuer_is_invalid() {
        let server = TestServer::start(|_, base| {
            Canned::json(200, discovery_json(base, "https://other.example/"))
        });
        let s = settings(&server.url("/"));
        let error = client(&s).fetch_discovery(&s).unwrap_err();
        assert!(matches!(error, ProviderError::Invalid { .. }), "{error}");
        assert!(error.to_string().contains("does not match configured issuer"), "{error}");
    }

    #[test]
    fn fetches_jwks() {
        let server =
            TestServer::start(|_, _| Canned::json(200, crate::oidc::jwt::tests::jwks_json()));
        let s = settings(&server.url("/"));
        let jwks = client(&s).fetch_jwks(&server.url("/jwks/")).unwrap();
        assert!(jwks.has_kid("rsa-kid") && jwks.has_kid("ec-kid"));
        let bad = TestServer::start(|_, _| Canned::raw(200, "application/json", "{\"nokeys\":1}"));
        assert!(matches!(
            client(&s).fetch_jwks(&bad.url("/jwks/")),
            Err(ProviderError::Invalid { .. })
        ));
    }

    #[test]
    fn exchanges_code_with_basic_auth() {
        let server = TestServer::start(|_, _| {
            Canned::json(
                200,
                json!({"access_token": "at", "id_token": "it", "expires_in": 300, "token_type": "Bearer"}),
            )
        });
        let s = settings(&server.url("/"));
        let tokens = client(&s)
            .exchange_code(
                &s,
                &discovery(&server.url("")),
                "the code",
                "verif",
                "https://app/cb?x=1",
            )
            .unwrap();
        assert_eq!(
            tokens,
            TokenResponse {
                access_token: "at".into(),
                id_token: "it".into(),
                expires_in: Some(300)
            }
        );
        let request = &server.requests()[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.path(), "/token/");
        assert_eq!(request.header("content-type"), Some("application/x-www-form-urlencoded"));
        // base64("my+client:s3cr%3At%26%3D")
        assert_eq!(
            request.header("authorization"),
            Some(format!("Basic {}", STANDARD.encode("my+client:s3cr%3At%26%3D")).as_str())
        );
        let form = request.form();
        let expected = [
            ("grant_type", "authorization_code"),
            ("code", "the code"),
            ("redirect_uri", "https://app/cb?x=1"),
            ("code_verifier", "verif"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(form, expected);
    }

    #[test]
    fn exchanges_code_with_post_auth() {
        let server = TestServer::start(|_, _| {
            Canned::json(200, json!({"access_token": "at", "id_token": "it"}))
        });
        let s = settings(&server.url("/"));
        let mut d = discovery(&server.url(""));
        d.token_endpoint_auth_methods_supported = vec!["client_secret_post".into()];
        let tokens = client(&s).exchange_code(&s, &d, "c", "v", "r").unwrap();
        assert_eq!(tokens.expires_in, None);
        let request = &server.requests()[0];
        assert_eq!(request.header("authorization"), None);
        let form = request.form();
        assert!(form.contains(&("client_id".into(), "my client".into())));
        assert!(form.contains(&("client_secret".into(), "s3cr:t&=".into())));
    }

    #[test]
    fn token_response_must_have_both_tokens() {
        for body in [
            json!({"access_token": "at"}),
            json!({"id_token": "it"}),
            json!({"access_token": "", "id_token": "it"}),
            json!(["x"]),
        ] {
            let reply = body.clone();
            let server = TestServer::start(move |_, _| Canned::json(200, reply.clone()));
            let s = settings(&server.url("/"));
            let error = client(&s)
                .exchange_code(&s, &discovery(&server.url("")), "c", "v", "r")
                .unwrap_err();
            assert!(matches!(error, ProviderError::Invalid { .. }), "{body}: {error}");
        }
    }

    #[test]
    fn oauth_errors_are_reported_with_detail() {
        let server = TestServer::start(|_, _| {
            Canned::json(
                400,
                json!({"error": "invalid_grant", "error_description": "code expired\r\nX: y"}),
            )
        });
        let s = settings(&server.url("/"));
        let error =
            client(&s).exchange_code(&s, &discovery(&server.url("")), "c", "v", "r").unwrap_err();
        let ProviderError::Status { status, detail, .. } = &error else { panic!("{error}") };
        assert_eq!(*status, 400);
        assert_eq!(detail, ": invalid_grant (code expiredX: y)");
        assert_eq!(
            error.to_string(),
            format!("{}/token/ answered 400: invalid_grant (code expiredX: y)", server.url(""))
        );
    }

    #[test]
    fn server_errors_and_redirects_are_status_errors() {
        let server = TestServer::start(|request, _| match request.path() {
            "/500" => Canned::raw(500, "text/html", "<h1>oops</h1>"),
            _ => Canned::raw(302, "text/plain", ""),
        });
        let s = settings(&server.url("/"));
        let error = client(&s).fetch_jwks(&server.url("/500")).unwrap_err();
        assert!(
            matches!(error, ProviderError::Status { status: 500, ref detail, .. } if detail.is_empty()),
            "{error}"
        );
        let error = client(&s).fetch_jwks(&server.url("/redirect")).unwrap_err();
        assert!(matches!(error, ProviderError::Status { status: 302, .. }), "{error}");
        assert_eq!(server.requests().len(), 2);
    }

    #[test]
    fn userinfo_sends_bearer_and_needs_json() {
        let server = TestServer::start(|request, _| match request.path() {
            "/userinfo/" => Canned::json(200, json!({"sub": "u1", "email": "a@b"})),
            "/jwt" => Canned::raw(200, "application/jwt", "a.b.c"),
            "/array" => Canned::json(200, json!([1])),
            _ => Canned::raw(200, "application/json; charset=utf-8", "{\"sub\":\"u2\"}"),
        });
        let s = settings(&server.url("/"));
        let c = client(&s);
        let info = c.userinfo(&server.url("/userinfo/"), "the-token").unwrap();
        assert_eq!(info["email"], "a@b");
        assert_eq!(server.requests()[0].header("authorization"), Some("Bearer the-token"));
        assert_eq!(c.userinfo(&server.url("/charset"), "t").unwrap()["sub"], "u2");
        assert!(matches!(c.userinfo(&server.url("/jwt"), "t"), Err(ProviderError::Invalid { .. })));
        assert!(matches!(
            c.userinfo(&server.url("/array"), "t"),
            Err(ProviderError::Invalid { .. })
        ));
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let server = TestServer::start(|_, _| {
            Canned::raw(200, "application/json", vec![b' '; MAX_BODY as usize + 10])
        });
        let s = settings(&server.url("/"));
        let error = client(&s).fetch_jwks(&server.url("/")).unwrap_err();
        assert!(
            matches!(error, ProviderError::Invalid { ref reason, .. } if reason.contains("larger")),
            "{error}"
        );
    }

    #[test]
    fn stalled_provider_times_out() {
        let base = stalled_server();
        let mut s = settings(&base);
        s.timeout_ms = 300;
        let started = Instant::now();
        let error = client(&s).fetch_jwks(&format!("{base}/jwks/")).unwrap_err();
        let elapsed = started.elapsed();
        assert!(
            matches!(error, ProviderError::Unreachable { ref reason, .. } if reason.contains("timeout")),
            "{error}"
        );
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
    }

    /// A provider that answers every request with a 2 KiB JSON body, trickled per `trickle`.
    fn trickling(tls: bool, trickle: Trickle) -> TestServer {
        let handler = move |_: &crate::oidc::test_server::Request, _: &str| {
            let padding = " ".repeat(2048);
            Canned::raw(200, "application/json", format!("{{\"keys\": []{padding}}}"))
                .trickled(trickle)
        };
        if tls {
            TestServer::start_tls(handler)
        } else {
            TestServer::start(handler)
        }
    }

    /// `fetch_jwks` with `timeout_ms` 400 fails with a timeout in 400 ms (plus a little) against
    /// a provider that sends one byte every 20 ms as `trickle` says, over plain HTTP and TLS.
    fn assert_cut_off_at_the_timeout(trickle: Trickle) {
        for tls in [false, true] {
            let server = trickling(tls, trickle);
            let mut s = settings(&server.url("/"));
            s.timeout_ms = 400;
            s.ca_file = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ca_cert.pem"));
            let started = Instant::now();
            let error = client(&s).fetch_jwks(&server.url("/jwks/")).unwrap_err();
            let elapsed = started.elapsed();
            assert!(
                matches!(error, ProviderError::Unreachable { ref reason, .. } if reason.contains("timeout")),
                "tls {tls}, {trickle:?}: {error}"
            );
            assert!(
                elapsed >= Duration::from_millis(390) && elapsed < Duration::from_millis(800),
                "tls {tls}, {trickle:?}: {elapsed:?}"
            );
        }
    }

    #[test]
    fn trickled_headers_are_cut_off_at_the_timeout() {
        // About 100 bytes of headers: 2 s at full trickle.
        assert_cut_off_at_the_timeout(Trickle::Head(Duration::from_millis(20)));
    }

    #[test]
    fn trickled_body_is_cut_off_at_the_timeout() {
        // 2 KiB of body: 40 s at full trickle.
        assert_cut_off_at_the_timeout(Trickle::Body(Duration::from_millis(20)));
    }

    #[test]
    fn login_deadline_cuts_calls_short() {
        let server = trickling(false, Trickle::Body(Duration::from_millis(20)));
        let s = settings(&server.url("/"));
        let started = Instant::now();
        let c = client(&s).with_deadline(started + Duration::from_millis(300));
        assert_eq!(c.timeout(), Duration::from_millis(2_000));
        let error = c.fetch_jwks(&server.url("/jwks/")).unwrap_err();
        let elapsed = started.elapsed();
        assert!(matches!(error, ProviderError::Unreachable { .. }), "{error}");
        assert!(elapsed < Duration::from_millis(700), "{elapsed:?}");
        // A later deadline does not extend an earlier one; past it, no request is made.
        let c = c.with_deadline(started + Duration::from_secs(60));
        let requests = server.requests().len();
        let error = c.fetch_jwks(&server.url("/jwks/")).unwrap_err();
        assert!(error.to_string().ends_with("is unreachable: timeout: login deadline reached"));
        assert_eq!(server.requests().len(), requests);
    }

    #[test]
    fn refused_connection_is_unreachable() {
        let base = refused_url();
        let s = settings(&base);
        let error = client(&s).fetch_discovery(&s).unwrap_err();
        assert!(matches!(error, ProviderError::Unreachable { .. }), "{error}");
        assert!(error
            .to_string()
            .starts_with(&format!("{base}/.well-known/openid-configuration is unreachable: ")));
    }

    #[test]
    fn tls_handshake_failure_is_unreachable() {
        // https:// to a plain-HTTP server: the native-tls handshake fails, with the system roots
        // and with a ca_file, and neither panics nor falls back to plain HTTP.
        let server = TestServer::start(|_, _| Canned::raw(200, "application/json", "{}"));
        let https = server.url("/jwks/").replacen("http://", "https://", 1);
        let mut s = settings("https://auth.example.com/");
        s.timeout_ms = 500;
        for ca_file in
            [None, Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ca_cert.pem"))]
        {
            s.ca_file = ca_file;
            let error = client(&s).fetch_jwks(&https).unwrap_err();
            assert!(matches!(error, ProviderError::Unreachable { .. }), "{error}");
        }
    }

    #[test]
    fn tls_with_ca_file_verifies_the_provider() {
        let server =
            TestServer::start_tls(|_, _| Canned::json(200, crate::oidc::jwt::tests::jwks_json()));
        let mut s = settings("https://auth.example.com/");
        s.ca_file = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ca_cert.pem"));
        let jwks = client(&s).fetch_jwks(&server.url("/jwks/")).unwrap();
        assert!(jwks.has_kid("rsa-kid"));
        assert_eq!(server.requests().len(), 1);
        // The system roots do not know the test CA: verification is on.
        s.ca_file = None;
        let error = client(&s).fetch_jwks(&server.url("/jwks/")).unwrap_err();
        assert!(matches!(error, ProviderError::Unreachable { .. }), "{error}");
        assert_eq!(server.requests().len(), 1);
        // A ca_file with another CA does not verify it either.
        s.ca_file = Some(Path::new("/etc/ssl/certs/ca-certificates.crt").to_path_buf());
        if s.ca_file.as_deref().is_some_and(Path::exists) {
            assert!(client(&s).fetch_jwks(&server.url("/jwks/")).is_err());
        }
    }

    #[test]
    fn ca_file_is_read() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut s = settings("https://auth.example.com/");
        s.ca_file = Some(data.join("ca_cert.pem"));
        assert!(ProviderClient::new(&s).is_ok());
        s.ca_file = Some(data.join("missing.pem"));
        let error = ProviderClient::new(&s).unwrap_err();
        assert!(matches!(error, ProviderError::CaFile(_)));
        assert!(error.to_string().starts_with("cannot read \"ca_file\": "), "{error}");
        s.ca_file = Some(data.join("ec_private.pem"));
        assert!(
            matches!(ProviderClient::new(&s), Err(ProviderError::CaFile(ref m)) if m.contains("no certificate"))
        );
    }

    #[test]
    fn oauth_error_detail_is_sanitised() {
        assert_eq!(oauth_error_detail(b"not json"), "");
        assert_eq!(oauth_error_detail(br#"{"error": 5}"#), "");
        assert_eq!(oauth_error_detail(br#"{"error": "x"}"#), ": x");
        let long = format!(r#"{{"error": "{}"}}"#, "a".repeat(1000));
        assert_eq!(oauth_error_detail(long.as_bytes()).len(), MAX_DETAIL);
    }
}
