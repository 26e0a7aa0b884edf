//! How the snapshotter gets lazy layers mounted: the [`Mounter`] seam, and its production
//! implementation, [`ManagerClient`], which asks the FUSE manager over its socket.
//!
//! The snapshotter only needs three things from whoever serves FUSE mounts: mount a layer,
//! unmount it, and say whether a mountpoint is being served. Keeping that behind a trait
//! lets `snapshotter.rs` be tested in-process, without root, with a fake.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{ErrorKind, Hello, ManagerError, Request, Response, Status, MAX_LINE};
use crate::store::RemoteLayer;
use crate::Error;

/// What a layer mount needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    /// Where (`ROOT/snapshots/ID/fs`).
    pub mountpoint: PathBuf,
    /// The layer's verified TOC JSON on disk (`ROOT/snapshots/ID/toc.json`).
    pub toc_path: PathBuf,
    /// The layer.
    pub layer: RemoteLayer,
    /// Mountpoints of the lazy layers below it in the image, nearest first (up to the
    /// first parent that is not a lazy layer): where its executables find their libraries.
    pub lowers: Vec<PathBuf>,
}

/// Mounts and unmounts lazy layers for the snapshotter.
pub trait Mounter: Send + Sync {
    /// Mounts a layer; `Ok` once the mountpoint serves it (already mounted is `Ok`).
    fn mount(&self, req: &MountRequest) -> Result<(), Error>;
    /// Unmounts `mountpoint` (nothing mounted is `Ok`).
    fn unmount(&self, mountpoint: &Path) -> Result<(), Error>;
    /// Every mountpoint served now.
    fn mounted(&self) -> Result<BTreeSet<PathBuf>, Error>;
    /// Whether `mountpoint` is a live mount now: what containerd is handed as a lower
    /// directory must be, or a container starts with files missing.
    fn is_serving(&self, mountpoint: &Path) -> bool;
}

/// Whether `path` is a FUSE mount that lost its server. Asked with `statfs`, which always
/// goes to the server: a `stat` of the mount's root can be answered from the kernel's
/// attribute cache long after the server died.
pub fn is_dead_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path and a zeroed statfs the call fills in.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0 {
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(Ok(p))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    m.dev() != p.dev()
}

pub use estargz_layerfs::detach;

/// How long a mount may take (reading and indexing a TOC of a million entries, and the
/// FUSE mount itself) before the daemon gives up on it. Only that layer waits.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a quick request (hello, status, unmount) may take.
const QUICK_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and waits up to `timeout` for the answer.
    fn exchange(&self, req: &Request, timeout: Duration) -> Result<Response, Error> {
        let unreachable = |source: std::io::Error| Error::ManagerUnreachable {
            socket: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        let broken = |e: std::io::Error| {
            Error::Manager(ManagerError::new(
                ErrorKind::Io,
                format!(
                    "talking to the FUSE manager at {}: {e}",
                    self.socket.display()
                ),
            ))
        };
        stream.set_read_timeout(Some(timeout)).map_err(broken)?;
        stream.set_write_timeout(Some(timeout)).map_err(broken)?;
        let mut line = serde_json::to_vec(req)
            .map_err(|e| Error::Manager(ManagerError::new(ErrorKind::Internal, e.to_string())))?;
        line.push(b'\n');
        stream.write_all(&line).map_err(broken)?;
        let mut answer = Vec::new();
        BufReader::new(stream)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut answer)
            .map_err(broken)?;
        serde_json::from_slice(&answer).map_err(|e| {
            Error::Manager(ManagerError::new(
                ErrorKind::BadRequest,
                format!(
                    "unreadable answer from the FUSE manager ({} bytes): {e}",
                    answer.len()
                ),
            ))
        })
    }

    /// Sends one request; the manager's error, if any, as [`Error::Manager`].
    pub fn call(&self, req: &Request, timeout: Duration) -> Result<Response, Error> {
        let mut resp = self.exchange(req, timeout)?;
        match resp.error.take() {
            Some(e) => Err(Error::Manager(e.into_typed())),
            None => Ok(resp),
        }
    }

    /// Who answers, and in which protocol version (a manager of protocol 0 does not know
    /// `hello`; it is recognised by the bad-request answer it gives).
    pub fn hello(&self) -> Result<Hello, Error> {
        let resp = self.exchange(
            &Request::Hello {
                protocol: crate::protocol::PROTOCOL,
            },
            QUICK_TIMEOUT,
        )?;
        match (resp.hello, resp.error) {
            (Some(h), None) => Ok(h),
            (_, Some(crate::protocol::WireError::Text(_))) => Ok(Hello {
                protocol: 0,
                version: "unknown (protocol 0)".into(),
                pid: 0,
            }),
            (_, Some(e)) => Err(Error::Manager(e.into_typed())),
            (None, None) => Err(Error::Manager(ManagerError::new(
                ErrorKind::BadRequest,
                "the FUSE manager answered hello without saying who it is",
            ))),
        }
    }

    /// Whether a manager answers.
    pub fn is_running(&self) -> bool {
        self.hello().is_ok()
    }

    /// Mounts and counters.
    pub fn status(&self) -> Result<Status, Error> {
        Ok(self
            .call(&Request::Status, QUICK_TIMEOUT)?
            .status
            .unwrap_or_default())
    }

    /// Asks the manager to unmount everything and exit.
    pub fn shutdown(&self) -> Result<(), Error> {
        self.call(&Request::Shutdown, MOUNT_TIMEOUT).map(|_| ())
    }

    /// Starts a manager (`exe fuse-manager --config CONFIG`) detached from this process
    /// unless one already answers, and waits until it does.
    pub fn ensure_running(&self, exe: &Path, config: Option<&Path>) -> Result<Hello, Error> {
        if let Ok(h) = self.hello() {
            return Ok(h);
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
            if let Ok(h) = self.hello() {
                // The manager outlives us; nobody waits for it here.
                std::thread::spawn(move || child.wait());
                return Ok(h);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Manager(ManagerError::new(
                    ErrorKind::Internal,
                    format!("the FUSE manager exited at start ({status}); see its log above"),
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Manager(ManagerError::new(
            ErrorKind::Internal,
            "the FUSE manager did not answer within 10 s",
        )))
    }
}

impl Mounter for ManagerClient {
    fn mount(&self, req: &MountRequest) -> Result<(), Error> {
        let request = Request::Mount {
            mountpoint: req.mountpoint.clone(),
            toc_path: req.toc_path.clone(),
            layer: req.layer.clone(),
            lowers: req.lowers.clone(),
        };
        let started = std::time::Instant::now();
        loop {
            match self.call(&request, MOUNT_TIMEOUT) {
                // Another request (the supervisor's restore, a Mounts call) is mounting the
                // same layer: asked again once it is done, the manager answers that it is
                // mounted, or mounts it (and says why not) if that request failed.
                Err(Error::Manager(e))
                    if e.kind == ErrorKind::Busy && started.elapsed() < MOUNT_TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => return other.map(|_| ()),
            }
        }
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), Error> {
        self.call(
            &Request::Unmount {
                mountpoint: mountpoint.to_path_buf(),
            },
            MOUNT_TIMEOUT,
        )
        .map(|_| ())
    }

    fn mounted(&self) -> Result<BTreeSet<PathBuf>, Error> {
        Ok(self.status()?.mounts.into_keys().collect())
    }

    fn is_serving(&self, mountpoint: &Path) -> bool {
        is_mountpoint(mountpoint) && !is_dead_mount(mountpoint)
    }
}
