//! The metrics zone in shared memory: label tables (providers, session zones), global gauges
//! and one block of counters per worker slot.
//!
//! The hot path never takes a lock: a worker adds to its own slot (`ngx_worker` modulo
//! [`WORKER_SLOTS`]) with a relaxed atomic add on a cache line no other worker writes (two
//! processes share a slot only while an old worker drains after a reload, or with more than
//! `WORKER_SLOTS` workers; the adds stay exact, they only contend). A scrape sums the slots.
//!
//! Labels (`authentik_core::metrics::labels`) are claimed, never released, with a
//! compare-and-swap per entry: providers known at configuration time at zone initialisation,
//! providers added at run time whenever they appear (`metrics::attach_provider`). Two processes
//! claiming the same new name at once may take two entries: the scrape adds them together.

use core::mem::size_of;
use core::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use authentik_core::metrics::labels::{self, Label};
use authentik_core::metrics::{ENDPOINTS, LATENCY_BUCKETS_US, LOGIN_FAILURES, REQUEST_OUTCOMES};

/// Bumped (and the zone's name with it) whenever this layout changes.
pub const MAGIC: u64 = 0x6e61_6b5f_6d65_0001;

/// Distinct provider names the zone can count for until nginx restarts; the last entry is
/// `_other`, where any further provider (or a name longer than `labels::MAX_LABEL`) is counted.
pub const MAX_PROVIDERS: usize = 64;
/// Distinct session zone names, likewise.
pub const MAX_ZONES: usize = 16;
/// Counter blocks; a worker uses block `ngx_worker % WORKER_SLOTS`.
pub const WORKER_SLOTS: usize = 32;

/* one provider's counters, by index */

pub const REQUESTS: usize = 0;
pub const LOGINS_STARTED: usize = REQUESTS + REQUEST_OUTCOMES.len();
pub const LOGINS_COMPLETED: usize = LOGINS_STARTED + 1;
pub const LOGINS_FAILED: usize = LOGINS_COMPLETED + 1;
/// Per endpoint: the buckets (`+Inf` last), the sum in microseconds.
pub const CALLS: usize = LOGINS_FAILED + LOGIN_FAILURES.len();
pub const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;
pub const CALL_STRIDE: usize = BUCKETS + 1;
const PROVIDER_USED: usize = CALLS + ENDPOINTS.len() * CALL_STRIDE;
/// Rounded up to whole cache lines.
pub const PROVIDER_COUNTERS: usize = PROVIDER_USED.div_ceil(8) * 8;

/* one session zone's counters */

pub const ZONE_EVICTIONS: usize = 0;
pub const ZONE_COUNTERS: usize = 8;

/* global gauges */

/// Values set by whoever owns them (the outpost's background task), exported once set.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// Unix time of the last successful sync with authentik's outpost API.
    LastOutpostSync,
    /// Generation (revision) of the outpost configuration in use.
    OutpostGeneration,
    /// 1 while the outpost's websocket to authentik is connected, else 0.
    WebsocketConnected,
}

pub const GAUGES: usize = 3;

#[repr(C)]
pub struct GaugeCell {
    pub set: AtomicU32,
    pub value: AtomicI64,
}

#[repr(C, align(64))]
pub struct WorkerSlot {
    pub providers: [[AtomicU64; PROVIDER_COUNTERS]; MAX_PROVIDERS],
    pub zones: [[AtomicU64; ZONE_COUNTERS]; MAX_ZONES],
}

/// The zone's contents. All-zero is the empty state (fresh shared memory is zero).
#[repr(C)]
pub struct Shared {
    pub magic: u64,
    pub providers: [Label; MAX_PROVIDERS],
    pub zones: [Label; MAX_ZONES],
    pub gauges: [GaugeCell; GAUGES],
    pub slots: [WorkerSlot; WORKER_SLOTS],
}

pub const SHARED_SIZE: usize = size_of::<Shared>();

pub use labels::register;

/// Writes the overflow entries' names (a fresh, zeroed zone, before any worker runs).
pub fn init(shared: &Shared) {
    labels::init_overflow(&shared.providers);
    labels::init_overflow(&shared.zones);
}

/// This process's counter block.
pub fn worker_slot(shared: &Shared) -> &WorkerSlot {
    // SAFETY: `ngx_worker` is written once by nginx when the worker starts, before any request.
    let worker = unsafe { core::ptr::addr_of!(nginx_sys::ngx_worker).read() };
    &shared.slots[worker % WORKER_SLOTS]
}

/// A counter summed over every slot.
pub fn sum_provider(shared: &Shared, provider: usize, counter: usize) -> u64 {
    shared.slots.iter().map(|s| s.providers[provider][counter].load(Ordering::Relaxed)).sum()
}

pub fn sum_zone(shared: &Shared, zone: usize, counter: usize) -> u64 {
    shared.slots.iter().map(|s| s.zones[zone][counter].load(Ordering::Relaxed)).sum()
}
