//! `estargz convert`: whole images between OCI layouts.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz_convert::{convert_image, Events, ImageConvertOptions, LayerReport};
use estargz_oci::{parse_layout_ref, Digest, OciLayout, Platform};
use estargz_registry::{pull_to_layout, push_from_layout, CopyEvents, ImageRef};
use indicatif::{MultiProgress, ProgressBar};
use serde_json::json;

use crate::layer::ConvertFlags;
use crate::progress::bytes_bar;

/// Arguments of `estargz convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// Source image: a registry reference (python:3.12, host:5000/repo:tag,
    /// repo@sha256:...) or an OCI layout (oci:DIR[:TAG]).
    pub src: String,
    /// Destination image: a registry reference or an OCI layout (created if missing; DIR
    /// may be the source's, to add a converted tag beside the original).
    pub dst: String,
    #[command(flatten)]
    pub registry: crate::registry::RegistryFlags,
    /// Where to stage images pulled from or pushed to a registry (default: a temporary
    /// directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<std::path::PathBuf>,
    /// Convert only this platform (os/arch[/variant], e.g. linux/arm64/v8); repeatable.
    /// Default: every platform of an index.
    #[arg(long)]
    pub platform: Vec<String>,
    #[command(flatten)]
    pub flags: ConvertFlags,
}

pub(crate) fn parse_platform(s: &str) -> Result<Platform> {
    let parts: Vec<&str> = s.split('/').collect();
    let (os, arch, variant) = match parts.as_slice() {
        [os, arch] => (*os, *arch, None),
        [os, arch, v] => (*os, *arch, Some(v.to_string())),
        _ => bail!("--platform {s:?}: expected os/arch or os/arch/variant, e.g. linux/amd64"),
    };
    Ok(Platform {
        architecture: arch.to_string(),
        os: os.to_string(),
        variant,
        os_version: None,
        os_features: None,
    })
}

/// Where an image lives, as the user wrote it.
enum Location {
    Layout(OciLayout, Option<String>),
    Registry(ImageRef),
}

fn location(s: &str, create: bool) -> Result<Location> {
    if let Some((dir, tag)) = parse_layout_ref(s) {
        let layout = if create {
            OciLayout::open_or_create(&dir)
        } else {
            OciLayout::open(&dir)
        }
        .with_context(|| format!("opening OCI layout {}", dir.display()))?;
        return Ok(Location::Layout(layout, tag));
    }
    let image: ImageRef = s
        .parse()
        .with_context(|| format!("{s:?} is neither an image reference nor oci:DIR[:TAG]"))?;
    Ok(Location::Registry(image))
}

pub(crate) struct Bars {
    multi: MultiProgress,
    quiet: bool,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Bars {
    /// Removes every bar from the terminal.
    pub fn clear(&self) {
        let _ = self.multi.clear();
    }

    fn start(&self, digest: &Digest, size: u64, verb: &str) {
        let short: String = digest.hex().chars().take(12).collect();
        let bar = bytes_bar(
            Some(&self.multi),
            Some(size),
            format!("{verb} {short}"),
            self.quiet,
        );
        if let Ok(mut b) = self.bars.lock() {
            b.insert(digest.clone(), bar);
        }
    }
    fn progress(&self, digest: &Digest, bytes: u64) {
        if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
            bar.set_position(bytes);
        }
    }
    fn finish(&self, digest: &Digest) {
        if let Some(bar) = self.bars.lock().ok().and_then(|mut b| b.remove(digest)) {
            bar.finish_and_clear();
        }
    }
}

impl CopyEvents for Bars {
    fn blob_started(&self, digest: &Digest, size: u64) {
        self.start(digest, size, "transfer");
    }
    fn blob_progress(&self, digest: &Digest, bytes: u64) {
        self.progress(digest, bytes);
    }
    fn blob_done(&self, digest: &Digest, _skipped: bool) {
        self.finish(digest);
    }
}

