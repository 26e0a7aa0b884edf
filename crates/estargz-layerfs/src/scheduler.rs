//! One fetch scheduler for the whole node: prefetch of prioritized files and background
//! fetch of every mounted layer, served after on-demand reads and paced so that they do not
//! delay them.
//!
//! Priorities, across all layers and images:
//! 1. On-demand reads (a process waits): never queued here; FUSE threads fetch at once and
//!    tell the scheduler they are reading ([`FetchScheduler::reading`]).
//! 2. Read-ahead (the next chunks of a file a process is reading) and prefetch of
//!    prioritized files (a starting process will read them soon): spans of at most 1 MiB
//!    (or one chunk), as many in flight for the node as carry the link's bandwidth-delay
//!    product ([`LinkEstimate::ahead_in_flight`], 2 to 8), read-ahead first,
//!    then layers in mount order. Prefetch makes way for on-demand fetches; read-ahead
//!    does not (it is the reader's next data: a sequential reader that waited for its own
//!    fetch before the next went out would fetch one chunk after another).
//! 3. Background fetch of the rest: one layer after another (the newest first), one
//!    request in flight for the node, only after no on-demand read, mount or prefetch has
//!    happened for the quiet period. Each request carries about one round trip of data
//!    at the link's measured throughput (its bandwidth-delay product), or
//!    [`NEGLIGIBLE_DELAY`] of it when the round trip is shorter (64 KiB to 1 MiB), so an
//!    on-demand read that arrives while it is in flight waits for at most about one round
//!    trip (or 5 ms) of background bytes; large chunks are fetched in several such
//!    requests, with the quiet check between them. Where the round trip and one request
//!    take no more than [`NEGLIGIBLE_DELAY`] (a fast local network), there is no quiet
//!    period, and background requests do not wait for reads in progress either.
//!
//! Why: with a fetcher per layer, several layers fetched in the background at once, with
//! 1 MiB requests, and every on-demand read queued behind background bytes on a slow link
//! (python importing 10 packages over 100 Mbit/s took 2.6 times as long as with the
//! reference snapshotter, which holds background fetch while reads go on).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use estargz_format::Chunk;

use crate::fs::{For, Inner};

/// Largest prefetch request: a chunk becomes readable only when its whole request has
/// arrived, and a process that starts reading prioritized files while they are prefetched
/// should wait for one span, not for all of them (python importing 179 modules over a
/// 100 Mbit/s, 20 ms link was ready in 1.77 s instead of 1.97 s with requests of up to
/// 8 MiB).
pub(crate) const PREFETCH_SPAN: u64 = 1 << 20;
/// Most runs of neighbouring chunks in one prefetch span: a span's runs are requested all
/// at once (one round trip), so the chunks a page profile marks, scattered through a
/// program in 64 KiB pieces, go in few round trips; the bound keeps the connections a span
/// opens few.
const SPAN_RUNS: usize = 8;
/// Read-ahead and prefetch requests in flight on the node, at least: two keep the link busy
/// across round trips while the first span, the one a starting process needs first, still
/// arrives early.
pub const PREFETCH_CONCURRENCY: usize = 2;
/// Read-ahead and prefetch requests in flight on the node, at most: as many as carry the
/// link's bandwidth-delay product ([`LinkEstimate::ahead_in_flight`]), up to this. Over a
/// 1 Gbit/s link with a 50 ms round trip, two requests of 1 MiB per round trip carried
/// 40 MB/s of its 125: a cold sequential read ran at 15 % of the link.
pub const MAX_AHEAD_IN_FLIGHT: usize = 8;
/// Background requests are at least this large (on a fast local network the
/// bandwidth-delay product is tiny, and per-request overhead would dominate).
pub const MIN_BACKGROUND_REQUEST: u64 = 64 << 10;
/// Background requests are at most this large.
pub const MAX_BACKGROUND_REQUEST: u64 = 1 << 20;
/// Background request size before the link has been measured.
pub const DEFAULT_BACKGROUND_REQUEST: u64 = 256 << 10;
/// A layer's background fetch tries again this many times when some spans failed.
const BACKGROUND_PASSES: u32 = 3;
/// Samples of the link kept for the estimate.
const LINK_WINDOW: usize = 32;
/// Requests of at most this many bytes measure the round trip.
const SMALL_REQUEST: u64 = 64 << 10;
/// Requests of at least this many bytes measure the throughput.
const LARGE_REQUEST: u64 = 192 << 10;
/// Requests of at least this many bytes measure the bulk throughput: a shaper's burst
/// (256 KiB here) can make a request of 192 KiB look instantaneous, but at most doubles
/// the speed measured from one of 512 KiB.
const BULK_REQUEST: u64 = 512 << 10;

/// What the scheduler does besides serving on-demand reads.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Fetch the prioritized files of a layer (before `.prefetch.landmark`) once mounted.
    pub prefetch: bool,
    /// Then fetch the rest of each layer in the background.
    pub background: bool,
    /// Background fetch starts only after no on-demand read, mount or prefetch has
    /// happened on the node for this long.
    pub background_quiet: Duration,
    /// Open files whose content is local in FUSE passthrough mode (Linux 6.9 and later):
    /// the kernel reads the chunk file itself, without a round trip through this process.
    pub passthrough: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            prefetch: true,
            background: true,
            background_quiet: Duration::from_millis(1000),
            passthrough: true,
        }
    }
}

/// The link to the registries as measured from completed fetches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimate {
    /// Round trip: the fastest recent small request (or large one, when that came back
    /// sooner).
    pub rtt: Option<Duration>,
    /// Bytes per second: the fastest recent large request, round trip taken off.
    pub throughput: Option<f64>,
    /// The same from requests of 512 KiB or more only: less inflated by a burst.
    pub bulk_throughput: Option<f64>,
    /// Round trip and bytes per second fitted to the large requests alone (time = round
    /// trip + bytes / throughput), while no small request has measured the round trip:
    /// a start whose first requests are all prefetch spans.
    pub spans_fit: Option<(Duration, f64)>,
}

impl LinkEstimate {
    /// The size of one background request: about one round trip of data (the
    /// bandwidth-delay product), within [`MIN_BACKGROUND_REQUEST`] and
    /// [`MAX_BACKGROUND_REQUEST`].
    ///
    /// On a fast link a round trip of data is little (64 KiB on loopback) while what a
    /// read notices is time: there a request may carry as much as the link moves in
    /// [`NEGLIGIBLE_DELAY`].
    pub fn background_request(&self) -> u64 {
        match (self.rtt, self.throughput) {
            (Some(rtt), Some(thr)) => {
                let time = rtt.max(NEGLIGIBLE_DELAY).as_secs_f64();
                ((thr * time) as u64).clamp(MIN_BACKGROUND_REQUEST, MAX_BACKGROUND_REQUEST)
            }
            _ => DEFAULT_BACKGROUND_REQUEST,
        }
    }
}

