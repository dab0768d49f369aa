//! The websocket to authentik (`<url path>ws/outpost/<pk>/?instance_uuid=..&attempt=..`):
//! JSON messages `{"instruction": N, "args": {...}}`, HELLO from the outpost, TRIGGER_UPDATE
//! and SESSION_END from authentik. The TCP and TLS streams are ours (connect timeout, read
//! timeout, `ca_file`); `tungstenite` does the handshake and the frames.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::WebSocket;
use url::Url;

use crate::outpost::{OutpostError, OutpostOptions};

pub const ACK: i64 = 0;
pub const HELLO: i64 = 1;
pub const TRIGGER_UPDATE: i64 = 2;
pub const SESSION_END: i64 = 4;

/// How long the TCP connect, the TLS handshake and the websocket handshake may take, as
/// authentik's outpost allows.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from authentik.
const MAX_MESSAGE: usize = 1 << 20;

/// What authentik sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    TriggerUpdate,
    /// `args.session_id`: sha256 hex of authentik's session key, the `sid` claim.
    SessionEnd(String),
    /// ACK, a provider-specific message, or something this module does not know.
    Other,
}

/// Parses one text message; `Err` for something that is not authentik's envelope.
pub fn parse_event(text: &str) -> Result<Event, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Some(instruction) = value.get("instruction").and_then(Value::as_i64) else {
        return Err("no \"instruction\"".to_owned());
    };
    match instruction {
        TRIGGER_UPDATE => Ok(Event::TriggerUpdate),
        SESSION_END => {
            let id = value.pointer("/args/session_id").and_then(Value::as_str);
            match id {
                Some(id) if !id.is_empty() && id.len() <= 256 => {
                    Ok(Event::SessionEnd(id.to_owned()))
                }
                _ => Err("SESSION_END without a \"session_id\"".to_owned()),
            }
        }
        _ => Ok(Event::Other),
    }
}

/// The HELLO message: authentik shows the version and hostname in its outpost list.
pub fn hello(instance_uuid: &str, hostname: &str) -> String {
    json!({
        "instruction": HELLO,
        "args": {
            "version": crate::outpost::VERSION,
            "buildHash": "",
            "uuid": instance_uuid,
            "hostname": hostname,
        }
    })
    .to_string()
}

/// The websocket URL: the outpost URL with ws(s), `ws/outpost/<pk>/` under its path, and the
/// instance and attempt merged into its query.
pub fn url(base: &Url, pk: &str, instance_uuid: &str, attempt: u64) -> Result<Url, String> {
    let mut url = base.join(&format!("ws/outpost/{pk}/")).map_err(|e| e.to_string())?;
    let scheme = if base.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|_| "cannot set the websocket scheme".to_owned())?;
    let kept: Vec<(String, String)> = base.query_pairs().into_owned().collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("instance_uuid", instance_uuid)
        .append_pair("attempt", &attempt.to_string());
    Ok(url)
}

