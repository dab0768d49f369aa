//! What authentik (or a `state_file`) hands the outpost: a configuration snapshot (its providers
//! turned into settings), a websocket message, and the claims of a login with
//! `ak_proxy.backend_override` / `host_header`. None may panic, and what is accepted is usable.
#![no_main]

use std::time::Duration;

use authentik_core::identity::{check_proxy_overrides, claim_at, BACKEND_OVERRIDE, HOST_HEADER};
use authentik_core::outpost::api::Snapshot;
use authentik_core::outpost::provider::build;
use authentik_core::outpost::ws::parse_event;
use authentik_core::outpost::OutpostOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_event(text);
        let (fixed, warnings) = check_proxy_overrides(text);
        let claims = fixed.as_deref().unwrap_or(text);
        if let Some(backend) = claim_at(claims.as_bytes(), BACKEND_OVERRIDE) {
            if fixed.is_some() || !warnings.is_empty() {
                let url = url::Url::parse(&backend).expect("a kept backend is a URL");
                assert!(matches!(url.scheme(), "http" | "https"));
            }
        }
        let _ = claim_at(claims.as_bytes(), HOST_HEADER);
    }
    let Ok(snapshot) = Snapshot::decode(data) else {
        return;
    };
    assert_eq!(Snapshot::decode(&snapshot.encode()).as_ref(), Ok(&snapshot));
    let options = OutpostOptions {
        url: url::Url::parse("http://10.0.0.5:9000/").expect("static URL"),
        token: "t".into(),
        browser_url: Some(url::Url::parse("https://auth.example.com/").expect("static URL")),
        ca_file: None,
        refresh: None,
        timeout: Duration::from_secs(5),
        hostname: "h".into(),
    };
    for p in &snapshot.providers {
        let Ok(built) = build(p, &snapshot.outpost, &options) else { continue };
        // An accepted provider has what a login needs.
        assert!(matches!(built.settings.issuer.scheme(), "http" | "https"));
        assert!(built.settings.external_host.is_some());
        assert!(built.settings.scopes.iter().any(|s| s == "openid"));
    }
});