impl LinkEstimate {
    /// Read-ahead and prefetch requests (of up to [`PREFETCH_SPAN`]) to keep in flight:
    /// enough to carry the bandwidth-delay product (from the bulk throughput), plus one,
    /// within [`PREFETCH_CONCURRENCY`] and [`MAX_AHEAD_IN_FLIGHT`]; the least until the
    /// link is measured. 100 Mbit/s with 20 ms and 20 Mbit/s with 50 ms carry 250 and
    /// 125 KB per round trip: two, as before; 1 Gbit/s with 50 ms, 6.25 MB: seven.
    ///
    /// Before a small request has measured the round trip, from [`LinkEstimate::spans_fit`]:
    /// a prefetch over a long fast link is not held to two requests in flight throughout.
    pub fn ahead_in_flight(&self) -> usize {
        let measured = self.rtt.zip(self.bulk_throughput);
        match measured.or(self.spans_fit) {
            Some((rtt, thr)) => {
                let bdp = thr * rtt.as_secs_f64() / PREFETCH_SPAN as f64;
                (bdp.ceil().min(MAX_AHEAD_IN_FLIGHT as f64) as usize + 1)
                    .clamp(PREFETCH_CONCURRENCY, MAX_AHEAD_IN_FLIGHT)
            }
            _ => PREFETCH_CONCURRENCY,
        }
    }
}

impl LinkEstimate {
    /// How long background fetch waits after the last on-demand read: `configured`, unless
    /// one background request occupies the link for at most [`NEGLIGIBLE_DELAY`], as on a
    /// fast local network, where a read arriving behind it could not tell and holding
    /// back would only leave reads to miss what the background fetch would have brought.
    ///
    /// Only a link whose round trip is that short qualifies: over a long round trip a
    /// throughput measured from a few requests can be far too high (a shaper's burst, a
    /// proxy's buffer), and a starting container would pay for the misjudgement.
    pub fn background_quiet(&self, configured: Duration) -> Duration {
        match (self.rtt, self.throughput) {
            // Requests are sized to fill at least that time: allow for rounding.
            (Some(rtt), Some(thr))
                if rtt <= NEGLIGIBLE_DELAY
                    && self.background_request() as f64 / thr
                        <= NEGLIGIBLE_DELAY.as_secs_f64() * 1.001 =>
            {
                Duration::ZERO
            }
            _ => configured,
        }
    }
}

impl LinkEstimate {
    /// Whether the registry is on the node's local network: a round trip of at most
    /// [`NEGLIGIBLE_DELAY`], and a 1 MiB request (a read-ahead window, a prefetch span)
    /// that takes at most [`LOCAL_MIB`]. Both measured, the round trip by a small request:
    /// a fit to prefetch spans alone can be far off over a shaped link. There a reader
    /// waits about as long for 1 MiB as for one chunk of it; beyond it (1 Gbit/s with 50
    /// ms, 100 Mbit/s with 20 ms) what a start reads goes first and pages are read one
    /// at a time.
    pub fn is_local_network(&self) -> bool {
        match (self.rtt, self.bulk_throughput) {
            (Some(rtt), Some(thr)) if thr > 0.0 => {
                rtt <= NEGLIGIBLE_DELAY && (1u64 << 20) as f64 / thr <= LOCAL_MIB.as_secs_f64()
            }
            _ => false,
        }
    }
}

/// The most time a 1 MiB request takes on the node's local network (50 MB/s: loopback
/// with a busy CPU measured 140 MB/s).
pub const LOCAL_MIB: Duration = Duration::from_millis(20);

/// A delay of an on-demand read by background bytes too small to matter.
pub const NEGLIGIBLE_DELAY: Duration = Duration::from_millis(5);

/// Recent fetches: (bytes, time) of small and of large requests.
#[derive(Default)]
struct LinkSamples {
    small: VecDeque<Duration>,
    large: VecDeque<(u64, Duration)>,
    bulk: VecDeque<(u64, Duration)>,
}

impl LinkSamples {
    fn record(&mut self, bytes: u64, took: Duration) {
        fn push<T>(q: &mut VecDeque<T>, v: T) {
            if q.len() == LINK_WINDOW {
                q.pop_front();
            }
            q.push_back(v);
        }
        if bytes <= SMALL_REQUEST {
            push(&mut self.small, took);
        } else if bytes >= LARGE_REQUEST {
            push(&mut self.large, (bytes, took));
            if bytes >= BULK_REQUEST {
                push(&mut self.bulk, (bytes, took));
            }
        }
    }

    fn estimate(&self) -> LinkEstimate {
        // A large request that came back sooner than every small one shows that those
        // were slowed by something besides the link (a new connection's handshakes, a
        // busy CPU): the round trip is at most the time of any request.
        let fastest_large = self.large.iter().map(|(_, took)| *took).min();
        let rtt = self
            .small
            .iter()
            .min()
            .map(|small| fastest_large.map_or(*small, |large| large.min(*small)));
        let base = rtt.unwrap_or_default();
        let fastest = |samples: &VecDeque<(u64, Duration)>| {
            samples
                .iter()
                .filter(|(_, took)| *took > base)
                .map(|(bytes, took)| *bytes as f64 / (*took - base).as_secs_f64())
                .fold(None, |best: Option<f64>, t| {
                    Some(best.map_or(t, |b| b.max(t)))
                })
        };
        LinkEstimate {
            rtt,
            throughput: fastest(&self.large),
            bulk_throughput: fastest(&self.bulk),
            spans_fit: if rtt.is_none() {
                self.fit_large()
            } else {
                None
            },
        }
    }

