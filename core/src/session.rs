//! Session ids and the session record kept in nginx shared memory.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::identity::Identity;
use crate::wire::{self, Reader, WireError};
use crate::UnixTime;

/// Version byte of the current [`SessionRecord`] encoding.
const RECORD_VERSION: u8 = 1;
/// Length of a session id's cookie value (32 bytes in base64url without padding).
const COOKIE_VALUE_LEN: usize = 43;

/// A 256-bit random session id from the OS CSPRNG; a fresh one at every login.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 32]);

impl SessionId {
    pub fn generate() -> SessionId {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random number generator works");
        SessionId(bytes)
    }
    /// base64url without padding: 43 characters. This is the cookie value.
    pub fn to_cookie_value(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
    /// Strict inverse of `to_cookie_value`; anything else (length, alphabet) is `None`.
    pub fn from_cookie_value(value: &[u8]) -> Option<SessionId> {
        if value.len() != COOKIE_VALUE_LEN {
            return None;
        }
        let mut bytes = [0u8; 32];
        // The engine rejects padding, other alphabets and non-zero trailing bits: one value per id.
        let written = URL_SAFE_NO_PAD.decode_slice(value, &mut bytes).ok()?;
        (written == bytes.len()).then_some(SessionId(bytes))
    }
    /// First 8 bytes as a little-endian u64: the key of the session index in shared memory.
    pub fn key(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

impl core::fmt::Debug for SessionId {
    /// Never prints the id itself (it is a credential): only its first 4 hex characters.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SessionId({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// Everything a session needs on the hot path, computed once at login.
/// Encoded into a compact byte string stored in shared memory (`encode`/`decode`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    /// `sub` claim: sign_out removes every session with the same `sub`.
    pub sub: String,
    /// `sid` claim if any (back-channel logout correlates on it).
    pub sid: Option<String>,
    /// When the session ends: min(token exp, login time + zone timeout).
    pub expires_at: UnixTime,
    /// Identity header values, in the order of [`crate::identity::IDENTITY_FIELDS`]
    /// (username, groups, entitlements, email, name, uid, jwt).
    pub identity: crate::identity::Identity,
    /// id_token, for `id_token_hint` at sign_out.
    pub id_token: String,
    /// All top-level claims (id_token merged with userinfo) as a JSON object, for
    /// `$authentik_claim_<name>`.
    pub claims_json: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("truncated session record")]
    Truncated,
    #[error("unsupported session record version {0}")]
    Version(u8),
    #[error("invalid utf-8 in session record")]
    Utf8,
}

impl From<WireError> for RecordError {
    fn from(error: WireError) -> RecordError {
        match error {
            WireError::Truncated => RecordError::Truncated,
            WireError::Utf8 => RecordError::Utf8,
        }
    }
}

impl SessionRecord {
    /// Versioned, length-prefixed binary encoding.
    ///
    /// Layout (integers little-endian, strings as a u32 length then UTF-8 bytes):
    /// version `1`, `expires_at` i64, `sub`, sid flag u8 (0/1) [+ `sid`], the 7 identity values,
    /// additional header count u32 + (name, value) pairs, `id_token`, `claims_json`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        wire::put_u8(&mut out, RECORD_VERSION);
        wire::put_i64(&mut out, self.expires_at);
        // `sub` is also the `X-authentik-uid` value: stored once.
        wire::put_str(&mut out, if self.sub == self.identity.values[5] { "" } else { &self.sub });
        match &self.sid {
            Some(sid) => {
                wire::put_u8(&mut out, 1);
                wire::put_str(&mut out, sid);
            }
            None => wire::put_u8(&mut out, 0),
        }
        for value in &self.identity.values {
            wire::put_str(&mut out, value);
        }
        wire::put_len(&mut out, self.identity.additional.len());
        for (name, value) in &self.identity.additional {
            wire::put_str(&mut out, name);
            wire::put_str(&mut out, value);
        }
        wire::put_str(&mut out, &self.id_token);
        wire::put_str(&mut out, &self.claims_json);
        out
    }

    fn encoded_len(&self) -> usize {
        let sid = self.sid.as_deref().map_or(0, wire::str_size);
        let identity: usize = self.identity.values.iter().map(|v| wire::str_size(v)).sum();
        let additional: usize = self
            .identity
            .additional
            .iter()
            .map(|(n, v)| wire::str_size(n) + wire::str_size(v))
            .sum();
        1 + 8
            + wire::str_size(if self.sub == self.identity.values[5] { "" } else { &self.sub })
            + 1
            + sid
            + identity
            + 4
            + additional
            + wire::str_size(&self.id_token)
            + wire::str_size(&self.claims_json)
    }

    /// Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, RecordError> {
        let mut reader = Reader::new(bytes);
        let (expires_at, sub) = read_header(&mut reader)?;
        let sid = match reader.u8()? {
            0 => None,
            // Any other flag is a corrupt record; it can only come from a cut-off or foreign write.
            1 => Some(reader.str()?.to_owned()),
            _ => return Err(RecordError::Truncated),
        };
        let mut identity = Identity::default();
        for value in &mut identity.values {
            *value = reader.str()?.to_owned();
        }
        let count = usize::try_from(reader.u32()?).map_err(|_| RecordError::Truncated)?;
        // Each pair takes at least 8 bytes: never trust the count for the allocation.
        identity.additional = Vec::with_capacity(count.min(reader.remaining() / 8));
        for _ in 0..count {
            let name = reader.str()?.to_owned();
            let value = reader.str()?.to_owned();
            identity.additional.push((name, value));
        }
        let id_token = reader.str()?.to_owned();
        let claims_json = reader.str()?.to_owned();
        if !reader.is_empty() {
            // Bytes after the last field: the record's length does not match its content.
            return Err(RecordError::Truncated);
        }
        let sub = if sub.is_empty() { identity.values[5].clone() } else { sub.to_owned() };
        Ok(SessionRecord { sub, sid, expires_at, identity, id_token, claims_json })
    }