impl Events for Bars {
    fn layer_started(&self, source: &Digest, size: u64) {
        let short: String = source.hex().chars().take(12).collect();
        let bar = bytes_bar(
            Some(&self.multi),
            Some(size),
            format!("layer {short}"),
            self.quiet,
        );
        if let Ok(mut b) = self.bars.lock() {
            b.insert(source.clone(), bar);
        }
    }
    fn layer_progress(&self, source: &Digest, bytes: u64) {
        if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(source).cloned()) {
            bar.set_position(bytes);
        }
    }
    fn layer_done(&self, report: &LayerReport) {
        if let Some(bar) = self
            .bars
            .lock()
            .ok()
            .and_then(|mut b| b.remove(&report.source))
        {
            bar.finish_and_clear();
        }
    }
}

/// The two ends of a conversion as OCI layouts: an image in a registry is pulled into (or
/// pushed from) a staging layout, removed afterwards unless it is the user's `--work-dir`.
pub(crate) struct Endpoints {
    src: Location,
    dst: Location,
    /// Exists when either end is a registry, or when asked for (`estargz optimize`).
    pub staging: Option<OciLayout>,
    _tmp: Option<tempfile::TempDir>,
    pub runtime: tokio::runtime::Runtime,
    client: Option<estargz_registry::RegistryClient>,
    pub bars: Bars,
}

/// Blobs transferred at once to or from a registry.
const PARALLEL_BLOBS: usize = 4;

