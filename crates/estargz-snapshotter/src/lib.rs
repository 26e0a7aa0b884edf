//! `estargz-snapshotter`: a containerd proxy snapshotter. It is a complete overlayfs
//! snapshotter, and when containerd's labels describe an eStargz layer whose TOC checks out,
//! it mounts the layer lazily through FUSE instead of letting containerd pull it.
//!
//! Parts: [`store`] (durable metadata), [`snapshotter`] (snapshot semantics and mounts),
//! [`remote`] (labels, TOC resolution), [`mounter`] (how the snapshotter gets layers
//! mounted: a seam, and the client of the FUSE manager), [`manager`] (the separate process
//! serving FUSE mounts, so that they survive daemon restarts), [`protocol`] (what the two
//! say to each other), [`service`] (gRPC), [`metrics`], [`config`], [`access`] (who may use
//! the sockets).

#![warn(missing_docs)]

pub mod access;
pub mod config;
pub mod cri_proxy;
pub mod filter;
pub mod manager;
pub mod metrics;
pub mod mounter;
pub mod protocol;
pub mod remote;
pub mod service;
pub mod snapshotter;
pub mod store;

pub use config::Config;

/// What can go wrong; mapped to gRPC status codes by the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such snapshot (or parent).
    #[error("{0}")]
    NotFound(String),
    /// The key is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not apply in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A malformed request or configuration.
    #[error("{0}")]
    InvalidArgument(String),
    /// The metadata store failed.
    #[error("metadata store: {context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The error (redb's, or a record's encoding).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The FUSE manager could not be reached (not running, or its socket is gone).
    #[error("the FUSE manager at {} does not answer: {source}", socket.display())]
    ManagerUnreachable {
        /// Its socket.
        socket: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The FUSE manager refused or failed a request.
    #[error("FUSE manager: {0}")]
    Manager(#[from] protocol::ManagerError),
}

impl Error {
    /// A metadata store error with context.
    pub fn store(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Store {
            context: context.into(),
            source: source.into(),
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