    /// The record's `sub`, read in place without allocating (used under the zone lock); `None`
    /// for a record this version cannot read.
    pub fn peek_sub(bytes: &[u8]) -> Option<&str> {
        let view = SessionView::parse(bytes)?;
        core::str::from_utf8(view.sub).ok()
    }

    /// The record's `sid`, read in place without allocating (back-channel logout).
    pub fn peek_sid(bytes: &[u8]) -> Option<&[u8]> {
        SessionView::parse(bytes)?.sid
    }

    /// Value of top-level claim `name` as a header-safe string: strings as-is, numbers and
    /// booleans in JSON form, arrays of strings joined with `|`, other values as compact JSON,
    /// null/absent as `None`.
    pub fn claim(&self, name: &str) -> Option<String> {
        let values = self.identity.values.each_ref().map(|v| v.as_bytes());
        claim_of(self.claims_json.as_bytes(), &values, self.sid.as_deref().map(str::as_bytes), name)
    }

    /// What sign-out sends as `id_token_hint`: the id_token, or the access token when the
    /// id_token was not kept (see [`SessionRecord::compact`]).
    pub fn logout_hint(&self) -> &str {
        if self.id_token.is_empty() {
            &self.identity.values[6]
        } else {
            &self.id_token
        }
    }

    /// Shrinks the record before it goes to shared memory, without losing anything the module
    /// reads back:
    /// - claims whose header value already holds them exactly (`preferred_username`, `groups`,
    ///   `entitlements`, `email`, `name`, `sub`) are dropped from `claims_json`;
    ///   [`SessionRecord::claim`] answers them from the identity values (a `groups` or
    ///   `entitlements` value with a `|` inside is kept, so rules read the exact list);
    /// - `sid` is kept only in the record's own field, and the login's `nonce` and `at_hash`
    ///   (already checked) are dropped;
    /// - the id_token is dropped when the access token can stand in for it as `id_token_hint`:
    ///   a JWT for this client (`aud`) with the id_token's `iss` and `sub`, as authentik issues
    ///   (authentik's own outpost sends the access token as the hint).
    pub fn compact(&mut self, client_id: &str) {
        if let Ok(Value::Object(mut claims)) = serde_json::from_str::<Value>(&self.claims_json) {
            for (key, index) in DEDUPLICATED_CLAIMS {
                let same = claims
                    .get(key)
                    .and_then(render_claim)
                    .is_some_and(|text| text == self.identity.values[index] && !text.is_empty());
                // A list with `|` inside an element cannot be read back from the joined value
                // exactly (`authentik_require group` splits it): it stays.
                let ambiguous = (index == 1 || index == 2)
                    && claims.get(key).is_some_and(|v| v.to_string().contains('|'));
                if same && !ambiguous {
                    claims.remove(key);
                }
            }
            // Kept once, in the record's own field (a non-string `sid` claim, which the record
            // cannot hold, stays: fuzz/ found it dropped when the record had no sid).
            if self.sid.is_some()
                && claims.get("sid").and_then(Value::as_str) == self.sid.as_deref()
            {
                claims.remove("sid");
            }
            // Single-use values of the login itself, checked already; never identity.
            claims.remove("nonce");
            claims.remove("at_hash");
            self.claims_json = Value::Object(claims).to_string();
        }
        if access_token_is_id_hint(&self.identity.values[6], &self.id_token, client_id) {
            self.id_token.clear();
        }
    }
}

