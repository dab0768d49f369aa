//! `authentik_require` rules: which authenticated users may pass a location.
//!
//! One directive is one [`Rule`]: a claim and the values it accepts, any of which is enough
//! (`authentik_require group admins ops;`). Every rule of a location must hold ([`Rules`]). A
//! claim holds a value when it is that string, that boolean (`true`/`false`), that number, or
//! an array with an element that is one of those. `group` and `entitlement` are the `groups`
//! and `entitlements` claims.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use serde_json::{Map, Value};

use crate::identity::field;
use crate::session::SessionView;

/// What a rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    Group,
    Entitlement,
    Claim,
}

/// One `authentik_require` directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub kind: RuleKind,
    /// The claim the rule reads (`groups` for `group`, `entitlements` for `entitlement`).
    pub claim: String,
    /// Any of these values is enough.
    pub accepted: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("unknown rule \"{0}\", expected \"group\", \"entitlement\" or \"claim\"")]
    UnknownKind(String),
    #[error("\"{0}\" needs at least one value")]
    NoValues(&'static str),
    #[error("\"claim\" needs a claim name and at least one value")]
    NoClaimValues,
    #[error("empty value")]
    EmptyValue,
}

impl Rule {
    /// The directive's arguments after its name: `group NAME...`, `entitlement NAME...` or
    /// `claim CLAIM VALUE...`.
    pub fn parse(args: &[&str]) -> Result<Rule, RuleError> {
        let Some((&kind, rest)) = args.split_first() else {
            return Err(RuleError::UnknownKind(String::new()));
        };
        let (kind, claim, values) = match kind {
            "group" => (RuleKind::Group, "groups", rest),
            "entitlement" => (RuleKind::Entitlement, "entitlements", rest),
            "claim" => match rest.split_first() {
                Some((claim, values)) if !values.is_empty() => (RuleKind::Claim, *claim, values),
                _ => return Err(RuleError::NoClaimValues),
            },
            other => return Err(RuleError::UnknownKind(other.to_string())),
        };
        if values.is_empty() {
            let name = if kind == RuleKind::Group { "group" } else { "entitlement" };
            return Err(RuleError::NoValues(name));
        }
        if claim.is_empty() || values.iter().any(|v| v.is_empty()) {
            return Err(RuleError::EmptyValue);
        }
        Ok(Rule {
            kind,
            claim: claim.to_string(),
            accepted: values.iter().map(|v| v.to_string()).collect(),
        })
    }

    /// Whether the subject's claim holds one of the accepted values.
    pub fn holds(&self, subject: &Subject) -> bool {
        let Some(value) = subject.claim(&self.claim) else {
            return false;
        };
        self.accepted.iter().any(|accepted| value_matches(&value, accepted))
    }
}

/// The directive as written, for log lines: `group admins ops`, `claim email_verified true`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RuleKind::Group => f.write_str("group")?,
            RuleKind::Entitlement => f.write_str("entitlement")?,
            RuleKind::Claim => write!(f, "claim {}", self.claim)?,
        }
        for value in &self.accepted {
            write!(f, " {value}")?;
        }
        Ok(())
    }
}

/// A location's rules: every one must hold. Empty: no rule, everyone authenticated passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(pub Vec<Rule>);

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first rule the subject does not satisfy; `None` when all hold.
    pub fn first_failing(&self, subject: &Subject) -> Option<&Rule> {
        self.0.iter().find(|rule| !rule.holds(subject))
    }
}

fn value_matches(value: &Value, accepted: &str) -> bool {
    match value {
        Value::Array(items) => {
            items.iter().any(|item| !item.is_array() && scalar_matches(item, accepted))
        }
        scalar => scalar_matches(scalar, accepted),
    }
}

fn scalar_matches(value: &Value, accepted: &str) -> bool {
    match value {
        Value::String(s) => s == accepted,
        Value::Bool(b) => accepted == if *b { "true" } else { "false" },
        Value::Number(n) => {
            n.to_string() == accepted
                || accepted.parse::<f64>().ok().zip(n.as_f64()).is_some_and(|(a, b)| a == b)
        }
        _ => false,
    }
}

/// How the request proved who it is; decides what a request that fails a rule gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// The session cookie of a browser login.
    BrowserSession,
    /// An `Authorization` header (Bearer or Basic), checked against the provider.
    HeaderAuth,
}

/// What a request that fails a rule is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A `403` page naming the user, with a link to sign out (a browser can switch users).
    Page,
    /// nginx's plain `403` (an API client has nothing to click).
    Plain,
}

