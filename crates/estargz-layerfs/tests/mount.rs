//! A layer mounted through FUSE reads exactly like `tar -x` of the same layer: every path,
//! content, mode, owner, mtime, xattr, symlink, hardlink, device, fifo, and whiteouts in
//! the form overlayfs expects. Needs root and /dev/fuse; a missing one fails the test.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions};
use estargz_layerfs::{
    is_local_mount, local_form_of, mount, FetchOptions, FetchScheduler, FileSource, LayerFs,
    LocalForm, MountedLayer,
};
use estargz_testutil::{real_rootfs_tar, synthetic_tar, Overlay, SMALL_CHUNK};

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(m >= 0, "lgetxattr {} {:?}", path.display(), cn);
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            val[..m as usize].to_vec(),
        );
    }
    out
}

/// Extracts a tar as root would for a container (owners, modes, xattrs, devices).
fn tar_x(tar: &Path, dir: &Path) {
    let st = std::process::Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "-xpf",
        ])
        .arg(tar)
        .arg("-C")
        .arg(dir)
        .status()
        .expect("GNU tar");
    assert!(st.success(), "tar -x failed");
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        let is_dir = e.file_type().unwrap().is_dir();
        out.push(r.clone());
        if is_dir {
            walk(root, &r, out);
        }
    }
}

/// Compares a tar extraction with a mount, applying overlayfs whiteout conventions.
/// Directory mtimes come from the tar headers (`headers`): GNU tar leaves the extraction
/// time on a directory repeated in the archive, while the later header (what containerd
/// applies, and what the mount shows) says otherwise.
fn assert_same_tree(
    extracted: &Path,
    mounted: &Path,
    headers: &BTreeMap<String, estargz_testutil::Expected>,
) -> usize {
    assert_same_tree_in(extracted, mounted, headers, None)
}

/// [`assert_same_tree`] of a layer served without FUSE (`mounted` is its metadata image):
/// a regular file's content is the file its `trusted.overlay.redirect` names in `data`,
/// which is all overlayfs reads (the two overlay attributes are not the tar's), or, for a
/// small file the image holds, its own.
fn assert_same_tree_in(
    extracted: &Path,
    mounted: &Path,
    headers: &BTreeMap<String, estargz_testutil::Expected>,
    data: Option<&Path>,
) -> usize {
    let content = |dst: &Path| -> Vec<u8> {
        let Some(data) = data else {
            return std::fs::read(dst).unwrap();
        };
        let x = xattrs(dst);
        match x.get("trusted.overlay.redirect") {
            Some(to) => {
                assert_eq!(
                    x.get("trusted.overlay.metacopy").map(|v| &v[..]),
                    Some(&b""[..])
                );
                let to = String::from_utf8(to.clone()).unwrap();
                std::fs::read(data.join(to.trim_start_matches('/'))).unwrap()
            }
            None => std::fs::read(dst).unwrap(),
        }
    };
    let shown_xattrs = |dst: &Path| {
        let mut x = xattrs(dst);
        if data.is_some() {
            x.remove("trusted.overlay.redirect");
            x.remove("trusted.overlay.metacopy");
        }
        x
    };
    let mut expected = Vec::new();
    walk(extracted, Path::new(""), &mut expected);
    let mut seen = std::collections::BTreeSet::new();
    for rel in &expected {
        let name = rel.file_name().unwrap().to_string_lossy().into_owned();
        let src = extracted.join(rel);
        if name == ".wh..wh..opq" {
            let dir = mounted.join(rel.parent().unwrap());
            assert!(
                !mounted.join(rel).exists(),
                "{} must be hidden",
                rel.display()
            );
            assert_eq!(
                xattrs(&dir).get("trusted.overlay.opaque").map(|v| &v[..]),
                Some(&b"y"[..]),
                "{}",
                dir.display()
            );
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let w = rel.parent().unwrap().join(hidden);
            let m = std::fs::symlink_metadata(mounted.join(&w))
                .unwrap_or_else(|_| panic!("whiteout {}", w.display()));
            assert!(
                m.file_type().is_char_device() && m.rdev() == 0,
                "{} must be a 0/0 char device",
                w.display()
            );
            seen.insert(w);
            continue;
        }
        let dst = mounted.join(rel);
        let a = std::fs::symlink_metadata(&src).unwrap();
        let b =
            std::fs::symlink_metadata(&dst).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        let what = rel.display();
        assert_eq!(a.file_type(), b.file_type(), "{what}: type");
        assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "{what}: mode");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{what}: owner");
        if a.file_type().is_dir() {
            // Directories the tar only implies have no mtime of their own to compare.
            if let Some(h) = headers.get(&*rel.to_string_lossy()) {
                assert_eq!(h.mtime, b.mtime(), "{what}: directory mtime");
            }
        } else {
            assert_eq!(
                (a.mtime(), a.mtime_nsec()),
                (b.mtime(), b.mtime_nsec()),
                "{what}: mtime"
            );
        }
        assert_eq!(xattrs(&src), shown_xattrs(&dst), "{what}: xattrs");
        let ft = a.file_type();
        if ft.is_file() {
            assert_eq!(a.len(), b.len(), "{what}: size");
            assert_eq!(a.nlink(), b.nlink(), "{what}: link count");
            assert!(
                std::fs::read(&src).unwrap() == content(&dst),
                "{what}: content"
            );
        } else if ft.is_symlink() {
            assert_eq!(
                std::fs::read_link(&src).unwrap(),
                std::fs::read_link(&dst).unwrap(),
                "{what}: target"
            );
        } else if ft.is_char_device() || ft.is_block_device() {
            assert_eq!(a.rdev(), b.rdev(), "{what}: device");
        }
        seen.insert(rel.clone());
    }
    // Hardlinks share an inode in the mount too.
    let mut by_ino: BTreeMap<u64, Vec<&PathBuf>> = BTreeMap::new();
    for rel in &expected {
        let m = std::fs::symlink_metadata(extracted.join(rel)).unwrap();
        if m.file_type().is_file() && m.nlink() > 1 {
            by_ino.entry(m.ino()).or_default().push(rel);
        }
    }
    for group in by_ino.values() {
        let inos: std::collections::BTreeSet<u64> = group
            .iter()
            .map(|r| std::fs::symlink_metadata(mounted.join(r)).unwrap().ino())
            .collect();
        assert_eq!(inos.len(), 1, "hardlinks {group:?} must share an inode");
    }
    // Nothing extra in the mount.
    let mut shown = Vec::new();
    walk(mounted, Path::new(""), &mut shown);
    for rel in shown {
        assert!(
            seen.contains(&rel),
            "{} is in the mount but not in the tar",
            rel.display()
        );
    }
    seen.len()
}

