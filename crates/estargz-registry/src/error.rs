//! Errors of the registry client. Every one names the registry, repository and object
//! (manifest reference, blob digest, byte range) it concerns.

use std::io;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a request was about, for error messages: `host/repo blob sha256:... bytes 0-99`.
pub type Target = String;

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry answered with an error status.
    #[error("{target}: registry answered {status}{}", fmt_message(message))]
    Status {
        /// What was requested.
        target: Target,
        /// HTTP status.
        status: u16,
        /// Error text from the registry, if any.
        message: String,
        /// How long the registry asked us to wait (Retry-After).
        retry_after: Option<std::time::Duration>,
    },
    /// The object does not exist.
    #[error("{target}: not found")]
    NotFound {
        /// What was requested.
        target: Target,
    },
    /// Authentication failed or was refused.
    #[error("{target}: unauthorized ({detail}); check the credentials in your docker config (docker login)")]
    Unauthorized {
        /// What was requested.
        target: Target,
        /// Why.
        detail: String,
    },
    /// The connection failed (after retries).
    #[error("{target}: {detail}")]
    Transport {
        /// What was requested.
        target: Target,
        /// What failed, with the attempts made.
        detail: String,
    },
    /// Content does not match its digest: never used.
    #[error("{target}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// What was requested.
        target: Target,
        /// Expected digest.
        expected: String,
        /// Digest of what arrived.
        actual: String,
    },
    /// The response is malformed (wrong length, bad Content-Range, truncated body...).
    #[error("{target}: bad response: {detail}")]
    BadResponse {
        /// What was requested.
        target: Target,
        /// What is wrong.
        detail: String,
    },
    /// A configuration file is invalid.
    #[error("{path}: {detail}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// TLS set-up failed (CA, client certificate).
    #[error("TLS configuration for {host}: {detail}")]
    Tls {
        /// The host.
        host: String,
        /// What is wrong.
        detail: String,
    },
    /// A local I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An OCI data error (manifest JSON, digest).
    #[error(transparent)]
    Oci(#[from] estargz_oci::Error),
}

fn fmt_message(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl Error {
    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Status { status, .. } => *status == 429 || *status >= 500,
            Error::Transport { .. } | Error::BadResponse { .. } | Error::DigestMismatch { .. } => {
                true
            }
            _ => false,
        }
    }
}
