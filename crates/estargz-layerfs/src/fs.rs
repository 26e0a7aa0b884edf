//! The FUSE file system of one layer.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use estargz_cache::ChunkCache;
use estargz_format::{decompress_chunk, Chunk, Error, Sha256Digest, Toc};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request, SessionACL,
};

use crate::record::AccessOp;
use crate::scheduler::{adjacent, FetchScheduler};
use crate::source::BlobSource;
use crate::tree::{NodeKind, Tree};

mod deps;

/// The layer never changes: let the kernel cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// A read that misses a small file's chunk fetches, in the same round trip, the small files
/// of its directory nearest to it in blob order, up to this many compressed bytes in all: a
/// starting process opens file after file of one directory (a language runtime's
/// modules), and each would otherwise cost a round trip of its own. Not for a file a
/// program maps (an executable, or a library the dependency walk found): what a program
/// loads next is what it links, which the walk fetches, not what lies beside it.
const NEIGHBOUR_SPAN: u64 = 256 << 10;
/// Neighbours are looked for at most this many chunks away in blob order (entries of
/// subdirectories sit between a directory's files in tar order, and are skipped).
const NEIGHBOUR_SCAN: usize = 512;
/// Neighbours come in at most this many range requests (runs of adjacent chunks), sent at
/// once.
const NEIGHBOUR_RUNS: usize = 8;
/// A read that misses a chunk of a file of several chunks, at its start or right after a
/// local chunk, has the file's next chunks fetched ahead of it, up to this many compressed
/// bytes: a program maps its executable and libraries and touches them from start to end,
/// and a sequential reader reads on. Two default chunks (4 MiB each): with one, the next
/// request started only when the reader reached the chunk ahead, and a cold sequential
/// read of a 512 MiB file over a 100 Mbit/s, 20 ms link ran at 89 % of the link.
const READ_AHEAD: u64 = 8 << 20;
/// Read-ahead requests carry at most this many bytes, or one chunk.
const READ_AHEAD_REQUEST: u64 = 1 << 20;
/// A file a program maps (an executable, or an ELF object whose libraries were looked for:
/// a library the loader maps) is read ahead up to this many compressed bytes, and its last
/// chunk comes with its first: the loader touches its last pages (dynamic section, data,
/// relocations) right after its first, and the program the rest soon after. Over a
/// 1 Gbit/s link with a 50 ms round trip, gcc's `cc1` (8 chunks, 12 MB) took four round
/// trips one after another without: the first chunk, the last, the libraries the last
/// names, and a chunk past the first read-ahead.
const MAPPED_READ_AHEAD: u64 = 32 << 20;

/// Counters of one mounted layer, readable at any time. The FUSE manager copies every
/// field into its status (`LayerStatus` in estargz-snapshotter, which exports each as a
/// metric): a field added here is a compile error there until it is carried over.
#[derive(Debug, Default)]
pub struct LayerStats {
    /// Compressed bytes fetched from the source.
    pub fetched_bytes: AtomicU64,
    /// Range requests sent to the source.
    pub fetch_requests: AtomicU64,
    /// Fetches that completed: one per round trip (the range requests of one fetch are sent
    /// together), on-demand, prefetch and background alike.
    pub fetches: AtomicU64,
    /// Chunks fetched, verified and cached by this layer.
    pub fetched_chunks: AtomicU64,
    /// Reads that failed (the reader got EIO).
    pub read_errors: AtomicU64,
    /// File bytes returned to the kernel (what processes read, with the kernel's
    /// read-ahead).
    pub read_bytes: AtomicU64,
    /// Time the completed `fetches` took, in nanoseconds (with `fetches`, the mean round
    /// trip of a fetch).
    pub fetch_nanos: AtomicU64,
    /// Opens served in FUSE passthrough mode (the kernel reads the chunk file itself).
    pub passthrough_opens: AtomicU64,
    /// Chunks fetched for a reader and decoded as their bytes arrived.
    pub streamed_chunks: AtomicU64,
    /// Interpreters and libraries of executables read from this layer that it read ahead
    /// of the loader (in this layer or the layers below).
    pub dependency_files: AtomicU64,
}

/// A histogram of durations with fixed buckets, kept in atomics: observing costs two
/// relaxed additions and a search of `N` bounds, so it can sit on the read path.
#[derive(Debug)]
pub struct LatencyHistogram<const N: usize> {
    /// Upper bounds of the buckets, in nanoseconds, ascending; a duration equal to a bound
    /// falls into its bucket (Prometheus's `le`).
    bounds: [u64; N],
    /// Observations per bucket (not cumulative).
    counts: [AtomicU64; N],
    /// Observations above the last bound.
    over: AtomicU64,
    /// Sum of the observations, nanoseconds.
    sum_nanos: AtomicU64,
}