struct Layer {
    _dir: tempfile::TempDir,
    extracted: PathBuf,
    headers: BTreeMap<String, estargz_testutil::Expected>,
    mounted: Option<MountedLayer>,
    cache: Arc<ChunkCache>,
}

impl Drop for Layer {
    /// A test that failed half way leaves no mount behind (a failed unmount included).
    fn drop(&mut self) {
        let mnt = self.mountpoint();
        drop(self.mounted.take());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mounts.lines().any(|l| l.split(' ').nth(1) == mnt.to_str()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&mnt)
                .status();
        }
    }
}

fn mount_layer(tar: Vec<u8>, opts: &ConvertOptions) -> Layer {
    mount_layer_with(tar, opts, &FetchOptions::default())
}

/// Chunks become local only as files are read: nothing is fetched ahead.
fn on_demand_only(passthrough: bool) -> FetchOptions {
    FetchOptions {
        prefetch: false,
        background: false,
        passthrough,
        ..FetchOptions::default()
    }
}

fn mount_layer_with(tar: Vec<u8>, opts: &ConvertOptions, fetch: &FetchOptions) -> Layer {
    estargz_testutil::require_root_and_fuse("the FUSE mount tests");
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("layer.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let blob_path = dir.path().join("layer.esgz");
    let mut blob = Vec::new();
    convert(&tar[..], &mut blob, opts, &()).unwrap();
    std::fs::write(&blob_path, &blob).unwrap();
    let extracted = dir.path().join("extracted");
    std::fs::create_dir(&extracted).unwrap();
    tar_x(&tar_path, &extracted);
    let toc = EstargzReader::open(&blob[..], &OpenOptions::default())
        .unwrap()
        .toc()
        .clone();
    // No memory tier: the kernel's second and later reads of a chunk go to the disk cache,
    // first whole and verified, then in parts (`read_verified`), and must read the same.
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: dir.path().join("cache"),
        max_bytes: 1 << 30,
        memory_bytes: 0,
    }));
    let fs = LayerFs::new(
        &toc,
        Arc::new(FileSource::open(&blob_path).unwrap()),
        cache.clone(),
        FetchScheduler::new(fetch.clone()),
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = mount(fs, &mnt).expect("FUSE mount (needs root and /dev/fuse)");
    Layer {
        _dir: dir,
        extracted,
        headers: estargz_testutil::expected_from_tar(&tar),
        mounted: Some(mounted),
        cache,
    }
}

#[test]
fn synthetic_layer_reads_like_tar_x() {
    let opts = ConvertOptions {
        chunk_size: SMALL_CHUNK,
        compression_level: 1,
        ..Default::default()
    };
    let mut layer = mount_layer(synthetic_tar(), &opts);
    let mnt = layer.mountpoint();
    let n = assert_same_tree(&layer.extracted, &mnt, &layer.headers);
    assert!(n >= 36, "compared {n} paths");
    assert!(layer.cache.stats().inserts > 0);
    layer.mounted.take().unwrap().unmount().unwrap();
}

