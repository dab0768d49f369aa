//! authentik's outpost API as an outpost reads it: the outpost instance the token belongs to
//! (`/api/v3/outposts/instances/`) and its proxy providers (`/api/v3/outposts/proxy/`, 100 a
//! page until `pagination.next` is 0), with `Authorization: Bearer <token>`.
//!
//! The models keep the fields the module uses; unknown fields are ignored and authentik's
//! nullable strings read as empty, so a newer authentik with more fields still parses.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use ureq::Agent;
use url::Url;

use crate::oidc::client::{http_agent, USER_AGENT};
use crate::outpost::{OutpostError, OutpostOptions};

/// Providers asked for per page, as authentik's outpost does.
pub const PAGE_SIZE: usize = 100;
/// Pages read at most (100 000 providers); a server whose `next` never ends is cut there.
const MAX_PAGES: u64 = 1000;
/// Largest API answer read, bytes (a page of 100 providers is a few hundred KiB).
const MAX_BODY: u64 = 16 << 20;

/// The outpost this token belongs to (`results[0]` of the instances list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutpostInfo {
    /// A UUID: the websocket's path names it.
    pub pk: String,
    pub name: String,
    /// authentik's `config.refresh_interval` in seconds (0 when absent).
    #[serde(default, deserialize_with = "null_as_default")]
    pub refresh_interval_s: i64,
}

/// `oidc_configuration` of a proxy provider: its endpoints as authentik built them for the
/// host the API was called on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OidcConfiguration {
    #[serde(default, deserialize_with = "null_as_default")]
    pub issuer: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub authorization_endpoint: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub token_endpoint: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub userinfo_endpoint: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub end_session_endpoint: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub introspection_endpoint: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub jwks_uri: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub id_token_signing_alg_values_supported: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// One `ProxyOutpostConfig`: a proxy provider assigned to this outpost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyProvider {
    pub pk: i64,
    pub name: String,
    pub external_host: String,
    pub client_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub client_secret: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub oidc_configuration: OidcConfiguration,
    /// One regex per line.
    #[serde(default, deserialize_with = "null_as_default")]
    pub skip_path_regex: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub mode: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cookie_domain: String,
    /// Seconds (authentik serialises a float).
    #[serde(default)]
    pub access_token_validity: Option<f64>,
    #[serde(default = "yes", deserialize_with = "null_as_true")]
    pub intercept_header_auth: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub scopes_to_request: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub basic_auth_enabled: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub basic_auth_user_attribute: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub basic_auth_password_attribute: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub assigned_application_slug: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub assigned_application_name: String,
}

/// Everything one fetch read: what the module runs on until the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub outpost: OutpostInfo,
    pub providers: Vec<ProxyProvider>,
}

