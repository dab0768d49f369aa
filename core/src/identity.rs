//! authentik's identity headers: which names, what values, and which client headers to remove.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::config::BasicAuthAttributes;

/// Where an identity header's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A claim, as text.
    Claim(&'static str),
    /// A claim holding a list, joined with `|`.
    List(&'static str),
    /// The access token.
    AccessToken,
}

/// One identity header: its name, its lowercase form, the nginx variable that reads it, and
/// where its value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityField {
    pub header: &'static str,
    pub lowercase: &'static str,
    pub variable: &'static str,
    pub source: Source,
}

/// Indices into [`IDENTITY_FIELDS`] and [`Identity::values`].
pub mod field {
    pub const USERNAME: usize = 0;
    pub const UID: usize = 5;
    pub const JWT: usize = 6;
}

/// The one table of the user-specific headers, in a fixed order; `Identity` stores values in
/// this order, the glue sets headers and variables from it.
pub const IDENTITY_FIELDS: [IdentityField; 7] = [
    IdentityField {
        header: "X-authentik-username",
        lowercase: "x-authentik-username",
        variable: "authentik_username",
        source: Source::Claim("preferred_username"),
    },
    IdentityField {
        header: "X-authentik-groups",
        lowercase: "x-authentik-groups",
        variable: "authentik_groups",
        source: Source::List("groups"),
    },
    IdentityField {
        header: "X-authentik-entitlements",
        lowercase: "x-authentik-entitlements",
        variable: "authentik_entitlements",
        source: Source::List("entitlements"),
    },
    IdentityField {
        header: "X-authentik-email",
        lowercase: "x-authentik-email",
        variable: "authentik_email",
        source: Source::Claim("email"),
    },
    IdentityField {
        header: "X-authentik-name",
        lowercase: "x-authentik-name",
        variable: "authentik_name",
        source: Source::Claim("name"),
    },
    IdentityField {
        header: "X-authentik-uid",
        lowercase: "x-authentik-uid",
        variable: "authentik_uid",
        source: Source::Claim("sub"),
    },
    IdentityField {
        header: "X-authentik-jwt",
        lowercase: "x-authentik-jwt",
        variable: "authentik_jwt",
        source: Source::AccessToken,
    },
];

/// Values of one user's identity headers, plus `additionalHeaders`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// Same order as [`IDENTITY_FIELDS`]; missing claims give "".
    pub values: [String; 7],
    /// `ak_proxy.user_attributes.additionalHeaders` (name, value), in claim order; names that are
    /// not valid HTTP tokens, and values with CR/LF/NUL, are dropped. Strings as-is, integers
    /// in decimal, null as "", other JSON values as compact JSON (like authentik's Rust outpost).
    pub additional: Vec<(String, String)>,
}

impl Identity {
    /// username = preferred_username, groups/entitlements joined with `|`, email, name,
    /// uid = sub, jwt = the access token. CR/LF/NUL are removed from every value.
    pub fn from_claims(claims: &Map<String, Value>, access_token: &str) -> Identity {
        let values = IDENTITY_FIELDS.map(|field| {
            let value = match field.source {
                Source::Claim(name) => claims.get(name).map(scalar_text).unwrap_or_default(),
                Source::List(name) => claims.get(name).map(joined_list).unwrap_or_default(),
                Source::AccessToken => access_token.to_owned(),
            };
            strip_control(&value)
        });
        Identity { values, additional: additional_headers(claims) }
    }
    pub fn username(&self) -> &str {
        &self.values[field::USERNAME]
    }

    /// Adds `X-authentik-meta-jwks` (the provider's `jwks_uri`, empty without one), kept with
    /// the session like the other values so that every worker sends it, whatever its own
    /// discovery cache holds; an additionalHeaders entry of that name wins.
    pub fn add_meta_jwks(&mut self, jwks_uri: Option<&str>) {
        if self
            .additional
            .iter()
            .any(|(name, _)| header_names_equal(name.as_bytes(), META_JWKS.as_bytes()))
        {
            return;
        }
        self.additional.push((META_JWKS.to_owned(), strip_control(jwks_uri.unwrap_or_default())));
    }

