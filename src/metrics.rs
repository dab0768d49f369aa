//! Prometheus metrics: counters in shared memory (see `metrics/shared.rs`), the
//! `authentik_metrics` directive and its content handler, which renders them in the text format.
//!
//! Counting is on when some location has `authentik_metrics`: the directive registers the
//! metrics zone, and every provider is attached to it when nginx initialises the zone. Without
//! it, every counting call is one load of a null pointer.
//!
//! Adding a metric: its `Family` in `authentik_core::metrics::family`; a counter index in
//! `shared.rs` (per provider or per zone), or a [`Gauge`] for a value that one owner sets; a
//! counting call where it happens; its samples in `render`. The outpost's sync state is such a
//! gauge: its task keeps a [`GaugeHandle`] (from [`gauge_handle`]) and calls `set`, from any
//! thread. A provider created at run time gets its counters with [`attach_provider`].

mod shared;

use core::ffi::{c_char, c_void};
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use authentik_core::metrics::{
    bucket_index, family, Exposition, Family, Kind, Value, ENDPOINTS, LOGIN_FAILURES,
    REQUEST_OUTCOMES,
};
use authentik_core::oidc::{CallTimer, Endpoint};
use authentik_core::rules::Credential;
use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_http_request_t, ngx_int_t, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, ngx_uint_t, NGX_ERROR,
    NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_NOT_ALLOWED, NGX_LOG_ALERT, NGX_LOG_EMERG, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};

pub use shared::Gauge;
use shared::{Shared, GAUGES};

use crate::conf::MainConf;
use crate::log::action;
use crate::provider::Provider;
use crate::{request_log, response, HttpAuthentikModule};

/// The zone's name carries the layout's version: another layout is another zone.
const ZONE_NAME: &str = "authentik_metrics_1";
/// The zone's tag: the address of this static.
static ZONE_TAG: u8 = 0;

/// How a request to a protected location ended (`outcome` of `authentik_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Authenticated by a session cookie (every rule held).
    Session,
    /// Authenticated by an `Authorization` header (every rule held).
    HeaderAuth,
    /// An unauthenticated path: passed without a session.
    UnauthPath,
    /// A page navigation without a session: sent to the provider's login.
    LoginRedirect,
    /// No session, not a navigation: `401`.
    Unauthorized,
    /// Authenticated, but an `authentik_require` rule does not hold: `403`.
    Forbidden,
}

impl Outcome {
    pub fn for_credential(credential: Credential) -> Outcome {
        match credential {
            Credential::BrowserSession => Outcome::Session,
            Credential::HeaderAuth => Outcome::HeaderAuth,
        }
    }
}

/// Why a login ended with an error page (`reason` of `authentik_logins_failed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// The callback's state is missing, unknown, expired, used, another browser's; no code.
    InvalidState,
    /// The provider answered the callback with `error=` (the user refused, or no access).
    ProviderDenied,
    /// The provider could not be reached or answered garbage (discovery, token, keys,
    /// userinfo).
    ProviderUnavailable,
    /// The tokens did not validate (signature, issuer, audience, nonce, expiry).
    TokenInvalid,
    /// The session record is over `max_record`.
    SessionTooLarge,
    /// The zone had no room for the session.
    StoreFull,
    /// Too many calls to the provider in flight, or pending logins.
    Busy,
    /// The request cannot start a login (its pending login does not fit a slot).
    BadRequest,
}

// The tables in authentik-core name the same variants in the same order.
const _: () = assert!(REQUEST_OUTCOMES.len() == Outcome::Forbidden as usize + 1);
const _: () = assert!(LOGIN_FAILURES.len() == LoginFailure::BadRequest as usize + 1);

/* counting */

/// One provider's place in the metrics zone; shared with its HTTP client (call latencies are
/// recorded on the thread pool).
#[derive(Debug, Default)]
pub struct ProviderMetrics {
    /// Null while counting is off.
    shared: AtomicPtr<Shared>,
    index: AtomicUsize,
}

impl ProviderMetrics {
    fn add(&self, counter: usize, n: u64) {
        let shared = self.shared.load(Ordering::Relaxed);
        if shared.is_null() {
            return;
        }
        // SAFETY: a non-null pointer is the metrics zone, mapped for the life of the process.
        let shared = unsafe { &*shared };
        let index = self.index.load(Ordering::Relaxed);
        shared::worker_slot(shared).providers[index][counter].fetch_add(n, Ordering::Relaxed);
    }
}

impl CallTimer for ProviderMetrics {
    fn record(&self, endpoint: Endpoint, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let base = shared::CALLS + endpoint as usize * shared::CALL_STRIDE;
        self.add(base + bucket_index(micros), 1);
        self.add(base + shared::BUCKETS, micros);
    }
}

