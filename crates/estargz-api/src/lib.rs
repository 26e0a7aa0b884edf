//! containerd's Snapshots gRPC API (`containerd.services.snapshots.v1`) and the `Mount`
//! type it returns, generated from the definitions in the repository's `proto/` directory.
//!
//! Also the subset of Kubernetes' CRI ([`cri`]) that kubelet speaks to pull images and run
//! pods.
//!
//! The daemon serves [`snapshots::snapshots_server::Snapshots`]; tests call it with
//! [`snapshots::snapshots_client::SnapshotsClient`] the way containerd does.

#![allow(missing_docs, clippy::all)]

/// Generated modules, nested like the protobuf packages so that cross-package paths resolve.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// The part of Kubernetes' CRI (`runtime.v1`) that kubelet uses to pull an image and run
/// a pod (proto/k8s/cri/runtime/v1/api.proto): the tests drive containerd's CRI plugin
/// with its clients as kubelet does.
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
