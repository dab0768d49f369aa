//! Open-redirect protection: `redirect::validate_return_to` for the post-login target `rd`, on
//! fixed sites (proxy / forward_single by origin, forward_domain by cookie domain; the input's
//! length picks one).
//! An accepted URL is absolute http(s), without userinfo, and stays on the site: the external
//! origin's scheme, host and port, or a host inside the cookie domain.
#![no_main]

use authentik_core::config::Mode;
use authentik_core::redirect::validate_return_to;
use authentik_fuzz::SITES;
use libfuzzer_sys::fuzz_target;
use url::Url;

fuzz_target!(|data: &[u8]| {
    let target = String::from_utf8_lossy(data);
    // One site per input (by length, so the seeds stay plain URLs): URL parsing is the cost.
    for site in SITES.iter().cycle().skip(data.len() % SITES.len()).take(1) {
        let Some(accepted) =
            validate_return_to(&target, site.mode, site.origin, site.cookie_domain)
        else {
            continue;
        };
        let url = Url::parse(&accepted).expect("accepted targets are absolute URLs");
        assert_eq!(url.as_str(), accepted, "accepted targets are normalised");
        assert!(matches!(url.scheme(), "http" | "https"), "{target:?} -> {accepted}");
        assert!(url.username().is_empty() && url.password().is_none(), "{target:?} -> {accepted}");
        assert!(!accepted.contains(['\\', '\r', '\n', '\t', '\0']), "{target:?} -> {accepted}");
        let host = url.host_str().expect("a host").to_ascii_lowercase();
        match site.mode {
            Mode::Proxy | Mode::ForwardSingle => {
                let origin = Url::parse(site.origin).expect("site origin");
                assert_eq!(
                    url.origin(),
                    origin.origin(),
                    "{target:?} -> {accepted} leaves {}",
                    site.origin
                );
            }
            Mode::ForwardDomain => {
                let domain = site.cookie_domain.expect("forward_domain has a cookie domain");
                let domain = domain.trim_start_matches('.').to_ascii_lowercase();
                assert!(
                    host == domain || host.ends_with(&format!(".{domain}")),
                    "{target:?} -> {accepted} leaves {domain}"
                );
            }
        }
    }
});
