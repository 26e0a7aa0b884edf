//! A fault-injecting HTTP/1.1 proxy in front of a real registry, for tests.
//!
//! Faults apply to blob GETs (paths with `/blobs/sha256:`): one-shot faults from a queue,
//! then an optional persistent fault, else the request passes through unchanged. Each
//! connection carries one request (`Connection: close`), which keeps the proxy simple and
//! the faults precise.
//!
//! The proxy can also play a slow link: with [`FaultProxy::set_rate`], blob response bodies
//! share one byte rate, first come first served, as responses share a real link; and it
//! logs every blob GET ([`FaultProxy::blob_log`]) with its range and when it arrived and
//! ended, so that tests can see which requests were in flight together.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to do to a blob request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering.
    Reset,
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer 429 Too Many Requests with `Retry-After: secs`.
    TooManyRequests(u64),
    /// Send the headers and half of the body, then close.
    Truncate,
    /// Send the headers and half of the body, then stall this long before closing.
    Stall(Duration),
    /// Flip one byte in the middle of the body.
    CorruptBody,
    /// Drop the Range header, so the registry answers 200 with the whole blob.
    IgnoreRange,
    /// Answer 307 with a Location pointing straight at the registry (like blob storage).
    Redirect,
    /// Answer with this status and a body that never ends (zeros, no Content-Length),
    /// until the client goes away.
    Endless(u16),
}

struct Shared {
    upstream: String,
    queue: Mutex<VecDeque<Fault>>,
    always: Mutex<Option<Fault>>,
    blob_requests: AtomicUsize,
    bytes_served: AtomicUsize,
    stop: AtomicBool,
    /// Bytes per second for blob bodies, shared by all connections.
    rate: Mutex<Option<f64>>,
    /// When the shared link is free again.
    link_free: Mutex<Instant>,
    /// Added before each blob response: a round trip to a far registry.
    latency: Mutex<Option<Duration>>,
    log: Mutex<Vec<BlobRequest>>,
}

/// One blob GET as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRequest {
    /// The requested byte range (`start..end`), if a single range was asked for.
    pub range: Option<std::ops::Range<u64>>,
    /// The requested length of the blob's end, for a suffix range (`bytes=-N`).
    pub suffix: Option<u64>,
    /// When the request arrived.
    pub arrived: Instant,
    /// When the last byte of the answer was sent (`None` while in flight or if it failed).
    pub ended: Option<Instant>,
}

impl BlobRequest {
    /// Whether this request was in flight at any time while `other` was.
    pub fn overlaps(&self, other: &BlobRequest) -> bool {
        let far = Instant::now() + Duration::from_secs(3600);
        self.arrived < other.ended.unwrap_or(far) && other.arrived < self.ended.unwrap_or(far)
    }
}

/// `bytes=A-B` as `A..B+1`.
fn parse_range(header: &str) -> Option<std::ops::Range<u64>> {
    let (a, b) = header.strip_prefix("bytes=")?.split_once('-')?;
    Some(a.trim().parse().ok()?..b.trim().parse::<u64>().ok()? + 1)
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// `127.0.0.1:PORT` to point clients at.
    pub addr: String,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            queue: Mutex::new(VecDeque::new()),
            always: Mutex::new(None),
            blob_requests: AtomicUsize::new(0),
            bytes_served: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            rate: Mutex::new(None),
            link_free: Mutex::new(Instant::now()),
            latency: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, &s);
                    });
                }
            }
        });
        FaultProxy { addr, shared }
    }

    /// Queues a one-shot fault for the next blob request.
    pub fn push(&self, fault: Fault) {
        self.shared.queue.lock().unwrap().push_back(fault);
    }

    /// Sets (or clears) a fault applied to every blob request once the queue is empty.
    pub fn set_always(&self, fault: Option<Fault>) {
        *self.shared.always.lock().unwrap() = fault;
    }

    /// Blob requests seen so far.
    pub fn blob_requests(&self) -> usize {
        self.shared.blob_requests.load(Ordering::SeqCst)
    }

    /// Limits blob response bodies to `bytes_per_sec` for all connections together (or
    /// lifts the limit).
    pub fn set_rate(&self, bytes_per_sec: Option<f64>) {
        *self.shared.rate.lock().unwrap() = bytes_per_sec;
    }

    /// Delays each blob response by `latency` (each request on its own: a far registry
    /// over a fast link, where many requests are in flight at once).
    pub fn set_latency(&self, latency: Option<Duration>) {
        *self.shared.latency.lock().unwrap() = latency;
    }

    /// Every blob GET so far, in order of arrival.
    pub fn blob_log(&self) -> Vec<BlobRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Body bytes of blob responses passed to clients so far.
    pub fn blob_bytes_served(&self) -> usize {
        self.shared.bytes_served.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Request line, headers and body of one request.
type Request = (String, Vec<(String, String)>, Vec<u8>);

fn read_request(conn: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        let n = conn.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let n = conn.read(&mut tmp)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok((request_line, headers, body))
}

fn simple(conn: &mut TcpStream, status: u16, extra: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status} Fault\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n"
    )
}

