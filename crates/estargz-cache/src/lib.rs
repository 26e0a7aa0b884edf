//! A persistent, content-addressed chunk cache.
//!
//! Chunks are stored by the sha256 of their uncompressed bytes, so identical chunks of
//! different layers and images are stored once, and the cache survives restarts. On disk:
//! `ROOT/chunks/ab/<64 hex>`; an in-memory LRU index (the `lru` crate) tracks sizes and
//! recency, and evicts least recently used chunks past the size cap.
//!
//! Safety: a chunk file is written under a temporary name in `ROOT/tmp` and renamed into
//! place only when complete, so no reader sees a partial chunk. The cache does not fsync,
//! so a crash of the machine can leave a renamed file whose data never reached the disk
//! (torn, or zeros). Such a file is never served: a chunk file is trusted only once its
//! content has been checked against its digest *during the current boot*, and a crash
//! means a new boot. Each file carries a mark, the extended attribute
//! `user.estargz.verified` holding the boot ID (`/proc/sys/kernel/random/boot_id`) under
//! which it was written from verified bytes or read whole and re-hashed. A file whose mark
//! is this boot's is read without hashing, by any process (a daemon restart, `estargz
//! mount` after an earlier mount); any other file is read whole and re-hashed on its first
//! read ([`ChunkCache::get`]), then marked; a damaged one is removed and reported as a miss.
//! Within a boot the page cache shows every process what was written, whether or not it
//! reached the disk, so the mark cannot outlive the data it vouches for. Where extended
//! attributes cannot be written, files are re-hashed once per process, as before the
//! marks. Once a file is trusted, [`ChunkCache::read_verified`] reads just the bytes asked
//! for (a random 4 KiB read costs a 4 KiB read, not a 4 MiB read and hash) and
//! [`ChunkCache::open_verified`] hands it out for FUSE passthrough. A file damaged while
//! the machine runs (by another root process) is then trusted like any other file on the
//! node's disk.
//!
//! Single flight: [`ChunkCache::get_or_fetch`] lets one caller fetch a missing chunk while
//! concurrent callers for the same chunk wait for its result; [`ChunkCache::claim`] does the
//! same for a span of chunks fetched with one request (prefetch, background fetch,
//! coalesced reads), so that no chunk is fetched twice at the same time.
//!
//! A full disk or an unwritable root does not fail reads: fetched chunks are returned, a
//! warning is logged and `write_errors` counts the failure.
//!
//! In front of the disk sits a small memory tier of recently read, decompressed chunks
//! ([`ChunkCache::memory_get`], [`ChunkCache::memory_put`]), bounded node-wide by
//! [`CacheConfig::memory_bytes`]: a large chunk is read by the kernel in 128 KiB pieces, and
//! without it every piece would re-read and re-hash the whole chunk file. One tier for the
//! node, not one per layer, so that memory does not grow with the number of mounted layers.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use estargz_format::Sha256Digest;
use lru::LruCache;

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Directory holding the cache.
    pub root: PathBuf,
    /// Size cap in bytes (chunk contents); least recently used chunks are evicted past it.
    pub max_bytes: u64,
    /// Size cap of the memory tier (decompressed chunks recently read), for the whole node.
    pub memory_bytes: usize,
}

impl CacheConfig {
    /// Default memory tier: 64 MiB, sixteen 4 MiB chunks.
    pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;
}

/// Counters and usage, readable at any time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that were not.
    pub misses: u64,
    /// Chunks stored.
    pub inserts: u64,
    /// Bytes stored.
    pub inserted_bytes: u64,
    /// Chunks evicted to stay under the cap.
    pub evictions: u64,
    /// Damaged chunk files found (and removed) on read.
    pub corrupt: u64,
    /// Chunks that could not be written (disk full, unwritable root).
    pub write_errors: u64,
    /// Fetches run by `get_or_fetch` (one per missing chunk, however many waited).
    pub fetches: u64,
    /// Chunks in the cache.
    pub entries: u64,
    /// Bytes of chunk content in the cache.
    pub usage_bytes: u64,
    /// The size cap.
    pub max_bytes: u64,
    /// Bytes of chunks in the memory tier.
    pub memory_bytes: u64,
    /// Reads answered by the memory tier.
    pub memory_hits: u64,
}

