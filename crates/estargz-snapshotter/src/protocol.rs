//! The protocol between the daemon and its FUSE manager, over `ROOT/fuse-manager.sock`.
//!
//! One JSON request per line, one JSON response per line, each at most [`MAX_LINE`]
//! bytes. Every connection may start with [`Request::Hello`], which both sides use to learn
//! the other's protocol version: the manager outlives daemon upgrades (that is its job), so
//! a daemon must expect to talk to an older manager and send only what it understands.
//!
//! Versions:
//! - 0: `mount`, `unmount`, `status`, `shutdown`; errors are bare strings; no `hello` (a
//!   manager of version 0 answers it as a bad request, which is how it is recognised).
//! - 1: `hello`; errors are typed ([`ManagerError`]: a kind and a message); an unknown
//!   request kind is answered [`ErrorKind::Unsupported`] rather than as a bad request.
//!
//! Adding a request kind or an optional field is compatible; anything else is a new version.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::RemoteLayer;

/// The protocol version this build speaks.
pub const PROTOCOL: u32 = 1;

/// Longest request or response line; a mount request is well under 4 KiB, a status of
/// thousands of layers well under this.
pub const MAX_LINE: usize = 16 << 20;

/// Longest request line a manager accepts.
pub const MAX_REQUEST: usize = 64 << 10;

/// The request kinds this build knows (the `op` field).
pub const OPS: &[&str] = &["hello", "mount", "unmount", "status", "shutdown"];

/// A request to the manager.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
// One request at a time is parsed, answered and dropped: a boxed mount would save nothing.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Exchange versions (protocol 1 and later).
    Hello {
        /// The sender's protocol version.
        protocol: u32,
    },
    /// Mount `layer` at `mountpoint`, with its TOC JSON read from `toc_path`.
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// The layer's TOC JSON, as saved when the layer was resolved.
        toc_path: PathBuf,
        /// The layer.
        layer: RemoteLayer,
        /// Mountpoints of the lazy layers below it, nearest first (added in 0.2: an older
        /// manager ignores it, and one that gets none looks for libraries in the layer only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lowers: Vec<PathBuf>,
    },
    /// Unmount `mountpoint`.
    Unmount {
        /// Where.
        mountpoint: PathBuf,
    },
    /// Report mounts and counters.
    Status,
    /// Unmount everything and exit.
    Shutdown,
}

/// Who answered a [`Request::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Its protocol version.
    pub protocol: u32,
    /// Its program version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Its process ID.
    pub pid: u32,
}

/// What kind of failure a [`ManagerError`] is; the daemon acts on the kind, people read the
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The manager does not know this request kind (it is older than the daemon).
    Unsupported,
    /// The request could not be read.
    BadRequest,
    /// A path outside the manager's snapshots directory.
    Forbidden,
    /// The saved TOC does not have the digest the layer record names.
    TocMismatch,
    /// The saved TOC is not a valid TOC.
    InvalidToc,
    /// Another request is mounting the same mountpoint right now.
    Busy,
    /// The FUSE mount or unmount failed.
    Mount,
    /// Another I/O operation failed (reading the TOC).
    Io,
    /// Anything else.
    Internal,
    /// A kind a newer manager sent that this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The kind as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::TocMismatch => "toc_mismatch",
            ErrorKind::InvalidToc => "invalid_toc",
            ErrorKind::Busy => "busy",
            ErrorKind::Mount => "mount",
            ErrorKind::Io => "io",
            ErrorKind::Internal => "internal",
            ErrorKind::Unknown => "unknown",
        }
    }
}

/// A request the manager refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({})", kind.as_str())]
pub struct ManagerError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What failed, for people.
    pub message: String,
}

impl ManagerError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ManagerError {
        ManagerError {
            kind,
            message: message.into(),
        }
    }
}

/// An error as it crosses the socket: typed from protocol 1, a string from protocol 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WireError {
    /// Protocol 1 and later.
    Typed(ManagerError),
    /// Protocol 0.
    Text(String),
}

impl WireError {
    /// The error with a kind: protocol 0's strings become [`ErrorKind::Unknown`].
    pub fn into_typed(self) -> ManagerError {
        match self {
            WireError::Typed(e) => e,
            WireError::Text(message) => ManagerError::new(ErrorKind::Unknown, message),
        }
    }
}

/// The manager's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// What failed, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
    /// For `Status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For `Hello`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello: Option<Hello>,
}

impl Response {
    /// A failure.
    pub fn error(e: ManagerError) -> Response {
        Response {
            error: Some(WireError::Typed(e)),
            ..Response::default()
        }
    }
}

/// Reads a request line: [`ErrorKind::Unsupported`] for a request kind this build does not
/// know (so that a newer daemon can tell "too old" from "malformed"),
/// [`ErrorKind::BadRequest`] for anything unreadable.
pub fn parse_request(line: &[u8]) -> Result<Request, ManagerError> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| ManagerError::new(ErrorKind::BadRequest, format!("bad request: {e}")))?;
    let op = value
        .get("op")
        .and_then(|o| o.as_str())
        .ok_or_else(|| ManagerError::new(ErrorKind::BadRequest, "bad request: no \"op\" field"))?
        .to_string();
    if !OPS.contains(&op.as_str()) {
        return Err(ManagerError::new(
            ErrorKind::Unsupported,
            format!("request {op:?} is not supported by this FUSE manager (protocol {PROTOCOL})"),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ManagerError::new(ErrorKind::BadRequest, format!("bad {op} request: {e}")))
}

/// Mounts and counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// The manager's pid.
    pub pid: u32,
    /// Mounted layers by mountpoint.
    pub mounts: BTreeMap<PathBuf, LayerStatus>,
    /// Chunk cache counters.
    pub cache: CacheStatus,
    /// How long on-demand fetches took, all layers together (absent from older managers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_seconds: Option<HistogramStatus>,
    /// How long FUSE reads took, all layers together (absent from older managers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_seconds: Option<HistogramStatus>,
}

