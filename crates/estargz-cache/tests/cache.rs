//! The chunk cache: round trips, eviction, restarts, damage, single flight, full disks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::Sha256Digest;

fn chunk(seed: u8, len: usize) -> (Sha256Digest, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    (Sha256Digest::of(&data), data)
}

fn config(root: &std::path::Path, max: u64) -> CacheConfig {
    CacheConfig {
        root: root.to_path_buf(),
        max_bytes: max,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }
}

fn open(root: &std::path::Path, max: u64) -> ChunkCache {
    ChunkCache::open(&config(root, max))
}

#[derive(Debug)]
struct Boom;
impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registry unreachable")
    }
}
impl std::error::Error for Boom {}

#[test]
fn stores_serves_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let (d, data) = chunk(1, 1000);
    assert!(cache.get(&d).is_none());
    let got = cache
        .get_or_fetch(&d, || Ok::<_, Boom>(data.clone()))
        .unwrap();
    assert_eq!(&got[..], &data[..]);
    let again = cache
        .get_or_fetch(&d, || -> Result<Vec<u8>, Boom> { panic!("must not fetch") })
        .unwrap();
    assert_eq!(&again[..], &data[..]);
    let s = cache.stats();
    assert_eq!(
        (s.fetches, s.inserts, s.entries, s.usage_bytes),
        (1, 1, 1, 1000)
    );
    assert!(s.hits >= 1 && s.misses >= 1);
}

#[test]
fn tiny_cap_evicts_and_still_serves_correct_data() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 2500);
    let chunks: Vec<_> = (0..10).map(|i| chunk(i, 1000)).collect();
    for _ in 0..3 {
        for (d, data) in &chunks {
            let got = cache
                .get_or_fetch(d, || Ok::<_, Boom>(data.clone()))
                .unwrap();
            assert_eq!(&got[..], &data[..]);
        }
    }
    let s = cache.stats();
    assert!(s.usage_bytes <= 2500 && s.entries <= 2, "{s:?}");
    assert!(s.evictions >= 20, "{s:?}");
    // Only the cached chunks are on disk.
    let files: usize = std::fs::read_dir(dir.path().join("chunks"))
        .unwrap()
        .map(|f| std::fs::read_dir(f.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(files as u64, s.entries);
    // A chunk larger than the cap is served but not stored.
    let (d, big) = chunk(99, 4000);
    assert_eq!(
        &cache
            .get_or_fetch(&d, || Ok::<_, Boom>(big.clone()))
            .unwrap()[..],
        &big[..]
    );
    assert!(!cache.contains(&d));
}

#[test]
fn restart_reuses_chunks_and_drops_partial_writes() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..5).map(|i| chunk(i, 300)).collect();
    {
        let cache = open(dir.path(), 1 << 20);
        for (d, data) in &chunks {
            cache.insert(d, data);
        }
    }
    // An interrupted write left behind, and a stray file.
    std::fs::write(dir.path().join("tmp/partial.1.2"), b"half a chunk").unwrap();
    std::fs::write(dir.path().join("chunks/zz"), b"").unwrap_or(());
    let cache = open(dir.path(), 1 << 20);
    assert_eq!(cache.stats().entries, 5);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    for (d, data) in &chunks {
        let got = cache.get_or_fetch(d, || -> Result<Vec<u8>, Boom> {
            panic!("refetched after restart")
        });
        assert_eq!(&got.unwrap()[..], &data[..]);
    }
    // Reopening with a smaller cap evicts down to it.
    drop(cache);
    let small = open(dir.path(), 700);
    assert!(small.stats().usage_bytes <= 700);
}

fn open_in_boot(root: &std::path::Path, boot: &str) -> ChunkCache {
    ChunkCache::open_in_boot(&config(root, 1 << 20), Some(boot.to_string()))
}

fn file_of(root: &std::path::Path, d: &Sha256Digest) -> std::path::PathBuf {
    let hex = d.hex();
    root.join("chunks").join(&hex[..2]).join(&hex)
}