/// A fetch that failed; shared by every caller that waited for it.
#[derive(Clone)]
pub struct FetchError(pub Arc<dyn std::error::Error + Send + Sync>);

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    inserted_bytes: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    write_errors: AtomicU64,
    fetches: AtomicU64,
    memory_hits: AtomicU64,
}

/// Recently read chunks in memory, and their total size.
struct MemoryTier {
    lru: LruCache<Sha256Digest, Arc<[u8]>>,
    used: usize,
}

/// A chunk file in the index.
struct Entry {
    size: u64,
    /// Trusted by this process: written by it, read whole and checked against its digest,
    /// or marked verified during this boot.
    verified: bool,
}

struct Index {
    lru: LruCache<Sha256Digest, Entry>,
    usage: u64,
}

type FlightResult = Option<Result<Arc<[u8]>, FetchError>>;

struct Flight {
    result: Mutex<FlightResult>,
    done: Condvar,
}

/// The chunk cache. Share it (`Arc`) between every layer on the node.
pub struct ChunkCache {
    chunks: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    memory: Mutex<MemoryTier>,
    memory_cap: usize,
    inflight: Mutex<HashMap<Sha256Digest, Arc<Flight>>>,
    counters: Counters,
    tmp_seq: AtomicU64,
    /// This boot's ID, the value of verification marks; `None` if it cannot be read
    /// (then files are re-hashed once per process).
    boot_id: Option<String>,
}

/// The extended attribute marking a chunk file as verified during a boot (its value).
const VERIFIED_XATTR: &std::ffi::CStr = c"user.estargz.verified";

/// Whether the open `file` carries the verification mark of boot `boot_id`.
fn has_mark(file: &fs::File, boot_id: &str) -> bool {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 64];
    // SAFETY: an open descriptor, a NUL-terminated name, and a buffer of the length given.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            VERIFIED_XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0 && &buf[..n as usize] == boot_id.as_bytes()
}

/// Marks `file` as verified during boot `boot_id` (best effort).
fn set_mark(file: &fs::File, boot_id: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: an open descriptor, a NUL-terminated name, and a value of the length given.
    unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            VERIFIED_XATTR.as_ptr(),
            boot_id.as_ptr().cast(),
            boot_id.len(),
            0,
        );
    }
}

impl fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCache")
            .field("chunks", &self.chunks)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Ends a leader's flight exactly once: with its result, or as failed if the leader
/// unwinds before it has one.
struct FlightGuard<'a> {
    cache: &'a ChunkCache,
    digest: Sha256Digest,
    flight: Option<Arc<Flight>>,
}

impl FlightGuard<'_> {
    fn settle(&mut self, result: Result<Arc<[u8]>, FetchError>) {
        if let Some(flight) = self.flight.take() {
            self.cache.settle(&self.digest, &flight, result);
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.settle(Err(FetchError(Arc::new(std::io::Error::other(
            "the chunk fetch failed unexpectedly (panicked)",
        )))));
    }
}

