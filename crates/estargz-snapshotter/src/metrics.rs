//! Prometheus metrics: the daemon's own counters, and the FUSE manager's per-layer, cache
//! and node-wide counters, encoded by `prometheus-client` in the Prometheus text format
//! (0.0.4) or OpenMetrics.
//!
//! The manager's counters are read from its [`Status`] at each scrape. Each field of
//! [`LayerStatus`] and [`CacheStatus`] is exported by exactly one entry of `LAYER` or
//! `CACHE` (name, type, help and how to read it, together); a test fails when a field
//! has none, so a counter added to the protocol cannot be left out of the metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::protocol::{CacheStatus, HistogramStatus, LayerStatus, Status};
use crate::remote::Fallback;

/// Layers remembered with their fallback reason (the most recent ones).
const MAX_FALLBACK_LAYERS: usize = 1000;

/// Upper bounds of `estargz_resolve_seconds`' buckets: a footer and a small TOC come in one
/// round trip, a large TOC takes a second one and seconds to check; the default resolve
/// timeout is 10 s.
const RESOLVE_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text, version 0.0.4: what `curl` and most tools read.
    Prometheus,
    /// OpenMetrics text 1.0.0 (ends with `# EOF`).
    OpenMetrics,
}

impl Format {
    /// The format a scraper asks for in its `Accept` header: OpenMetrics if it names it
    /// (Prometheus does), the Prometheus text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

type ReasonLabel = [(&'static str, &'static str); 1];

/// The daemon's counters.
#[derive(Debug)]
pub struct Metrics {
    remote_layers: Counter,
    resolve_seconds: Histogram,
    fallbacks: Family<ReasonLabel, Counter>,
    fallback_layers: Mutex<Vec<(String, &'static str)>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            remote_layers: Counter::default(),
            resolve_seconds: Histogram::new(RESOLVE_BUCKETS),
            fallbacks: Family::default(),
            fallback_layers: Mutex::default(),
        }
    }
}

impl Metrics {
    /// A layer was resolved, to be mounted lazily, in `took`.
    pub fn observe_resolve(&self, took: Duration) {
        self.resolve_seconds.observe(took.as_secs_f64());
    }

    /// A layer was mounted lazily.
    pub fn remote_layer(&self) {
        self.remote_layers.inc();
    }

