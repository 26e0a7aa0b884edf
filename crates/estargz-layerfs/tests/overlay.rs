//! Lazily mounted layers stacked with overlayfs (plus an upperdir) behave like the image
//! unpacked: whiteouts hide files, opaque directories hide lower content, copy-up works.

use std::path::Path;
use std::sync::Arc;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions};
use estargz_layerfs::{mount, FetchOptions, FetchScheduler, FileSource, LayerFs, MountedLayer};

fn layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        match content {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            Some(data) => {
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn mount_blob(dir: &Path, name: &str, tar: &[u8], cache: Arc<ChunkCache>) -> MountedLayer {
    let mut blob = Vec::new();
    convert(tar, &mut blob, &ConvertOptions::default(), &()).unwrap();
    let path = dir.join(format!("{name}.esgz"));
    std::fs::write(&path, &blob).unwrap();
    let toc = EstargzReader::open(&blob[..], &OpenOptions::default())
        .unwrap()
        .toc()
        .clone();
    estargz_testutil::require_root_and_fuse("the overlay tests");
    let mnt = dir.join(name);
    std::fs::create_dir(&mnt).unwrap();
    mount(
        LayerFs::new(
            &toc,
            Arc::new(FileSource::open(&path).unwrap()),
            cache,
            FetchScheduler::new(FetchOptions::default()),
        ),
        &mnt,
    )
    .expect("FUSE mount")
}

#[test]
fn overlay_of_lazy_layers_behaves_like_the_unpacked_image() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: dir.path().join("cache"),
        max_bytes: 1 << 30,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }));
    let base = layer(&[
        ("a/", None),
        ("a/x", Some(b"x from base")),
        ("a/y", Some(b"y from base")),
        ("b/", None),
        ("b/old", Some(b"old")),
        ("keep", Some(b"v1")),
    ]);
    let middle = layer(&[
        ("a/", None),
        ("a/.wh.x", Some(b"")),
        ("b/", None),
        ("b/.wh..wh..opq", Some(b"")),
        ("b/new", Some(b"new")),
        ("middle-file", Some(b"m")),
    ]);
    let top = layer(&[("keep", Some(b"v2 from top"))]);
    let l1 = mount_blob(dir.path(), "l1", &base, cache.clone());
    let l2 = mount_blob(dir.path(), "l2", &middle, cache.clone());
    let l3 = mount_blob(dir.path(), "l3", &top, cache);
    let overlay =
        estargz_testutil::Overlay::new(&[l3.mountpoint(), l2.mountpoint(), l1.mountpoint()]);
    let (merged, upper) = (overlay.merged.clone(), overlay.upper());
    let read = |p: &str| std::fs::read(merged.join(p)).ok();

    // Whiteouts hide, opaque directories hide lower content, upper layers win.
    assert_eq!(read("a/x"), None, "whiteout must hide a/x");
    assert_eq!(read("a/y").as_deref(), Some(&b"y from base"[..]));
    assert_eq!(read("b/old"), None, "opaque b/ must hide the base's b/old");
    assert_eq!(read("b/new").as_deref(), Some(&b"new"[..]));
    assert_eq!(read("keep").as_deref(), Some(&b"v2 from top"[..]));
    assert_eq!(read("middle-file").as_deref(), Some(&b"m"[..]));
    let mut listing: Vec<String> = std::fs::read_dir(&merged)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(listing, ["a", "b", "keep", "middle-file"]);

    // Copy-up: lower files become writable in the container; the layers do not change.
    std::fs::write(merged.join("a/y"), b"y changed").unwrap();
    assert_eq!(read("a/y").as_deref(), Some(&b"y changed"[..]));
    assert_eq!(
        std::fs::read(l1.mountpoint().join("a/y")).unwrap(),
        b"y from base"
    );
    std::fs::write(merged.join("fresh"), b"new file").unwrap();
    std::fs::remove_file(merged.join("keep")).unwrap();
    assert_eq!(read("keep"), None);
    assert!(upper.join("fresh").exists() && upper.join("a/y").exists());
    drop(overlay);
    for l in [l3, l2, l1] {
        l.unmount().unwrap();
    }
}
