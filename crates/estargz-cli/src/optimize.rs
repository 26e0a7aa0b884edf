//! `estargz optimize`: run an image's workload in a container whose layers are mounted
//! lazily through our own layer file system, record the files it touches, and convert
//! the image with them prioritized.
//!
//! Steps: the source is converted to eStargz as it is (fast compression; layers that
//! already are eStargz are kept) into the staging layout; each layer is mounted with a
//! shared [`AccessRecorder`], stacked with overlayfs under a throw-away upper directory,
//! and run with `runc`; when the workload exits, times out, prints the `--wait-for` line
//! or we are interrupted, the container is deleted and everything unmounted; then the
//! source is converted again with each layer's recorded files first.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz_cache::{CacheConfig, ChunkCache};
use estargz_convert::{convert_image, ImageConvertOptions, TOC_DIGEST_ANNOTATION};
use estargz_format::{Limits, Sha256Digest};
use estargz_layerfs::{
    load_toc, mount as mount_layer, Access, AccessRecorder, FetchOptions, FetchScheduler,
    FileSource, LayerFs, MountedLayer,
};
use estargz_oci::{media_types, Descriptor, Digest, ImageConfig, Manifest, OciLayout, Platform};
use serde_json::json;

use crate::container::{parse_bind, resolve_user, runtime_spec, Container, Stop, Workload};
use crate::image::{parse_platform, print_report, Endpoints};
use crate::layer::ConvertFlags;
use crate::mount::mount_overlay;
use crate::registry::RegistryFlags;