impl Endpoints {
    /// Opens (or creates) the layouts of `src` and `dst`; `stage`: make a staging layout
    /// even if neither is a registry.
    pub fn open(
        src: &str,
        dst: &str,
        registry: &crate::registry::RegistryFlags,
        work_dir: Option<&std::path::Path>,
        quiet: bool,
        stage: bool,
    ) -> Result<Endpoints> {
        let src = location(src, false)?;
        let dst = location(dst, true)?;
        let uses_registry =
            matches!(src, Location::Registry(_)) || matches!(dst, Location::Registry(_));
        let (staging, tmp) = if uses_registry || stage {
            let (dir, tmp) = match work_dir {
                Some(d) => (d.to_path_buf(), None),
                None => {
                    let t = tempfile::tempdir().context("creating a staging directory")?;
                    (t.path().to_path_buf(), Some(t))
                }
            };
            let layout = OciLayout::open_or_create(&dir).context("creating the staging layout")?;
            (Some(layout), tmp)
        } else {
            (None, None)
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let client = match uses_registry {
            true => Some(registry.client()?),
            false => None,
        };
        Ok(Endpoints {
            src,
            dst,
            staging,
            _tmp: tmp,
            runtime,
            client,
            bars: Bars {
                multi: MultiProgress::new(),
                quiet,
                bars: Mutex::new(HashMap::new()),
            },
        })
    }

    /// The staging directory when it is temporary (not the user's `--work-dir`).
    pub fn temporary_staging(&self) -> Option<&std::path::Path> {
        self._tmp.as_ref().map(|t| t.path())
    }

    /// The source as a layout and tag, pulled first (`platforms` only) if in a registry.
    pub fn source(&self, platforms: &[Platform]) -> Result<(OciLayout, Option<String>)> {
        match (&self.src, &self.staging, &self.client) {
            (Location::Layout(l, t), _, _) => Ok((l.clone(), t.clone())),
            (Location::Registry(image), Some(layout), Some(client)) => {
                self.runtime
                    .block_on(pull_to_layout(
                        client,
                        image,
                        layout,
                        "src",
                        platforms,
                        PARALLEL_BLOBS,
                        &self.bars,
                    ))
                    .with_context(|| format!("pulling {image}"))?;
                Ok((layout.clone(), Some("src".to_string())))
            }
            _ => unreachable!("a registry source always has a staging layout and a client"),
        }
    }

    /// Where the converted image is written: the destination layout, or the staging
    /// layout under the tag `dst` when it goes to a registry.
    pub fn destination(&self) -> (OciLayout, Option<String>) {
        match (&self.dst, &self.staging) {
            (Location::Layout(l, t), _) => (l.clone(), t.clone()),
            (Location::Registry(_), Some(layout)) => (layout.clone(), Some("dst".to_string())),
            _ => unreachable!("a registry destination always has a staging layout"),
        }
    }

    /// Pushes the converted image when the destination is a registry.
    pub fn publish(&self) -> Result<()> {
        let (Location::Registry(image), Some(client)) = (&self.dst, &self.client) else {
            return Ok(());
        };
        // Within one registry, blobs the source repository has (kept layers) are mounted.
        let mount_from = match &self.src {
            Location::Registry(s)
                if s.registry == image.registry && s.repository != image.repository =>
            {
                Some(s.repository.as_str())
            }
            _ => None,
        };
        let (layout, tag) = self.destination();
        self.runtime
            .block_on(push_from_layout(
                client,
                &layout,
                tag.as_deref().unwrap_or("dst"),
                image,
                mount_from,
                PARALLEL_BLOBS,
                &self.bars,
            ))
            .with_context(|| format!("pushing {image}"))?;
        Ok(())
    }
}

/// `estargz convert`.
pub fn convert(args: &ConvertArgs, quiet: bool) -> Result<ExitCode> {
    let platforms = args
        .platform
        .iter()
        .map(|p| parse_platform(p))
        .collect::<Result<Vec<_>>>()?;
    let opts = ImageConvertOptions {
        layer: args.flags.options()?,
        platforms: platforms.clone(),
        ..Default::default()
    };
    let ends = Endpoints::open(
        &args.src,
        &args.dst,
        &args.registry,
        args.work_dir.as_deref(),
        quiet || args.flags.json,
        false,
    )?;
    let (src_layout, src_tag) = ends.source(&platforms)?;
    let (dst_layout, dst_tag) = ends.destination();
    let start = Instant::now();
    let report = convert_image(
        &src_layout,
        src_tag.as_deref(),
        &dst_layout,
        dst_tag.as_deref(),
        &opts,
        &ends.bars,
    )
    .with_context(|| format!("converting {} to {}", args.src, args.dst))?;
    ends.publish()?;
    ends.bars.clear();
    print_report(&report, &args.src, &args.dst, start, args.flags.json)
}

/// Prints what a conversion did: a table of layers, or JSON.
pub(crate) fn print_report(
    report: &estargz_convert::ImageReport,
    src: &str,
    dst: &str,
    start: Instant,
    json: bool,
) -> Result<ExitCode> {
    if json {
        let layers: Vec<_> = report
            .layers
            .iter()
            .map(|l| {
                json!({
                    "source": l.source.to_string(), "sourceSize": l.source_size,
                    "digest": l.digest.to_string(), "size": l.size,
                    "tocDigest": l.toc_digest, "seconds": l.elapsed.as_secs_f64(), "kept": l.kept,
                })
            })
            .collect();
        let out = json!({
            "image": report.root.digest.to_string(),
            "mediaType": report.root.media_type,
            "manifests": report.manifests,
            "layers": layers,
            "seconds": start.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<19} {:>12} {:>12} {:<19} {:>8}",
        "LAYER", "ORIGINAL", "ESTARGZ", "TOC DIGEST", "TIME"
    );
    for l in &report.layers {
        let short = |d: &str| d.chars().take(19).collect::<String>();
        println!(
            "{:<19} {:>12} {:>12} {:<19} {:>8}",
            short(l.source.as_str()),
            l.source_size,
            l.size,
            short(&l.toc_digest),
            if l.kept {
                "kept".to_string()
            } else {
                format!("{:.1}s", l.elapsed.as_secs_f64())
            }
        );
    }
    println!(
        "converted {} ({} manifest(s)) -> {} {} in {:.1}s",
        src,
        report.manifests,
        dst,
        report.root.digest,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
