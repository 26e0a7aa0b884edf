//! An OCI distribution client for lazy pulling and image conversion.
//!
//! - [`ImageRef`]: image references as users write them, normalized like Docker.
//! - [`RegistryClient`]: manifests, whole blobs (streamed, digest checked), byte ranges
//!   (one range a request, or a blob's tail with its size), pushes with cross-repository
//!   mounts; retries with backoff and jitter, per-host connection limits.
//! - [`Credentials`]: docker config credentials; bearer tokens are fetched from the
//!   registry's `WWW-Authenticate` challenge and cached per scope.
//! - [`HostsConfig`]: containerd's `hosts.toml` mirrors, TLS settings and headers.
//! - [`PullSecrets`]: credentials recorded while a node runs (pods' image pull secrets),
//!   shared by the processes that fetch through a file.
//!
//! Every error names the registry, repository and object it concerns.

#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod copy;
pub mod error;
pub mod hosts;
pub mod pull_secrets;
pub mod reference;
mod tls;

pub use auth::{parse_challenge, Challenge, Credential, Credentials};
pub use client::{ClientConfig, PushOutcome, RangeBody, RegistryClient, RetryPolicy};
pub use copy::{pull_to_layout, push_from_layout, CopyEvents};
pub use error::{Error, Result};
pub use hosts::{Capabilities, HostsConfig, RegistryHost};
pub use pull_secrets::PullSecrets;
pub use reference::ImageRef;
