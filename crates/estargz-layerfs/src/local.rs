//! A layer whose content is all local, served without FUSE.
//!
//! Through FUSE every file a container opens costs requests to the manager (a lookup, an
//! open, a release, and overlayfs's getxattr), even when its content is local and read
//! through passthrough: a whole-tree read runs at about 0.6x native (BENCHMARKS.md). Once
//! every chunk of a layer is in the cache, the layer is rebuilt as the kernel can serve it
//! alone, in the layout composefs uses:
//!
//! - an EROFS image of the layer's metadata (`mkfs.erofs` from erofs-utils, over a staging
//!   tree written from the layer's inode table): directories, names, modes, owners, times,
//!   extended attributes, links, devices and whiteouts as the FUSE layer shows them; each
//!   non-empty regular file is empty but for its size and overlayfs's
//!   `trusted.overlay.metacopy` and `trusted.overlay.redirect = /xx/<sha256>`;
//! - a data directory holding the files those redirects name: hard links to the cache's
//!   verified chunk files (a file of one chunk) and assembled files (a file of several),
//!   which overlayfs reads as a data-only lower layer (`lowerdir=...:IMAGE::DATA`, Linux 6.5
//!   and later).
//!
//! The image is mounted beside the layer's FUSE mount, which stays: a container created
//! afterwards stacks the image instead (its overlay given the data directory after its
//! lower layers), containers already running keep the FUSE mount, and a container whose
//! mounts were handed out just before keeps getting what they name. (Mounted over the
//! FUSE mount, the image would reach such a container without its data directory: then
//! overlayfs shows the image's empty files, zeros.) Every linked file was verified during this
//! boot (hashed, or carrying this boot's mark, see `estargz-cache`), so nothing unverified
//! is served; a reboot invalidates the marks and the local form is rebuilt, re-hashing. The
//! data directory is the layer's own (not the whole cache), so a redirect can reach only
//! this layer's content: a TOC's own `trusted.overlay.*` attributes never reach the image
//! (see `tree`). Hard links keep the content on disk while the layer is mounted, even if
//! the cache evicts it.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use estargz_format::Sha256Digest;

use crate::fs::Inner;
use crate::tree::NodeKind;

/// `f_type` of an EROFS mount (`EROFS_SUPER_MAGIC_V1`): how a layer served locally is
/// told from a FUSE one ([`is_local_mount`]).
pub const EROFS_SUPER_MAGIC: i64 = 0xE0F5_E1E2;

/// Why a layer could not be served locally; it stays on FUSE.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file's content is not in the cache (or its TOC gives no way to assemble it).
    #[error("the content of {0:?} is not local")]
    NotLocal(String),
    /// Writing the staging tree, the data directory or the image failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `mkfs.erofs` is missing or failed.
    #[error("mkfs.erofs (erofs-utils): {0}")]
    Mkfs(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LocalError {
    let what = what.into();
    move |source| LocalError::Io { what, source }
}

/// A layer rebuilt for serving without FUSE, in `dir`: the metadata image and the data
/// directory its files redirect to.
#[derive(Debug)]
pub struct LocalLayer {
    /// The EROFS image of the layer's metadata.
    pub image: PathBuf,
    /// The data-only lower layer overlayfs must be given after the image.
    pub data: PathBuf,
}

/// A [`LocalLayer`] mounted; detached (lazily: containers using it keep it) and its files
/// removed when dropped.
#[derive(Debug)]
pub struct LocalMount {
    mountpoint: PathBuf,
    layer: LocalLayer,
    dir: PathBuf,
}

impl LocalMount {
    /// Where it is mounted, and its data directory.
    pub fn form(&self) -> LocalForm {
        LocalForm {
            meta: self.mountpoint.clone(),
            data: self.layer.data.clone(),
        }
    }
}

impl Drop for LocalMount {
    fn drop(&mut self) {
        if let Err(e) = crate::fs::detach(&self.mountpoint) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e,
                "detaching a layer served locally failed");
        }
        // Mounted, the image stays open by the kernel and the data files are found by
        // path: a container that still uses the detached mount keeps both until it ends
        // (unlinked files stay readable to their openers, not to new lookups), so the files
        // go only once nothing can be mounted on them any more.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `path` is a layer served locally (an EROFS mount), whose overlay needs the
/// data directory after it.
pub fn is_local_mount(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path and a zeroed statfs the call fills in.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0) && buf.f_type as i64 == EROFS_SUPER_MAGIC
}

/// EROFS mounts whose image lies under `dir`, in the order mounted (the last is the
/// newest): (mountpoint, image), from the kernel's mount table.
pub fn local_mounts_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER".
    table
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let at = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            if r.next()? != "erofs" {
                return None;
            }
            let image = PathBuf::from(unescape(r.next()?));
            image
                .starts_with(&dir)
                .then(|| (PathBuf::from(unescape(at)), image))
        })
        .collect()
}

