//! The Prometheus text exposition format (version 0.0.4) and the metric families the module
//! exports: names, help texts, types and label values in one place, so the glue's counters,
//! the README and the tests agree.

use std::fmt::Write as _;

/// A metric family's type, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: `# HELP` and `# TYPE` lines, then its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

/// How a request to a protected location ended, as `outcome` of `authentik_requests_total`.
/// The glue's counters are indexed in this order.
pub const REQUEST_OUTCOMES: [&str; 6] =
    ["session", "header_auth", "unauth_path", "login_redirect", "unauthorized", "forbidden"];

/// Why a login failed, as `reason` of `authentik_logins_failed_total`; counters in this order.
pub const LOGIN_FAILURES: [&str; 8] = [
    "invalid_state",
    "provider_denied",
    "provider_unavailable",
    "token_invalid",
    "session_too_large",
    "store_full",
    "busy",
    "bad_request",
];

/// The provider endpoints a call is timed against, as `endpoint`; counters in this order.
pub const ENDPOINTS: [&str; 5] = ["discovery", "jwks", "token", "userinfo", "introspection"];

/// Upper bounds of the call-latency histogram's buckets, in microseconds (`+Inf` follows).
pub const LATENCY_BUCKETS_US: [u64; 11] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// The bucket a call of `micros` falls in: the first bound it does not exceed, or the last
/// (`+Inf`) index, `LATENCY_BUCKETS_US.len()`.
pub fn bucket_index(micros: u64) -> usize {
    LATENCY_BUCKETS_US.iter().position(|&bound| micros <= bound).unwrap_or(LATENCY_BUCKETS_US.len())
}

pub mod family {
    use super::{Family, Kind};

    pub const REQUESTS: Family = Family {
        name: "authentik_requests_total",
        help: "Requests to protected locations, by provider and outcome.",
        kind: Kind::Counter,
    };
    pub const LOGINS_STARTED: Family = Family {
        name: "authentik_logins_started_total",
        help: "Logins started: redirects to the provider's authorization endpoint.",
        kind: Kind::Counter,
    };
    pub const LOGINS_COMPLETED: Family = Family {
        name: "authentik_logins_completed_total",
        help: "Logins completed: sessions created.",
        kind: Kind::Counter,
    };
    pub const LOGINS_FAILED: Family = Family {
        name: "authentik_logins_failed_total",
        help: "Logins that ended with an error page, by reason.",
        kind: Kind::Counter,
    };
    pub const CALL_DURATION: Family = Family {
        name: "authentik_provider_call_duration_seconds",
        help: "Duration of calls to the provider, by endpoint (failed calls included).",
        kind: Kind::Histogram,
    };
    pub const ZONE_SESSIONS: Family = Family {
        name: "authentik_zone_sessions",
        help: "Sessions in the session zone (expired ones not yet collected included).",
        kind: Kind::Gauge,
    };
    pub const ZONE_PENDING_LOGINS: Family = Family {
        name: "authentik_zone_pending_logins",
        help: "Logins started and not yet completed or expired, in the session zone.",
        kind: Kind::Gauge,
    };
    pub const ZONE_USED_BYTES: Family = Family {
        name: "authentik_zone_used_bytes",
        help: "Bytes of the session zone in use (pages; pending-login slots are reserved).",
        kind: Kind::Gauge,
    };
    pub const ZONE_FREE_BYTES: Family = Family {
        name: "authentik_zone_free_bytes",
        help: "Free bytes of the session zone (pages).",
        kind: Kind::Gauge,
    };
    pub const ZONE_EVICTIONS: Family = Family {
        name: "authentik_zone_evictions_total",
        help: "Sessions evicted, least recently used first, to make room for new ones.",
        kind: Kind::Counter,
    };
}