#[test]
fn real_rootfs_reads_like_tar_x() {
    let dir = tempfile::tempdir().unwrap();
    let tar = real_rootfs_tar(dir.path());
    let mut layer = mount_layer(
        tar,
        &ConvertOptions {
            compression_level: 1,
            ..Default::default()
        },
    );
    let mnt = layer.mountpoint();
    let n = assert_same_tree(&layer.extracted, &mnt, &layer.headers);
    assert!(n > 2000, "compared {n} paths");
    // Large files were read back from the disk cache (there is no memory tier here).
    assert!(layer.cache.stats().hits > 0);
    // Read again with every chunk local and the page cache empty: the files of one chunk
    // open in passthrough mode (the kernel reads the chunk files), and read the same.
    drop_caches();
    let before = layer.passthrough_opens();
    assert_same_tree(&layer.extracted, &mnt, &layer.headers);
    assert!(
        layer.passthrough_opens() - before > 1000,
        "{} passthrough opens",
        layer.passthrough_opens() - before
    );
    // Programs run from passthrough files (mmap), through overlayfs as in a container.
    let ovl = Overlay::new(&[&mnt]);
    let out = std::process::Command::new("chroot")
        .arg(&ovl.merged)
        .args(["/bin/sh", "-c", "ls /usr/bin/python3.11 && echo ran"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("ran\n"),
        "{out:?}"
    );
    drop(ovl);
    layer.mounted.take().unwrap().unmount().unwrap();
}

/// Empties the page cache, so that reads reach the file systems again.
fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache (root)");
}

impl Layer {
    /// Where the layer is mounted.
    fn mountpoint(&self) -> PathBuf {
        self._dir.path().join("mnt")
    }