    /// Time = round trip + bytes / throughput, fitted by least squares to the large
    /// samples; `None` without two of them at least [`FIT_SPREAD`] times apart in size.
    /// Where the times do not grow with the size (the transfer hides in the noise of a
    /// long round trip), the throughput is at least the largest request over the spread
    /// of the times, and the round trip at most the fastest request.
    fn fit_large(&self) -> Option<(Duration, f64)> {
        let xs = || self.large.iter().map(|(bytes, _)| *bytes as f64);
        let ys = || self.large.iter().map(|(_, took)| took.as_secs_f64());
        let (lo, hi) = xs().fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if self.large.len() < 2 || hi < lo * FIT_SPREAD {
            return None;
        }
        let n = self.large.len() as f64;
        let (mx, my) = (xs().sum::<f64>() / n, ys().sum::<f64>() / n);
        let cov: f64 = xs().zip(ys()).map(|(x, y)| (x - mx) * (y - my)).sum();
        let var: f64 = xs().map(|x| (x - mx) * (x - mx)).sum();
        let slope = cov / var;
        if slope > 0.0 {
            let rtt = (my - slope * mx).max(0.0);
            return Some((Duration::from_secs_f64(rtt), 1.0 / slope));
        }
        let (fastest, slowest) = ys().fold((f64::MAX, 0f64), |(f, s), y| (f.min(y), s.max(y)));
        let spread = (slowest - fastest).max(0.001);
        Some((Duration::from_secs_f64(fastest), hi / spread))
    }
}

/// How far apart in size large requests must be for a fit of the link to them.
const FIT_SPREAD: f64 = 1.5;

struct PrefetchJob {
    id: u64,
    layer: Weak<Inner>,
    spans: Vec<Vec<(u64, Chunk)>>,
    /// `spans[..first]` bring what a start reads; the rest complete the files of a page
    /// profile, and wait until no layer has spans of the first kind left, unless the link
    /// is local (see [`PrefetchJob::take`]). Each part is in blob order.
    first: usize,
    /// The next span to take of the first part, and of the rest.
    next: usize,
    rest: usize,
    running: usize,
}

impl PrefetchJob {
    fn new(id: u64, layer: Weak<Inner>, spans: Vec<Vec<(u64, Chunk)>>, first: usize) -> Self {
        PrefetchJob {
            id,
            layer,
            spans,
            first,
            next: 0,
            rest: first,
            running: 0,
        }
    }

    /// Spans of the first part left to take.
    fn has_first(&self) -> bool {
        self.next < self.first
    }

    /// Spans left to take.
    fn has_any(&self) -> bool {
        self.has_first() || self.rest < self.spans.len()
    }

    /// Takes the next span: of the first part while it lasts, or, when `blob_order`,
    /// whichever comes first in the blob. From a registry on the local network
    /// ([`LinkEstimate::is_local_network`]) a start waits less for the pages it reads
    /// than for files it opens before they are whole (read through FUSE, instead of
    /// served from a local file, and with the CPU busy with the prefetch): there the
    /// files of a page profile come whole, in blob order, as prioritized files without
    /// one do.
    fn take(&mut self, blob_order: bool) -> Vec<(u64, Chunk)> {
        let offset = |s: &[(u64, Chunk)]| s.first().map_or(u64::MAX, |(_, c)| c.offset);
        let first_next = self.has_first()
            && (!blob_order
                || self.rest == self.spans.len()
                || offset(&self.spans[self.next]) <= offset(&self.spans[self.rest]));
        let i = if first_next {
            self.next += 1;
            self.next - 1
        } else {
            self.rest += 1;
            self.rest - 1
        };
        std::mem::take(&mut self.spans[i])
    }

    /// Takes no more spans (after a failure).
    fn abandon(&mut self) {
        self.next = self.first;
        self.rest = self.spans.len();
    }
}

struct BackgroundJob {
    id: u64,
    layer: Weak<Inner>,
    /// Position in the layer's blob order where the next span starts.
    cursor: usize,
    /// Passes over the layer so far, and whether a span of this pass failed.
    pass: u32,
    failed: bool,
}

/// Chunks (with their files' inodes) of one layer.
type LayerChunks = (Weak<Inner>, Vec<(u64, Chunk)>);

struct State {
    stop: bool,
    next_id: u64,
    /// On-demand reads in progress on the node.
    reading: usize,
    /// On-demand fetches (of reads that missed) in flight on the node.
    fetching: usize,
    /// The last on-demand read, mount or prefetch.
    last_activity: Instant,
    /// Chunks to fetch ahead of readers, and read-ahead requests in flight.
    read_ahead: VecDeque<LayerChunks>,
    reading_ahead: usize,
    /// Read-ahead and prefetch requests in flight (see [`LinkEstimate::ahead_in_flight`]).
    ahead_running: usize,
    prefetch: VecDeque<PrefetchJob>,
    /// The prefetch job to take the next span from: layers take turns.
    prefetch_turn: usize,
    background: VecDeque<BackgroundJob>,
    /// Background fetch waits until then (a backoff after failed passes).
    background_not_before: Instant,
}

struct Shared {
    options: FetchOptions,
    state: Mutex<State>,
    /// The prefetch workers wait here for read-ahead or prefetch to do and a free slot.
    work: Condvar,
    /// The background worker waits here for a quiet link. Apart from this one waiter,
    /// reads wake nobody: a read through FUSE that woke every worker paid for their
    /// context switches on every request.
    quiet: Condvar,
    /// Prefetch and background requests about to go wait here while an on-demand fetch
    /// is in flight ([`FetchScheduler::make_way`]).
    way: Condvar,
    link: Mutex<LinkSamples>,
}

impl Shared {
    /// Wakes the workers after read-ahead, prefetch or their requests in flight changed:
    /// the prefetch workers, and the background worker, which waits for them.
    fn queues_changed(&self) {
        self.work.notify_all();
        self.quiet.notify_all();
    }

    fn new(options: FetchOptions) -> Shared {
        let now = Instant::now();
        Shared {
            options,
            state: Mutex::new(State {
                stop: false,
                next_id: 0,
                reading: 0,
                fetching: 0,
                last_activity: now,
                read_ahead: VecDeque::new(),
                reading_ahead: 0,
                ahead_running: 0,
                prefetch: VecDeque::new(),
                prefetch_turn: 0,
                background: VecDeque::new(),
                background_not_before: now,
            }),
            work: Condvar::new(),
            quiet: Condvar::new(),
            way: Condvar::new(),
            link: Mutex::new(LinkSamples::default()),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node's fetch scheduler. Create one per process and give it to every
/// [`LayerFs`](crate::LayerFs); its worker threads end when it is dropped.
pub struct FetchScheduler {
    shared: Arc<Shared>,
    /// Latency histograms of every layer using this scheduler.
    node_stats: crate::fs::NodeStats,
    /// Whether a mount already said that the kernel cannot do passthrough.
    no_passthrough_said: std::sync::atomic::AtomicBool,
    /// Walks fetching executables' libraries running on the node (`fs/deps.rs`).
    pub(crate) dependency_walks: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for FetchScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchScheduler")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

/// Marks an on-demand read in progress (see [`FetchScheduler::reading`]).
pub struct ReadGuard<'a>(&'a Shared);

/// Marks an on-demand fetch in flight (see [`FetchScheduler::fetching`]).
pub(crate) struct FetchGuard<'a>(&'a Shared);

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.fetching -= 1;
        let last = st.fetching == 0;
        drop(st);
        if last {
            self.0.way.notify_all();
        }
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.reading -= 1;
        st.last_activity = Instant::now();
        drop(st);
        self.0.quiet.notify_all();
    }
}

