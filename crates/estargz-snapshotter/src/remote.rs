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
use estargz_oci::Digest;
use estargz_registry::ImageRef;
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
/// The sizes of the TOCs (with footer) of this layer and the next ones, as our converter
/// annotates them (`sha256:HEX=BYTES,...`): a hint that sizes each layer's first request.
pub const TOC_SIZES: &str = "containerd.io/snapshot/estargz/toc.sizes";
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

/// What the labels of one `Prepare` say about its layer, parsed: past this point
/// references and digests are typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    /// Image reference.
    pub reference: ImageRef,
    /// Layer digest.
    pub digest: Digest,
    /// Expected TOC digest, if given.
    pub toc_digest: Option<Sha256Digest>,
    /// The image's other layers (malformed entries left out: they are only resolved ahead).
    pub other_layers: Vec<Digest>,
    /// How many bytes at the end of a layer's blob hold its TOC and footer, for the layers
    /// the image's annotation names (malformed entries left out: a hint, never trusted).
    pub toc_sizes: HashMap<Digest, u64>,
}

impl LayerLabels {
    /// The layer digest as the labels give it (CRI first), unparsed: for logs and metrics
    /// of a layer whose labels may be malformed.
    pub fn raw_digest(labels: &BTreeMap<String, String>) -> Option<&str> {
        [CRI_LAYER_DIGEST, STARGZ_DIGEST]
            .iter()
            .find_map(|k| labels.get(*k).filter(|s| !s.is_empty()))
            .map(String::as_str)
    }

