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
//! Protocol: one JSON request per line, one JSON response per line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{Limits, Sha256Digest, Toc};
use estargz_layerfs::{mount, FetchScheduler, LayerFs, MountedLayer, RegistrySource};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::store::RemoteLayer;
use crate::Error;

/// A request to the manager.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Mount `layer` at `mountpoint`, with its TOC JSON read from `toc_path`.
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// The layer's TOC JSON, as saved when the layer was resolved.
        toc_path: PathBuf,
        /// The layer.
        layer: RemoteLayer,
    },
    /// Unmount `mountpoint`.
    Unmount {
        /// Where.
        mountpoint: PathBuf,
    },
    /// Report mounts and counters.
    Status,
    /// Unmount everything and exit.
    Shutdown,
}

/// The manager's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// What failed, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `Status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// Mounts and counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// The manager's pid.
    pub pid: u32,
    /// Mounted layers by mountpoint.
    pub mounts: BTreeMap<PathBuf, LayerStatus>,
    /// Chunk cache counters.
    pub cache: CacheStatus,
}

/// One mounted layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LayerStatus {
    /// Layer digest.
    pub digest: String,
    /// Compressed bytes fetched from the registry.
    pub fetched_bytes: u64,
    /// Range requests sent.
    pub fetch_requests: u64,
    /// Chunks fetched and verified.
    pub fetched_chunks: u64,
    /// Time spent in on-demand fetches, nanoseconds.
    pub fetch_nanos: u64,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// File bytes read through the mount (absent from older managers).
    #[serde(default)]
    pub read_bytes: u64,
    /// Distinct chunks local now.
    pub cached_chunks: u64,
    /// Distinct chunks of the layer.
    pub total_chunks: u64,
    /// Prefetch finished.
    pub prefetch_done: bool,
    /// Background fetch finished.
    pub background_done: bool,
}

/// Chunk cache counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that were not.
    pub misses: u64,
    /// Bytes of chunk content stored.
    pub usage_bytes: u64,
    /// Chunks stored.
    pub entries: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Chunks that could not be written.
    pub write_errors: u64,
    /// Bytes of decompressed chunks in the memory tier (absent from older managers).
    #[serde(default)]
    pub memory_bytes: u64,
}

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
    mounts: Mutex<BTreeMap<PathBuf, Mounted>>,
    /// How long one fetch may take before the read waiting for it fails.
    read_deadline: Duration,
    /// `ROOT/snapshots`: the only place the manager mounts at or reads TOCs from.
    snapshots: PathBuf,
}

/// Longest request line accepted; a mount request is well under 4 KiB.
const MAX_REQUEST: usize = 64 << 10;

