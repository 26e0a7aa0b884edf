//! A scriptable HTTP/1.1 server for tests of what a client sends where: every request's
//! head is logged, and a closure decides each answer (token servers, redirects, mirrors).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub struct StubRequest {
    /// `GET /path HTTP/1.1`.
    pub line: String,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl StubRequest {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request's path (with its query).
    pub fn path(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }
}

/// What to answer.
pub enum StubAnswer {
    /// These bytes: a whole response, head and body.
    Raw(String),
    /// This head, then a body that never ends (until the client goes away).
    Endless(String),
}

impl StubAnswer {
    /// A response with `status`, extra header lines (each ending in `\r\n`) and `body`.
    pub fn new(status: u16, extra: &str, body: &str) -> StubAnswer {
        StubAnswer::Raw(format!(
            "HTTP/1.1 {status} Stub\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            body.len()
        ))
    }
}

type Answer = dyn Fn(&StubRequest, &str) -> StubAnswer + Send + Sync;

/// The server; it runs until the process ends.
pub struct StubServer {
    /// `127.0.0.1:port`.
    pub addr: String,
    log: Arc<Mutex<Vec<StubRequest>>>,
}

impl StubServer {
    /// Serves on a free port of 127.0.0.1; `answer` gets each request and the server's own
    /// address.
    pub fn start(
        answer: impl Fn(&StubRequest, &str) -> StubAnswer + Send + Sync + 'static,
    ) -> StubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a stub server");
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answer> = Arc::new(answer);
        let (own, shared) = (addr.clone(), log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let (answer, log, own) = (answer.clone(), shared.clone(), own.clone());
                std::thread::spawn(move || {
                    let Ok(read) = conn.try_clone() else { return };
                    let mut r = BufReader::new(read);
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.trim_end().split_once(':') {
                            headers.push((k.trim().to_string(), v.trim().to_string()));
                        }
                    }
                    let req = StubRequest {
                        line: line.trim_end().to_string(),
                        headers,
                    };
                    log.lock().unwrap().push(req.clone());
                    match answer(&req, &own) {
                        StubAnswer::Raw(bytes) => {
                            let _ = conn.write_all(bytes.as_bytes());
                        }
                        StubAnswer::Endless(head) => {
                            let _ = conn.write_all(head.as_bytes());
                            let filler = vec![b'x'; 64 << 10];
                            while conn.write_all(&filler).is_ok() {}
                        }
                    }
                });
            }
        });
        StubServer { addr, log }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<StubRequest> {
        self.log.lock().unwrap().clone()
    }
}