impl Credential {
    pub fn denial(self) -> Denial {
        match self {
            Credential::BrowserSession => Denial::Page,
            Credential::HeaderAuth => Denial::Plain,
        }
    }
}

/// The claims of an authenticated request as rules read them. The claims JSON is parsed at
/// most once, and only when a rule needs a claim that is not an identity value.
pub struct Subject<'a> {
    session: &'a SessionView<'a>,
    claims: OnceCell<Option<Map<String, Value>>>,
}

/// Claims that `SessionRecord::compact` may move out of the claims JSON into identity values,
/// and whether the value is a `|`-joined list. `compact` keeps a list claim in the JSON when
/// an element contains `|`, so splitting the identity value is exact.
const IDENTITY_CLAIMS: [(&str, usize, bool); 6] = [
    ("preferred_username", field::USERNAME, false),
    ("groups", 1, true),
    ("entitlements", 2, true),
    ("email", 3, false),
    ("name", 4, false),
    ("sub", field::UID, false),
];

impl<'a> Subject<'a> {
    pub fn new(session: &'a SessionView<'a>) -> Subject<'a> {
        Subject { session, claims: OnceCell::new() }
    }

    /// Top-level claim `name`, or `None` when the user has none (or it is null).
    pub fn claim(&self, name: &str) -> Option<Cow<'_, Value>> {
        let identity = IDENTITY_CLAIMS.iter().find(|(claim, _, _)| *claim == name);
        // Fast path: an identity claim that the JSON cannot hold (its key is nowhere in it)
        // comes from the identity value without parsing anything.
        if let Some(&(_, index, list)) = identity {
            if !contains_key(self.session.claims_json, name) {
                return identity_value(self.session.values[index], list).map(Cow::Owned);
            }
        }
        if let Some(value) = self.claims().and_then(|claims| claims.get(name)) {
            return (!value.is_null()).then_some(Cow::Borrowed(value));
        }
        if name == "sid" {
            let sid = self.session.sid?;
            return Some(Cow::Owned(Value::String(String::from_utf8_lossy(sid).into_owned())));
        }
        let &(_, index, list) = identity?;
        identity_value(self.session.values[index], list).map(Cow::Owned)
    }

    fn claims(&self) -> Option<&Map<String, Value>> {
        self.claims.get_or_init(|| serde_json::from_slice(self.session.claims_json).ok()).as_ref()
    }
}