/// Claims that [`SessionRecord::compact`] may drop, with the identity value that holds them.
const DEDUPLICATED_CLAIMS: [(&str, usize); 6] = [
    ("preferred_username", 0),
    ("groups", 1),
    ("entitlements", 2),
    ("email", 3),
    ("name", 4),
    ("sub", 5),
];

/// A claim as a header-safe string (see [`SessionRecord::claim`]); `None` for null.
fn render_claim(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Array(items) => match strings_of(items) {
            Some(strings) => strings.join("|"),
            None => Value::Array(items.clone()).to_string(),
        },
        other => other.to_string(),
    };
    Some(crate::identity::strip_control(&text))
}

/// Claim `name` from a record's claims JSON, or from the identity values for the claims
/// `compact` dropped. Identity values come from those same claims (`Identity::from_claims`), so
/// a non-empty value means the claim existed with exactly that rendering.
fn claim_of(
    claims_json: &[u8],
    values: &[&[u8]; 7],
    sid: Option<&[u8]>,
    name: &str,
) -> Option<String> {
    let claims: Map<String, Value> = serde_json::from_slice(claims_json).ok()?;
    if let Some(value) = claims.get(name) {
        return render_claim(value);
    }
    // Header-safe like `render_claim`: `sid` comes from the id_token as it is (fuzz/ found a
    // CR/LF `sid` answered raw once `compact` had moved it out of the claims).
    let text = |bytes: &[u8]| crate::identity::strip_control(&String::from_utf8_lossy(bytes));
    if name == "sid" {
        return sid.map(text);
    }
    let (_, index) = DEDUPLICATED_CLAIMS.iter().find(|(key, _)| *key == name)?;
    let value = values[*index];
    (!value.is_empty()).then(|| text(value))
}