#[test]
fn damaged_chunks_are_never_served_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_in_boot(dir.path(), "boot-1");
    let (d, data) = chunk(7, 2048);
    cache.insert(&d, &data);
    drop(cache);
    // A crash: the file was renamed into place but its data never reached the disk. After
    // the reboot (another boot ID), the whole read finds it.
    let path = file_of(dir.path(), &d);
    let mut bad = std::fs::read(&path).unwrap();
    bad[100] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let cache = open_in_boot(dir.path(), "boot-2");
    assert!(cache.read_verified(&d, 0, 10).is_none());
    assert!(cache.open_verified(&d).is_none());
    assert!(cache.get(&d).is_none());
    assert_eq!(cache.stats().corrupt, 1);
    assert!(!path.exists(), "the damaged file is removed");
    // A truncated file (torn write) likewise.
    cache.insert(&d, &data);
    drop(cache);
    std::fs::write(&path, &data[..10]).unwrap();
    let cache = open_in_boot(dir.path(), "boot-3");
    let got = cache
        .get_or_fetch(&d, || Ok::<_, Boom>(data.clone()))
        .unwrap();
    assert_eq!(&got[..], &data[..]);
    assert_eq!(cache.stats().fetches, 1, "fetched again");
}

#[test]
fn a_chunk_verified_in_this_boot_is_not_hashed_again_by_the_next_process() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = chunk(9, 5000);
    let cache = open_in_boot(dir.path(), "boot-1");
    cache.insert(&d, &data);
    drop(cache);
    // The next process of the same boot (a daemon restart) reads parts at once.
    let cache = open_in_boot(dir.path(), "boot-1");
    assert_eq!(
        cache.read_verified(&d, 10, 20).as_deref(),
        Some(&data[10..30])
    );
    drop(cache);
    // After a reboot, the first read hashes the file whole and marks it again.
    let cache = open_in_boot(dir.path(), "boot-2");
    assert!(cache.read_verified(&d, 10, 20).is_none());
    assert_eq!(cache.get(&d).as_deref(), Some(&data[..]));
    drop(cache);
    let cache = open_in_boot(dir.path(), "boot-2");
    assert_eq!(cache.read_verified(&d, 0, 5).as_deref(), Some(&data[..5]));
    // Without a boot ID, nothing is trusted across processes.
    drop(cache);
    let cache = ChunkCache::open_in_boot(&config(dir.path(), 1 << 20), None);
    assert!(cache.read_verified(&d, 0, 5).is_none());
    assert_eq!(cache.get(&d).as_deref(), Some(&data[..]));
    assert_eq!(cache.read_verified(&d, 0, 5).as_deref(), Some(&data[..5]));
}

#[test]
fn concurrent_readers_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), 1 << 20));
    let (d, data) = chunk(3, 50_000);
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (cache, calls, start, data) =
                (cache.clone(), calls.clone(), start.clone(), data.clone());
            std::thread::spawn(move || {
                start.wait();
                cache
                    .get_or_fetch(&d, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(300));
                        Ok::<_, Boom>(data)
                    })
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(&h.join().unwrap()[..], &data[..]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().fetches, 1);
}

#[test]
fn failed_fetches_are_shared_and_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), 1 << 20));
    let (d, data) = chunk(4, 100);
    let start = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (cache, start) = (cache.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                cache.get_or_fetch(&d, || {
                    std::thread::sleep(Duration::from_millis(200));
                    Err::<Vec<u8>, _>(Boom)
                })
            })
        })
        .collect();
    for h in handles {
        let e = h.join().unwrap().unwrap_err();
        assert_eq!(e.to_string(), "registry unreachable");
    }
    // The next reader fetches again and succeeds.
    assert_eq!(
        &cache
            .get_or_fetch(&d, || Ok::<_, Boom>(data.clone()))
            .unwrap()[..],
        &data[..]
    );
}

#[test]
fn unwritable_root_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let cache = open(&not_a_dir, 1 << 20);
    let (d, data) = chunk(5, 100);
    assert_eq!(
        &cache
            .get_or_fetch(&d, || Ok::<_, Boom>(data.clone()))
            .unwrap()[..],
        &data[..]
    );
    assert_eq!(cache.stats().write_errors, 1);
}

