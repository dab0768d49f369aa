//! Every function that reads client- or provider-controlled bytes on the request path answers
//! without panicking, whatever the input: random bytes, and random mutations of valid inputs.
//! (A panic there would be contained by the module, but costs the request a 500.)

use authentik_core::config::Mode;
use authentik_core::cookie::{find_cookie, remove_cookie_into};
use authentik_core::identity::is_forged_identity_header;
use authentik_core::oidc::PendingLogin;
use authentik_core::redirect::validate_return_to;
use authentik_core::request::{decode_query_value, is_navigation, query_arg};
use authentik_core::session::{SessionId, SessionView};

/// Deterministic xorshift generator: reproducible failures, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Bytes biased towards the characters the parsers care about.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        const INTERESTING: &[u8] = b"=;&%+?#/\\:@. \t\r\n\0_-aZ9\"'<>[]{}";
        let len = (self.next() % (max as u64 + 1)) as usize;
        (0..len)
            .map(|_| {
                let r = self.next();
                if r % 3 == 0 {
                    INTERESTING[(r >> 8) as usize % INTERESTING.len()]
                } else {
                    (r >> 16) as u8
                }
            })
            .collect()
    }

    fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.next() % 4 {
            if out.is_empty() {
                break;
            }
            let i = (self.next() as usize) % out.len();
            match self.next() % 3 {
                0 => out[i] = self.next() as u8,
                1 => {
                    out.remove(i);
                }
                _ => out.insert(i, self.next() as u8),
            }
        }
        out
    }
}

const ROUNDS: usize = 20_000;

#[test]
fn cookie_and_query_parsers_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let valid = b"a=1; authentik_proxy_1a2b3c4d=abc; b=\"q\"; c";
    for _ in 0..ROUNDS {
        let input = if rng.next() % 2 == 0 { rng.bytes(80) } else { rng.mutate(valid) };
        let name = b"authentik_proxy_1a2b3c4d";
        if let Some(value) = find_cookie(&input, name) {
            assert!(value.len() <= input.len());
        }
        let mut out = vec![0u8; 2 * input.len()];
        if let Some(len) = remove_cookie_into(&input, name, &mut out) {
            assert!(len <= out.len());
        }
        let _ = query_arg(&input, b"rd");
        let _ = decode_query_value(&input);
        let _ = SessionId::from_cookie_value(&input);
        let _ = is_forged_identity_header(&input, &["x-forwarded-host"]);
        let _ = is_navigation(Some(&input), None, Some(&input));
        let _ = PendingLogin::decode(&input);
    }
}

#[test]
fn session_view_never_panics_on_damaged_records() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut record = authentik_core::session::SessionRecord {
        sub: "sub-1".into(),
        sid: Some("sid".into()),
        expires_at: 1,
        id_token: "id".into(),
        claims_json: r#"{"a":1}"#.into(),
        ..Default::default()
    };
    record.identity.additional.push(("X-A".into(), "b".into()));
    let valid = record.encode();
    for _ in 0..ROUNDS {
        let input = if rng.next() % 4 == 0 { rng.bytes(120) } else { rng.mutate(&valid) };
        if let Some(view) = SessionView::parse(&input) {
            let _ = view.additional().count();
            let _ = view.claim("a");
            let _ = view.logout_hint();
        }
    }
}

#[test]
fn return_to_validation_never_panics_and_never_leaves_the_site() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let seeds: [&[u8]; 4] = [
        b"https://app.example.com/path?x=1#f",
        b"//evil.com/",
        b"/\\evil.com",
        b"https://user@sub.example.com:8443/a",
    ];
    for i in 0..ROUNDS {
        let raw = if i % 2 == 0 { rng.bytes(60) } else { rng.mutate(seeds[i % seeds.len()]) };
        let target = String::from_utf8_lossy(&raw);
        for (mode, origin, domain) in [
            (Mode::Proxy, "https://app.example.com", None),
            (Mode::ForwardDomain, "https://auth.example.com", Some("example.com")),
        ] {
            let Some(url) = validate_return_to(&target, mode, origin, domain) else {
                continue;
            };
            let parsed = url::Url::parse(&url).expect("accepted targets are absolute URLs");
            let host = parsed.host_str().unwrap_or_default().to_string();
            match domain {
                None => assert_eq!(host, "app.example.com", "{target:?} -> {url}"),
                Some(d) => {
                    assert!(host == d || host.ends_with(&format!(".{d}")), "{target:?} -> {url}")
                }
            }
        }
    }
}
