//! Per-layer progress of prefetch and background fetch (the fetching itself is the
//! node-wide [`FetchScheduler`](crate::FetchScheduler)'s).

use std::fmt;
use std::sync::atomic::Ordering;

/// How much of a layer is local, for other components and for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Compressed bytes fetched by this layer so far.
    pub fetched_bytes: u64,
    /// Distinct chunks of the layer available locally, as counted by
    /// [`Inner::progress`](crate::Inner::progress) (an estimate: see there).
    pub cached_chunks: u64,
    /// Distinct chunks in the layer.
    pub total_chunks: u64,
    /// Prefetch of prioritized files finished (or there was nothing to prefetch).
    pub prefetch_done: bool,
    /// Background fetch finished: the whole layer is local.
    pub background_done: bool,
}

impl Progress {
    /// Percentage of chunks cached.
    pub fn percent(&self) -> f64 {
        if self.total_chunks == 0 {
            100.0
        } else {
            self.cached_chunks as f64 * 100.0 / self.total_chunks as f64
        }
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1}% local ({}/{} chunks), {} bytes fetched, prefetch {}, background fetch {}",
            self.percent(),
            self.cached_chunks,
            self.total_chunks,
            self.fetched_bytes,
            if self.prefetch_done {
                "done"
            } else {
                "pending"
            },
            if self.background_done {
                "done"
            } else {
                "running or off"
            },
        )
    }
}

impl crate::fs::Inner {
    /// Where the layer stands now; reads counters only, so it costs the same for any layer
    /// and may be asked for often (every metrics scrape asks for every layer).
    ///
    /// `cached_chunks` is an estimate: the distinct chunks that were in the cache when the
    /// layer was made, plus the chunks this layer has fetched and stored since, at most
    /// `total_chunks`; and `total_chunks` once the background fetch has found every chunk
    /// local. It does not see chunks evicted from the cache since they were counted (it can
    /// be too high then), nor chunks of this layer that another layer sharing them fetched
    /// (too low, until this layer's background fetch finishes, if it runs); a chunk stored
    /// while the disk was full counts as local. Walking the chunks to ask the cache (exact,
    /// but a lookup per chunk on every call) is what this replaces.
    pub fn progress(&self) -> Progress {
        let stats = self.stats();
        let total = self.distinct_chunks;
        let background_done = self.is_background_done();
        let cached = if background_done {
            total
        } else {
            let stored = stats.fetched_chunks.load(Ordering::Relaxed);
            self.local_at_start.saturating_add(stored).min(total)
        };
        Progress {
            fetched_bytes: stats.fetched_bytes.load(Ordering::Relaxed),
            cached_chunks: cached,
            total_chunks: total,
            prefetch_done: self.is_prefetch_done(),
            background_done,
        }
    }
}
