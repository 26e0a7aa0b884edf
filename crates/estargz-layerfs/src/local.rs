//! A layer whose content is all local, served without FUSE.
//!
//! Through FUSE every file a container opens costs requests to the manager (a lookup, an
//! open, a release, and overlayfs's getxattr), even when its content is local and read
//! through passthrough: a whole-tree read runs at about 0.6x native (BENCHMARKS.md). Once
//! every chunk of a layer is in the cache, the layer is rebuilt as the kernel can serve it
//! alone, in the layout composefs uses:
//!
//! - an EROFS image of the layer's metadata, written from the layer's inode table (`erofs`):
//!   directories, names, modes, owners, times, extended attributes, links, devices and
//!   whiteouts as the FUSE layer shows them; a small regular file (3 KiB or less) with its
//!   content, after its inode; each larger one is a hole of its size with overlayfs's
//!   `trusted.overlay.metacopy` and `trusted.overlay.redirect = /<sha256>`;
//! - a data directory holding the files those redirects name, by the sha256 of their
//!   content: hard links to the cache's verified chunk files (a file of one chunk) and
//!   assembled files (a file of several),
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
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use estargz_format::Sha256Digest;

use crate::fs::Inner;
use crate::tree::NodeKind;

/// Regular files of at most this many bytes are held in the image itself, after their
/// inode, rather than redirected to the data directory: opening one then costs no lookup in
/// the data directory and no second inode, and its bytes come with the block its inode is
/// read from (a whole-tree read of the gcc image opens about a thousand such files). The
/// image grows by their size; the cache's copies stay where they are.
const INLINE_FILE_MAX: u64 = 3 << 10;
/// At most this many bytes of small files are held in one layer's image: the build keeps
/// them in memory until the image is written, and a layer of a million small files (a
/// `node_modules` tree) must not cost the daemon gigabytes. Files beyond are redirected.
const INLINE_LAYER_MAX: u64 = 32 << 20;

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
    /// The image cannot hold the layer (an attribute EROFS cannot store, ...).
    #[error("building the EROFS image: {0}")]
    Image(String),
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

/// Every EROFS mount, in the order mounted: (mountpoint, image), from the kernel's mount
/// table.
fn erofs_mounts() -> Vec<(PathBuf, PathBuf)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER".
    table
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let at = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            (r.next()? == "erofs")
                .then(|| {
                    Some((
                        PathBuf::from(unescape(at)),
                        PathBuf::from(unescape(r.next()?)),
                    ))
                })
                .flatten()
        })
        .collect()
}

/// EROFS mounts whose image lies under `dir`, in the order mounted (the last is the
/// newest): (mountpoint, image).
pub fn local_mounts_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    erofs_mounts()
        .into_iter()
        .filter(|(_, image)| image.starts_with(&dir))
        .collect()
}

/// A directory under `dir` (a layer's target, see `MountedLayer::serve_locally`) for a new
/// build, named `PID-NANOS` (not created): its own per build, since a mount left by a
/// manager that died still uses the files of the one before. The builds a process no
/// longer running left unmounted are removed first ([`remove_stale_builds`]).
pub(crate) fn new_build_dir(dir: &Path) -> PathBuf {
    remove_stale_builds(dir);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    dir.join(format!("{}-{nanos}", std::process::id()))
}