/// Creates `dir` (and its parents) if needed and makes it private to its owner whatever the
/// umask: chunks of private images must not be readable by other local users.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChunkCache {
    /// Opens (or creates) the cache at `config.root`, indexing the chunks already there,
    /// oldest first, and removing leftovers of interrupted writes. Problems with the
    /// directory are logged, not fatal: the cache then stores nothing until they go away.
    pub fn open(config: &CacheConfig) -> ChunkCache {
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 64);
        if boot_id.is_none() {
            tracing::warn!("no boot ID in /proc/sys/kernel/random/boot_id; every process re-hashes each chunk file it reads first");
        }
        ChunkCache::open_in_boot(config, boot_id)
    }

    /// [`ChunkCache::open`] as if the machine's boot ID were `boot_id`: only marks of that
    /// boot are trusted (`None`: none are, nor made). For tests acting out a reboot.
    pub fn open_in_boot(config: &CacheConfig, boot_id: Option<String>) -> ChunkCache {
        let chunks = config.root.join("chunks");
        let tmp = config.root.join("tmp");
        for dir in [&config.root, &chunks, &tmp] {
            if let Err(e) = private_dir(dir) {
                tracing::warn!(dir = %dir.display(), error = %e,
                    "chunk cache directory cannot be created; chunks will be fetched every time");
            }
        }
        // Partial writes from before a crash are never served: drop them.
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let mut found: Vec<(SystemTime, Sha256Digest, u64)> = Vec::new();
        if let Ok(fans) = fs::read_dir(&chunks) {
            for fan in fans.flatten() {
                let Ok(files) = fs::read_dir(fan.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name();
                    let Some(digest) = name
                        .to_str()
                        .and_then(|n| format!("sha256:{n}").parse::<Sha256Digest>().ok())
                    else {
                        let _ = fs::remove_file(f.path());
                        continue;
                    };
                    if let Ok(meta) = f.metadata() {
                        let when = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((when, digest, meta.len()));
                    }
                }
            }
        }
        found.sort();
        let mut lru = LruCache::unbounded();
        let mut usage = 0;
        for (_, digest, size) in found {
            lru.put(
                digest,
                Entry {
                    size,
                    verified: false,
                },
            );
            usage += size;
        }
        let cache = ChunkCache {
            chunks,
            tmp,
            max_bytes: config.max_bytes,
            index: Mutex::new(Index { lru, usage }),
            memory: Mutex::new(MemoryTier {
                lru: LruCache::unbounded(),
                used: 0,
            }),
            memory_cap: config.memory_bytes,
            inflight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            tmp_seq: AtomicU64::new(0),
            boot_id,
        };
        cache.evict_to(config.max_bytes);
        cache
    }

    fn path_of(&self, digest: &Sha256Digest) -> PathBuf {
        let hex = digest.hex();
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// Whether the chunk is indexed (it may still turn out damaged when read).
    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        lock(&self.index).lru.contains(digest)
    }

    /// Whether the chunk is indexed with `size` bytes. A TOC names a chunk by digest and
    /// claims its size; the cache is shared by every layer, so a chunk another layer
    /// stored under that digest is this one only if the sizes agree (a hostile TOC can pair
    /// a cached digest with any size).
    pub fn holds(&self, digest: &Sha256Digest, size: u64) -> bool {
        lock(&self.index)
            .lru
            .peek(digest)
            .is_some_and(|e| e.size == size)
    }

    /// The chunk's file, opened, and whether it can be read without hashing it: this
    /// process verified it, or it carries this boot's mark (then remembered; the mark is
    /// read from the open file, so the path is walked once). `None` if the chunk is not
    /// indexed.
    fn open_indexed(&self, digest: &Sha256Digest) -> Option<(io::Result<fs::File>, bool)> {
        let verified = lock(&self.index).lru.get(digest).map(|e| e.verified)?;
        let file = fs::File::open(self.path_of(digest));
        if verified {
            return Some((file, true));
        }
        let marked = match (&file, &self.boot_id) {
            (Ok(f), Some(boot_id)) => has_mark(f, boot_id),
            _ => false,
        };
        if marked {
            if let Some(e) = lock(&self.index).lru.peek_mut(digest) {
                e.verified = true;
            }
        }
        Some((file, marked))
    }

    /// [`ChunkCache::open_indexed`], counting a chunk not indexed as a miss.
    fn open_or_miss(&self, digest: &Sha256Digest) -> Option<(io::Result<fs::File>, bool)> {
        let opened = self.open_indexed(digest);
        if opened.is_none() {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }

    /// The chunk, if cached and intact.
    pub fn get(&self, digest: &Sha256Digest) -> Option<Arc<[u8]>> {
        let (file, trusted) = self.open_or_miss(digest)?;
        self.load(digest, file, trusted)
            .map(|(_, data)| data.into())
    }

    /// The chunk's `file` (as [`ChunkCache::open_indexed`] opened it) read whole, hashed
    /// unless `trusted` (then trusted and marked for this boot); with the file. A damaged
    /// or unreadable file is forgotten (a miss).
    fn load(
        &self,
        digest: &Sha256Digest,
        file: io::Result<fs::File>,
        trusted: bool,
    ) -> Option<(fs::File, Vec<u8>)> {
        use std::io::Read;
        let read = file.and_then(|mut f| {
            let mut data = Vec::new();
            f.read_to_end(&mut data)?;
            Ok((f, data))
        });
        match read {
            Ok((file, data)) if trusted || Sha256Digest::of(&data) == *digest => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                if !trusted {
                    if let Some(e) = lock(&self.index).lru.peek_mut(digest) {
                        e.verified = true;
                    }
                    if let Some(b) = &self.boot_id {
                        set_mark(&file, b);
                    }
                }
                Some((file, data))
            }
            Ok(_) => {
                tracing::warn!(chunk = %digest, "damaged chunk file in the cache; removed");
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.forget(digest);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, error = %e, "unreadable chunk file; dropped");
                }
                self.forget(digest);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The chunk, if it is in the memory tier (verified when it was put there).
    pub fn memory_get(&self, digest: &Sha256Digest) -> Option<Arc<[u8]>> {
        let data = lock(&self.memory).lru.get(digest).cloned();
        if data.is_some() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
        }
        data
    }

    /// Keeps a verified, decompressed chunk in the memory tier, evicting the least recently
    /// used ones past the cap. `data` must hash to `digest`.
    pub fn memory_put(&self, digest: Sha256Digest, data: Arc<[u8]>) {
        if data.len() > self.memory_cap {
            return;
        }
        let mut m = lock(&self.memory);
        let len = data.len();
        if let Some(old) = m.lru.put(digest, data) {
            m.used -= old.len();
        }
        m.used += len;
        while m.used > self.memory_cap {
            match m.lru.pop_lru() {
                Some((_, old)) => m.used -= old.len(),
                None => break,
            }
        }
    }

    /// `len` bytes at `offset` of a cached chunk, read from its file without the rest, if
    /// this process has verified the file (a [`ChunkCache::get`] of it succeeded); `None`
    /// otherwise, or if the file is gone or shorter: then `get` the whole chunk.
    pub fn read_verified(&self, digest: &Sha256Digest, offset: u64, len: usize) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (Ok(f), true) = self.open_indexed(digest)? else {
            return None;
        };
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).ok()?;
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(buf)
    }

    /// The chunk's file, opened read-only, once this process has verified it (verifying it
    /// now, a whole read and hash, if it has not): for a reader that reads the file itself,
    /// such as the kernel through FUSE passthrough. `None` if the chunk is not cached or its
    /// file is damaged (then removed).
    pub fn open_verified(&self, digest: &Sha256Digest) -> Option<fs::File> {
        use std::io::Seek;
        let (file, trusted) = self.open_or_miss(digest)?;
        if trusted {
            return file.ok();
        }
        // Read through to hash it: back to the start for a reader of the file's position.
        let (mut file, _) = self.load(digest, file, false)?;
        file.rewind().ok()?;
        Some(file)
    }

    /// Links the cached file of `digest` at `dest` (a hard link: `dest` must be on the
    /// cache's file system), once this process has verified it ([`ChunkCache::open_verified`]).
    /// While the link exists (a layer served from local files without FUSE, see
    /// `estargz-layerfs`) the cache keeps the file and counts it: eviction passes it over.
    /// `Ok(false)` if the chunk is not cached or its file is damaged.
    pub fn link_verified(&self, digest: &Sha256Digest, dest: &Path) -> std::io::Result<bool> {
        let Some(file) = self.open_verified(digest) else {
            return Ok(false);
        };
        drop(file);
        match fs::hard_link(self.path_of(digest), dest) {
            Ok(()) => Ok(true),
            // Evicted between the check and the link.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// The most bytes the cache holds on disk.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The content of a file made of the cached chunks `parts` (in order) as one cached
    /// file of its own, keyed by the file's sha256 `digest`, opened read-only: for FUSE
    /// passthrough of a file of several chunks. Assembled once (a copy of the chunks, hashed
    /// as it is written) and cached and evicted like a chunk; `None` if a part is missing
    /// or the parts do not hash to `digest` (a TOC whose file digest lies gets nothing).
    pub fn assemble(&self, digest: &Sha256Digest, parts: &[Sha256Digest]) -> Option<fs::File> {
        use sha2::Digest as _;
        use std::io::Read;
        if self.contains(digest) {
            if let Some(f) = self.open_verified(digest) {
                return Some(f);
            }
        }
        let mut size = 0u64;
        let written = self.write_file_with(digest, |out| {
            let mut hash = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            for part in parts {
                let Some(mut f) = self.open_verified(part) else {
                    return Ok(false);
                };
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    size += n as u64;
                    // The same few chunks can be listed any number of times: stop before
                    // a file the cache could not hold fills its disk.
                    if size > self.max_bytes {
                        return Ok(false);
                    }
                    hash.update(&buf[..n]);
                    out.write_all(&buf[..n])?;
                }
            }
            if Sha256Digest::from(hash) != *digest {
                tracing::warn!(file = %digest, "a file's chunks do not hash to the digest its TOC gives; it is read through FUSE");
                return Ok(false);
            }
            Ok(true)
        });
        if !matches!(written, Ok(true)) {
            return None;
        }
        self.indexed(digest, size);
        // Opened before eviction can take it: an open file outlives its name.
        let file = fs::File::open(self.path_of(digest)).ok();
        self.evict_to(self.max_bytes);
        file
    }

    fn forget(&self, digest: &Sha256Digest) {
        let mut idx = lock(&self.index);
        if let Some(e) = idx.lru.pop(digest) {
            idx.usage -= e.size;
        }
        drop(idx);
        let _ = fs::remove_file(self.path_of(digest));
    }

    /// Stores a verified chunk (best effort). `data` must hash to `digest`; callers store
    /// only what they have verified. The file is marked verified for this boot.
    pub fn insert(&self, digest: &Sha256Digest, data: &[u8]) {
        let size = data.len() as u64;
        if size > self.max_bytes || self.contains(digest) {
            return;
        }
        let written = self.write_file_with(digest, |f| {
            f.write_all(data)?;
            Ok(true)
        });
        if let Err(e) = written {
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(chunk = %digest, error = %e,
                "cannot store chunk in the cache (disk full or unwritable?); serving it uncached");
            return;
        }
        self.indexed(digest, size);
        self.evict_to(self.max_bytes);
    }

    /// Enters a file of `size` bytes just written for `digest` in the index, as trusted:
    /// written by this process from verified bytes, which the page cache shows as written
    /// for as long as this boot lasts. Counts the insert; eviction is the caller's.
    fn indexed(&self, digest: &Sha256Digest, size: u64) {
        {
            let mut idx = lock(&self.index);
            let fresh = Entry {
                size,
                verified: true,
            };
            if let Some(old) = idx.lru.put(*digest, fresh) {
                idx.usage -= old.size;
            }
            idx.usage += size;
        }
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .inserted_bytes
            .fetch_add(size, Ordering::Relaxed);
    }

    /// Writes the cache file of `digest` under a temporary name with `fill`, marks it
    /// verified for this boot and renames it into place, if `fill` says to keep it
    /// (`Ok(true)`); otherwise, or on an error, removes it. Returns what `fill` said.
    fn write_file_with(
        &self,
        digest: &Sha256Digest,
        fill: impl FnOnce(&mut fs::File) -> std::io::Result<bool>,
    ) -> std::io::Result<bool> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("{}.{}.{seq}", digest.hex(), std::process::id()));
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
        };
        let result = (|| {
            let mut f = match create() {
                // The directory was removed under us (by hand, or a cleanup job): make it
                // again rather than fail every write until a restart.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %self.tmp.display(), "chunk cache directory vanished; creating it again");
                    private_dir(&self.tmp)?;
                    create()?
                }
                other => other?,
            };
            if !fill(&mut f)? {
                return Ok(false);
            }
            if let Some(b) = &self.boot_id {
                set_mark(&f, b);
            }
            let dest = self.path_of(digest);
            if let Some(dir) = dest.parent() {
                private_dir(dir)?;
            }
            fs::rename(&tmp, &dest)?;
            Ok(true)
        })();
        if !matches!(result, Ok(true)) {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes least recently used files until the cache holds at most `cap` bytes. A file
    /// linked elsewhere too ([`ChunkCache::link_verified`]: a layer served without FUSE)
    /// frees nothing when removed, and its bytes stay on disk while the cache would forget
    /// them (a later miss fetching them again): it is kept, counted, and moved to the most
    /// recently used end, as the mounted layer uses it. If only such files are left, the
    /// cache stays over `cap` until their layers are unmounted.
    fn evict_to(&self, cap: u64) {
        use std::os::unix::fs::MetadataExt;
        let mut kept = 0usize;
        loop {
            let (victim, entry) = {
                let mut idx = lock(&self.index);
                if idx.usage <= cap || kept >= idx.lru.len() {
                    return;
                }
                match idx.lru.pop_lru() {
                    Some((d, e)) => {
                        idx.usage -= e.size;
                        (d, e)
                    }
                    None => return,
                }
            };
            let path = self.path_of(&victim);
            if fs::symlink_metadata(&path).is_ok_and(|m| m.nlink() > 1) {
                let mut idx = lock(&self.index);
                if !idx.lru.contains(&victim) {
                    idx.usage += entry.size;
                    idx.lru.put(victim, entry);
                }
                kept += 1;
                continue;
            }
            let _ = fs::remove_file(path);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The chunk from the cache, or from `fetch` (which must return verified bytes) if
    /// missing; concurrent callers for the same missing chunk share one fetch (also one
    /// started by a [`ChunkCache::claim`]). The fetched chunk is stored (best effort) and
    /// returned even if it cannot be stored. If a fetch this caller waited for fails, it
    /// tries once more itself.
    pub fn get_or_fetch<E>(
        &self,
        digest: &Sha256Digest,
        fetch: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Arc<[u8]>, FetchError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut fetch = Some(fetch);
        let mut waited_failure = None;
        for _ in 0..2 {
            match self.try_get_or_fetch(digest, &mut fetch) {
                Ok(data) => return Ok(data),
                Err((e, true)) => return Err(e),
                Err((e, false)) => waited_failure = Some(e),
            }
        }
        Err(waited_failure.unwrap_or_else(|| unreachable!()))
    }

    /// One round of [`ChunkCache::get_or_fetch`]; errors say whether this caller led.
    fn try_get_or_fetch<E>(
        &self,
        digest: &Sha256Digest,
        fetch: &mut Option<impl FnOnce() -> Result<Vec<u8>, E>>,
    ) -> Result<Arc<[u8]>, (FetchError, bool)>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        if let Some(data) = self.get(digest) {
            return Ok(data);
        }
        let (flight, leader) = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(digest) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight {
                        result: Mutex::new(None),
                        done: Condvar::new(),
                    });
                    inflight.insert(*digest, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut slot = lock(&flight.result);
            while slot.is_none() {
                slot = flight.done.wait(slot).unwrap_or_else(|p| p.into_inner());
            }
            return slot
                .clone()
                .unwrap_or_else(|| unreachable!())
                .map_err(|e| (e, false));
        }
        // Whatever happens below, even a panic in `fetch`, the flight ends and its waiters
        // wake: an unsettled flight would hold every later reader of the chunk forever.
        let mut guard = FlightGuard {
            cache: self,
            digest: *digest,
            flight: Some(flight),
        };
        // The leader may have raced with an insert by a previous flight.
        let result = match self.get(digest) {
            Some(data) => Ok(data),
            None => {
                self.counters.fetches.fetch_add(1, Ordering::Relaxed);
                match fetch.take().map(|f| f()) {
                    Some(Ok(data)) => {
                        self.insert(digest, &data);
                        Ok(Arc::<[u8]>::from(data))
                    }
                    Some(Err(e)) => Err(FetchError(Arc::new(e))),
                    None => Err(FetchError(Arc::new(std::io::Error::other(
                        "chunk fetch already attempted",
                    )))),
                }
            }
        };
        guard.settle(result.clone());
        result.map_err(|e| (e, true))
    }

    /// Claims, for one fetch by this caller, those of `digests` that are neither cached nor
    /// being fetched by someone else. Concurrent [`ChunkCache::get_or_fetch`] calls for a
    /// claimed chunk wait for it. Hand each fetched, verified chunk to
    /// [`SpanClaim::fulfil`]; chunks still claimed when the claim is dropped are released
    /// as failed (their waiters then fetch them themselves).
    pub fn claim(&self, digests: &[Sha256Digest]) -> SpanClaim<'_> {
        let mut claimed = Vec::new();
        let mut inflight = lock(&self.inflight);
        for d in digests {
            if inflight.contains_key(d) || claimed.iter().any(|(c, _)| c == d) || self.contains(d) {
                continue;
            }
            let f = Arc::new(Flight {
                result: Mutex::new(None),
                done: Condvar::new(),
            });
            inflight.insert(*d, f.clone());
            claimed.push((*d, f));
        }
        drop(inflight);
        self.counters
            .fetches
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        SpanClaim {
            cache: self,
            claimed,
        }
    }

    fn settle(
        &self,
        digest: &Sha256Digest,
        flight: &Flight,
        result: Result<Arc<[u8]>, FetchError>,
    ) {
        // Out of the in-flight table first: a waiter woken by a failure tries once more, and
        // must start a new flight then, not find this settled one again.
        lock(&self.inflight).remove(digest);
        *lock(&flight.result) = Some(result);
        flight.done.notify_all();
    }

    /// Counters and usage now.
    pub fn stats(&self) -> CacheStats {
        let (entries, usage) = {
            let idx = lock(&self.index);
            (idx.lru.len() as u64, idx.usage)
        };
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            inserts: c.inserts.load(Ordering::Relaxed),
            inserted_bytes: c.inserted_bytes.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            entries,
            usage_bytes: usage,
            max_bytes: self.max_bytes,
            memory_bytes: lock(&self.memory).used as u64,
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
        }
    }

    /// Where the cache lives.
    pub fn root(&self) -> &Path {
        self.chunks.parent().unwrap_or(&self.chunks)
    }
}