    fn passthrough_opens(&self) -> u64 {
        let m = self.mounted.as_ref().unwrap();
        m.stats()
            .passthrough_opens
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// In a container's root `merged`, changes the first four of `files` (name, content) in
/// each way that makes overlayfs copy a lower file up: append, truncate, rename (to
/// `renamed`), chmod 0600.
fn change_each_kind(merged: &Path, files: &[&(String, Vec<u8>)]) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let at = |i: usize| merged.join(&files[i].0);
    std::fs::OpenOptions::new()
        .append(true)
        .open(at(0))
        .unwrap()
        .write_all(b"+appended")
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(at(1))
        .unwrap()
        .set_len(1)
        .unwrap();
    std::fs::rename(at(2), merged.join("renamed")).unwrap();
    std::fs::set_permissions(at(3), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Checks what [`change_each_kind`] did, as read back through `merged`.
fn assert_changed(merged: &Path, files: &[&(String, Vec<u8>)]) {
    use std::os::unix::fs::PermissionsExt;
    let at = |i: usize| merged.join(&files[i].0);
    let mut appended = files[0].1.clone();
    appended.extend_from_slice(b"+appended");
    assert_eq!(std::fs::read(at(0)).unwrap(), appended);
    assert_eq!(std::fs::read(at(1)).unwrap(), &files[1].1[..1]);
    assert_eq!(std::fs::read(merged.join("renamed")).unwrap(), files[2].1);
    assert!(!at(2).exists());
    let meta = std::fs::metadata(at(3)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read(at(3)).unwrap(), files[3].1);
}

#[test]
fn passthrough_on_and_off_read_the_same_bytes() {
    // Small chunks: most files have several, and are assembled as one local file to be
    // read in passthrough mode.
    let small = ConvertOptions {
        chunk_size: SMALL_CHUNK,
        ..Default::default()
    };
    for passthrough in [true, false] {
        let mut layer = mount_layer_with(synthetic_tar(), &small, &on_demand_only(passthrough));
        let mnt = layer.mountpoint();
        // First pass: files read through FUSE (but for those whose chunk another file with
        // the same content made local first).
        assert_same_tree(&layer.extracted, &mnt, &layer.headers);
        let first = layer.passthrough_opens();
        drop_caches();
        assert_same_tree(&layer.extracted, &mnt, &layer.headers);
        let opens = layer.passthrough_opens() - first;
        // Every file with content, whatever its number of chunks, opened in passthrough
        // mode on the second pass.
        let with_content = layer
            .headers
            .values()
            .filter(|e| e.kind == estargz_format::EntryKind::Reg && !e.content.is_empty())
            .filter(|e| e.content.len() <= 64 << 20)
            .count() as u64;
        if passthrough {
            assert!(
                opens >= with_content,
                "{opens} passthrough opens, {with_content} files"
            );
        } else {
            assert_eq!(opens + first, 0, "passthrough is off");
        }
        layer.mounted.take().unwrap().unmount().unwrap();
    }
}

#[test]
fn files_read_in_passthrough_mode_can_be_changed_in_a_container() {
    let mut layer = mount_layer_with(
        synthetic_tar(),
        &ConvertOptions::default(),
        &on_demand_only(true),
    );
    let mnt = layer.mountpoint();
    assert_same_tree(&layer.extracted, &mnt, &layer.headers);
    drop_caches();
    let ovl = Overlay::new(&[&mnt]);
    let files: Vec<(String, Vec<u8>)> = layer
        .headers
        .iter()
        .filter(|(_, e)| e.kind == estargz_format::EntryKind::Reg && !e.content.is_empty())
        .filter(|(_, e)| e.content.len() < (4 << 20))
        .map(|(n, e)| (n.clone(), e.content.clone()))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    let before = layer.passthrough_opens();
    for (name, content) in &files {
        assert_eq!(
            &std::fs::read(ovl.merged.join(name)).unwrap(),
            content,
            "{name}"
        );
    }
    assert!(layer.passthrough_opens() - before >= files.len() as u64);
    // Copy-up of each kind, on files the kernel has open in passthrough mode.
    let held: Vec<std::fs::File> = files
        .iter()
        .map(|(n, _)| std::fs::File::open(ovl.merged.join(n)).unwrap())
        .collect();
    let four: Vec<&(String, Vec<u8>)> = files.iter().collect();
    change_each_kind(&ovl.merged, &four);
    drop(held);
    assert_changed(&ovl.merged, &four);
    assert!(ovl.upper().join(&files[0].0).exists(), "copied up");
    // The lazy layer itself is unchanged.
    for (name, content) in &files {
        assert_eq!(&std::fs::read(mnt.join(name)).unwrap(), content, "{name}");
    }
    drop(ovl);
    layer.mounted.take().unwrap().unmount().unwrap();
}

#[test]
fn a_file_whose_chunk_becomes_local_while_open_reads_the_same() {
    use std::io::Read;
    let mut layer = mount_layer_with(
        synthetic_tar(),
        &ConvertOptions::default(),
        &on_demand_only(true),
    );
    let mnt = layer.mountpoint();
    let (name, file) = layer
        .headers
        .iter()
        .filter(|(_, e)| e.kind == estargz_format::EntryKind::Reg)
        .filter(|(_, e)| e.content.len() > 8192 && e.content.len() < (4 << 20))
        .max_by_key(|(_, e)| e.content.len())
        .map(|(n, e)| (n.clone(), e.content.clone()))
        .unwrap();
    let path = mnt.join(&name);
    // Opened while nothing is local: read through FUSE.
    let mut first = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 4096];
    first.read_exact(&mut head).unwrap();
    assert_eq!(head, file[..4096]);
    // Its chunk is local now; while the first open reads through FUSE, another open must
    // too (the kernel refuses to mix modes on one inode).
    let mut second = std::fs::File::open(&path).unwrap();
    let mut all = Vec::new();
    second.read_to_end(&mut all).unwrap();
    assert_eq!(all, file);
    assert_eq!(layer.passthrough_opens(), 0);
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).unwrap();
    head.extend(rest);
    assert_eq!(head, file);
    drop((first, second));
    // Once they are closed, the next open is in passthrough mode, and shares its backing
    // file with opens made while it is open. (The kernel tells the layer of a close
    // asynchronously: an open racing with it still reads through FUSE, so wait for it.)
    drop_caches();
    let mut third = std::fs::File::open(&path).unwrap();
    for _ in 0..100 {
        if layer.passthrough_opens() == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        third = std::fs::File::open(&path).unwrap();
    }
    let mut fourth = std::fs::File::open(&path).unwrap();
    assert_eq!(layer.passthrough_opens(), 2);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    third.read_to_end(&mut a).unwrap();
    fourth.read_to_end(&mut b).unwrap();
    assert_eq!((a == file, b == file), (true, true));
    drop((third, fourth));
    layer.mounted.take().unwrap().unmount().unwrap();
}

/// A file too large to be assembled while its opener waits (over 64 MiB) reads through
/// FUSE once its chunks are local, is assembled in the background meanwhile, and opens in
/// passthrough mode afterwards, reading the same bytes.
#[test]
fn a_large_local_file_is_assembled_in_the_background_and_then_passes_through() {
    let content = estargz_testutil::noise((64 << 20) + 12345, 17);
    let mut layer = mount_layer_with(
        estargz_testutil::files_tar(&[("model.bin", &content)]),
        &ConvertOptions::default(),
        &on_demand_only(true),
    );
    let path = layer.mountpoint().join("model.bin");
    // First read: the chunks come from the blob, through FUSE.
    assert!(std::fs::read(&path).unwrap() == content);
    assert_eq!(layer.passthrough_opens(), 0);
    // Every chunk is local now: an open reads through FUSE and starts the assembly; a
    // later open (once it is done and the earlier opens are released) passes through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut f = std::fs::File::open(&path).unwrap();
    while layer.passthrough_opens() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no passthrough open within 60 s"
        );
        drop(f);
        std::thread::sleep(std::time::Duration::from_millis(50));
        f = std::fs::File::open(&path).unwrap();
    }
    drop_caches();
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut read).unwrap();
    drop(f);
    assert!(read == content, "the assembled file reads differently");
    let usage = layer.cache.stats().usage_bytes;
    assert!(
        usage >= 2 * content.len() as u64,
        "the assembled copy is not in the cache: {usage} bytes"
    );
    layer.mounted.take().unwrap().unmount().unwrap();
}