impl<const N: usize> LatencyHistogram<N> {
    /// A histogram with buckets up to each of `bounds` (ascending) and one above them.
    pub const fn new(bounds: [Duration; N]) -> Self {
        let mut nanos = [0u64; N];
        let mut i = 0;
        while i < N {
            nanos[i] = bounds[i].as_nanos() as u64;
            i += 1;
        }
        LatencyHistogram {
            bounds: nanos,
            counts: [const { AtomicU64::new(0) }; N],
            over: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds.partition_point(|&b| b < nanos);
        self.counts
            .get(bucket)
            .unwrap_or(&self.over)
            .fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The buckets' upper bounds, ascending (an unbounded last bucket follows them).
    pub fn bounds(&self) -> impl Iterator<Item = Duration> + '_ {
        self.bounds.iter().map(|&b| Duration::from_nanos(b))
    }

    /// Observations per bucket now, not cumulative: one count per bound, then the count
    /// above the last bound (`N + 1` in all; their sum is the number of observations).
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .chain(std::iter::once(&self.over))
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Sum of the observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Bounds of [`NodeStats::fetch_latency`]: a round trip to a registry takes a millisecond
/// on a fast local network and seconds over a slow link or on a large chunk.
const FETCH_BOUNDS: [Duration; 12] = [
    ms(1),
    ms(5),
    ms(10),
    ms(25),
    ms(50),
    ms(100),
    ms(250),
    ms(500),
    ms(1000),
    ms(2500),
    ms(5000),
    ms(10_000),
];

/// Bounds of [`NodeStats::read_latency`]: the fetch bounds, with finer ones below a
/// millisecond, where reads served from memory (microseconds) and from the disk cache
/// (a hundred microseconds or so) fall.
const READ_BOUNDS: [Duration; 15] = {
    let mut bounds = [Duration::ZERO; 15];
    bounds[0] = Duration::from_micros(100);
    bounds[1] = Duration::from_micros(250);
    bounds[2] = Duration::from_micros(500);
    let mut i = 0;
    while i < FETCH_BOUNDS.len() {
        bounds[3 + i] = FETCH_BOUNDS[i];
        i += 1;
    }
    bounds
};

/// Counters of every layer sharing one [`FetchScheduler`] (the node's, in the FUSE
/// manager): [`FetchScheduler::node_stats`].
///
/// Node-wide rather than per layer because a per-layer histogram disappears with its
/// layer: a node-wide sum over mounted layers would go down at every unmount, which
/// Prometheus takes for a counter reset. These only grow while the scheduler lives.
#[derive(Debug)]
pub struct NodeStats {
    /// How long on-demand fetches (a reader waiting) took, one observation per round
    /// trip, failed ones included (a request that ran into the read deadline is the
    /// latency its reader saw).
    pub fetch_latency: LatencyHistogram<12>,
    /// How long FUSE reads of regular files took, from the request reaching the layer's
    /// handler to the reply being sent (not the time the request queued in the kernel),
    /// errors included.
    pub read_latency: LatencyHistogram<15>,
}

impl Default for NodeStats {
    fn default() -> NodeStats {
        NodeStats {
            fetch_latency: LatencyHistogram::new(FETCH_BOUNDS),
            read_latency: LatencyHistogram::new(READ_BOUNDS),
        }
    }
}

/// The index of the first of a file's `chunks` (in file order) that ends after `offset`.
fn first_chunk(chunks: &[Chunk], offset: u64) -> usize {
    chunks.partition_point(|c| c.chunk_offset + c.size <= offset)
}

/// Whom a fetch is for.
#[derive(Clone, Copy)]
pub(crate) enum For<'a> {
    /// A reader waiting for these chunks (they also go to the memory tier): an on-demand
    /// fetch, which prefetch and background fetch make way for.
    Reader(&'a [Sha256Digest]),
    /// The next chunks of a file a process is reading: sent at once, even while that
    /// reader's own fetch is in flight (waiting for it would fetch a sequential reader's
    /// chunks one after another).
    ReadAhead,
    /// Prefetch or background fetch: waits until no on-demand fetch is in flight.
    Ahead,
}

/// `chunks` (in blob order) split into runs of neighbours in the blob.
fn runs(chunks: &[(u64, Chunk)]) -> impl Iterator<Item = &[(u64, Chunk)]> {
    chunks.chunk_by(|a, b| adjacent(&a.1, &b.1))
}

/// The compressed bytes a run of neighbouring chunks occupies.
fn span_of(run: &[(u64, Chunk)]) -> std::ops::Range<u64> {
    let start = run.first().map_or(0, |(_, c)| c.offset);
    let end = run
        .iter()
        .map(|(_, c)| c.compressed_end)
        .max()
        .unwrap_or(start);
    start..end
}

/// One layer, ready to mount: a cheap handle to state shared by the FUSE session and the
/// prefetch and background-fetch threads.
#[derive(Clone)]
pub struct LayerFs(Arc<Inner>);

/// The state behind a [`LayerFs`].
pub struct Inner {
    tree: Tree,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    scheduler: Arc<FetchScheduler>,
    stats: Arc<LayerStats>,
    /// Distinct chunk digests of the layer.
    pub(crate) distinct_chunks: u64,
    /// Those of them that were in the cache when the layer was made.
    pub(crate) local_at_start: u64,
    /// Unmounted: nothing more is fetched for it.
    closed: std::sync::atomic::AtomicBool,
    /// This layer, for handing work to the scheduler.
    me: std::sync::Weak<Inner>,
    prefetch_done: std::sync::atomic::AtomicBool,
    /// The mount's kernel read-ahead setting and the value last written to it, for a
    /// layer with page profiles: set at each open until the prefetch is done (see
    /// [`Inner::read_ahead_at_open`]).
    read_ahead_knob: Mutex<Option<(PathBuf, u32)>>,
    background_done: std::sync::atomic::AtomicBool,
    /// The kernel agreed to FUSE passthrough at init (and the options ask for it).
    passthrough: std::sync::atomic::AtomicBool,
    /// Open files by inode: how each is open, so that every open of an inode agrees with
    /// the kernel's mode for it (see [`Opens`]).
    opens: Mutex<HashMap<u64, Opens>>,
    /// A file larger than [`MAX_ASSEMBLED`] is being assembled in the background (one at
    /// a time per layer: each copies up to gigabytes).
    assembling: std::sync::atomic::AtomicBool,
    /// Where first touches of files go, and this layer's index there (`estargz optimize`).
    recorder: std::sync::OnceLock<(Arc<crate::record::AccessRecorder>, usize)>,
    /// The layers below this one in the image, nearest first (see [`LayerFs::set_lowers`]).
    lowers: std::sync::OnceLock<Vec<std::sync::Weak<Inner>>>,
    /// ELF objects of this layer whose libraries were looked for (`deps`), each with
    /// whether a walk reached it as another object's library.
    deps_seen: Mutex<HashMap<u64, bool>>,
    /// Serving the layer without FUSE once its content is local (`local`).
    local: Mutex<LocalState>,
}

/// Where a layer is rebuilt for serving without FUSE, and its mount once done.
#[derive(Default)]
struct LocalState {
    /// The directory to build in, once asked for.
    target: Option<PathBuf>,
    building: bool,
    /// Asked again while building: the build may have counted before the last chunk.
    again: bool,
    mounted: Option<crate::local::LocalMount>,
    /// A thread waits for a quiet moment to check whether the layer is local
    /// ([`Inner::check_local_soon`]).
    checking: bool,
    /// Asked to check since that thread last checked.
    recheck: bool,
}

/// Calls `call` once, when no more than `lead` bytes of a transfer are left to arrive (not
/// at all without a `lead`).
struct NearEnd<'a> {
    left: u64,
    /// The lead and the call, until it is made.
    pending: Option<(u64, &'a dyn Fn())>,
}

impl<'a> NearEnd<'a> {
    fn new(total: u64, lead: Option<u64>, call: Option<&'a dyn Fn()>) -> NearEnd<'a> {
        NearEnd {
            left: total,
            pending: lead.zip(call),
        }
    }

    /// `n` more bytes arrived.
    fn arrived(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n as u64);
        if let Some((lead, call)) = self.pending {
            if self.left <= lead {
                self.pending = None;
                call();
            }
        }
    }
}

/// Whether `e` is a fetch that missed the source's deadline (`RegistrySource::with_deadline`):
/// a reader has waited as long as it may.
fn deadline_passed(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut)
}

/// A reader that tells `tap` how many bytes each read gave.
struct Tapped<'a, R> {
    inner: R,
    tap: &'a mut dyn FnMut(usize),
}

impl<R: io::Read> io::Read for Tapped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.tap)(n);
        Ok(n)
    }
}

/// A range smaller than this is fetched whole and then decoded, and so is a chunk of a
/// streamed range: decoding it takes little.
const STREAM_MIN: u64 = 64 << 10;
/// A chunk that takes at least this long to arrive is decoded as it arrives.
const STREAM_AFTER: Duration = Duration::from_millis(5);

/// How an inode is open. The kernel keeps one I/O mode per inode: while any open reads
/// through FUSE (cached), a passthrough open fails with EIO, and while a backing file is
/// in use every new open must use the same one. So a file is opened in passthrough mode
/// only when no cached open of it is left, and then shares the backing file until its last
/// passthrough open is released.
#[derive(Default)]
struct Opens {
    cached: u32,
    backing: Option<(Arc<fuser::BackingId>, u32)>,
}

impl std::ops::Deref for LayerFs {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl LayerFs {
    /// A file system for the layer described by `toc`, reading from `source` through
    /// `cache`, prefetched and fetched in the background by `scheduler` once mounted.
    /// Keeps a compact inode table built from the TOC, not the TOC itself.
    pub fn new(
        toc: &Toc,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
        scheduler: Arc<FetchScheduler>,
    ) -> LayerFs {
        let tree = Tree::build(toc);
        let (distinct_chunks, local_at_start) = count_chunks(&tree, &cache);
        LayerFs(Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            tree,
            source,
            cache,
            scheduler,
            stats: Arc::new(LayerStats::default()),
            distinct_chunks,
            local_at_start,
            closed: Default::default(),
            prefetch_done: Default::default(),
            read_ahead_knob: Default::default(),
            background_done: Default::default(),
            passthrough: Default::default(),
            opens: Default::default(),
            assembling: Default::default(),
            recorder: Default::default(),
            lowers: Default::default(),
            deps_seen: Default::default(),
            local: Default::default(),
        }))
    }

    /// The layers below this one in the image, nearest first, as overlayfs stacks them
    /// for a container (stopping where a layer below is not a lazy layer): where an
    /// executable read from this layer finds its libraries. Set once, before mounting;
    /// later calls are ignored. Holds them weakly: an unmounted layer is not kept.
    pub fn set_lowers(&self, lowers: &[LayerFs]) {
        let _ = self
            .lowers
            .set(lowers.iter().map(|l| Arc::downgrade(&l.0)).collect());
    }

    /// Reports the first touch of each regular file and symlink of this layer to
    /// `recorder`, as layer number `layer` (its position in the image, lowest first).
    /// Set once, before mounting; later calls are ignored.
    pub fn record_into(&self, recorder: Arc<crate::record::AccessRecorder>, layer: usize) {
        let _ = self.recorder.set((recorder, layer));
    }
}

/// Largest file of several chunks assembled as one local file for passthrough when it is
/// opened: the open waits for the copy and hash (tens of milliseconds); larger files are
/// assembled in the background, and read through FUSE until then.
const MAX_ASSEMBLED: u64 = 64 << 20;

/// The file handle of a regular file opened in passthrough mode.
const PASSTHROUGH_FH: u64 = 1;
/// The file handle of a regular file read through FUSE.
const CACHED_FH: u64 = 2;

impl Inner {
    /// Tells the recorder, if any, that `ino` was touched by `op` (`read`: the bytes).
    /// `name` is the name it was looked up by, under `parent` (a hardlink's path is the
    /// one the workload used).
    fn touch(
        &self,
        ino: u64,
        op: AccessOp,
        read: Option<std::ops::Range<u64>>,
        name: Option<(u64, &str)>,
    ) {
        let Some((recorder, layer)) = self.recorder.get() else {
            return;
        };
        let Some(node) = self.tree.node(ino) else {
            return;
        };
        if !matches!(node.kind, NodeKind::File | NodeKind::Symlink) {
            return;
        }
        recorder.touch(*layer, ino, op, read, || {
            let path = match name {
                Some((1, n)) => n.to_string(),
                Some((parent, n)) => format!("{}/{n}", self.tree.path(parent)),
                None => self.tree.path(ino),
            };
            (path, node.kind == NodeKind::Symlink, node.size)
        });
    }

