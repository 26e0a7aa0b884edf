//! The FUSE manager: the process that serves every lazily mounted layer.
//!
//! FUSE mounts live only as long as the process reading `/dev/fuse`. If the snapshotter
//! served them itself, a crash, an upgrade or a `systemctl restart` would leave every
//! running container with dead lower layers (reads fail with ENOTCONN); this is the
//! reference implementation's most reported weakness. So the daemon starts this manager as
//! a separate, detached process (its own session, outside the daemon's process group; the
//! systemd unit uses `KillMode=process`), tells it what to mount over a unix socket, and
//! after a restart finds it still serving. The manager's job is small on purpose: mount,
//! unmount, report.
//!
//! Protocol: [`crate::protocol`]. One manager per root: it holds `ROOT/fuse-manager.lock`
//! (an exclusive `flock`) for its whole life, and refuses to start while another holds it
//! or answers on the socket, so a second manager can never orphan the first's mounts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{Limits, Sha256Digest, Toc};
use estargz_layerfs::{mount, FetchScheduler, LayerFs, MountedLayer, RegistrySource};

use crate::config::Config;
use crate::mounter::{detach, is_dead_mount};
use crate::protocol::{
    parse_request, CacheStatus, ErrorKind, Hello, LayerStatus, ManagerError, Request, Response,
    Status, MAX_REQUEST, PROTOCOL,
};
use crate::store::RemoteLayer;
use crate::Error;

struct Mounted {
    digest: String,
    layer: MountedLayer,
}

/// The manager's state.
pub struct Manager {
    cache: Arc<ChunkCache>,
    /// Prefetch and background fetch of every layer, paced around on-demand reads.
    scheduler: Arc<FetchScheduler>,
    client: Arc<estargz_registry::RegistryClient>,
    runtime: tokio::runtime::Handle,
    /// Layers served. Held only to look up, insert or take out: never across a TOC parse
    /// or a mount, so that status and other layers' requests are never kept waiting.
    mounts: Mutex<BTreeMap<PathBuf, Mounted>>,
    /// Mountpoints a request is mounting right now.
    mounting: Mutex<BTreeSet<PathBuf>>,
    /// How long one fetch may take before the read waiting for it fails.
    read_deadline: Duration,
    /// `ROOT/snapshots`: the only place the manager mounts at or reads TOCs from.
    snapshots: PathBuf,
}

type Answer<T> = Result<T, ManagerError>;

fn fail(kind: ErrorKind) -> impl Fn(String) -> ManagerError {
    move |message| ManagerError::new(kind, message)
}

/// Takes `mountpoint` out of `mounting` when the mount attempt ends, however it ends.
struct Claim<'a> {
    mounting: &'a Mutex<BTreeSet<PathBuf>>,
    mountpoint: PathBuf,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.mounting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.mountpoint);
    }
}

/// The single-instance lock of a root: held (by the open file) while the manager lives.
pub struct InstanceLock {
    _file: std::fs::File,
}

impl InstanceLock {
    /// Takes `ROOT/fuse-manager.lock`, or says which process holds it.
    pub fn acquire(root: &Path) -> Result<InstanceLock, Error> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = root.join("fuse-manager.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::FailedPrecondition(format!(
                "another FUSE manager (pid {}) serves {}; only one may",
                holder.trim(),
                root.display()
            )));
        }
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(pid.as_bytes()));
        written.map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(InstanceLock { _file: file })
    }
}

impl Manager {
    /// A manager with `config`'s cache, registry and fetch settings.
    pub fn new(config: Config, runtime: tokio::runtime::Handle) -> Result<Manager, Error> {
        let cache = Arc::new(ChunkCache::open(&CacheConfig {
            root: config.root.join("cache"),
            max_bytes: config.cache.max_bytes,
            memory_bytes: config.cache.memory_bytes,
        }));
        let client = config.registry_client()?;
        Ok(Manager {
            scheduler: FetchScheduler::new(config.fetch_options()),
            cache,
            client,
            runtime,
            mounts: Mutex::new(BTreeMap::new()),
            mounting: Mutex::new(BTreeSet::new()),
            snapshots: config.root.join("snapshots"),
            read_deadline: Duration::from_secs(config.fetch.read_timeout_secs.max(1)),
        })
    }

