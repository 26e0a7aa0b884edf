//! Layers served by a real docker-registry (behind a fault-injecting proxy) and mounted
//! lazily: bytes fetched, cache reuse, faults, concurrency. Needs root and /dev/fuse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{convert, Chunk, ConvertOptions, Limits, Sha256Digest};
use estargz_layerfs::{
    load_toc, mount, FetchOptions, FetchScheduler, LayerFs, MountedLayer, RegistrySource,
    DEFAULT_READ_DEADLINE,
};
use estargz_oci::Digest;
use estargz_registry::{ClientConfig, ImageRef, RegistryClient, RetryPolicy};
use estargz_testutil::{
    elf_object, expected_from_tar, files_and_links_tar, files_tar, noise, synthetic_tar,
    BlobRequest, Fault, FaultProxy, TestRegistry, SMALL_CHUNK,
};

struct Remote {
    _reg: TestRegistry,
    proxy: FaultProxy,
    runtime: tokio::runtime::Runtime,
    client: Arc<RegistryClient>,
    dir: tempfile::TempDir,
}

impl Remote {
    fn start() -> Remote {
        Remote::start_with(Duration::from_secs(3))
    }

    /// With the registry client's timeout for one request.
    fn start_with(request_timeout: Duration) -> Remote {
        let reg = TestRegistry::start(None);
        let proxy = FaultProxy::start(&reg.addr);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let client = Arc::new(RegistryClient::new(ClientConfig {
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
            },
            request_timeout,
            ..Default::default()
        }));
        Remote {
            _reg: reg,
            proxy,
            runtime,
            client,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn image(&self) -> ImageRef {
        format!("{}/layers/test:v1", self.proxy.addr)
            .parse()
            .unwrap()
    }

    /// Converts `tar`, pushes the blob; returns (digest, size).
    fn push(&self, tar: &[u8], opts: &ConvertOptions) -> (Digest, u64) {
        let mut blob = Vec::new();
        convert(tar, &mut blob, opts, &()).unwrap();
        let digest = Digest::sha256_of(&blob);
        let path = self.dir.path().join(digest.hex());
        std::fs::write(&path, &blob).unwrap();
        self.runtime
            .block_on(self.client.push_blob(&self.image(), &digest, &path, None))
            .unwrap();
        (digest, blob.len() as u64)
    }

    fn cache(&self, name: &str, max: u64) -> Arc<ChunkCache> {
        Arc::new(ChunkCache::open(&CacheConfig {
            root: self.dir.path().join(name),
            max_bytes: max,
            memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
        }))
    }

    /// Mounts with prefetch and background fetch off, so that only reads fetch.
    fn mount(&self, blob: &(Digest, u64), cache: Arc<ChunkCache>, at: &str) -> MountedLayer {
        self.mount_with(blob, cache, at, &on_demand_only())
    }

    fn mount_with(
        &self,
        blob: &(Digest, u64),
        cache: Arc<ChunkCache>,
        at: &str,
        fetch: &FetchOptions,
    ) -> MountedLayer {
        self.mount_with_deadline(blob, cache, at, fetch, DEFAULT_READ_DEADLINE)
    }

    fn mount_with_deadline(
        &self,
        blob: &(Digest, u64),
        cache: Arc<ChunkCache>,
        at: &str,
        fetch: &FetchOptions,
        deadline: Duration,
    ) -> MountedLayer {
        let fs = self.layer(blob, cache, FetchScheduler::new(fetch.clone()), deadline);
        self.mount_at(fs, at)
    }

    /// Mounts on `scheduler` (kept by the caller, to look at the link or the node's
    /// counters).
    fn mount_on(
        &self,
        blob: &(Digest, u64),
        cache: Arc<ChunkCache>,
        at: &str,
        scheduler: Arc<FetchScheduler>,
    ) -> MountedLayer {
        self.mount_at(
            self.layer(blob, cache, scheduler, DEFAULT_READ_DEADLINE),
            at,
        )
    }

    /// Mounts with prefetch and background fetch off, over the layers `lowers` (nearest
    /// first), sharing their scheduler.
    fn mount_over(
        &self,
        blob: &(Digest, u64),
        cache: Arc<ChunkCache>,
        at: &str,
        lowers: &[&MountedLayer],
        scheduler: Arc<FetchScheduler>,
    ) -> MountedLayer {
        let fs = self.layer(blob, cache, scheduler, DEFAULT_READ_DEADLINE);
        let below: Vec<LayerFs> = lowers.iter().map(|l| l.fs().clone()).collect();
        fs.set_lowers(&below);
        self.mount_at(fs, at)
    }

    /// The pushed layer `blob`, its TOC loaded from the registry.
    fn layer(
        &self,
        blob: &(Digest, u64),
        cache: Arc<ChunkCache>,
        scheduler: Arc<FetchScheduler>,
        deadline: Duration,
    ) -> LayerFs {
        let source = RegistrySource::new(
            self.client.clone(),
            self.image(),
            blob.0.clone(),
            self.runtime.handle().clone(),
        )
        .with_deadline(deadline);
        let (toc, _) = load_toc(&source, blob.1, None, &Limits::default()).unwrap();
        LayerFs::new(&toc, Arc::new(source), cache, scheduler)
    }

    /// Mounts `fs` at `at` in the test's directory.
    fn mount_at(&self, fs: LayerFs, at: &str) -> MountedLayer {
        estargz_testutil::require_root_and_fuse("the FUSE mount tests");
        let mnt = self.dir.path().join(at);
        std::fs::create_dir_all(&mnt).unwrap();
        mount(fs, &mnt).expect("FUSE mount")
    }
}

/// Only reads fetch: no prefetch, no background fetch.
fn on_demand_only() -> FetchOptions {
    FetchOptions {
        prefetch: false,
        background: false,
        ..Default::default()
    }
}

/// Prefetch of the prioritized files, no background fetch.
fn prefetch_only() -> FetchOptions {
    FetchOptions {
        prefetch: true,
        background: false,
        ..Default::default()
    }
}

/// Conversion options that put `files` first, before the landmark.
fn prioritizing(files: &[&str]) -> ConvertOptions {
    ConvertOptions {
        prioritized_files: files.iter().map(|f| f.to_string()).collect(),
        ..small_opts()
    }
}

fn files(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
    expected_from_tar(tar)
        .into_iter()
        .filter(|(name, e)| {
            e.kind == estargz_format::EntryKind::Reg
                && !name.rsplit('/').next().unwrap().starts_with(".wh.")
        })
        .map(|(n, e)| (n, e.content))
        .collect()
}

fn small_opts() -> ConvertOptions {
    ConvertOptions {
        chunk_size: SMALL_CHUNK,
        compression_level: 1,
        ..Default::default()
    }
}

#[test]
fn reading_one_file_fetches_little_and_restarts_reuse_the_cache() {
    let r = Remote::start();
    let dir = tempfile::tempdir().unwrap();
    let tar = estargz_testutil::real_rootfs_tar(dir.path());
    let blob = r.push(
        &tar,
        &ConvertOptions {
            compression_level: 1,
            ..Default::default()
        },
    );
    let expected = files(&tar);
    let cache = r.cache("cache", 1 << 30);
    let before = r.proxy.blob_bytes_served();
    let m = r.mount(&blob, cache.clone(), "mnt");
    let toc_bytes = r.proxy.blob_bytes_served() - before;
    let name = "etc/debian_version";
    assert_eq!(
        std::fs::read(m.mountpoint().join(name)).unwrap(),
        expected[name]
    );
    let fetched = r.proxy.blob_bytes_served() - before - toc_bytes;
    assert!(
        fetched > 0 && fetched < 64 * 1024,
        "one small file fetched {fetched} bytes"
    );
    assert!(
        ((toc_bytes + fetched) as u64) < blob.1 / 20,
        "{toc_bytes} + {fetched} of {}",
        blob.1
    );
    m.unmount().unwrap();

    // A restarted cache (reopened from disk) serves what was read: no new fetch but the TOC.
    drop(cache);
    let cache = r.cache("cache", 1 << 30);
    let m = r.mount(&blob, cache, "mnt");
    let before = r.proxy.blob_bytes_served();
    assert_eq!(
        std::fs::read(m.mountpoint().join(name)).unwrap(),
        expected[name]
    );
    assert_eq!(
        r.proxy.blob_bytes_served() - before,
        0,
        "a cached file fetched bytes"
    );
    // Everything reads right, fetching each byte of the blob about once.
    for (f, content) in &expected {
        assert!(
            std::fs::read(m.mountpoint().join(f)).unwrap() == *content,
            "{f}"
        );
    }
    let total = r.proxy.blob_bytes_served() - before;
    assert!(
        total as u64 <= blob.1,
        "fetched {total} bytes for a {} byte blob",
        blob.1
    );
    m.unmount().unwrap();
}

#[test]
fn tiny_cache_and_shared_chunks() {
    let r = Remote::start();
    let tar = synthetic_tar();
    let expected = files(&tar);
    let blob = r.push(&tar, &small_opts());
    // A cache far smaller than the layer evicts and still serves correct data.
    let tiny = r.cache("tiny", 256 * 1024);
    let m = r.mount(&blob, tiny.clone(), "tiny-mnt");
    for _ in 0..2 {
        for (f, content) in &expected {
            assert!(
                std::fs::read(m.mountpoint().join(f)).unwrap() == *content,
                "{f}"
            );
        }
    }
    let stats = tiny.stats();
    assert!(
        stats.evictions > 0 && stats.usage_bytes <= 256 * 1024,
        "{stats:?}"
    );
    m.unmount().unwrap();

    // Another layer with the same files: its chunks are already cached.
    let mut more = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(&tar[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let path = e.path().unwrap().into_owned();
        let link = e.link_name().unwrap().map(|l| l.into_owned());
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if h.entry_type().is_pax_local_extensions() {
            continue;
        }
        match link {
            Some(l) => more.append_link(&mut h, &path, &l).unwrap(),
            None => more.append_data(&mut h, &path, &data[..]).unwrap(),
        }
    }
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    more.append_data(&mut h, "extra-file", &b"extra"[..])
        .unwrap();
    let tar2 = more.into_inner().unwrap();
    let blob2 = r.push(&tar2, &small_opts());
    assert_ne!(blob.0, blob2.0);
    let shared = r.cache("shared", 1 << 30);
    let m1 = r.mount(&blob, shared.clone(), "mnt-one");
    let m2 = r.mount(&blob2, shared, "mnt-two");
    let f = "srv/huge.bin";
    assert!(std::fs::read(m1.mountpoint().join(f)).unwrap() == expected[f]);
    let before = r.proxy.blob_bytes_served();
    assert!(std::fs::read(m2.mountpoint().join(f)).unwrap() == expected[f]);
    assert_eq!(
        r.proxy.blob_bytes_served() - before,
        0,
        "shared chunks were fetched twice"
    );
    m1.unmount().unwrap();
    m2.unmount().unwrap();
}

/// Reads `file` through `m`, checking it against `content`; returns the blob requests the
/// proxy saw from the `since`-th on, and the index of the one that read sent.
fn read_logged(
    r: &Remote,
    m: &MountedLayer,
    since: usize,
    file: &str,
    content: &[u8],
) -> (Vec<BlobRequest>, usize) {
    let target = m.fs().chunk_at(file, 0).unwrap();
    assert!(std::fs::read(m.mountpoint().join(file)).unwrap() == content);
    let log = r.proxy.blob_log()[since..].to_vec();
    let read = log
        .iter()
        .position(|q| q.range.as_ref().is_some_and(|g| g.start == target.offset))
        .expect("the read's range request");
    (log, read)
}

fn read(mnt: &Path, f: &str) -> std::io::Result<Vec<u8>> {
    std::fs::read(mnt.join(f))
}

#[test]
fn registry_faults_give_eio_or_correct_data_and_recover_without_remount() {
    let r = Remote::start();
    let tar = synthetic_tar();
    let expected = files(&tar);
    let blob = r.push(&tar, &small_opts());
    let cache = r.cache("cache", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt");
    let mnt: PathBuf = m.mountpoint().to_path_buf();
    let names: Vec<&String> = expected
        .keys()
        .filter(|n| !expected[*n].is_empty())
        .collect();
    let mut next = names.iter();
    // A file not local yet (a read also fetches its small neighbours).
    let mut next_remote = || {
        next.by_ref()
            .find(|f| {
                let first = m.fs().chunk_at(f, 0).unwrap();
                !cache.contains(&first.digest)
            })
            .expect("a file not fetched yet")
    };
    // Persistent faults: the reader gets an error, never wrong bytes.
    for fault in [
        Fault::Status(500),
        Fault::Reset,
        Fault::CorruptBody,
        Fault::Truncate,
    ] {
        r.proxy.set_always(Some(fault.clone()));
        let f = next_remote();
        match read(&mnt, f) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{fault:?}: {e}"),
            // A corrupted byte outside the chunk's own data (in tar headers sharing its gzip
            // member) leaves the chunk verifiable: then, and only then, data is served.
            Ok(data) => assert!(
                fault == Fault::CorruptBody && data == expected[*f],
                "{fault:?}: {f} read {} bytes through a broken registry",
                data.len()
            ),
        }
        // The registry recovers: the same mount reads the same file correctly.
        r.proxy.set_always(None);
        assert!(
            read(&mnt, f).unwrap() == expected[*f],
            "{fault:?}: {f} after recovery"
        );
    }
    // One-off faults are retried transparently.
    for fault in [
        Fault::Status(503),
        Fault::Reset,
        Fault::Truncate,
        Fault::TooManyRequests(0),
    ] {
        r.proxy.push(fault.clone());
        let f = next_remote();
        assert!(read(&mnt, f).unwrap() == expected[*f], "{fault:?}: {f}");
    }
    m.unmount().unwrap();
}

#[test]
fn eight_concurrent_readers() {
    let r = Remote::start();
    let mut tar = tar::Builder::new(Vec::new());
    let mut expected = BTreeMap::new();
    for i in 0..8u64 {
        let data = noise(300_000 + i as usize * 7_777, i + 100);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        let name = format!("f{i}");
        tar.append_data(&mut h, &name, &data[..]).unwrap();
        expected.insert(name, data);
    }
    let tar = tar.into_inner().unwrap();
    let blob = r.push(&tar, &small_opts());
    let m = r.mount(&blob, r.cache("cache", 1 << 30), "mnt");
    let mnt = m.mountpoint().to_path_buf();
    let expected = Arc::new(expected);
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (mnt, expected) = (mnt.clone(), expected.clone());
            std::thread::spawn(move || {
                // Half read their own file, half all read f0.
                let name = if i % 2 == 0 {
                    format!("f{}", i / 2)
                } else {
                    "f0".to_string()
                };
                let data = std::fs::read(mnt.join(&name)).unwrap();
                assert!(data == expected[&name], "{name}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.unmount().unwrap();
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn prefetch_and_background_fetch() {
    let r = Remote::start();
    let tar = synthetic_tar();
    let expected = files(&tar);
    let prioritized = ["etc/hostname", "srv/many-chunks", "usr/bin/ping"];
    let opts = prioritizing(&prioritized);
    let blob = r.push(&tar, &opts);

    // Prefetch only: the prioritized files arrive in one request after the TOC's two.
    let requests = r.proxy.blob_requests();
    let m = r.mount_with(&blob, r.cache("c1", 1 << 30), "m1", &prefetch_only());
    wait_for("prefetch", || m.fs().is_prefetch_done());
    assert_eq!(
        r.proxy.blob_requests() - requests,
        3,
        "footer, TOC, one prefetch request"
    );
    let served = r.proxy.blob_bytes_served();
    for f in prioritized {
        assert!(
            std::fs::read(m.mountpoint().join(f)).unwrap() == expected[f],
            "{f}"
        );
    }
    assert_eq!(
        r.proxy.blob_bytes_served() - served,
        0,
        "prioritized files were prefetched"
    );
    let p = m.fs().progress();
    assert!(
        p.prefetch_done && !p.background_done && p.percent() < 100.0,
        "{p}"
    );
    m.unmount().unwrap();

    // Background fetch: the whole layer becomes local, each byte fetched about once.
    let served = r.proxy.blob_bytes_served();
    let m = r.mount_with(
        &blob,
        r.cache("c2", 1 << 30),
        "m2",
        &FetchOptions::default(),
    );
    wait_for("background fetch", || m.fs().is_background_done());
    let p = m.fs().progress();
    assert_eq!(p.percent(), 100.0, "{p}");
    assert!(p.to_string().contains("100.0% local"), "{p}");
    let fetched = (r.proxy.blob_bytes_served() - served) as u64;
    assert!(
        fetched <= blob.1,
        "fetched {fetched} of a {} byte blob",
        blob.1
    );
    let served = r.proxy.blob_bytes_served();
    for (f, content) in &expected {
        assert!(
            std::fs::read(m.mountpoint().join(f)).unwrap() == *content,
            "{f}"
        );
    }
    assert_eq!(
        r.proxy.blob_bytes_served() - served,
        0,
        "everything was already local"
    );
    m.unmount().unwrap();
}

/// A background fetch in progress does not hold an on-demand read back: over a slow link,
/// a read issued while the background fetch runs is served with at most one background
/// request in flight beside it (before the node-wide scheduler, two 1 MiB background
/// requests per layer were), and the background fetch resumes afterwards.
#[test]
fn background_fetch_yields_to_on_demand_reads() {
    let r = Remote::start();
    let big = noise(6 << 20, 7);
    let small = noise(20_000, 8);
    let tar = files_tar(&[("data/big", &big), ("z/small", &small)]);
    let blob = r.push(&tar, &small_opts());
    // 4 MB/s for all connections together: the layer takes about 1.6 s.
    r.proxy.set_rate(Some(4e6));
    let fetch = FetchOptions {
        prefetch: false,
        background: true,
        background_quiet: Duration::from_millis(50),
        ..FetchOptions::default()
    };
    let before = r.proxy.blob_log().len();
    let m = r.mount_with(&blob, r.cache("c", 1 << 30), "mnt", &fetch);
    let toc_requests = 2;
    let done_after = |n: usize| {
        r.proxy.blob_log()[before + toc_requests..]
            .iter()
            .filter(|q| q.ended.is_some())
            .count()
            >= n
    };
    wait_for("the background fetch to run", || done_after(2));
    let (log, read) = read_logged(&r, &m, before + toc_requests, "z/small", &small);
    let beside: Vec<_> = log
        .iter()
        .enumerate()
        .filter(|(i, q)| *i != read && q.overlaps(&log[read]))
        .collect();
    assert!(
        beside.len() <= 1,
        "{} background requests were in flight with the read: {beside:?}",
        beside.len()
    );
    for q in &log {
        let len = q.range.as_ref().map_or(u64::MAX, |g| g.end - g.start);
        assert!(
            len <= estargz_layerfs::MAX_BACKGROUND_REQUEST,
            "a {len} byte request"
        );
    }
    wait_for("the background fetch", || m.fs().is_background_done());
    assert_eq!(m.fs().progress().percent(), 100.0);
    m.unmount().unwrap();
}

/// A read that misses a small file fetches, in one round trip, the small files of the same
/// directory nearest to it (skipping a subdirectory's entries between them, and other
/// directories), up to 256 KiB.
#[test]
fn a_small_file_comes_with_its_directory_neighbours() {
    let r = Remote::start();
    let names: Vec<String> = (0..30)
        .map(|i| format!("a/f{i:02}"))
        .chain((0..3).map(|i| format!("a/sub/s{i}")))
        .chain(["a/big".to_string()])
        .chain((0..3).map(|i| format!("b/g{i}")))
        .collect();
    // Tar order: a/f00..a/f05, then a/sub/*, then the rest of a/, a/big, then b/.
    let mut order: Vec<&String> = names[..6].iter().collect();
    order.extend(&names[30..33]);
    order.extend(&names[6..30]);
    order.extend(&names[33..]);
    let contents: Vec<Vec<u8>> = order
        .iter()
        .enumerate()
        .map(|(i, n)| {
            noise(
                if *n == "a/big" { 300_000 } else { 10_000 },
                2 * i as u64 + 1,
            )
        })
        .collect();
    let files: Vec<(&str, &[u8])> = order
        .iter()
        .zip(&contents)
        .map(|(n, c)| (n.as_str(), &c[..]))
        .collect();
    let blob = r.push(&files_tar(&files), &small_opts());
    let cache = r.cache("cache", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt");
    let local = |f: &str| cache.contains(&m.fs().chunk_at(f, 0).unwrap().digest);

    // Every answer 100 ms late: requests sent together overlap even when a busy machine
    // opens their connections a few milliseconds apart; requests sent one after another
    // do not.
    r.proxy.set_latency(Some(Duration::from_millis(100)));
    let before = r.proxy.blob_log().len();
    assert!(std::fs::read(m.mountpoint().join("a/f10")).unwrap() == contents[13]);
    let requests = r.proxy.blob_log()[before..].to_vec();
    let siblings: Vec<&String> = names[..30].iter().filter(|f| local(f)).collect();
    assert!(
        siblings.len() >= 20,
        "only {} small files of a/ came along: {siblings:?}",
        siblings.len()
    );
    // 256 KiB of 10 kB files: not all 30.
    assert!(siblings.len() < 30, "{siblings:?}");
    for other in names[30..].iter() {
        assert!(!local(other), "{other} was fetched with a/f10");
    }
    // Each run of adjacent files is one range request, all in flight together.
    assert!((2..=8).contains(&requests.len()), "{requests:?}");
    for (i, a) in requests.iter().enumerate() {
        for b in &requests[i + 1..] {
            assert!(a.overlaps(b), "requests one after another: {requests:?}");
        }
    }
    // The neighbours read like the tar.
    for (n, c) in order.iter().zip(&contents) {
        assert!(
            std::fs::read(m.mountpoint().join(n.as_str())).unwrap() == *c,
            "{n}"
        );
    }
    m.unmount().unwrap();
}

/// A static library (an `ar` archive, cut by the converter in chunks of
/// `ARCHIVE_CHUNK_SIZE` and marked in the TOC) is read through its index and the members a
/// link needs: a read of its start, or of the chunk right after a local one, fetches no
/// chunk ahead; prioritized, only its first chunk is prefetched. A file of the same chunk
/// size that is no archive is read ahead once its first chunk is in, and prefetched whole.
#[test]
fn static_libraries_are_not_read_ahead() {
    use estargz_format::{ARCHIVE_CHUNK_SIZE, ARCHIVE_MAGIC};
    let r = Remote::start();
    let mut archive = ARCHIVE_MAGIC.to_vec();
    archive.extend(noise(2 << 20, 1));
    let plain = noise(2 << 20, 2);
    let tar = files_tar(&[("usr/lib/libx.a", &archive), ("usr/lib/plain", &plain)]);

    // Converted with 4 MiB chunks: the archive alone is cut.
    let opts = ConvertOptions {
        chunk_size: 4 << 20,
        compression_level: 1,
        ..Default::default()
    };
    let blob = r.push(&tar, &opts);
    let cache = r.cache("cache", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt");
    let local = |path: &str, chunk: u64| {
        let c = m.fs().chunk_at(path, chunk * ARCHIVE_CHUNK_SIZE).unwrap();
        assert_eq!(c.size, ARCHIVE_CHUNK_SIZE);
        cache.contains(&c.digest)
    };
    let lib = m.mountpoint().join("usr/lib/libx.a");
    assert_page_reads(&lib, 0, &archive);
    assert!(local("usr/lib/libx.a", 0));
    // Read-ahead would be on its way by now.
    std::thread::sleep(Duration::from_millis(500));
    for chunk in 1..8 {
        assert!(!local("usr/lib/libx.a", chunk), "chunk {chunk} came ahead");
    }
    // The next chunk, right after a local one: still nothing ahead.
    assert_page_reads(&lib, ARCHIVE_CHUNK_SIZE, &archive);
    std::thread::sleep(Duration::from_millis(500));
    for chunk in 2..8 {
        assert!(!local("usr/lib/libx.a", chunk), "chunk {chunk} came ahead");
    }
    assert!(std::fs::read(&lib).unwrap() == archive);
    m.unmount().unwrap();

    // Converted with chunks of the archive's size: the other file is read ahead.
    let opts = ConvertOptions {
        chunk_size: ARCHIVE_CHUNK_SIZE,
        ..opts
    };
    let blob = r.push(&tar, &opts);
    let cache = r.cache("cache2", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt2");
    assert_page_reads(&m.mountpoint().join("usr/lib/plain"), 0, &plain);
    let second = m
        .fs()
        .chunk_at("usr/lib/plain", ARCHIVE_CHUNK_SIZE)
        .unwrap();
    wait_for("the plain file's read-ahead", || {
        cache.contains(&second.digest)
    });
    assert!(std::fs::read(m.mountpoint().join("usr/lib/plain")).unwrap() == plain);
    m.unmount().unwrap();

    // Both prioritized: the archive's first chunk (its index) is prefetched, the rest of
    // it is left to the reads; the other file comes whole.
    let opts = ConvertOptions {
        chunk_size: 4 << 20,
        prioritized_files: vec!["usr/lib/libx.a".into(), "usr/lib/plain".into()],
        ..opts
    };
    let blob = r.push(&tar, &opts);
    let cache = r.cache("cache3", 1 << 30);
    let m = r.mount_with(&blob, cache.clone(), "mnt3", &prefetch_only());
    wait_for("the prefetch", || m.fs().is_prefetch_done());
    let local =
        |path: &str, offset: u64| cache.contains(&m.fs().chunk_at(path, offset).unwrap().digest);
    assert!(
        local("usr/lib/libx.a", 0),
        "the archive's index was not prefetched"
    );
    for chunk in 1..8 {
        assert!(
            !local("usr/lib/libx.a", chunk * ARCHIVE_CHUNK_SIZE),
            "chunk {chunk} was prefetched"
        );
    }
    assert!(local("usr/lib/plain", 0));
    let served = r.proxy.blob_bytes_served();
    assert!(std::fs::read(m.mountpoint().join("usr/lib/plain")).unwrap() == plain);
    assert_eq!(
        r.proxy.blob_bytes_served(),
        served,
        "the plain file was prefetched"
    );
    assert!(std::fs::read(m.mountpoint().join("usr/lib/libx.a")).unwrap() == archive);
    m.unmount().unwrap();
}

/// A layer converted with a page profile (`estargz optimize`'s record of the pages a start
/// read): the prefetch brings the chunks holding those pages first, then the rest of the
/// file; a file opened while the prefetch runs over a link not known to be local is read
/// by the kernel page by page (a fault asks for no 1 MiB window around it), one opened
/// after it with the usual read-ahead; and such a file is never read ahead by us.
#[test]
fn a_page_profile_prefetches_the_chunks_a_start_read_first() {
    use estargz_format::STARTUP_CHUNK_SIZE as CHUNK;
    let r = Remote::start();
    let prog = noise(2 << 20, 1);
    let plain = noise(1 << 20, 2);
    let tar = files_tar(&[("usr/bin/prog", &prog), ("usr/lib/plain", &plain)]);
    let ranges = vec![0..4096, 300_000..310_000, 24 * CHUNK..24 * CHUNK + 10];
    let opts = ConvertOptions {
        chunk_size: 4 << 20,
        startup_ranges: [("usr/bin/prog".to_string(), ranges)].into(),
        ..prioritizing(&["usr/bin/prog", "usr/lib/plain"])
    };
    let read_at_start = [0, 4, 24];
    let blob = r.push(&tar, &opts);
    let cache = r.cache("cache", 1 << 30);
    // Slow enough that the prefetch is still on its way while the file is mapped below.
    r.proxy.set_latency(Some(Duration::from_millis(400)));
    let m = r.mount_with(&blob, cache.clone(), "mnt", &prefetch_only());
    let knob = read_ahead_knob(m.mountpoint());
    let chunk = |n: u64| {
        let c = m.fs().chunk_at("usr/bin/prog", n * CHUNK).unwrap();
        assert_eq!(c.size, CHUNK);
        c
    };
    let local = |n: u64| cache.contains(&chunk(n).digest);
    // A fault in a chunk no start read: that chunk alone is fetched.
    let path = m.mountpoint().join("usr/bin/prog");
    let at = 10 * CHUNK + 100;
    assert_eq!(mapped_byte(&path, at), prog[at as usize]);
    assert!(!m.fs().is_prefetch_done());
    assert_eq!(
        read_to_string(&knob),
        "0",
        "kernel read-ahead for a file opened during the prefetch"
    );
    assert!(local(10));
    assert!(!local(9) && !local(11), "the fault brought its neighbours");
    wait_for("the prefetch", || m.fs().is_prefetch_done());
    assert_eq!(
        read_to_string(&knob),
        "1024",
        "kernel read-ahead after the prefetch"
    );
    let reopened = std::fs::File::open(&path).unwrap();
    assert_eq!(
        read_to_string(&knob),
        "1024",
        "a file opened after the prefetch"
    );
    drop(reopened);
    r.proxy.set_latency(None);
    assert!((0..32).all(local), "the prefetch left chunks of the file");
    let plain_first = m.fs().chunk_at("usr/lib/plain", 0).unwrap();
    assert!(cache.contains(&plain_first.digest));
    // Every chunk a start read was asked for before any other chunk of the file (but the
    // one the fault asked for).
    let overlaps = |req: &BlobRequest, n: u64| {
        let c = chunk(n);
        req.range
            .as_ref()
            .is_some_and(|r| r.start < c.compressed_end && c.offset < r.end)
    };
    let log: Vec<BlobRequest> = r
        .proxy
        .blob_log()
        .into_iter()
        .filter(|req| !overlaps(req, 10))
        .collect();
    let first_of = |n: u64| log.iter().position(|req| overlaps(req, n)).unwrap();
    let last_marked = read_at_start.iter().map(|&n| first_of(n)).max().unwrap();
    for n in (0..32).filter(|n| !read_at_start.contains(n) && *n != 10) {
        assert!(
            first_of(n) > last_marked,
            "chunk {n} was asked for early: {log:?}"
        );
    }
    assert!(std::fs::read(&path).unwrap() == prog);
    m.unmount().unwrap();

    // Read from its start on demand: nothing is read ahead.
    let cache = r.cache("cache2", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt2");
    let path = m.mountpoint().join("usr/bin/prog");
    assert_page_reads(&path, 0, &prog);
    std::thread::sleep(Duration::from_millis(500));
    let local =
        |n: u64| cache.contains(&m.fs().chunk_at("usr/bin/prog", n * CHUNK).unwrap().digest);
    assert!(local(0));
    assert!(!local(1), "chunk 1 came ahead");
    m.unmount().unwrap();

    // The same layer without a profile mounts with the kernel's 1 MiB read-ahead.
    let blob = r.push(
        &tar,
        &ConvertOptions {
            startup_ranges: Default::default(),
            ..opts
        },
    );
    let m = r.mount_with(&blob, r.cache("cache3", 1 << 30), "mnt3", &prefetch_only());
    assert_eq!(read_to_string(&read_ahead_knob(m.mountpoint())), "1024");
    m.unmount().unwrap();
}

/// The sysfs file of the kernel's read-ahead for the mount at `dir`.
fn read_ahead_knob(dir: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).unwrap().dev();
    PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
}

fn read_to_string(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// The byte at `offset` of file `path`, read by touching it in a shared read-only mapping
/// (a page fault, as a program's code is read).
fn mapped_byte(path: &Path, offset: u64) -> u8 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared mapping of a file opened here, unmapped before returning;
    // the byte read lies within the file's length.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let b = std::ptr::read_volatile((at as *const u8).add(offset as usize));
        libc::munmap(at, len);
        b
    }
}

/// Reads the 4 KiB at `offset` of file `path` (one read, as a process that wants only
/// that page) and checks them against `content`, the whole file's.
fn assert_page_reads(path: &Path, offset: u64, content: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, offset).unwrap();
    let at = offset as usize;
    assert!(
        buf[..] == content[at..at + 4096],
        "{} read differently at {offset}",
        path.display()
    );
}

/// A read at the start of a file of several chunks has the next chunks fetched ahead of
/// the reader; a read that starts in the middle (a random reader) does not.
#[test]
fn reads_from_the_start_of_a_file_fetch_ahead() {
    let r = Remote::start();
    let content = noise(1 << 20, 3);
    let blob = r.push(&files_tar(&[("big", &content)]), &small_opts());
    let chunk = |m: &MountedLayer, offset: u64| m.fs().chunk_at("big", offset).unwrap().digest;
    let read_at = |m: &MountedLayer, offset: u64| {
        assert_page_reads(&m.mountpoint().join("big"), offset, &content)
    };

    let cache = r.cache("cache-start", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "start");
    read_at(&m, 0);
    wait_for("read-ahead of the whole 1 MiB file", || {
        (0..16).all(|i| cache.contains(&chunk(&m, i * SMALL_CHUNK)))
    });
    m.unmount().unwrap();

    let cache = r.cache("cache-middle", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "middle");
    read_at(&m, 8 * SMALL_CHUNK);
    std::thread::sleep(Duration::from_millis(500));
    let ahead: Vec<u64> = (12..16)
        .filter(|i| cache.contains(&chunk(&m, i * SMALL_CHUNK)))
        .collect();
    assert!(
        ahead.is_empty(),
        "a random read fetched chunks {ahead:?} ahead"
    );
    m.unmount().unwrap();
}

/// A program maps its executable and touches it all over, its last pages (dynamic
/// section, data) right after its header: a first read of an executable brings its last
/// chunk along and has the whole file read ahead, past the 8 MiB a data file gets.
#[test]
fn a_read_of_an_executable_brings_its_last_chunk_and_reads_it_ahead_whole() {
    let r = Remote::start();
    const SIZE: usize = 12 << 20;
    let (prog, data) = (noise(SIZE, 11), noise(SIZE, 12));
    let tar = files_and_links_tar(&[("bin/prog", 0o755, &prog), ("data", 0o644, &data)], &[]);
    let blob = r.push(&tar, &small_opts());
    let cache = r.cache("cache", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt");
    let chunks = |f: &str| -> Vec<Sha256Digest> {
        (0..SIZE as u64 / SMALL_CHUNK)
            .map(|i| m.fs().chunk_at(f, i * SMALL_CHUNK).unwrap().digest)
            .collect()
    };
    let local = |f: &str| -> usize { chunks(f).iter().filter(|c| cache.contains(c)).count() };
    let read_head = |f: &str, want: &[u8]| assert_page_reads(&m.mountpoint().join(f), 0, want);
    let last = |f: &str| cache.contains(chunks(f).last().unwrap());
    // Answers 100 ms late: what the read-ahead brings arrives after the read returns.
    r.proxy.set_latency(Some(Duration::from_millis(100)));

    read_head("data", &data);
    assert!(
        !last("data"),
        "a data file's first read fetched its last chunk"
    );
    read_head("bin/prog", &prog);
    assert!(
        last("bin/prog"),
        "the executable's last chunk did not come with its first"
    );

    let n = chunks("bin/prog").len();
    wait_for("the whole executable read ahead", || local("bin/prog") == n);
    // The data file's read-ahead stops at 8 MiB (of noise, stored as it is).
    std::thread::sleep(Duration::from_millis(500));
    let data_local = local("data");
    assert!(
        data_local < n * 3 / 4 && !last("data"),
        "{data_local} of {n} chunks of the data file were read ahead"
    );
    // Both read like the tar.
    for (f, want) in [("bin/prog", &prog), ("data", &data)] {
        assert!(
            std::fs::read(m.mountpoint().join(f)).unwrap() == *want,
            "{f}"
        );
    }
    r.proxy.set_latency(None);
    m.unmount().unwrap();
}

/// A prioritized executable that the layer's prefetch is still bringing is left to it: the
/// read fetches its first chunk alone, not the last one (read-ahead requests would race
/// the prefetch spans for the same chunks).
#[test]
fn an_executable_the_prefetch_is_bringing_is_left_to_it() {
    let r = Remote::start();
    let prog = noise(12 << 20, 13);
    let tar = files_and_links_tar(&[("bin/prog", 0o755, &prog)], &[]);
    let blob = r.push(&tar, &prioritizing(&["bin/prog"]));
    let cache = r.cache("cache", 1 << 30);
    // 4 MB/s for every connection together: the prefetch takes about three seconds.
    r.proxy.set_rate(Some(4e6));
    let m = r.mount_with(&blob, cache.clone(), "mnt", &prefetch_only());
    let last = m.fs().chunk_at("bin/prog", (12 << 20) - 1).unwrap().digest;
    assert_page_reads(&m.mountpoint().join("bin/prog"), 0, &prog);
    assert!(
        !m.fs().is_prefetch_done(),
        "the prefetch ended before the read: nothing was tested"
    );
    assert!(
        !cache.contains(&last),
        "the read fetched the last chunk the prefetch was bringing"
    );
    wait_for("the prefetch", || m.fs().is_prefetch_done());
    r.proxy.set_rate(None);
    assert!(std::fs::read(m.mountpoint().join("bin/prog")).unwrap() == prog);
    m.unmount().unwrap();
}

/// A sequential reader does not fetch its chunks one after another: the chunks after the
/// one it waits for are on their way meanwhile, in several requests in flight together, so
/// that a cold read keeps the link busy.
#[test]
fn a_sequential_reader_keeps_several_requests_in_flight() {
    use std::io::Read;
    let r = Remote::start();
    let content = noise(2 << 20, 5);
    let blob = r.push(&files_tar(&[("big", &content)]), &small_opts());
    let m = r.mount(&blob, r.cache("cache", 1 << 30), "mnt");
    // About half a second for the file: requests last long enough to be seen together.
    r.proxy.set_rate(Some(4e6));
    let before = r.proxy.blob_log().len();
    let mut f = std::fs::File::open(m.mountpoint().join("big")).unwrap();
    let mut read = Vec::new();
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        read.extend_from_slice(&buf[..n]);
    }
    drop(f);
    assert!(read == content, "the file read differently");
    r.proxy.set_rate(None);
    let log = r.proxy.blob_log()[before..].to_vec();
    let together = log
        .iter()
        .enumerate()
        .filter(|(i, a)| log[i + 1..].iter().any(|b| a.overlaps(b)))
        .count();
    assert!(
        together >= 1 && log.len() >= 3,
        "requests one after another: {log:?}"
    );
    m.unmount().unwrap();
}

/// Prefetch makes way for on-demand reads: while a read's own fetch is in flight, no new
/// prefetch request starts (those already in flight finish), so the reader gets the link.
#[test]
fn prefetch_makes_way_for_on_demand_reads() {
    let r = Remote::start();
    let big = noise(6 << 20, 11);
    // One chunk of 1 MiB: the read's request lasts long enough (a few hundred ms beside
    // the prefetch's) for prefetch requests in flight to end during it, and for new ones
    // to start if nothing held them back.
    let small = noise(1 << 20, 12);
    let tar = files_tar(&[("data/big", &big), ("z/small", &small)]);
    let opts = ConvertOptions {
        chunk_size: 1 << 20,
        ..prioritizing(&["data/big"])
    };
    let blob = r.push(&tar, &opts);
    // 4 MB/s for all connections together: the prefetch takes about 1.6 s.
    r.proxy.set_rate(Some(4e6));
    let scheduler = FetchScheduler::new(prefetch_only());
    let before = r.proxy.blob_log().len();
    let m = r.mount_on(&blob, r.cache("c", 1 << 30), "mnt", scheduler.clone());
    let toc_requests = 2;
    // The read starts while both prefetch slots have a request in flight, half way through
    // them (each takes about 0.5 s): they end while the read's request is in flight, and
    // without making way the workers would send the next ones then.
    wait_for("two prefetch requests in flight", || {
        r.proxy.blob_log()[before + toc_requests..]
            .iter()
            .filter(|q| q.ended.is_none())
            .count()
            >= 2
    });
    std::thread::sleep(Duration::from_millis(250));
    // Prefetch requests the scheduler keeps in flight at most, as it has measured the link.
    let slots = scheduler.link().ahead_in_flight();
    let (log, read) = read_logged(&r, &m, before + toc_requests, "z/small", &small);
    let slots = slots.max(scheduler.link().ahead_in_flight());
    let read_arrived = log[read].arrived;
    // A prefetch request may reach the registry during the read's and still have made
    // way: it passed the make-way check before the read's fetch began, and was on its way
    // (a new connection, a loaded machine: that took over 100 ms once). Only a slot whose
    // request had ended by then can have one on its way; a slot whose request was still
    // in flight when the read's arrived sends its next one after that, so it must wait
    // until the read's has ended.
    let in_flight_at_read = log
        .iter()
        .enumerate()
        .filter(|&(i, q)| {
            i != read && q.arrived < read_arrived && q.ended.is_none_or(|e| e > read_arrived)
        })
        .count();
    let on_its_way = slots.saturating_sub(in_flight_at_read);
    let started_during: Vec<_> = log
        .iter()
        .filter(|q| q.arrived > read_arrived && Some(q.arrived) < log[read].ended)
        .collect();
    assert!(
        started_during.len() <= on_its_way,
        "{} prefetch requests started while the read's was in flight, but {in_flight_at_read} \
         of the {slots} prefetch slots still had a request in flight when it arrived: \
         {started_during:?}",
        started_during.len()
    );
    wait_for("the prefetch", || m.fs().is_prefetch_done());
    m.unmount().unwrap();
}

#[test]
fn a_trickling_registry_fails_reads_at_their_deadline_and_the_mount_keeps_serving() {
    // The client alone would wait minutes (its default, per attempt): the deadline decides.
    let r = Remote::start_with(Duration::from_secs(60));
    // Eight files of noise, each in a directory of its own (no neighbours fetched along).
    let contents: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("d{i}/f"), estargz_testutil::noise(40_000, i)))
        .collect();
    let named: Vec<(&str, &[u8])> = contents
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    let tar = estargz_testutil::files_tar(&named);
    let expected = files(&tar);
    let blob = r.push(&tar, &small_opts());
    let cache = r.cache("cache", 1 << 30);
    let lazy = on_demand_only();
    let deadline = Duration::from_secs(2);
    let m = r.mount_with_deadline(&blob, cache.clone(), "mnt", &lazy, deadline);
    let mnt: PathBuf = m.mountpoint().to_path_buf();
    // More readers than the mount has threads, each on a file that is not local.
    let big: Vec<&String> = expected.keys().collect();
    assert_eq!(big.len(), 8);
    r.proxy.set_rate(Some(1000.0));
    let started = Instant::now();
    let readers: Vec<_> = big
        .iter()
        .map(|f| {
            let p = mnt.join(f);
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    for (f, t) in big.iter().zip(readers) {
        match t.join().unwrap() {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}: {e}"),
            Ok(data) => panic!(
                "{f}: read {} bytes through a trickling registry",
                data.len()
            ),
        }
    }
    // A bound on the deadline's effect, not a benchmark: at 1 kB/s the reads need minutes.
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    // The link is healthy again: the same mount serves the same files.
    r.proxy.set_rate(None);
    for f in &big {
        assert!(read(&mnt, f).unwrap() == expected[*f], "{f}");
    }
    m.unmount().unwrap();
}

#[test]
fn unmount_is_prompt_while_prefetch_and_background_fetch_trickle() {
    let r = Remote::start_with(Duration::from_secs(60));
    let tar = synthetic_tar();
    let opts = prioritizing(&["srv/many-chunks", "srv/huge.bin"]);
    let blob = r.push(&tar, &opts);
    let fetch = FetchOptions {
        prefetch: true,
        background: true,
        background_quiet: Duration::ZERO,
        ..FetchOptions::default()
    };
    let mount = || {
        r.mount_with_deadline(
            &blob,
            r.cache("cache", 1 << 30),
            "mnt",
            &fetch,
            Duration::from_secs(600),
        )
    };
    // The TOC arrives at full speed; the prefetch crawls at 1 kB/s.
    let m = mount();
    r.proxy.set_rate(Some(1000.0));
    wait_for("a prefetch request in flight", || {
        r.proxy.blob_log().iter().any(|b| b.ended.is_none())
    });
    let started = Instant::now();
    m.unmount().unwrap();
    // Not a benchmark: the prefetch would take minutes; unmount must not wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(r.dir.path().to_str().unwrap()), "{mounts}");
    // Nothing more is asked for the unmounted layer.
    let asked = r.proxy.blob_requests();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(r.proxy.blob_requests(), asked);
    r.proxy.set_rate(None);
}

/// A chunk a reader waits for is decoded as its bytes arrive over a slow link; when that
/// stream breaks or brings wrong bytes, the chunk is fetched again whole (with the
/// client's retries), and the reader gets the right bytes or EIO, never wrong ones.
#[test]
fn chunks_decode_as_they_arrive_and_a_broken_stream_is_fetched_again() {
    use std::os::unix::fs::FileExt;
    let r = Remote::start();
    let mib = 1u64 << 20;
    let content = noise(8 << 20, 11);
    let opts = ConvertOptions {
        chunk_size: mib,
        compression_level: 1,
        ..Default::default()
    };
    let blob = r.push(&files_tar(&[("big", &content)]), &opts);
    let scheduler = FetchScheduler::new(on_demand_only());
    let m = r.mount_on(&blob, r.cache("cache", 1 << 30), "mnt", scheduler.clone());
    // About an eighth of a second per chunk: slow enough to decode while it arrives.
    r.proxy.set_rate(Some(8e6));
    let f = std::fs::File::open(m.mountpoint().join("big")).unwrap();
    let fetches_timed = || {
        let counts = scheduler.node_stats().fetch_latency.counts();
        counts.iter().sum::<u64>()
    };
    let streamed = || {
        m.stats()
            .streamed_chunks
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Odd chunks only: the one before is never local, so no read-ahead joins in.
    let read_chunk = |k: u64| {
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, k * mib).map(|()| buf)
    };
    let expect = |k: u64| content[(k * mib) as usize..(k * mib) as usize + 4096].to_vec();
    let requests = |k: u64| requests_for(&r.proxy, &m, k * mib);

    assert_eq!(read_chunk(1).unwrap(), expect(1));
    assert_eq!(streamed(), 1, "the chunk was not decoded as it arrived");
    assert_eq!(requests(1), 1);

    for (k, fault) in [(3, Fault::Truncate), (5, Fault::CorruptBody)] {
        r.proxy.push(fault.clone());
        let timed = fetches_timed();
        assert_eq!(read_chunk(k).unwrap(), expect(k), "{fault:?}");
        // The reader waited for both fetches: the broken one counts in the latency too.
        assert_eq!(fetches_timed(), timed + 2, "{fault:?}");
        assert_eq!(
            streamed(),
            1,
            "{fault:?}: a broken stream counted as decoded"
        );
        assert_eq!(requests(k), 2, "{fault:?}: not fetched again whole");
    }

    // Wrong bytes every time: EIO, then the right bytes once the registry recovers. (The
    // corrupting proxy answers at full speed, so the link looks fast afterwards and the
    // chunk may be fetched whole.)
    r.proxy.set_always(Some(Fault::CorruptBody));
    let e = read_chunk(7).expect_err("wrong bytes were served");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    r.proxy.set_always(None);
    assert_eq!(read_chunk(7).unwrap(), expect(7));
    r.proxy.set_rate(None);
    drop(f);
    m.unmount().unwrap();
}

/// A chunk decoded as it arrives from a registry that trickles fails at the read's
/// deadline, and is not fetched again whole after it: the reader waits once, not twice.
#[test]
fn a_trickling_stream_fails_at_the_deadline_without_a_second_fetch() {
    use std::os::unix::fs::FileExt;
    let r = Remote::start_with(Duration::from_secs(60));
    let content = noise(1 << 20, 12);
    let opts = ConvertOptions {
        chunk_size: 512 << 10,
        compression_level: 1,
        ..Default::default()
    };
    let blob = r.push(&files_tar(&[("big", &content)]), &opts);
    let lazy = on_demand_only();
    let deadline = Duration::from_secs(2);
    let m = r.mount_with_deadline(&blob, r.cache("cache", 1 << 30), "mnt", &lazy, deadline);
    let requests = || requests_for(&r.proxy, &m, 512 << 10);
    r.proxy.set_rate(Some(1000.0));
    let f = std::fs::File::open(m.mountpoint().join("big")).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = f
        .read_exact_at(&mut buf, 512 << 10)
        .expect_err("read through a trickling registry");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let stats = m.stats();
    assert_eq!(
        stats
            .streamed_chunks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // One request per failed read (the kernel may retry a failed read once itself).
    let failed_reads = stats.read_errors.load(std::sync::atomic::Ordering::Relaxed);
    assert!(failed_reads >= 1);
    assert_eq!(
        requests() as u64,
        failed_reads,
        "fetched again after the deadline"
    );
    // The link is healthy again: the same chunk reads right, decoded as it arrives.
    r.proxy.set_rate(None);
    f.read_exact_at(&mut buf, 512 << 10).unwrap();
    assert_eq!(&buf[..], &content[512 << 10..(512 << 10) + 4096]);
    drop(f);
    m.unmount().unwrap();
}

/// The blob requests `proxy` saw for a range holding the chunk at `offset` of file `big`.
fn requests_for(proxy: &FaultProxy, m: &MountedLayer, offset: u64) -> usize {
    let c = m.fs().chunk_at("big", offset).unwrap();
    proxy.blob_log().iter().filter(|q| covers(q, &c)).count()
}

/// Whether request `q` asked for a range holding all of chunk `c`.
fn covers(q: &BlobRequest, c: &Chunk) -> bool {
    q.range
        .as_ref()
        .is_some_and(|q| q.start <= c.offset && c.compressed_end <= q.end)
}

/// Reading the start of an executable fetches its interpreter and libraries, and theirs,
/// as the loader would find them in the image (run path with `$ORIGIN`, the multiarch and
/// traditional directories, symlinks, the layer below, whiteouts), before anyone reads
/// them; nothing else is fetched. Here the TOC records what each object loads, as our
/// converter writes it.
#[test]
fn an_executables_libraries_are_fetched_before_the_loader_asks() {
    libraries_fetched_before_the_loader_asks(small_opts());
}

/// The same, for layers whose TOC does not record what objects load (converted by the
/// reference's tools): the layer reads it from each object as it arrives.
#[test]
fn an_executables_libraries_are_fetched_before_the_loader_asks_without_a_record() {
    libraries_fetched_before_the_loader_asks(ConvertOptions {
        elf_needs: false,
        ..small_opts()
    });
}

fn libraries_fetched_before_the_loader_asks(opts: ConvertOptions) {
    let r = Remote::start();
    // Every object spans several chunks (no small-file neighbours come along), and the
    // executable's dynamic section lies chunks after its header.
    let pad = 3 * SMALL_CHUNK as usize;
    // Padded differently: objects of one content would share their chunks.
    let obj = |needed: &[&str], n: usize| elf_object(None, needed, None, pad + n);
    let (ld, libfoo, libbaz, gone) = (
        obj(&[], 0),
        obj(&["libbaz.so.3"], 1),
        obj(&[], 2),
        obj(&[], 3),
    );
    let qux = elf_object(None, &[], None, 100);
    let lower = files_and_links_tar(
        &[
            ("lib/x86_64-linux-gnu/ld-2.36.so", 0o755, &ld),
            ("lib/x86_64-linux-gnu/libfoo.so.1", 0o644, &libfoo),
            ("usr/lib/x86_64-linux-gnu/libbaz.so.3", 0o644, &libbaz),
            ("usr/lib/x86_64-linux-gnu/libgone.so.1", 0o644, &gone),
            ("opt/libqux.so.1", 0o644, &qux),
        ],
        &[(
            "lib64/ld-linux-x86-64.so.2",
            "../lib/x86_64-linux-gnu/ld-2.36.so",
        )],
    );
    let prog = elf_object(
        Some("/lib64/ld-linux-x86-64.so.2"),
        &["libfoo.so.1", "libbar.so.2", "libgone.so.1"],
        Some("$ORIGIN/../lib/prog"),
        4 * SMALL_CHUNK as usize,
    );
    let (libbar, other) = (obj(&[], 4), obj(&["libfoo.so.1"], 5));
    // A small executable (one chunk) whose library lies in the layer below.
    let tool = elf_object(None, &["libqux.so.1"], Some("/opt"), 200);
    let upper = files_and_links_tar(
        &[
            ("usr/bin/prog", 0o755, &prog),
            ("usr/lib/prog/libbar.so.2", 0o644, &libbar),
            ("usr/lib/x86_64-linux-gnu/.wh.libgone.so.1", 0o644, b""),
            ("usr/share/other.so", 0o644, &other),
            ("usr/sbin/tool", 0o755, &tool),
        ],
        &[],
    );
    let (lower, upper) = (r.push(&lower, &opts), r.push(&upper, &opts));
    let cache = r.cache("cache", 1 << 30);
    let scheduler = FetchScheduler::new(on_demand_only());
    let low = r.mount_over(&lower, cache.clone(), "lower", &[], scheduler.clone());
    let up = r.mount_over(&upper, cache.clone(), "upper", &[&low], scheduler);
    let local = |m: &MountedLayer, f: &str| cache.contains(&m.fs().chunk_at(f, 0).unwrap().digest);

    let mut head = [0u8; 64];
    use std::io::Read;
    std::fs::File::open(up.mountpoint().join("usr/bin/prog"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head[..] == prog[..64]);
    let wanted = [
        (&low, "lib/x86_64-linux-gnu/ld-2.36.so", &ld),
        (&low, "lib/x86_64-linux-gnu/libfoo.so.1", &libfoo),
        (&up, "usr/lib/prog/libbar.so.2", &libbar),
        (&low, "usr/lib/x86_64-linux-gnu/libbaz.so.3", &libbaz),
    ];
    wait_for("the interpreter and the libraries", || {
        wanted.iter().all(|(m, f, _)| local(m, f))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !local(&low, "usr/lib/x86_64-linux-gnu/libgone.so.1"),
        "a whited-out library"
    );
    assert!(!local(&up, "usr/share/other.so"), "an object nobody needs");
    // What was fetched reads like the tar.
    for (m, f, expected) in wanted {
        assert!(
            std::fs::read(m.mountpoint().join(f)).unwrap() == *expected,
            "{f}"
        );
    }
    up.unmount().unwrap();

    // An executable already local opens in passthrough mode (its reads do not reach the
    // layer): its libraries are looked for as it is opened. Made local by a mount that
    // cannot see the layer below, so that its library is not.
    let scheduler = FetchScheduler::new(on_demand_only());
    let alone = r.mount_over(&upper, cache.clone(), "alone", &[], scheduler.clone());
    assert!(std::fs::read(alone.mountpoint().join("usr/sbin/tool")).unwrap() == tool);
    alone.unmount().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!local(&low, "opt/libqux.so.1"));
    let up = r.mount_over(&upper, cache.clone(), "upper-again", &[&low], scheduler);
    assert!(std::fs::read(up.mountpoint().join("usr/sbin/tool")).unwrap() == tool);
    wait_for(
        "the library of an executable opened in passthrough mode",
        || local(&low, "opt/libqux.so.1"),
    );
    up.unmount().unwrap();
    low.unmount().unwrap();
}

/// When the TOC records what an executable loads, its whole library tree is requested at
/// its first miss, beside its own fetch: with every registry answer delayed, the
/// requests for its interpreter, its library and that library's own library are all in
/// flight while the one for the executable's first chunk is. (Read from the objects
/// instead, each level would wait for the one before it to arrive.)
#[test]
fn recorded_libraries_are_requested_beside_the_executable() {
    let r = Remote::start();
    let pad = 3 * SMALL_CHUNK as usize;
    let (ld, libfoo, libbar) = (
        elf_object(None, &[], None, pad),
        elf_object(None, &["libbar.so.2"], None, pad + 1),
        elf_object(None, &[], None, pad + 2),
    );
    let prog = elf_object(Some("/lib/ld.so"), &["libfoo.so.1"], None, pad + 3);
    let tar = files_and_links_tar(
        &[
            ("usr/bin/prog", 0o755, &prog),
            ("lib/ld.so", 0o755, &ld),
            ("usr/lib/x86_64-linux-gnu/libfoo.so.1", 0o644, &libfoo),
            ("usr/lib/x86_64-linux-gnu/libbar.so.2", 0o644, &libbar),
        ],
        &[],
    );
    let blob = r.push(&tar, &small_opts());
    let cache = r.cache("cache", 1 << 30);
    let m = r.mount(&blob, cache.clone(), "mnt");
    r.proxy.set_latency(Some(Duration::from_millis(500)));
    let mut head = [0u8; 64];
    use std::io::Read;
    std::fs::File::open(m.mountpoint().join("usr/bin/prog"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    let files = [
        "lib/ld.so",
        "usr/lib/x86_64-linux-gnu/libfoo.so.1",
        "usr/lib/x86_64-linux-gnu/libbar.so.2",
    ];
    let first = |f: &str| m.fs().chunk_at(f, 0).unwrap();
    wait_for("the libraries", || {
        files.iter().all(|f| cache.contains(&first(f).digest))
    });
    r.proxy.set_latency(None);
    let log = r.proxy.blob_log();
    let request_for = |f: &str| {
        let c = first(f);
        log.iter()
            .find(|q| covers(q, &c))
            .unwrap_or_else(|| panic!("no request for {f}: {log:?}"))
            .clone()
    };
    let own = request_for("usr/bin/prog");
    for f in files {
        assert!(
            request_for(f).overlaps(&own),
            "{f} was not requested while the executable was: {log:?}"
        );
    }
    for (f, expected) in files.iter().zip([&ld, &libfoo, &libbar]) {
        assert!(
            std::fs::read(m.mountpoint().join(f)).unwrap() == *expected,
            "{f}"
        );
    }
    m.unmount().unwrap();
}

/// A program's executable and the libraries its dependency walk finds come alone: the
/// small files beside them in their directories are not fetched along, as a data file's
/// are.
#[test]
fn programs_and_their_libraries_come_without_neighbours() {
    let r = Remote::start();
    let tool = elf_object(None, &["libsmall.so.1"], Some("/opt/lib"), 100);
    let lib = elf_object(None, &[], None, 200);
    let module = elf_object(None, &["libmodule.so.1"], Some("/opt/lib"), 300);
    let module_lib = elf_object(None, &[], None, 400);
    let (execs, libs, data, modules): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) = (
        (0..6).map(|i| noise(5_000, 10 + i)).collect(),
        (0..6).map(|i| noise(5_000, 20 + i)).collect(),
        (0..6).map(|i| noise(5_000, 30 + i)).collect(),
        (0..6).map(|i| noise(5_000, 40 + i)).collect(),
    );
    let mut files: Vec<(String, u32, &[u8])> = vec![
        ("opt/bin/tool".into(), 0o755, &tool[..]),
        ("opt/lib/libsmall.so.1".into(), 0o644, &lib[..]),
        ("opt/lib/libmodule.so.1".into(), 0o644, &module_lib[..]),
        ("opt/modules/mod.so".into(), 0o644, &module[..]),
    ];
    for i in 0..6 {
        files.push((format!("opt/bin/other{i}"), 0o755, &execs[i][..]));
        files.push((format!("opt/lib/libother{i}.so"), 0o644, &libs[i][..]));
        files.push((format!("opt/share/data{i}"), 0o644, &data[i][..]));
        files.push((format!("opt/modules/other{i}.so"), 0o644, &modules[i][..]));
    }
    let entries: Vec<(&str, u32, &[u8])> =
        files.iter().map(|(n, m, c)| (n.as_str(), *m, *c)).collect();
    let blob = r.push(&files_and_links_tar(&entries, &[]), &small_opts());
    let cache = r.cache("cache", 1 << 30);
    let scheduler = FetchScheduler::new(on_demand_only());
    let m = r.mount_over(&blob, cache.clone(), "mnt", &[], scheduler);
    let local = |f: &str| cache.contains(&m.fs().chunk_at(f, 0).unwrap().digest);

    assert!(std::fs::read(m.mountpoint().join("opt/bin/tool")).unwrap() == tool);
    wait_for("the library", || local("opt/lib/libsmall.so.1"));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..6 {
        assert!(
            !local(&format!("opt/bin/other{i}")),
            "an executable's neighbour"
        );
        assert!(
            !local(&format!("opt/lib/libother{i}.so")),
            "a library's neighbour"
        );
    }
    // A data file still brings its own.
    assert!(std::fs::read(m.mountpoint().join("opt/share/data0")).unwrap() == data[0]);
    assert!((1..6).all(|i| local(&format!("opt/share/data{i}"))));
    // So does a module a program loads itself (`dlopen`): the modules beside it are what
    // it loads next. Its own libraries come from the walk.
    assert!(std::fs::read(m.mountpoint().join("opt/modules/mod.so")).unwrap() == module);
    assert!((0..6).all(|i| local(&format!("opt/modules/other{i}.so"))));
    wait_for("the module's library", || local("opt/lib/libmodule.so.1"));
    m.unmount().unwrap();
}

/// A layer without prioritized files prefetches, once mounted, the dynamic loader and C
/// library the image has (every dynamically linked program reads them first), as the
/// container will see them: found through symlinks, only by the layer that holds them,
/// nothing else. With prioritized files, or with prefetch off, it does not guess.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_layer_without_prioritized_files_prefetches_the_loader_and_c_library() {
    let r = Remote::start();
    // Several chunks each, padded differently so that no two share a chunk.
    let pad = 3 * SMALL_CHUNK as usize;
    let (ld, libc, libm) = (
        elf_object(None, &[], None, pad),
        elf_object(None, &["ld-linux-x86-64.so.2"], None, pad + 1),
        elf_object(None, &["libc.so.6"], None, pad + 2),
    );
    let base = files_and_links_tar(
        &[
            ("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 0o755, &ld),
            ("usr/lib/x86_64-linux-gnu/libc.so.6", 0o755, &libc),
            ("usr/lib/x86_64-linux-gnu/libm.so.6", 0o644, &libm),
            ("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        ],
        &[
            ("lib", "usr/lib"),
            (
                "lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
        ],
    );
    let prog = elf_object(
        Some("/lib64/ld-linux-x86-64.so.2"),
        &["libc.so.6"],
        None,
        pad,
    );
    let app = files_and_links_tar(&[("usr/bin/prog", 0o755, &prog)], &[]);
    let (base_blob, app_blob) = (r.push(&base, &small_opts()), r.push(&app, &small_opts()));
    let whole = |cache: &ChunkCache, m: &MountedLayer, f: &str, len: usize| {
        (0..len as u64)
            .step_by(SMALL_CHUNK as usize)
            .all(|at| cache.contains(&m.fs().chunk_at(f, at).unwrap().digest))
    };
    let none = |cache: &ChunkCache, m: &MountedLayer, f: &str| {
        !cache.contains(&m.fs().chunk_at(f, 0).unwrap().digest)
    };

    let cache = r.cache("guessed", 1 << 30);
    let scheduler = FetchScheduler::new(prefetch_only());
    let low = r.mount_over(&base_blob, cache.clone(), "base", &[], scheduler.clone());
    wait_for("the loader's prefetch", || low.fs().is_prefetch_done());
    let loader = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
    let c = "usr/lib/x86_64-linux-gnu/libc.so.6";
    assert!(
        whole(&cache, &low, loader, ld.len()),
        "the loader, through two symlinks"
    );
    assert!(whole(&cache, &low, c, libc.len()), "the C library");
    assert!(none(&cache, &low, "usr/lib/x86_64-linux-gnu/libm.so.6"));
    assert!(none(&cache, &low, "etc/passwd"), "no neighbours come along");
    // The layer above holds neither: its mount fetches only its TOC.
    let requests = r.proxy.blob_requests();
    let up = r.mount_over(&app_blob, cache.clone(), "app", &[&low], scheduler);
    wait_for("the application layer's prefetch", || {
        up.fs().is_prefetch_done()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.proxy.blob_requests() - requests, 2, "footer and TOC only");
    assert!(none(&cache, &up, "usr/bin/prog"));
    // What was fetched reads like the tar, without another request.
    let requests = r.proxy.blob_requests();
    // (Through the mount, an absolute symlink would lead out of it: the paths themselves.)
    assert!(std::fs::read(low.mountpoint().join(loader)).unwrap() == ld);
    assert!(std::fs::read(low.mountpoint().join(c)).unwrap() == libc);
    assert_eq!(r.proxy.blob_requests(), requests);
    up.unmount().unwrap();
    low.unmount().unwrap();

    // Prioritized files say what to fetch; prefetch off fetches nothing ahead.
    let prioritized = r.push(&base, &prioritizing(&["etc/passwd"]));
    for (name, blob, opts) in [
        ("listed", &prioritized, prefetch_only()),
        ("off", &base_blob, on_demand_only()),
    ] {
        let cache = r.cache(name, 1 << 30);
        let m = r.mount_with(blob, cache.clone(), name, &opts);
        wait_for("the prefetch", || m.fs().is_prefetch_done());
        std::thread::sleep(Duration::from_millis(200));
        assert!(none(&cache, &m, loader) && none(&cache, &m, c), "{name}");
        m.unmount().unwrap();
    }
}

/// Over a link with a long round trip and bandwidth to spare, prefetch keeps as many
/// requests in flight as carry the bandwidth-delay product (not two): once the link is
/// measured, more than two spans are on their way at once.
#[test]
fn prefetch_fills_a_long_fast_link() {
    let r = Remote::start();
    let small = noise(10_000, 21);
    let big = noise(16 << 20, 22);
    let tar = files_tar(&[("small", &small), ("data/big", &big)]);
    let opts = ConvertOptions {
        chunk_size: 1 << 20,
        ..prioritizing(&["data/big"])
    };
    let blob = r.push(&tar, &opts);
    // A far registry: every answer 100 ms late, none slower for others in flight.
    r.proxy.set_latency(Some(Duration::from_millis(100)));
    let scheduler = FetchScheduler::new(prefetch_only());
    let before = r.proxy.blob_log().len();
    let m = r.mount_on(&blob, r.cache("c", 1 << 30), "mnt", scheduler.clone());
    // A small read measures the round trip; the first spans measure the throughput.
    assert!(std::fs::read(m.mountpoint().join("small")).unwrap() == small);
    wait_for("the prefetch", || m.fs().is_prefetch_done());
    let log = r.proxy.blob_log()[before..].to_vec();
    let most = log
        .iter()
        .map(|q| {
            log.iter()
                .filter(|o| o.arrived <= q.arrived && q.overlaps(o))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most >= 5,
        "at most {most} requests in flight together over {:?}: {log:?}",
        scheduler.link()
    );
    assert!(std::fs::read(m.mountpoint().join("data/big")).unwrap() == big);
    m.unmount().unwrap();
}
