//! `estargz mount`: an image or layer, lazily, until interrupted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{Limits, Sha256Digest};
use estargz_layerfs::{
    load_toc, mount as mount_layer, BlobSource, FetchOptions, FetchScheduler, FileSource, LayerFs,
    MountedLayer, RegistrySource,
};
use estargz_oci::Platform;
use estargz_registry::ImageRef;

use crate::registry::RegistryFlags;

/// Arguments of `estargz mount`.
#[derive(Args)]
pub struct MountArgs {
    /// An image in a registry (e.g. 127.0.0.1:5000/app:esgz), or a local eStargz blob file.
    pub image: String,
    /// Where to mount (created if missing).
    pub dir: PathBuf,
    /// Chunk cache directory (shared with other mounts and the snapshotter).
    #[arg(long, default_value = "/var/lib/estargz-snapshotter/cache")]
    pub cache_dir: PathBuf,
    /// Chunk cache size cap (suffixes K, M, G).
    #[arg(long, default_value = "10G", value_parser = crate::layer::parse_size)]
    pub cache_size: u64,
    /// Do not prefetch prioritized files at mount.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Do not fetch the rest of each layer in the background.
    #[arg(long)]
    pub no_background_fetch: bool,
    /// Read every file through FUSE, even when its content is local (no FUSE passthrough).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Platform of a multi-platform image (default: this machine's).
    #[arg(long)]
    pub platform: Option<String>,
    /// Mount the layer even if the image has no TOC digest annotation to check it against.
    #[arg(long)]
    pub allow_unverified: bool,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

/// Unmounts the overlay on drop, even on errors.
pub(crate) struct OverlayMount(PathBuf);

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if estargz_layerfs::detach(&self.0).is_err() {
            tracing::warn!(dir = %self.0.display(), "unmounting the overlay failed");
        }
    }
}