/// A layer without any extended attribute: a file has none, whether asked directly or
/// through overlayfs (which asks the lower layer for its own attributes at every lookup),
/// lists none, and copy-up through overlayfs works.
#[test]
fn a_layer_without_xattrs_has_none_through_overlayfs_and_copies_up() {
    use std::io::Write;
    let content = b"#!/bin/sh\necho plain\n".to_vec();
    let mut layer = mount_layer_with(
        estargz_testutil::files_tar(&[("bin/plain", &content), ("etc/conf", b"a=1\n")]),
        &ConvertOptions::default(),
        &on_demand_only(true),
    );
    let mnt = layer.mountpoint();
    assert_same_tree(&layer.extracted, &mnt, &layer.headers);
    let ovl = Overlay::new(&[&mnt]);
    let no_attribute = |path: &Path| {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let name = CString::new("user.anything").unwrap();
        let mut val = [0u8; 64];
        for _ in 0..2 {
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    name.as_ptr(),
                    val.as_mut_ptr().cast(),
                    val.len(),
                )
            };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert!(
                n < 0 && matches!(errno, Some(libc::ENODATA) | Some(libc::EOPNOTSUPP)),
                "{}: {n} {errno:?}",
                path.display()
            );
        }
        assert!(xattrs(path).is_empty(), "{}", path.display());
    };
    for f in ["bin/plain", "etc/conf", "bin"] {
        no_attribute(&mnt.join(f));
        no_attribute(&ovl.merged.join(f));
    }
    // Copy-up: append and chmod a file of the layer.
    let conf = ovl.merged.join("etc/conf");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .unwrap()
        .write_all(b"b=2\n")
        .unwrap();
    std::fs::set_permissions(
        ovl.merged.join("bin/plain"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    assert_eq!(std::fs::read(&conf).unwrap(), b"a=1\nb=2\n");
    assert_eq!(
        std::fs::read(ovl.merged.join("bin/plain")).unwrap(),
        content
    );
    assert_eq!(std::fs::read(mnt.join("etc/conf")).unwrap(), b"a=1\n");
    drop(ovl);
    layer.mounted.take().unwrap().unmount().unwrap();
}

/// A mounted layer dropped while a file of it is still open (a test or a caller failing
/// half way) leaves nothing mounted behind: the unmount fails busy, and the mount is
/// detached instead of staying with no server behind it.
#[test]
fn a_layer_dropped_while_a_file_is_open_leaves_no_mount_behind() {
    let mut layer = mount_layer_with(
        estargz_testutil::files_tar(&[("data", b"still open\n")]),
        &ConvertOptions::default(),
        &on_demand_only(true),
    );
    let mnt = layer.mountpoint();
    let open = std::fs::File::open(mnt.join("data")).unwrap();
    drop(layer.mounted.take());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(1) == mnt.to_str()),
        "{} is still mounted",
        mnt.display()
    );
    drop(open);
}

/// `statfs` of a layer reports the chunk cache's file system (kubelet and `df` read
/// capacity and free space from it; zeros are "InvalidDiskCapacity").
#[test]
fn statfs_reports_the_chunk_caches_file_system() {
    let layer = mount_layer_with(
        estargz_testutil::files_tar(&[("data", b"x")]),
        &ConvertOptions::default(),
        &on_demand_only(false),
    );
    let statvfs = |p: &Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a zeroed struct the call fills in.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::statvfs(c.as_ptr(), &mut s) },
            0,
            "{}",
            p.display()
        );
        s
    };
    let (ours, cache) = (statvfs(&layer.mountpoint()), statvfs(layer.cache.root()));
    assert!(ours.f_blocks > 0 && ours.f_bavail > 0 && ours.f_files > 0);
    assert_eq!(
        (ours.f_blocks, ours.f_bsize, ours.f_frsize, ours.f_files),
        (cache.f_blocks, cache.f_bsize, cache.f_frsize, cache.f_files)
    );
    // Free space moves with other writers on the disk; it is the same file system's.
    let near = |a: u64, b: u64| a.abs_diff(b) < cache.f_blocks / 100;
    assert!(
        near(ours.f_bavail, cache.f_bavail),
        "{} vs {}",
        ours.f_bavail,
        cache.f_bavail
    );
}