/// Arguments of `estargz optimize`.
#[derive(Args)]
pub struct OptimizeArgs {
    /// Source image: a registry reference or an OCI layout (oci:DIR[:TAG]).
    pub src: String,
    /// Destination image: a registry reference or an OCI layout.
    pub dst: String,
    /// Stop the workload after this long (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Stop the workload as soon as a line of its output (stdout or stderr) matches this
    /// regular expression (a server's "ready" line).
    #[arg(long, value_name = "REGEX")]
    pub wait_for: Option<String>,
    /// Write the recorded files here: one path a line, first touched first (the format
    /// `convert --prioritize` reads).
    #[arg(long, value_name = "FILE")]
    pub record_out: Option<PathBuf>,
    /// Write the detailed record here as JSON: every file and symlink touched, its layer,
    /// the time and operation of its first touch, and the byte ranges read.
    #[arg(long, value_name = "FILE")]
    pub record_json: Option<PathBuf>,
    /// Environment variable for the workload, KEY=VALUE (added to the image's); repeatable.
    #[arg(long, short)]
    pub env: Vec<String>,
    /// Bind mount for the workload: type=bind,src=HOST,dst=PATH[,ro] or HOST:PATH[:ro];
    /// repeatable.
    #[arg(long)]
    pub mount: Vec<String>,
    /// Working directory of the workload (default: the image's).
    #[arg(long, short)]
    pub workdir: Option<String>,
    /// Network of the workload: none (a namespace of its own with only loopback) or host.
    #[arg(long, default_value = "none", value_parser = ["none", "host"])]
    pub net: String,
    /// Platform to run and convert (os/arch[/variant]; default: this machine's). Other
    /// platforms of the source are left out.
    #[arg(long)]
    pub platform: Option<String>,
    /// Where to stage images and the run (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryFlags,
    #[command(flatten)]
    pub flags: ConvertFlags,
    /// Command to run instead of the image's entrypoint and command (after --).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Parses durations such as `10s`, `500ms`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// The manifest of `platform` under `tag` in `layout` (the image itself when it is a single
/// manifest), with its config.
fn manifest_for(
    layout: &OciLayout,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<(Manifest, ImageConfig)> {
    let mut desc = layout.resolve(tag)?;
    for _ in 0..8 {
        if media_types::is_manifest(&desc.media_type) {
            let manifest = layout.read_manifest(&desc)?;
            let config = layout.read_config(&manifest.config)?;
            return Ok((manifest, config));
        }
        if !media_types::is_index(&desc.media_type) {
            bail!("{} is a {}, not an image", desc.digest, desc.media_type);
        }
        let index = layout.read_index_blob(&desc)?;
        let found: Option<&Descriptor> = index.manifests.iter().find(|m| {
            m.platform.as_ref().is_some_and(|p| platform.matches(p))
                || (m.platform.is_none() && media_types::is_index(&m.media_type))
        });
        desc = found
            .with_context(|| format!("the image has no manifest for {platform}"))?
            .clone();
    }
    bail!("image indexes nested too deeply")
}

/// Layers mounted and stacked; unmounted (overlay first) when dropped.
struct RootFs {
    overlay: Option<crate::mount::OverlayMount>,
    layers: Vec<MountedLayer>,
}

impl Drop for RootFs {
    fn drop(&mut self) {
        drop(self.overlay.take());
        for layer in self.layers.drain(..).rev() {
            let at = layer.mountpoint().to_path_buf();
            if let Err(e) = layer.unmount() {
                tracing::warn!(dir = %at.display(), error = %e, "unmounting a layer failed");
            }
        }
    }
}

/// Mounts every layer of `manifest` (blobs in `layout`) with `recorder` and stacks them at
/// `work/rootfs`.
fn mount_image(
    layout: &OciLayout,
    manifest: &Manifest,
    work: &Path,
    recorder: &Arc<AccessRecorder>,
) -> Result<(RootFs, PathBuf)> {
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: work.join("cache"),
        max_bytes: u64::MAX / 2,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }));
    // Every read goes through FUSE, where it is recorded: no passthrough; nothing fetched
    // that the workload did not ask for.
    let scheduler = FetchScheduler::new(FetchOptions {
        prefetch: false,
        background: false,
        passthrough: false,
        ..Default::default()
    });
    let mut root = RootFs {
        overlay: None,
        layers: Vec::new(),
    };
    let mut lowers = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let expected: Option<Sha256Digest> = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(TOC_DIGEST_ANNOTATION))
            .map(|d| d.parse())
            .transpose()
            .with_context(|| format!("layer {i}: bad TOC digest annotation"))?;
        let path = layout.blob_path(&layer.digest);
        let source =
            FileSource::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (toc, _) = load_toc(&source, layer.size, expected, &Limits::default())
            .with_context(|| format!("reading the TOC of layer {i} ({})", layer.digest))?;
        let fs = LayerFs::new(&toc, Arc::new(source), cache.clone(), scheduler.clone());
        fs.record_into(recorder.clone(), i);
        let dir = work.join(format!("layer-{i}"));
        std::fs::create_dir_all(&dir)?;
        root.layers
            .push(mount_layer(fs, &dir).with_context(|| format!("mounting layer {i}"))?);
        lowers.push(dir);
    }
    let (upper, workdir, rootfs) = (work.join("upper"), work.join("work"), work.join("rootfs"));
    for d in [&upper, &workdir, &rootfs] {
        std::fs::create_dir_all(d)?;
    }
    root.overlay = Some(mount_overlay(
        &lowers,
        &[],
        &upper,
        &workdir,
        &rootfs,
        false,
    )?);
    Ok((root, rootfs))
}

/// Turns SIGINT and SIGTERM into `true` on the returned channel while `guarded` (mounts or
/// a container exist, and are cleaned up by whoever watches it); otherwise removes
/// `scratch` (a temporary staging directory) and exits at once with 130, as an unhandled
/// Ctrl-C would.
fn watch_signals(
    runtime: &tokio::runtime::Runtime,
    guarded: Arc<AtomicBool>,
    scratch: Option<PathBuf>,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if guarded.load(Ordering::SeqCst) {
                let _ = tx.send(true);
            } else {
                eprintln!("interrupted");
                if let Some(dir) = &scratch {
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(130);
            }
        }
    });
    rx
}

