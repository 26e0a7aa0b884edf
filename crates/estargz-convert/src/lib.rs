//! Converting whole images to eStargz.
//!
//! Walks an image (an index of platforms, or a single manifest), converts every layer with
//! [`estargz_format::convert`], rewrites each config's `rootfs.diff_ids` and each manifest's
//! layer descriptors (with the TOC digest and uncompressed-size annotations a lazy pull
//! needs), and writes the result under a tag. A layer shared by several platforms or
//! manifests is converted once. Layers that already are eStargz (a valid TOC whose digest
//! matches their annotation) are kept as they are.
//!
//! Images are read from and written to OCI image layouts ([`estargz_oci::OciLayout`]).

#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use estargz_format::{ConvertOptions, EstargzReader, OpenOptions, Sha256Digest};
use estargz_oci::{media_types, Descriptor, Digest, Index, Manifest, OciLayout, Platform};

/// Manifest annotation holding a layer's TOC digest; containerd hands it to snapshotters.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Manifest annotation holding a layer's uncompressed size.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Manifest annotation telling a snapshotter how many bytes at the end of a layer's blob
/// hold its TOC and footer (from the TOC's gzip member to the blob's end), for this layer
/// and the next ones of the manifest: `sha256:HEX=BYTES,...`, this layer first. A lazy pull
/// then fetches each TOC in one request of exactly its size, also for the layers it
/// resolves ahead of their turn. Only a hint: the TOC is verified by its digest either way.
pub const TOC_SIZES_ANNOTATION: &str = "containerd.io/snapshot/estargz/toc.sizes";
/// Layers listed in one layer's [`TOC_SIZES_ANNOTATION`] (itself included): a snapshotter
/// resolves only a few layers ahead, and containerd caps a label at 4 KiB.
pub const TOC_SIZES_LISTED: usize = 8;

/// Errors of an image conversion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the layout failed.
    #[error(transparent)]
    Oci(#[from] estargz_oci::Error),
    /// A layer could not be converted.
    #[error("layer {digest}: {source}")]
    Layer {
        /// Source layer digest.
        digest: String,
        /// What went wrong.
        #[source]
        source: estargz_format::Error,
    },
    /// The image is not something this converter understands.
    #[error("{0}")]
    Unsupported(String),
    /// Writing output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being written.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to convert an image.
#[derive(Debug, Clone, Default)]
pub struct ImageConvertOptions {
    /// Options for every layer.
    pub layer: ConvertOptions,
    /// Platforms to convert; empty means all. Other platforms are left out of the result.
    pub platforms: Vec<Platform>,
    /// Prioritized files of particular source layers (by digest), in place of
    /// `layer.prioritized_files`: what `estargz optimize` recorded in each layer. Such a
    /// layer is converted again even if it already is eStargz.
    pub prioritized_by_layer: HashMap<Digest, Vec<String>>,
    /// Startup ranges of particular source layers (by digest), in place of
    /// `layer.startup_ranges`: the bytes of each file that `estargz optimize` saw read.
    pub startup_ranges_by_layer: HashMap<Digest, HashMap<String, Vec<std::ops::Range<u64>>>>,
}

/// What happened to one source layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    /// Source layer digest.
    pub source: Digest,
    /// Source layer size.
    pub source_size: u64,
    /// Converted layer digest.
    pub digest: Digest,
    /// Converted layer size.
    pub size: u64,
    /// TOC digest of the converted layer.
    pub toc_digest: String,
    /// Time spent converting (zero when kept).
    pub elapsed: Duration,
    /// The layer was already eStargz and was kept as is.
    pub kept: bool,
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ImageReport {
    /// Descriptor of the converted image (index or manifest) as tagged in the destination.
    pub root: Descriptor,
    /// Every distinct source layer, in the order first seen.
    pub layers: Vec<LayerReport>,
    /// Platforms converted (none for a single-manifest image without platform in its config).
    pub manifests: usize,
}

/// Receives progress events; every method has a no-op default.
pub trait Events: Sync {
    /// A layer conversion starts.
    fn layer_started(&self, _source: &Digest, _size: u64) {}
    /// Bytes of the source layer consumed so far.
    fn layer_progress(&self, _source: &Digest, _bytes: u64) {}
    /// Bytes of the converted layer written so far.
    fn layer_written(&self, _source: &Digest, _bytes: u64) {}
    /// A layer is done.
    fn layer_done(&self, _report: &LayerReport) {}
}

impl Events for () {}

struct LayerProgress<'a> {
    events: &'a dyn Events,
    source: &'a Digest,
}