/// Builds an exposition: families in order, each with its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// `# HELP` and `# TYPE` of `family`; its samples follow.
    pub fn family(&mut self, family: &Family) {
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(self.out, "# TYPE {} {}", family.name, kind);
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"");
                escape_label_value(&mut self.out, text);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = match value.into() {
            Value::Int(v) => writeln!(self.out, " {v}"),
            Value::Float(v) => writeln!(self.out, " {v}"),
        };
    }

    /// A histogram's samples from non-cumulative bucket counts (`LATENCY_BUCKETS_US` and
    /// `+Inf`) and the sum of the observations in microseconds.
    pub fn histogram(
        &mut self,
        family: &Family,
        labels: &[(&str, &str)],
        buckets: &[u64; LATENCY_BUCKETS_US.len() + 1],
        sum_us: u64,
    ) {
        let bucket_name = format!("{}_bucket", family.name);
        let mut cumulative = 0u64;
        for (i, count) in buckets.iter().enumerate() {
            cumulative += count;
            let le = match LATENCY_BUCKETS_US.get(i) {
                Some(bound) => format!("{}", *bound as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket_name, &with_le, cumulative);
        }
        self.sample(&format!("{}_sum", family.name), labels, Value::Float(sum_us as f64 / 1e6));
        self.sample(&format!("{}_count", family.name), labels, cumulative);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A sample's value.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::from(v as u64)
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape_label_value(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
}

/// Label tables in shared memory: a fixed array of entries, each a label value claimed once
/// (compare-and-swap) and never released, so that counters can be indexed by entry. Atomics
/// only: a table lives in memory that several processes read and write at once.
pub mod labels {
    use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    /// The longest label value an entry holds, bytes.
    pub const MAX_LABEL: usize = 120;
    /// The label of the last entry of every table: what does not fit elsewhere.
    pub const OVERFLOW_LABEL: &str = "_other";

    const FREE: u32 = 0;
    const CLAIMED: u32 = 1;
    const READY: u32 = 2;
    const WORDS: usize = MAX_LABEL / 8;

    /// One entry; all-zero is a free entry.
    #[repr(C)]
    pub struct Label {
        /// FREE, CLAIMED (being written) or READY.
        state: AtomicU32,
        len: AtomicU32,
        /// The name's bytes, 8 to a word, little-endian; written before READY is published.
        name: [AtomicU64; WORDS],
    }

    impl Label {
        /// A free entry (tests; in shared memory, zeroed memory).
        pub fn new() -> Label {
            Label { state: AtomicU32::new(FREE), len: AtomicU32::new(0), name: Default::default() }
        }

        /// The entry's name, once it is ready.
        pub fn name(&self) -> Option<String> {
            if self.state.load(Ordering::Acquire) != READY {
                return None;
            }
            let len = (self.len.load(Ordering::Relaxed) as usize).min(MAX_LABEL);
            let mut bytes = Vec::with_capacity(WORDS * 8);
            for word in &self.name {
                bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
            bytes.truncate(len);
            String::from_utf8(bytes).ok()
        }

        fn is_named(&self, name: &str) -> bool {
            self.name().as_deref() == Some(name)
        }

        /// Writes `name` (at most `MAX_LABEL` bytes) into an entry this process owns (claimed,
        /// or not yet seen by any other process), then publishes it.
        fn publish(&self, name: &str) {
            let mut padded = [0u8; WORDS * 8];
            padded[..name.len()].copy_from_slice(name.as_bytes());
            for (word, chunk) in self.name.iter().zip(padded.chunks_exact(8)) {
                let mut eight = [0u8; 8];
                eight.copy_from_slice(chunk);
                word.store(u64::from_le_bytes(eight), Ordering::Relaxed);
            }
            self.len.store(name.len() as u32, Ordering::Relaxed);
            self.state.store(READY, Ordering::Release);
        }
    }

    impl Default for Label {
        fn default() -> Label {
            Label::new()
        }
    }

    /// The index of `name` in `table`, claiming a free entry if it is new; the last entry
    /// (`_other`) when the table is full or the name too long. Two processes claiming one new
    /// name at the same moment may take two entries: readers add entries of one name together.
    pub fn register(table: &[Label], name: &str) -> usize {
        let overflow = table.len() - 1;
        if name.len() > MAX_LABEL || name == OVERFLOW_LABEL {
            return overflow;
        }
        loop {
            let mut free = None;
            for (i, label) in table[..overflow].iter().enumerate() {
                match label.state.load(Ordering::Acquire) {
                    READY if label.is_named(name) => return i,
                    FREE if free.is_none() => free = Some(i),
                    _ => {}
                }
            }
            let Some(i) = free else {
                return overflow;
            };
            let claim =
                table[i].state.compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Acquire);
            if claim.is_ok() {
                table[i].publish(name);
                return i;
            }
            // Another process took that entry: look again (it may hold this very name).
        }
    }

    /// Names the table's last entry `_other` (a fresh table, before other processes see it).
    pub fn init_overflow(table: &[Label]) {
        let last = &table[table.len() - 1];
        if last.state.load(Ordering::Acquire) != READY {
            last.publish(OVERFLOW_LABEL);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn table(n: usize) -> Vec<Label> {
            let t: Vec<Label> = (0..n).map(|_| Label::new()).collect();
            init_overflow(&t);
            t
        }

        #[test]
        fn names_get_stable_indexes_and_overflow() {
            let t = table(4);
            assert_eq!(register(&t, "main"), 0);
            assert_eq!(register(&t, "other"), 1);
            assert_eq!(register(&t, "main"), 0);
            assert_eq!(register(&t, "third"), 2);
            assert_eq!(register(&t, "fourth"), 3, "full: counted under _other");
            assert_eq!(register(&t, "_other"), 3);
            assert_eq!(register(&t, &"x".repeat(MAX_LABEL + 1)), 3);
            let long = "é".repeat(MAX_LABEL / 2);
            let t = table(3);
            assert_eq!(register(&t, &long), 0);
            assert_eq!(t[0].name().as_deref(), Some(long.as_str()));
            assert_eq!(t[2].name().as_deref(), Some("_other"));
            assert_eq!(t[1].name(), None);
        }

        #[test]
        fn concurrent_claims_never_lose_a_name() {
            let t = table(64);
            std::thread::scope(|s| {
                for thread in 0..8 {
                    let t = &t;
                    s.spawn(move || {
                        for i in 0..40 {
                            let name = format!("p{}", (i * 7 + thread) % 40);
                            let index = register(t, &name);
                            assert_eq!(t[index].name().as_deref(), Some(name.as_str()));
                        }
                    });
                }
            });
            let names: Vec<_> = t[..63].iter().filter_map(Label::name).collect();
            let distinct: std::collections::BTreeSet<_> = names.iter().collect();
            assert_eq!(distinct.len(), 40, "{names:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(5_000), 0);
        assert_eq!(bucket_index(5_001), 1);
        assert_eq!(bucket_index(10_000_000), 10);
        assert_eq!(bucket_index(10_000_001), 11);
    }

    #[test]
    fn exposition_text() {
        let mut e = Exposition::new();
        e.family(&family::REQUESTS);
        e.sample(
            family::REQUESTS.name,
            &[("provider", "a\"b\\c\nd"), ("outcome", "session")],
            3u64,
        );
        let mut buckets = [0u64; 12];
        buckets[0] = 1;
        buckets[11] = 2;
        e.family(&family::CALL_DURATION);
        e.histogram(&family::CALL_DURATION, &[("endpoint", "token")], &buckets, 20_500_000);
        let text = e.finish();
        assert!(text.starts_with(
            "# HELP authentik_requests_total Requests to protected locations, by provider and outcome.\n\
             # TYPE authentik_requests_total counter\n\
             authentik_requests_total{provider=\"a\\\"b\\\\c\\nd\",outcome=\"session\"} 3\n"
        ), "{text}");
        assert!(text.contains(
            "authentik_provider_call_duration_seconds_bucket{endpoint=\"token\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "authentik_provider_call_duration_seconds_bucket{endpoint=\"token\",le=\"10\"} 1\n"
        ));
        assert!(text.contains(
            "authentik_provider_call_duration_seconds_bucket{endpoint=\"token\",le=\"+Inf\"} 3\n"
        ));
        assert!(text
            .contains("authentik_provider_call_duration_seconds_sum{endpoint=\"token\"} 20.5\n"));
        assert!(
            text.contains("authentik_provider_call_duration_seconds_count{endpoint=\"token\"} 3\n")
        );
    }
}
