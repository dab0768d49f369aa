//! The store task: per zone with `store=`, worker 0 subscribes to the store's revocation
//! channel (`<prefix>revoke`: sign-out and SESSION_END on any node) and to its expired and
//! evicted keyspace notifications (`notify-keyspace-events` must include `Exe` for eviction to
//! reach the zones; expiry is checked in the zone anyway). The thread queues what it hears; the
//! supervisor's tick deletes the sessions from the zone on the event loop, within a second.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use authentik_core::remote::{RemoteStore, Revocation};
use authentik_core::session::SessionId;
use nginx_sys::{ngx_cycle_t, NGX_LOG_INFO};
use ngx::ngx_log_error;

use super::{Context, Level, Task};
use crate::conf::MainConf;
use crate::store::{SessionStore, SessionZone};

/// Revocations queued between two supervisor ticks, at most.
const MAX_QUEUED: usize = 100_000;
/// How often, at most, the task says the store is still unreachable.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);

type Queue = Arc<Mutex<Vec<Revocation>>>;

/// One task per zone that has a store.
pub fn tasks(cycle: &ngx_cycle_t, mcf: &MainConf) -> Vec<Task> {
    let log = cycle.log;
    let mut tasks = Vec::new();
    for zone in &mcf.zones {
        let Some(store) = zone.remote.clone() else { continue };
        let queue: Queue = Arc::default();
        let queued = queue.clone();
        let zone_ptr: *const SessionZone = &**zone;
        let tick = move || {
            let revoked =
                core::mem::take(&mut *queued.lock().unwrap_or_else(PoisonError::into_inner));
            if revoked.is_empty() {
                return;
            }
            // SAFETY: the zone lives in the cycle's configuration, which outlives the
            // supervisor's timer (stopped in exit_process before the cycle goes).
            let zone = unsafe { &*zone_ptr };
            let removed: usize = revoked
                .iter()
                .map(|r| match r {
                    Revocation::Id(id) => usize::from(zone.remove_by_id(&SessionId(*id))),
                    Revocation::Sub(sub) => zone.remove_by_sub(sub),
                    Revocation::Sid(sid) => zone.remove_by_sid(sid),
                })
                .sum();
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "authentik: {} revocation(s) from the session store, {} session(s) deleted from zone \"{}\"",
                revoked.len(),
                removed,
                zone.name
            );
        };
        tasks.push(Task {
            name: "store",
            run: Box::new(move |ctx| run(ctx, store, queue)),
            tick: Some(Box::new(tick)),
        });
    }
    tasks
}

fn run(ctx: &Context, store: Arc<RemoteStore>, queue: Queue) {
    let url = store.settings.display_url();
    let mut failing_since_report: Option<Instant> = None;
    let mut was_down = false;
    while !ctx.stopping() {
        let mut subscribed = false;
        let ended = store.listen(
            || ctx.stopping(),
            || {
                subscribed = true;
                let msg = if was_down {
                    format!("session store {url} is reachable again, revocations resume")
                } else {
                    format!("subscribed to revocations of session store {url}")
                };
                ctx.log(Level::Notice, msg);
            },
            |revocation| {
                let mut q = queue.lock().unwrap_or_else(PoisonError::into_inner);
                if q.len() < MAX_QUEUED {
                    q.push(revocation);
                }
            },
        );
        let Some(error) = ended else { return };
        if subscribed {
            failing_since_report = None;
        }
        if failing_since_report.is_none_or(|t| t.elapsed() >= REPORT_INTERVAL) {
            ctx.log(
                Level::Error,
                format!("{error}; revocations from other nodes wait until it returns"),
            );
            failing_since_report = Some(Instant::now());
        }
        was_down = true;
        if !ctx.sleep(Duration::from_secs(1)) {
            return;
        }
    }
}
