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

fn parse_platform(s: &str) -> Result<Platform> {
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

struct Bars {
    multi: MultiProgress,
    quiet: bool,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Bars {
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

/// `estargz convert`.
pub fn convert(args: &ConvertArgs, quiet: bool) -> Result<ExitCode> {
    let src = location(&args.src, false)?;
    let dst = location(&args.dst, true)?;
    let platforms = args
        .platform
        .iter()
        .map(|p| parse_platform(p))
        .collect::<Result<Vec<_>>>()?;
    let opts = ImageConvertOptions {
        layer: args.flags.options()?,
        platforms: platforms.clone(),
    };
    let bars = Bars {
        multi: MultiProgress::new(),
        quiet: quiet || args.flags.json,
        bars: Mutex::new(HashMap::new()),
    };
    let uses_registry =
        matches!(src, Location::Registry(_)) || matches!(dst, Location::Registry(_));
    // A staging layout for whatever lives in a registry; removed unless --work-dir.
    let _tmp;
    let staging = if uses_registry {
        let dir = match &args.work_dir {
            Some(d) => d.clone(),
            None => {
                let t = tempfile::tempdir().context("creating a staging directory")?;
                let p = t.path().to_path_buf();
                _tmp = t;
                p
            }
        };
        Some(OciLayout::open_or_create(&dir).context("creating the staging layout")?)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = if uses_registry {
        Some(args.registry.client()?)
    } else {
        None
    };
    let parallel = 4;
    let (src_layout, src_tag) = match &src {
        Location::Layout(l, t) => (l.clone(), t.clone()),
        Location::Registry(image) => {
            let (layout, client) = (
                staging.as_ref().unwrap_or_else(|| unreachable!()),
                client.as_ref().unwrap_or_else(|| unreachable!()),
            );
            runtime
                .block_on(pull_to_layout(
                    client, image, layout, "src", &platforms, parallel, &bars,
                ))
                .with_context(|| format!("pulling {image}"))?;
            (layout.clone(), Some("src".to_string()))
        }
    };
    let (dst_layout, dst_tag) = match &dst {
        Location::Layout(l, t) => (l.clone(), t.clone()),
        Location::Registry(_) => (
            staging.clone().unwrap_or_else(|| unreachable!()),
            Some("dst".to_string()),
        ),
    };
    let start = Instant::now();
    let report = convert_image(
        &src_layout,
        src_tag.as_deref(),
        &dst_layout,
        dst_tag.as_deref(),
        &opts,
        &bars,
    )
    .with_context(|| format!("converting {} to {}", args.src, args.dst))?;
    if let (Location::Registry(image), Some(client)) = (&dst, &client) {
        // Within one registry, blobs the source repository has (kept layers) are mounted.
        let mount_from = match &src {
            Location::Registry(s)
                if s.registry == image.registry && s.repository != image.repository =>
            {
                Some(s.repository.as_str())
            }
            _ => None,
        };
        runtime
            .block_on(push_from_layout(
                client,
                &dst_layout,
                "dst",
                image,
                mount_from,
                parallel,
                &bars,
            ))
            .with_context(|| format!("pushing {image}"))?;
    }
    let _ = bars.multi.clear();
    if args.flags.json {
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
        args.src,
        report.manifests,
        args.dst,
        report.root.digest,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