/// Unmounts on drop, even when the test fails.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_still_serves() {
    // A real full file system: a 64 KiB tmpfs (the tests run as root).
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(st.success(), "mounting a tmpfs needs root");
    let _guard = Mount(mnt.clone());
    let cache = open(&mnt, 10 << 20);
    let chunks: Vec<_> = (0..8).map(|i| chunk(i, 30_000)).collect();
    for (d, data) in &chunks {
        let got = cache
            .get_or_fetch(d, || Ok::<_, Boom>(data.clone()))
            .unwrap();
        assert_eq!(&got[..], &data[..]);
    }
    let s = cache.stats();
    assert!(s.write_errors >= 1, "{s:?}");
    assert!(s.inserts >= 1, "{s:?}");
    // Nothing partial is left in the cache's directories.
    assert_eq!(std::fs::read_dir(mnt.join("tmp")).unwrap().count(), 0);
    for (d, data) in &chunks {
        if let Some(got) = cache.get(d) {
            assert_eq!(&got[..], &data[..]);
        }
    }
}

#[test]
fn claimed_spans_are_waited_for_not_fetched_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), 1 << 20));
    let (a, da) = chunk(10, 500);
    let (b, db) = chunk(11, 500);
    let (c, dc) = chunk(12, 500);
    cache.insert(&c, &dc);
    // A span fetch claims a and b (c is cached already, a twice is claimed once).
    let mut claim = cache.claim(&[a, b, c, a]);
    assert!(claim.has(&a) && claim.has(&b) && !claim.has(&c));
    assert!(
        cache.claim(&[a, b]).is_empty(),
        "claimed chunks cannot be claimed again"
    );
    let fetched = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (cache, fetched) = (cache.clone(), fetched.clone());
        std::thread::spawn(move || {
            cache.get_or_fetch(&a, || {
                fetched.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Boom>(vec![0])
            })
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    claim.fulfil(&a, &da);
    assert_eq!(&reader.join().unwrap().unwrap()[..], &da[..]);
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        0,
        "the reader waited for the span"
    );
    // b's span fails (the claim is dropped): a waiting reader fetches b itself.
    let reader = {
        let (cache, db) = (cache.clone(), db.clone());
        std::thread::spawn(move || cache.get_or_fetch(&b, || Ok::<_, Boom>(db)))
    };
    std::thread::sleep(Duration::from_millis(100));
    drop(claim);
    assert_eq!(&reader.join().unwrap().unwrap()[..], &db[..]);
    assert_eq!(&cache.get(&b).unwrap()[..], &db[..]);
}

#[test]
fn memory_tier_is_bounded_and_least_recently_used_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(&CacheConfig {
        root: dir.path().to_path_buf(),
        max_bytes: 1 << 20,
        memory_bytes: 2500,
    });
    let (a, b, c) = (chunk(1, 1000), chunk(2, 1000), chunk(3, 1000));
    cache.memory_put(a.0, a.1.clone().into());
    cache.memory_put(b.0, b.1.clone().into());
    assert_eq!(cache.memory_get(&a.0).as_deref(), Some(&a.1[..]));
    // a was used last: b goes to make room for c.
    cache.memory_put(c.0, c.1.clone().into());
    assert!(cache.memory_get(&b.0).is_none());
    assert_eq!(cache.memory_get(&c.0).as_deref(), Some(&c.1[..]));
    assert_eq!(cache.stats().memory_bytes, 2000);
    assert_eq!(cache.stats().memory_hits, 2);
    // Putting the same chunk again does not count it twice; a chunk over the cap is not kept.
    cache.memory_put(c.0, c.1.clone().into());
    assert_eq!(cache.stats().memory_bytes, 2000);
    let big = chunk(4, 3000);
    cache.memory_put(big.0, big.1.into());
    assert!(cache.memory_get(&big.0).is_none());
    // The memory tier is not the disk cache.
    assert!(cache.get(&a.0).is_none());
}

#[test]
fn parts_are_read_directly_only_from_trusted_files() {
    let dir = tempfile::tempdir().unwrap();
    let (d, data) = chunk(5, 5000);
    {
        let cache = open_in_boot(dir.path(), "boot-1");
        cache.insert(&d, &data);
        // Written by this process from verified bytes: trusted.
        assert_eq!(
            cache.read_verified(&d, 10, 20).as_deref(),
            Some(&data[10..30])
        );
        assert_eq!(
            cache.read_verified(&d, 4990, 10).as_deref(),
            Some(&data[4990..])
        );
        assert!(cache.read_verified(&d, 4995, 10).is_none(), "past the end");
    }
    // After a reboot the first read is whole and hashed: a file torn or damaged while the
    // machine was down is found.
    let path = file_of(dir.path(), &d);
    let mut damaged = data.clone();
    damaged[100] ^= 1;
    std::fs::write(&path, &damaged).unwrap();
    let cache = open_in_boot(dir.path(), "boot-2");
    assert!(cache.read_verified(&d, 100, 1).is_none());
    assert!(cache.get(&d).is_none());
    assert!(cache.read_verified(&d, 100, 1).is_none());
}