// The histogram's endpoints are core's `Endpoint` variants in order.
const _: () = assert!(ENDPOINTS.len() == Endpoint::Introspection as usize + 1);

pub fn request(provider: &Provider, outcome: Outcome) {
    provider.metrics.add(shared::REQUESTS + outcome as usize, 1);
}

pub fn login_started(provider: &Provider) {
    provider.metrics.add(shared::LOGINS_STARTED, 1);
}

pub fn login_completed(provider: &Provider) {
    provider.metrics.add(shared::LOGINS_COMPLETED, 1);
}

pub fn login_failed(provider: &Provider, reason: LoginFailure) {
    provider.metrics.add(shared::LOGINS_FAILED + reason as usize, 1);
}

/// `n` sessions of the provider's zone were evicted (rare: only when the zone is full).
pub fn evicted(provider: &Provider, n: usize) {
    let shared = provider.metrics.shared.load(Ordering::Relaxed);
    if shared.is_null() || n == 0 {
        return;
    }
    // SAFETY: a non-null pointer is the metrics zone, mapped for the life of the process.
    let shared = unsafe { &*shared };
    let zone = shared::register(&shared.zones, &provider.zone().name);
    shared::worker_slot(shared).zones[zone][shared::ZONE_EVICTIONS]
        .fetch_add(n as u64, Ordering::Relaxed);
}

/// Gives `provider` its counters (by name: a provider that comes back, or outlives a reload,
/// keeps counting where it was). For providers created at run time; configured ones are
/// attached when the zone is initialised.
pub fn attach_provider(mcf: &MainConf, provider: &Provider) {
    let Some(zone) = &mcf.metrics else { return };
    if zone.shared.is_null() {
        return;
    }
    // SAFETY: the zone is mapped (initialised) for the cycle's lifetime.
    let shared = unsafe { &*zone.shared };
    let index = shared::register(&shared.providers, &provider.settings().name);
    provider.metrics.index.store(index, Ordering::Relaxed);
    provider.metrics.shared.store(zone.shared, Ordering::Release);
}

/// Sets the global gauges (the outpost's sync state) from any thread of a worker: the outpost
/// task's thread sets them.
#[derive(Debug, Clone, Copy)]
pub struct GaugeHandle(*mut Shared);

// SAFETY: the pointer is the metrics zone, mapped for the life of the process; gauges are
// atomics.
unsafe impl Send for GaugeHandle {}
// SAFETY: as above.
unsafe impl Sync for GaugeHandle {}

impl GaugeHandle {
    pub fn set(&self, gauge: Gauge, value: i64) {
        // SAFETY: see the type.
        let cell = unsafe { &(*self.0).gauges[gauge as usize] };
        cell.value.store(value, Ordering::Relaxed);
        cell.set.store(1, Ordering::Release);
    }
}

/// The gauges of this cycle's metrics zone; `None` when counting is off.
pub fn gauge_handle(mcf: &MainConf) -> Option<GaugeHandle> {
    let zone = mcf.metrics.as_ref()?;
    (!zone.shared.is_null()).then_some(GaugeHandle(zone.shared))
}

/* the zone */

/// This cycle's metrics zone (in `MainConf`).
pub struct MetricsZone {
    /// The main configuration, whose providers are attached when nginx maps the zone.
    mcf: *const MainConf,
    /// Set when nginx has mapped the zone.
    shared: *mut Shared,
}

/// Registers the zone once per configuration (any `authentik_metrics` directive).
fn add_zone(cf: &mut ngx_conf_t, mcf: &mut MainConf) -> Result<(), ()> {
    if mcf.metrics.is_some() {
        return Ok(());
    }
    let mut zone = Box::new(MetricsZone { mcf, shared: ptr::null_mut() });
    let mut name = ngx_str_t { len: ZONE_NAME.len(), data: ZONE_NAME.as_ptr() as *mut u8 };
    // SAFETY: ngx_pagesize is set at startup.
    let page = unsafe { nginx_sys::ngx_pagesize };
    // The slab pool's own header and page table, and the allocation rounded to pages.
    let size = (shared::SHARED_SIZE.div_ceil(page) + 8) * page;
    let tag = ptr::addr_of!(ZONE_TAG) as *mut c_void;
    // SAFETY: registers a zone; nginx keeps `name`, which points at a static string.
    let shm_zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, tag) };
    if shm_zone.is_null() {
        return Err(());
    }
    // SAFETY: `shm_zone` is valid for the cycle; `zone` is boxed in the main configuration,
    // which lives as long as the cycle.
    unsafe {
        (*shm_zone).init = Some(init_zone);
        (*shm_zone).data = &mut *zone as *mut MetricsZone as *mut c_void;
    }
    mcf.metrics = Some(zone);
    Ok(())
}