impl Snapshot {
    /// The snapshot as JSON (shared memory and `state_file` hold this).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// authentik's pagination envelope; `next` is a page number, 0 when there is none.
#[derive(Deserialize)]
struct Page<T> {
    pagination: Pagination,
    results: Vec<T>,
}

#[derive(Deserialize)]
struct Pagination {
    #[serde(default, deserialize_with = "null_as_default")]
    next: f64,
}

fn yes() -> bool {
    true
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn null_as_true<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

/// The API client of one outpost. Blocking: the background task's thread only.
pub struct OutpostApi {
    agent: Agent,
    /// `<url path>api/v3/`.
    api: Url,
    token: String,
}

impl OutpostApi {
    pub fn new(options: &OutpostOptions) -> Result<OutpostApi, OutpostError> {
        let agent = http_agent(options.timeout, options.ca_file.as_deref(), &user_agent())
            .map_err(|e| OutpostError::CaFile(e.to_string()))?;
        let api = options.url.join("api/v3/").map_err(|e| OutpostError::Invalid {
            url: options.url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(OutpostApi { agent, api, token: options.token.clone() })
    }

    /// The outpost and all its providers.
    pub fn fetch(&self) -> Result<Snapshot, OutpostError> {
        let outpost = self.fetch_outpost()?;
        let providers = self.fetch_providers()?;
        Ok(Snapshot { outpost, providers })
    }

    pub fn fetch_outpost(&self) -> Result<OutpostInfo, OutpostError> {
        let url = self.url("outposts/instances/", 1);
        let page: Page<OutpostInfo> = self.get(&url)?;
        page.results.into_iter().next().ok_or(OutpostError::NoOutpost)
    }

    pub fn fetch_providers(&self) -> Result<Vec<ProxyProvider>, OutpostError> {
        let mut providers = Vec::new();
        let mut page_number = 1;
        loop {
            let url = self.url("outposts/proxy/", page_number);
            let page: Page<ProxyProvider> = self.get(&url)?;
            providers.extend(page.results);
            let next = page.pagination.next;
            // Only a later page goes on: a server that sends `next` <= this page would loop.
            if next < 1.0 || next <= page_number as f64 {
                return Ok(providers);
            }
            if next as u64 > MAX_PAGES {
                return Err(OutpostError::Invalid { url, reason: "too many pages".to_owned() });
            }
            page_number = next as u64;
        }
    }

    fn url(&self, path: &str, page: u64) -> String {
        format!("{}{path}?page={page}&page_size={PAGE_SIZE}", self.api)
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, url: &str) -> Result<T, OutpostError> {
        let unreachable = |e: ureq::Error| OutpostError::Unreachable {
            url: url.to_owned(),
            reason: e.to_string(),
        };
        let mut response = self
            .agent
            .get(url)
            .header("Accept", "application/json")
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = match response.body_mut().with_config().limit(MAX_BODY).read_to_vec() {
            Ok(body) => body,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                let reason = format!("body larger than {MAX_BODY} bytes");
                return Err(OutpostError::Invalid { url: url.to_owned(), reason });
            }
            Err(e) => return Err(unreachable(e)),
        };
        match status {
            200 => serde_json::from_slice(&body)
                .map_err(|e| OutpostError::Invalid { url: url.to_owned(), reason: e.to_string() }),
            401 | 403 => Err(OutpostError::Rejected { url: url.to_owned(), status }),
            _ => Err(OutpostError::Status { url: url.to_owned(), status }),
        }
    }
}

/// What the module tells authentik it is: authentik's form, with the module's version.
pub fn user_agent() -> String {
    format!("goauthentik.io/outpost/{} ({USER_AGENT})", env!("CARGO_PKG_VERSION"))
}

/// The refresh interval authentik asks for, as its outpost reads it: values <= 0 mean 5 minutes
/// and values under 30 s are raised to 30 s.
pub fn refresh_interval(refresh_interval_s: i64) -> Duration {
    match refresh_interval_s {
        s if s <= 0 => Duration::from_secs(300),
        s => Duration::from_secs(s.max(30) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_parses_with_nulls_and_unknown_fields() {
        let json = serde_json::json!({
            "pk": 3, "name": "Grafana", "external_host": "https://grafana.example.com",
            "client_id": "id", "client_secret": "secret", "oidc_configuration": null,
            "skip_path_regex": null, "mode": "proxy", "cookie_domain": null,
            "access_token_validity": 86400.0, "intercept_header_auth": null,
            "scopes_to_request": ["openid"], "basic_auth_enabled": null,
            "assigned_application_slug": "grafana", "new_field": {"x": 1}
        });
        let p: ProxyProvider = serde_json::from_value(json).unwrap();
        assert_eq!(p.skip_path_regex, "");
        assert!(p.intercept_header_auth);
        assert!(!p.basic_auth_enabled);
        assert_eq!(p.access_token_validity, Some(86400.0));
        assert_eq!(p.assigned_application_slug, "grafana");
    }

    #[test]
    fn snapshot_round_trips() {
        let s = Snapshot {
            outpost: OutpostInfo { pk: "u".into(), name: "o".into(), refresh_interval_s: 60 },
            providers: vec![],
        };
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        assert!(Snapshot::decode(b"{").is_err());
    }

    #[test]
    fn refresh_interval_follows_authentik() {
        assert_eq!(refresh_interval(0), Duration::from_secs(300));
        assert_eq!(refresh_interval(-5), Duration::from_secs(300));
        assert_eq!(refresh_interval(10), Duration::from_secs(30));
        assert_eq!(refresh_interval(600), Duration::from_secs(600));
    }
}