    fn lock_opens(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Opens>> {
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's whole content as one local, verified file, if it is local: a file of one
    /// chunk is its chunk file; a file of several (with a whole-file digest in the TOC) is
    /// assembled from its chunks once, and cached under that digest (checked as it is
    /// written): at this open up to [`MAX_ASSEMBLED`] bytes, in the background for larger
    /// files (this open reads through FUSE, later ones get the assembled file).
    fn local_content(&self, ino: u64, node: &crate::tree::Node) -> Option<std::fs::File> {
        match self.local_digest(ino, node)? {
            (digest, None) => self.cache.open_verified(&digest),
            (digest, Some(parts)) => {
                if node.size <= MAX_ASSEMBLED || self.cache.holds(&digest, node.size) {
                    return self.cache.assemble(&digest, &parts);
                }
                self.assemble_in_background(digest, parts);
                None
            }
        }
    }

    /// The cache key of file `ino`'s whole content if its chunks are local: its chunk's
    /// digest for a file of one chunk; for a file of several, its whole-file digest from
    /// the TOC and the chunks to assemble it from (`Some`), if the chunks tile the file.
    pub(crate) fn local_digest(
        &self,
        ino: u64,
        node: &crate::tree::Node,
    ) -> Option<(Sha256Digest, Option<Vec<Sha256Digest>>)> {
        match self.tree.chunks(node) {
            [c] if c.chunk_offset == 0 && c.size == node.size => self
                .cache
                .holds(&c.digest, c.size)
                .then_some((c.digest, None)),
            [] | [_] => None,
            chunks => {
                let digest = self.tree.file_digest(ino)?;
                // The chunks must tile the file exactly, or the assembled file would not be
                // the file FUSE reads show (a hostile TOC could leave gaps or overlaps).
                let mut at = 0;
                let tiled = chunks.iter().all(|c| {
                    let next = (c.chunk_offset == at)
                        .then(|| at.checked_add(c.size))
                        .flatten();
                    at = next.unwrap_or(u64::MAX);
                    next.is_some()
                }) && at == node.size;
                // Nor can a file be one the cache could not hold: a hostile TOC can list
                // one cached chunk a million times, a file of terabytes to write out.
                if !tiled
                    || node.size > self.cache.max_bytes() / 2
                    || !chunks.iter().all(|c| self.cache.holds(&c.digest, c.size))
                {
                    return None;
                }
                Some((digest, Some(chunks.iter().map(|c| c.digest).collect())))
            }
        }
    }

    /// Assembles the file of whole-file `digest` from its chunks `parts` on a thread of its
    /// own, unless another assembly of this layer is running.
    fn assemble_in_background(&self, digest: Sha256Digest, parts: Vec<Sha256Digest>) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if self.assembling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("estargz-assemble".into())
            .spawn(move || {
                // A copy of up to gigabytes: behind the containers' own reads and writes.
                yield_to_containers();
                let started = std::time::Instant::now();
                let done = me.cache.assemble(&digest, &parts).is_some();
                tracing::debug!(file = %digest, done, ms = started.elapsed().as_millis() as u64,
                    "large file assembled for passthrough");
                me.assembling.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.assembling.store(false, Ordering::Release);
        }
    }

    /// Opens inode `ino` (`node`, a regular file): in passthrough mode, returning the
    /// backing file's ID, if the kernel agreed to passthrough, the file's content is local
    /// as one verified file ([`Inner::local_content`]), and no open of it reads through
    /// FUSE; otherwise counts a cached open and returns `None`.
    fn passthrough_open(
        &self,
        ino: u64,
        node: &crate::tree::Node,
        reply: &ReplyOpen,
    ) -> Option<Arc<fuser::BackingId>> {
        let eligible = self.passthrough.load(Ordering::Relaxed) && {
            let o = self.lock_opens();
            match o.get(&ino) {
                Some(Opens {
                    backing: Some(_), ..
                }) => true,
                Some(o) => o.cached == 0,
                None => true,
            }
        };
        // Verifying a chunk file the first time reads and hashes it, and assembling a file
        // of several chunks copies them: not under the lock.
        let file = if eligible {
            self.local_content(ino, node)
        } else {
            None
        };
        let mut opens = self.lock_opens();
        let o = opens.entry(ino).or_default();
        if let Some((id, n)) = &mut o.backing {
            *n += 1;
            return Some(id.clone());
        }
        match file {
            Some(file) if o.cached == 0 => match reply.open_backing(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    o.backing = Some((id.clone(), 1));
                    return Some(id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; \
                        this layer reads through FUSE");
                    self.passthrough.store(false, Ordering::Relaxed);
                }
            },
            _ => {}
        }
        o.cached += 1;
        None
    }
}

/// Puts the calling thread behind the node's containers: nice 10 for the CPU, and the idle
/// I/O class for the disk (which the mq-deadline and BFQ schedulers honour), for work that
/// copies or hashes whole files while containers may be starting.
fn yield_to_containers() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: plain calls about this thread's own ID, with integer arguments.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS as _, tid as _, 10);
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
}

/// The distinct chunk digests of `tree`, and how many of them `cache` holds: once per
/// layer, so that [`LayerFs::progress`] need not walk the chunks.
fn count_chunks(tree: &Tree, cache: &ChunkCache) -> (u64, u64) {
    let mut digests: Vec<Sha256Digest> =
        tree.chunks_in_blob_order().map(|(_, c)| c.digest).collect();
    digests.sort_unstable();
    digests.dedup();
    let local = digests.iter().filter(|d| cache.contains(d)).count();
    (digests.len() as u64, local as u64)
}

impl Inner {
    pub(crate) fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The chunk holding byte `offset` of the regular file at `path` (relative to the layer
    /// root, as in the TOC): the lookups a read makes, the kernel's per-component `lookup`
    /// and the chunk search, for debugging and benchmarks.
    pub fn chunk_at(&self, path: &str, offset: u64) -> Option<Chunk> {
        let mut ino = 1; // the root
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            ino = self.tree.child(ino, part)?;
        }
        let chunks = self.tree.chunks(self.tree.node(ino)?);
        chunks[first_chunk(chunks, offset)..]
            .first()
            .copied()
            .filter(|c| c.chunk_offset <= offset)
    }

    /// Heap bytes of the inode table (names, attributes, chunk index) of this layer.
    pub fn index_bytes(&self) -> usize {
        self.tree.heap_bytes()
    }

    /// Decompresses and verifies chunk `c` of inode `ino`, naming the file on failure.
    pub(crate) fn decompress(&self, ino: u64, bytes: &[u8], c: &Chunk) -> Result<Vec<u8>, Error> {
        decompress_chunk(bytes, "", c).map_err(|e| self.named(ino, e))
    }

    /// [`Inner::decompress`] from a reader of the chunk's compressed bytes, decoding as
    /// they come ([`estargz_format::decompress_chunk_from`]).
    fn decompress_from(&self, ino: u64, bytes: impl io::Read, c: &Chunk) -> Result<Vec<u8>, Error> {
        estargz_format::decompress_chunk_from(bytes, "", c).map_err(|e| self.named(ino, e))
    }

    /// A chunk's error `e` with the name of file `ino` in it: the decoder is given none, so
    /// that no path is built for the chunks that decode.
    fn named(&self, ino: u64, e: Error) -> Error {
        match e {
            Error::BadChunk {
                chunk_offset,
                offset,
                detail,
                ..
            } => Error::BadChunk {
                name: self.tree.path(ino),
                chunk_offset,
                offset,
                detail,
            },
            Error::ChunkDigestMismatch {
                chunk_offset,
                offset,
                expected,
                actual,
                ..
            } => Error::ChunkDigestMismatch {
                name: self.tree.path(ino),
                chunk_offset,
                offset,
                expected,
                actual,
            },
            other => other,
        }
    }

    pub(crate) fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// Whether the layer was unmounted.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_prefetch_done(&self) {
        self.prefetch_done.store(true, Ordering::SeqCst);
        // The files with a page profile are whole now: a fault's window waits for nothing.
        if let Some((knob, kb)) = crate::scheduler::lock(&self.read_ahead_knob).take() {
            if kb != KERNEL_READ_AHEAD_KB {
                set_kernel_read_ahead(&knob, KERNEL_READ_AHEAD_KB);
            }
        }
    }

    /// The kernel read-ahead for a file of this layer opened now, in KiB: none while the
    /// prefetch of a layer with page profiles runs, unless the registry is on the local
    /// network ([`LinkEstimate::is_local_network`]). A fault in a page no start read
    /// would ask for the 1 MiB around it, and the reader would wait for chunks no start
    /// read either, instead of one 64 KiB chunk; from a local registry 1 MiB comes about
    /// as soon, and a program opened while the prefetch runs is read through FUSE a page
    /// at a time for its life (the kernel copies the setting into the file at open).
    ///
    /// [`LinkEstimate::is_local_network`]: crate::scheduler::LinkEstimate::is_local_network
    fn read_ahead_at_open(&self) -> u32 {
        if self.is_prefetch_done() || self.scheduler.link().is_local_network() {
            KERNEL_READ_AHEAD_KB
        } else {
            0
        }
    }