/// Shared-memory init callback; `data` is the previous cycle's `MetricsZone` on reload.
unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: see init_zone_inner; a panic fails the zone instead of unwinding into nginx.
    catch_unwind(|| unsafe { init_zone_inner(&mut *shm_zone, data as *const MetricsZone) })
        .unwrap_or(NGX_ERROR as ngx_int_t)
}

/// # Safety
/// `shm_zone` is the zone registered by `add_zone`, mapped; `old` is null or the previous
/// cycle's `MetricsZone`.
unsafe fn init_zone_inner(shm_zone: &mut ngx_shm_zone_t, old: *const MetricsZone) -> ngx_int_t {
    // SAFETY: `data` is this cycle's MetricsZone, set by `add_zone`.
    let zone = unsafe { &mut *(shm_zone.data as *mut MetricsZone) };
    let shpool = shm_zone.shm.addr as *mut ngx_slab_pool_t;
    let existing = if !old.is_null() {
        // SAFETY: the previous cycle's zone object lives until this cycle is set up.
        unsafe { (*old).shared }
    } else if shm_zone.shm.exists != 0 {
        // SAFETY: the slab pool's `data` is what this module set.
        unsafe { (*shpool).data as *mut Shared }
    } else {
        ptr::null_mut()
    };
    let shared = if existing.is_null() {
        // SAFETY: allocates from the zone's slab pool (takes the pool's mutex itself).
        let fresh = unsafe { ngx_slab_alloc(shpool, shared::SHARED_SIZE) } as *mut Shared;
        if fresh.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        // SAFETY: a fresh allocation of the right size; all-zero is the empty state of every
        // field (atomics and bytes); no worker runs yet. The magic goes in last.
        unsafe {
            ptr::write_bytes(fresh as *mut u8, 0, shared::SHARED_SIZE);
            shared::init(&*fresh);
            (*fresh).magic = shared::MAGIC;
            (*shpool).data = fresh as *mut c_void;
        }
        fresh
    } else {
        // SAFETY: `existing` points at the zone's `Shared`.
        if unsafe { (*existing).magic } != shared::MAGIC {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                shm_zone.shm.log,
                "zone \"{}\" was created by another version of the module, restart nginx",
                ZONE_NAME
            );
            return NGX_ERROR as ngx_int_t;
        }
        existing
    };
    zone.shared = shared;
    // SAFETY: the main configuration outlives its zones' initialisation.
    let mcf = unsafe { &*zone.mcf };
    // SAFETY: `shared` is mapped; labels are claimed with atomics.
    let table = unsafe { &*shared };
    for provider in &mcf.providers {
        attach_provider(mcf, provider);
    }
    for session_zone in &mcf.zones {
        shared::register(&table.zones, &session_zone.name);
    }
    NGX_OK as ngx_int_t
}

/* the directive and its handler */

/// `authentik_metrics;` (location): answers with the metrics, like `stub_status`.
pub unsafe extern "C" fn cmd_metrics(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    crate::conf::conf_guard(|| {
        // SAFETY: nginx passes the configuration being parsed.
        let cf = unsafe { &mut *cf };
        let Some(mcf) = HttpAuthentikModule::main_conf_mut(cf) else {
            return crate::conf::conf_error();
        };
        if add_zone(cf, mcf).is_err() {
            return crate::conf::conf_error();
        }
        let Some(clcf) = NgxHttpCoreModule::location_conf_mut(cf) else {
            return crate::conf::conf_error();
        };
        clcf.handler = Some(metrics_handler);
        ptr::null_mut()
    })
}

unsafe extern "C" fn metrics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed.
    let r = unsafe { &mut *r };
    match catch_unwind(AssertUnwindSafe(|| serve(&mut *r))) {
        Ok(rc) => rc,
        Err(_) => {
            request_log!(r, NGX_LOG_ALERT, action::METRICS, "authentik metrics handler panicked");
            response::INTERNAL_ERROR
        }
    }
}

fn serve(r: &mut ngx_http_request_t) -> ngx_int_t {
    if r.method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
        return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
    }
    response::discard_body(r);
    let Some(mcf) = HttpAuthentikModule::main_conf(r) else {
        return response::INTERNAL_ERROR;
    };
    let text = render(mcf);
    send_text(r, &text)
}

/// The Prometheus text format, answered by the content handler (nginx finalizes).
fn send_text(r: &mut ngx_http_request_t, text: &str) -> ngx_int_t {
    response::write_body(r, 200, "text/plain; version=0.0.4; charset=utf-8", text)
}