/// The layer served without FUSE from images built under `dir` (the directory given to
/// `MountedLayer::serve_locally`): its newest mount, and the data directory its overlay
/// needs after it. `None` while it is served through FUSE only.
pub fn local_form_of(dir: &Path) -> Option<LocalForm> {
    let (meta, image) = local_mounts_under(dir).pop()?;
    let data = image.parent()?.join("data");
    (data.is_dir() && is_local_mount(&meta)).then_some(LocalForm { meta, data })
}

/// Where a layer served without FUSE is: stack `meta` as the layer, and `data` as a
/// data-only lower layer after all the others (`lowerdir=...:META:...::DATA`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalForm {
    /// The EROFS mount of the layer's metadata.
    pub meta: PathBuf,
    /// The directory its files redirect to.
    pub data: PathBuf,
}

/// A mount table field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cpath(p: &Path) -> Result<CString, LocalError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| LocalError::Io {
        what: format!("{}", p.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), LocalError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(LocalError::Io {
            what: what(),
            source: io::Error::last_os_error(),
        })
    }
}

impl Inner {
    /// The digest naming file `ino`'s whole content in the cache, making it local as one
    /// file if it is not yet (assembling a file of several chunks); `None` if it is not
    /// local, or cannot be made one file (see [`Inner::local_digest`]).
    fn local_file(&self, ino: u64, node: &crate::tree::Node) -> Option<Sha256Digest> {
        let (digest, parts) = self.local_digest(ino, node)?;
        match parts {
            None => Some(digest),
            Some(parts) => self.cache().assemble(&digest, &parts).map(|_| digest),
        }
    }

