//! The outpost's providers as one worker runs them: built from the configuration in the
//! `authentik_outpost` zone (see `zone`), rebuilt when its generation changes, found by name
//! (`auth_authentik SLUG`) or by the request's host (`auth_authentik auto`).
//!
//! Providers are reference-counted: a request keeps the provider it started with in its
//! context, so a new generation never pulls a provider from under a login in flight. A
//! provider whose entry is unchanged in the new generation is kept as it is (its calls, its
//! key cache).

pub mod zone;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use authentik_core::config::{is_host_in_domain, Mode};
use authentik_core::cookie::session_cookie_name;
use authentik_core::oidc::login::LOGIN_TTL;
use authentik_core::outpost::api::{ProxyProvider, Snapshot};
use authentik_core::outpost::provider::{build, OutpostProvider};
use authentik_core::provider::ProviderRuntime;

use crate::call::CallState;
use crate::conf::{provider_key, MainConf, OutpostConf};
use crate::provider::Provider;
use zone::OutpostZone;

/// Calls in flight per outpost provider and worker (as `max_pending_calls`' default).
const MAX_PENDING_CALLS: usize = 16;

/// One generation of the outpost's providers in this worker.
#[derive(Default)]
struct Table {
    generation: u64,
    /// With what the API said of each, to keep unchanged providers across generations.
    providers: Vec<(ProxyProvider, Rc<Provider>)>,
    outpost_name: String,
    by_name: HashMap<String, usize>,
}

