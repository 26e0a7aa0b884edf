//! One eStargz layer as a read-only FUSE file system, read lazily and verified.
//!
//! The tree comes from the layer's TOC; file content is fetched on demand from a
//! [`BlobSource`] (a registry, or a local blob), chunk by chunk: a read fetches only the
//! chunks it covers (neighbouring missing chunks in one range request), checks each against
//! its digest, and keeps it in the node-wide [`ChunkCache`]. Nothing unverified is served.
//!
//! Presentation follows what overlayfs expects of a lower layer: hardlinks share one
//! inode; `.wh.NAME` entries appear as `NAME`, a 0/0 character device (a whiteout);
//! `.wh..wh..opq` is hidden and marks its directory opaque (`trusted.overlay.opaque=y`);
//! the eStargz landmark files are hidden.

#![warn(missing_docs)]

mod erofs;
mod fetch;
mod fs;
mod local;
pub mod memory;
mod record;
mod scheduler;
mod source;
mod tree;

pub use fetch::Progress;
pub use fs::{
    detach, mount, Inner, LatencyHistogram, LayerFs, LayerStats, MountedLayer, NodeStats,
};
pub use local::{
    is_local_mount, local_form_of, local_forms_of, local_mounts_under, LocalError, LocalForm,
    EROFS_SUPER_MAGIC,
};
pub use record::{Access, AccessOp, AccessRecorder, MAX_RANGES};
pub use scheduler::{
    FetchOptions, FetchScheduler, LinkEstimate, ReadGuard, MAX_BACKGROUND_REQUEST,
    MIN_BACKGROUND_REQUEST,
};
pub use source::{load_toc, BlobSource, FileSource, RegistrySource, DEFAULT_READ_DEADLINE};

pub use estargz_cache::ChunkCache;