/// Reads that go through FUSE arrive in requests of up to 1 MiB: the mount's kernel
/// read-ahead is raised from the default 128 KiB.
#[test]
fn the_mount_reads_ahead_a_mebibyte() {
    use std::os::unix::fs::MetadataExt;
    let layer = mount_layer_with(
        estargz_testutil::files_tar(&[("data", b"x")]),
        &ConvertOptions::default(),
        &on_demand_only(false),
    );
    let mnt = layer.mountpoint();
    let dev = std::fs::metadata(&mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    assert_eq!(
        std::fs::read_to_string(&knob).unwrap().trim(),
        "1024",
        "{knob}"
    );
}

/// Regular files with content, as a container sees them (whiteouts and markers hidden).
fn container_files(
    headers: &BTreeMap<String, estargz_testutil::Expected>,
) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .filter(|(_, e)| e.kind == estargz_format::EntryKind::Reg && !e.content.is_empty())
        .filter(|(n, _)| !n.rsplit('/').next().unwrap().starts_with(".wh."))
        .map(|(n, e)| (n.clone(), e.content.clone()))
        .collect()
}

/// Once every file of a layer is local, it is served without FUSE: an EROFS image of its
/// metadata mounted beside the FUSE mount, whose files redirect to their content in a data
/// directory of verified cache files. It shows what the tar holds; a container (overlayfs
/// with the data directory as a data-only lower layer) reads every file, changes files of
/// it (copy-up) and runs programs from it, without a single read reaching FUSE; the FUSE
/// mount still serves; unmounting removes both mounts and the files. One layer becomes local by its background fetch
/// (small chunks: files of many chunks, assembled), the other by being read.
#[test]
fn a_layer_whose_content_is_local_is_served_without_fuse() {
    let root = tempfile::tempdir().unwrap();
    let small = ConvertOptions {
        chunk_size: SMALL_CHUNK,
        ..Default::default()
    };
    let level1 = ConvertOptions {
        compression_level: 1,
        ..Default::default()
    };
    let cases = [
        (synthetic_tar(), small, FetchOptions::default()),
        (real_rootfs_tar(root.path()), level1, on_demand_only(true)),
    ];
    for (tar, opts, fetch) in cases {
        let background = fetch.background;
        let mut layer = mount_layer_with(tar, &opts, &fetch);
        let mnt = layer.mountpoint();
        let local = layer._dir.path().join("cache").join("local");
        let m = layer.mounted.as_ref().unwrap();
        if background {
            m.serve_locally(&local);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while m.local_form().is_none() {
                assert!(std::time::Instant::now() < deadline, "never served locally");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        } else {
            // Builds left unmounted by a process that is gone (their hard links would
            // pin cache files) are removed at the next build; a running process's stay.
            let gone = {
                let mut child = std::process::Command::new("true").spawn().unwrap();
                child.wait().unwrap();
                child.id()
            };
            let stale = local.join(format!("{gone}-1"));
            let running = local.join(format!("{}-1", std::process::id()));
            for d in [&stale, &running] {
                std::fs::create_dir_all(d.join("data")).unwrap();
                std::fs::write(d.join("data").join("x"), b"x").unwrap();
            }
            // Asked before anything is local, without a background fetch: nothing happens.
            m.serve_locally(&local);
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert_eq!(m.local_form(), None);
            // Read whole, the layer became local by reads alone: served without FUSE
            // after a quiet second.
            assert_same_tree(&layer.extracted, &mnt, &layer.headers);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while m.local_form().is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "read whole, never served locally"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            assert!(m.serve_locally_now(&local).unwrap(), "already served");
            assert!(!stale.exists(), "a dead process's build was left");
            assert!(running.join("data").join("x").exists());
            std::fs::remove_dir_all(&running).unwrap();
        }
        let form = m.local_form().expect("served without FUSE");
        assert!(is_local_mount(&form.meta));
        assert_eq!(
            local_form_of(&local),
            Some(form.clone()),
            "found in the mount table"
        );
        let (meta, data) = (form.meta, form.data);
        let read_before = m
            .stats()
            .read_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        drop_caches();
        let n = assert_same_tree_in(&layer.extracted, &meta, &layer.headers, Some(&data));
        assert!(n >= 36, "compared {n} paths");
        // The image holds metadata and small files (3 KiB or less); other content stays
        // in the cache's files, which the image's files redirect to.
        let image = std::fs::metadata(data.parent().unwrap().join("layer.erofs")).unwrap();
        let (mut small, mut large) = (0u64, 0u64);
        for (name, e) in &layer.headers {
            let path = meta.join(name);
            // Whiteouts are not shown as such.
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !md.file_type().is_file() || md.len() == 0 {
                continue;
            }
            let redirect = xattrs(&path).contains_key("trusted.overlay.redirect");
            let len = e.content.len() as u64;
            if len <= 3 << 10 {
                small += len;
            } else {
                large += len;
            }
            assert_eq!(redirect, len > 3 << 10, "{name}: {len} bytes, redirected");
        }
        assert!(small > 0 && large > 0, "{small} and {large} bytes");
        assert!(
            image.len() < small * 2 + large / 4,
            "{} bytes of image for {small} small and {large} large",
            image.len()
        );
        let ovl = Overlay::with_data(&[&meta], &[&data]);
        let files = container_files(&layer.headers);
        for (name, content) in &files {
            let read = std::fs::read(ovl.merged.join(name)).unwrap();
            assert!(
                &read == content,
                "{name}: content through the container's overlay"
            );
        }
        // Copy-up of each kind.
        let small: Vec<&(String, Vec<u8>)> = files.iter().filter(|(_, c)| c.len() > 1).collect();
        change_each_kind(&ovl.merged, &small);
        assert_changed(&ovl.merged, &small);
        if !background {
            // Programs run from it, as in a container.
            let out = std::process::Command::new("chroot")
                .arg(&ovl.merged)
                .args(["/bin/sh", "-c", "ls /usr/bin/python3.11 && echo ran"])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout).ends_with("ran\n"),
                "{out:?}"
            );
        }
        drop(ovl);
        let m = layer.mounted.as_ref().unwrap();
        assert_eq!(
            m.stats()
                .read_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            read_before,
            "no read reached FUSE"
        );
        // The FUSE mount stays, for containers that use it.
        let (name, content) = &files[files.len() / 2];
        assert!(
            &std::fs::read(mnt.join(name)).unwrap() == content,
            "{name} through FUSE"
        );
        layer.mounted.take().unwrap().unmount().unwrap();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        for gone in [&mnt, &meta] {
            assert!(
                !mounts.lines().any(|l| l.split(' ').nth(1) == gone.to_str()),
                "{mounts}"
            );
        }
        assert!(!data.exists(), "the data directory is removed");
    }
}

