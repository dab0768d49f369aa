//! The outpost's life with authentik, as one blocking loop (the background task's thread):
//! fetch the outpost and its providers, keep the websocket open (HELLO every 10 s, reconnect
//! with backoff from 1 s to 5 min), refetch on TRIGGER_UPDATE (after a random 0-9 s, as
//! authentik's outpost does so that replicas do not fetch at once) and every refresh interval,
//! and pass SESSION_END on. What it finds goes to an [`OutpostEvents`]; nothing here knows nginx.

use std::time::{Duration, Instant};

use crate::outpost::api::{refresh_interval, OutpostApi, Snapshot};
use crate::outpost::ws::{self, Connection, Event};
use crate::outpost::{OutpostError, OutpostOptions};

/// Time between two HELLOs (authentik marks an outpost unhealthy after 1.5 times this).
pub const HELLO_INTERVAL: Duration = Duration::from_secs(10);
/// First and last wait before reconnecting the websocket.
pub const RECONNECT_MIN: Duration = Duration::from_secs(1);
pub const RECONNECT_MAX: Duration = Duration::from_secs(300);
/// After a failed fetch: the first retry, doubling up to the refresh interval.
const FETCH_RETRY_MIN: Duration = Duration::from_secs(3);
/// A failure that goes on is logged again at most this often.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Longest wait between two looks at the stop flag and the websocket.
const TICK: Duration = Duration::from_millis(250);
/// TRIGGER_UPDATE waits a random delay below this.
const TRIGGER_DELAY_MAX_MS: u64 = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Notice,
    Warn,
    Error,
}

/// Where the loop's results go.
pub trait OutpostEvents {
    /// A configuration was fetched.
    fn publish(&mut self, snapshot: &Snapshot);
    /// authentik ended a session: every session whose `sid` is `session_id` must go.
    fn session_end(&mut self, session_id: &str);
    /// The websocket opened or closed.
    fn connected(&mut self, connected: bool);
    fn log(&mut self, severity: Severity, message: String);
    /// Sleeps `d` unless asked to stop; `false` when the loop must end.
    fn sleep(&mut self, d: Duration) -> bool;
    fn stopping(&self) -> bool;
}

/// Remembers when a kind of failure was last logged, so that one that goes on is logged once
/// per interval and its end once.
#[derive(Default)]
struct FailureLog {
    last: Option<Instant>,
    failing: bool,
}

impl FailureLog {
    fn failed(&mut self, events: &mut dyn OutpostEvents, severity: Severity, message: String) {
        let now = Instant::now();
        if self.last.is_none_or(|t| now.duration_since(t) >= FAILURE_LOG_INTERVAL) {
            self.last = Some(now);
            events.log(severity, message);
        }
        self.failing = true;
    }

    /// The failure ended: `true` the first time (the caller logs the recovery).
    fn recovered(&mut self) -> bool {
        let was = self.failing;
        self.failing = false;
        self.last = None;
        was
    }
}

/// How an error reads in the log: a rejected token says so plainly.
fn describe(what: &str, e: &OutpostError) -> (Severity, String) {
    match e {
        OutpostError::Rejected { .. } => (
            Severity::Error,
            format!("authentik rejected the outpost token: {what}: {e}; check \"token_file\""),
        ),
        _ => (Severity::Error, format!("{what}: {e}")),
    }
}

fn random_below(max_ms: u64) -> Duration {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    Duration::from_millis(u64::from_le_bytes(b) % max_ms.max(1))
}