    /// Adds the upstream's `Authorization: Basic` from the user's attributes (authentik's
    /// `basic_auth_*`): the password attribute (nothing when it is missing, empty or not a
    /// string), the user attribute, else the email. An `Authorization` from additionalHeaders
    /// wins, as in authentik, where those are applied last.
    pub fn add_basic_auth(
        &mut self,
        claims: &Map<String, Value>,
        attributes: &BasicAuthAttributes,
    ) {
        let user_attributes = claims.get("ak_proxy").and_then(|p| p.get("user_attributes"));
        let attribute = |name: &str| {
            user_attributes.and_then(|a| a.get(name)).and_then(Value::as_str).map(strip_control)
        };
        let Some(password) = attribute(&attributes.password_attribute).filter(|p| !p.is_empty())
        else {
            return;
        };
        let user = attribute(&attributes.user_attribute)
            .or_else(|| claims.get("email").and_then(Value::as_str).map(strip_control))
            .unwrap_or_default();
        if self.additional.iter().any(|(name, _)| name.eq_ignore_ascii_case("authorization")) {
            return;
        }
        let credentials = STANDARD.encode(format!("{user}:{password}"));
        self.additional.push(("Authorization".to_owned(), format!("Basic {credentials}")));
    }
}

/// The header that names the provider's keys (see [`Identity::add_meta_jwks`]).
pub const META_JWKS: &str = "X-authentik-meta-jwks";

/// `ak_proxy.backend_override` and `ak_proxy.host_header` (set by custom scope mappings, fixed
/// at login) as `$authentik_backend` and `$authentik_host_header` read them.
pub const BACKEND_OVERRIDE: &str = "/ak_proxy/backend_override";
pub const HOST_HEADER: &str = "/ak_proxy/host_header";

/// Checks the login's `ak_proxy.backend_override` (an absolute http(s) URL) and `host_header`
/// (a host, optionally with a port): a value that is not is removed from the claims, with a
/// message saying why. Returns the claims to store when something was removed.
pub fn check_proxy_overrides(claims_json: &str) -> (Option<String>, Vec<String>) {
    let Ok(Value::Object(mut claims)) = serde_json::from_str::<Value>(claims_json) else {
        return (None, Vec::new());
    };
    let Some(Value::Object(proxy)) = claims.get_mut("ak_proxy") else {
        return (None, Vec::new());
    };
    let mut warnings = Vec::new();
    if let Some(value) = proxy.get("backend_override") {
        let ok = value.as_str().is_some_and(|s| {
            url::Url::parse(s).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some_and(|h| !h.is_empty())
            }) && !s.contains(|c: char| c.is_whitespace() || c.is_control())
        });
        if !ok {
            warnings.push(format!(
                "ak_proxy.backend_override {value} is not an http or https URL, ignored"
            ));
            proxy.remove("backend_override");
        }
    }
    if let Some(value) = proxy.get("host_header") {
        let ok = value.as_str().is_some_and(|s| {
            !s.is_empty()
                && s.len() <= 255
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
        });
        if !ok {
            warnings.push(format!("ak_proxy.host_header {value} is not a host name, ignored"));
            proxy.remove("host_header");
        }
    }
    if warnings.is_empty() {
        return (None, warnings);
    }
    (Some(Value::Object(claims).to_string()), warnings)
}

/// The string at `pointer` in `claims_json`, if any.
pub fn claim_at(claims_json: &[u8], pointer: &str) -> Option<String> {
    let claims: Value = serde_json::from_slice(claims_json).ok()?;
    claims.pointer(pointer)?.as_str().map(strip_control)
}

/// `true` when a client-sent header name must be removed before the upstream sees the request:
/// any name that, lowercased and with `_` read as `-`, starts with `x-authentik-`, or equals one
/// of `extra` (already lowercased, e.g. the additionalHeaders names or `x-forwarded-host`).
pub fn is_forged_identity_header(name: &[u8], extra: &[&str]) -> bool {
    const PREFIX: &[u8] = b"x-authentik-";
    let starts_with_prefix =
        name.len() >= PREFIX.len() && header_names_equal(&name[..PREFIX.len()], PREFIX);
    starts_with_prefix || extra.iter().any(|e| header_names_equal(name, e.as_bytes()))
}

/// Case-insensitive comparison of two header names, reading `_` as `-` (nginx passes
/// `underscores_in_headers` names through, and many upstreams treat both alike).
pub fn header_names_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| fold_name_byte(x) == fold_name_byte(y))
}

