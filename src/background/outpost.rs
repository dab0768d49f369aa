//! The outpost task: worker 0's link to authentik (`authentik_core::outpost::sync` on the
//! task's thread). What it fetches goes into the `authentik_outpost` zone (every worker picks
//! the new generation up on its next request) and into `state_file`; authentik's SESSION_END
//! is queued for the supervisor, which deletes the sessions on the event loop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use authentik_core::outpost::api::Snapshot;
use authentik_core::outpost::provider::build;
use authentik_core::outpost::sync::{self, OutpostEvents, Severity};
use authentik_core::outpost::OutpostOptions;
use authentik_core::remote::Revocation;
use nginx_sys::{ngx_cycle_t, NGX_LOG_INFO};
use ngx::ngx_log_error;

use super::{Context, Level, Task};
use crate::conf::MainConf;
use crate::metrics::{Gauge, GaugeHandle};
use crate::outpost::zone::OutpostZone;
use crate::store::{SessionStore, SessionZone};

/// SESSION_END messages queued between two supervisor ticks, at most.
const MAX_QUEUED_ENDS: usize = 10_000;

type Ends = Arc<Mutex<Vec<String>>>;

/// The outpost task of `cycle`, if `authentik_outpost` is configured.
pub fn task(cycle: &ngx_cycle_t, mcf: &MainConf) -> Option<Task> {
    let outpost = mcf.outpost.as_deref()?;
    let zone = OutpostZone::of(outpost.shm_zone)?;
    let options = outpost.options.clone();
    let gauges = crate::metrics::gauge_handle(mcf);
    let state_file = outpost.state_file.clone();
    let ends: Ends = Arc::default();
    let queued = ends.clone();
    let zones: Vec<*const SessionZone> =
        mcf.zones.iter().map(|z| &**z as *const SessionZone).collect();
    let log = cycle.log;
    let tick = move || {
        let ended = core::mem::take(&mut *queued.lock().unwrap_or_else(PoisonError::into_inner));
        for sid in ended {
            // SAFETY: the session zones live in the cycle's configuration, which outlives the
            // supervisor's timer (stopped in exit_process before the cycle goes).
            let removed: usize = zones.iter().map(|z| unsafe { &**z }.remove_by_sid(&sid)).sum();
            // With a shared store: delete them there too, and tell the nodes that have no
            // websocket of their own (or whose websocket is down).
            for z in &zones {
                // SAFETY: as above.
                let remote = &unsafe { &**z }.remote;
                let revocation = Revocation::Sid(sid.clone());
                crate::remote::revoke(remote, revocation, crate::session::now());
            }
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "authentik: session ended in authentik, {} session(s) deleted",
                removed
            );
        }
    };
    Some(Task {
        name: "outpost",
        run: Box::new(move |ctx| run(ctx, zone, options, state_file, ends, gauges)),
        tick: Some(Box::new(tick)),
    })
}

fn run(
    ctx: &Context,
    zone: OutpostZone,
    options: OutpostOptions,
    state_file: Option<PathBuf>,
    ends: Ends,
    gauges: Option<GaugeHandle>,
) {
    let mut events = Events { ctx, zone, options: options.clone(), state_file, ends, gauges };
    let known = events.known();
    sync::run(&options, known, &mut events);
}

struct Events<'a> {
    ctx: &'a Context,
    zone: OutpostZone,
    options: OutpostOptions,
    state_file: Option<PathBuf>,
    ends: Ends,
    /// The outpost gauges of `authentik_metrics`, when counting is on.
    gauges: Option<GaugeHandle>,
}

impl Events<'_> {
    /// The configuration in place (after a reload), else the one in `state_file` (put in
    /// place, so that workers serve it while authentik is down).
    fn known(&mut self) -> Option<Snapshot> {
        if let Ok(Some(bytes)) = self.zone.snapshot_bytes() {
            if let Ok(snapshot) = Snapshot::decode(&bytes) {
                return Some(snapshot);
            }
        }
        let path = self.state_file.clone()?;
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                self.log(
                    Severity::Warn,
                    format!("cannot read state_file \"{}\": {e}", path.display()),
                );
                return None;
            }
        };
        let snapshot = match Snapshot::decode(&bytes) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.log(
                    Severity::Warn,
                    format!("state_file \"{}\" is not usable: {e}", path.display()),
                );
                return None;
            }
        };
        match self.zone.write(&bytes, 0) {
            Ok(generation) => self.log(
                Severity::Notice,
                format!(
                    "outpost \"{}\": {} providers from state_file \"{}\" (generation {generation})",
                    snapshot.outpost.name,
                    snapshot.providers.len(),
                    path.display()
                ),
            ),
            Err(e) => self.log(Severity::Warn, format!("state_file not used: {e}")),
        }
        Some(snapshot)
    }
}

impl OutpostEvents for Events<'_> {
    fn publish(&mut self, snapshot: &Snapshot) {
        let bytes = snapshot.encode();
        if self.zone.holds(&bytes).unwrap_or(false) {
            return;
        }
        // Say once per new configuration which providers cannot be used, and why.
        for p in &snapshot.providers {
            if let Err(e) = build(p, &snapshot.outpost, &self.options) {
                self.log(Severity::Warn, format!("{e}, provider not used"));
            }
        }
        let fetched_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(g) = &self.gauges {
            g.set(Gauge::LastOutpostSync, fetched_at as i64);
        }
        match self.zone.write(&bytes, fetched_at) {
            Ok(generation) => {
                if let Some(g) = &self.gauges {
                    g.set(Gauge::OutpostGeneration, generation as i64);
                }
                self.log(
                    Severity::Notice,
                    format!(
                        "outpost \"{}\": {} providers (generation {generation})",
                        snapshot.outpost.name,
                        snapshot.providers.len()
                    ),
                )
            }
            Err(e) => {
                self.log(Severity::Error, format!("outpost configuration not used: {e}"));
                return;
            }
        }
        if let Some(path) = self.state_file.clone() {
            if let Err(e) = write_state_file(&path, &bytes) {
                self.log(
                    Severity::Warn,
                    format!("cannot write state_file \"{}\": {e}", path.display()),
                );
            }
        }
    }

    fn session_end(&mut self, session_id: &str) {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        if ends.len() < MAX_QUEUED_ENDS {
            ends.push(session_id.to_owned());
        }
    }

    fn connected(&mut self, connected: bool) {
        self.zone.set_connected(connected);
        if let Some(g) = &self.gauges {
            g.set(Gauge::WebsocketConnected, connected as i64);
        }
    }

    fn log(&mut self, severity: Severity, message: String) {
        let level = match severity {
            Severity::Notice => Level::Notice,
            Severity::Warn => Level::Warn,
            Severity::Error => Level::Error,
        };
        self.ctx.log(level, message);
    }

    fn sleep(&mut self, d: Duration) -> bool {
        self.ctx.sleep(d)
    }

    fn stopping(&self) -> bool {
        self.ctx.stopping()
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, readable by its owner only
/// (it holds the providers' client secrets).
fn write_state_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