/// `tar` mounted (background fetch off), read whole through FUSE and checked, then served
/// without FUSE at once: the layer, its local form, and how many paths the local form's
/// check compared (after the page cache was dropped).
fn served_locally(tar: Vec<u8>) -> (Layer, LocalForm, usize) {
    let layer = mount_layer_with(tar, &ConvertOptions::default(), &on_demand_only(true));
    assert_same_tree(&layer.extracted, &layer.mountpoint(), &layer.headers);
    let m = layer.mounted.as_ref().unwrap();
    let local = layer._dir.path().join("cache").join("local");
    assert!(m.serve_locally_now(&local).unwrap());
    let form = m.local_form().unwrap();
    drop_caches();
    let n = assert_same_tree_in(
        &layer.extracted,
        &form.meta,
        &layer.headers,
        Some(&form.data),
    );
    (layer, form, n)
}

/// A local layer's image holds small files up to 32 MiB of them in all (the build keeps
/// them in memory); the rest are redirected to the data directory like larger files, and
/// every file reads as in the tar either way.
#[test]
fn a_local_layer_holds_at_most_32_mib_of_small_files_in_its_image() {
    const FILES: usize = 12_000;
    const SIZE: usize = 3 << 10;
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..FILES {
        let mut data = format!("{i:08}").into_bytes().repeat(SIZE / 8);
        data.truncate(SIZE);
        estargz_testutil::append_file(&mut b, &format!("d{}/f{i:05}", i % 16), &data);
    }
    let (mut layer, form, n) = served_locally(b.into_inner().unwrap());
    assert!(n >= FILES, "compared {n} paths");
    let held = layer
        .headers
        .keys()
        .filter(|name| {
            let path = form.meta.join(name);
            path.is_file() && !xattrs(&path).contains_key("trusted.overlay.redirect")
        })
        .count();
    assert_eq!(held, (32 << 20) / SIZE, "files held in the image");
    let image = std::fs::metadata(form.data.parent().unwrap().join("layer.erofs")).unwrap();
    // At most a block per file held (a 3 KiB file and its inode leave too little of a
    // block for another), and little else.
    assert!(
        image.len() < (held as u64) * 4096 + (4 << 20),
        "{} bytes of image",
        image.len()
    );
    layer.mounted.take().unwrap().unmount().unwrap();
}