    /// Sets the mount's read-ahead for a file being opened, on a layer with page profiles
    /// whose prefetch runs. The kernel copies the mount's setting into the file
    /// right after the open's answer; the lock keeps two opens here from interleaving
    /// their writes, though an open answered just before another's write may still get
    /// the other's value (it then reads ahead, or not, for its life: a matter of speed
    /// only).
    fn set_read_ahead_for_open(&self) {
        let mut knob = crate::scheduler::lock(&self.read_ahead_knob);
        if let Some((path, kb)) = knob.as_mut() {
            let wanted = self.read_ahead_at_open();
            if *kb != wanted {
                set_kernel_read_ahead(path, wanted);
                *kb = wanted;
            }
        }
    }

    pub(crate) fn mark_background_done(&self) {
        self.background_done.store(true, Ordering::SeqCst);
        self.check_local_soon();
    }

    /// Called after this layer stored a chunk in the cache. Reads alone can make a layer
    /// local (without a background fetch, or before it gets there), so a layer that
    /// [`Inner::may_be_local`] is checked at the next quiet moment.
    fn chunk_stored(&self) {
        if self.may_be_local() && !self.is_background_done() {
            self.check_local_soon();
        }
    }

    /// Whether this layer has stored about as many chunks as were missing when it was
    /// made: only then is checking every file ([`Inner::files_local`], exact) worth it.
    /// A cheap filter, not a count of what is local: chunks of hidden entries may never be
    /// fetched, and a chunk another layer stored first is not counted here (such a layer
    /// waits for its background fetch or its next mount).
    fn may_be_local(&self) -> bool {
        /// Chunks of a layer no reader fetches: its two landmark files at most.
        const HIDDEN_CHUNKS: u64 = 2;
        let stored = self.stats.fetched_chunks.load(Ordering::Relaxed);
        let missing = self.distinct_chunks.saturating_sub(self.local_at_start);
        stored.saturating_add(HIDDEN_CHUNKS) >= missing
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks on a thread of its own, after a quiet second on the node and at low CPU
    /// priority, whether every file of the layer is local, and if so serves it without
    /// FUSE ([`Inner::go_local`]: it hashes and copies); again after each later call that
    /// came while it was checking. Nothing without a target or once served.
    fn check_local_soon(&self) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        {
            let mut st = self.lock_local();
            if st.target.is_none() || st.mounted.is_some() {
                return;
            }
            st.recheck = true;
            if std::mem::replace(&mut st.checking, true) {
                return;
            }
        }
        let spawned = std::thread::Builder::new()
            .name("estargz-local".into())
            .spawn(move || {
                // Hashing and copying can wait for containers to start: after a quiet
                // second on the node, and behind their processes for the CPU and disk.
                yield_to_containers();
                loop {
                    me.scheduler
                        .wait_idle(Duration::from_secs(1), || me.is_closed());
                    me.lock_local().recheck = false;
                    let mounted = me.go_local_logged();
                    let mut st = me.lock_local();
                    if mounted || me.is_closed() || !st.recheck {
                        st.checking = false;
                        return;
                    }
                }
            });
        if spawned.is_err() {
            self.lock_local().checking = false;
        }
    }