/// Chunks one caller has claimed to fetch (see [`ChunkCache::claim`]).
pub struct SpanClaim<'a> {
    cache: &'a ChunkCache,
    claimed: Vec<(Sha256Digest, Arc<Flight>)>,
}

impl SpanClaim<'_> {
    /// Whether this caller must fetch `digest`.
    pub fn has(&self, digest: &Sha256Digest) -> bool {
        self.claimed.iter().any(|(d, _)| d == digest)
    }

    /// Whether nothing was claimed (everything is cached or being fetched already).
    pub fn is_empty(&self) -> bool {
        self.claimed.is_empty()
    }

    /// Stores a fetched and verified chunk and hands it to whoever waits for it.
    pub fn fulfil(&mut self, digest: &Sha256Digest, data: &[u8]) {
        let Some(i) = self.claimed.iter().position(|(d, _)| d == digest) else {
            return;
        };
        let (d, flight) = self.claimed.swap_remove(i);
        self.cache.insert(&d, data);
        self.cache.settle(&d, &flight, Ok(Arc::from(data)));
    }
}

impl Drop for SpanClaim<'_> {
    fn drop(&mut self) {
        for (d, flight) in std::mem::take(&mut self.claimed) {
            let e = std::io::Error::other("the fetch of this chunk's span failed");
            self.cache.settle(&d, &flight, Err(FetchError(Arc::new(e))));
        }
    }
}
