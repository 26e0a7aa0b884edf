//! Copying images between a registry and an OCI image layout.
//!
//! Conversion works on local files (a layer must be read whole to be converted), so
//! `estargz convert` pulls the source into a staging layout, converts there, and pushes the
//! result. Blobs already in the layout are not downloaded again; blobs the destination
//! repository already has are not uploaded again.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use estargz_oci::{media_types, Descriptor, Digest, Index, Manifest, OciLayout, Platform};
use futures_util::stream::{self, TryStreamExt};

use crate::client::{PushOutcome, RegistryClient};
use crate::error::{Error, Result};
use crate::reference::ImageRef;

/// Progress of a copy; every method has a no-op default.
pub trait CopyEvents: Sync {
    /// A blob transfer starts.
    fn blob_started(&self, _digest: &Digest, _size: u64) {}
    /// Bytes of the blob transferred so far.
    fn blob_progress(&self, _digest: &Digest, _bytes: u64) {}
    /// A blob is done (`skipped`: it was already there).
    fn blob_done(&self, _digest: &Digest, _skipped: bool) {}
}

impl CopyEvents for () {}

fn oci_err(e: estargz_oci::Error) -> Error {
    Error::Oci(e)
}

/// Pulls `image` into `layout` under `tag`: the manifest or index, and for each manifest
/// (only those matching `platforms`, if any are given) its config and layers, at most
/// `parallel` blobs at a time. Returns the descriptor of what was tagged.
pub async fn pull_to_layout(
    client: &RegistryClient,
    image: &ImageRef,
    layout: &OciLayout,
    tag: &str,
    platforms: &[Platform],
    parallel: usize,
    events: &dyn CopyEvents,
) -> Result<Descriptor> {
    let (root, body) = client.get_manifest(image).await?;
    let mut blobs: Vec<Descriptor> = Vec::new();
    let root = if media_types::is_index(&root.media_type) {
        let index = Index::from_slice(&body)?;
        let mut kept = Vec::new();
        for m in &index.manifests {
            let wanted = platforms.is_empty()
                || m.platform
                    .as_ref()
                    .is_some_and(|p| platforms.iter().any(|w| w.matches(p)));
            if !wanted || !media_types::is_manifest(&m.media_type) {
                continue;
            }
            let (d, b) = client
                .get_manifest(&image.with_reference(m.digest.as_str()))
                .await?;
            let manifest = Manifest::from_slice(&b)?;
            blobs.push(manifest.config.clone());
            blobs.extend(manifest.layers.iter().cloned());
            layout.write_blob(&b).map_err(oci_err)?;
            let mut entry = m.clone();
            entry.media_type = d.media_type;
            kept.push(entry);
        }
        if kept.is_empty() {
            return Err(Error::NotFound {
                target: format!("{image} manifests for the requested platforms"),
            });
        }
        let filtered = Index {
            manifests: kept,
            ..index
        };
        // Keep the original index bytes when nothing was filtered out.
        let bytes = if filtered.manifests.len() == Index::from_slice(&body)?.manifests.len() {
            body.to_vec()
        } else {
            filtered.to_vec()
        };
        let (d, s) = layout.write_blob(&bytes).map_err(oci_err)?;
        Descriptor::new(root.media_type.clone(), d, s)
    } else {
        let manifest = Manifest::from_slice(&body)?;
        blobs.push(manifest.config.clone());
        blobs.extend(manifest.layers.iter().cloned());
        layout.write_blob(&body).map_err(oci_err)?;
        root
    };
    let mut seen = HashSet::new();
    blobs.retain(|b| seen.insert(b.digest.clone()));
    stream::iter(blobs.into_iter().map(Ok::<_, Error>))
        .try_for_each_concurrent(parallel.max(1), |desc| async move {
            if layout.has_blob(&desc.digest) {
                events.blob_done(&desc.digest, true);
                return Ok(());
            }
            events.blob_started(&desc.digest, desc.size);
            let path = layout.blob_path(&desc.digest);
            client
                .download_blob(image, &desc, &path, &|n| {
                    events.blob_progress(&desc.digest, n)
                })
                .await?;
            events.blob_done(&desc.digest, false);
            Ok(())
        })
        .await?;
    layout.set_tag(Some(tag), root.clone()).map_err(oci_err)?;
    Ok(root)
}

/// Pushes the image tagged `tag` in `layout` to `image` (its tag, or its digest when it
/// names one): blobs first (skipping those the repository has, and mounting from the
/// repository `mount_from` on the same registry when given), then manifests, then the
/// index. Returns the pushed root digest.
pub async fn push_from_layout(
    client: &RegistryClient,
    layout: &OciLayout,
    tag: &str,
    image: &ImageRef,
    mount_from: Option<&str>,
    parallel: usize,
    events: &dyn CopyEvents,
) -> Result<Digest> {
    let root = layout.resolve(Some(tag)).map_err(oci_err)?;
    let mut manifests: Vec<Descriptor> = Vec::new();
    let mut blobs: Vec<Descriptor> = Vec::new();
    if media_types::is_index(&root.media_type) {
        let index = layout.read_index_blob(&root).map_err(oci_err)?;
        for m in index.manifests {
            let manifest = layout.read_manifest(&m).map_err(oci_err)?;
            blobs.push(manifest.config.clone());
            blobs.extend(manifest.layers);
            manifests.push(m);
        }
    } else {
        let manifest = layout.read_manifest(&root).map_err(oci_err)?;
        blobs.push(manifest.config.clone());
        blobs.extend(manifest.layers);
    }
    let mut seen = HashSet::new();
    blobs.retain(|b| seen.insert(b.digest.clone()));
    let layout = Arc::new(layout.clone());
    stream::iter(blobs.into_iter().map(Ok::<_, Error>))
        .try_for_each_concurrent(parallel.max(1), |desc| {
            let layout = layout.clone();
            async move {
                events.blob_started(&desc.digest, desc.size);
                let path = layout.blob_path(&desc.digest);
                let outcome = client
                    .push_blob(image, &desc.digest, &path, mount_from)
                    .await?;
                events.blob_done(&desc.digest, outcome != PushOutcome::Uploaded);
                Ok(())
            }
        })
        .await?;
    for m in &manifests {
        let body = layout.read_blob(&m.digest).map_err(oci_err)?;
        client
            .push_manifest(image, m.digest.as_str(), &m.media_type, Bytes::from(body))
            .await?;
    }
    let body = layout.read_blob(&root.digest).map_err(oci_err)?;
    let reference = image.reference();
    client
        .push_manifest(image, &reference, &root.media_type, Bytes::from(body))
        .await
}
