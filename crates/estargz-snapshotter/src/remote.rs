//! Deciding whether a layer can be mounted lazily, and fetching its TOC.
//!
//! containerd describes the layer it is about to pull with labels on `Prepare`; this module
//! reads them, fetches the layer's footer and TOC with range requests, and checks the TOC
//! against the digest the image's manifest gives. The other layers of the image (listed in
//! the same labels) are resolved in parallel in the background, so that their `Prepare`
//! calls, which containerd sends one after another, find their TOCs already fetched.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use estargz_format::{toc_json_from_tail, Limits, Sha256Digest};
use tokio::sync::OnceCell;

use crate::store::RemoteLayer;

/// The chain ID containerd will commit the layer under.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Image reference, from the CRI plugin.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Layer digest, from the CRI plugin.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image's layers (comma-separated digests), from the CRI plugin.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Image reference, from `ctr-remote images rpull` and nerdctl.
pub const STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Layer digest, from `ctr-remote images rpull` and nerdctl.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// The image's layers, from `ctr-remote images rpull` and nerdctl.
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// The TOC digest (a layer annotation passed as a label).
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Marks snapshots this daemon mounted lazily.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// Why a layer was pulled the ordinary way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fallback {
    /// No image reference or layer digest in the labels (plain `ctr pull`, or snapshot
    /// annotations disabled in the CRI plugin).
    NoLayerLabels,
    /// The layer has no TOC digest label and unverified layers are not allowed.
    NoTocDigest,
    /// A label could not be parsed.
    BadLabel,
    /// The layer is not eStargz (no footer, or no valid TOC).
    NotEstargz,
    /// The TOC does not match the digest the image gives.
    TocDigestMismatch,
    /// The registry could not be reached or answered with an error.
    Registry,
    /// Resolving took longer than `resolve_timeout_secs`.
    Timeout,
    /// The layer could not be mounted.
    Mount,
}

impl Fallback {
    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NoLayerLabels => "no_layer_labels",
            Fallback::NoTocDigest => "no_toc_digest",
            Fallback::BadLabel => "bad_label",
            Fallback::NotEstargz => "not_estargz",
            Fallback::TocDigestMismatch => "toc_digest_mismatch",
            Fallback::Registry => "registry",
            Fallback::Timeout => "timeout",
            Fallback::Mount => "mount",
        }
    }
}

/// What the labels of one `Prepare` say about its layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    /// Image reference.
    pub reference: String,
    /// Layer digest.
    pub digest: String,
    /// Expected TOC digest, if given.
    pub toc_digest: Option<String>,
    /// The image's other layers.
    pub other_layers: Vec<String>,
}

impl LayerLabels {
    /// Reads CRI or stargz labels (CRI first).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<LayerLabels> {
        let get = |a: &str, b: &str| {
            labels
                .get(a)
                .or_else(|| labels.get(b))
                .filter(|s| !s.is_empty())
                .cloned()
        };
        let reference = get(CRI_IMAGE_REF, STARGZ_REF)?;
        let digest = get(CRI_LAYER_DIGEST, STARGZ_DIGEST)?;
        let other_layers = get(CRI_IMAGE_LAYERS, STARGZ_LAYERS)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty() && *d != digest)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Some(LayerLabels {
            reference,
            digest,
            toc_digest: labels.get(TOC_DIGEST).filter(|s| !s.is_empty()).cloned(),
            other_layers,
        })
    }
}

/// A fetched, not yet verified TOC.
#[derive(Debug)]
pub struct Fetched {
    /// The TOC JSON.
    pub json: Vec<u8>,
    /// The layer, with the computed TOC digest.
    pub layer: RemoteLayer,
}

type Cell = Arc<OnceCell<Result<Arc<Fetched>, (Fallback, String)>>>;

/// Fetches TOCs, sharing the work between a layer's `Prepare` and the background
/// resolution started by an earlier layer of the same image.
pub struct Resolver {
    client: Arc<estargz_registry::RegistryClient>,
    limits: Limits,
    pending: Mutex<HashMap<String, (Instant, Cell)>>,
    /// Background resolutions running at once, node-wide: each holds up to a TOC in memory,
    /// and an image may list hundreds of layers.
    background: Arc<tokio::sync::Semaphore>,
}

/// Background TOC fetches at once.
const BACKGROUND_RESOLUTIONS: usize = 4;

/// Layers of one image resolved ahead of their `Prepare`; containerd prepares the others
/// in turn anyway.
const MAX_AHEAD: usize = 64;

/// The last bytes of a layer fetched first: the footer, and the whole TOC when it is
/// small; a larger TOC costs one more request for the rest of it.
const TOC_TAIL: u64 = 64 << 10;

/// How long fetching the rest of a TOC member may take.
const MEMBER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Background resolutions kept for at most this long.
const PENDING_TTL: std::time::Duration = std::time::Duration::from_secs(300);

impl Resolver {
    /// A resolver using `client`.
    pub fn new(client: Arc<estargz_registry::RegistryClient>) -> Resolver {
        Resolver {
            client,
            limits: Limits::default(),
            pending: Mutex::new(HashMap::new()),
            background: Arc::new(tokio::sync::Semaphore::new(BACKGROUND_RESOLUTIONS)),
        }
    }

