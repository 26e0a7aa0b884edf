//! The gRPC face of the snapshotter: containerd's `Snapshots` service.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use estargz_api::snapshots::snapshots_server::Snapshots;
use estargz_api::snapshots::{self as pb, Info};
use estargz_api::types::Mount as PbMount;
use tonic::{Request, Response, Status};

use crate::remote::{LayerLabels, TARGET_REF};
use crate::snapshotter::{Mount, Snapshotter};
use crate::store::{Kind, Snapshot, Time};
use crate::Error;

/// Snapshots listed per `List` message.
const LIST_BATCH: usize = 100;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct SnapshotService {
    inner: Arc<Snapshotter>,
}

impl SnapshotService {
    /// Serves `snapshotter`.
    pub fn new(snapshotter: Arc<Snapshotter>) -> SnapshotService {
        SnapshotService { inner: snapshotter }
    }

    /// The tonic service, ready for a server.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<SnapshotService> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }

    /// Runs blocking snapshotter work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)
    }
}

fn status(e: Error) -> Status {
    match e {
        Error::NotFound(m) => Status::not_found(format!("{m}: not found")),
        Error::AlreadyExists(m) => Status::already_exists(format!("{m}: already exists")),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

fn mounts(m: Vec<Mount>) -> Vec<PbMount> {
    m.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos,
    }
}

fn info(name: String, s: Snapshot) -> Info {
    Info {
        name,
        parent: s.parent,
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.into_iter().collect(),
    }
}

fn sorted(labels: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = sorted(r.labels);
        if let Some(target) = labels.get(TARGET_REF).filter(|t| !t.is_empty()).cloned() {
            let t = target.clone();
            if self.blocking(move |s| s.stat(&t)).await.is_ok() {
                return Err(Status::already_exists(format!(
                    "snapshot {target:?} already exists"
                )));
            }
            match self.inner.prepare_remote(&target, &r.parent, &labels).await {
                Ok(()) => {
                    self.inner.metrics().remote_layer();
                    return Err(Status::already_exists(format!(
                        "snapshot {target:?} already exists (mounted lazily)"
                    )));
                }
                Err((reason, why)) => {
                    let layer = LayerLabels::raw_digest(&labels)
                        .map(String::from)
                        .unwrap_or_else(|| target.clone());
                    self.inner.metrics().fallback(&layer, reason);
                    if reason == crate::remote::Fallback::NoLayerLabels {
                        tracing::debug!(%layer, "no layer labels; ordinary pull");
                    } else {
                        tracing::warn!(%layer, reason = reason.as_str(), %why, "layer not mounted lazily; containerd pulls it the ordinary way");
                    }
                }
            }
        }
        let m = self
            .blocking(move |s| s.create(Kind::Active, &r.key, &r.parent, labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = sorted(r.labels);
        let m = self
            .blocking(move |s| s.create(Kind::View, &r.key, &r.parent, labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = request.into_inner().key;
        let m = self.blocking(move |s| s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let labels = sorted(r.labels);
        self.blocking(move |s| s.commit(&r.name, &r.key, labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        self.blocking(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let s = self.blocking(move |s| s.stat(&k)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(key, s)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let (key, labels) = (i.name, sorted(i.labels));
        let k = key.clone();
        let s = self.blocking(move |s| s.update(&k, labels, &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(key, s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let all = self.blocking(move |s| s.list(&filters)).await?;
        let mut batches = Vec::new();
        let mut batch = Vec::new();
        for (k, s) in all {
            batch.push(info(k, s));
            if batch.len() == LIST_BATCH {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
            }
        }
        if !batch.is_empty() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let u = self.blocking(move |s| s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