/// The EROFS image of a local layer keeps directories whose names sort around `.` and
/// `..`, span several directory blocks, or are as long as names get; looked up and listed
/// through the kernel, they read like the tar.
#[test]
fn a_local_layer_keeps_names_that_sort_around_dots_and_fill_blocks() {
    let mut b = tar::Builder::new(Vec::new());
    for name in [
        "!bang", "#hash", "+plus", "-dash", ".dot", "..dots", "a", "~tilde", "é",
    ] {
        estargz_testutil::append_file(&mut b, &format!("odd/{name}"), name.as_bytes());
    }
    for i in 0..700 {
        estargz_testutil::append_file(
            &mut b,
            &format!("many/entry-number-{i:05}"),
            format!("{i}").as_bytes(),
        );
    }
    estargz_testutil::append_file(&mut b, &format!("long/{}", "n".repeat(255)), b"long name");
    estargz_testutil::append_file(&mut b, "empty", b"");
    // A small file whose attributes leave no room for its content in its inode's block:
    // the image holds it in a block of its own.
    let big = vec![b'x'; 2000];
    estargz_testutil::pax(&mut b, &[("SCHILY.xattr.user.big", &big[..])]);
    estargz_testutil::append_file(&mut b, "outside", &[b'o'; 3000]);
    let (mut layer, form, n) = served_locally(b.into_inner().unwrap());
    assert!(n > 710, "compared {n} paths");
    let names: Vec<String> = std::fs::read_dir(form.meta.join("odd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 9, "{names:?}");
    let outside = form.meta.join("outside");
    assert!(!xattrs(&outside).contains_key("trusted.overlay.redirect"));
    assert_eq!(std::fs::read(&outside).unwrap(), vec![b'o'; 3000]);
    layer.mounted.take().unwrap().unmount().unwrap();
}

/// The blob of `tar` whose TOC has `edit` applied to its JSON text.
fn blob_with_toc_edited(tar: &[u8], edit: impl Fn(String) -> String) -> Vec<u8> {
    let mut blob = Vec::new();
    convert(tar, &mut blob, &ConvertOptions::default(), &()).unwrap();
    let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let off = r.footer().toc_offset;
    let member = &blob[off as usize..blob.len() - estargz_format::FOOTER_SIZE];
    let json = estargz_format::decode_toc_member(member, off, &Default::default()).unwrap();
    let edited = edit(String::from_utf8(json).unwrap());
    let mut out = blob[..off as usize].to_vec();
    out.extend_from_slice(&estargz_testutil::toc_tail(off, edited.as_bytes(), None));
    out
}

/// The node's chunk cache is keyed by digest and shared by every layer. A TOC that gives
/// a chunk another layer cached a size its content does not have gets EIO for that file
/// (it was a panic of a FUSE thread, and with passthrough the cached file of the wrong
/// length), and the mount keeps serving its other files.
#[test]
fn a_toc_misstating_the_size_of_a_cached_chunk_reads_eio_and_the_mount_keeps_serving() {
    let genuine = estargz_testutil::noise(100, 1);
    let mut a = mount_layer_with(
        estargz_testutil::one_file_tar("a", &genuine),
        &ConvertOptions::default(),
        &on_demand_only(true),
    );
    assert_eq!(std::fs::read(a.mountpoint().join("a")).unwrap(), genuine);
    let cached = estargz_format::Sha256Digest::of(&genuine);
    assert!(a.cache.contains(&cached));
    let claimed = estargz_testutil::noise(200, 2);
    let tar = estargz_testutil::files_tar(&[("b", &claimed), ("c", b"still served")]);
    let own = estargz_format::Sha256Digest::of(&claimed).to_string();
    let lying = blob_with_toc_edited(&tar, |json| {
        assert!(json.contains(&own));
        json.replace(&own, &cached.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let blob_path = dir.path().join("lying.esgz");
    std::fs::write(&blob_path, &lying).unwrap();
    let toc = EstargzReader::open(&lying[..], &OpenOptions::default())
        .unwrap()
        .toc()
        .clone();
    for passthrough in [true, false] {
        let fs = LayerFs::new(
            &toc,
            Arc::new(FileSource::open(&blob_path).unwrap()),
            a.cache.clone(),
            FetchScheduler::new(on_demand_only(passthrough)),
        );
        let mnt = dir.path().join(format!("mnt-{passthrough}"));
        std::fs::create_dir(&mnt).unwrap();
        let m = mount(fs, &mnt).unwrap();
        for _ in 0..2 {
            let err = std::fs::read(mnt.join("b")).expect_err("a chunk of the wrong size");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
            assert_eq!(std::fs::read(mnt.join("c")).unwrap(), b"still served");
        }
        assert_eq!(std::fs::metadata(mnt.join("b")).unwrap().len(), 200);
        m.unmount().unwrap();
    }
    a.mounted.take().unwrap().unmount().unwrap();
}