/// The payload of a compact JWT as JSON, without verifying anything.
fn jwt_payload(token: &str) -> Option<Map<String, Value>> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn access_token_is_id_hint(access_token: &str, id_token: &str, client_id: &str) -> bool {
    let (Some(access), Some(id)) = (jwt_payload(access_token), jwt_payload(id_token)) else {
        return false;
    };
    let same = |key: &str| access.get(key).is_some() && access.get(key) == id.get(key);
    let for_client = match access.get("aud") {
        Some(Value::String(aud)) => aud == client_id,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    same("iss") && same("sub") && for_client
}

/// A zero-copy view of an encoded record for the per-request path: no allocation and no
/// UTF-8 check (records in shared memory are only ever written by [`SessionRecord::encode`]).
#[derive(Debug, Clone, Copy)]
pub struct SessionView<'a> {
    pub expires_at: UnixTime,
    pub sub: &'a [u8],
    pub sid: Option<&'a [u8]>,
    /// Identity header values, in the order of [`crate::identity::IDENTITY_FIELDS`].
    pub values: [&'a [u8]; 7],
    additional: &'a [u8],
    additional_count: u32,
    pub id_token: &'a [u8],
    pub claims_json: &'a [u8],
}

impl<'a> SessionView<'a> {
    /// Never panics on any input.
    pub fn parse(bytes: &'a [u8]) -> Option<SessionView<'a>> {
        let mut reader = Reader::new(bytes);
        if reader.u8().ok()? != RECORD_VERSION {
            return None;
        }
        let expires_at = reader.i64().ok()?;
        let sub = reader.bytes().ok()?;
        let sid = match reader.u8().ok()? {
            0 => None,
            1 => Some(reader.bytes().ok()?),
            _ => return None,
        };
        let mut values: [&[u8]; 7] = [&[]; 7];
        for value in &mut values {
            *value = reader.bytes().ok()?;
        }
        let additional_count = reader.u32().ok()?;
        let start = bytes.len() - reader.remaining();
        for _ in 0..additional_count {
            reader.bytes().ok()?;
            reader.bytes().ok()?;
        }
        let additional = &bytes[start..bytes.len() - reader.remaining()];
        let id_token = reader.bytes().ok()?;
        let claims_json = reader.bytes().ok()?;
        let sub = if sub.is_empty() { values[5] } else { sub };
        reader.is_empty().then_some(SessionView {
            expires_at,
            sub,
            sid,
            values,
            additional,
            additional_count,
            id_token,
            claims_json,
        })
    }

    /// `additionalHeaders` (name, value) pairs.
    pub fn additional(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let mut reader = Reader::new(self.additional);
        (0..self.additional_count)
            .map_while(move |_| Some((reader.bytes().ok()?, reader.bytes().ok()?)))
    }

    /// Same as [`SessionRecord::claim`].
    pub fn claim(&self, name: &str) -> Option<String> {
        claim_of(self.claims_json, &self.values, self.sid, name)
    }

    /// Same as [`SessionRecord::logout_hint`].
    pub fn logout_hint(&self) -> &'a [u8] {
        if self.id_token.is_empty() {
            self.values[6]
        } else {
            self.id_token
        }
    }
}

/// All items as `&str`, or `None` when one is not a string.
fn strings_of(items: &[Value]) -> Option<Vec<&str>> {
    items.iter().map(Value::as_str).collect()
}

/// Version, `expires_at` and `sub`: the fixed start of every record.
fn read_header<'a>(reader: &mut Reader<'a>) -> Result<(UnixTime, &'a str), RecordError> {
    let version = reader.u8()?;
    if version != RECORD_VERSION {
        return Err(RecordError::Version(version));
    }
    let expires_at = reader.i64()?;
    let sub = reader.str()?;
    Ok((expires_at, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_record() -> SessionRecord {
        SessionRecord {
            sub: "user-sub-1".into(),
            sid: Some("sid-9".into()),
            expires_at: 1_700_000_000,
            identity: Identity {
                values: [
                    "akadmin".into(),
                    "admins|users".into(),
                    "".into(),
                    "root@example.com".into(),
                    "Admin Istrator".into(),
                    "user-sub-1".into(),
                    "eyJ.access.token".into(),
                ],
                additional: vec![("X-Team".into(), "blue".into()), ("X-Id".into(), "7".into())],
            },
            id_token: "eyJ.id.token".into(),
            claims_json: r#"{"sub":"user-sub-1","groups":["admins","users"],"age":42,"ok":true,"n":null,"obj":{"a":1},"mixed":["a",1],"line":"a\nb\rc"}"#.into(),
        }
    }

    #[test]
    fn session_id_cookie_value_round_trips() {
        let id = SessionId::generate();
        let value = id.to_cookie_value();
        assert_eq!(value.len(), 43);
        assert!(value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(SessionId::from_cookie_value(value.as_bytes()), Some(id));
    }

    #[test]
    fn session_ids_are_random() {
        assert_ne!(SessionId::generate(), SessionId::generate());
    }

    #[test]
    fn from_cookie_value_is_strict() {
        let value = SessionId([0xab; 32]).to_cookie_value();
        assert!(SessionId::from_cookie_value(&value.as_bytes()[..42]).is_none());
        assert!(SessionId::from_cookie_value(format!("{value}A").as_bytes()).is_none());
        assert!(SessionId::from_cookie_value(format!("{value}=").as_bytes()).is_none());
        let standard_alphabet = value.replace('-', "+").replace('_', "/");
        let with_plus = format!("+{}", &standard_alphabet[1..]);
        assert!(SessionId::from_cookie_value(with_plus.as_bytes()).is_none());
        // Last char carries 2 unused bits: a non-canonical variant must not decode to the same id.
        let mut non_canonical = value.clone().into_bytes();
        non_canonical[42] = if non_canonical[42] == b'B' { b'C' } else { b'B' };
        let decoded = SessionId::from_cookie_value(&non_canonical);
        assert!(decoded.is_none() || decoded != Some(SessionId([0xab; 32])));
        assert!(SessionId::from_cookie_value(b"").is_none());
        assert!(SessionId::from_cookie_value(&[0xff; 43]).is_none());
    }

    #[test]
    fn key_is_first_eight_bytes_little_endian() {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(SessionId(bytes).key(), 0x0807_0605_0403_0201);
    }

    #[test]
    fn debug_does_not_print_the_id() {
        let id = SessionId([0xab; 32]);
        let printed = format!("{id:?}");
        assert_eq!(printed, "SessionId(abab..)");
        assert!(!printed.contains(&id.to_cookie_value()));
    }

    #[test]
    fn view_reads_what_decode_reads() {
        let record = sample_record();
        let bytes = record.encode();
        let view = SessionView::parse(&bytes).expect("view");
        assert_eq!(view.expires_at, record.expires_at);
        assert_eq!(view.sub, record.sub.as_bytes());
        for (v, r) in view.values.iter().zip(record.identity.values.iter()) {
            assert_eq!(*v, r.as_bytes());
        }
        let additional: Vec<_> = view.additional().collect();
        assert_eq!(additional, vec![(&b"X-Team"[..], &b"blue"[..]), (&b"X-Id"[..], &b"7"[..])]);
        assert_eq!(view.id_token, record.id_token.as_bytes());
        assert_eq!(view.claim("age"), record.claim("age"));
        assert_eq!(view.logout_hint(), b"eyJ.id.token");
        for cut in 0..bytes.len() {
            assert!(SessionView::parse(&bytes[..cut]).is_none(), "prefix {cut}");
        }
    }

    fn jwt(payload: &str) -> String {
        format!("eyJhbGciOiJIUzI1NiJ9.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn compact_drops_duplicated_claims_and_keeps_answers() {
        let mut record = sample_record();
        // As Identity::from_claims builds them: every non-empty identity value comes from its
        // claim (here `email` deliberately differs, as if set by another mapping).
        record.claims_json = r#"{"sub":"user-sub-1","preferred_username":"akadmin","groups":["admins","users"],"email":"other@example.com","name":"Admin Istrator","age":42}"#.into();
        let before: Vec<_> =
            ["sub", "preferred_username", "groups", "email", "age", "name", "entitlements"]
                .iter()
                .map(|n| record.claim(n))
                .collect();
        record.compact("client");
        let claims: Map<String, Value> = serde_json::from_str(&record.claims_json).unwrap();
        assert!(!claims.contains_key("groups") && !claims.contains_key("sub"));
        // differs from the header value (root@example.com): kept
        assert_eq!(claims.get("email"), Some(&Value::String("other@example.com".into())));
        let after: Vec<_> =
            ["sub", "preferred_username", "groups", "email", "age", "name", "entitlements"]
                .iter()
                .map(|n| record.claim(n))
                .collect();
        assert_eq!(before, after);
        assert_eq!(after[6], None, "an empty identity value answers no claim");
    }

    #[test]
    fn compact_keeps_the_id_token_unless_the_access_token_can_be_the_hint() {
        let id = jwt(r#"{"iss":"https://ak","sub":"u1","aud":"client","nonce":"n"}"#);
        let mut record = sample_record();
        record.id_token = id.clone();
        record.identity.values[6] = "opaque-access-token".into();
        record.compact("client");
        assert_eq!(record.id_token, id);
        assert_eq!(record.logout_hint(), id);

        let access = jwt(r#"{"iss":"https://ak","sub":"u1","aud":"client","scope":"openid"}"#);
        record.identity.values[6] = access.clone();
        let mut other = record.clone();
        other.compact("another-client");
        assert_eq!(other.id_token, id, "access token for another audience is no hint");
        record.compact("client");
        assert!(record.id_token.is_empty());
        assert_eq!(record.logout_hint(), access);
        let bytes = record.encode();
        assert_eq!(SessionView::parse(&bytes).unwrap().logout_hint(), access.as_bytes());
    }

    /// A typical authentik session (10 groups, a 1 KB JWT access token that also serves as the
    /// logout hint) must fit a 2 KB slab slot in shared memory together with the zone's
    /// 144-byte entry header: that is what lets a million sessions fit in 2 GiB.
    #[test]
    fn typical_authentik_session_fits_a_2k_slot() {
        let groups: Vec<String> = (0..10).map(|i| format!("authentik-group-{i:02}")).collect();
        let sub = "4f6c8a2e9d1b3c5a7e9f0b2d4c6e8a1f3b5d7e9c0a2b4d6f8e1c3a5b7d9f0e2a";
        let mut claims = serde_json::json!({
            "iss": "https://authentik.example.com/application/o/grafana/",
            "sub": sub, "aud": "grafana-client-id-0123456789abcdef0123",
            "exp": 1_767_225_600, "iat": 1_767_139_200, "auth_time": 1_767_139_100,
            "acr": "goauthentik.io/providers/oauth2/default", "amr": ["pwd"],
            "sid": "9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d",
            "email": "alice.anderson@example.com", "email_verified": true,
            "name": "Alice Anderson", "given_name": "Alice Anderson",
            "preferred_username": "alice", "nickname": "alice",
            "groups": groups, "entitlements": [], "roles": [],
            "ak_proxy": {"user_attributes": {}, "is_superuser": false},
            "nonce": "Zk9nQ2V4aGJ4b3Fwb1lYS1dGN0hMa3JqZ0RqQkFnbW8",
            "at_hash": "fQ8kM2sQqj6B2b6Yx5Lx9g",
        });
        let id_token = jwt(&claims.to_string());
        claims["scope"] = "openid profile email entitlements ak_proxy".into();
        let mut access_token = jwt(&claims.to_string());
        access_token.truncate(access_token.len().min(1000));
        while access_token.len() < 1000 {
            access_token.push('x');
        }
        let claims = claims.as_object().unwrap().clone();
        let mut record = SessionRecord {
            sub: sub.into(),
            sid: claims.get("sid").and_then(Value::as_str).map(str::to_string),
            expires_at: 1_767_225_600,
            identity: Identity::from_claims(&claims, &access_token),
            id_token,
            claims_json: Value::Object(claims).to_string(),
        };
        // The truncated token is no longer a parseable JWT: keep the hint decision explicit.
        record.compact("grafana-client-id-0123456789abcdef0123");
        record.id_token.clear();
        let size = record.encode().len();
        assert!(size <= 2048 - 144, "typical record is {size} bytes");
        assert_eq!(record.claim("groups").as_deref(), Some(groups_joined().as_str()));
    }

    fn groups_joined() -> String {
        (0..10).map(|i| format!("authentik-group-{i:02}")).collect::<Vec<_>>().join("|")
    }

    #[test]
    fn record_round_trips() {
        let record = sample_record();
        let bytes = record.encode();
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(bytes.len(), record.encoded_len());
        assert_eq!(SessionRecord::decode(&bytes), Ok(record));
        let empty = SessionRecord::default();
        assert_eq!(SessionRecord::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn peek_reads_sub() {
        let bytes = sample_record().encode();
        assert_eq!(SessionRecord::peek_sub(&bytes), Some("user-sub-1"));
        assert_eq!(SessionRecord::peek_sub(&bytes[..5]), None);
        assert_eq!(SessionRecord::peek_sid(&bytes[..5]), None);
        assert_eq!(SessionRecord::peek_sub(&[]), None);
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut bytes = sample_record().encode();
        bytes[0] = 9;
        assert_eq!(SessionRecord::decode(&bytes), Err(RecordError::Version(9)));
        assert_eq!(SessionRecord::peek_sub(&bytes), None);
    }

    #[test]
    fn trailing_bytes_and_bad_flags_are_refused() {
        let mut bytes = sample_record().encode();
        bytes.push(0);
        assert_eq!(SessionRecord::decode(&bytes), Err(RecordError::Truncated));
        let mut bytes = SessionRecord::default().encode();
        let flag_at = 1 + 8 + 4;
        bytes[flag_at] = 2;
        assert_eq!(SessionRecord::decode(&bytes), Err(RecordError::Truncated));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let record = SessionRecord { sub: "ab".into(), ..SessionRecord::default() };
        let mut bytes = record.encode();
        bytes[1 + 8 + 4] = 0xff;
        assert_eq!(SessionRecord::decode(&bytes), Err(RecordError::Utf8));
    }

    #[test]
    fn every_prefix_fails_without_panicking() {
        let bytes = sample_record().encode();
        for len in 0..bytes.len() {
            assert!(SessionRecord::decode(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic, no dependency.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = sample_record().encode();
        for round in 0..5000 {
            let len = (next() % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && !bytes.is_empty() {
                // Keep the version byte so the decoder gets past the first check.
                bytes[0] = RECORD_VERSION;
            }
            assert!(SessionRecord::decode(&bytes).is_err());
            let _ = SessionRecord::peek_sub(&bytes);
            // Single-byte corruptions of a valid record: any result, never a panic.
            let mut corrupt = valid.clone();
            let at = (next() as usize) % corrupt.len();
            corrupt[at] = next() as u8;
            let _ = SessionRecord::decode(&corrupt);
        }
    }

    #[test]
    fn huge_additional_count_does_not_allocate_or_panic() {
        let mut bytes = Vec::new();
        wire::put_u8(&mut bytes, RECORD_VERSION);
        wire::put_i64(&mut bytes, 0);
        wire::put_str(&mut bytes, "s");
        wire::put_u8(&mut bytes, 0);
        for _ in 0..7 {
            wire::put_str(&mut bytes, "");
        }
        wire::put_u32(&mut bytes, u32::MAX);
        assert_eq!(SessionRecord::decode(&bytes), Err(RecordError::Truncated));
    }

    #[test]
    fn claim_formats_values() {
        let record = sample_record();
        assert_eq!(record.claim("sub").as_deref(), Some("user-sub-1"));
        assert_eq!(record.claim("groups").as_deref(), Some("admins|users"));
        assert_eq!(record.claim("age").as_deref(), Some("42"));
        assert_eq!(record.claim("ok").as_deref(), Some("true"));
        assert_eq!(record.claim("obj").as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(record.claim("mixed").as_deref(), Some(r#"["a",1]"#));
        assert_eq!(record.claim("line").as_deref(), Some("abc"));
        assert_eq!(record.claim("n"), None);
        assert_eq!(record.claim("absent"), None);
    }

    /// Found by fuzz/ (identity): a `sid` with CR/LF was answered raw after `compact`.
    #[test]
    fn sid_claim_is_header_safe_after_compact() {
        let mut record = SessionRecord {
            sid: Some("9b1d\r\nX-Injected: 1".into()),
            claims_json: r#"{"sid":"9b1d\r\nX-Injected: 1"}"#.into(),
            ..sample_record()
        };
        assert_eq!(record.claim("sid").as_deref(), Some("9b1dX-Injected: 1"));
        record.compact("client");
        assert!(!record.claims_json.contains("sid"), "kept once, in the record's field");
        assert_eq!(record.claim("sid").as_deref(), Some("9b1dX-Injected: 1"));
        let bytes = record.encode();
        let view = SessionView::parse(&bytes).unwrap();
        assert_eq!(view.claim("sid").as_deref(), Some("9b1dX-Injected: 1"));
    }

    /// Found by fuzz/ (identity): without serde_json's `float_roundtrip`, a float claim parsed,
    /// re-serialised by `compact` and parsed again moved by one ULP.
    #[test]
    fn compact_keeps_float_claims_exactly() {
        let claims = r#"{"big":1844684400000000007628864861625843712,"ratio":0.30000000000000004}"#;
        let mut record = SessionRecord { claims_json: claims.into(), ..sample_record() };
        let before = (record.claim("big"), record.claim("ratio"));
        assert_eq!(before.0.as_deref(), Some("1.8446844e+36"));
        record.compact("client");
        assert_eq!((record.claim("big"), record.claim("ratio")), before);
    }

    /// Found by fuzz/ (record_roundtrip): a non-string `sid` claim was dropped by `compact`
    /// when the record had no sid (`None == None`).
    #[test]
    fn compact_keeps_a_sid_claim_the_record_cannot_hold() {
        let mut record =
            SessionRecord { sid: None, claims_json: r#"{"sid":20}"#.into(), ..sample_record() };
        assert_eq!(record.claim("sid").as_deref(), Some("20"));
        record.compact("client");
        assert_eq!(record.claim("sid").as_deref(), Some("20"));
        let mut record = SessionRecord {
            sid: Some("s-1".into()),
            claims_json: r#"{"sid":"s-1"}"#.into(),
            ..sample_record()
        };
        record.compact("client");
        assert!(!record.claims_json.contains("sid"));
        assert_eq!(record.claim("sid").as_deref(), Some("s-1"));
    }

    #[test]
    fn claim_of_invalid_json_is_none() {
        let record = SessionRecord { claims_json: "not json".into(), ..SessionRecord::default() };
        assert_eq!(record.claim("sub"), None);
    }
}