/// A histogram of durations. The bounds travel with the counts, so that a daemon renders
/// the buckets of a manager of another version as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramStatus {
    /// Upper bounds of the buckets in seconds, ascending; a last bucket above them is
    /// implied.
    pub bounds: Vec<f64>,
    /// Observations per bucket, not cumulative: one count per bound, then the count above
    /// the last bound. The number of observations is their sum.
    pub counts: Vec<u64>,
    /// Sum of the observations, nanoseconds.
    pub sum_nanos: u64,
}

impl HistogramStatus {
    /// Whether the counts fit the bounds and the bounds ascend (a status from a manager
    /// that got it wrong is not rendered).
    pub fn is_valid(&self) -> bool {
        self.counts.len() == self.bounds.len() + 1
            && self.bounds.iter().all(|b| b.is_finite())
            && self.bounds.windows(2).all(|w| w[0] < w[1])
    }
}

/// One mounted layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LayerStatus {
    /// Layer digest.
    pub digest: String,
    /// Compressed bytes fetched from the registry.
    pub fetched_bytes: u64,
    /// Range requests sent.
    pub fetch_requests: u64,
    /// Fetches (round trips of one or more range requests sent together) that completed
    /// (absent from older managers).
    #[serde(default)]
    pub fetches: u64,
    /// Chunks fetched and verified.
    pub fetched_chunks: u64,
    /// Time the completed fetches took (on-demand, prefetch and background), nanoseconds.
    pub fetch_nanos: u64,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// File bytes read through the mount (absent from older managers).
    #[serde(default)]
    pub read_bytes: u64,
    /// Opens served in FUSE passthrough mode (absent from older managers).
    #[serde(default)]
    pub passthrough_opens: u64,
    /// Chunks fetched for a reader and decoded as their bytes arrived (absent from older
    /// managers).
    #[serde(default)]
    pub streamed_chunks: u64,
    /// Interpreters and libraries read ahead of the loader (absent from older managers).
    #[serde(default)]
    pub dependency_files: u64,
    /// Distinct chunks local now.
    pub cached_chunks: u64,
    /// Distinct chunks of the layer.
    pub total_chunks: u64,
    /// Prefetch finished.
    pub prefetch_done: bool,
    /// Background fetch finished.
    pub background_done: bool,
    /// Served without FUSE too, its files all local (absent from older managers).
    #[serde(default)]
    pub served_without_fuse: bool,
}

/// Chunk cache counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that were not.
    pub misses: u64,
    /// Bytes of chunk content stored.
    pub usage_bytes: u64,
    /// Chunks stored.
    pub entries: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Chunks that could not be written.
    pub write_errors: u64,
    /// Bytes of decompressed chunks in the memory tier (absent from older managers).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Reads answered by the memory tier (absent from older managers).
    #[serde(default)]
    pub memory_hits: u64,
    /// Damaged chunk files found and removed (absent from older managers).
    #[serde(default)]
    pub corrupt: u64,
    /// The cache's size cap in bytes (absent from older managers).
    #[serde(default)]
    pub max_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_request_kinds_are_unsupported_and_garbage_is_a_bad_request() {
        let e = parse_request(br#"{"op":"remount_all","x":1}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert_eq!(
            parse_request(b"{not json").unwrap_err().kind,
            ErrorKind::BadRequest
        );
        assert_eq!(
            parse_request(br#"{"op":"unmount"}"#).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        assert!(matches!(
            parse_request(br#"{"op":"hello","protocol":7}"#),
            Ok(Request::Hello { protocol: 7 })
        ));
    }

    #[test]
    fn every_request_kind_is_listed_in_ops() {
        let mountpoint = PathBuf::from("/m");
        for req in [
            Request::Hello { protocol: PROTOCOL },
            Request::Unmount { mountpoint },
            Request::Status,
            Request::Shutdown,
        ] {
            let line = serde_json::to_vec(&req).unwrap();
            assert!(parse_request(&line).is_ok(), "{req:?}");
        }
    }

    #[test]
    fn errors_of_protocol_0_and_of_newer_managers_are_read() {
        let old: Response = serde_json::from_str(r#"{"error":"saved TOC is bad"}"#).unwrap();
        let e = old.error.unwrap().into_typed();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Unknown, "saved TOC is bad")
        );
        let newer: Response =
            serde_json::from_str(r#"{"error":{"kind":"quota","message":"m"}}"#).unwrap();
        assert_eq!(newer.error.unwrap().into_typed().kind, ErrorKind::Unknown);
        let typed = serde_json::to_string(&Response::error(ManagerError::new(
            ErrorKind::TocMismatch,
            "x",
        )))
        .unwrap();
        assert_eq!(typed, r#"{"error":{"kind":"toc_mismatch","message":"x"}}"#);
    }
}