    /// Refuses paths outside the snapshots directory: whoever reaches the socket must not
    /// be able to mount over, or have the manager read, anything else on the node.
    fn check_path(&self, path: &Path) -> Answer<()> {
        use std::path::Component;
        let inside = path.starts_with(&self.snapshots)
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if inside {
            Ok(())
        } else {
            Err(ManagerError::new(
                ErrorKind::Forbidden,
                format!(
                    "{} is not inside {}",
                    path.display(),
                    self.snapshots.display()
                ),
            ))
        }
    }

    fn mount(
        &self,
        mountpoint: &Path,
        toc_path: &Path,
        layer: &RemoteLayer,
        lowers: &[PathBuf],
    ) -> Answer<()> {
        self.check_path(mountpoint)?;
        self.check_path(toc_path)?;
        if self.lock_mounts().contains_key(mountpoint) {
            return Ok(());
        }
        if !self
            .mounting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mountpoint.to_path_buf())
        {
            return Err(ManagerError::new(
                ErrorKind::Busy,
                format!(
                    "{} is being mounted by another request",
                    mountpoint.display()
                ),
            ));
        }
        let _claim = Claim {
            mounting: &self.mounting,
            mountpoint: mountpoint.to_path_buf(),
        };
        // Checked again now that this request owns the mountpoint: a request that finished
        // between the two checks has mounted it.
        if self.lock_mounts().contains_key(mountpoint) {
            return Ok(());
        }
        if is_dead_mount(mountpoint) {
            tracing::warn!(mountpoint = %mountpoint.display(), "replacing a dead FUSE mount");
            detach(mountpoint)
                .map_err(|e| format!("detaching a dead mount at {}: {e}", mountpoint.display()))
                .map_err(fail(ErrorKind::Mount))?;
        }
        let json = std::fs::read(toc_path)
            .map_err(|e| format!("reading {}: {e}", toc_path.display()))
            .map_err(fail(ErrorKind::Io))?;
        let actual = Sha256Digest::of(&json);
        if actual != layer.toc_digest {
            return Err(ManagerError::new(
                ErrorKind::TocMismatch,
                format!(
                    "saved TOC {} has digest {actual}, expected {}",
                    toc_path.display(),
                    layer.toc_digest
                ),
            ));
        }
        // The one place a layer's TOC is parsed: the daemon fetched it and checked its
        // digest, and hands it over through the file it saved.
        let toc = Toc::parse(&json, layer.toc_offset, &Limits::default())
            .map_err(|e| format!("TOC of layer {}: {e}", layer.digest))
            .map_err(fail(ErrorKind::InvalidToc))?;
        drop(json);
        let (image, digest) = (layer.reference.clone(), layer.digest.clone());
        let source = RegistrySource::new(self.client.clone(), image, digest, self.runtime.clone())
            .with_deadline(self.read_deadline);
        let fs = LayerFs::new(
            &toc,
            Arc::new(source),
            self.cache.clone(),
            self.scheduler.clone(),
        );
        drop(toc);
        // The layers below, as far as this manager serves them without a gap.
        let below: Vec<LayerFs> = {
            let mounts = self.lock_mounts();
            lowers
                .iter()
                .map_while(|l| mounts.get(l).map(|m| m.layer.fs().clone()))
                .collect()
        };
        fs.set_lowers(&below);
        // The parsed TOC was several times the size of the index that replaces it.
        estargz_layerfs::memory::release_freed_memory();
        let mounted = mount(fs, mountpoint)
            .map_err(|e| format!("FUSE mount at {}: {e}", mountpoint.display()))
            .map_err(fail(ErrorKind::Mount))?;
        tracing::info!(mountpoint = %mountpoint.display(), layer = %layer.digest, "layer mounted");
        // Once its content is all local, the layer is served without FUSE (passthrough's
        // sibling; estargz-layerfs's `local`), built beside the mountpoint (snapshots/ID/
        // local, removed with the snapshot).
        if self.scheduler.options().passthrough {
            if let Some(snapshot) = mountpoint.parent() {
                mounted.serve_locally(&snapshot.join("local"));
            }
        }
        self.lock_mounts().insert(
            mountpoint.to_path_buf(),
            Mounted {
                digest: layer.digest.to_string(),
                layer: mounted,
            },
        );
        Ok(())
    }

    fn lock_mounts(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Mounted>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unmount(&self, mountpoint: &Path) -> Answer<()> {
        self.check_path(mountpoint)?;
        let taken = self.lock_mounts().remove(mountpoint);
        let result = match taken {
            Some(m) => m.layer.unmount(),
            // Not ours (a mount left by an earlier manager): detach it if it is there.
            None if is_dead_mount(mountpoint) => detach(mountpoint),
            None => Ok(()),
        };
        result
            .map_err(|e| format!("unmounting {}: {e}", mountpoint.display()))
            .map_err(fail(ErrorKind::Mount))
    }

    /// Mounts and counters now. Cheap whatever the layers' sizes (it only reads counters):
    /// the daemon asks for it on every metrics scrape.
    pub fn status(&self) -> Status {
        use std::sync::atomic::Ordering::Relaxed;
        let mounts = self
            .lock_mounts()
            .iter()
            .map(|(path, m)| {
                // Every counter, by name: a field added to `LayerStats` does not compile
                // here until it is carried into the status (and so into the metrics).
                let estargz_layerfs::LayerStats {
                    fetched_bytes,
                    fetch_requests,
                    fetches,
                    fetched_chunks,
                    read_errors,
                    read_bytes,
                    fetch_nanos,
                    passthrough_opens,
                    streamed_chunks,
                    dependency_files,
                } = m.layer.stats();
                let p = m.layer.fs().progress();
                let st = LayerStatus {
                    digest: m.digest.clone(),
                    fetched_bytes: fetched_bytes.load(Relaxed),
                    fetch_requests: fetch_requests.load(Relaxed),
                    fetches: fetches.load(Relaxed),
                    fetched_chunks: fetched_chunks.load(Relaxed),
                    fetch_nanos: fetch_nanos.load(Relaxed),
                    read_errors: read_errors.load(Relaxed),
                    read_bytes: read_bytes.load(Relaxed),
                    passthrough_opens: passthrough_opens.load(Relaxed),
                    streamed_chunks: streamed_chunks.load(Relaxed),
                    dependency_files: dependency_files.load(Relaxed),
                    cached_chunks: p.cached_chunks,
                    total_chunks: p.total_chunks,
                    prefetch_done: p.prefetch_done,
                    background_done: p.background_done,
                    served_without_fuse: m.layer.local_form().is_some(),
                };
                (path.clone(), st)
            })
            .collect();
        let c = self.cache.stats();
        let node = self.scheduler.node_stats();
        let histogram = |bounds: Vec<Duration>, counts: Vec<u64>, sum: Duration| {
            crate::protocol::HistogramStatus {
                bounds: bounds.iter().map(Duration::as_secs_f64).collect(),
                counts,
                sum_nanos: u64::try_from(sum.as_nanos()).unwrap_or(u64::MAX),
            }
        };
        let (fetch, read) = (&node.fetch_latency, &node.read_latency);
        Status {
            pid: std::process::id(),
            mounts,
            cache: CacheStatus {
                hits: c.hits,
                misses: c.misses,
                usage_bytes: c.usage_bytes,
                entries: c.entries,
                evictions: c.evictions,
                write_errors: c.write_errors,
                memory_bytes: c.memory_bytes,
                memory_hits: c.memory_hits,
                corrupt: c.corrupt,
                max_bytes: c.max_bytes,
            },
            fetch_seconds: Some(histogram(
                fetch.bounds().collect(),
                fetch.counts(),
                fetch.sum(),
            )),
            read_seconds: Some(histogram(
                read.bounds().collect(),
                read.counts(),
                read.sum(),
            )),
        }
    }

    fn shutdown(&self) {
        let all = std::mem::take(&mut *self.lock_mounts());
        for (path, m) in all {
            if let Err(e) = m.layer.unmount() {
                tracing::warn!(mountpoint = %path.display(), error = %e, "unmount failed; detaching");
                let _ = detach(&path);
            }
        }
    }

    /// Answers one request; `true` when the manager must stop.
    fn handle(&self, req: Request) -> (Response, bool) {
        let answer = match req {
            Request::Hello { protocol } => {
                tracing::debug!(peer_protocol = protocol, "hello");
                Ok(Response {
                    hello: Some(Hello {
                        protocol: PROTOCOL,
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        pid: std::process::id(),
                    }),
                    ..Response::default()
                })
            }
            Request::Mount {
                mountpoint,
                toc_path,
                layer,
                lowers,
            } => self
                .mount(&mountpoint, &toc_path, &layer, &lowers)
                .map(|_| Response::default()),
            Request::Unmount { mountpoint } => {
                self.unmount(&mountpoint).map(|_| Response::default())
            }
            Request::Status => Ok(Response {
                status: Some(self.status()),
                ..Response::default()
            }),
            Request::Shutdown => {
                self.shutdown();
                return (Response::default(), true);
            }
        };
        (answer.unwrap_or_else(Response::error), false)
    }

    /// Serves requests on `socket` until a `Shutdown` request or SIGTERM/SIGINT (both
    /// unmount everything first). Takes the root's single-instance lock first.
    pub async fn serve(self: Arc<Self>, root: &Path, socket: &Path) -> Result<(), Error> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let _lock = InstanceLock::acquire(root)?;
        // A manager of protocol 0 takes no lock: never take the socket from one that answers.
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(Error::FailedPrecondition(format!(
                "a FUSE manager already answers at {}; only one may serve {}",
                socket.display(),
                root.display()
            )));
        }
        let listener = crate::access::listen_private(socket)
            .map_err(|e| Error::io("serving the FUSE manager", e))?;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::io("installing a SIGTERM handler", e))?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = stop_rx.changed() => break,
                conn = listener.accept() => {
                    let stream = match conn {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of descriptors, most likely: wait instead of spinning.
                            tracing::warn!(error = %e, "accepting a connection to the FUSE manager");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if let Err(why) = crate::access::check_peer(&stream) {
                        tracing::warn!(%why, "refused a connection to the FUSE manager");
                        continue;
                    }
                    let (this, stop_tx) = (self.clone(), stop_tx.clone());
                    tokio::spawn(async move {
                        let (r, mut w) = stream.into_split();
                        let mut r = tokio::io::BufReader::new(r);
                        let mut line = Vec::new();
                        loop {
                            line.clear();
                            match (&mut r).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                            let too_long = line.len() > MAX_REQUEST;
                            let (resp, stop) = match parse_request(&line) {
                                _ if too_long => (Response::error(ManagerError::new(ErrorKind::BadRequest, format!("request longer than {MAX_REQUEST} bytes"))), false),
                                Ok(req) => {
                                    let this = this.clone();
                                    tokio::task::spawn_blocking(move || this.handle(req))
                                        .await
                                        .unwrap_or_else(|e| (Response::error(ManagerError::new(ErrorKind::Internal, e.to_string())), false))
                                }
                                Err(e) => (Response::error(e), false),
                            };
                            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                            out.push(b'\n');
                            if w.write_all(&out).await.is_err() || too_long {
                                break;
                            }
                            if stop {
                                let _ = stop_tx.send(true);
                                break;
                            }
                        }
                    });
                }
            }
        }
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.shutdown()).await;
        let _ = std::fs::remove_file(socket);
        Ok(())
    }
}