/// Removes the build directories under `dir` (named as [`new_build_dir`] names them) that
/// a process no longer running left unmounted: a build cut short by a crash, or an
/// `estargz mount` killed before it could clean up. Their hard links would keep the chunk
/// cache from evicting those files. Directories of running processes and mounted ones
/// (containers may use them) are kept.
fn remove_stale_builds(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mounted: Vec<PathBuf> = local_mounts_under(dir)
        .into_iter()
        .filter_map(|(_, image)| image.parent().map(Path::to_path_buf))
        .collect();
    for entry in entries.flatten() {
        let path = entry.path();
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<libc::pid_t>().ok());
        let Some(pid) = pid.filter(|&p| p > 0) else {
            continue;
        };
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        if mounted.contains(&canonical) || is_running(pid) {
            continue;
        }
        tracing::info!(dir = %path.display(), "removing a stale build of a local layer");
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// Whether process `pid` exists (it may belong to another user).
fn is_running(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The layer served without FUSE from images built under `dir` (the directory given to
/// `MountedLayer::serve_locally`): its newest mount, and the data directory its overlay
/// needs after it. `None` while it is served through FUSE only.
pub fn local_form_of(dir: &Path) -> Option<LocalForm> {
    local_forms_of(&[dir]).pop().flatten()
}

/// [`local_form_of`] of each of `dirs`, reading the mount table once.
pub fn local_forms_of(dirs: &[&Path]) -> Vec<Option<LocalForm>> {
    let mounts = erofs_mounts();
    dirs.iter()
        .map(|dir| {
            let dir = dir.canonicalize().ok()?;
            let (meta, image) = mounts.iter().rev().find(|(_, i)| i.starts_with(&dir))?;
            let data = image.parent()?.join("data");
            (data.is_dir() && is_local_mount(meta)).then(|| LocalForm {
                meta: meta.clone(),
                data,
            })
        })
        .collect()
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

    /// The content of a small regular file (one chunk), read from the cache's verified
    /// files, for the image to hold.
    fn small_file(&self, ino: u64, node: &crate::tree::Node) -> Result<Vec<u8>, LocalError> {
        let not_local = || LocalError::NotLocal(self.tree().path(ino));
        let (digest, None) = self.local_digest(ino, node).ok_or_else(not_local)? else {
            return Err(not_local());
        };
        let content = self.cache().get(&digest).ok_or_else(not_local)?;
        if content.len() as u64 != node.size {
            return Err(not_local());
        }
        Ok(content.to_vec())
    }

    /// The inodes the layer shows, each once, the root first, in the order the image
    /// holds them (as mkfs.erofs writes them: a directory's entries together, then each
    /// subdirectory's in turn, depth first; a walk of the tree reads the image's blocks
    /// nearly in order), with each inode's position in that order.
    fn shown_inodes(&self) -> Result<(Vec<u64>, HashMap<u64, usize>), LocalError> {
        let tree = self.tree();
        let mut index: HashMap<u64, usize> = HashMap::from([(1, 0)]);
        let mut order: Vec<u64> = vec![1];
        let mut dirs = vec![1u64];
        while let Some(dir) = dirs.pop() {
            let node = tree
                .node(dir)
                .ok_or_else(|| LocalError::NotLocal(format!("inode {dir}")))?;
            let mut subdirs = Vec::new();
            for (name, child) in tree.children(node) {
                let is_dir = tree.node(child).is_some_and(|n| n.kind == NodeKind::Dir);
                let next = index.len();
                if *index.entry(child).or_insert(next) == next {
                    order.push(child);
                    if is_dir {
                        subdirs.push(child);
                    }
                } else if is_dir {
                    // A directory listed twice: not from a validated TOC.
                    return Err(LocalError::NotLocal(format!("directory {name:?}")));
                }
            }
            dirs.extend(subdirs.into_iter().rev());
        }
        Ok((order, index))
    }

    /// Whether every chunk of every file the layer shows is cached (index lookups only).
    /// Not a count of the layer's chunks: those of hidden entries (the landmarks) may
    /// never be fetched.
    pub(crate) fn files_local(&self) -> bool {
        let tree = self.tree();
        let Ok((order, _)) = self.shown_inodes() else {
            return false;
        };
        order
            .iter()
            .filter_map(|&ino| tree.node(ino))
            .filter(|n| n.kind == NodeKind::File)
            .all(|n| {
                tree.chunks(n)
                    .iter()
                    .all(|c| self.cache().holds(&c.digest, c.size))
            })
    }

    /// Rebuilds this layer in `dir` (created; emptied first) for serving without FUSE: see
    /// the module docs. Takes as long as hashing the files not verified during this boot
    /// and copying the files of several chunks not yet assembled, plus a hard link per
    /// file; meant for a thread of its own.
    pub(crate) fn build_local(&self, dir: &Path) -> Result<LocalLayer, LocalError> {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        let data = dir.join("data");
        for d in [dir, &data] {
            std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
            estargz_cache::private_dir(d).map_err(io_err(format!("protecting {}", d.display())))?;
        }
        let image = dir.join("layer.erofs");
        let result = self.inodes(&data).and_then(|inodes| {
            let file = std::fs::File::create(&image)
                .map_err(io_err(format!("creating {}", image.display())))?;
            let mut out = io::BufWriter::new(file);
            crate::erofs::write(&inodes, &mut out)
                .and_then(|()| out.flush().map_err(Into::into))
                .map_err(|e| LocalError::Image(e.to_string()))
        });
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
        tracing::debug!(dir = %dir.display(), ms = started.elapsed().as_millis() as u64,
            "layer rebuilt for serving without FUSE");
        Ok(LocalLayer { image, data })
    }

    /// The layer's inodes for its EROFS image, the root first, as the FUSE layer shows
    /// them; each non-empty regular file redirected to its content, linked into `data`.
    fn inodes(&self, data: &Path) -> Result<Vec<crate::erofs::Inode>, LocalError> {
        use crate::erofs::{Inode, Kind};
        let tree = self.tree();
        let (order, index) = self.shown_inodes()?;
        let mut inodes = Vec::with_capacity(order.len());
        // Content already linked into `data`.
        let mut names: std::collections::HashSet<Sha256Digest> = Default::default();
        let mut inlined = 0u64;
        for &ino in &order {
            let node = tree
                .node(ino)
                .ok_or_else(|| LocalError::NotLocal(format!("inode {ino}")))?;
            let mut xattrs: Vec<(String, Vec<u8>)> = tree
                .xattrs(ino)
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            if node.opaque && !xattrs.iter().any(|(k, _)| k == "trusted.overlay.opaque") {
                xattrs.push(("trusted.overlay.opaque".into(), b"y".to_vec()));
            }
            let (type_bits, kind) = match node.kind {
                NodeKind::Dir => {
                    let children = tree
                        .children(node)
                        .map(|(name, child)| (name.as_bytes().to_vec(), index[&child]))
                        .collect();
                    (libc::S_IFDIR, Kind::Dir(children))
                }
                NodeKind::File
                    if node.size > 0
                        && node.size <= INLINE_FILE_MAX
                        && inlined + node.size <= INLINE_LAYER_MAX =>
                {
                    inlined += node.size;
                    (libc::S_IFREG, Kind::Data(self.small_file(ino, node)?))
                }
                NodeKind::File => {
                    if node.size > 0 {
                        let digest = self
                            .local_file(ino, node)
                            .ok_or_else(|| LocalError::NotLocal(tree.path(ino)))?;
                        // Named by content: a container's overlay stacks the data
                        // directories of all its local layers, and a redirect is looked up
                        // in each in turn, so the first file of that name must be the
                        // content. One directory: after the page cache is dropped, a first
                        // open reads a few blocks of it, not a directory per prefix.
                        let name = digest.hex();
                        if names.insert(digest) {
                            let at = data.join(&name);
                            let linked = self
                                .cache()
                                .link_verified(&digest, &at)
                                .map_err(io_err(format!("linking {}", at.display())))?;
                            if !linked {
                                return Err(LocalError::NotLocal(tree.path(ino)));
                            }
                        }
                        xattrs.push(("trusted.overlay.metacopy".into(), Vec::new()));
                        let redirect = format!("/{name}");
                        xattrs.push(("trusted.overlay.redirect".into(), redirect.into_bytes()));
                    }
                    (libc::S_IFREG, Kind::File)
                }
                NodeKind::Symlink => {
                    let target = tree.link_target(node).unwrap_or_default();
                    (libc::S_IFLNK, Kind::Symlink(target.as_bytes().to_vec()))
                }
                NodeKind::Char => (libc::S_IFCHR, Kind::Special(node.rdev)),
                NodeKind::Block => (libc::S_IFBLK, Kind::Special(node.rdev)),
                NodeKind::Fifo => (libc::S_IFIFO, Kind::Special(0)),
            };
            inodes.push(Inode {
                mode: type_bits | (node.mode & 0o7777),
                uid: node.uid,
                gid: node.gid,
                mtime: node.mtime,
                mtime_nanos: node.mtime_nanos,
                nlink: node.nlink.max(1),
                size: if node.kind == NodeKind::File {
                    node.size
                } else {
                    0
                },
                kind,
                xattrs,
            });
        }
        Ok(inodes)
    }
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