    /// Reads CRI or stargz labels (CRI first): `None` without an image reference and layer
    /// digest, an error when a label cannot be parsed.
    pub fn from_labels(
        labels: &BTreeMap<String, String>,
    ) -> Option<Result<LayerLabels, (Fallback, String)>> {
        let get = |a: &str, b: &str| {
            labels
                .get(a)
                .or_else(|| labels.get(b))
                .filter(|s| !s.is_empty())
        };
        let reference = get(CRI_IMAGE_REF, STARGZ_REF)?;
        let digest = get(CRI_LAYER_DIGEST, STARGZ_DIGEST)?;
        let bad = |what: &str, value: &str, e: &dyn std::fmt::Display| {
            (
                Fallback::BadLabel,
                format!(
                    "{what} {:?}: {e}",
                    value.chars().take(200).collect::<String>()
                ),
            )
        };
        Some((|| {
            let reference: ImageRef = reference
                .parse()
                .map_err(|e| bad("image reference", reference, &e))?;
            let digest: Digest = digest
                .parse()
                .map_err(|e| bad("layer digest", digest, &e))?;
            let toc_digest = match labels.get(TOC_DIGEST).filter(|s| !s.is_empty()) {
                Some(t) => Some(
                    t.parse::<Sha256Digest>()
                        .map_err(|e| bad("TOC digest", t, &e))?,
                ),
                None => None,
            };
            let other_layers = get(CRI_IMAGE_LAYERS, STARGZ_LAYERS)
                .map(|s| {
                    s.split(',')
                        .filter_map(|d| d.trim().parse::<Digest>().ok())
                        .filter(|d| *d != digest)
                        .collect()
                })
                .unwrap_or_default();
            let toc_sizes = labels
                .get(TOC_SIZES)
                .map(|s| {
                    s.split(',')
                        .take(MAX_AHEAD + 1)
                        .filter_map(|entry| {
                            let (d, n) = entry.trim().rsplit_once('=')?;
                            Some((d.parse::<Digest>().ok()?, n.parse::<u64>().ok()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(LayerLabels {
                reference,
                digest,
                toc_digest,
                other_layers,
                toc_sizes,
            })
        })())
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

/// The last bytes of a layer fetched first when the image does not give its TOC's size:
/// the footer, and the whole TOC when it is small; a larger TOC costs one more request for
/// the rest of it.
const TOC_TAIL: u64 = 64 << 10;

/// The most a TOC size hint may make the first request fetch: a hint is the image's word,
/// and a larger TOC is still fetched whole, by a second request.
const MAX_HINTED_TAIL: u64 = 8 << 20;

/// The first request for a layer's TOC: the size the image gives, bounded, or
/// [`TOC_TAIL`] without one.
fn first_tail(hint: Option<u64>) -> u64 {
    hint.map_or(TOC_TAIL, |n| {
        n.clamp(estargz_format::FOOTER_SIZE as u64, MAX_HINTED_TAIL)
    })
}

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

    fn cell(&self, reference: &ImageRef, digest: &Digest) -> Cell {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, (at, _)| at.elapsed() < PENDING_TTL);
        pending
            .entry(format!("{reference}@{digest}"))
            .or_insert_with(|| (Instant::now(), Arc::new(OnceCell::new())))
            .1
            .clone()
    }

    fn forget(&self, reference: &ImageRef, digest: &Digest) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("{reference}@{digest}"));
    }

    async fn fetch(
        &self,
        reference: &ImageRef,
        digest: &Digest,
        toc_size: Option<u64>,
    ) -> Result<Arc<Fetched>, (Fallback, String)> {
        let (image, blob) = (reference.clone(), digest.clone());
        // The footer and, for a small TOC or one whose size the image gives, the whole TOC
        // in one request that also gives the blob's size.
        let started = Instant::now();
        let tail_len = first_tail(toc_size);
        let (tail, size) = match self.client.fetch_tail(&image, &blob, tail_len).await {
            Ok(got) => {
                tracing::debug!(layer = %digest, bytes = tail_len, hinted = toc_size.is_some(),
                    ms = started.elapsed().as_secs_f64() * 1e3, "TOC tail fetched");
                got
            }
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
            let toc_digest = Sha256Digest::of(&json);
            Ok(Arc::new(Fetched {
                json,
                layer: RemoteLayer {
                    reference: image,
                    digest: blob,
                    size,
                    toc_digest,
                    toc_offset,
                },
            }))
        })
        .await
        .map_err(|e| (Fallback::Registry, format!("resolver task: {e}")))?
    }

    /// Starts fetching the TOCs of `layers` of `reference` in the background, each in a
    /// first request of the size `toc_sizes` gives for it, if any.
    pub fn prefetch(
        self: &Arc<Self>,
        reference: &ImageRef,
        layers: &[Digest],
        toc_sizes: &HashMap<Digest, u64>,
    ) {
        for digest in layers.iter().take(MAX_AHEAD) {
            let cell = self.cell(reference, digest);
            if cell.initialized() {
                continue;
            }
            let (this, reference, digest) = (self.clone(), reference.clone(), digest.clone());
            let toc_size = toc_sizes.get(&digest).copied();
            tokio::spawn(async move {
                let Ok(_permit) = this.background.clone().acquire_owned().await else {
                    return;
                };
                // The layer's own Prepare may have resolved it meanwhile: then this is free.
                let _ = cell
                    .get_or_init(|| this.fetch(&reference, &digest, toc_size))
                    .await;
            });
        }
    }

    /// The TOC of layer `digest` of `reference`, verified against `toc_digest` when given;
    /// unless resolved ahead already, fetched in a first request of `toc_size` bytes (the
    /// image's hint), if given.
    pub async fn resolve(
        &self,
        reference: &ImageRef,
        digest: &Digest,
        toc_digest: Option<Sha256Digest>,
        toc_size: Option<u64>,
    ) -> Result<Arc<Fetched>, (Fallback, String)> {
        let cell = self.cell(reference, digest);
        let result = cell
            .get_or_init(|| self.fetch(reference, digest, toc_size))
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
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let (a, b, c, t) = (d('a'), d('b'), d('c'), d('e'));
        assert_eq!(l(&[(TARGET_REF, "sha256:chain")]), None);
        let layers = format!("{a},{b}, sha256:bad,{c}");
        let cri = l(&[
            (CRI_IMAGE_REF, "r.example/app:1"),
            (CRI_LAYER_DIGEST, &b),
            (CRI_IMAGE_LAYERS, &layers),
            (TOC_DIGEST, &t),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(cri.reference.to_string(), "r.example/app:1");
        assert_eq!(cri.digest.to_string(), b);
        let others: Vec<String> = cri.other_layers.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            others,
            [a.clone(), c.clone()],
            "malformed entries are left out"
        );
        assert_eq!(cri.toc_digest.map(|t| t.to_string()), Some(t.clone()));
        let stargz = l(&[(STARGZ_REF, "r/x:y"), (STARGZ_DIGEST, &c)])
            .unwrap()
            .unwrap();
        assert_eq!(
            (stargz.digest.to_string(), stargz.toc_digest),
            (c.clone(), None)
        );
        // Malformed labels are a fallback with the reason, decided once, here.
        for bad in [
            vec![
                (CRI_IMAGE_REF, "UPPER/case"),
                (CRI_LAYER_DIGEST, a.as_str()),
            ],
            vec![(CRI_IMAGE_REF, "r/x:y"), (CRI_LAYER_DIGEST, "sha256:short")],
            vec![
                (STARGZ_REF, "r/x:y"),
                (STARGZ_DIGEST, &a),
                (TOC_DIGEST, "md5:x"),
            ],
        ] {
            let (why, _) = l(&bad).unwrap().unwrap_err();
            assert_eq!(why, Fallback::BadLabel, "{bad:?}");
        }
        let labels = [(CRI_LAYER_DIGEST.to_string(), "not a digest".to_string())].into();
        assert_eq!(LayerLabels::raw_digest(&labels), Some("not a digest"));
    }

    #[test]
    fn toc_sizes_are_a_bounded_hint() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let (a, b) = (d('a'), d('b'));
        let sizes = format!("{a}=40359, {b}=74478,{b}x=1,sha256:zz=5,=7,nonsense,{a}=-1");
        let labels = [
            (STARGZ_REF.to_string(), "r/x:y".to_string()),
            (STARGZ_DIGEST.to_string(), a.clone()),
            (TOC_SIZES.to_string(), sizes),
        ]
        .into();
        let info = LayerLabels::from_labels(&labels).unwrap().unwrap();
        let mut got: Vec<(String, u64)> = info
            .toc_sizes
            .iter()
            .map(|(d, n)| (d.to_string(), *n))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [(a, 40359), (b, 74478)],
            "malformed entries are left out"
        );
        assert_eq!(first_tail(None), TOC_TAIL);
        assert_eq!(first_tail(Some(74478)), 74478);
        assert_eq!(first_tail(Some(3)), estargz_format::FOOTER_SIZE as u64);
        assert_eq!(first_tail(Some(u64::MAX)), MAX_HINTED_TAIL);
    }
}