/// Stacks `lowers` (lowest first) under `upper` at `at`, with `data` (the data
/// directories of lowers served without FUSE) as data-only lower layers after them. `inspect`: for looking at an
/// image from the host, without its setuid binaries or device nodes taking effect; a
/// container's root file system keeps them.
pub(crate) fn mount_overlay(
    lowers: &[PathBuf],
    data: &[PathBuf],
    upper: &Path,
    work: &Path,
    at: &Path,
    inspect: bool,
) -> Result<OverlayMount> {
    let mut lower = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    for d in data.iter().rev() {
        lower = format!("{lower}::{}", d.display());
    }
    // overlayfs follows a metacopy file of a lower layer other than the last to its data
    // only with metacopy=on.
    if !data.is_empty() {
        lower.push_str(",metacopy=on");
    }
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let cstr = |s: &str| std::ffi::CString::new(s).context("path with a NUL byte");
    let (src, target, fstype, data) = (
        cstr("overlay")?,
        cstr(&at.display().to_string())?,
        cstr("overlay")?,
        cstr(&opts)?,
    );
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            match inspect {
                true => libc::MS_NOSUID | libc::MS_NODEV,
                false => 0,
            },
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting overlayfs at {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(OverlayMount(at.to_path_buf()))
}

/// `estargz mount`.
pub fn mount(args: &MountArgs, quiet: bool) -> Result<ExitCode> {
    estargz_layerfs::memory::tune_allocator();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    // ChunkCache::open makes the cache directory private (0700).
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: args.cache_dir.clone(),
        max_bytes: args.cache_size,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }));
    let scheduler = FetchScheduler::new(FetchOptions {
        prefetch: !args.no_prefetch,
        background: !args.no_background_fetch,
        passthrough: !args.no_passthrough,
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let local = Path::new(&args.image);
    let work = tempfile::Builder::new()
        .prefix("estargz-mount-")
        .tempdir()
        .context("creating a work directory")?;

    let mut layers: Vec<MountedLayer> = Vec::new();
    let _overlay;
    if local.is_file() {
        let size = std::fs::metadata(local)?.len();
        let source =
            FileSource::open(local).with_context(|| format!("opening {}", local.display()))?;
        let (toc, digest) = load_toc(&source, size, None, &Limits::default())
            .with_context(|| format!("reading {}", local.display()))?;
        eprintln!("layer {} (TOC {digest})", local.display());
        let fs = LayerFs::new(&toc, Arc::new(source), cache.clone(), scheduler.clone());
        layers.push(
            mount_layer(fs, &args.dir)
                .with_context(|| format!("mounting at {}", args.dir.display()))?,
        );
    } else {
        let image: ImageRef = args.image.parse().with_context(|| {
            format!("{:?} is neither a file nor an image reference", args.image)
        })?;
        let client = Arc::new(args.registry.client()?);
        let platform = match &args.platform {
            Some(p) => crate::image::parse_platform(p)?,
            None => Platform::host(),
        };
        let (_, manifest) = runtime
            .block_on(client.resolve_manifest(&image, &platform))
            .with_context(|| format!("resolving {image}"))?;
        let (mut lowers, mut data) = (Vec::new(), Vec::new());
        for (i, layer) in manifest.layers.iter().enumerate() {
            let annotated = layer
                .annotations
                .as_ref()
                .and_then(|a| a.get(estargz_convert::TOC_DIGEST_ANNOTATION));
            let expected: Option<Sha256Digest> = match annotated {
                Some(d) => Some(d.parse().with_context(|| format!("layer {i}: bad TOC digest annotation"))?),
                None if args.allow_unverified => None,
                None => bail!(
                    "layer {i} ({}) has no {} annotation: it is not eStargz, or cannot be verified; convert the image with `estargz convert`, or pass --allow-unverified",
                    layer.digest,
                    estargz_convert::TOC_DIGEST_ANNOTATION
                ),
            };
            let source = RegistrySource::new(
                client.clone(),
                image.clone(),
                layer.digest.clone(),
                runtime.handle().clone(),
            );
            let (toc, digest) = load_toc(&source, layer.size, expected, &Limits::default())
                .with_context(|| format!("loading the TOC of layer {i} ({})", layer.digest))?;
            let dir = work.path().join(format!("layer-{i}"));
            std::fs::create_dir_all(&dir)?;
            let source: Arc<dyn BlobSource> = Arc::new(source);
            let fs = LayerFs::new(&toc, source, cache.clone(), scheduler.clone());
            // Executables find their libraries in the layers below too, nearest first.
            let below: Vec<LayerFs> = layers.iter().rev().map(|l| l.fs().clone()).collect();
            fs.set_lowers(&below);
            let mounted = mount_layer(fs, &dir).with_context(|| format!("mounting layer {i}"))?;
            // A layer whose content is all cached is served without FUSE (passthrough's
            // sibling: reads and opens of local files at the kernel's speed).
            if !args.no_passthrough {
                let started = std::time::Instant::now();
                match mounted.serve_locally_now(&args.cache_dir.join("local")) {
                    Ok(true) => eprintln!(
                        "layer {i}: all local, served without FUSE (built in {} ms)",
                        started.elapsed().as_millis()
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(layer = i, error = %e, "layer stays on FUSE"),
                }
            }
            let form = mounted.local_form();
            layers.push(mounted);
            eprintln!(
                "layer {i}: {} (TOC {digest}) at {}",
                layer.digest,
                dir.display()
            );
            match form {
                Some(f) => {
                    lowers.push(f.meta);
                    data.push(f.data);
                }
                None => lowers.push(dir),
            }
        }
        let (upper, workdir) = (work.path().join("upper"), work.path().join("work"));
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&workdir)?;
        _overlay = mount_overlay(&lowers, &data, &upper, &workdir, &args.dir, true)?;
    }
    // The parsed TOCs are gone; only the compact indexes stay.
    estargz_layerfs::memory::release_freed_memory();
    eprintln!(
        "mounted {} at {}; Ctrl-C to unmount",
        args.image,
        args.dir.display()
    );
    let mut last = String::new();
    runtime.block_on(async {
        // Ctrl-C or a plain `kill` (SIGTERM) unmounts cleanly.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    if quiet { continue; }
                    let now: Vec<String> = layers.iter().enumerate().map(|(i, l)| format!("layer {i}: {}", l.fs().progress())).collect();
                    let now = now.join("\n");
                    if now != last {
                        eprintln!("{now}");
                        last = now;
                    }
                }
            }
        }
    });
    eprintln!("unmounting");
    Ok(ExitCode::SUCCESS)
}