/// Whether `path` is a FUSE mount that lost its server (stat fails with ENOTCONN).
pub fn is_dead_mount(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Detaches whatever is mounted at `path` (lazily: busy mounts go once unused).
pub fn detach(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path; umount2 does not keep the pointer.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
            snapshots: config.root.join("snapshots"),
            read_deadline: Duration::from_secs(config.fetch.read_timeout_secs.max(1)),
        })
    }

    /// Refuses paths outside the snapshots directory: whoever reaches the socket must not
    /// be able to mount over, or have the manager read, anything else on the node.
    fn check_path(&self, path: &Path) -> Result<(), Error> {
        use std::path::Component;
        let inside = path.starts_with(&self.snapshots)
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if inside {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{} is not inside {}",
                path.display(),
                self.snapshots.display()
            )))
        }
    }

    fn mount(&self, mountpoint: &Path, toc_path: &Path, layer: &RemoteLayer) -> Result<(), Error> {
        self.check_path(mountpoint)?;
        self.check_path(toc_path)?;
        let mut mounts = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        if mounts.contains_key(mountpoint) {
            return Ok(());
        }
        if is_dead_mount(mountpoint) {
            tracing::warn!(mountpoint = %mountpoint.display(), "replacing a dead FUSE mount");
            detach(mountpoint).map_err(|e| Error::io("detaching a dead mount", e))?;
        }
        let json = std::fs::read(toc_path)
            .map_err(|e| Error::io(format!("reading {}", toc_path.display()), e))?;
        let actual = Sha256Digest::of(&json).to_string();
        if actual != layer.toc_digest {
            return Err(Error::FailedPrecondition(format!(
                "saved TOC {} has digest {actual}, expected {}",
                toc_path.display(),
                layer.toc_digest
            )));
        }
        let toc = Toc::parse(&json, layer.toc_offset, &Limits::default())
            .map_err(|e| Error::FailedPrecondition(format!("saved TOC: {e}")))?;
        drop(json);
        let image: estargz_registry::ImageRef =
            layer
                .reference
                .parse()
                .map_err(|e: estargz_registry::Error| {
                    Error::InvalidArgument(format!("reference: {e}"))
                })?;
        let digest: estargz_oci::Digest = layer
            .digest
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("layer digest: {e}")))?;
        let source = RegistrySource::new(self.client.clone(), image, digest, self.runtime.clone())
            .with_deadline(self.read_deadline);
        let fs = LayerFs::new(
            &toc,
            Arc::new(source),
            self.cache.clone(),
            self.scheduler.clone(),
        );
        drop(toc);
        // The parsed TOC was several times the size of the index that replaces it.
        estargz_layerfs::memory::release_freed_memory();
        let mounted = mount(fs, mountpoint)
            .map_err(|e| Error::io(format!("FUSE mount at {}", mountpoint.display()), e))?;
        tracing::info!(mountpoint = %mountpoint.display(), layer = %layer.digest, "layer mounted");
        mounts.insert(
            mountpoint.to_path_buf(),
            Mounted {
                digest: layer.digest.clone(),
                layer: mounted,
            },
        );
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), Error> {
        self.check_path(mountpoint)?;
        let taken = self
            .mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mountpoint);
        match taken {
            Some(m) => m
                .layer
                .unmount()
                .map_err(|e| Error::io(format!("unmounting {}", mountpoint.display()), e)),
            // Not ours (a mount left by an earlier manager): detach it if it is there.
            None if is_dead_mount(mountpoint) => {
                detach(mountpoint).map_err(|e| Error::io("detaching a dead mount", e))
            }
            None => Ok(()),
        }
    }

    /// Mounts and counters now.
    pub fn status(&self) -> Status {
        let mounts = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        let c = self.cache.stats();
        use std::sync::atomic::Ordering::Relaxed;
        Status {
            pid: std::process::id(),
            mounts: mounts
                .iter()
                .map(|(path, m)| {
                    let s = m.layer.stats();
                    let p = m.layer.fs().progress();
                    let st = LayerStatus {
                        digest: m.digest.clone(),
                        fetched_bytes: s.fetched_bytes.load(Relaxed),
                        fetch_requests: s.fetch_requests.load(Relaxed),
                        fetched_chunks: s.fetched_chunks.load(Relaxed),
                        fetch_nanos: s.fetch_nanos.load(Relaxed),
                        read_errors: s.read_errors.load(Relaxed),
                        read_bytes: s.read_bytes.load(Relaxed),
                        cached_chunks: p.cached_chunks,
                        total_chunks: p.total_chunks,
                        prefetch_done: p.prefetch_done,
                        background_done: p.background_done,
                    };
                    (path.clone(), st)
                })
                .collect(),
            cache: CacheStatus {
                hits: c.hits,
                misses: c.misses,
                usage_bytes: c.usage_bytes,
                entries: c.entries,
                evictions: c.evictions,
                write_errors: c.write_errors,
                memory_bytes: c.memory_bytes,
            },
        }
    }

    fn shutdown(&self) {
        let all = std::mem::take(&mut *self.mounts.lock().unwrap_or_else(|p| p.into_inner()));
        for (path, m) in all {
            if let Err(e) = m.layer.unmount() {
                tracing::warn!(mountpoint = %path.display(), error = %e, "unmount failed; detaching");
                let _ = detach(&path);
            }
        }
    }

    fn handle(&self, req: Request) -> (Response, bool) {
        let result = match req {
            Request::Mount {
                mountpoint,
                toc_path,
                layer,
            } => self.mount(&mountpoint, &toc_path, &layer).map(|_| None),
            Request::Unmount { mountpoint } => self.unmount(&mountpoint).map(|_| None),
            Request::Status => Ok(Some(self.status())),
            Request::Shutdown => {
                self.shutdown();
                return (Response::default(), true);
            }
        };
        match result {
            Ok(status) => (
                Response {
                    error: None,
                    status,
                },
                false,
            ),
            Err(e) => (
                Response {
                    error: Some(e.to_string()),
                    status: None,
                },
                false,
            ),
        }
    }

    /// Serves requests on `socket` until a `Shutdown` request or SIGTERM/SIGINT (both
    /// unmount everything first).
    pub async fn serve(self: Arc<Self>, socket: &Path) -> Result<(), Error> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .map_err(|e| Error::io(format!("listening on {}", socket.display()), e))?;
        crate::access::restrict_socket(socket)
            .map_err(|e| Error::io(format!("making {} private", socket.display()), e))?;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::io("installing a SIGTERM handler", e))?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = stop_rx.changed() => break,
                conn = listener.accept() => {
                    let Ok((stream, _)) = conn else { continue };
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
                            if line.len() > MAX_REQUEST {
                                let resp = Response { error: Some(format!("request longer than {MAX_REQUEST} bytes")), status: None };
                                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                                out.push(b'\n');
                                let _ = w.write_all(&out).await;
                                break;
                            }
                            let (resp, stop) = match serde_json::from_slice::<Request>(&line) {
                                Ok(req) => {
                                    let this = this.clone();
                                    tokio::task::spawn_blocking(move || this.handle(req))
                                        .await
                                        .unwrap_or_else(|e| (Response { error: Some(e.to_string()), status: None }, false))
                                }
                                Err(e) => (Response { error: Some(format!("bad request: {e}")), status: None }, false),
                            };
                            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                            out.push(b'\n');
                            if w.write_all(&out).await.is_err() {
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

/// Talks to the manager.
#[derive(Debug, Clone)]
pub struct ManagerClient {
    socket: PathBuf,
}

impl ManagerClient {
    /// A client for the manager listening on `socket`.
    pub fn new(socket: PathBuf) -> ManagerClient {
        ManagerClient { socket }
    }

    /// Sends one request and waits for the answer.
    pub fn call(&self, req: &Request) -> Result<Response, Error> {
        let fail = |e: std::io::Error| {
            Error::Manager(format!(
                "talking to the FUSE manager at {}: {e}",
                self.socket.display()
            ))
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(fail)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(fail)?;
        let mut line = serde_json::to_vec(req).map_err(|e| Error::Manager(e.to_string()))?;
        line.push(b'\n');
        stream.write_all(&line).map_err(fail)?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .map_err(fail)?;
        let resp: Response = serde_json::from_str(&answer)
            .map_err(|e| Error::Manager(format!("unreadable answer {answer:?}: {e}")))?;
        match resp.error {
            Some(e) => Err(Error::Manager(e)),
            None => Ok(resp),
        }
    }

    /// Whether a manager answers.
    pub fn is_running(&self) -> bool {
        self.call(&Request::Status).is_ok()
    }

    /// Mounts and counters.
    pub fn status(&self) -> Result<Status, Error> {
        Ok(self.call(&Request::Status)?.status.unwrap_or_default())
    }

    /// Starts a manager (`exe fuse-manager --config CONFIG`) detached from this process
    /// unless one already answers, and waits until it does.
    pub fn ensure_running(&self, exe: &Path, config: Option<&Path>) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("fuse-manager");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.stdin(std::process::Stdio::null());
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; it makes the manager its own session so that
        // signals to the daemon's process group do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {} fuse-manager", exe.display()), e))?;
        for _ in 0..200 {
            if self.is_running() {
                // The manager outlives us; nobody waits for it here.
                std::thread::spawn(move || child.wait());
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Manager(format!(
                    "the FUSE manager exited at start ({status}); see its log above"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Manager(
            "the FUSE manager did not answer within 10 s".into(),
        ))
    }
}
