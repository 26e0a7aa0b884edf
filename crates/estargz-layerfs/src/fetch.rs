//! Per-layer progress of prefetch and background fetch (the fetching itself is the
//! node-wide [`FetchScheduler`](crate::FetchScheduler)'s).

use std::fmt;
use std::sync::atomic::Ordering;

use crate::fs::LayerFs;

/// How much of a layer is local, for other components and for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Compressed bytes fetched by this layer so far.
    pub fetched_bytes: u64,
    /// Chunks of the layer now in the cache.
    pub cached_chunks: u64,
    /// Chunks in the layer.
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

impl LayerFs {
    /// Where the layer stands now.
    pub fn progress(&self) -> Progress {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        let mut cached = 0;
        for (_, c) in self.tree().chunks_in_blob_order() {
            if seen.insert(c.digest) {
                total += 1;
                if self.cache().contains(&c.digest) {
                    cached += 1;
                }
            }
        }
        Progress {
            fetched_bytes: self.stats().fetched_bytes.load(Ordering::Relaxed),
            cached_chunks: cached,
            total_chunks: total,
            prefetch_done: self.is_prefetch_done(),
            background_done: self.is_background_done(),
        }
    }
}