#[test]
fn a_panicking_fetch_releases_its_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), 1 << 20));
    let (d, data) = chunk(7, 1000);
    let started = Arc::new(Barrier::new(2));
    let leader = {
        let (cache, started) = (cache.clone(), started.clone());
        std::thread::spawn(move || {
            let _ = cache.get_or_fetch(&d, || -> Result<Vec<u8>, Boom> {
                started.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!("a bug in a fetch")
            });
        })
    };
    started.wait();
    // A reader waiting for the panicking fetch is woken and fetches itself.
    let waiter = {
        let (cache, data) = (cache.clone(), data.clone());
        std::thread::spawn(move || cache.get_or_fetch(&d, || Ok::<_, Boom>(data)))
    };
    assert!(leader.join().is_err(), "the fetch panicked");
    let got = waiter.join().unwrap().unwrap();
    assert_eq!(&got[..], &data[..]);
    // Later readers are not held by a stale in-flight entry either.
    let (d2, data2) = chunk(8, 10);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache.get_or_fetch(&d2, || -> Result<Vec<u8>, Boom> { panic!("again") })
    }));
    assert!(r.is_err());
    let got = cache
        .get_or_fetch(&d2, || Ok::<_, Boom>(data2.clone()))
        .unwrap();
    assert_eq!(&got[..], &data2[..]);
}

#[test]
fn the_cache_is_private_and_comes_back_when_removed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = open(&root, 1 << 20);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&root),
        0o700,
        "an existing cache directory is made private"
    );
    let (d, data) = chunk(3, 1000);
    cache.insert(&d, &data);
    let mut files = vec![];
    for e in walk(&root) {
        let m = mode(&e);
        if e.is_dir() {
            assert_eq!(m, 0o700, "{}", e.display());
        } else {
            assert_eq!(m, 0o600, "{}", e.display());
            files.push(e);
        }
    }
    assert_eq!(files.len(), 1);
    // Removed under a running cache: the next write makes it again.
    std::fs::remove_dir_all(&root).unwrap();
    let (d2, data2) = chunk(4, 1000);
    cache.insert(&d2, &data2);
    assert_eq!(cache.stats().write_errors, 0);
    assert_eq!(&cache.get(&d2).unwrap()[..], &data2[..]);
    assert_eq!(mode(&root), 0o700);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// A chunk file not yet verified in this boot is hashed when it is opened for a reader of
/// the file (passthrough, assembly): the file handed out still reads from its start, and
/// the next open needs no hash.
#[test]
fn a_chunk_hashed_at_open_reads_from_its_start() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cache = open_in_boot(dir.path(), "boot-1");
    let (a, da) = chunk(1, 3000);
    let (b, db) = chunk(2, 2000);
    cache.insert(&a, &da);
    cache.insert(&b, &db);
    drop(cache);
    let cache = open_in_boot(dir.path(), "boot-2");
    let mut got = Vec::new();
    let mut f = cache.open_verified(&a).expect("intact");
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, da);
    // Assembly reads its parts through the same path.
    let whole: Vec<u8> = [db.clone(), da.clone()].concat();
    let mut f = cache
        .assemble(&Sha256Digest::of(&whole), &[b, a])
        .expect("assembled from parts hashed at open");
    got.clear();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, whole);
    // Marked for this boot: another process of it trusts the file without hashing
    // (`read_verified` serves trusted chunks only).
    assert_eq!(cache.stats().corrupt, 0);
    drop(cache);
    let cache = open_in_boot(dir.path(), "boot-2");
    assert_eq!(&cache.read_verified(&a, 10, 5).unwrap()[..], &da[10..15]);
}

