//! Micro benchmarks of a mounted layer's index: building it from a TOC (the CPU part of
//! mounting), and finding the chunk a read needs (path lookup and chunk search), for a
//! layer of 100,000 files and for a file of 4,096 chunks.
//!
//! cargo bench -p estargz-layerfs --bench lookup

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions};
use estargz_layerfs::{FetchOptions, FetchScheduler, FileSource, LayerFs};

/// A layer of `tar` converted with `chunk_size`, as a file source, its TOC and a cache.
struct Layer {
    _dir: tempfile::TempDir,
    toc: estargz_format::Toc,
    source: Arc<FileSource>,
    cache: Arc<ChunkCache>,
    scheduler: Arc<FetchScheduler>,
}

impl Layer {
    fn fs(&self) -> LayerFs {
        LayerFs::new(
            &self.toc,
            self.source.clone(),
            self.cache.clone(),
            self.scheduler.clone(),
        )
    }
}

fn layer(tar: &[u8], chunk_size: u64) -> Layer {
    let mut blob = Vec::new();
    let opts = ConvertOptions {
        compression_level: 1,
        chunk_size,
        ..Default::default()
    };
    convert(tar, &mut blob, &opts, &()).expect("converting the benchmark layer");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("layer.esgz");
    std::fs::write(&path, &blob).expect("writing the layer");
    let toc = EstargzReader::open(&blob[..], &OpenOptions::default())
        .expect("open")
        .toc()
        .clone();
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: dir.path().join("cache"),
        max_bytes: 1 << 30,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }));
    Layer {
        source: Arc::new(FileSource::open(&path).expect("source")),
        _dir: dir,
        toc,
        cache,
        scheduler: FetchScheduler::new(FetchOptions::default()),
    }
}

/// A small deterministic generator, so that every run looks up the same paths.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn many_files(c: &mut Criterion) {
    let l = layer(&estargz_testutil::many_files_tar(100_000), 4 << 20);
    let mut g = c.benchmark_group("layer_100k_files");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("index build (LayerFs::new)", |b| b.iter(|| l.fs()));
    let fs = l.fs();
    let paths: Vec<String> = (0..4096u64)
        .scan(0x9e37_79b9_7f4a_7c15u64, |s, _| Some(next(s) % 100_000))
        .map(|i| {
            format!(
                "usr/lib/python3/dist-packages/pkg{:03}/module_{:05}.py",
                i / 1000,
                i % 1000
            )
        })
        .collect();
    g.bench_function("chunk lookup (path + offset)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % paths.len();
            fs.chunk_at(&paths[i], 0).expect("chunk")
        })
    });
    g.finish();
}

fn many_chunks(c: &mut Criterion) {
    // 64 MiB in 16 KiB chunks: 4,096 chunks in one file.
    let content = estargz_testutil::noise(64 << 20, 7);
    let l = layer(
        &estargz_testutil::one_file_tar("usr/lib/big.so", &content),
        16 << 10,
    );
    let fs = l.fs();
    let offsets: Vec<u64> = (0..4096u64)
        .scan(0x2545_f491_4f6c_dd1du64, |s, _| Some(next(s) % (64 << 20)))
        .collect();
    let mut g = c.benchmark_group("file_4096_chunks");
    g.bench_function("chunk lookup (path + offset)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % offsets.len();
            fs.chunk_at("usr/lib/big.so", offsets[i]).expect("chunk")
        })
    });
    g.finish();
}

criterion_group!(benches, many_files, many_chunks);
criterion_main!(benches);