    fn cell(&self, reference: &str, digest: &str) -> Cell {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, (at, _)| at.elapsed() < PENDING_TTL);
        pending
            .entry(format!("{reference}@{digest}"))
            .or_insert_with(|| (Instant::now(), Arc::new(OnceCell::new())))
            .1
            .clone()
    }

    fn forget(&self, reference: &str, digest: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("{reference}@{digest}"));
    }

    async fn fetch(
        &self,
        reference: &str,
        digest: &str,
    ) -> Result<Arc<Fetched>, (Fallback, String)> {
        let image: estargz_registry::ImageRef = reference.parse().map_err(|e| {
            (
                Fallback::BadLabel,
                format!("image reference {reference:?}: {e}"),
            )
        })?;
        let blob: estargz_oci::Digest = digest
            .parse()
            .map_err(|e| (Fallback::BadLabel, format!("layer digest {digest:?}: {e}")))?;
        // The footer and, for a small TOC, the whole TOC in one request that also gives the
        // blob's size.
        let (tail, size) = match self.client.fetch_tail(&image, &blob, TOC_TAIL).await {
            Ok(got) => got,
            Err(estargz_registry::Error::NotFound { .. }) => {
                return Err((
                    Fallback::Registry,
                    format!("{reference}: blob {digest} not found"),
                ))
            }
            Err(e) => return Err((Fallback::Registry, e.to_string())),
        };
        let (client, runtime) = (self.client.clone(), tokio::runtime::Handle::current());
        let limits = self.limits;
        let (reference, digest) = (reference.to_string(), digest.to_string());
        // Decoding the TOC is CPU work: off the async threads, fetching what the tail lacks
        // from there.
        tokio::task::spawn_blocking(move || {
            use estargz_format::Error as F;
            let fetch = |r: std::ops::Range<u64>| {
                let span = format!("{blob} bytes {r:?}");
                runtime
                    .block_on(tokio::time::timeout(
                        MEMBER_DEADLINE,
                        client.fetch_range(&image, &blob, r),
                    ))
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{span}: no complete answer within {MEMBER_DEADLINE:?}"),
                        )
                    })?
                    .map(|b| b.to_vec())
                    .map_err(std::io::Error::other)
            };
            let (json, footer) =
                toc_json_from_tail(&tail, size, fetch, &limits).map_err(|e| match e {
                    F::Io { .. } => (Fallback::Registry, e.to_string()),
                    _ => (Fallback::NotEstargz, e.to_string()),
                })?;
            let toc_offset = footer.toc_offset;
            // Not parsed here: the FUSE manager parses it once, to build the layer's index,
            // and a TOC it refuses makes the layer fall back as not eStargz.
            let toc_digest = Sha256Digest::of(&json).to_string();
            Ok(Arc::new(Fetched {
                json,
                layer: RemoteLayer {
                    reference,
                    digest,
                    size,
                    toc_digest,
                    toc_offset,
                },
            }))
        })
        .await
        .map_err(|e| (Fallback::Registry, format!("resolver task: {e}")))?
    }

    /// Starts fetching the TOCs of `layers` of `reference` in the background.
    pub fn prefetch(self: &Arc<Self>, reference: &str, layers: &[String]) {
        for digest in layers.iter().take(MAX_AHEAD) {
            let cell = self.cell(reference, digest);
            if cell.initialized() {
                continue;
            }
            let (this, reference, digest) = (self.clone(), reference.to_string(), digest.clone());
            tokio::spawn(async move {
                let Ok(_permit) = this.background.clone().acquire_owned().await else {
                    return;
                };
                // The layer's own Prepare may have resolved it meanwhile: then this is free.
                let _ = cell.get_or_init(|| this.fetch(&reference, &digest)).await;
            });
        }
    }

    /// The TOC of layer `digest` of `reference`, verified against `toc_digest` when given.
    pub async fn resolve(
        &self,
        reference: &str,
        digest: &str,
        toc_digest: Option<&str>,
    ) -> Result<Arc<Fetched>, (Fallback, String)> {
        let cell = self.cell(reference, digest);
        let result = cell
            .get_or_init(|| self.fetch(reference, digest))
            .await
            .clone();
        self.forget(reference, digest);
        let fetched = result?;
        if let Some(want) = toc_digest {
            if fetched.layer.toc_digest != want {
                return Err((
                    Fallback::TocDigestMismatch,
                    format!(
                        "TOC digest is {}, the image says {want}",
                        fetched.layer.toc_digest
                    ),
                ));
            }
        }
        Ok(fetched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_cri_and_from_ctr_remote() {
        let l = |pairs: &[(&str, &str)]| {
            LayerLabels::from_labels(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(l(&[(TARGET_REF, "sha256:chain")]), None);
        let cri = l(&[
            (CRI_IMAGE_REF, "r.example/app:1"),
            (CRI_LAYER_DIGEST, "sha256:b"),
            (CRI_IMAGE_LAYERS, "sha256:a,sha256:b,sha256:c"),
            (TOC_DIGEST, "sha256:t"),
        ])
        .unwrap();
        assert_eq!(cri.reference, "r.example/app:1");
        assert_eq!(cri.other_layers, ["sha256:a", "sha256:c"]);
        assert_eq!(cri.toc_digest.as_deref(), Some("sha256:t"));
        let stargz = l(&[(STARGZ_REF, "r/x:y"), (STARGZ_DIGEST, "sha256:d")]).unwrap();
        assert_eq!(stargz.digest, "sha256:d");
        assert_eq!(stargz.toc_digest, None);
    }
}
