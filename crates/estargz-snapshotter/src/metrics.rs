//! Prometheus metrics: the daemon's own counters, and the FUSE manager's per-layer and cache
//! counters, in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::Status;
use crate::remote::Fallback;

/// Layers remembered with their fallback reason (the most recent ones).
const MAX_FALLBACK_LAYERS: usize = 1000;

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    remote_layers: AtomicU64,
    resolve_nanos: AtomicU64,
    resolves: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    fallback_layers: Mutex<Vec<(String, &'static str)>>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// A layer was mounted lazily after resolving for `took`.
    pub fn observe_resolve(&self, took: Duration) {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        self.resolve_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A layer was mounted lazily.
    pub fn remote_layer(&self) {
        self.remote_layers.fetch_add(1, Ordering::Relaxed);
    }

    /// Layer `digest` fell back to an ordinary pull.
    pub fn fallback(&self, digest: &str, reason: Fallback) {
        *self
            .fallbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason.as_str())
            .or_default() += 1;
        let mut layers = self
            .fallback_layers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        layers.retain(|(d, _)| d != digest);
        layers.push((digest.to_string(), reason.as_str()));
        if layers.len() > MAX_FALLBACK_LAYERS {
            layers.remove(0);
        }
    }

    /// The exposition text, with the manager's `status` if it answered.
    pub fn render(&self, status: Option<&Status>) -> String {
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(o, "{name}{labels} {value}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v.to_string())];
        metric(
            "estargz_remote_layers_total",
            "counter",
            "Layers mounted lazily.",
            plain(self.remote_layers.load(Ordering::Relaxed)),
        );
        metric(
            "estargz_resolve_seconds_sum",
            "counter",
            "Time spent resolving layers (footer and TOC) that were mounted lazily.",
            vec![(
                String::new(),
                format!(
                    "{:.6}",
                    self.resolve_nanos.load(Ordering::Relaxed) as f64 / 1e9
                ),
            )],
        );
        metric(
            "estargz_resolve_seconds_count",
            "counter",
            "Layers resolved.",
            plain(self.resolves.load(Ordering::Relaxed)),
        );
        let fallbacks = self
            .fallbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        metric(
            "estargz_fallbacks_total",
            "counter",
            "Layers pulled the ordinary way, by reason.",
            fallbacks
                .iter()
                .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n.to_string()))
                .collect(),
        );
        let layers = self
            .fallback_layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        metric(
            "estargz_layer_fallback",
            "gauge",
            "1 for each recent layer pulled the ordinary way, with the reason.",
            layers
                .iter()
                .map(|(d, r)| {
                    (
                        format!("{{layer=\"{}\",reason=\"{r}\"}}", escape(d)),
                        "1".into(),
                    )
                })
                .collect(),
        );
        let Some(st) = status else {
            metric(
                "estargz_fuse_manager_up",
                "gauge",
                "Whether the FUSE manager answers.",
                plain(0),
            );
            return o;
        };
        metric(
            "estargz_fuse_manager_up",
            "gauge",
            "Whether the FUSE manager answers.",
            plain(1),
        );
        metric(
            "estargz_mounted_layers",
            "gauge",
            "Layers mounted lazily now.",
            plain(st.mounts.len() as u64),
        );
        type Field = fn(&crate::protocol::LayerStatus) -> String;
        let per_layer: [(&str, &str, &str, Field); 8] = [
            (
                "estargz_layer_fetched_bytes_total",
                "counter",
                "Compressed bytes fetched from the registry.",
                |l| l.fetched_bytes.to_string(),
            ),
            (
                "estargz_layer_fetch_requests_total",
                "counter",
                "Range requests sent to the registry.",
                |l| l.fetch_requests.to_string(),
            ),
            (
                "estargz_layer_fetch_seconds_sum",
                "counter",
                "Time on-demand reads waited for the registry.",
                |l| format!("{:.6}", l.fetch_nanos as f64 / 1e9),
            ),
            (
                "estargz_layer_read_bytes_total",
                "counter",
                "File bytes read through the mount (with the kernel's read-ahead).",
                |l| l.read_bytes.to_string(),
            ),
            (
                "estargz_layer_read_errors_total",
                "counter",
                "Reads answered with EIO.",
                |l| l.read_errors.to_string(),
            ),
            (
                "estargz_layer_cached_chunks",
                "gauge",
                "Distinct chunks of the layer available locally.",
                |l| l.cached_chunks.to_string(),
            ),
            (
                "estargz_layer_chunks",
                "gauge",
                "Distinct chunks of the layer.",
                |l| l.total_chunks.to_string(),
            ),
            (
                "estargz_layer_prefetch_done",
                "gauge",
                "Whether prioritized files were prefetched.",
                |l| u8::from(l.prefetch_done).to_string(),
            ),
        ];
        for (name, kind, help, field) in per_layer {
            metric(
                name,
                kind,
                help,
                st.mounts
                    .values()
                    .map(|l| (format!("{{layer=\"{}\"}}", escape(&l.digest)), field(l)))
                    .collect(),
            );
        }
        let c = &st.cache;
        for (name, kind, help, v) in [
            (
                "estargz_cache_hits_total",
                "counter",
                "Chunk cache hits.",
                c.hits,
            ),
            (
                "estargz_cache_misses_total",
                "counter",
                "Chunk cache misses.",
                c.misses,
            ),
            (
                "estargz_cache_usage_bytes",
                "gauge",
                "Bytes of chunks in the cache.",
                c.usage_bytes,
            ),
            (
                "estargz_cache_memory_bytes",
                "gauge",
                "Bytes of decompressed chunks kept in memory (all layers).",
                c.memory_bytes,
            ),
            (
                "estargz_cache_chunks",
                "gauge",
                "Chunks in the cache.",
                c.entries,
            ),
            (
                "estargz_cache_evictions_total",
                "counter",
                "Chunks evicted to stay under the cap.",
                c.evictions,
            ),
            (
                "estargz_cache_write_errors_total",
                "counter",
                "Chunks that could not be stored.",
                c.write_errors,
            ),
        ] {
            metric(name, kind, help, plain(v));
        }
        o
    }
}