#[test]
fn files_of_several_chunks_are_assembled_once_checked_and_evicted_like_chunks() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let (a, da) = chunk(1, 3000);
    let (b, db) = chunk(2, 2000);
    cache.insert(&a, &da);
    cache.insert(&b, &db);
    let whole: Vec<u8> = [da.clone(), db.clone(), da.clone()].concat();
    let digest = Sha256Digest::of(&whole);
    let usage = cache.stats().usage_bytes;
    let mut f = cache.assemble(&digest, &[a, b, a]).expect("assembled");
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, whole);
    assert_eq!(
        cache.stats().usage_bytes,
        usage + whole.len() as u64,
        "accounted"
    );
    // Once: asked again, the same file.
    let inserts = cache.stats().inserts;
    assert!(cache.assemble(&digest, &[a, b, a]).is_some());
    assert_eq!(cache.stats().inserts, inserts);
    // A digest the parts do not hash to (a lying TOC) gets nothing, and nothing is kept.
    let wrong = Sha256Digest::of(b"something else");
    assert!(cache.assemble(&wrong, &[a, b]).is_none());
    assert!(!cache.contains(&wrong));
    // A missing part likewise.
    let (c, _) = chunk(3, 10);
    assert!(cache
        .assemble(&Sha256Digest::of(b"not cached"), &[c])
        .is_none());
    // Evicted like a chunk: a cache too small for it keeps it out.
    drop(cache);
    let tiny = open(dir.path(), 6000);
    assert!(tiny.stats().usage_bytes <= 6000);
}

#[test]
fn files_linked_by_a_mounted_layer_are_kept_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 2500);
    let (a, da) = chunk(1, 1000);
    let (b, db) = chunk(2, 1000);
    cache.insert(&a, &da);
    cache.insert(&b, &db);
    // `a` is linked (as a layer served without FUSE links it) and the least recently used.
    let links = dir.path().join("layer-data");
    std::fs::create_dir(&links).unwrap();
    assert!(cache.link_verified(&a, &links.join("a")).unwrap());
    let (c, dc) = chunk(3, 1000);
    cache.insert(&c, &dc);
    // Removing `a` would free nothing: `b` goes instead.
    assert!(cache.contains(&a), "linked file kept");
    assert!(!cache.contains(&b), "the next least recently used evicted");
    assert!(file_of(dir.path(), &a).exists());
    assert!(!file_of(dir.path(), &b).exists());
    assert_eq!(
        cache.stats().usage_bytes,
        2000,
        "the linked file is counted"
    );
    assert_eq!(cache.get(&a).as_deref(), Some(&da[..]));
    // Both files linked: a new chunk is what goes.
    assert!(cache.link_verified(&c, &links.join("c")).unwrap());
    let (d, dd) = chunk(4, 1000);
    cache.insert(&d, &dd);
    assert!(cache.contains(&a) && cache.contains(&c) && !cache.contains(&d));
    assert_eq!(cache.stats().usage_bytes, 2000);
    // Reopened with a cap below them: kept, over the cap, until unlinked.
    drop(cache);
    let cache = open(dir.path(), 1500);
    assert!(cache.contains(&a) && cache.contains(&c));
    assert_eq!(cache.stats().usage_bytes, 2000);
    drop(cache);
    let cache = open(dir.path(), 2500);
    // Unlinked (the layer unmounted): evicted like any file.
    std::fs::remove_dir_all(&links).unwrap();
    let (e, de) = chunk(5, 1000);
    cache.insert(&e, &de);
    cache.insert(&d, &dd);
    let s = cache.stats();
    assert!(s.usage_bytes <= 2500, "{s:?}");
    assert!(cache.contains(&d) && cache.contains(&e));
}

/// Bytes this process has passed to `write` and its kin so far.
fn bytes_written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("wchar in /proc/self/io")
}

/// A hostile TOC can list one cached chunk any number of times (a file of terabytes from
/// one chunk): assembling it stops once it has written what the cache holds. A chunk is
/// held only with the size it has: another TOC can misstate it.
#[test]
fn assembling_stops_at_what_the_cache_holds_and_a_chunk_is_held_at_its_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let (a, da) = chunk(1, 3000);
    cache.insert(&a, &da);
    assert!(cache.holds(&a, 3000));
    assert!(!cache.holds(&a, 3001) && !cache.holds(&a, 2999));
    let parts = vec![a; 100_000];
    let before = bytes_written();
    let claimed = Sha256Digest::of(b"whatever the TOC says");
    assert!(cache.assemble(&claimed, &parts).is_none());
    let wrote = bytes_written() - before;
    assert!(wrote < 4 << 20, "wrote {wrote} bytes of a 300 MB file");
    assert!(!cache.contains(&claimed));
    assert!(cache.stats().usage_bytes <= 1 << 20);
}