    /// Layer `digest` fell back to an ordinary pull.
    pub fn fallback(&self, digest: &str, reason: Fallback) {
        self.fallbacks
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
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

    /// The exposition text in `format`, with the manager's `status` if it answered.
    pub fn render(&self, status: Option<Status>, format: Format) -> String {
        let scrape = Scrape {
            remote_layers: self.remote_layers.clone(),
            resolve_seconds: self.resolve_seconds.clone(),
            fallbacks: self.fallbacks.clone(),
            fallback_layers: self
                .fallback_layers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            status,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        let encoded = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        };
        // Writing to a String does not fail; an encoder refusing something is a bug here.
        if encoded.is_err() {
            tracing::error!("encoding the metrics failed; the exposition is cut short");
        }
        out
    }
}

/// Most connections the metrics endpoint serves at once; more wait in the listen backlog,
/// so that nobody who reaches the port can make the daemon run out of descriptors.
const MAX_CONNECTIONS: usize = 16;

/// How long a connection may take to send a request's headers, and may stay idle between
/// requests before it is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may live: a client that does not read its answer cannot keep a
/// slot longer (a scraper simply connects again).
const CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` (HTTP/1.1, keep-alive) on `listener` until the task is dropped:
/// the format the scraper's `Accept` header asks for, with the manager's counters from
/// `status` (a blocking call, run off the async threads; `None` when the manager does not
/// answer). Other paths get 404, other methods 405. At most 16 connections at once, each
/// closed after 10 s without a request and after a minute in any case: whoever reaches the
/// port can keep the endpoint busy, never the daemon.
pub async fn serve<F>(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, status: F)
where
    F: Fn() -> Option<Status> + Clone + Send + Sync + 'static,
{
    use axum::http::{header, HeaderMap, StatusCode};
    let scrape = move |headers: HeaderMap| async move {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        let format = Format::from_accept(accept);
        let status = tokio::task::spawn_blocking(status).await.ok().flatten();
        let body = metrics.render(status, format);
        ([(header::CONTENT_TYPE, format.content_type())], body)
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics\n") });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a connection to the metrics endpoint");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let io = hyper_util::rt::TokioIo::new(stream);
            match tokio::time::timeout(CONNECTION_LIFE, http.serve_connection(io, service)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection open too long; closed"),
            }
        });
    }
}

/// How a family's value is read from a status record.
enum Read<T> {
    /// A counter (its exported name gets `_total`).
    Counter(fn(&T) -> u64),
    /// A gauge.
    Gauge(fn(&T) -> u64),
    /// A histogram without finite buckets: sum in seconds and count (`_sum`, `_count` and
    /// the `+Inf` bucket).
    SumCount(fn(&T) -> (f64, u64)),
}

/// One metric family read from each status record of type `T`.
struct Field<T> {
    /// As registered: `prometheus-client` appends `_total` to a counter's name.
    name: &'static str,
    help: &'static str,
    read: Read<T>,
}

impl<T> Field<T> {
    fn metric_type(&self) -> MetricType {
        match self.read {
            Read::Counter(_) => MetricType::Counter,
            Read::Gauge(_) => MetricType::Gauge,
            Read::SumCount(_) => MetricType::Histogram,
        }
    }

    fn encode(&self, row: &T, mut e: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self.read {
            Read::Counter(f) => ConstCounter::new(f(row)).encode(e),
            Read::Gauge(f) => ConstGauge::new(f(row)).encode(e),
            Read::SumCount(f) => {
                let (sum, count) = f(row);
                // OpenMetrics wants the +Inf bucket written out.
                let buckets = [(f64::INFINITY, count)];
                e.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
            }
        }
    }

    /// The value as numbers, for tests.
    #[cfg(test)]
    fn values(&self, row: &T) -> (f64, u64) {
        match self.read {
            Read::Counter(f) | Read::Gauge(f) => (0.0, f(row)),
            Read::SumCount(f) => f(row),
        }
    }
}

fn seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// Every field of [`LayerStatus`] but `digest` (the `layer` label), each once.
const LAYER: &[Field<LayerStatus>] = &[
    Field {
        name: "estargz_layer_fetched_bytes",
        help: "Compressed bytes fetched from the registry.",
        read: Read::Counter(|l| l.fetched_bytes),
    },
    Field {
        name: "estargz_layer_fetch_requests",
        help: "Range requests sent to the registry.",
        read: Read::Counter(|l| l.fetch_requests),
    },
    Field {
        name: "estargz_layer_fetch_seconds",
        help: "Time fetches from the registry took, one per round trip (on-demand, prefetch \
               and background); estargz_fetch_seconds has the node's on-demand ones in \
               buckets.",
        read: Read::SumCount(|l| (seconds(l.fetch_nanos), l.fetches)),
    },
    Field {
        name: "estargz_layer_fetched_chunks",
        help: "Chunks fetched, verified and stored by the layer.",
        read: Read::Counter(|l| l.fetched_chunks),
    },
    Field {
        name: "estargz_layer_read_bytes",
        help: "File bytes read through the mount (with the kernel's read-ahead).",
        read: Read::Counter(|l| l.read_bytes),
    },
    Field {
        name: "estargz_layer_passthrough_opens",
        help: "Opens served in FUSE passthrough mode: the kernel reads the file's local \
               content itself, without this process.",
        read: Read::Counter(|l| l.passthrough_opens),
    },
    Field {
        name: "estargz_layer_streamed_chunks",
        help: "Chunks fetched for a reader and decoded as their bytes arrived (on a link \
               slow enough for that to save time).",
        read: Read::Counter(|l| l.streamed_chunks),
    },
    Field {
        name: "estargz_layer_dependency_files",
        help: "Interpreters and libraries of executables read from the layer that it \
               fetched before the loader asked for them (from it or the layers below).",
        read: Read::Counter(|l| l.dependency_files),
    },
    Field {
        name: "estargz_layer_read_errors",
        help: "Reads answered with EIO.",
        read: Read::Counter(|l| l.read_errors),
    },
    Field {
        name: "estargz_layer_cached_chunks",
        help: "Distinct chunks of the layer available locally (an estimate: local when \
               mounted plus fetched since, all once the background fetch is done).",
        read: Read::Gauge(|l| l.cached_chunks),
    },
    Field {
        name: "estargz_layer_chunks",
        help: "Distinct chunks of the layer.",
        read: Read::Gauge(|l| l.total_chunks),
    },
    Field {
        name: "estargz_layer_prefetch_done",
        help: "Whether prioritized files were prefetched.",
        read: Read::Gauge(|l| u64::from(l.prefetch_done)),
    },
    Field {
        name: "estargz_layer_background_done",
        help: "Whether the background fetch finished (every chunk was local).",
        read: Read::Gauge(|l| u64::from(l.background_done)),
    },
    Field {
        name: "estargz_layer_served_without_fuse",
        help: "Whether the layer, its files all local, is served without FUSE to new \
               containers (an EROFS image of its metadata over the cached files).",
        read: Read::Gauge(|l| u64::from(l.served_without_fuse)),
    },
];

/// Every field of [`CacheStatus`], each once.
const CACHE: &[Field<CacheStatus>] = &[
    Field {
        name: "estargz_cache_hits",
        help: "Chunk cache hits.",
        read: Read::Counter(|c| c.hits),
    },
    Field {
        name: "estargz_cache_misses",
        help: "Chunk cache misses.",
        read: Read::Counter(|c| c.misses),
    },
    Field {
        name: "estargz_cache_usage_bytes",
        help: "Bytes of chunks in the cache.",
        read: Read::Gauge(|c| c.usage_bytes),
    },
    Field {
        name: "estargz_cache_max_bytes",
        help: "The cache's size cap.",
        read: Read::Gauge(|c| c.max_bytes),
    },
    Field {
        name: "estargz_cache_memory_bytes",
        help: "Bytes of decompressed chunks kept in memory (all layers).",
        read: Read::Gauge(|c| c.memory_bytes),
    },
    Field {
        name: "estargz_cache_memory_hits",
        help: "Reads answered from the chunks kept in memory.",
        read: Read::Counter(|c| c.memory_hits),
    },
    Field {
        name: "estargz_cache_chunks",
        help: "Chunks in the cache.",
        read: Read::Gauge(|c| c.entries),
    },
    Field {
        name: "estargz_cache_evictions",
        help: "Chunks evicted to stay under the cap.",
        read: Read::Counter(|c| c.evictions),
    },
    Field {
        name: "estargz_cache_write_errors",
        help: "Chunks that could not be stored.",
        read: Read::Counter(|c| c.write_errors),
    },
    Field {
        name: "estargz_cache_corrupt",
        help: "Damaged chunk files found on reading (and removed).",
        read: Read::Counter(|c| c.corrupt),
    },
];

/// The node-wide histograms of [`Status`]: name, help, the field.
type NodeHistogram = (
    &'static str,
    &'static str,
    fn(&Status) -> Option<&HistogramStatus>,
);
const NODE: &[NodeHistogram] = &[
    (
        "estargz_fetch_seconds",
        "Time on-demand fetches (a reader waiting; one per round trip) took, all layers of the \
         node, failed ones included.",
        |s| s.fetch_seconds.as_ref(),
    ),
    (
        "estargz_read_seconds",
        "Time FUSE reads of files took, from the request reaching the FUSE manager to the \
         reply, all layers of the node.",
        |s| s.read_seconds.as_ref(),
    ),
];

/// Encodes `table` over `rows` (each with its labels): every family's descriptor, then its
/// samples.
fn encode_table<T, S: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    table: &[Field<T>],
    rows: &[(S, &T)],
) -> Result<(), std::fmt::Error> {
    for field in table {
        let mut m = e.encode_descriptor(field.name, field.help, None, field.metric_type())?;
        for (labels, row) in rows {
            field.encode(row, m.encode_family(labels)?)?;
        }
    }
    Ok(())
}

fn encode_gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Everything one scrape shows (the daemon's metrics share their values with [`Metrics`]).
#[derive(Debug)]
struct Scrape {
    remote_layers: Counter,
    resolve_seconds: Histogram,
    fallbacks: Family<ReasonLabel, Counter>,
    fallback_layers: Vec<(String, &'static str)>,
    status: Option<Status>,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.remote_layers;
        m.encode(e.encode_descriptor(
            "estargz_remote_layers",
            "Layers mounted lazily.",
            None,
            m.metric_type(),
        )?)?;
        let m = &self.resolve_seconds;
        m.encode(e.encode_descriptor(
            "estargz_resolve_seconds",
            "Time resolving a layer (fetching and checking its footer and TOC) that was then \
             mounted lazily.",
            None,
            m.metric_type(),
        )?)?;
        let m = &self.fallbacks;
        m.encode(e.encode_descriptor(
            "estargz_fallbacks",
            "Layers pulled the ordinary way, by reason.",
            None,
            m.metric_type(),
        )?)?;
        let mut m = e.encode_descriptor(
            "estargz_layer_fallback",
            "1 for each recent layer pulled the ordinary way, with the reason.",
            None,
            MetricType::Gauge,
        )?;
        for (layer, reason) in &self.fallback_layers {
            let labels = [("layer", layer.as_str()), ("reason", reason)];
            ConstGauge::new(1u64).encode(m.encode_family(&labels)?)?;
        }
        let up = "Whether the FUSE manager answers.";
        let Some(st) = &self.status else {
            return encode_gauge(&mut e, "estargz_fuse_manager_up", up, 0);
        };
        encode_gauge(&mut e, "estargz_fuse_manager_up", up, 1)?;
        encode_gauge(
            &mut e,
            "estargz_mounted_layers",
            "Layers mounted lazily now.",
            st.mounts.len() as u64,
        )?;
        let rows: Vec<([(&str, &str); 1], &LayerStatus)> = st
            .mounts
            .values()
            .map(|l| ([("layer", l.digest.as_str())], l))
            .collect();
        encode_table(&mut e, LAYER, &rows)?;
        encode_table::<_, [(&str, &str); 0]>(&mut e, CACHE, &[([], &st.cache)])?;
        for (name, help, field) in NODE {
            // Absent from older managers; not rendered if it does not add up.
            let Some(h) = field(st).filter(|h| h.is_valid()) else {
                continue;
            };
            let buckets: Vec<(f64, u64)> = h
                .bounds
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(h.counts.iter().copied())
                .collect();
            let count = h.counts.iter().sum();
            e.encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(seconds(h.sum_nanos), count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    use super::*;

    /// The fields of [`LayerStatus`] that are labels rather than values.
    const LAYER_LABELS: &[&str] = &["digest"];

    fn status() -> Status {
        let layer = |digest: &str, n: u64| LayerStatus {
            digest: digest.into(),
            fetched_bytes: 1000 * n,
            fetch_requests: 4 * n,
            fetches: 2 * n,
            fetched_chunks: 3 * n,
            fetch_nanos: 1_500_000_000 * n,
            read_errors: 0,
            read_bytes: 4096 * n,
            passthrough_opens: 5 * n,
            streamed_chunks: n,
            dependency_files: 6 * n,
            cached_chunks: 3 * n,
            total_chunks: 10,
            prefetch_done: true,
            background_done: n == 2,
            served_without_fuse: n == 2,
        };
        Status {
            pid: 1,
            mounts: BTreeMap::from([
                (PathBuf::from("/s/1/fs"), layer("sha256:aa", 1)),
                (PathBuf::from("/s/2/fs"), layer("sha256:b\"b\\", 2)),
            ]),
            cache: CacheStatus {
                hits: 5,
                misses: 6,
                entries: 7,
                max_bytes: 1 << 30,
                ..CacheStatus::default()
            },
            fetch_seconds: Some(HistogramStatus {
                bounds: vec![0.001, 0.01, 0.1],
                counts: vec![1, 2, 3, 4],
                sum_nanos: 2_500_000_000,
            }),
            read_seconds: Some(HistogramStatus {
                bounds: vec![0.0001, 0.001],
                counts: vec![9, 0, 1],
                sum_nanos: 30_000_000,
            }),
        }
    }

    fn metrics() -> Metrics {
        let m = Metrics::default();
        m.remote_layer();
        m.remote_layer();
        m.observe_resolve(Duration::from_millis(20));
        m.observe_resolve(Duration::from_secs(2));
        m.fallback("sha256:cc", Fallback::NotEstargz);
        m.fallback("sha256:dd", Fallback::NotEstargz);
        m
    }

    /// A sample line: its name, its labels as written, its value.
    fn sample(line: &str) -> (&str, &str, f64) {
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line:?}")),
        };
        match series.split_once('{') {
            Some((name, labels)) => {
                assert!(labels.ends_with('}'), "{line}");
                (name, &labels[..labels.len() - 1], value)
            }
            None => (series, "", value),
        }
    }

    /// Checks the exposition the way a scraper would: HELP and TYPE once per family and
    /// before its samples, every sample of a declared family (with a histogram's or a
    /// counter's suffixes), no series twice. Returns the samples.
    fn parse(text: &str, format: Format) -> Vec<(String, String, f64)> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps = BTreeSet::new();
        let mut series = BTreeSet::new();
        let mut samples = Vec::new();
        let mut lines: Vec<&str> = text.lines().collect();
        if format == Format::OpenMetrics {
            assert_eq!(lines.pop(), Some("# EOF"), "{text}");
        }
        for line in lines {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helps.insert(name.to_string()), "HELP twice for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helps.contains(name), "TYPE before HELP for {name}");
                let old = types.insert(name.to_string(), kind.to_string());
                assert!(old.is_none(), "TYPE twice for {name}");
            } else {
                assert!(!line.starts_with('#'), "{line}");
                let (name, labels, value) = sample(line);
                let family = types
                    .iter()
                    .filter(|(f, kind)| match kind.as_str() {
                        "histogram" => ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(f.as_str())),
                        // The Prometheus text format names the family with the suffix.
                        "counter" if format == Format::OpenMetrics => {
                            name.strip_suffix("_total") == Some(f.as_str())
                        }
                        _ => name == f.as_str(),
                    })
                    .count();
                assert_eq!(family, 1, "no declared family for {line}");
                assert!(series.insert(format!("{name}{{{labels}}}")), "{line} twice");
                samples.push((name.to_string(), labels.to_string(), value));
            }
        }
        // Each histogram series has its +Inf bucket, equal to its count.
        for (name, labels, count) in &samples {
            let Some(base) = name.strip_suffix("_count") else {
                continue;
            };
            let inf = samples.iter().any(|(n, l, v)| {
                let rest = l
                    .replace(",le=\"+Inf\"", "")
                    .replace("le=\"+Inf\",", "")
                    .replace("le=\"+Inf\"", "");
                *n == format!("{base}_bucket")
                    && l.contains("le=\"+Inf\"")
                    && rest == *labels
                    && v == count
            });
            assert!(inf, "no +Inf bucket for {name}{{{labels}}}");
        }
        samples
    }

    fn value(samples: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in {samples:?}"))
            .2
    }

    #[test]
    fn the_exposition_parses_in_both_formats_with_histograms() {
        let m = metrics();
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = m.render(Some(status()), format);
            let s = parse(&text, format);
            // Histograms: cumulative buckets ending with +Inf, then sum and count.
            let bucket = |name: &str, le: &str| value(&s, name, &format!("le=\"{le}\""));
            assert_eq!(bucket("estargz_fetch_seconds_bucket", "0.001"), 1.0);
            assert_eq!(bucket("estargz_fetch_seconds_bucket", "0.1"), 6.0);
            assert_eq!(bucket("estargz_fetch_seconds_bucket", "+Inf"), 10.0);
            assert_eq!(value(&s, "estargz_fetch_seconds_count", ""), 10.0);
            assert_eq!(value(&s, "estargz_fetch_seconds_sum", ""), 2.5);
            assert_eq!(bucket("estargz_read_seconds_bucket", "0.0001"), 9.0);
            assert_eq!(value(&s, "estargz_read_seconds_count", ""), 10.0);
            assert_eq!(bucket("estargz_resolve_seconds_bucket", "0.025"), 1.0);
            assert_eq!(bucket("estargz_resolve_seconds_bucket", "+Inf"), 2.0);
            assert_eq!(value(&s, "estargz_resolve_seconds_count", ""), 2.0);
            assert!((value(&s, "estargz_resolve_seconds_sum", "") - 2.02).abs() < 1e-9);
            // Per-layer values, with the layer label escaped.
            let aa = "layer=\"sha256:aa\"";
            let bb = r#"layer="sha256:b\"b\\""#;
            assert_eq!(value(&s, "estargz_layer_fetch_seconds_sum", aa), 1.5);
            assert_eq!(value(&s, "estargz_layer_fetch_seconds_count", bb), 4.0);
            assert_eq!(value(&s, "estargz_layer_background_done", aa), 0.0);
            assert_eq!(value(&s, "estargz_layer_background_done", bb), 1.0);
            assert_eq!(value(&s, "estargz_layer_fetched_chunks_total", bb), 6.0);
            assert_eq!(value(&s, "estargz_cache_chunks", ""), 7.0);
            assert_eq!(
                value(&s, "estargz_fallbacks_total", "reason=\"not_estargz\""),
                2.0
            );
            assert_eq!(value(&s, "estargz_remote_layers_total", ""), 2.0);
            assert_eq!(value(&s, "estargz_fuse_manager_up", ""), 1.0);
        }
    }

    /// The names that scripts, benchmarks and dashboards read keep their series.
    #[test]
    fn existing_metric_names_stay() {
        let text = metrics().render(Some(status()), Format::Prometheus);
        let names: BTreeSet<String> = parse(&text, Format::Prometheus)
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        for name in [
            "estargz_remote_layers_total",
            "estargz_resolve_seconds_sum",
            "estargz_resolve_seconds_count",
            "estargz_fallbacks_total",
            "estargz_layer_fallback",
            "estargz_fuse_manager_up",
            "estargz_mounted_layers",
            "estargz_layer_fetched_bytes_total",
            "estargz_layer_fetch_requests_total",
            "estargz_layer_fetch_seconds_sum",
            "estargz_layer_read_bytes_total",
            "estargz_layer_read_errors_total",
            "estargz_layer_cached_chunks",
            "estargz_layer_chunks",
            "estargz_layer_prefetch_done",
            "estargz_cache_hits_total",
            "estargz_cache_misses_total",
            "estargz_cache_usage_bytes",
            "estargz_cache_memory_bytes",
            "estargz_cache_chunks",
            "estargz_cache_evictions_total",
            "estargz_cache_write_errors_total",
        ] {
            assert!(names.contains(name), "{name} is gone: {names:?}");
        }
        // The Prometheus format's HELP and TYPE name counters as before, with `_total`.
        assert!(text.contains("# TYPE estargz_remote_layers_total counter\n"));
    }

    #[test]
    fn without_a_manager_only_the_daemon_counters_show() {
        let m = metrics();
        let text = m.render(None, Format::OpenMetrics);
        let s = parse(&text, Format::OpenMetrics);
        assert_eq!(value(&s, "estargz_fuse_manager_up", ""), 0.0);
        assert!(!text.contains("estargz_layer_chunks") && !text.contains("estargz_cache_"));
        // An older manager sends no histograms; one that sends a broken one is not believed.
        let mut st = status();
        st.fetch_seconds = None;
        st.read_seconds.as_mut().unwrap().counts.pop();
        let text = m.render(Some(st), Format::Prometheus);
        parse(&text, Format::Prometheus);
        for name in ["estargz_fetch_seconds", "estargz_read_seconds"] {
            assert!(!text.contains(&format!("\n{name}_")), "{name} in {text}");
        }
    }

    /// For each field of `T` but those in `skip`: `T`'s default with that field changed.
    fn with_each_field<T: serde::Serialize + serde::de::DeserializeOwned + Default>(
        skip: &[&str],
    ) -> Vec<(String, T)> {
        let serde_json::Value::Object(fields) = serde_json::to_value(T::default()).unwrap() else {
            panic!("not a struct");
        };
        fields
            .into_iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| {
                let other = match v {
                    serde_json::Value::Bool(b) => serde_json::Value::Bool(!b),
                    serde_json::Value::Number(_) => 7.into(),
                    v => panic!("field {k} holds {v}: a label? list it as one"),
                };
                let mut all = serde_json::to_value(T::default()).unwrap();
                all[&k] = other;
                (k, serde_json::from_value(all).unwrap())
            })
            .collect()
    }

    /// Which entries of `table` a record's values show in.
    fn readers<T: Default>(table: &[Field<T>], row: &T) -> Vec<&'static str> {
        let zero = T::default();
        table
            .iter()
            .filter(|f| f.values(row) != f.values(&zero))
            .map(|f| f.name)
            .collect()
    }

    /// Each field of the status records is exported by exactly one metric family: a field
    /// added to `LayerStatus` or `CacheStatus` fails here until it is given one.
    #[test]
    fn every_status_field_is_exported_once() {
        for (field, row) in with_each_field::<LayerStatus>(LAYER_LABELS) {
            let by = readers(LAYER, &row);
            assert_eq!(by.len(), 1, "LayerStatus::{field} is read by {by:?}");
        }
        for (field, row) in with_each_field::<CacheStatus>(&[]) {
            let by = readers(CACHE, &row);
            assert_eq!(by.len(), 1, "CacheStatus::{field} is read by {by:?}");
        }
        let names: Vec<&str> = LAYER
            .iter()
            .map(|f| f.name)
            .chain(CACHE.iter().map(|f| f.name))
            .collect();
        let distinct: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(names.len(), distinct.len(), "a name twice: {names:?}");
        for name in names {
            assert!(!name.ends_with("_total"), "{name} would get _total twice");
        }
    }

    /// Sends `requests` on one connection and reads until the server closes it.
    async fn exchange(addr: std::net::SocketAddr, requests: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(requests.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out))
            .await
            .expect("the server did not close the connection")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn the_endpoint_serves_get_metrics_with_keep_alive_and_refuses_the_rest() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(metrics()), || Some(status())));
        // Two requests on one connection: the first keeps it open.
        let both = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
        assert_eq!(both.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{both}");
        assert!(
            both.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{both}"
        );
        assert!(
            both.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{both}"
        );
        assert!(both.contains("\nestargz_layer_chunks{layer=\"sha256:aa\"} 10\n"));
        assert!(both.trim_end().ends_with("# EOF"), "{both}");
        let other = exchange(
            addr,
            "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(other.await.starts_with("HTTP/1.1 404 "));
        let post = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        // Garbage is answered (400) and the connection closed, not left hanging.
        assert!(exchange(addr, "\x01\x02 nonsense\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400 "));
        server.abort();
    }

    #[test]
    fn openmetrics_is_served_to_whoever_asks_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
                          text/plain;version=0.0.4;q=0.3,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