thread_local! {
    /// Only the event loop thread of a worker uses it.
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

/// What a lookup found.
pub enum Found {
    Provider(Rc<Provider>),
    /// authentik's configuration is in place, without such a provider.
    Unknown,
    /// Nothing fetched yet (authentik unreachable since nginx started, no `state_file`).
    NotFetched,
}

fn refresh(mcf: &MainConf) -> bool {
    let Some(outpost) = mcf.outpost.as_deref() else {
        return false;
    };
    let Some(zone) = OutpostZone::of(outpost.shm_zone) else {
        return false;
    };
    let generation = zone.generation();
    if generation == 0 {
        return false;
    }
    if TABLE.with_borrow(|t| t.generation == generation) {
        return true;
    }
    let Some((generation, bytes)) = zone.read() else {
        return false;
    };
    // The task checked the snapshot before it wrote it; a corrupt one keeps the old table.
    let Ok(snapshot) = Snapshot::decode(&bytes) else {
        return TABLE.with_borrow(|t| t.generation != 0);
    };
    TABLE.with_borrow_mut(|table| rebuild(table, generation, &snapshot, mcf));
    true
}

fn rebuild(table: &mut Table, generation: u64, snapshot: &Snapshot, mcf: &MainConf) {
    let same_outpost = table.outpost_name == snapshot.outpost.name;
    let old: Vec<(ProxyProvider, Rc<Provider>)> =
        if same_outpost { table.providers.drain(..).collect() } else { Vec::new() };
    let mut next =
        Table { generation, outpost_name: snapshot.outpost.name.clone(), ..Table::default() };
    let mut keys: Vec<(u32, String, String)> = Vec::new();
    for p in &snapshot.providers {
        let provider = match old.iter().find(|(q, _)| q == p) {
            Some((_, kept)) => kept.clone(),
            None => {
                let Some(provider) = new_provider(p, snapshot, mcf) else { continue };
                Rc::new(provider)
            }
        };
        // Sessions are bound to (issuer, client_id) by a 32-bit key: a provider whose key
        // another pair already has is left out (the task logged it).
        let s = provider.settings();
        let (issuer, client) = (s.issuer.to_string(), s.client_id.clone());
        if keys.iter().any(|(k, i, c)| *k == provider.key && (i != &issuer || c != &client)) {
            continue;
        }
        keys.push((provider.key, issuer, client));
        let index = next.providers.len();
        next.by_name.entry(provider.slug().to_owned()).or_insert(index);
        next.by_name.entry(s.name.clone()).or_insert(index);
        next.providers.push((p.clone(), provider));
    }
    *table = next;
}

/// A provider the task's check accepted; `None` (left out) otherwise.
fn new_provider(p: &ProxyProvider, snapshot: &Snapshot, mcf: &MainConf) -> Option<Provider> {
    let outpost = mcf.outpost.as_deref()?;
    let built = build(p, &snapshot.outpost, &outpost.options).ok()?;
    let provider = provider_of(built, outpost)?;
    crate::metrics::attach_provider(mcf, &provider);
    Some(provider)
}

/// The worker-side provider of an outpost provider.
pub fn provider_of(built: OutpostProvider, outpost: &OutpostConf) -> Option<Provider> {
    let OutpostProvider { slug, settings, discovery, unauth, session_lifetime, header_auth } =
        built;
    let key = provider_key(settings.issuer.as_str(), &settings.client_id);
    let cookie_name = session_cookie_name(&settings.client_id);
    let base_path = settings.base_path().to_string();
    let declared_at = format!("authentik outpost \"{}\"", settings.meta.outpost);
    let runtime = ProviderRuntime::with_discovery(settings, unauth, discovery).ok()?;
    let metrics = Arc::new(crate::metrics::ProviderMetrics::default());
    Some(Provider {
        runtime: Arc::new(runtime.with_timer(metrics.clone())),
        metrics,
        cookie_name,
        login_timeout: LOGIN_TTL,
        key,
        base_path,
        calls: CallState::new(MAX_PENDING_CALLS),
        zone: outpost.session_zone,
        zone_name: None,
        declared_at,
        intercept_header_auth: header_auth.intercept,
        outpost: Some(crate::provider::FromOutpost { slug, session_lifetime, header_auth }),
    })
}

/// The outpost provider `name` (application slug or provider name).
pub fn find(mcf: &MainConf, name: &str) -> Found {
    if mcf.outpost.is_none() {
        return Found::Unknown;
    }
    if !refresh(mcf) {
        return Found::NotFetched;
    }
    TABLE.with_borrow(|t| match t.by_name.get(name) {
        Some(&i) => Found::Provider(t.providers[i].1.clone()),
        None => Found::Unknown,
    })
}

/// A provider for `host` (lowercase, without port), as authentik's outpost picks one: the one
/// whose external host is `host`, else the forward_domain provider with the longest cookie
/// domain that `host` is on or under. Providers of `authentik_provider` blocks take part.
pub enum ByHost {
    Block(*const Provider),
    Outpost(Rc<Provider>),
}

pub fn find_by_host(mcf: &MainConf, host: &str) -> Option<ByHost> {
    let external_host_is = |p: &Provider| {
        p.settings()
            .external_host
            .as_ref()
            .and_then(|u| u.host_str())
            .is_some_and(|h| h.eq_ignore_ascii_case(host))
    };
    // The cookie domain's length, when `host` is under it (forward_domain providers only).
    let domain_of = |p: &Provider| match (&p.settings().mode, &p.settings().cookie_domain) {
        (Mode::ForwardDomain, Some(d)) if is_host_in_domain(host, d) => Some(d.len()),
        _ => None,
    };
    if let Some(p) = mcf.providers.iter().find(|p| external_host_is(p)) {
        return Some(ByHost::Block(&**p));
    }
    let fetched = refresh(mcf);
    let outpost = |f: &dyn Fn(&Table) -> Option<Rc<Provider>>| {
        if fetched {
            TABLE.with_borrow(f)
        } else {
            None
        }
    };
    if let Some(p) =
        outpost(&|t| t.providers.iter().find(|(_, p)| external_host_is(p)).map(|(_, p)| p.clone()))
    {
        return Some(ByHost::Outpost(p));
    }
    let mut best: Option<(usize, ByHost)> = mcf
        .providers
        .iter()
        .filter_map(|p| Some((domain_of(p)?, ByHost::Block(&**p))))
        .max_by_key(|(len, _)| *len);
    let best_outpost = outpost(&|t| {
        t.providers
            .iter()
            .filter_map(|(_, p)| Some((domain_of(p)?, p)))
            .max_by_key(|(len, _)| *len)
            .map(|(_, p)| p.clone())
    });
    if let Some(o) = best_outpost {
        let len = domain_of(&o).unwrap_or(0);
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, ByHost::Outpost(o)));
        }
    }
    best.map(|(_, p)| p)
}