/// A random (version 4) UUID naming this outpost process to authentik.
pub fn instance_uuid() -> String {
    let mut b = [0u8; 16];
    // A UUID needs no secrecy; if the OS RNG fails the time still makes it unique enough.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A plain or TLS stream to authentik.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An open websocket to authentik.
pub struct Connection {
    socket: WebSocket<Stream>,
}

/// `e` is a read that timed out (the socket is still fine).
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Connection {
    /// Connects, with `read_timeout` on every later read (so the caller can do other work).
    pub fn open(
        options: &OutpostOptions,
        url: &Url,
        read_timeout: Duration,
    ) -> Result<Connection, OutpostError> {
        let fail = |reason: String| OutpostError::Unreachable { url: redacted(url), reason };
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let host = url.host_str().ok_or_else(|| fail("no host".to_owned()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = (host, port).to_socket_addrs().map_err(|e| fail(e.to_string()))?;
        let mut last = "no address".to_owned();
        let mut tcp = None;
        for addr in addrs {
            let left =
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let tcp = tcp.ok_or_else(|| fail(last))?;
        let left =
            || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        tcp.set_read_timeout(Some(left())).map_err(|e| fail(e.to_string()))?;
        tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| fail(e.to_string()))?;
        tcp.set_nodelay(true).ok();
        let stream = if url.scheme() == "wss" {
            let connector = tls_connector(options)?;
            let tls = connector.connect(host, tcp).map_err(|e| fail(format!("TLS: {e}")))?;
            Stream::Tls(Box::new(tls))
        } else {
            Stream::Plain(tcp)
        };
        let mut request = url.as_str().into_client_request().map_err(|e| fail(e.to_string()))?;
        let headers = request.headers_mut();
        let bearer = format!("Bearer {}", options.token);
        headers.insert("Authorization", bearer.parse().map_err(|_| fail("bad token".into()))?);
        let agent = crate::outpost::api::user_agent();
        headers.insert("User-Agent", agent.parse().map_err(|_| fail("bad agent".into()))?);
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let mut attempt = tungstenite::client::client_with_config(request, stream, Some(config));
        let socket = loop {
            match attempt {
                Ok((socket, _)) => break socket,
                Err(HandshakeError::Interrupted(mid)) if Instant::now() < deadline => {
                    attempt = mid.handshake();
                }
                Err(HandshakeError::Interrupted(_)) => {
                    return Err(fail("handshake timed out".into()))
                }
                Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                    let status = response.status().as_u16();
                    if matches!(status, 401 | 403) {
                        return Err(OutpostError::Rejected { url: redacted(url), status });
                    }
                    return Err(OutpostError::Status { url: redacted(url), status });
                }
                Err(HandshakeError::Failure(e)) => return Err(fail(e.to_string())),
            }
        };
        socket
            .get_ref()
            .tcp()
            .set_read_timeout(Some(read_timeout))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Connection { socket })
    }

    pub fn send(&mut self, text: String) -> Result<(), String> {
        self.socket.send(tungstenite::Message::text(text)).map_err(|e| e.to_string())
    }

    /// The next message, `Ok(None)` when none came within the read timeout (pings are
    /// answered); `Err` when the connection is gone.
    pub fn receive(&mut self) -> Result<Option<String>, String> {
        match self.socket.read() {
            Ok(tungstenite::Message::Text(text)) => Ok(Some(text.as_str().to_owned())),
            Ok(tungstenite::Message::Close(_)) => Err("closed by authentik".to_owned()),
            Ok(_) => {
                // A ping's pong is queued: flush it (a timeout here is harmless).
                match self.socket.flush() {
                    Ok(()) => Ok(None),
                    Err(tungstenite::Error::Io(e)) if is_timeout(&e) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn close(mut self) {
        let _ = self.socket.close(None);
        let _ = self.socket.flush();
    }
}

/// The URL without its query (the attempt counter changes every time; nothing secret is in
/// it, but log lines stay shorter and stable).
fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

fn tls_connector(options: &OutpostOptions) -> Result<native_tls::TlsConnector, OutpostError> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = &options.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| OutpostError::CaFile(format!("{}: {e}", path.display())))?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .map_err(|e| OutpostError::CaFile(format!("{}: {e}", path.display())))?;
        builder.disable_built_in_roots(true);
        for cert in certs {
            builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| OutpostError::CaFile(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        assert_eq!(parse_event(r#"{"instruction":2,"args":{}}"#), Ok(Event::TriggerUpdate));
        assert_eq!(
            parse_event(
                r#"{"instruction":4,"args":{"type":"event.session.end","session_id":"ab"}}"#
            ),
            Ok(Event::SessionEnd("ab".into()))
        );
        assert_eq!(parse_event(r#"{"instruction":0,"args":{}}"#), Ok(Event::Other));
        assert_eq!(parse_event(r#"{"instruction":3}"#), Ok(Event::Other));
        assert!(parse_event(r#"{"instruction":4,"args":{}}"#).is_err());
        assert!(parse_event(r#"{"args":{}}"#).is_err());
        assert!(parse_event("not json").is_err());
    }

    #[test]
    fn hello_names_version_uuid_and_host() {
        let v: Value = serde_json::from_str(&hello("u-1", "web1")).unwrap();
        assert_eq!(v["instruction"], 1);
        assert_eq!(v["args"]["uuid"], "u-1");
        assert_eq!(v["args"]["hostname"], "web1");
        assert_eq!(v["args"]["version"], crate::outpost::VERSION);
    }

    #[test]
    fn url_follows_the_base() {
        let base = Url::parse("https://ak.example.com/sub/?x=1").unwrap();
        let u = url(&base, "pk-1", "uu", 3).unwrap();
        assert_eq!(
            u.as_str(),
            "wss://ak.example.com/sub/ws/outpost/pk-1/?x=1&instance_uuid=uu&attempt=3"
        );
        let base = Url::parse("http://127.0.0.1:9000/").unwrap();
        assert_eq!(
            url(&base, "p", "u", 1).unwrap().as_str(),
            "ws://127.0.0.1:9000/ws/outpost/p/?instance_uuid=u&attempt=1"
        );
    }

    #[test]
    fn instance_uuids_are_v4() {
        let a = instance_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, instance_uuid());
    }
}
