//! A proxy provider from authentik's API turned into what the module runs: provider settings,
//! the discovery document (authentik sends every endpoint, nothing is fetched), the
//! unauthenticated paths and the session lifetime.
//!
//! With `browser_url`, the endpoints a browser follows (authorize, end-session) and the issuer
//! move to the browser's origin, as authentik's outpost does for `AUTHENTIK_HOST_BROWSER`; the
//! back-channel endpoints keep the API's address but send the browser's host as `Host`, so the
//! tokens' `iss` (authentik builds it from the request host) matches the issuer.

use url::Url;

use crate::config::DEFAULT_SCOPES;
use crate::config::{
    parse_cookie_domain, parse_http_url, BasicAuthAttributes, Mode, ProviderMeta, ProviderSettings,
};
use crate::oidc::Discovery;
use crate::outpost::api::{OutpostInfo, ProxyProvider};
use crate::outpost::OutpostOptions;
use crate::paths::UnauthPaths;

/// How a provider answers `Authorization` headers (used by header authentication).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderAuth {
    /// `intercept_header_auth`: a failed header login answers 401, not the login redirect.
    pub intercept: bool,
    pub basic_auth_enabled: bool,
    pub basic_auth_user_attribute: String,
    pub basic_auth_password_attribute: String,
    pub introspection_endpoint: String,
}

