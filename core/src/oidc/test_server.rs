//! A tiny HTTP/1.1 responder on 127.0.0.1 for testing the provider client over real loopback
//! connections: one request per connection, `Connection: close`, canned replies, optionally
//! trickled one byte at a time (below TLS for the TLS server: the raw record bytes trickle).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// One request the server received.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body).into_owned().collect()
    }
}

pub(crate) struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub trickle: Trickle,
}

/// How a reply is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Trickle {
    /// All at once.
    #[default]
    No,
    /// One byte every interval from the status line on.
    Head(Duration),
    /// Headers at once, then the body one byte every interval.
    Body(Duration),
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply::raw(status, "application/json", body.to_string())
    }
    pub fn raw(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply { status, content_type, body: body.into(), trickle: Trickle::No }
    }
    pub fn trickled(self, trickle: Trickle) -> Reply {
        Reply { trickle, ..self }
    }
}

/// A TCP stream whose writes send one byte then sleep while `pace_ms` is not 0.
struct Paced {
    stream: TcpStream,
    pace_ms: Arc<AtomicU64>,
}

impl Paced {
    fn new(stream: TcpStream) -> (Paced, Arc<AtomicU64>) {
        let _ = stream.set_nodelay(true);
        let pace_ms = Arc::new(AtomicU64::new(0));
        (Paced { stream, pace_ms: pace_ms.clone() }, pace_ms)
    }
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Paced {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let pace = self.pace_ms.load(Ordering::Relaxed);
        if pace == 0 || buf.is_empty() {
            return self.stream.write(buf);
        }
        let written = self.stream.write(&buf[..1])?;
        thread::sleep(Duration::from_millis(pace));
        Ok(written)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

type Handler = dyn Fn(&Request, &str) -> Reply + Send + Sync;

pub(crate) struct TestServer {
    base: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl TestServer {
    /// Serves every connection with `handler(request, base_url)` on a background thread.
    pub fn start(handler: impl Fn(&Request, &str) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (thread_base, thread_requests) = (base.clone(), requests.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let (stream, pace) = Paced::new(stream);
                serve(stream, &pace, &*handler, &thread_base, &thread_requests);
            }
        });
        TestServer { base, requests }
    }

    /// Like `start`, over TLS with tests/data/server_cert.pem (127.0.0.1, signed by the test CA).
    pub fn start_tls(
        handler: impl Fn(&Request, &str) -> Reply + Send + Sync + 'static,
    ) -> TestServer {
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/");
        let cert = std::fs::read(format!("{data}server_cert.pem")).unwrap();
        let key = std::fs::read(format!("{data}server_key.pem")).unwrap();
        let identity = native_tls::Identity::from_pkcs8(&cert, &key).unwrap();
        let acceptor = native_tls::TlsAcceptor::new(identity).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (thread_base, thread_requests) = (base.clone(), requests.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let (stream, pace) = Paced::new(stream);
                // A client that refuses our certificate ends the handshake: skip it.
                let Ok(stream) = acceptor.accept(stream) else { continue };
                serve(stream, &pace, &handler, &thread_base, &thread_requests);
            }
        });
        TestServer { base, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answers one request; `pace` (milliseconds per byte, 0 = full speed) paces the TCP writes.
fn serve(
    mut stream: impl Read + Write,
    pace: &AtomicU64,
    handler: &Handler,
    base: &str,
    log: &Mutex<Vec<Request>>,
) {
    let Some(request) = read_request(&mut stream) else { return };
    let reply = handler(&request, base);
    log.lock().unwrap().push(request);
    let head = format!(
        "HTTP/1.1 {} Canned\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    let millis = |interval: Duration| (interval.as_millis() as u64).max(1);
    if let Trickle::Head(interval) = reply.trickle {
        pace.store(millis(interval), Ordering::Relaxed);
    }
    if stream.write_all(head.as_bytes()).and_then(|()| stream.flush()).is_err() {
        return;
    }
    if let Trickle::Body(interval) = reply.trickle {
        pace.store(millis(interval), Ordering::Relaxed);
    }
    let _ = stream.write_all(&reply.body);
    let _ = stream.flush();
}

fn read_request(stream: &mut impl Read) -> Option<Request> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, target) = (request_line.next()?.to_owned(), request_line.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request { method, target, headers, body })
}

/// A server that accepts connections and never answers.
pub(crate) fn stalled_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    base
}

/// A loopback address nothing listens on.
pub(crate) fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    base
}