/// The exposition: counters summed over the worker slots, zone use read from the zones.
fn render(mcf: &MainConf) -> String {
    let mut e = Exposition::new();
    let shared = mcf.metrics.as_ref().map_or(ptr::null_mut(), |z| z.shared);
    if shared.is_null() {
        return e.finish();
    }
    // SAFETY: the zone is mapped for the life of the process.
    let shared = unsafe { &*shared };

    // Providers by name, in the order they were first seen (a name claimed twice counts once).
    let mut providers: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, label) in shared.providers.iter().enumerate() {
        let Some(name) = label.name() else { continue };
        let is_overflow = i == shared.providers.len() - 1;
        if is_overflow
            && (0..shared::PROVIDER_COUNTERS).all(|c| shared::sum_provider(shared, i, c) == 0)
        {
            continue;
        }
        match providers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, indexes)) => indexes.push(i),
            None => providers.push((name, vec![i])),
        }
    }
    let sum = |indexes: &[usize], counter: usize| -> u64 {
        indexes.iter().map(|&i| shared::sum_provider(shared, i, counter)).sum()
    };

    e.family(&family::REQUESTS);
    for (name, indexes) in &providers {
        for (o, outcome) in REQUEST_OUTCOMES.iter().enumerate() {
            let labels = [("provider", name.as_str()), ("outcome", *outcome)];
            e.sample(family::REQUESTS.name, &labels, sum(indexes, shared::REQUESTS + o));
        }
    }
    for (fam, counter) in [
        (&family::LOGINS_STARTED, shared::LOGINS_STARTED),
        (&family::LOGINS_COMPLETED, shared::LOGINS_COMPLETED),
    ] {
        e.family(fam);
        for (name, indexes) in &providers {
            e.sample(fam.name, &[("provider", name)], sum(indexes, counter));
        }
    }
    e.family(&family::LOGINS_FAILED);
    for (name, indexes) in &providers {
        for (f, reason) in LOGIN_FAILURES.iter().enumerate() {
            let labels = [("provider", name.as_str()), ("reason", *reason)];
            e.sample(family::LOGINS_FAILED.name, &labels, sum(indexes, shared::LOGINS_FAILED + f));
        }
    }
    e.family(&family::CALL_DURATION);
    for (name, indexes) in &providers {
        for (n, endpoint) in ENDPOINTS.iter().enumerate() {
            let base = shared::CALLS + n * shared::CALL_STRIDE;
            let mut buckets = [0u64; shared::BUCKETS];
            for (b, bucket) in buckets.iter_mut().enumerate() {
                *bucket = sum(indexes, base + b);
            }
            let sum_us = sum(indexes, base + shared::BUCKETS);
            let labels = [("provider", name.as_str()), ("endpoint", *endpoint)];
            e.histogram(&family::CALL_DURATION, &labels, &buckets, sum_us);
        }
    }

    let usage: Vec<_> = mcf.zones.iter().map(|z| (z.name.as_str(), z.usage())).collect();
    let gauges: [(&Family, UsageField); 4] = [
        (&family::ZONE_SESSIONS, |u| u.sessions),
        (&family::ZONE_PENDING_LOGINS, |u| u.pending_logins),
        (&family::ZONE_USED_BYTES, |u| u.used_bytes),
        (&family::ZONE_FREE_BYTES, |u| u.free_bytes),
    ];
    for (fam, value) in gauges {
        e.family(fam);
        for (name, u) in &usage {
            e.sample(fam.name, &[("zone", name)], value(u));
        }
    }
    e.family(&family::ZONE_EVICTIONS);
    let mut zones: Vec<(String, u64)> = Vec::new();
    for (i, label) in shared.zones.iter().enumerate() {
        let Some(name) = label.name() else { continue };
        let evicted = shared::sum_zone(shared, i, shared::ZONE_EVICTIONS);
        if i == shared.zones.len() - 1 && evicted == 0 {
            continue;
        }
        match zones.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += evicted,
            None => zones.push((name, evicted)),
        }
    }
    for (name, evicted) in zones {
        e.sample(family::ZONE_EVICTIONS.name, &[("zone", &name)], evicted);
    }

    for (g, fam) in GAUGE_FAMILIES.iter().enumerate() {
        let cell = &shared.gauges[g];
        if cell.set.load(Ordering::Acquire) != 0 {
            e.family(fam);
            e.sample(fam.name, &[], Value::Int(cell.value.load(Ordering::Relaxed)));
        }
    }
    e.finish()
}

/// One number of a zone's usage.
type UsageField = fn(&crate::store::ZoneUsage) -> usize;

/// The global gauges' families, in [`Gauge`] order.
const GAUGE_FAMILIES: [Family; GAUGES] = [
    Family {
        name: "authentik_outpost_last_sync_timestamp_seconds",
        help: "Unix time of the last successful sync with authentik's outpost API.",
        kind: Kind::Gauge,
    },
    Family {
        name: "authentik_outpost_generation",
        help: "Generation of the outpost configuration in use.",
        kind: Kind::Gauge,
    },
    Family {
        name: "authentik_outpost_websocket_connected",
        help: "1 while the outpost's websocket to authentik is connected.",
        kind: Kind::Gauge,
    },
];