fn handle(mut conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let (request_line, mut headers, body) = read_request(&mut conn)?;
    let is_blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/sha256:");
    let range = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.clone());
    let fault = if is_blob_get {
        s.blob_requests.fetch_add(1, Ordering::SeqCst);
        let queued = s.queue.lock().unwrap().pop_front();
        queued.or_else(|| s.always.lock().unwrap().clone())
    } else {
        None
    };
    let logged = is_blob_get.then(|| {
        let mut log = s.log.lock().unwrap();
        log.push(BlobRequest {
            range: range.as_deref().and_then(parse_range),
            suffix: range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes=-")?.trim().parse().ok()),
            arrived: Instant::now(),
            ended: None,
        });
        log.len() - 1
    });
    match &fault {
        Some(Fault::Reset) => {
            let _ = conn.shutdown(Shutdown::Both);
            return Ok(());
        }
        Some(Fault::Status(code)) => return simple(&mut conn, *code, ""),
        Some(Fault::TooManyRequests(secs)) => {
            return simple(&mut conn, 429, &format!("Retry-After: {secs}\r\n"))
        }
        Some(Fault::Redirect) => {
            let path = request_line.split(' ').nth(1).unwrap_or("/");
            return simple(
                &mut conn,
                307,
                &format!("Location: http://{}{path}\r\n", s.upstream),
            );
        }
        Some(Fault::Endless(code)) => {
            write!(
                conn,
                "HTTP/1.1 {code} Endless\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            )?;
            let zeros = vec![0u8; 64 << 10];
            // Ends when the client closes the connection (the write fails).
            while !s.stop.load(Ordering::SeqCst) {
                conn.write_all(&zeros)?;
                s.bytes_served.fetch_add(zeros.len(), Ordering::SeqCst);
            }
            return Ok(());
        }
        Some(Fault::IgnoreRange) => headers.retain(|(k, _)| !k.eq_ignore_ascii_case("range")),
        _ => {}
    }
    // Forward.
    let mut up = TcpStream::connect(&s.upstream)?;
    let mut req = format!("{request_line}\r\n");
    for (k, v) in &headers {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("host") {
            continue;
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Host: {}\r\nConnection: close\r\n\r\n",
        s.upstream
    ));
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let head_end = find(&resp, b"\r\n\r\n").map_or(resp.len(), |p| p + 4);
    let (head, body) = resp.split_at(head_end);
    let mut body = body.to_vec();
    if is_blob_get {
        s.bytes_served.fetch_add(body.len(), Ordering::SeqCst);
        let latency = *s.latency.lock().unwrap();
        if let Some(d) = latency {
            std::thread::sleep(d);
        }
    }
    match fault {
        Some(Fault::Truncate) => {
            conn.write_all(head)?;
            conn.write_all(&body[..body.len() / 2])?;
            let _ = conn.shutdown(Shutdown::Both);
        }
        Some(Fault::Stall(d)) => {
            conn.write_all(head)?;
            conn.write_all(&body[..body.len() / 2])?;
            conn.flush()?;
            std::thread::sleep(d);
            let _ = conn.shutdown(Shutdown::Both);
        }
        Some(Fault::CorruptBody) => {
            if !body.is_empty() {
                let mid = body.len() / 2;
                body[mid] ^= 0xff;
            }
            conn.write_all(head)?;
            conn.write_all(&body)?;
        }
        _ => {
            conn.write_all(head)?;
            if is_blob_get {
                write_at_rate(&mut conn, &body, s)?;
            } else {
                conn.write_all(&body)?;
            }
        }
    }
    if let Some(i) = logged {
        s.log.lock().unwrap()[i].ended = Some(Instant::now());
    }
    Ok(())
}

/// Writes `body` in pieces, each waiting for its turn on the shared link when a rate is set.
fn write_at_rate(conn: &mut TcpStream, body: &[u8], s: &Shared) -> std::io::Result<()> {
    for piece in body.chunks(16 << 10) {
        let rate = *s.rate.lock().unwrap();
        if let Some(rate) = rate {
            let due = {
                let mut free = s.link_free.lock().unwrap();
                let start = (*free).max(Instant::now());
                *free = start + Duration::from_secs_f64(piece.len() as f64 / rate);
                *free
            };
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        conn.write_all(piece)?;
    }
    Ok(())
}
