//! Provider settings as parsed from an `authentik_provider NAME { ... }` block.

use url::Url;

/// How the provider is deployed, with authentik's meaning (see the behaviour spec, section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// nginx proxies one app; `external_host` is the app's public URL.
    #[default]
    Proxy,
    /// Same as proxy for the module; kept for authentik parity.
    ForwardSingle,
    /// One login for every host under `cookie_domain`; `external_host` is the auth host.
    ForwardDomain,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid mode \"{0}\", expected proxy, forward_single or forward_domain")]
    InvalidMode(String),
    #[error("invalid URL \"{0}\": {1}")]
    InvalidUrl(String, String),
    #[error("URL \"{0}\" must use http or https")]
    InvalidScheme(String),
    #[error("URL \"{0}\" must not have a query or fragment")]
    UrlHasQuery(String),
    #[error("invalid cookie domain \"{0}\"")]
    InvalidCookieDomain(String),
    #[error("\"forward_domain\" mode requires \"cookie_domain\" and \"external_host\"")]
    ForwardDomainIncomplete,
    #[error("\"{0}\" is missing")]
    Missing(&'static str),
}

impl Mode {
    /// Parses `proxy`, `forward_single` or `forward_domain`.
    pub fn parse(s: &str) -> Result<Mode, ConfigError> {
        match s {
            "proxy" => Ok(Mode::Proxy),
            "forward_single" => Ok(Mode::ForwardSingle),
            "forward_domain" => Ok(Mode::ForwardDomain),
            other => Err(ConfigError::InvalidMode(other.to_owned())),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Proxy => "proxy",
            Mode::ForwardSingle => "forward_single",
            Mode::ForwardDomain => "forward_domain",
        }
    }
}

/// Parses an `issuer` or `external_host` value: absolute http(s) URL, no query or fragment.
/// A trailing `/` on the path is removed for `external_host` joins but kept in `Url` as given.
pub fn parse_http_url(s: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(s).map_err(|e| ConfigError::InvalidUrl(s.to_owned(), e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::InvalidScheme(s.to_owned()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::UrlHasQuery(s.to_owned()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::InvalidUrl(s.to_owned(), "no host".to_owned()));
    }
    Ok(url)
}

/// Normalises a `cookie_domain` value: strips one leading `.`, lowercases, rejects empty values,
/// values with `/`, `:` or spaces, and values without a dot that are not `localhost`.
pub fn parse_cookie_domain(s: &str) -> Result<String, ConfigError> {
    let invalid = || ConfigError::InvalidCookieDomain(s.to_owned());
    let domain = s.strip_prefix('.').unwrap_or(s).to_ascii_lowercase();
    let forbidden =
        |c: char| matches!(c, '/' | ':' | ';' | ',') || c.is_whitespace() || c.is_control();
    if domain.is_empty() || domain.contains(forbidden) {
        return Err(invalid());
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err(invalid());
    }
    if !domain.contains('.') && domain != "localhost" {
        return Err(invalid());
    }
    Ok(domain)
}

/// `host` equals `domain` or is a subdomain of it (dot boundary). Both already lowercase.
pub fn is_host_in_domain(host: &str, domain: &str) -> bool {
    host == domain
        || host.strip_suffix(domain).is_some_and(|prefix| prefix.ends_with('.') && prefix.len() > 1)
}

/// Everything the protocol logic needs to know about one provider. Built once at configuration
/// time; shared read-only (behind an `Arc`) with the threads that talk to the provider.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// The block's NAME; becomes `X-authentik-meta-provider` and `-meta-app`.
    pub name: String,
    pub issuer: Url,
    pub client_id: String,
    pub client_secret: String,
    /// `None`: the request's scheme and host are used.
    pub external_host: Option<Url>,
    pub mode: Mode,
    /// Normalised by [`parse_cookie_domain`].
    pub cookie_domain: Option<String>,
    /// Default: openid profile email entitlements ak_proxy.
    pub scopes: Vec<String>,
    /// Timeout of each call to the provider, in milliseconds (default 10000).
    pub timeout_ms: u64,
    /// PEM file of CA certificates to trust for the provider instead of the system store.
    pub ca_file: Option<std::path::PathBuf>,
    /// `post_logout_redirect_uri` sent to the end-session endpoint; default `<external_host>/`.
    pub post_logout_redirect: Option<Url>,
    /// Audiences besides `client_id` that an id_token may name (`trusted_audiences`).
    pub trusted_audiences: Vec<String>,
    /// The names the `X-authentik-meta-*` headers carry.
    pub meta: ProviderMeta,
    /// `Host` and `X-Forwarded-Proto` of every back-channel call, when authentik is reached on
    /// another address than browsers use (`browser_url`): authentik builds the tokens' `iss`
    /// from the request's host, so it must be the host of the issuer browsers see.
    pub backchannel_host: Option<(String, String)>,
    /// HTTP Basic credentials for the upstream, from the user's attributes (authentik's
    /// `basic_auth_*`).
    pub basic_auth: Option<BasicAuthAttributes>,
}

/// Which of the user's attributes (`ak_proxy.user_attributes`) make the upstream's
/// `Authorization: Basic`: the password attribute (no header when it is empty or missing) and
/// the user attribute (the email when it is not a string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuthAttributes {
    pub user_attribute: String,
    pub password_attribute: String,
}