impl estargz_format::Progress for LayerProgress<'_> {
    fn input(&self, bytes: u64) {
        self.events.layer_progress(self.source, bytes);
    }
    fn output(&self, bytes: u64) {
        self.events.layer_written(self.source, bytes);
    }
}

/// Converts the image tagged `src_tag` in `src` into `dst`, tagged `dst_tag`.
pub fn convert_image(
    src: &OciLayout,
    src_tag: Option<&str>,
    dst: &OciLayout,
    dst_tag: Option<&str>,
    opts: &ImageConvertOptions,
    events: &dyn Events,
) -> Result<ImageReport> {
    let root = src.resolve(src_tag)?;
    let mut conv = Converter {
        src,
        dst,
        opts,
        events,
        layers: HashMap::new(),
        order: Vec::new(),
        manifests: 0,
    };
    // Convert every distinct layer first, several at a time; the walk below then finds
    // them all converted.
    let mut pending = Vec::new();
    conv.collect_layers(&root, &mut pending)?;
    conv.convert_all(pending)?;
    let mut new_root = if media_types::is_index(&root.media_type) {
        conv.index(&root)?
    } else if media_types::is_manifest(&root.media_type) {
        conv.manifest(&root)?
    } else {
        return Err(Error::Unsupported(format!(
            "{} has media type {:?}, which is neither an image index nor a manifest",
            root.digest, root.media_type
        )));
    };
    // Names given to the source in its layout (by OCI or containerd) are not the result's.
    if let Some(a) = new_root.annotations.as_mut() {
        a.remove(estargz_oci::REF_NAME_ANNOTATION);
        a.remove("io.containerd.image.name");
        if a.is_empty() {
            new_root.annotations = None;
        }
    }
    dst.set_tag(dst_tag, new_root.clone())?;
    let layers = conv
        .order
        .iter()
        .filter_map(|d| conv.layers.get(d).map(|c| c.report.clone()))
        .collect();
    Ok(ImageReport {
        root: new_root,
        layers,
        manifests: conv.manifests,
    })
}

struct Converted {
    desc: Descriptor,
    diff_id: Digest,
    report: LayerReport,
    /// Bytes from the TOC's gzip member to the end of the blob.
    toc_size: u64,
}

struct Converter<'a> {
    src: &'a OciLayout,
    dst: &'a OciLayout,
    opts: &'a ImageConvertOptions,
    events: &'a dyn Events,
    /// Converted layers by source digest.
    layers: HashMap<Digest, Converted>,
    order: Vec<Digest>,
    manifests: usize,
}