impl FetchScheduler {
    /// A scheduler doing what `options` say, with its worker threads started.
    pub fn new(options: FetchOptions) -> Arc<FetchScheduler> {
        let shared = Arc::new(Shared::new(options));
        for i in 0..MAX_AHEAD_IN_FLIGHT {
            let s = shared.clone();
            spawn(&format!("estargz-prefetch-{i}"), move || {
                prefetch_worker(&s)
            });
        }
        let s = shared.clone();
        spawn("estargz-background", move || background_worker(&s));
        Arc::new(FetchScheduler {
            shared,
            node_stats: Default::default(),
            no_passthrough_said: Default::default(),
            dependency_walks: Default::default(),
        })
    }

    /// Latency histograms of every layer using this scheduler (the node's, in the FUSE
    /// manager).
    pub fn node_stats(&self) -> &crate::fs::NodeStats {
        &self.node_stats
    }

    /// Logs, once for the node, that the kernel does not offer FUSE passthrough.
    pub(crate) fn warn_once_no_passthrough(&self) {
        if !self
            .no_passthrough_said
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "this kernel does not offer FUSE passthrough (Linux 6.9 and later do); \
                local files are read through FUSE"
            );
        }
    }

    /// The options in use.
    pub fn options(&self) -> &FetchOptions {
        &self.shared.options
    }

    /// Waits until no on-demand read has been in progress on the node for `idle`, or
    /// `give_up` says to stop: for work that can wait while containers start, such as
    /// rebuilding a layer to serve it without FUSE.
    pub(crate) fn wait_idle(&self, idle: Duration, give_up: impl Fn() -> bool) {
        loop {
            let left = {
                let st = lock(&self.shared.state);
                match st.reading {
                    0 => idle.checked_sub(st.last_activity.elapsed()),
                    _ => Some(idle),
                }
            };
            match left {
                None => return,
                Some(_) if give_up() => return,
                Some(d) => std::thread::sleep(d.clamp(
                    Duration::from_millis(10),
                    idle.min(Duration::from_millis(100)),
                )),
            }
        }
    }

    /// The link as measured so far.
    pub fn link(&self) -> LinkEstimate {
        lock(&self.shared.link).estimate()
    }

    /// Records a completed range request of `bytes` that took `took`.
    pub(crate) fn record(&self, bytes: u64, took: Duration) {
        lock(&self.shared.link).record(bytes, took);
    }

    /// Marks an on-demand read in progress until the guard is dropped: background fetch
    /// holds back while any is, and for the quiet period after the last one.
    pub fn reading(&self) -> ReadGuard<'_> {
        lock(&self.shared.state).reading += 1;
        ReadGuard(&self.shared)
    }

    /// Marks an on-demand fetch in flight until the guard is dropped: prefetch and
    /// background fetch start no new request meanwhile ([`FetchScheduler::make_way`]), so the
    /// link is the reader's.
    pub(crate) fn fetching(&self) -> FetchGuard<'_> {
        lock(&self.shared.state).fetching += 1;
        FetchGuard(&self.shared)
    }

    /// Waits, before a prefetch or background request is sent, until no on-demand fetch is
    /// in flight on the node.
    pub(crate) fn make_way(&self) {
        let mut st = lock(&self.shared.state);
        while st.fetching > 0 && !st.stop {
            st = self.shared.way.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Queues `chunks` (neighbours in the blob, of one file of `layer`) to be fetched ahead
    /// of a reader, before any prefetch; not when the same chunks are queued already (each
    /// read of a chunk still on its way asks again).
    pub(crate) fn read_ahead(&self, layer: Weak<Inner>, chunks: Vec<(u64, Chunk)>) {
        let mut st = lock(&self.shared.state);
        let first = chunks.first().map(|(_, c)| c.digest);
        if st
            .read_ahead
            .iter()
            .any(|(l, queued)| l.ptr_eq(&layer) && queued.first().map(|(_, c)| c.digest) == first)
        {
            return;
        }
        st.read_ahead.push_back((layer, chunks));
        drop(st);
        self.shared.queues_changed();
    }

    /// Takes a newly mounted layer: queues its prefetch, then its background fetch, as the
    /// options say. A mount counts as activity for the quiet period (its container is
    /// about to start reading).
    pub(crate) fn add_layer(&self, layer: &Arc<Inner>) {
        let o = &self.shared.options;
        let (spans, first) = match o.prefetch {
            // No prioritized files: the loader and C library are what the first container
            // reads first (they would otherwise be its second and third round trips), and
            // they are fetched while containerd is still creating it.
            true if layer.tree().prefetch_size.is_none() => {
                let spans = layer.loader_spans(PREFETCH_SPAN);
                let n = spans.len();
                (spans, n)
            }
            true => {
                let mut spans = layer.prefetch_spans(PREFETCH_SPAN);
                let n = spans.len();
                spans.extend(layer.profile_rest_spans(PREFETCH_SPAN));
                (spans, n)
            }
            false => (Vec::new(), 0),
        };
        let mut st = lock(&self.shared.state);
        st.last_activity = Instant::now();
        st.next_id += 1;
        let id = st.next_id;
        if spans.is_empty() {
            layer.mark_prefetch_done();
            if o.background {
                // Newest first, as for prefetch: the top layer holds what the container
                // runs, a base layer what many images share (often cached already).
                st.background.push_front(BackgroundJob::new(id, layer));
            }
        } else {
            st.prefetch
                .push_back(PrefetchJob::new(id, Arc::downgrade(layer), spans, first));
            // The newest layer goes next: containerd mounts an image's layers bottom up,
            // and a container starts with its entrypoint, usually in the top layer.
            st.prefetch_turn = st.prefetch.len() - 1;
        }
        drop(st);
        self.shared.queues_changed();
    }
}

impl BackgroundJob {
    fn new(id: u64, layer: &Arc<Inner>) -> BackgroundJob {
        BackgroundJob {
            id,
            layer: Arc::downgrade(layer),
            cursor: 0,
            pass: 0,
            failed: false,
        }
    }
}

impl Drop for FetchScheduler {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        for c in [&self.shared.work, &self.shared.quiet, &self.shared.way] {
            c.notify_all();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        tracing::error!(error = %e, thread = name, "cannot start a fetch thread; layers are fetched on demand only");
    }
}

/// A layer still worth fetching for: alive and mounted.
fn live(layer: &Weak<Inner>) -> Option<Arc<Inner>> {
    layer.upgrade().filter(|l| !l.is_closed())
}

/// What a prefetch worker does next.
enum Work {
    ReadAhead(Weak<Inner>, Vec<(u64, Chunk)>),
    /// A span of the prefetch job with this id.
    Prefetch(u64, Weak<Inner>, Vec<(u64, Chunk)>),
}

fn prefetch_worker(shared: &Shared) {
    loop {
        let work = {
            let mut st = lock(&shared.state);
            loop {
                if st.stop {
                    return;
                }
                // As many requests in flight as the link carries per round trip; the
                // estimate changes as requests complete, which wakes the workers.
                let link = lock(&shared.link).estimate();
                let allowed = link.ahead_in_flight();
                if st.ahead_running < allowed {
                    if let Some((layer, chunks)) = st.read_ahead.pop_front() {
                        st.reading_ahead += 1;
                        st.ahead_running += 1;
                        break Work::ReadAhead(layer, chunks);
                    }
                    // Layers take turns: a process reads from all of its image's layers.
                    // What a start reads goes first, in every layer, unless the registry
                    // is on the local network (`PrefetchJob::take`).
                    let blob_order = link.is_local_network();
                    let jobs = st.prefetch.len();
                    let turn = st.prefetch_turn;
                    let order = (0..jobs).map(|i| (turn + i) % jobs);
                    let next = order
                        .clone()
                        .find(|&i| !blob_order && st.prefetch[i].has_first())
                        .or_else(|| order.clone().find(|&i| st.prefetch[i].has_any()));
                    if let Some(i) = next {
                        st.prefetch_turn = i + 1;
                        st.ahead_running += 1;
                        let job = &mut st.prefetch[i];
                        job.running += 1;
                        let span = job.take(blob_order);
                        break Work::Prefetch(job.id, job.layer.clone(), span);
                    }
                }
                st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        match work {
            Work::ReadAhead(layer, chunks) => {
                if let Some(l) = live(&layer) {
                    if let Err(e) = l.fetch_claimed(&l.missing(&chunks), For::ReadAhead, None) {
                        tracing::debug!(error = %e, "read-ahead failed; left to reads");
                    }
                }
                let mut st = lock(&shared.state);
                st.reading_ahead -= 1;
                st.ahead_running -= 1;
                st.last_activity = Instant::now();
            }
            Work::Prefetch(id, layer, span) => {
                prefetched(shared, id, &layer, &span);
                lock(&shared.state).ahead_running -= 1;
            }
        }
        shared.queues_changed();
    }
}

/// Fetches one span of prefetch job `id` and settles the job.
fn prefetched(shared: &Shared, id: u64, layer: &Weak<Inner>, span: &[(u64, Chunk)]) {
    let layer = live(layer);
    let failed = match &layer {
        Some(l) => l
            .fetch_claimed(&l.missing(span), For::Ahead, None)
            .map_err(|e| tracing::warn!(error = %e, "prefetch failed; the rest of the layer's prioritized files are fetched on demand"))
            .is_err(),
        None => true,
    };
    let mut st = lock(&shared.state);
    st.last_activity = Instant::now();
    let Some(at) = st.prefetch.iter().position(|j| j.id == id) else {
        return;
    };
    let job = &mut st.prefetch[at];
    job.running -= 1;
    if failed {
        job.abandon();
    }
    if !job.has_any() && job.running == 0 {
        let job = st.prefetch.remove(at).unwrap_or_else(|| unreachable!());
        if let Some(l) = &layer {
            l.mark_prefetch_done();
            if shared.options.background {
                st.background.push_front(BackgroundJob::new(job.id, l));
            }
        }
    }
}

/// Waits until background fetch may send a request: nothing to prefetch, no on-demand read
/// in progress and none for the quiet period. Returns the state locked, or `None` when the
/// scheduler stops.
fn wait_quiet(shared: &Shared) -> Option<MutexGuard<'_, State>> {
    let mut st = lock(&shared.state);
    loop {
        if st.stop {
            return None;
        }
        let now = Instant::now();
        let quiet = lock(&shared.link)
            .estimate()
            .background_quiet(shared.options.background_quiet);
        let until = (st.last_activity + quiet).max(st.background_not_before);
        // Where a background request cannot delay a read noticeably (no quiet period),
        // it does not wait for reads either: it brings what they will ask for next.
        let reading = st.reading > 0 && !quiet.is_zero();
        let busy = reading || st.reading_ahead > 0 || !st.read_ahead.is_empty();
        if st.background.is_empty() || !st.prefetch.is_empty() || busy {
            st = shared.quiet.wait(st).unwrap_or_else(|p| p.into_inner());
        } else if now < until {
            st = shared
                .quiet
                .wait_timeout(st, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        } else {
            return Some(st);
        }
    }
}

fn background_worker(shared: &Shared) {
    let link = || lock(&shared.link).estimate();
    loop {
        let Some(mut st) = wait_quiet(shared) else {
            return;
        };
        let Some(job) = st.background.front_mut() else {
            continue;
        };
        let (id, weak, mut cursor) = (job.id, job.layer.clone(), job.cursor);
        drop(st);
        let layer = live(&weak);
        let step = layer.as_ref().map(|l| {
            let request = link().background_request();
            let span = l.next_missing_span(&mut cursor, request);
            let ok = span.as_ref().map(|span| {
                // Between requests, wait again: a read may have started.
                let pause = || wait_quiet(shared).is_some() && !l.is_closed();
                l.fetch_paced(span, request, pause)
                    .map_err(|e| tracing::warn!(error = %e, "background fetch of a span failed; left to on-demand reads"))
                    .is_ok()
            });
            (span.is_some(), ok)
        });
        let mut st = lock(&shared.state);
        let Some(at) = st.background.iter().position(|j| j.id == id) else {
            continue;
        };
        match step {
            // The layer is gone.
            None => {
                st.background.remove(at);
            }
            Some((true, ok)) => {
                let job = &mut st.background[at];
                job.cursor = cursor;
                job.failed |= ok == Some(false);
            }
            // The end of a pass.
            Some((false, _)) => {
                let job = &mut st.background[at];
                if job.failed && job.pass + 1 < BACKGROUND_PASSES {
                    job.pass += 1;
                    job.failed = false;
                    job.cursor = 0;
                    // Give a failing registry time before the next pass.
                    let backoff = Duration::from_secs(1 << job.pass);
                    st.background_not_before = Instant::now() + backoff;
                } else {
                    let job = st.background.remove(at).unwrap_or_else(|| unreachable!());
                    if let Some(l) = layer.as_ref().filter(|_| !job.failed) {
                        l.mark_background_done();
                    } else {
                        tracing::warn!(
                            "background fetch gave up on a layer after {BACKGROUND_PASSES} passes with failures; the rest is fetched on demand"
                        );
                    }
                }
            }
        }
        drop(st);
        // Only the background worker waits for the background queue.
        shared.quiet.notify_all();
    }
}

/// Whether the chunk `c` continues a run ending with `prev` in the blob (the next member,
/// or the same member).
pub(crate) fn adjacent(prev: &Chunk, c: &Chunk) -> bool {
    prev.compressed_end == c.offset || prev.offset == c.offset
}

/// `items` (in blob order) in runs of neighbouring chunks of at most `max` bytes.
fn neighbour_runs(
    items: impl IntoIterator<Item = (u64, Chunk)>,
    max: u64,
) -> Vec<Vec<(u64, Chunk)>> {
    let mut out: Vec<Vec<(u64, Chunk)>> = Vec::new();
    for item in items {
        match out.last_mut() {
            Some(run)
                if adjacent(&run[run.len() - 1].1, &item.1)
                    && item.1.compressed_end - run[0].1.offset <= max =>
            {
                run.push(item)
            }
            _ => out.push(vec![item]),
        }
    }
    out
}

/// `runs` (in blob order) packed into spans of at most `max` bytes (or one run) and
/// [`SPAN_RUNS`] runs, in order.
fn packed(runs: Vec<Vec<(u64, Chunk)>>, max: u64) -> Vec<Vec<(u64, Chunk)>> {
    let mut out: Vec<Vec<(u64, Chunk)>> = Vec::new();
    // The last span's bytes and runs.
    let (mut total, mut n) = (0u64, 0usize);
    for run in runs {
        let size = match (run.first(), run.last()) {
            (Some((_, f)), Some((_, l))) => l.compressed_end - f.offset,
            _ => continue,
        };
        match out.last_mut() {
            Some(span) if n < SPAN_RUNS && total + size <= max => {
                span.extend(run);
                total += size;
                n += 1;
            }
            _ => {
                out.push(run);
                (total, n) = (size, 1);
            }
        }
    }
    out
}

impl Inner {
    /// The prefetch spans of this layer: its missing prioritized chunks in blob order, in
    /// runs of neighbours of at most `max` bytes.
    fn prefetch_spans(&self, max: u64) -> Vec<Vec<(u64, Chunk)>> {
        if self.tree().prefetch_size.is_none() {
            return Vec::new();
        }
        self.missing_spans(max, |ino, c| self.tree().is_prioritized(ino, c))
    }

    /// The rest of the files with a page profile (their chunks no recorded start read),
    /// as prefetch spans: fetched after what starts read, so that each such file is soon
    /// whole and the reads after that are served from local files, not page by page.
    fn profile_rest_spans(&self, max: u64) -> Vec<Vec<(u64, Chunk)>> {
        let tree = self.tree();
        if !tree.has_profiles() {
            return Vec::new();
        }
        self.missing_spans(max, |ino, c| {
            tree.is_profiled(ino) && !tree.is_prioritized(ino, c)
        })
    }

    /// The layer's chunks that `wanted` picks and the cache lacks, in blob order, in runs
    /// of neighbours packed into spans of at most `max` bytes.
    fn missing_spans(
        &self,
        max: u64,
        wanted: impl Fn(u64, &Chunk) -> bool,
    ) -> Vec<Vec<(u64, Chunk)>> {
        packed(
            neighbour_runs(
                self.tree()
                    .chunks_in_blob_order()
                    .filter(|(ino, c)| wanted(*ino, c) && !self.cache().contains(&c.digest)),
                max,
            ),
            max,
        )
    }

    /// The missing chunks of the image's loader and C library held by this layer
    /// ([`Inner::loader_files`]), as prefetch spans.
    fn loader_spans(self: &Arc<Self>, max: u64) -> Vec<Vec<(u64, Chunk)>> {
        let mut items: Vec<(u64, Chunk)> = self
            .loader_files()
            .into_iter()
            .filter_map(|ino| Some((ino, self.tree().node(ino)?)))
            .flat_map(|(ino, n)| self.tree().chunks(n).iter().map(move |c| (ino, *c)))
            .filter(|(_, c)| !self.cache().contains(&c.digest))
            .collect();
        items.sort_by_key(|(_, c)| (c.offset, c.inner_offset));
        neighbour_runs(items, max)
    }

    /// Those of `span`'s chunks not cached now.
    fn missing(&self, span: &[(u64, Chunk)]) -> Vec<(u64, Chunk)> {
        span.iter()
            .filter(|(_, c)| !self.cache().contains(&c.digest))
            .copied()
            .collect()
    }

    /// The next run of missing neighbouring chunks at or after `cursor` (a position in blob
    /// order), of at most `max` bytes unless its first chunk alone is larger; moves
    /// `cursor` past it. `None` at the end of the layer.
    fn next_missing_span(&self, cursor: &mut usize, max: u64) -> Option<Vec<(u64, Chunk)>> {
        let tree = self.tree();
        while let Some(first) = tree.blob_chunk(*cursor) {
            *cursor += 1;
            if self.cache().contains(&first.1.digest) {
                continue;
            }
            let mut run = vec![first];
            while let Some(next) = tree.blob_chunk(*cursor) {
                let last = &run[run.len() - 1].1;
                if !adjacent(last, &next.1)
                    || next.1.compressed_end - first.1.offset > max
                    || self.cache().contains(&next.1.digest)
                {
                    break;
                }
                run.push(next);
                *cursor += 1;
            }
            return Some(run);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scattered runs (a page profile's chunks) share spans up to the span's bytes and
    /// [`SPAN_RUNS`] runs, in blob order; a run larger than a span stays one.
    #[test]
    fn scattered_runs_are_packed_into_spans() {
        let run = |offset: u64, len: u64| {
            let c = Chunk {
                offset,
                compressed_end: offset + len,
                inner_offset: 0,
                chunk_offset: 0,
                size: len,
                digest: estargz_format::Sha256Digest::of(&offset.to_le_bytes()),
            };
            vec![(1, c)]
        };
        let offsets = |spans: &[Vec<(u64, Chunk)>]| -> Vec<Vec<u64>> {
            spans
                .iter()
                .map(|s| s.iter().map(|(_, c)| c.offset).collect())
                .collect()
        };
        let small: Vec<_> = (0..10).map(|i| run(i * 100_000, 20_000)).collect();
        let spans = packed(small, 1 << 20);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].len(), SPAN_RUNS);
        assert_eq!(offsets(&spans)[1], [800_000, 900_000]);
        let mixed = vec![
            run(0, 600_000),
            run(700_000, 600_000),
            run(2 << 20, 3 << 20),
        ];
        assert_eq!(
            offsets(&packed(mixed, 1 << 20)),
            [vec![0], vec![700_000], vec![2 << 20]]
        );
    }

    /// A page profile's prefetch takes what a start reads first, or, from a registry on
    /// the local network, whole files in blob order; a failure leaves nothing to take.
    #[test]
    fn a_prefetch_job_takes_its_spans_in_profile_or_blob_order() {
        let span = |offset: u64| {
            let c = Chunk {
                offset,
                compressed_end: offset + 10,
                inner_offset: 0,
                chunk_offset: 0,
                size: 10,
                digest: estargz_format::Sha256Digest::of(&offset.to_le_bytes()),
            };
            vec![(1, c)]
        };
        // Read at start: 0 and 300; the rest of the files: 100, 200 and 400.
        let job = || {
            PrefetchJob::new(
                1,
                Weak::new(),
                [0, 300, 100, 200, 400].map(span).to_vec(),
                2,
            )
        };
        let taken = |blob_order: bool| {
            let mut j = job();
            let mut order = Vec::new();
            while j.has_any() {
                order.push(j.take(blob_order)[0].1.offset);
            }
            order
        };
        assert_eq!(taken(false), [0, 300, 100, 200, 400]);
        assert_eq!(taken(true), [0, 100, 200, 300, 400]);
        // The order may change between spans, as the link is measured.
        let mut j = job();
        assert_eq!(j.take(false)[0].1.offset, 0);
        assert!(j.has_first());
        assert_eq!(j.take(true)[0].1.offset, 100);
        assert_eq!(j.take(false)[0].1.offset, 300);
        assert!(!j.has_first() && j.has_any());
        j.abandon();
        assert!(!j.has_any());
    }

    /// Read-ahead and prefetch fill the bandwidth-delay product: two requests until the
    /// link is measured and on the benchmark's 100 and 20 Mbit/s links, more on a fast
    /// link with a long round trip; a burst that makes a small request look instantaneous
    /// does not count.
    #[test]
    fn requests_ahead_in_flight_follow_the_bandwidth_delay_product() {
        let ms = Duration::from_millis;
        let link = |rtt: u64, bytes_per_sec: f64| {
            let mut s = LinkSamples::default();
            s.record(4 << 10, ms(rtt));
            s.record(
                1 << 20,
                ms(rtt) + Duration::from_secs_f64((1 << 20) as f64 / bytes_per_sec),
            );
            s
        };
        assert_eq!(
            LinkSamples::default().estimate().ahead_in_flight(),
            PREFETCH_CONCURRENCY
        );
        assert_eq!(
            link(20, 12.5e6).estimate().ahead_in_flight(),
            2,
            "100 Mbit/s, 20 ms"
        );
        assert_eq!(
            link(50, 2.5e6).estimate().ahead_in_flight(),
            2,
            "20 Mbit/s, 50 ms"
        );
        assert_eq!(
            link(50, 125e6).estimate().ahead_in_flight(),
            7,
            "1 Gbit/s, 50 ms"
        );
        assert_eq!(link(1, 1e9).estimate().ahead_in_flight(), 2, "loopback");
        assert_eq!(
            link(300, 1e9).estimate().ahead_in_flight(),
            MAX_AHEAD_IN_FLIGHT
        );
        // 20 Mbit/s behind a 256 KiB burst: a 200 KiB request arrives at once.
        let mut s = link(50, 2.5e6);
        s.record(200 << 10, ms(51));
        let e = s.estimate();
        assert!(e.throughput.unwrap() > 100e6, "{e:?}");
        assert_eq!(e.ahead_in_flight(), 2);
        // 1 Gbit/s, 100 ms, where the only small request so far paid for opening a
        // connection: the large requests bound the round trip.
        let mut s = LinkSamples::default();
        s.record(10_000, ms(111));
        for took in [105, 107, 110, 108] {
            s.record(1 << 20, ms(took));
        }
        let e = s.estimate();
        assert_eq!(e.rtt, Some(ms(105)), "{e:?}");
        assert_eq!(e.ahead_in_flight(), MAX_AHEAD_IN_FLIGHT, "{e:?}");
    }

    /// A start whose first requests are prefetch spans (no small request to measure the
    /// round trip) fits the link to the spans: more in flight on a long fast link (these
    /// are the spans of a gcc start over the benchmark's 1 Gbit/s, 50 ms link), two on
    /// slower ones, and two while the spans are all of one size.
    #[test]
    fn prefetch_spans_alone_size_the_requests_in_flight() {
        let fit = |spans: &[(u64, f64)]| {
            let mut s = LinkSamples::default();
            for &(bytes, ms) in spans {
                s.record(bytes, Duration::from_secs_f64(ms / 1e3));
            }
            s.estimate()
        };
        let gbit = fit(&[
            (784_577, 72.3),
            (887_045, 76.5),
            (478_639, 76.3),
            (1_687_410, 72.8),
            (2_169_907, 71.9),
            (2_106_048, 77.1),
            (1_279_736, 64.5),
            (1_444_882, 67.3),
        ]);
        assert!(gbit.ahead_in_flight() >= 7, "{gbit:?}");
        // 100 Mbit/s with 20 ms, 20 Mbit/s with 50 ms: round trip and rate recovered.
        let mbit100 = fit(&[(784_577, 82.8), (2_106_048, 188.5), (1_279_736, 122.4)]);
        let (rtt, thr) = mbit100.spans_fit.unwrap();
        assert!((15..25).contains(&rtt.as_millis()), "{mbit100:?}");
        assert!((11e6..14e6).contains(&thr), "{mbit100:?}");
        assert_eq!(mbit100.ahead_in_flight(), 2);
        let mbit20 = fit(&[(784_577, 363.8), (2_106_048, 892.4)]);
        assert_eq!(mbit20.ahead_in_flight(), 2, "{mbit20:?}");
        let alike = fit(&[(1 << 20, 70.0), (1 << 20, 71.0), (1 << 20, 69.0)]);
        assert_eq!(alike.spans_fit, None);
        assert_eq!(alike.ahead_in_flight(), PREFETCH_CONCURRENCY);
        // Once a small request measured the round trip, the fit steps aside.
        let mut s = LinkSamples::default();
        s.record(4 << 10, Duration::from_millis(20));
        s.record(784_577, Duration::from_secs_f64(0.0828));
        s.record(2_106_048, Duration::from_secs_f64(0.1885));
        assert_eq!(s.estimate().spans_fit, None);
    }

    #[test]
    fn link_estimate_and_request_size() {
        let mut s = LinkSamples::default();
        assert_eq!(
            s.estimate().background_request(),
            DEFAULT_BACKGROUND_REQUEST
        );
        // 100 Mbit/s (12.5 MB/s), 20 ms round trip: one round trip is 250 kB.
        let ms = Duration::from_millis;
        s.record(4 << 10, ms(21));
        s.record(20 << 10, ms(22));
        s.record(
            1 << 20,
            ms(20) + Duration::from_secs_f64((1 << 20) as f64 / 12.5e6),
        );
        // A large request slowed down by others in flight does not lower the estimate.
        s.record(1 << 20, ms(300));
        let e = s.estimate();
        assert_eq!(e.rtt, Some(ms(21)));
        let thr = e.throughput.unwrap();
        assert!((12.0e6..14.0e6).contains(&thr), "{thr}");
        let req = e.background_request();
        assert!((230_000..280_000).contains(&req), "{req}");
        // Loopback: 5 ms of data, up to the ceiling; a slow satellite link: the ceiling;
        // a slow link with a short round trip: the floor.
        let fast = LinkEstimate {
            rtt: Some(Duration::from_micros(50)),
            throughput: Some(1e9),
            bulk_throughput: Some(1e9),
            spans_fit: None,
        };
        assert_eq!(fast.background_request(), MAX_BACKGROUND_REQUEST);
        let thin = LinkEstimate {
            rtt: Some(Duration::from_micros(500)),
            throughput: Some(1e6),
            bulk_throughput: Some(1e6),
            spans_fit: None,
        };
        assert_eq!(thin.background_request(), MIN_BACKGROUND_REQUEST);
        assert_eq!(
            thin.background_quiet(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        let long = LinkEstimate {
            rtt: Some(Duration::from_millis(600)),
            throughput: Some(1e8),
            bulk_throughput: Some(1e8),
            spans_fit: None,
        };
        assert_eq!(long.background_request(), MAX_BACKGROUND_REQUEST);
        // The quiet period: kept on links where a background request takes a noticeable
        // share of a read's time, dropped where it cannot be noticed, kept until measured.
        let quiet = Duration::from_secs(1);
        assert_eq!(e.background_quiet(quiet), quiet, "100 Mbit/s, 20 ms");
        assert_eq!(long.background_quiet(quiet), quiet);
        assert_eq!(fast.background_quiet(quiet), Duration::ZERO, "loopback");
        let lan = LinkEstimate {
            rtt: Some(Duration::from_micros(500)),
            throughput: Some(1.25e8),
            bulk_throughput: Some(1.25e8),
            spans_fit: None,
        };
        assert_eq!(lan.background_quiet(quiet), Duration::ZERO, "1 Gbit/s LAN");
        // A long round trip whose throughput was measured far too high (a burst).
        let burst = LinkEstimate {
            rtt: Some(Duration::from_millis(20)),
            throughput: Some(1e9),
            bulk_throughput: Some(1e9),
            spans_fit: None,
        };
        assert_eq!(burst.background_quiet(quiet), quiet);
        let unknown = LinkEstimate {
            rtt: None,
            throughput: None,
            bulk_throughput: None,
            spans_fit: None,
        };
        assert_eq!(unknown.background_quiet(quiet), quiet);
        // Old samples leave the window.
        for _ in 0..LINK_WINDOW {
            s.record(1 << 10, ms(50));
        }
        assert_eq!(s.estimate().rtt, Some(ms(50)));
    }

    #[test]
    fn only_a_short_round_trip_and_a_fast_mib_make_a_local_network() {
        let link = |rtt_us: u64, bytes_per_sec: f64| LinkEstimate {
            rtt: Some(Duration::from_micros(rtt_us)),
            throughput: Some(bytes_per_sec),
            bulk_throughput: Some(bytes_per_sec),
            spans_fit: None,
        };
        // Loopback with a busy CPU (140 MB/s); a 1 Gbit/s LAN.
        assert!(link(300, 1.4e8).is_local_network());
        assert!(link(500, 1.25e8).is_local_network());
        // 1 Gbit/s with 50 ms; 100 Mbit/s with 20 ms; 20 Mbit/s with 50 ms; a slow LAN.
        assert!(!link(50_000, 1.25e8).is_local_network());
        assert!(!link(20_000, 1.25e7).is_local_network());
        assert!(!link(50_000, 2.5e6).is_local_network());
        assert!(!link(500, 1.25e7).is_local_network());
        // Not measured by a small request: a fit to prefetch spans does not count.
        let fitted = LinkEstimate {
            rtt: None,
            throughput: None,
            bulk_throughput: None,
            spans_fit: Some((Duration::from_micros(300), 1.4e8)),
        };
        assert!(!fitted.is_local_network());
    }

    #[test]
    fn reads_hold_background_for_the_quiet_period() {
        // No worker threads: the test probes the gate they wait at.
        let shared = &Shared::new(FetchOptions {
            background_quiet: Duration::from_millis(100),
            ..Default::default()
        });
        lock(&shared.state).background.push_back(BackgroundJob {
            id: 1,
            layer: Weak::new(),
            cursor: 0,
            pass: 0,
            failed: false,
        });
        lock(&shared.state).reading += 1;
        let read = ReadGuard(shared);
        let started = Instant::now();
        let gate = std::thread::scope(|s| {
            let h = s.spawn(|| wait_quiet(shared).map(|_| started.elapsed()));
            std::thread::sleep(Duration::from_millis(150));
            drop(read);
            h.join().unwrap()
        });
        let opened = gate.expect("not stopped");
        assert!(
            opened >= Duration::from_millis(250),
            "the gate opened {opened:?} after the read began; the read ended at 150 ms"
        );
    }
}