/// What `X-authentik-meta-outpost`, `-provider` and `-app` say, and how calls name the provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderMeta {
    pub outpost: String,
    pub provider: String,
    pub app: String,
    /// Appended to the User-Agent of the provider's calls (authentik's ` (provider=NAME)`).
    pub user_agent_suffix: Option<String>,
}

/// The outpost name of providers from `authentik_provider { }` blocks.
pub const BLOCK_OUTPOST_NAME: &str = "nginx-authentik";

impl ProviderMeta {
    /// The meta names of an `authentik_provider NAME { }` block: the block's name for both the
    /// provider and the application.
    pub fn of_block(name: &str) -> ProviderMeta {
        ProviderMeta {
            outpost: BLOCK_OUTPOST_NAME.to_owned(),
            provider: name.to_owned(),
            app: name.to_owned(),
            user_agent_suffix: None,
        }
    }
}

pub const DEFAULT_SCOPES: &[&str] = &["openid", "profile", "email", "entitlements", "ak_proxy"];

impl ProviderSettings {
    /// Cross-field checks run at the end of the block (`nginx -t` reports them with file:line).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.client_id.is_empty() {
            return Err(ConfigError::Missing("client_id"));
        }
        if self.client_secret.is_empty() {
            return Err(ConfigError::Missing("client_secret"));
        }
        if self.mode != Mode::ForwardDomain {
            return Ok(());
        }
        let (Some(domain), Some(external_host)) = (&self.cookie_domain, &self.external_host) else {
            return Err(ConfigError::ForwardDomainIncomplete);
        };
        let host = external_host.host_str().unwrap_or_default().to_ascii_lowercase();
        if !is_host_in_domain(&host, domain) {
            return Err(ConfigError::InvalidCookieDomain(domain.clone()));
        }
        Ok(())
    }

    /// The external origin for this request: `external_host` if set, else `scheme://host`.
    /// Only `scheme://host[:port]`: `external_host`'s path is not part of it.
    pub fn external_origin(&self, request_scheme: &str, request_host: &str) -> String {
        match &self.external_host {
            Some(url) => url.origin().ascii_serialization(),
            None => format!("{}://{request_host}", request_scheme.to_ascii_lowercase()),
        }
    }

    /// `external_host`'s path without a trailing `/` ("" for none): where the outpost endpoints,
    /// the callback and the login cookie live.
    pub fn base_path(&self) -> &str {
        self.external_host.as_ref().map_or("", |url| url.path().trim_end_matches('/'))
    }

    /// `<origin><external_host path>/outpost.goauthentik.io/callback?X-authentik-auth-callback=true`,
    /// with the path joined without a double slash.
    pub fn redirect_uri(&self, request_scheme: &str, request_host: &str) -> String {
        let origin = self.external_origin(request_scheme, request_host);
        let base_path = self.base_path();
        format!(
            "{origin}{base_path}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
        )
    }

    /// The URL of a request for `target` (its path and query as sent) in this provider's mode:
    /// on the external origin (proxy, forward_single), or on the request's own scheme and host
    /// (forward_domain, where one provider serves many hosts).
    pub fn request_url(&self, request_scheme: &str, request_host: &str, target: &str) -> String {
        match self.mode {
            Mode::ForwardDomain => format!("{request_scheme}://{request_host}{target}"),
            _ => format!("{}{target}", self.external_origin(request_scheme, request_host)),
        }
    }

    /// The external host's root, `external_host`'s path included: where a refused return URL
    /// lands.
    pub fn home_url(&self, request_scheme: &str, request_host: &str) -> String {
        let base_path = self.base_path();
        format!("{}{base_path}/", self.external_origin(request_scheme, request_host))
    }

    /// `true` when the external origin is https (controls the `Secure` cookie attribute).
    pub fn is_secure(&self, request_scheme: &str) -> bool {
        match &self.external_host {
            Some(url) => url.scheme() == "https",
            None => request_scheme.eq_ignore_ascii_case("https"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_home_urls_follow_the_mode() {
        let proxy = ProviderSettings {
            external_host: Some(parse_http_url("https://app.example.com/app").unwrap()),
            ..settings()
        };
        assert_eq!(
            proxy.request_url("http", "internal:8080", "/x?y"),
            "https://app.example.com/x?y"
        );
        assert_eq!(proxy.home_url("http", "internal:8080"), "https://app.example.com/app/");
        let domain = ProviderSettings { mode: Mode::ForwardDomain, ..proxy.clone() };
        assert_eq!(domain.request_url("https", "b.example.com", "/x"), "https://b.example.com/x");
        let bare = settings();
        assert_eq!(
            bare.home_url("http", "h:81"),
            format!("{}/", bare.external_origin("http", "h:81"))
        );
    }

    fn settings() -> ProviderSettings {
        ProviderSettings {
            name: "app".into(),
            issuer: parse_http_url("https://auth.example.com/application/o/app/").unwrap(),
            client_id: "id".into(),
            client_secret: "secret".into(),
            external_host: None,
            mode: Mode::Proxy,
            cookie_domain: None,
            scopes: DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
            timeout_ms: 10_000,
            ca_file: None,
            post_logout_redirect: None,
            trusted_audiences: Vec::new(),
            meta: Default::default(),
            backchannel_host: None,
            basic_auth: None,
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [Mode::Proxy, Mode::ForwardSingle, Mode::ForwardDomain] {
            assert_eq!(Mode::parse(mode.as_str()), Ok(mode));
        }
        assert_eq!(Mode::parse("Proxy"), Err(ConfigError::InvalidMode("Proxy".into())));
        assert_eq!(Mode::default(), Mode::Proxy);
        assert_eq!(
            ConfigError::InvalidMode("x".into()).to_string(),
            "invalid mode \"x\", expected proxy, forward_single or forward_domain"
        );
    }

    #[test]
    fn http_urls_are_checked() {
        assert_eq!(parse_http_url("https://a.example/sub/").unwrap().path(), "/sub/");
        assert!(parse_http_url("http://a.example:8080").is_ok());
        assert_eq!(
            parse_http_url("ftp://a.example"),
            Err(ConfigError::InvalidScheme("ftp://a.example".into()))
        );
        assert_eq!(
            parse_http_url("https://a.example/?x=1"),
            Err(ConfigError::UrlHasQuery("https://a.example/?x=1".into()))
        );
        assert_eq!(
            parse_http_url("https://a.example/#f"),
            Err(ConfigError::UrlHasQuery("https://a.example/#f".into()))
        );
        assert!(matches!(parse_http_url("a.example"), Err(ConfigError::InvalidUrl(..))));
        assert!(matches!(parse_http_url("https://"), Err(ConfigError::InvalidUrl(..))));
    }

    #[test]
    fn cookie_domains_are_normalised() {
        assert_eq!(parse_cookie_domain(".Example.COM"), Ok("example.com".into()));
        assert_eq!(parse_cookie_domain("sub.example.com"), Ok("sub.example.com".into()));
        assert_eq!(parse_cookie_domain("localhost"), Ok("localhost".into()));
        for bad in [
            "",
            ".",
            "com",
            "example.com/",
            "example.com:443",
            "exa mple.com",
            "..example.com",
            "example..com",
            "example.com.",
        ] {
            assert_eq!(
                parse_cookie_domain(bad),
                Err(ConfigError::InvalidCookieDomain(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_in_domain_needs_a_dot_boundary() {
        assert!(is_host_in_domain("example.com", "example.com"));
        assert!(is_host_in_domain("a.b.example.com", "example.com"));
        assert!(!is_host_in_domain("evilexample.com", "example.com"));
        assert!(!is_host_in_domain(".example.com", "example.com"));
        assert!(!is_host_in_domain("example.com.evil.com", "example.com"));
    }

    #[test]
    fn validate_requires_client_credentials() {
        assert_eq!(settings().validate(), Ok(()));
        let missing_id = ProviderSettings { client_id: String::new(), ..settings() };
        assert_eq!(missing_id.validate(), Err(ConfigError::Missing("client_id")));
        let missing_secret = ProviderSettings { client_secret: String::new(), ..settings() };
        assert_eq!(missing_secret.validate(), Err(ConfigError::Missing("client_secret")));
        assert_eq!(ConfigError::Missing("client_id").to_string(), "\"client_id\" is missing");
    }

    #[test]
    fn validate_forward_domain() {
        let base = ProviderSettings { mode: Mode::ForwardDomain, ..settings() };
        assert_eq!(base.validate(), Err(ConfigError::ForwardDomainIncomplete));
        let no_host =
            ProviderSettings { cookie_domain: Some("example.com".into()), ..base.clone() };
        assert_eq!(no_host.validate(), Err(ConfigError::ForwardDomainIncomplete));
        let ok = ProviderSettings {
            external_host: Some(parse_http_url("https://Auth.Example.com").unwrap()),
            ..no_host.clone()
        };
        assert_eq!(ok.validate(), Ok(()));
        let apex = ProviderSettings {
            external_host: Some(parse_http_url("https://example.com").unwrap()),
            ..no_host.clone()
        };
        assert_eq!(apex.validate(), Ok(()));
        let outside = ProviderSettings {
            external_host: Some(parse_http_url("https://auth.evilexample.com").unwrap()),
            ..no_host
        };
        assert_eq!(outside.validate(), Err(ConfigError::InvalidCookieDomain("example.com".into())));
    }

    #[test]
    fn origin_and_redirect_uri_without_external_host() {
        let s = settings();
        assert_eq!(s.external_origin("http", "app.local:8080"), "http://app.local:8080");
        assert_eq!(
            s.redirect_uri("https", "app.example"),
            "https://app.example/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
        );
        assert!(s.is_secure("https"));
        assert!(!s.is_secure("http"));
    }

    #[test]
    fn origin_and_redirect_uri_with_external_host() {
        let root = ProviderSettings {
            external_host: Some(parse_http_url("https://a.example/").unwrap()),
            ..settings()
        };
        assert_eq!(root.external_origin("http", "ignored"), "https://a.example");
        assert_eq!(
            root.redirect_uri("http", "ignored"),
            "https://a.example/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
        );
        assert!(root.is_secure("http"));

        let sub = ProviderSettings {
            external_host: Some(parse_http_url("https://a.example/sub/").unwrap()),
            ..settings()
        };
        assert_eq!(sub.external_origin("http", "ignored"), "https://a.example");
        assert_eq!(
            sub.redirect_uri("http", "ignored"),
            "https://a.example/sub/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
        );

        let port = ProviderSettings {
            external_host: Some(parse_http_url("http://a.example:8080/sub").unwrap()),
            ..settings()
        };
        assert_eq!(port.external_origin("https", "ignored"), "http://a.example:8080");
        assert_eq!(
            port.redirect_uri("https", "ignored"),
            "http://a.example:8080/sub/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
        );
        assert!(!port.is_secure("https"));
    }
}