impl Converter<'_> {
    fn write_json(&self, bytes: &[u8], media_type: &str) -> Result<Descriptor> {
        let (digest, size) = self.dst.write_blob(bytes)?;
        Ok(Descriptor::new(media_type, digest, size))
    }

    fn wanted(&self, platform: Option<&Platform>) -> bool {
        if self.opts.platforms.is_empty() {
            return true;
        }
        match platform {
            Some(p) => self.opts.platforms.iter().any(|w| w.matches(p)),
            // Entries without a platform (attestations, artifacts) are not images to run.
            None => false,
        }
    }

    /// Distinct layers of the selected manifests under `desc`, with their DiffIDs.
    fn collect_layers(&self, desc: &Descriptor, out: &mut Vec<(Descriptor, Digest)>) -> Result<()> {
        if media_types::is_index(&desc.media_type) {
            for m in self.src.read_index_blob(desc)?.manifests {
                if self.wanted(m.platform.as_ref()) {
                    self.collect_layers(&m, out)?;
                }
            }
        } else if media_types::is_manifest(&desc.media_type) {
            let manifest = self.src.read_manifest(desc)?;
            let diff_ids = self.src.read_config(&manifest.config)?.diff_ids()?;
            for (layer, diff) in manifest.layers.into_iter().zip(diff_ids) {
                if !out.iter().any(|(l, _)| l.digest == layer.digest) {
                    out.push((layer, diff));
                }
            }
        }
        Ok(())
    }

    /// Converts `layers` on up to `threads` workers (each compressing with its share of the
    /// threads; the output does not depend on the split) and caches the results.
    fn convert_all(&mut self, layers: Vec<(Descriptor, Digest)>) -> Result<()> {
        let threads = match self.opts.layer.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let workers = threads.min(layers.len()).max(1);
        let per_layer = (threads / workers).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: std::sync::Mutex<Vec<(usize, Result<Converted>)>> = Default::default();
        let this = &*self;
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((layer, diff)) = layers.get(i) else {
                        return;
                    };
                    let r = this.convert_one(layer, diff, per_layer);
                    let failed = r.is_err();
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, r));
                    if failed {
                        // Let the other workers finish their current layer, then stop.
                        next.store(layers.len(), std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|(i, _)| *i);
        for (i, r) in results {
            let converted = r?;
            let source = layers[i].0.digest.clone();
            self.order.push(source.clone());
            self.layers.insert(source, converted);
        }
        Ok(())
    }

    fn convert_one(
        &self,
        layer: &Descriptor,
        diff_id: &Digest,
        threads: usize,
    ) -> Result<Converted> {
        if !media_types::is_layer(&layer.media_type) {
            return Err(Error::Unsupported(format!(
                "layer {} has media type {:?}, which is not a tar layer",
                layer.digest, layer.media_type
            )));
        }
        let reorder = self.opts.prioritized_by_layer.contains_key(&layer.digest)
            || self
                .opts
                .startup_ranges_by_layer
                .contains_key(&layer.digest);
        let kept = match reorder {
            true => None,
            false => self.keep_estargz(layer, diff_id)?,
        };
        let converted = match kept {
            Some(kept) => kept,
            None => self.convert_layer(layer, threads)?,
        };
        self.events.layer_done(&converted.report);
        Ok(converted)
    }

    fn index(&mut self, desc: &Descriptor) -> Result<Descriptor> {
        let index = self.src.read_index_blob(desc)?;
        let mut manifests = Vec::new();
        for m in &index.manifests {
            if !self.wanted(m.platform.as_ref()) {
                tracing::info!(digest = %m.digest, "platform not selected; left out");
                continue;
            }
            let new = if media_types::is_index(&m.media_type) {
                self.index(m)?
            } else if media_types::is_manifest(&m.media_type) {
                self.manifest(m)?
            } else {
                tracing::warn!(digest = %m.digest, media_type = %m.media_type, "not an image; left out");
                continue;
            };
            manifests.push(new);
        }
        if manifests.is_empty() {
            return Err(Error::Unsupported(format!(
                "index {} has no manifest for the selected platforms",
                desc.digest
            )));
        }
        let new_index = Index {
            schema_version: 2,
            media_type: Some(media_types::OCI_INDEX.to_string()),
            manifests,
            ..index
        };
        let mut out = self.write_json(&new_index.to_vec(), media_types::OCI_INDEX)?;
        out.annotations = desc.annotations.clone();
        out.platform = desc.platform.clone();
        Ok(out)
    }

    fn manifest(&mut self, desc: &Descriptor) -> Result<Descriptor> {
        let manifest = self.src.read_manifest(desc)?;
        let mut config = self.src.read_config(&manifest.config)?;
        let diff_ids = config.diff_ids()?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::Unsupported(format!(
                "manifest {} has {} layers but its config lists {} diff_ids",
                desc.digest,
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::with_capacity(manifest.layers.len());
        let mut toc_sizes = Vec::with_capacity(manifest.layers.len());
        let mut new_diff_ids = Vec::with_capacity(manifest.layers.len());
        for (layer, diff_id) in manifest.layers.iter().zip(diff_ids) {
            let done = self.layer(layer, diff_id)?;
            toc_sizes.push(format!("{}={}", done.desc.digest, done.toc_size));
            layers.push(done.desc.clone());
            new_diff_ids.push(done.diff_id.clone());
        }
        // Each layer lists its own TOC size and those of the next layers: whichever layer
        // containerd prepares first, the snapshotter knows the TOCs it resolves ahead.
        for (i, layer) in layers.iter_mut().enumerate() {
            let listed = &toc_sizes[i..toc_sizes.len().min(i + TOC_SIZES_LISTED)];
            layer
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(TOC_SIZES_ANNOTATION.into(), listed.join(","));
        }
        config.set_diff_ids(&new_diff_ids);
        let config_desc = self.write_json(&config.to_vec(), media_types::OCI_CONFIG)?;
        let new_manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.to_string()),
            config: config_desc,
            layers,
            ..manifest
        };
        let mut out = self.write_json(&new_manifest.to_vec(), media_types::OCI_MANIFEST)?;
        out.annotations = desc.annotations.clone();
        out.platform = desc.platform.clone();
        self.manifests += 1;
        Ok(out)
    }

    /// The converted form of one layer (converted by `convert_all`).
    fn layer(&self, layer: &Descriptor, _diff_id: Digest) -> Result<&Converted> {
        self.layers
            .get(&layer.digest)
            .ok_or_else(|| Error::Unsupported(format!("layer {} was not converted", layer.digest)))
    }

    /// A layer that already is eStargz, with a TOC digest annotation that matches, is kept.
    fn keep_estargz(&self, layer: &Descriptor, diff_id: &Digest) -> Result<Option<Converted>> {
        let Some(annotated) = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(TOC_DIGEST_ANNOTATION))
        else {
            return Ok(None);
        };
        if !media_types::is_gzip_layer(&layer.media_type) {
            return Ok(None);
        }
        let Ok(expected) = annotated.parse::<Sha256Digest>() else {
            return Ok(None);
        };
        let file = self.src.open_blob(&layer.digest)?;
        let opts = OpenOptions {
            expected_toc_digest: Some(expected),
            ..Default::default()
        };
        let Ok(reader) = EstargzReader::open(&file, &opts) else {
            return Ok(None);
        };
        let toc_size = reader.blob_size() - reader.footer().toc_offset;
        let (digest, size) = if self.src.root() == self.dst.root() {
            (layer.digest.clone(), layer.size)
        } else {
            self.dst
                .import_blob_file(&self.src.blob_path(&layer.digest), Some(&layer.digest))?
        };
        let mut desc = layer.clone();
        desc.media_type = media_types::OCI_LAYER_GZIP.to_string();
        desc.digest = digest.clone();
        desc.size = size;
        let report = LayerReport {
            source: layer.digest.clone(),
            source_size: layer.size,
            digest,
            size,
            toc_digest: annotated.clone(),
            elapsed: Duration::ZERO,
            kept: true,
        };
        Ok(Some(Converted {
            desc,
            diff_id: diff_id.clone(),
            report,
            toc_size,
        }))
    }

    fn convert_layer(&self, layer: &Descriptor, threads: usize) -> Result<Converted> {
        let start = Instant::now();
        self.events.layer_started(&layer.digest, layer.size);
        let input = self.src.open_blob(&layer.digest)?;
        let mut writer = self.dst.blob_writer()?;
        let out = {
            let mut buffered = BufWriter::with_capacity(1 << 20, &mut writer);
            let progress = LayerProgress {
                events: self.events,
                source: &layer.digest,
            };
            let mut options = estargz_format::ConvertOptions {
                threads,
                ..self.opts.layer.clone()
            };
            if let Some(files) = self.opts.prioritized_by_layer.get(&layer.digest) {
                options.prioritized_files = files.clone();
            }
            if let Some(ranges) = self.opts.startup_ranges_by_layer.get(&layer.digest) {
                options.startup_ranges = ranges.clone();
            }
            let out = estargz_format::convert(
                std::io::BufReader::with_capacity(1 << 20, input),
                &mut buffered,
                &options,
                &progress,
            )
            .map_err(|source| Error::Layer {
                digest: layer.digest.to_string(),
                source,
            })?;
            buffered.flush().map_err(|source| Error::Io {
                context: format!("writing the converted layer of {}", layer.digest),
                source,
            })?;
            out
        };
        let (digest, size) = writer.commit()?;
        debug_assert_eq!(digest.as_str(), out.blob_digest.to_string());
        let mut annotations: BTreeMap<String, String> =
            layer.annotations.clone().unwrap_or_default();
        annotations.insert(TOC_DIGEST_ANNOTATION.into(), out.toc_digest.to_string());
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.into(),
            out.uncompressed_size.to_string(),
        );
        let mut desc = Descriptor::new(media_types::OCI_LAYER_GZIP, digest.clone(), size);
        desc.annotations = Some(annotations);
        let diff = Digest::parse(&out.diff_id.to_string())?;
        let report = LayerReport {
            source: layer.digest.clone(),
            source_size: layer.size,
            digest,
            size,
            toc_digest: out.toc_digest.to_string(),
            elapsed: start.elapsed(),
            kept: false,
        };
        tracing::info!(source = %layer.digest, digest = %report.digest, toc = %report.toc_digest,
            secs = report.elapsed.as_secs_f64(), "layer converted");
        Ok(Converted {
            desc,
            diff_id: diff,
            report,
            toc_size: out.blob_size - out.toc_offset,
        })
    }
}
