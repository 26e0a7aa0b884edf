//! `estargz convert`: whole images between OCI layouts.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz_convert::{convert_image, Events, ImageConvertOptions, LayerReport};
use estargz_oci::{parse_layout_ref, Digest, OciLayout, Platform};
use indicatif::{MultiProgress, ProgressBar};
use serde_json::json;

use crate::layer::ConvertFlags;
use crate::progress::bytes_bar;

/// Arguments of `estargz convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// Source image: oci:DIR[:TAG].
    pub src: String,
    /// Destination image: oci:DIR[:TAG] (the layout is created if missing; DIR may be the
    /// source's, to add a converted tag beside the original).
    pub dst: String,
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

fn layout_ref(s: &str, create: bool) -> Result<(OciLayout, Option<String>)> {
    let Some((dir, tag)) = parse_layout_ref(s) else {
        bail!("{s:?} is not an image reference this version understands; write an OCI image layout as oci:DIR or oci:DIR:TAG");
    };
    let layout = if create {
        OciLayout::open_or_create(&dir)
    } else {
        OciLayout::open(&dir)
    }
    .with_context(|| format!("opening OCI layout {}", dir.display()))?;
    Ok((layout, tag))
}

struct Bars {
    multi: MultiProgress,
    quiet: bool,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
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
    let (src, src_tag) = layout_ref(&args.src, false)?;
    let (dst, dst_tag) = layout_ref(&args.dst, true)?;
    let platforms = args
        .platform
        .iter()
        .map(|p| parse_platform(p))
        .collect::<Result<Vec<_>>>()?;
    let opts = ImageConvertOptions {
        layer: args.flags.options()?,
        platforms,
    };
    let bars = Bars {
        multi: MultiProgress::new(),
        quiet: quiet || args.flags.json,
        bars: Mutex::new(HashMap::new()),
    };
    let start = Instant::now();
    let report = convert_image(
        &src,
        src_tag.as_deref(),
        &dst,
        dst_tag.as_deref(),
        &opts,
        &bars,
    )
    .with_context(|| format!("converting {} to {}", args.src, args.dst))?;
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