fn fold_name_byte(byte: u8) -> u8 {
    match byte {
        b'_' => b'-',
        other => other.to_ascii_lowercase(),
    }
}

/// `value` without CR, LF and NUL: the bytes that would split or cut a header.
pub(crate) fn strip_control(value: &str) -> String {
    value.chars().filter(|c| !matches!(c, '\r' | '\n' | '\0')).collect()
}

fn has_control(value: &str) -> bool {
    value.contains(['\r', '\n', '\0'])
}

/// Strings as-is, numbers and booleans in JSON form, anything else "".
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// An array's string items joined with `|` (other items skipped); a plain string as is.
fn joined_list(value: &Value) -> String {
    match value {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("|"),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

/// `ak_proxy.user_attributes.additionalHeaders`, keeping valid names and safe values.
fn additional_headers(claims: &Map<String, Value>) -> Vec<(String, String)> {
    let headers = claims
        .get("ak_proxy")
        .and_then(|p| p.get("user_attributes"))
        .and_then(|a| a.get("additionalHeaders"))
        .and_then(Value::as_object);
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .filter(|(name, _)| is_token(name))
        .map(|(name, value)| (name.clone(), additional_header_value(value)))
        .filter(|(_, value)| !has_control(value))
        .collect()
}

/// Like authentik's Rust outpost: strings as-is, integers in decimal, null as "", other values
/// as compact JSON.
fn additional_header_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// RFC 7230 `token`: one or more tchar.
pub fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(is_tchar)
}

fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod proxy_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn basic_auth_comes_from_attributes() {
        let claims = json!({"email": "a@example.test", "ak_proxy": {"user_attributes": {
            "pw": "s3cret", "login": "alice-login", "n": 5}}});
        let claims = claims.as_object().unwrap();
        let attrs = |u: &str, p: &str| BasicAuthAttributes {
            user_attribute: u.into(),
            password_attribute: p.into(),
        };
        let mut id = Identity::default();
        id.add_basic_auth(claims, &attrs("login", "pw"));
        assert_eq!(
            id.additional,
            [(
                "Authorization".to_owned(),
                format!("Basic {}", STANDARD.encode("alice-login:s3cret"))
            )]
        );
        let mut id = Identity::default();
        id.add_basic_auth(claims, &attrs("n", "pw")); // not a string: the email
        assert_eq!(
            id.additional[0].1,
            format!("Basic {}", STANDARD.encode("a@example.test:s3cret"))
        );
        let mut id = Identity::default();
        id.add_basic_auth(claims, &attrs("login", "missing"));
        assert!(id.additional.is_empty());
        let mut id = Identity {
            additional: vec![("authorization".into(), "x".into())],
            ..Identity::default()
        };
        id.add_basic_auth(claims, &attrs("login", "pw"));
        assert_eq!(id.additional.len(), 1);
    }

    #[test]
    fn proxy_overrides_are_checked() {
        let good = r#"{"ak_proxy":{"backend_override":"http://10.0.0.1:8080","host_header":"app.internal:8080"}}"#;
        assert_eq!(check_proxy_overrides(good), (None, vec![]));
        assert_eq!(
            claim_at(good.as_bytes(), BACKEND_OVERRIDE).as_deref(),
            Some("http://10.0.0.1:8080")
        );
        assert_eq!(claim_at(good.as_bytes(), HOST_HEADER).as_deref(), Some("app.internal:8080"));
        let bad =
            r#"{"ak_proxy":{"backend_override":"file:///etc/passwd","host_header":"a b"},"x":1}"#;
        let (fixed, warnings) = check_proxy_overrides(bad);
        assert_eq!(warnings.len(), 2);
        let fixed = fixed.unwrap();
        assert_eq!(claim_at(fixed.as_bytes(), BACKEND_OVERRIDE), None);
        assert_eq!(claim_at(fixed.as_bytes(), HOST_HEADER), None);
        assert!(fixed.contains("\"x\":1"));
        let (_, w) = check_proxy_overrides(r#"{"ak_proxy":{"backend_override":42}}"#);
        assert_eq!(w.len(), 1);
        assert_eq!(check_proxy_overrides("{}"), (None, vec![]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_table_is_consistent() {
        for f in IDENTITY_FIELDS {
            assert_eq!(f.header.to_ascii_lowercase(), f.lowercase);
            assert!(is_forged_identity_header(f.header.as_bytes(), &[]));
            assert_eq!(f.variable, f.lowercase.replace("x-authentik-", "authentik_"));
        }
        assert_eq!(IDENTITY_FIELDS[field::USERNAME].variable, "authentik_username");
        assert_eq!(IDENTITY_FIELDS[field::UID].source, Source::Claim("sub"));
        assert_eq!(IDENTITY_FIELDS[field::JWT].source, Source::AccessToken);
    }
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().expect("test claims are an object").clone()
    }

    #[test]
    fn from_claims_fills_every_header_in_order() {
        let claims = claims(json!({
            "sub": "abc123",
            "preferred_username": "akadmin",
            "groups": ["admins", 7, "users", null],
            "entitlements": "single",
            "email": "root@example.com",
            "name": "Admin\r\nX-Evil: 1\0",
        }));
        let identity = Identity::from_claims(&claims, "access.token");
        assert_eq!(
            identity.values,
            [
                "akadmin",
                "admins|users",
                "single",
                "root@example.com",
                "AdminX-Evil: 1",
                "abc123",
                "access.token",
            ]
            .map(String::from)
        );
        assert_eq!(identity.username(), "akadmin");
        assert!(identity.additional.is_empty());
    }

    #[test]
    fn missing_claims_give_empty_values() {
        let identity = Identity::from_claims(&Map::new(), "tok\n");
        assert_eq!(identity.values[..6], ["", "", "", "", "", ""].map(String::from));
        assert_eq!(identity.values[6], "tok");
    }

    #[test]
    fn additional_headers_keep_order_and_drop_unsafe_entries() {
        let claims = claims(json!({
            "ak_proxy": {"user_attributes": {"additionalHeaders": {
                "Zeta": "last-name-first",
                "X-Number": 42,
                "X-Null": null,
                "X-Bool": true,
                "X-Object": {"a": [1, "b"]},
                "Bad Name": "space",
                "Bad:Name": "colon",
                "": "empty",
                "X-Split": "a\r\nInjected: 1",
                "X-Nul": "a\0b",
                "X-Float": 1.5,
            }}}
        }));
        let identity = Identity::from_claims(&claims, "");
        let expected = [
            ("Zeta", "last-name-first"),
            ("X-Number", "42"),
            ("X-Null", ""),
            ("X-Bool", "true"),
            ("X-Object", r#"{"a":[1,"b"]}"#),
            ("X-Float", "1.5"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()));
        assert_eq!(identity.additional, expected);
    }

    #[test]
    fn additional_headers_must_be_an_object() {
        let claims = claims(json!({"ak_proxy": {"user_attributes": {"additionalHeaders": ["x"]}}}));
        assert!(Identity::from_claims(&claims, "").additional.is_empty());
        let claims = claims_without_proxy();
        assert!(Identity::from_claims(&claims, "").additional.is_empty());
    }

    fn claims_without_proxy() -> Map<String, Value> {
        claims(json!({"ak_proxy": "nope"}))
    }

    #[test]
    fn forged_headers_are_recognised() {
        assert!(is_forged_identity_header(b"X-authentik-username", &[]));
        assert!(is_forged_identity_header(b"x-AUTHENTIK-anything", &[]));
        assert!(is_forged_identity_header(b"X_Authentik_Groups", &[]));
        assert!(is_forged_identity_header(b"x-authentik-", &[]));
        assert!(!is_forged_identity_header(b"x-authentik", &[]));
        assert!(!is_forged_identity_header(b"X-Authentication", &[]));
        assert!(!is_forged_identity_header(b"", &[]));
        let extra = ["x-forwarded-host", "x-team"];
        assert!(is_forged_identity_header(b"X-Forwarded-Host", &extra));
        assert!(is_forged_identity_header(b"x_forwarded_host", &extra));
        assert!(is_forged_identity_header(b"X-TEAM", &extra));
        assert!(!is_forged_identity_header(b"X-Team2", &extra));
        assert!(!is_forged_identity_header(b"X-Forwarded-For", &extra));
    }

    #[test]
    fn tokens_follow_rfc7230() {
        assert!(is_token("X-Custom_Header.1~"));
        assert!(!is_token(""));
        assert!(!is_token("a b"));
        assert!(!is_token("a:b"));
        assert!(!is_token("é"));
        assert!(!is_token("a\tb"));
    }
}