/// The files to prioritize, with their layers, in the order of first touch: regular files
/// whose content the workload opened or read (prefetch fetches content; a file only
/// looked up needs none, and its bytes would delay the ones that are needed).
fn prioritized(accesses: &[Access]) -> Vec<&Access> {
    accesses.iter().filter(|a| !a.symlink && a.opened).collect()
}

/// `estargz optimize`.
pub fn optimize(args: &OptimizeArgs, quiet: bool) -> Result<ExitCode> {
    if args.flags.prioritize.is_some() {
        bail!("--prioritize does not go with optimize, which records the list itself; to reuse or edit a list, write it with --record-out and pass it to `estargz convert --prioritize`");
    }
    let wait_for = args
        .wait_for
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("--wait-for is not a valid regular expression")?;
    let binds = args
        .mount
        .iter()
        .map(|m| parse_bind(m))
        .collect::<Result<Vec<_>>>()?;
    let platform = match &args.platform {
        Some(p) => parse_platform(p)?,
        None => Platform::host(),
    };
    let started = Instant::now();
    let ends = Endpoints::open(
        &args.src,
        &args.dst,
        &args.registry,
        args.work_dir.as_deref(),
        quiet || args.flags.json,
        true,
    )?;
    let guarded = Arc::new(AtomicBool::new(false));
    let interrupted = watch_signals(
        &ends.runtime,
        guarded.clone(),
        ends.temporary_staging().map(Path::to_path_buf),
    );
    let staging = ends
        .staging
        .clone()
        .context("optimize always has a staging layout")?;
    let (src_layout, src_tag) = ends.source(std::slice::from_ref(&platform))?;

    // 1. The image as it is, in eStargz, to run from.
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    say(format!("preparing {} ({platform}) to run lazily", args.src));
    let mut run_layer = args.flags.options()?;
    // Only read locally, once: compress fast.
    run_layer.compression_level = 1;
    convert_image(
        &src_layout,
        src_tag.as_deref(),
        &staging,
        Some("optimize-run"),
        &ImageConvertOptions {
            layer: run_layer,
            platforms: vec![platform.clone()],
            ..Default::default()
        },
        &ends.bars,
    )
    .with_context(|| format!("converting {} to run it", args.src))?;
    let (run_manifest, run_config) = manifest_for(&staging, Some("optimize-run"), &platform)?;
    let (src_manifest, _) = manifest_for(&src_layout, src_tag.as_deref(), &platform)?;
    let mut workload = Workload::from_config(
        &run_config.raw,
        &args.command,
        &args.env,
        args.workdir.as_deref(),
    )?;
    workload.binds = binds;
    workload.host_network = args.net == "host";

    // 2. Run it on the lazily mounted layers, recording.
    let work = tempfile::Builder::new()
        .prefix("estargz-optimize-")
        .tempdir_in(staging.root())
        .context("creating the run directory")?;
    let recorder = Arc::new(AccessRecorder::new());
    guarded.store(true, Ordering::SeqCst);
    let (root, rootfs) = mount_image(&staging, &run_manifest, work.path(), &recorder)?;
    let (uid, gid) = resolve_user(&workload.user, &rootfs)?;
    let bundle = work.path().join("bundle");
    std::fs::create_dir_all(&bundle)?;
    let spec = runtime_spec(&workload, uid, gid, &rootfs);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    say(format!(
        "running {:?} for at most {:?}{}",
        workload.args,
        args.timeout,
        args.wait_for
            .as_ref()
            .map(|r| format!(" or until a line matches {r:?}"))
            .unwrap_or_default()
    ));
    recorder.start();
    let ran = Instant::now();
    let stop = ends.runtime.block_on(Container::run(
        &bundle,
        &work.path().join("runc"),
        args.timeout,
        wait_for.as_ref(),
        interrupted.clone(),
    ));
    recorder.stop();
    let ran = ran.elapsed();
    drop(root);
    guarded.store(false, Ordering::SeqCst);
    let stop = stop?;
    if *interrupted.borrow() || stop == Stop::Interrupted {
        eprintln!("interrupted: the container is deleted and the image unmounted; nothing written");
        return Ok(ExitCode::from(130));
    }
    if let Stop::Exited(code) = stop {
        if code != 0 {
            tracing::warn!(code, "the workload failed; converting with what it touched");
        }
    }
    let accesses = recorder.accesses();
    let files = prioritized(&accesses);

    // 3. Convert with each layer's files first.
    let mut by_layer: HashMap<Digest, Vec<String>> = HashMap::new();
    // The pages each file was read at: its converted chunks holding them are marked, for a
    // lazy layer to prefetch them before the rest.
    let mut ranges_by_layer: HashMap<Digest, HashMap<String, Vec<Range<u64>>>> = HashMap::new();
    let mut per_layer = vec![(0usize, 0u64); src_manifest.layers.len()];
    for a in &files {
        let Some(desc) = src_manifest.layers.get(a.layer) else {
            bail!(
                "a file was recorded in layer {}, which the source image does not have",
                a.layer
            );
        };
        by_layer
            .entry(desc.digest.clone())
            .or_default()
            .push(a.path.clone());
        if !a.ranges.is_empty() {
            ranges_by_layer
                .entry(desc.digest.clone())
                .or_default()
                .insert(a.path.clone(), a.ranges.clone());
        }
        per_layer[a.layer].0 += 1;
        per_layer[a.layer].1 += a.size;
    }
    if let Some(path) = &args.record_out {
        let mut text = format!(
            "# files {} touched in {} ({}), first touched first\n",
            args.src,
            workload.args.join(" "),
            stop
        );
        let mut seen = std::collections::HashSet::new();
        for a in &files {
            if seen.insert(a.path.as_str()) {
                text.push_str(&a.path);
                text.push('\n');
            }
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.record_json {
        let record = json!({
            "image": args.src,
            "platform": platform.to_string(),
            "command": workload.args,
            "stopped": match &stop {
                Stop::Exited(_) => "exited", Stop::Timeout => "timeout",
                Stop::Matched(_) => "matched", Stop::Interrupted => "interrupted",
            },
            "exitCode": match stop { Stop::Exited(c) => Some(c), _ => None },
            "seconds": ran.as_secs_f64(),
            "layers": src_manifest.layers.iter().zip(&per_layer).enumerate().map(|(i, (l, (n, b)))| json!({
                "index": i, "digest": l.digest.to_string(), "files": n, "bytes": b,
            })).collect::<Vec<_>>(),
            "accesses": accesses.iter().map(|a| json!({
                "layer": a.layer, "path": a.path, "symlink": a.symlink, "size": a.size,
                "firstAccessMs": a.first.as_secs_f64() * 1000.0, "firstOp": a.first_op.as_str(),
                "opened": a.opened,
                "ranges": a.ranges.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    say(format!(
        "the workload {stop} after {:.1}s; recorded {} files ({} bytes):",
        ran.as_secs_f64(),
        files.len(),
        files.iter().map(|a| a.size).sum::<u64>()
    ));
    for (i, (l, (n, b))) in src_manifest.layers.iter().zip(&per_layer).enumerate() {
        say(format!("  layer {i} {}: {n} files, {b} bytes", l.digest));
    }
    let (dst_layout, dst_tag) = ends.destination();
    let report = convert_image(
        &src_layout,
        src_tag.as_deref(),
        &dst_layout,
        dst_tag.as_deref(),
        &ImageConvertOptions {
            layer: args.flags.options()?,
            platforms: vec![platform],
            prioritized_by_layer: by_layer,
            startup_ranges_by_layer: ranges_by_layer,
        },
        &ends.bars,
    )
    .with_context(|| format!("converting {} to {}", args.src, args.dst))?;
    ends.publish()?;
    ends.bars.clear();
    // The staging layout keeps only what a --work-dir user may want again.
    drop(work);
    print_report(&report, &args.src, &args.dst, started, args.flags.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
