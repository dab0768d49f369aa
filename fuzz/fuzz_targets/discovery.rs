//! `/.well-known/openid-configuration` documents: `Discovery::parse` against the configured
//! issuer. What is accepted has the issuer (up to one trailing `/`) and absolute http(s)
//! endpoints.
#![no_main]

use authentik_core::oidc::Discovery;
use authentik_fuzz::ISSUER;
use libfuzzer_sys::fuzz_target;

fn is_http_url(value: &str) -> bool {
    url::Url::parse(value)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

fuzz_target!(|body: &[u8]| {
    for expected in [ISSUER, ISSUER.trim_end_matches('/')] {
        let Ok(discovery) = Discovery::parse(body, expected) else {
            continue;
        };
        let trim = |s: &str| s.strip_suffix('/').unwrap_or(s).to_owned();
        assert_eq!(trim(&discovery.issuer), trim(expected));
        assert!(is_http_url(&discovery.authorization_endpoint));
        assert!(is_http_url(&discovery.token_endpoint));
        for endpoint in
            [&discovery.userinfo_endpoint, &discovery.end_session_endpoint, &discovery.jwks_uri]
                .into_iter()
                .flatten()
        {
            assert!(is_http_url(endpoint), "{endpoint}");
        }
        let _ = discovery.use_basic_auth();
    }
});