    /// [`Inner::go_local`], its errors logged: whether the layer is served without FUSE.
    fn go_local_logged(&self) -> bool {
        match self.go_local() {
            Ok(mounted) => mounted,
            Err(e @ crate::local::LocalError::NotLocal(_)) => {
                tracing::debug!(error = %e, "layer stays on FUSE");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e,
                    "cannot serve a local layer without FUSE; it stays on FUSE");
                false
            }
        }
    }

    /// If every file of the layer is local and a target was given, rebuilds the layer
    /// there and mounts it (see `local`): `Ok(true)` once mounted.
    fn go_local(&self) -> Result<bool, crate::local::LocalError> {
        let dir = {
            let mut st = self.lock_local();
            let Some(target) = st.target.clone() else {
                return Ok(false);
            };
            if st.mounted.is_some() {
                return Ok(true);
            }
            if st.building {
                st.again = true;
                return Ok(false);
            }
            st.building = true;
            st.again = false;
            target
        };
        loop {
            let result = self.build_and_mount(&dir);
            let mut st = self.lock_local();
            if matches!(result, Ok(false)) && st.again && !self.is_closed() {
                st.again = false;
                continue;
            }
            st.building = false;
            return result;
        }
    }

    /// [`Inner::go_local`]'s work, while it holds the `building` claim.
    fn build_and_mount(&self, dir: &Path) -> Result<bool, crate::local::LocalError> {
        if self.is_closed() || !self.files_local() {
            return Ok(false);
        }
        let dir = crate::local::new_build_dir(dir);
        // A chunk evicted since the check ends the build here.
        let layer = match self.build_local(&dir) {
            Err(crate::local::LocalError::NotLocal(_)) => return Ok(false),
            other => other?,
        };
        let mut st = self.lock_local();
        // Unmounted meanwhile: `MountedLayer::unmount` took what was mounted under
        // this lock after closing, so nothing may be mounted now.
        if self.is_closed() {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(false);
        }
        let mounted = layer.mount(&dir).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        tracing::info!(at = %dir.display(), "layer content all local: served without FUSE");
        st.mounted = Some(mounted);
        Ok(true)
    }

    /// Whether the prefetch of prioritized files finished.
    pub fn is_prefetch_done(&self) -> bool {
        self.prefetch_done.load(Ordering::SeqCst)
    }

    /// Whether the background fetch finished (the whole layer is local).
    pub fn is_background_done(&self) -> bool {
        self.background_done.load(Ordering::SeqCst)
    }

    /// The layer's counters.
    pub fn stats(&self) -> Arc<LayerStats> {
        self.stats.clone()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.tree.node(ino)?;
        let (kind, size) = match n.kind {
            NodeKind::Dir => (FileType::Directory, 4096),
            NodeKind::Symlink => (
                FileType::Symlink,
                self.tree.link_target(n).map_or(0, |t| t.len() as u64),
            ),
            k => (file_type(k), n.size),
        };
        let mtime = if n.mtime >= 0 {
            UNIX_EPOCH + Duration::new(n.mtime as u64, n.mtime_nanos)
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(n.mtime.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: n.mode as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Claims the chunks of `chunks` (file inode, chunk; in blob order) that nobody has or is
    /// fetching, and fetches those with one range request per run of neighbours in the blob
    /// (chunks sharing a gzip member count as neighbours), verifying and caching each.
    /// A reader's chunks also go to the cache's memory tier.
    pub(crate) fn fetch_claimed(
        &self,
        chunks: &[(u64, Chunk)],
        whom: For<'_>,
        near_end: Option<&dyn Fn()>,
    ) -> io::Result<()> {
        let digests: Vec<Sha256Digest> = chunks.iter().map(|(_, c)| c.digest).collect();
        let mut claim = self.cache.claim(&digests);
        if claim.is_empty() {
            return Ok(());
        }
        let mut mine: Vec<(u64, Chunk)> = chunks
            .iter()
            .filter(|(_, c)| claim.has(&c.digest))
            .copied()
            .collect();
        let hot = match whom {
            For::Reader(hot) => hot,
            For::ReadAhead | For::Ahead => &[],
        };
        let mut runs: Vec<&[(u64, Chunk)]> = runs(&mine).collect();
        // A reader's runs of chunks that follow each other (no shared gzip member), if
        // long enough on this link to decode as they arrive.
        let streamable = matches!(whom, For::Reader(_))
            && runs
                .iter()
                .all(|r| r.windows(2).all(|w| w[0].1.compressed_end == w[1].1.offset))
            && self.worth_streaming(
                runs.iter()
                    .map(|r| span_of(r))
                    .map(|r| r.end - r.start)
                    .sum(),
            );
        if streamable {
            let wanted: Vec<Sha256Digest> = mine.iter().map(|(_, c)| c.digest).collect();
            let streamed = self.fetch_streamed(&runs, &wanted, near_end, |c, data| {
                self.stats.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                claim.fulfil(&c.digest, &data);
                self.chunk_stored();
                if hot.contains(&c.digest) {
                    self.cache.memory_put(c.digest, data.into());
                }
            });
            match streamed {
                Ok(()) => return Ok(()),
                // The read's deadline is spent: no second try.
                Err(e) if deadline_passed(&e) => return Err(io::Error::other(e)),
                // What arrived intact is stored; the rest is fetched again, whole.
                Err(e) => tracing::debug!(error = %e,
                    "streamed fetch failed; fetching what is missing again"),
            }
            mine.retain(|(_, c)| claim.has(&c.digest));
            runs = self::runs(&mine).collect();
        }
        let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|r| span_of(r)).collect();
        for (run, bytes) in runs.iter().zip(self.fetch_ranges(&ranges, whom)?) {
            self.store(run, &bytes, &mut claim, hot)?;
        }
        Ok(())
    }

    /// Fetches the neighbouring chunks of `span` in requests of at most `piece` bytes,
    /// calling `pause` before each (it waits until a request may go; `false` abandons the
    /// span), then verifies and caches those chunks nobody else has fetched meanwhile.
    /// Nothing is claimed while the requests run, so that a reader never waits for a span
    /// that pauses for it.
    pub(crate) fn fetch_paced(
        &self,
        span: &[(u64, Chunk)],
        piece: u64,
        mut pause: impl FnMut() -> bool,
    ) -> io::Result<()> {
        let range = span_of(span);
        let mut bytes = Vec::with_capacity((range.end - range.start) as usize);
        let mut at = range.start;
        while at < range.end {
            if !pause() {
                return Ok(());
            }
            let end = range.end.min(at + piece.max(1));
            bytes.extend_from_slice(&self.fetch_range(at..end, For::Ahead)?);
            at = end;
        }
        let digests: Vec<Sha256Digest> = span.iter().map(|(_, c)| c.digest).collect();
        let mut claim = self.cache.claim(&digests);
        self.store(span, &bytes, &mut claim, &[])
    }

    /// Verifies and caches the claimed chunks of `run`, whose bytes (from the run's first
    /// offset) are `bytes`.
    fn store(
        &self,
        run: &[(u64, Chunk)],
        bytes: &[u8],
        claim: &mut estargz_cache::SpanClaim<'_>,
        hot: &[Sha256Digest],
    ) -> io::Result<()> {
        let start = span_of(run).start;
        for (ino, c) in run {
            if !claim.has(&c.digest) {
                continue; // someone else's, or the same content twice in this run
            }
            let from = (c.offset - start) as usize;
            let to = (c.compressed_end - start) as usize;
            let data = self
                .decompress(*ino, &bytes[from..to], c)
                .map_err(io::Error::other)?;
            self.stats.fetched_chunks.fetch_add(1, Ordering::Relaxed);
            claim.fulfil(&c.digest, &data);
            self.chunk_stored();
            if hot.contains(&c.digest) {
                self.cache.memory_put(c.digest, data.into());
            }
        }
        Ok(())
    }

    /// Chunk `c` of inode `ino` fetched for a reader and verified: decoded as its bytes
    /// arrive where that saves time ([`Inner::worth_streaming`]); fetched whole and then
    /// decoded otherwise, or if that failed (wrong bytes, a broken connection: the whole
    /// fetch comes with the source's retries).
    fn fetch_chunk(
        &self,
        ino: u64,
        c: &Chunk,
        near_end: Option<&dyn Fn()>,
    ) -> Result<Vec<u8>, Error> {
        let range = c.offset..c.compressed_end;
        if self.worth_streaming(range.end - range.start) {
            let mut got = None;
            let one: &[(u64, Chunk)] = &[(ino, *c)];
            match self.fetch_streamed(&[one], &[c.digest], near_end, |_, data| got = Some(data)) {
                Ok(()) => {
                    return got.ok_or_else(|| {
                        Error::io("fetching a chunk", io::Error::other("no chunk decoded"))
                    })
                }
                Err(e) if deadline_passed(&e) => return Err(e),
                Err(e) => tracing::debug!(file = %self.tree.path(ino), error = %e,
                    "streamed chunk fetch failed; fetching it again"),
            }
        }
        let bytes = self
            .fetch_range(range, For::Reader(&[c.digest]))
            .map_err(|e| Error::io("fetching a chunk", e))?;
        self.decompress(ino, &bytes, c)
    }

    /// Whether a range of `bytes` takes long enough to arrive that decoding it as it does
    /// saves time: at least [`STREAM_AFTER`] at the link's measured throughput (or the
    /// throughput is not known yet), and at least [`STREAM_MIN`] bytes. On a fast link the
    /// range is fetched whole and decoded in one call, which is faster than decoding
    /// piece by piece (see `decompress_chunk`).
    fn worth_streaming(&self, bytes: u64) -> bool {
        bytes >= STREAM_MIN
            && self
                .scheduler
                .link()
                .throughput
                .is_none_or(|t| bytes as f64 / t >= STREAM_AFTER.as_secs_f64())
    }

    /// Fetches `runs` for a reader (each run one range of chunks that follow each other
    /// in the blob; all requests in flight at once) and decodes each chunk as its bytes
    /// arrive, so that when the last byte is in the chunk is decoded but for its tail.
    /// Each chunk `wanted` lists is verified and handed to `done` (once per digest); the
    /// others are skipped. Timed and counted as one fetch, like [`Inner::fetch_ranges`].
    /// Nothing is retried. `near_end` is called once, when about one round trip of the
    /// link's data is left to arrive (if the link is measured): what is asked for then
    /// starts arriving as this fetch ends, neither sharing the link with it nor after a gap.
    fn fetch_streamed(
        &self,
        runs: &[&[(u64, Chunk)]],
        wanted: &[Sha256Digest],
        near_end: Option<&dyn Fn()>,
        mut done: impl FnMut(&Chunk, Vec<u8>),
    ) -> Result<(), Error> {
        let failed = |e| Error::io("fetching chunks", e);
        let _on_demand = self.scheduler.fetching();
        let started = std::time::Instant::now();
        let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|r| span_of(r)).collect();
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let link = self.scheduler.link();
        let lead = link
            .rtt
            .zip(link.throughput)
            .map(|(rtt, bytes_per_sec)| (rtt.as_secs_f64() * bytes_per_sec) as u64);
        let mut near_end = NearEnd::new(total, lead, near_end);
        let mut arrived = |n: usize| near_end.arrived(n);
        // A failed fetch is a latency its reader saw too.
        let streamed = (|| {
            let bodies = ranges
                .iter()
                .map(|r| self.source.open_range(r.clone()))
                .collect::<io::Result<Vec<_>>>()
                .map_err(failed)?;
            // Each wanted digest, taken out once decoded (a run may hold the same chunk twice).
            let mut wanted: std::collections::HashSet<&Sha256Digest> = wanted.iter().collect();
            for (run, body) in runs.iter().zip(bodies) {
                let mut body = Tapped {
                    inner: body,
                    tap: &mut arrived,
                };
                for (ino, c) in run.iter() {
                    let mut member = io::Read::take(&mut body, c.compressed_end - c.offset);
                    if wanted.remove(&c.digest) {
                        let data = if c.compressed_end - c.offset < STREAM_MIN {
                            // A small member decodes in no time once it is in, faster in one
                            // call than piece by piece.
                            let mut bytes = Vec::new();
                            io::Read::read_to_end(&mut member, &mut bytes).map_err(failed)?;
                            self.decompress(*ino, &bytes, c)?
                        } else {
                            self.decompress_from(*ino, &mut member, c)?
                        };
                        self.stats.streamed_chunks.fetch_add(1, Ordering::Relaxed);
                        done(c, data);
                    }
                    // The member's end and the tar padding after the chunk (or all of a chunk
                    // not wanted): read through to the next chunk.
                    io::copy(&mut member, &mut io::sink()).map_err(failed)?;
                }
                // Read to the end, so that the connection is free for the next request.
                io::copy(&mut body, &mut io::sink()).map_err(failed)?;
            }
            Ok(())
        })();
        let took = started.elapsed();
        self.scheduler.node_stats().fetch_latency.observe(took);
        streamed?;
        self.count_fetch(
            &ranges,
            total,
            took,
            "ranges fetched and decoded as they arrived",
        );
        Ok(())
    }

    /// Counts (and logs as `what`) a completed fetch of `ranges`, `bytes` bytes in all,
    /// that took `took`, for the layer's counters and the scheduler's view of the link.
    fn count_fetch(
        &self,
        ranges: &[std::ops::Range<u64>],
        bytes: u64,
        took: std::time::Duration,
        what: &str,
    ) {
        tracing::debug!(
            start = ranges.first().map_or(0, |r| r.start),
            ranges = ranges.len(),
            bytes,
            ms = took.as_secs_f64() * 1e3,
            "{what}"
        );
        self.scheduler.record(bytes, took);
        let s = &self.stats;
        s.fetches.fetch_add(1, Ordering::Relaxed);
        s.fetch_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        s.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        s.fetch_requests
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
    }

    /// One range request to the source, timed and counted.
    fn fetch_range(&self, range: std::ops::Range<u64>, whom: For<'_>) -> io::Result<Vec<u8>> {
        let mut all = self.fetch_ranges(std::slice::from_ref(&range), whom)?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Range requests to the source, sent together, timed and counted; those for
    /// [`For::Ahead`] first wait until no on-demand ones are in flight on the node.
    fn fetch_ranges(
        &self,
        ranges: &[std::ops::Range<u64>],
        whom: For<'_>,
    ) -> io::Result<Vec<Vec<u8>>> {
        let on_demand = matches!(whom, For::Reader(_));
        let _on_demand = match whom {
            For::Reader(_) => Some(self.scheduler.fetching()),
            For::ReadAhead => None,
            For::Ahead => {
                self.scheduler.make_way();
                None
            }
        };
        let started = std::time::Instant::now();
        let all = self.source.read_ranges(ranges);
        let took = started.elapsed();
        if on_demand {
            self.scheduler.node_stats().fetch_latency.observe(took);
        }
        let all = all?;
        let bytes: u64 = all.iter().map(|b| b.len() as u64).sum();
        self.count_fetch(ranges, bytes, took, "ranges fetched");
        Ok(all)
    }

    /// `c` (the chunk of the one-chunk file `ino`) and the small files of the same
    /// directory nearest to it in blob order: one-chunk files not cached, at most
    /// [`NEIGHBOUR_SCAN`] chunks away, [`NEIGHBOUR_SPAN`] bytes and [`NEIGHBOUR_RUNS`] runs
    /// of adjacent chunks in all; in blob order.
    fn with_neighbours(&self, ino: u64, c: &Chunk) -> Vec<(u64, Chunk)> {
        let tree = &self.tree;
        let (Some(node), Some(at)) = (tree.node(ino), tree.blob_position(c.offset)) else {
            return vec![(ino, *c)];
        };
        let dir = node.parent;
        let neighbour = |n: usize| {
            let (owner, chunk) = tree.blob_chunk(n)?;
            let o = tree.node(owner)?;
            let small = o.parent == dir && o.kind == NodeKind::File && tree.chunks(o).len() == 1;
            (small && !self.cache.contains(&chunk.digest)).then_some((owner, chunk))
        };
        let mut picked = vec![(ino, *c)];
        let mut budget = NEIGHBOUR_SPAN.saturating_sub(c.compressed_end - c.offset);
        let mut runs = 1;
        // Looks at position `n`, coming from `last` (the last pick in this direction):
        // whether to go on in this direction.
        let mut look = |n: usize, last: &mut usize, picked: &mut Vec<(u64, Chunk)>| {
            let Some(item) = neighbour(n) else {
                return true;
            };
            let size = item.1.compressed_end - item.1.offset;
            let prev = tree.blob_chunk(*last).map(|(_, p)| p);
            let joins = n.abs_diff(*last) == 1
                && prev.is_some_and(|p| {
                    let (first, second) = if n > *last {
                        (&p, &item.1)
                    } else {
                        (&item.1, &p)
                    };
                    adjacent(first, second)
                });
            if size > budget || (!joins && runs == NEIGHBOUR_RUNS) {
                return false;
            }
            budget -= size;
            runs += usize::from(!joins);
            *last = n;
            picked.push(item);
            budget > 0
        };
        let (mut up, mut up_last, mut up_open) = (at + 1, at, true);
        let (mut down, mut down_last, mut down_open) = (at, at, true);
        while up_open || down_open {
            if up_open {
                up_open = up - at <= NEIGHBOUR_SCAN
                    && up < tree.chunk_count()
                    && look(up, &mut up_last, &mut picked);
                up += 1;
            }
            if down_open {
                down_open = down > 0 && at - down < NEIGHBOUR_SCAN && {
                    down -= 1;
                    look(down, &mut down_last, &mut picked)
                };
            }
        }
        picked.sort_by_key(|(_, c)| (c.offset, c.inner_offset));
        picked
    }

    /// Chunk `c` of inode `ino` from the disk cache or, fetched, from the source; kept in
    /// the memory tier afterwards. The caller has looked in the memory tier already.
    /// `near_end` as for [`Inner::fetch_streamed`].
    fn chunk_data(
        &self,
        ino: u64,
        c: &Chunk,
        near_end: Option<&dyn Fn()>,
    ) -> io::Result<Arc<[u8]>> {
        tracing::debug!(file = %self.tree.path(ino), chunk_offset = c.chunk_offset,
            bytes = c.compressed_end - c.offset, "chunk missed");
        let data = self
            .cache
            .get_or_fetch(&c.digest, || {
                let data = self.fetch_chunk(ino, c, near_end)?;
                self.stats.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Error>(data)
            })
            .map_err(io::Error::other)?;
        self.chunk_stored();
        self.cache.memory_put(c.digest, data.clone());
        Ok(data)
    }

    /// Reads up to `size` bytes at `offset` of regular file `ino`.
    fn read_file(&self, ino: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let Some(node) = self.tree.node(ino) else {
            return Ok(Vec::new());
        };
        if offset >= node.size {
            return Ok(Vec::new());
        }
        let end = node.size.min(offset.saturating_add(size as u64));
        let chunks = self.tree.chunks(node);
        let first = first_chunk(chunks, offset);
        let covering: Vec<Chunk> = chunks[first..]
            .iter()
            .take_while(|c| c.chunk_offset < end)
            .copied()
            .collect();
        // A static library is read through its index and the members a link needs, not
        // from start to end: it is not read ahead. Nor is a file with a page profile: the
        // prefetch brings its chunks, those a start reads first.
        let read_ahead = !self.tree.is_archive(ino)
            && !self.tree.is_profiled(ino)
            && chunks.len() > first + covering.len()
            && (first == 0 || self.cache.contains(&chunks[first - 1].digest))
            && covering.iter().any(|c| !self.cache.contains(&c.digest));
        let mapped =
            read_ahead && self.is_mapped(ino, node) && !self.prefetch_brings(ino, &chunks[first]);
        let budget = if mapped {
            MAPPED_READ_AHEAD
        } else {
            READ_AHEAD
        };
        // A reader past the first chunk reads on: the next chunks are queued before this
        // read's own fetch, so that they are on their way while it waits. A read of the
        // first chunk (which may be all a process wants: a header) has the link to itself,
        // but for the last chunk of a mapped file: the loader reads it next.
        let ahead = &chunks[first + covering.len()..];
        if read_ahead && first > 0 {
            self.read_ahead(ino, ahead, budget);
        }
        // (`mapped` implies `read_ahead`: chunks follow the covering ones.)
        let last = chunks
            .last()
            .filter(|l| mapped && first == 0 && !self.cache.contains(&l.digest));
        // For a read of the first chunk, the next ones are queued as its fetch is about to
        // end (a round trip before, on a measured link), or else once it has.
        let queued = std::cell::Cell::new(false);
        let queue_ahead = || {
            if read_ahead && first == 0 && !queued.replace(true) {
                self.read_ahead(ino, ahead, budget);
            }
        };
        // Neighbouring missing chunks: one request for the whole span (chunks someone else
        // is fetching are waited for below, not fetched again). A small file's missing
        // chunk brings its small neighbours along.
        if covering.len() > 1 || last.is_some() {
            let missing: Vec<(u64, Chunk)> = covering
                .iter()
                .chain(last)
                .filter(|c| self.cache.memory_get(&c.digest).is_none())
                .map(|c| (ino, *c))
                .collect();
            let hot: Vec<Sha256Digest> = missing.iter().map(|(_, c)| c.digest).collect();
            // (Only when logged: the check looks in the cache's index once more per chunk.)
            if tracing::enabled!(tracing::Level::DEBUG)
                && missing.iter().any(|(_, c)| !self.cache.contains(&c.digest))
            {
                tracing::debug!(file = %self.tree.path(ino), offset, size, chunks = missing.len(),
                    "chunks missed");
            }
            self.fetch_claimed(&missing, For::Reader(&hot), Some(&queue_ahead))?;
        } else if let [c] = chunks {
            if !self.cache.contains(&c.digest) && self.cache.memory_get(&c.digest).is_none() {
                let run = match self.is_mapped(ino, node) {
                    true => vec![(ino, *c)],
                    false => self.with_neighbours(ino, c),
                };
                let bytes: u64 = run.iter().map(|(_, c)| c.compressed_end - c.offset).sum();
                tracing::debug!(file = %self.tree.path(ino), neighbours = run.len() - 1,
                    bytes, "small file missed");
                match self.fetch_claimed(&run, For::Reader(&[c.digest]), None) {
                    // A bad neighbour must not fail this read: the chunk is fetched alone
                    // below if it did not arrive.
                    Err(e) if run.len() > 1 => {
                        tracing::debug!(error = %e, "fetching a file with its neighbours failed")
                    }
                    other => other?,
                }
            }
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, c) in covering.iter().enumerate() {
            let from = offset.max(c.chunk_offset) - c.chunk_offset;
            let to = end.min(c.chunk_offset + c.size) - c.chunk_offset;
            let data = match self.cache.memory_get(&c.digest) {
                Some(data) => data,
                None => {
                    // Part of a chunk already verified on disk: read just that part.
                    let len = (to - from) as usize;
                    let part = (self.cache.holds(&c.digest, c.size))
                        .then(|| self.cache.read_verified(&c.digest, from, len))
                        .flatten();
                    if let Some(part) = part {
                        out.extend_from_slice(&part);
                        continue;
                    }
                    let last = i + 1 == covering.len();
                    self.chunk_data(ino, c, last.then_some(&queue_ahead as &dyn Fn()))?
                }
            };
            // The cache is the node's: a chunk another layer stored under this digest has
            // the size that digest's content has, which a hostile TOC can misstate.
            if data.len() as u64 != c.size {
                tracing::warn!(file = %self.tree.path(ino), chunk = %c.digest,
                    claimed = c.size, cached = data.len(),
                    "the TOC gives a chunk a size its digest's content does not have");
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        queue_ahead();
        Ok(out)
    }

    /// Whether regular file `ino` is one a program maps rather than reads: executable,
    /// or a library a dependency walk reached (it marks each before it reads it). A
    /// library a program loads itself (`dlopen`, a Python extension module) is not: the
    /// modules beside it are what the program loads next.
    fn is_mapped(&self, ino: u64, node: &crate::tree::Node) -> bool {
        node.mode & 0o111 != 0 || self.is_library(ino)
    }

    /// Whether this layer's prefetch, still running, covers chunk `c` (a prioritized
    /// file's): it brings the file's chunks in blob order, and read-ahead requests would
    /// race its spans for the same chunks (a span claims its chunks only once it has them).
    fn prefetch_brings(&self, ino: u64, c: &Chunk) -> bool {
        !self.is_prefetch_done() && self.tree.is_prioritized(ino, c)
    }

    /// Hands the first of `next` (the following chunks of file `ino`) that are not local,
    /// up to `budget` compressed bytes (at least one chunk), to the scheduler to fetch
    /// ahead of the reader, in requests of at most [`READ_AHEAD_REQUEST`] bytes (at least
    /// one chunk): a chunk is readable once its request has arrived, and several requests
    /// are in flight at once.
    fn read_ahead(&self, ino: u64, next: &[Chunk], mut budget: u64) {
        let ahead: Vec<(u64, Chunk)> = next
            .iter()
            .enumerate()
            .take_while(|(i, c)| {
                let size = c.compressed_end - c.offset;
                let fits = *i == 0 || size <= budget;
                budget = budget.saturating_sub(size);
                fits
            })
            .filter(|(_, c)| !self.cache.contains(&c.digest))
            .map(|(_, c)| (ino, *c))
            .collect();
        let mut request: Vec<(u64, Chunk)> = Vec::new();
        for item in ahead {
            let size = |r: &[(u64, Chunk)]| {
                r.last().map_or(0, |(_, l)| l.compressed_end)
                    - r.first().map_or(0, |(_, f)| f.offset)
            };
            if !request.is_empty()
                && size(&request) + (item.1.compressed_end - item.1.offset) > READ_AHEAD_REQUEST
            {
                self.scheduler
                    .read_ahead(self.me.clone(), std::mem::take(&mut request));
            }
            request.push(item);
        }
        if !request.is_empty() {
            self.scheduler.read_ahead(self.me.clone(), request);
        }
    }

    fn xattrs(&self, ino: u64) -> Option<Vec<(String, Vec<u8>)>> {
        let node = self.tree.node(ino)?;
        let mut list: Vec<(String, Vec<u8>)> = self
            .tree
            .xattrs(ino)
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        if node.opaque && !list.iter().any(|(k, _)| k == OPAQUE_XATTR) {
            list.push((OPAQUE_XATTR.to_string(), b"y".to_vec()));
        }
        Some(list)
    }
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Char => FileType::CharDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// `statvfs` of the chunk cache's directory.
fn cache_fs_stats(root: &Path) -> io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated path and a zeroed struct the call fills in.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

impl fuser::Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|n| Some((n, self.tree.child(parent.0, n)?)))
            .and_then(|(n, ino)| Some((n, ino, self.attr(ino)?)));
        match found {
            Some((n, ino, attr)) => {
                self.touch(ino, AccessOp::Lookup, None, Some((parent.0, n)));
                reply.entry(&TTL, &attr, Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.node(ino.0) {
            Some(n) if n.kind == NodeKind::Symlink => {
                self.touch(ino.0, AccessOp::Readlink, None, None);
                reply.data(self.tree.link_target(n).unwrap_or("").as_bytes())
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        // Round trips saved per file of a tree walk: a directory listing carries every
        // entry's attributes (no lookup per entry afterwards), symlink targets stay in the
        // page cache. Kernels without them work as before.
        for flag in [
            fuser::InitFlags::FUSE_DO_READDIRPLUS,
            fuser::InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        if !self.scheduler.options().passthrough {
            return Ok(());
        }
        // Depth 1: backing files on an ordinary file system, and this mount may be a lower
        // layer of overlayfs (which adds one; the kernel allows two).
        let on = config
            .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
            .is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(on, Ordering::Relaxed);
        if !on {
            self.scheduler.warn_once_no_passthrough();
        }
        Ok(())
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.node(ino.0) {
            Some(n) if n.kind == NodeKind::File => {
                self.touch(ino.0, AccessOp::Open, None, None);
                self.set_read_ahead_for_open();
                if let Some(id) = self.passthrough_open(ino.0, n, &reply) {
                    self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                    // No FOPEN_KEEP_CACHE: the kernel refuses it with passthrough (EIO); the
                    // backing file's own page cache serves the reads.
                    reply.opened_passthrough(FileHandle(PASSTHROUGH_FH), FopenFlags::empty(), &id);
                    // Its reads never come here: an executable's libraries are looked for
                    // as it is opened.
                    if n.mode & 0o111 != 0 {
                        self.elf_opened(ino.0);
                    }
                    return;
                }
                // Content never changes: let the page cache keep it across opens.
                reply.opened(FileHandle(CACHED_FH), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(n) if n.kind == NodeKind::Dir => reply.error(Errno::EISDIR),
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.tree.node(ino.0) {
            Some(n) if n.kind == NodeKind::File => {}
            Some(_) => return reply.error(Errno::EINVAL),
            None => return reply.error(Errno::ENOENT),
        }
        if offset == 0 {
            self.elf_starting(ino.0);
        }
        let started = std::time::Instant::now();
        let result = {
            let _reading = self.scheduler.reading();
            self.read_file(ino.0, offset, size)
        };
        match result {
            Ok(data) => {
                self.stats
                    .read_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                let read = offset..offset + data.len() as u64;
                self.touch(ino.0, AccessOp::Read, Some(read), None);
                reply.data(&data);
                if offset == 0 {
                    self.elf_read(ino.0, &data);
                }
            }
            Err(e) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(file = %self.tree.path(ino.0), offset, size, error = %e,
                    "read failed; the reader gets EIO");
                reply.error(Errno::EIO)
            }
        }
        self.scheduler
            .node_stats()
            .read_latency
            .observe(started.elapsed());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.node(ino.0) {
            // Directories never change: their listings stay in the page cache.
            Some(n) if n.kind == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(node) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let dots = [
            (ino.0, FileType::Directory, "."),
            (node.parent as u64, FileType::Directory, ".."),
        ];
        let children = self.tree.children(node).map(|(name, child)| {
            let kind = self
                .tree
                .node(child)
                .map_or(FileType::RegularFile, |n| file_type(n.kind));
            (child, kind, name)
        });
        for (i, (child, kind, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(node) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let dots = [(ino.0, "."), (node.parent as u64, "..")];
        let children = self.tree.children(node).map(|(n, c)| (c, n));
        for (i, (child, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            let Some(attr) = self.attr(child) else {
                continue;
            };
            if reply.add(
                INodeNo(child),
                i as u64 + 1,
                name,
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    /// Nothing to flush in a read-only file system: ENOSYS, after which the kernel sends
    /// no more flushes (one round trip less for every close).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let mut opens = self.lock_opens();
        if let Some(o) = opens.get_mut(&ino.0) {
            match fh.0 {
                PASSTHROUGH_FH => {
                    if let Some((_, n)) = &mut o.backing {
                        *n -= 1;
                        if *n == 0 {
                            // The last passthrough open: the backing file is closed.
                            o.backing = None;
                        }
                    }
                }
                CACHED_FH => o.cached = o.cached.saturating_sub(1),
                _ => {}
            }
            if o.cached == 0 && o.backing.is_none() {
                opens.remove(&ino.0);
            }
        }
        reply.ok()
    }

    /// No ioctls: programs probe files with TCGETS and the like; ENOTTY is the answer.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The chunk cache's file system is where this layer's content lands: its capacity
        // and free space are what tools (kubelet's image file system stats, `df`) need.
        // Zeros make kubelet report InvalidDiskCapacity.
        match cache_fs_stats(self.cache.root()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => {
                tracing::debug!(error = %e, "statvfs of the chunk cache failed; reporting the layer's size");
                reply.statfs(
                    self.tree.total_size.div_ceil(4096),
                    0,
                    0,
                    self.tree.len() as u64,
                    0,
                    4096,
                    255,
                    4096,
                )
            }
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(list) = self.xattrs(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match list.iter().find(|(k, _)| OsStr::new(k) == name) {
            Some((_, v)) => reply_xattr(reply, size, v),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(list) = self.xattrs(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (k, _) in &list {
            names.extend_from_slice(k.as_bytes());
            names.push(0);
        }
        reply_xattr(reply, size, &names)
    }
}

/// A mounted layer; unmounted when dropped.
pub struct MountedLayer {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    stats: Arc<LayerStats>,
    fs: LayerFs,
}

impl MountedLayer {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The layer's counters.
    pub fn stats(&self) -> &LayerStats {
        &self.stats
    }

    /// The mounted file system (for progress).
    pub fn fs(&self) -> &LayerFs {
        &self.fs
    }

    /// Waits (up to 2 s) while the mount is busy: a file closed a moment ago can hold it a
    /// moment more (the kernel puts a passthrough file's backing file after close returns),
    /// and the unmount would fail with EBUSY. Asked with `MNT_EXPIRE`, which unmounts
    /// nothing: it answers EBUSY while the mount is in use, EAGAIN once it is idle.
    fn wait_until_idle(&self) {
        for _ in 0..40 {
            let busy = umount2(&self.mountpoint, libc::MNT_EXPIRE)
                .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY));
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tells the scheduler to fetch nothing more for this layer, and detaches its local
    /// form if it has one.
    fn stop_fetching(&mut self) {
        self.fs.closed.store(true, Ordering::SeqCst);
        let local = self.fs.lock_local().mounted.take();
        drop(local);
    }

    /// Serves the layer without FUSE (see `local`) once every file is local (now, when its
    /// background fetch completes, or when reads have fetched the rest), built and mounted
    /// after a quiet second on the node by a thread of its own (up to
    /// seconds: hashing, copying) in a directory of its own under `dir`, which must be on
    /// the chunk cache's file system (hard links); [`local_form_of`](crate::local_form_of)
    /// `(dir)` then finds it. The FUSE mount stays. Failures are logged; the layer stays
    /// on FUSE.
    pub fn serve_locally(&self, dir: &Path) {
        self.fs.lock_local().target = Some(dir.to_path_buf());
        if self.fs.may_be_local() || self.fs.is_background_done() {
            self.fs.check_local_soon();
        }
    }

    /// Serves the layer without FUSE now if every chunk is local (`Ok(true)`), as
    /// [`MountedLayer::serve_locally`], and not later otherwise: for a caller that stacks
    /// the layer once, now.
    pub fn serve_locally_now(&self, dir: &Path) -> Result<bool, crate::local::LocalError> {
        self.fs.lock_local().target = Some(dir.to_path_buf());
        let done = self.fs.go_local();
        if !matches!(done, Ok(true)) {
            self.fs.lock_local().target = None;
        }
        done
    }

    /// Where the layer is served without FUSE, if it is.
    pub fn local_form(&self) -> Option<crate::local::LocalForm> {
        self.fs.lock_local().mounted.as_ref().map(|m| m.form())
    }

    /// Stops fetching, unmounts, and waits for the session to end.
    pub fn unmount(mut self) -> io::Result<()> {
        self.stop_fetching();
        self.wait_until_idle();
        match self.session.take() {
            Some(s) => session_ended(s.umount_and_join()),
            None => Ok(()),
        }
    }
}

/// The result of unmounting a FUSE session and joining its thread. fuser unmounts first
/// and then joins, so an error of the join comes after a done unmount: the thread's last
/// read of the FUSE device said how the kernel ended the connection. That is `ENODEV`,
/// which fuser takes as the end, or `ECONNABORTED` (seen once in CI, Linux 6.18, on the
/// unmount right after a read-ahead), which it returns. Either way nothing is mounted
/// any more and the session is over: both are success.
fn session_ended(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::debug!(error = %e, "the FUSE connection was aborted at unmount");
            Ok(())
        }
        other => other,
    }
}

impl Drop for MountedLayer {
    /// Dropped without [`MountedLayer::unmount`] (an error path, a panic): unmounts, and if
    /// that fails (a file still open) detaches the mount, so that nothing is left mounted
    /// whose server is gone ("Transport endpoint is not connected").
    fn drop(&mut self) {
        self.stop_fetching();
        if let Some(s) = self.session.take() {
            if let Err(e) = session_ended(s.umount_and_join()) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e,
                    "unmount failed; detaching the mount");
                let _ = detach(&self.mountpoint);
            }
        }
    }
}

/// The kernel's read-ahead for FUSE reads of this mount, in KiB: reads that go through
/// FUSE (files not yet local, passthrough off) arrive as requests of up to 1 MiB (the
/// most the kernel sends, 256 pages) instead of the default 128 KiB, eight times fewer
/// round trips through the FUSE device.
const KERNEL_READ_AHEAD_KB: u32 = 1024;

/// The sysfs file holding the read-ahead of the mount at `mountpoint` (its backing device
/// info, `MAJOR:MINOR` of the mount).
fn read_ahead_knob(mountpoint: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint).ok()?.dev();
    Some(PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    )))
}

/// Sets a mount's read-ahead (`knob`, see [`read_ahead_knob`]) to `kb` KiB; where that
/// cannot be done (no sysfs, not root) reads work as before.
fn set_kernel_read_ahead(knob: &Path, kb: u32) {
    if let Err(e) = std::fs::write(knob, kb.to_string()) {
        tracing::debug!(knob = %knob.display(), error = %e, "cannot set the mount's read-ahead");
    }
}

/// Detaches whatever is mounted at `path` (lazily: busy mounts go once unused).
pub fn detach(path: &Path) -> io::Result<()> {
    umount2(path, libc::MNT_DETACH)
}

/// `umount2(2)` of `path` with `flags`.
fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path; umount2 does not keep the pointer.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts `fs` read-only, `nosuid` and `nodev` at `mountpoint`, readable by every user (as
/// overlayfs needs for a lower layer), served by several threads; then hands it to its
/// scheduler for prefetch and background fetch.
pub fn mount(fs: LayerFs, mountpoint: &Path) -> io::Result<MountedLayer> {
    let stats = fs.stats();
    let handle = fs.clone();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("estargz".into()),
        MountOption::Subtype("estargz".into()),
        MountOption::DefaultPermissions,
        // A lower layer needs neither: overlayfs honours setuid bits and device nodes by its
        // own mount's flags, so containers keep them, while a local user who reached this
        // mount could not use an image's setuid binary or device node through it.
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::Exec,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    // A layer that records a workload's reads asks the kernel for none ahead: the ranges it
    // records are then the pages the workload read, not the kernel's windows around them
    // (at 1 MiB, nearly every byte of the files a start opens).
    //
    // A layer with page profiles chooses at each open until its prefetch is done
    // (`Inner::read_ahead_at_open`): the kernel copies the setting into a file at open.
    let recording = handle.0.recorder.get().is_some();
    if let Some(knob) = read_ahead_knob(mountpoint) {
        let kb = if recording { 0 } else { KERNEL_READ_AHEAD_KB };
        set_kernel_read_ahead(&knob, kb);
        if !recording && handle.tree.has_profiles() {
            *crate::scheduler::lock(&handle.0.read_ahead_knob) = Some((knob, kb));
        }
    }
    handle.scheduler.add_layer(&handle.0);
    Ok(MountedLayer {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        stats,
        fs: handle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_that_yields_to_containers_runs_at_nice_10_and_idle_io() {
        let (nice, ioprio) = std::thread::spawn(|| {
            yield_to_containers();
            // SAFETY: plain queries about this thread's own ID.
            unsafe {
                let tid = libc::gettid();
                *libc::__errno_location() = 0;
                let nice = libc::getpriority(libc::PRIO_PROCESS as _, tid as _);
                (
                    nice,
                    libc::syscall(libc::SYS_ioprio_get, 1, tid as libc::c_long),
                )
            }
        })
        .join()
        .unwrap();
        assert_eq!(nice, 10);
        assert_eq!(ioprio >> 13, 3, "I/O class (ioprio {ioprio})");
    }

    #[test]
    fn near_end_calls_once_a_round_trip_before_the_end() {
        let calls = std::cell::Cell::new(0);
        let call = || calls.set(calls.get() + 1);
        let mut near = NearEnd::new(1000, Some(250), Some(&call));
        near.arrived(700);
        assert_eq!(calls.get(), 0, "called with 300 bytes to come");
        near.arrived(50);
        assert_eq!(calls.get(), 1, "not called with 250 bytes to come");
        near.arrived(250);
        assert_eq!(calls.get(), 1, "called twice");
        // A lead longer than the transfer: at the first bytes.
        let mut near = NearEnd::new(100, Some(250), Some(&call));
        near.arrived(1);
        assert_eq!(calls.get(), 2);
        // An unmeasured link: never (the caller queues after the transfer).
        let mut near = NearEnd::new(100, None, Some(&call));
        near.arrived(100);
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_latency_falls_into_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = LatencyHistogram::new([ms(1), ms(10)]);
        for took in [
            Duration::ZERO,
            ms(1),
            ms(1) + Duration::from_nanos(1),
            ms(10),
            Duration::from_secs(3600),
        ] {
            h.observe(took);
        }
        assert_eq!(h.counts(), vec![2, 2, 1]);
        assert_eq!(h.bounds().collect::<Vec<_>>(), vec![ms(1), ms(10)]);
        let sum = ms(12) + Duration::from_nanos(1) + Duration::from_secs(3600);
        assert_eq!(h.sum(), sum);
        // The node's histograms: ascending bounds.
        let node = NodeStats::default();
        for bounds in [
            node.fetch_latency.bounds().collect::<Vec<_>>(),
            node.read_latency.bounds().collect(),
        ] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
    }
}