/// Whether `"name":` occurs in compact JSON. A JSON string's content never holds an unescaped
/// `"`, so outside of keys it cannot occur; a nested object's key is a false positive that
/// only costs a parse.
fn contains_key(json: &[u8], name: &str) -> bool {
    let needle = format!("\"{name}\":");
    json.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn identity_value(bytes: &[u8], list: bool) -> Option<Value> {
    if bytes.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(bytes);
    if !list {
        return Some(Value::String(text.into_owned()));
    }
    Some(Value::Array(text.split('|').map(|s| Value::String(s.to_string())).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::session::SessionRecord;
    use serde_json::json;

    fn record(claims: Value) -> Vec<u8> {
        let map = claims.as_object().unwrap().clone();
        let mut record = SessionRecord {
            sub: map.get("sub").and_then(Value::as_str).unwrap_or("sub-1").to_string(),
            sid: map.get("sid").and_then(Value::as_str).map(str::to_string),
            expires_at: 2_000_000_000,
            identity: Identity::from_claims(&map, "access"),
            id_token: String::new(),
            claims_json: claims.to_string(),
        };
        record.compact("client");
        record.encode()
    }

    fn rule(args: &[&str]) -> Rule {
        Rule::parse(args).unwrap()
    }

    fn check(claims: Value, args: &[&str]) -> bool {
        let bytes = record(claims);
        let view = SessionView::parse(&bytes).unwrap();
        rule(args).holds(&Subject::new(&view))
    }

    fn alice() -> Value {
        json!({
            "sub": "alice-sub",
            "sid": "sid-1",
            "preferred_username": "alice",
            "groups": ["admins", "users"],
            "entitlements": ["app-read", "app-write"],
            "email": "alice@example.test",
            "email_verified": true,
            "level": 3,
            "score": 2.5,
            "flags": [1, true, "x", ["nested"]],
            "nothing": null,
        })
    }

    #[test]
    fn group_rules_accept_any_listed_group() {
        assert!(check(alice(), &["group", "admins"]));
        assert!(check(alice(), &["group", "ops", "users"]));
        assert!(!check(alice(), &["group", "ops"]));
        // whole names only
        assert!(!check(alice(), &["group", "admin"]));
        assert!(!check(alice(), &["group", "admins|users"]));
        assert!(!check(json!({"sub": "s", "preferred_username": "carol"}), &["group", "admins"]));
    }

    #[test]
    fn entitlement_rules() {
        assert!(check(alice(), &["entitlement", "app-write"]));
        assert!(!check(alice(), &["entitlement", "app-admin"]));
        assert!(!check(alice(), &["entitlement", "admins"]));
    }

    #[test]
    fn claim_rules_match_strings_booleans_numbers_and_array_elements() {
        assert!(check(alice(), &["claim", "email_verified", "true"]));
        assert!(!check(alice(), &["claim", "email_verified", "false"]));
        assert!(check(alice(), &["claim", "email", "alice@example.test"]));
        assert!(check(alice(), &["claim", "preferred_username", "bob", "alice"]));
        assert!(check(alice(), &["claim", "sub", "alice-sub"]));
        assert!(check(alice(), &["claim", "sid", "sid-1"]));
        assert!(check(alice(), &["claim", "level", "3"]));
        assert!(check(alice(), &["claim", "level", "3.0"]));
        assert!(!check(alice(), &["claim", "level", "4"]));
        assert!(check(alice(), &["claim", "score", "2.5"]));
        assert!(check(alice(), &["claim", "flags", "1"]));
        assert!(check(alice(), &["claim", "flags", "true"]));
        assert!(check(alice(), &["claim", "flags", "x"]));
        // nested arrays are not searched, null and missing claims hold nothing
        assert!(!check(alice(), &["claim", "flags", "nested"]));
        assert!(!check(alice(), &["claim", "nothing", "null"]));
        assert!(!check(alice(), &["claim", "missing", "x"]));
        // a string "true" is not the boolean, and the other way round
        assert!(check(json!({"sub": "s", "v": "true"}), &["claim", "v", "true"]));
        assert!(!check(json!({"sub": "s", "v": "yes"}), &["claim", "v", "true"]));
    }

    #[test]
    fn group_names_with_the_separator_are_exact() {
        let claims = json!({"sub": "s", "groups": ["evil|admins", "users"]});
        assert!(!check(claims.clone(), &["group", "admins"]));
        assert!(!check(claims.clone(), &["group", "evil"]));
        assert!(check(claims.clone(), &["group", "evil|admins"]));
        assert!(check(claims, &["group", "users"]));
    }

    #[test]
    fn a_nested_key_of_the_same_name_does_not_hide_the_identity_value() {
        let claims = json!({"sub": "s", "groups": ["admins"], "ak_proxy": {"groups": ["x"]}});
        assert!(check(claims.clone(), &["group", "admins"]));
        assert!(!check(claims, &["group", "x"]));
    }

    #[test]
    fn every_rule_must_hold() {
        let bytes = record(alice());
        let view = SessionView::parse(&bytes).unwrap();
        let subject = Subject::new(&view);
        let both = Rules(vec![rule(&["group", "admins"]), rule(&["entitlement", "app-write"])]);
        assert_eq!(both.first_failing(&subject), None);
        let one_fails = Rules(vec![rule(&["group", "admins"]), rule(&["entitlement", "nope"])]);
        assert_eq!(
            one_fails.first_failing(&subject).map(ToString::to_string).as_deref(),
            Some("entitlement nope")
        );
        assert_eq!(Rules::default().first_failing(&subject), None);
    }

    #[test]
    fn parse_errors() {
        assert_eq!(Rule::parse(&["role", "x"]), Err(RuleError::UnknownKind("role".into())));
        assert_eq!(Rule::parse(&["group"]), Err(RuleError::NoValues("group")));
        assert_eq!(Rule::parse(&["entitlement"]), Err(RuleError::NoValues("entitlement")));
        assert_eq!(Rule::parse(&["claim", "email_verified"]), Err(RuleError::NoClaimValues));
        assert_eq!(Rule::parse(&["claim"]), Err(RuleError::NoClaimValues));
        assert_eq!(Rule::parse(&["group", ""]), Err(RuleError::EmptyValue));
        assert_eq!(
            rule(&["claim", "email_verified", "true"]).to_string(),
            "claim email_verified true"
        );
        assert_eq!(rule(&["group", "admins", "ops"]).to_string(), "group admins ops");
    }

    #[test]
    fn header_auth_gets_a_plain_403() {
        assert_eq!(Credential::BrowserSession.denial(), Denial::Page);
        assert_eq!(Credential::HeaderAuth.denial(), Denial::Plain);
    }
}