/// Runs until `events.stopping()`. `known` is the configuration the module already runs on
/// (shared memory after a reload, or `state_file`), so the websocket can open before the
/// first fetch succeeds.
pub fn run(options: &OutpostOptions, known: Option<Snapshot>, events: &mut dyn OutpostEvents) {
    let api = match OutpostApi::new(options) {
        Ok(api) => api,
        Err(e) => {
            events.log(Severity::Error, format!("outpost not started: {e}"));
            return;
        }
    };
    let instance_uuid = ws::instance_uuid();
    let mut pk = known.as_ref().map(|s| s.outpost.pk.clone());
    let mut interval = options.refresh.unwrap_or_else(|| {
        known
            .as_ref()
            .map_or(Duration::from_secs(300), |s| refresh_interval(s.outpost.refresh_interval_s))
    });
    let mut next_fetch = Instant::now();
    let mut fetch_retry = FETCH_RETRY_MIN;
    let mut fetch_log = FailureLog::default();
    let mut trigger: Option<Instant> = None;

    let mut socket: Option<Connection> = None;
    let mut attempt: u64 = 0;
    let mut reconnect_wait = RECONNECT_MIN;
    let mut next_connect = Instant::now();
    let mut next_hello = Instant::now();
    let mut ws_log = FailureLog::default();

    while !events.stopping() {
        let now = Instant::now();
        if now >= next_fetch || trigger.is_some_and(|t| now >= t) {
            trigger = None;
            match api.fetch() {
                Ok(snapshot) => {
                    if fetch_log.recovered() {
                        events.log(Severity::Notice, "outpost configuration fetched again".into());
                    }
                    pk = Some(snapshot.outpost.pk.clone());
                    interval = options
                        .refresh
                        .unwrap_or_else(|| refresh_interval(snapshot.outpost.refresh_interval_s));
                    events.publish(&snapshot);
                    fetch_retry = FETCH_RETRY_MIN;
                    next_fetch = Instant::now() + interval;
                }
                Err(e) => {
                    let (severity, message) =
                        describe("cannot fetch the outpost configuration", &e);
                    fetch_log.failed(events, severity, message);
                    next_fetch = Instant::now() + fetch_retry.min(interval);
                    fetch_retry = (fetch_retry * 2).min(interval);
                }
            }
            continue;
        }

        if socket.is_none() && now >= next_connect {
            if let Some(pk) = &pk {
                attempt += 1;
                let opened = ws::url(&options.url, pk, &instance_uuid, attempt)
                    .map_err(|reason| OutpostError::Invalid {
                        url: options.url.to_string(),
                        reason,
                    })
                    .and_then(|url| Connection::open(options, &url, TICK));
                match opened {
                    Ok(mut connection) => {
                        match connection.send(ws::hello(&instance_uuid, &options.hostname)) {
                            Ok(()) => {
                                if ws_log.recovered() || attempt == 1 {
                                    events.log(
                                        Severity::Notice,
                                        "websocket to authentik connected".into(),
                                    );
                                }
                                events.connected(true);
                                next_hello = Instant::now() + HELLO_INTERVAL;
                                reconnect_wait = RECONNECT_MIN;
                                socket = Some(connection);
                            }
                            Err(e) => {
                                ws_log.failed(
                                    events,
                                    Severity::Warn,
                                    format!("websocket to authentik: {e}"),
                                );
                                next_connect = Instant::now() + reconnect_wait;
                                reconnect_wait = (reconnect_wait * 2).min(RECONNECT_MAX);
                            }
                        }
                    }
                    Err(e) => {
                        let (severity, message) =
                            describe("cannot open the websocket to authentik", &e);
                        ws_log.failed(events, severity, message);
                        next_connect = Instant::now() + reconnect_wait;
                        reconnect_wait = (reconnect_wait * 2).min(RECONNECT_MAX);
                    }
                }
                continue;
            }
        }

        let Some(connection) = socket.as_mut() else {
            let wake = [next_fetch, next_connect, trigger.unwrap_or(next_fetch)]
                .into_iter()
                .min()
                .unwrap_or(now);
            let wait = wake.saturating_duration_since(now).clamp(Duration::from_millis(10), TICK);
            if !events.sleep(wait) {
                break;
            }
            continue;
        };
        let mut lost: Option<String> = None;
        if now >= next_hello {
            next_hello = now + HELLO_INTERVAL;
            if let Err(e) = connection.send(ws::hello(&instance_uuid, &options.hostname)) {
                lost = Some(e);
            }
        }
        if lost.is_none() {
            match connection.receive() {
                Ok(Some(text)) => match ws::parse_event(&text) {
                    Ok(Event::TriggerUpdate) => {
                        if trigger.is_none() {
                            trigger = Some(Instant::now() + random_below(TRIGGER_DELAY_MAX_MS));
                        }
                    }
                    Ok(Event::SessionEnd(id)) => events.session_end(&id),
                    Ok(Event::Other) => {}
                    Err(e) => events.log(
                        Severity::Warn,
                        format!("unexpected websocket message from authentik: {e}"),
                    ),
                },
                Ok(None) => {}
                Err(e) => lost = Some(e),
            }
        }
        if let Some(reason) = lost {
            socket = None;
            events.connected(false);
            ws_log.failed(
                events,
                Severity::Warn,
                format!("websocket to authentik lost: {reason}, reconnecting"),
            );
            next_connect = Instant::now() + reconnect_wait;
            reconnect_wait = (reconnect_wait * 2).min(RECONNECT_MAX);
        }
    }
    if let Some(connection) = socket {
        connection.close();
        events.connected(false);
    }
}