    /// Rebuilds this layer in `dir` (created; emptied first) for serving without FUSE: see
    /// the module docs. Takes as long as hashing the files not verified during this boot
    /// and copying the files of several chunks not yet assembled, plus about a second per
    /// 10,000 files; meant for a thread of its own.
    pub(crate) fn build_local(&self, dir: &Path) -> Result<LocalLayer, LocalError> {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        let (staging, data) = (dir.join("staging"), dir.join("data"));
        for d in [dir, &data] {
            std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
            estargz_cache::private_dir(d).map_err(io_err(format!("protecting {}", d.display())))?;
        }
        let result = self.write_staging(&staging, &data);
        let image = dir.join("layer.erofs");
        let result = result.and_then(|()| {
            let out = Command::new("mkfs.erofs")
                // Holes, not zeros: the files are empty but for their size.
                .args(["--quiet", "--chunksize=4096", "--preserve-mtime"])
                .arg(&image)
                .arg(&staging)
                .output()
                .map_err(|e| LocalError::Mkfs(format!("cannot run it: {e}")))?;
            if !out.status.success() {
                return Err(LocalError::Mkfs(format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&staging);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
        tracing::debug!(dir = %dir.display(), ms = started.elapsed().as_millis() as u64,
            "layer rebuilt for serving without FUSE");
        Ok(LocalLayer { image, data })
    }

    /// Writes the layer's tree to `staging` (regular files empty, redirected to their
    /// content, which is linked into `data`).
    fn write_staging(&self, staging: &Path, data: &Path) -> Result<(), LocalError> {
        let tree = self.tree();
        let mut first_path: HashMap<u64, PathBuf> = HashMap::new();
        // Directories get their attributes after their entries (creating an entry changes
        // the directory's times), deepest first.
        let mut dirs: Vec<(u64, PathBuf)> = Vec::new();
        let mut todo: Vec<(u64, PathBuf)> = vec![(1, staging.to_path_buf())];
        let mut data_dirs = std::collections::HashSet::new();
        let mut seen_dirs = std::collections::HashSet::new();
        while let Some((ino, path)) = todo.pop() {
            let node = tree
                .node(ino)
                .ok_or_else(|| LocalError::NotLocal(format!("inode {ino}")))?;
            let c = cpath(&path)?;
            if node.kind == NodeKind::Dir {
                if !seen_dirs.insert(ino) {
                    continue; // listed twice: a tree from a validated TOC is not, but be sure
                }
                std::fs::create_dir(&path)
                    .map_err(io_err(format!("creating {}", path.display())))?;
                for (name, child) in tree.children(node) {
                    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
                        return Err(LocalError::NotLocal(format!("entry {name:?}")));
                    }
                    todo.push((child, path.join(name)));
                }
                dirs.push((ino, path));
                continue;
            }
            if node.nlink > 1 {
                if let Some(first) = first_path.get(&ino) {
                    std::fs::hard_link(first, &path)
                        .map_err(io_err(format!("linking {}", path.display())))?;
                    continue;
                }
                first_path.insert(ino, path.clone());
            }
            match node.kind {
                NodeKind::File => {
                    let f = std::fs::File::create(&path)
                        .map_err(io_err(format!("creating {}", path.display())))?;
                    f.set_len(node.size)
                        .map_err(io_err(format!("sizing {}", path.display())))?;
                    drop(f);
                    if node.size > 0 {
                        let digest = self
                            .local_file(ino, node)
                            .ok_or_else(|| LocalError::NotLocal(tree.path(ino)))?;
                        let hex = digest.hex();
                        let sub = data.join(&hex[..2]);
                        if data_dirs.insert(hex[..2].to_string()) {
                            std::fs::create_dir(&sub)
                                .map_err(io_err(format!("creating {}", sub.display())))?;
                        }
                        let linked = self
                            .cache()
                            .link_verified(&digest, &sub.join(&hex))
                            .map_err(io_err(format!("linking {hex} into {}", sub.display())))?;
                        if !linked {
                            return Err(LocalError::NotLocal(tree.path(ino)));
                        }
                        set_xattr(&c, "trusted.overlay.metacopy", b"")?;
                        let redirect = format!("/{}/{hex}", &hex[..2]);
                        set_xattr(&c, "trusted.overlay.redirect", redirect.as_bytes())?;
                    }
                }
                NodeKind::Symlink => {
                    let target = tree.link_target(node).unwrap_or_default();
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(io_err(format!("creating symlink {}", path.display())))?;
                }
                NodeKind::Char | NodeKind::Block | NodeKind::Fifo => {
                    let kind = match node.kind {
                        NodeKind::Char => libc::S_IFCHR,
                        NodeKind::Block => libc::S_IFBLK,
                        _ => libc::S_IFIFO,
                    };
                    // SAFETY: a valid NUL-terminated path.
                    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, node.rdev as _) };
                    check(rc, || format!("creating node {}", path.display()))?;
                }
                NodeKind::Dir => unreachable!("handled above"),
            }
            self.set_attrs(ino, &path, &c)?;
        }
        for (ino, path) in dirs.iter().rev() {
            self.set_attrs(*ino, path, &cpath(path)?)?;
        }
        Ok(())
    }

    /// Owner, mode, extended attributes and times of `path` (inode `ino`), in the order
    /// that keeps each: a change of owner clears setuid bits and file capabilities.
    fn set_attrs(&self, ino: u64, path: &Path, c: &CString) -> Result<(), LocalError> {
        let tree = self.tree();
        let node = tree.node(ino).expect("checked by the caller");
        let what = |op: &str| format!("{op} {}", path.display());
        // SAFETY: valid NUL-terminated paths; the timespec array outlives the call.
        unsafe {
            check(libc::lchown(c.as_ptr(), node.uid, node.gid), || {
                what("chown")
            })?;
            if node.kind != NodeKind::Symlink {
                check(libc::chmod(c.as_ptr(), node.mode & 0o7777), || {
                    what("chmod")
                })?;
            }
        }
        for (name, value) in tree.xattrs(ino) {
            set_xattr(c, name, value)?;
        }
        if node.opaque {
            set_xattr(c, "trusted.overlay.opaque", b"y")?;
        }
        let t = libc::timespec {
            tv_sec: node.mtime as libc::time_t,
            tv_nsec: node.mtime_nanos as _,
        };
        let times = [t, t];
        // SAFETY: as above.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(rc, || what("setting the times of"))
    }
}

fn set_xattr(path: &CString, name: &str, value: &[u8]) -> Result<(), LocalError> {
    let n = CString::new(name).map_err(|_| LocalError::NotLocal(format!("xattr {name:?}")))?;
    // SAFETY: NUL-terminated path and name, a value of the length given.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc, || {
        format!("setting {name} on {}", path.to_string_lossy())
    })
}

impl LocalLayer {
    /// Mounts the image read-only, `nosuid` and `nodev` (as the FUSE layer) at `dir/mnt`
    /// (`dir`: the one it was built in, removed when the mount is dropped).
    pub(crate) fn mount(self, dir: &Path) -> Result<LocalMount, LocalError> {
        let mountpoint = dir.join("mnt");
        std::fs::create_dir(&mountpoint)
            .map_err(io_err(format!("creating {}", mountpoint.display())))?;
        let (src, target) = (cpath(&self.image)?, cpath(&mountpoint)?);
        // SAFETY: NUL-terminated strings that outlive the call; no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                c"erofs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            )
        };
        check(rc, || {
            format!(
                "mounting {} at {}",
                self.image.display(),
                mountpoint.display()
            )
        })?;
        Ok(LocalMount {
            mountpoint,
            layer: self,
            dir: dir.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn mount_table_fields_are_unescaped() {
        assert_eq!(unescape(r"/var/lib/a\040b/fs"), "/var/lib/a b/fs");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/plain\9"), r"/plain\9");
    }
}