/// One provider of the outpost, ready to build a runtime from.
#[derive(Debug, Clone)]
pub struct OutpostProvider {
    /// `assigned_application_slug`: what `auth_authentik SLUG` names (the provider's name too).
    pub slug: String,
    pub settings: ProviderSettings,
    pub discovery: Discovery,
    pub unauth: UnauthPaths,
    /// `access_token_validity`, seconds: how long a session may live.
    pub session_lifetime: Option<i64>,
    pub header_auth: HeaderAuth,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderConfigError {
    #[error("provider \"{0}\": {1}")]
    Invalid(String, String),
}

/// Builds the provider `p` of `outpost`; an error names the provider and the field.
pub fn build(
    p: &ProxyProvider,
    outpost: &OutpostInfo,
    options: &OutpostOptions,
) -> Result<OutpostProvider, ProviderConfigError> {
    let invalid = |what: String| ProviderConfigError::Invalid(p.name.clone(), what);
    let oidc = &p.oidc_configuration;
    let external_host =
        parse_http_url(&p.external_host).map_err(|e| invalid(format!("external_host: {e}")))?;
    let mode = match p.mode.as_str() {
        "" => Mode::Proxy,
        m => Mode::parse(m).map_err(|e| invalid(e.to_string()))?,
    };
    let cookie_domain = match p.cookie_domain.trim() {
        "" => None,
        d => Some(parse_cookie_domain(d).map_err(|e| invalid(e.to_string()))?),
    };
    let api_origin = options.url.origin();
    let browser = options.browser_url.as_ref();
    let to_browser = |endpoint: &str| rewrite_origin(endpoint, &api_origin, browser);
    let issuer = to_browser(&oidc.issuer);
    let issuer = parse_http_url(&issuer).map_err(|e| invalid(format!("issuer: {e}")))?;
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let discovery = Discovery {
        issuer: issuer.to_string(),
        authorization_endpoint: to_browser(&oidc.authorization_endpoint),
        token_endpoint: oidc.token_endpoint.clone(),
        userinfo_endpoint: optional(&oidc.userinfo_endpoint),
        end_session_endpoint: optional(&to_browser(&oidc.end_session_endpoint)),
        jwks_uri: optional(&oidc.jwks_uri),
        introspection_endpoint: optional(&oidc.introspection_endpoint),
        id_token_signing_alg_values_supported: oidc.id_token_signing_alg_values_supported.clone(),
        token_endpoint_auth_methods_supported: oidc.token_endpoint_auth_methods_supported.clone(),
    };
    discovery.check_endpoints().map_err(|e| invalid(e.to_string()))?;
    let mut scopes: Vec<String> = if p.scopes_to_request.is_empty() {
        DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
    } else {
        p.scopes_to_request.clone()
    };
    if !scopes.iter().any(|s| s == "openid") {
        scopes.insert(0, "openid".to_owned());
    }
    let slug = match p.assigned_application_slug.as_str() {
        "" => p.name.clone(),
        slug => slug.to_owned(),
    };
    let settings = ProviderSettings {
        name: p.name.clone(),
        issuer,
        client_id: p.client_id.clone(),
        client_secret: p.client_secret.clone(),
        external_host: Some(external_host),
        mode,
        cookie_domain,
        scopes,
        timeout_ms: options.timeout.as_millis().max(1) as u64,
        ca_file: options.ca_file.clone(),
        post_logout_redirect: None,
        trusted_audiences: Vec::new(),
        meta: ProviderMeta {
            outpost: outpost.name.clone(),
            provider: p.name.clone(),
            app: slug.clone(),
            user_agent_suffix: Some(format!("(provider={})", p.name)),
        },
        backchannel_host: browser.and_then(backchannel_host),
        basic_auth: (p.basic_auth_enabled && !p.basic_auth_password_attribute.is_empty()).then(
            || BasicAuthAttributes {
                user_attribute: p.basic_auth_user_attribute.clone(),
                password_attribute: p.basic_auth_password_attribute.clone(),
            },
        ),
    };
    settings.validate().map_err(|e| invalid(e.to_string()))?;
    let patterns: Vec<String> = p
        .skip_path_regex
        .lines()
        .map(|line| line.trim_end_matches('\r').trim())
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    let unauth = UnauthPaths::compile(&patterns).map_err(|e| invalid(e.to_string()))?;
    let session_lifetime = p
        .access_token_validity
        .filter(|v| v.is_finite() && *v >= 1.0)
        .map(|v| v.min(i64::MAX as f64 / 2.0) as i64);
    let header_auth = HeaderAuth {
        intercept: p.intercept_header_auth,
        basic_auth_enabled: p.basic_auth_enabled,
        basic_auth_user_attribute: p.basic_auth_user_attribute.clone(),
        basic_auth_password_attribute: p.basic_auth_password_attribute.clone(),
        introspection_endpoint: oidc.introspection_endpoint.clone(),
    };
    Ok(OutpostProvider { slug, settings, discovery, unauth, session_lifetime, header_auth })
}

/// `endpoint` with its origin replaced by `browser`'s when it is on the API's origin (the host
/// authentik built it for); otherwise, or without `browser`, unchanged.
fn rewrite_origin(endpoint: &str, api_origin: &url::Origin, browser: Option<&Url>) -> String {
    let (Some(browser), Ok(mut url)) = (browser, Url::parse(endpoint)) else {
        return endpoint.to_owned();
    };
    if &url.origin() != api_origin {
        return endpoint.to_owned();
    }
    if url.set_scheme(browser.scheme()).is_err()
        || url.set_host(browser.host_str()).is_err()
        || url.set_port(browser.port()).is_err()
    {
        return endpoint.to_owned();
    }
    url.to_string()
}

/// `Host` (with a non-default port) and scheme of `browser`.
fn backchannel_host(browser: &Url) -> Option<(String, String)> {
    let host = browser.host_str()?;
    let host = match browser.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    Some((host, browser.scheme().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outpost::api::OidcConfiguration;
    use std::time::Duration;

    fn options(browser: Option<&str>) -> OutpostOptions {
        OutpostOptions {
            url: Url::parse("http://10.0.0.5:9000/").unwrap(),
            token: "t".into(),
            browser_url: browser.map(|b| Url::parse(b).unwrap()),
            ca_file: None,
            refresh: None,
            timeout: Duration::from_secs(5),
            hostname: "h".into(),
        }
    }

    fn outpost() -> OutpostInfo {
        OutpostInfo { pk: "pk".into(), name: "nginx outpost".into(), refresh_interval_s: 300 }
    }

    fn provider() -> ProxyProvider {
        let base = "http://10.0.0.5:9000/application/o";
        ProxyProvider {
            pk: 1,
            name: "Grafana provider".into(),
            external_host: "https://grafana.example.com".into(),
            client_id: "cid".into(),
            client_secret: "secret".into(),
            oidc_configuration: OidcConfiguration {
                issuer: format!("{base}/grafana/"),
                authorization_endpoint: format!("{base}/authorize/"),
                token_endpoint: format!("{base}/token/"),
                userinfo_endpoint: format!("{base}/userinfo/"),
                end_session_endpoint: format!("{base}/grafana/end-session/"),
                introspection_endpoint: format!("{base}/introspect/"),
                jwks_uri: format!("{base}/grafana/jwks/"),
                id_token_signing_alg_values_supported: vec!["HS256".into()],
                token_endpoint_auth_methods_supported: vec!["client_secret_post".into()],
            },
            skip_path_regex: "^/health$\r\n\n  \n^/public/".into(),
            mode: "proxy".into(),
            cookie_domain: String::new(),
            access_token_validity: Some(172800.0),
            intercept_header_auth: true,
            scopes_to_request: vec!["profile".into(), "backend_override".into()],
            basic_auth_enabled: false,
            basic_auth_user_attribute: String::new(),
            basic_auth_password_attribute: String::new(),
            assigned_application_slug: "grafana".into(),
            assigned_application_name: "Grafana".into(),
        }
    }

    #[test]
    fn fields_of_the_api_are_used() {
        let built = build(&provider(), &outpost(), &options(None)).unwrap();
        assert_eq!(built.slug, "grafana");
        assert_eq!(built.settings.meta.outpost, "nginx outpost");
        assert_eq!(built.settings.meta.provider, "Grafana provider");
        assert_eq!(built.settings.meta.app, "grafana");
        assert_eq!(built.settings.scopes, ["openid", "profile", "backend_override"]);
        assert_eq!(built.session_lifetime, Some(172800));
        assert_eq!(built.settings.issuer.as_str(), "http://10.0.0.5:9000/application/o/grafana/");
        assert!(built.settings.backchannel_host.is_none());
        // blank lines (and a CR) are skipped, not "match everything"
        assert!(built.unauth.exempts(b"/health", b"/health", None));
        assert!(built.unauth.exempts(b"/public/x", b"/public/x", None));
        assert!(!built.unauth.exempts(b"/private", b"/private", None));
    }

    #[test]
    fn browser_url_moves_browser_endpoints_and_the_issuer() {
        let built =
            build(&provider(), &outpost(), &options(Some("https://auth.example.com"))).unwrap();
        let d = &built.discovery;
        assert_eq!(d.issuer, "https://auth.example.com/application/o/grafana/");
        assert_eq!(d.authorization_endpoint, "https://auth.example.com/application/o/authorize/");
        assert_eq!(
            d.end_session_endpoint.as_deref(),
            Some("https://auth.example.com/application/o/grafana/end-session/")
        );
        assert_eq!(d.token_endpoint, "http://10.0.0.5:9000/application/o/token/");
        assert_eq!(
            built.settings.backchannel_host,
            Some(("auth.example.com".to_owned(), "https".to_owned()))
        );
    }

    #[test]
    fn global_issuer_mode_is_rewritten_too() {
        let mut p = provider();
        p.oidc_configuration.issuer = "http://10.0.0.5:9000/".into();
        let built = build(&p, &outpost(), &options(Some("http://auth.test:8000"))).unwrap();
        assert_eq!(built.settings.issuer.as_str(), "http://auth.test:8000/");
        assert_eq!(
            built.settings.backchannel_host,
            Some(("auth.test:8000".to_owned(), "http".to_owned()))
        );
    }

    #[test]
    fn bad_fields_name_the_provider() {
        let mut p = provider();
        p.mode = "forward_domain".into();
        let err = build(&p, &outpost(), &options(None)).unwrap_err();
        assert!(err.to_string().starts_with("provider \"Grafana provider\": "), "{err}");
        let mut p = provider();
        p.skip_path_regex = "(".into();
        assert!(build(&p, &outpost(), &options(None)).is_err());
        let mut p = provider();
        p.oidc_configuration.token_endpoint = "not a url".into();
        assert!(build(&p, &outpost(), &options(None)).is_err());
        let mut p = provider();
        p.mode = "forward_domain".into();
        p.cookie_domain = "example.com".into();
        assert!(build(&p, &outpost(), &options(None)).is_ok());
    }

    #[test]
    fn slug_falls_back_to_the_name_and_lifetime_to_none() {
        let mut p = provider();
        p.assigned_application_slug = String::new();
        p.access_token_validity = None;
        let built = build(&p, &outpost(), &options(None)).unwrap();
        assert_eq!(built.slug, "Grafana provider");
        assert_eq!(built.session_lifetime, None);
    }
}
