//! Micro benchmarks of the format: TOC parsing, and chunk decompression with the gzip
//! decoders we considered (libdeflate, which reads whole chunks; zlib-rs through flate2,
//! which streams the rest and compresses; miniz_oxide, flate2's default backend) on chunks
//! of a real Debian root filesystem.
//!
//! cargo bench -p estargz-format --bench format
//!
//! Needs the real rootfs (`testdata/scripts/rootfs.sh`, Debian packages from apt).

use std::io::Read;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use estargz_format::{
    convert, decode_toc_member, decompress_chunk, parse_footer, Chunk, ConvertOptions,
    EstargzReader, Limits, OpenOptions, Sha256Digest, Toc, FOOTER_SIZE,
};

/// The real root filesystem tar, built once per run.
fn rootfs() -> &'static [u8] {
    static TAR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TAR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        estargz_testutil::real_rootfs_tar(dir.path())
    })
}

/// An eStargz blob of `tar` at our default settings (gzip level 9, 4 MiB chunks).
fn estargz(tar: &[u8], level: u32) -> Vec<u8> {
    let mut blob = Vec::new();
    let opts = ConvertOptions {
        compression_level: level,
        ..Default::default()
    };
    convert(tar, &mut blob, &opts, &()).expect("converting the benchmark layer");
    blob
}

/// The TOC JSON of `blob` and its offset.
fn toc_json(blob: &[u8]) -> (Vec<u8>, u64) {
    let footer =
        parse_footer(&blob[blob.len() - FOOTER_SIZE..], blob.len() as u64).expect("footer");
    let member = &blob[footer.toc_offset as usize..blob.len() - footer.kind.size()];
    let json = decode_toc_member(member, footer.toc_offset, &Limits::default()).expect("TOC");
    (json, footer.toc_offset)
}

fn toc_parsing(c: &mut Criterion) {
    let layers = [
        ("debian-python-2602", rootfs().to_vec()),
        ("synthetic-100k", estargz_testutil::many_files_tar(100_000)),
    ];
    let mut g = c.benchmark_group("toc_parse");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (name, tar) in &layers {
        let (json, toc_offset) = toc_json(&estargz(tar, 1));
        g.throughput(Throughput::Bytes(json.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| Toc::parse(&json, toc_offset, &Limits::default()).expect("parse"))
        });
    }
    g.finish();
}

/// Full-size chunks of a real root filesystem (binaries, libraries, Python sources): the
/// `count` largest, with their compressed bytes.
fn real_chunks(count: usize) -> Vec<(Chunk, Vec<u8>)> {
    let blob = estargz(rootfs(), 9);
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).expect("open");
    let mut chunks: Vec<Chunk> = reader
        .toc()
        .entries()
        .iter()
        .flat_map(|e| e.chunks.iter().copied())
        .filter(|c| c.inner_offset == 0)
        .collect();
    chunks.sort_by_key(|c| std::cmp::Reverse(c.size));
    chunks
        .into_iter()
        .take(count)
        .map(|c| {
            (
                c,
                blob[c.offset as usize..c.compressed_end as usize].to_vec(),
            )
        })
        .collect()
}

/// The raw deflate stream of a gzip member (RFC 1952 header skipped), for decoders that
/// take no gzip framing.
fn deflate_payload(member: &[u8]) -> &[u8] {
    let flags = member[3];
    let mut at = 10;
    if flags & 4 != 0 {
        at += 2 + u16::from_le_bytes([member[at], member[at + 1]]) as usize;
    }
    for bit in [8u8, 16] {
        if flags & bit != 0 {
            at += member[at..].iter().position(|&b| b == 0).expect("NUL") + 1;
        }
    }
    if flags & 2 != 0 {
        at += 2;
    }
    &member[at..]
}

/// A chunk's gzip member also holds the tar padding after it and the next entry's header:
/// room for those, for the decoders that decode the whole member into a buffer.
const SLACK: usize = 64 << 10;

fn decompression(c: &mut Criterion) {
    let chunks = real_chunks(4);
    let total: u64 = chunks.iter().map(|(c, _)| c.size).sum();
    let mut g = c.benchmark_group("chunk_decompress");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(total));
    g.bench_function("flate2-zlib-rs", |b| {
        b.iter(|| {
            for (c, bytes) in &chunks {
                let mut out = Vec::with_capacity(c.size as usize + SLACK);
                flate2::read::GzDecoder::new(&bytes[..])
                    .read_to_end(&mut out)
                    .expect("gunzip");
                assert!(out.len() as u64 >= c.size);
            }
        })
    });
    g.bench_function("libdeflater", |b| {
        let mut d = libdeflater::Decompressor::new();
        b.iter(|| {
            for (c, bytes) in &chunks {
                let mut out = vec![0u8; c.size as usize + SLACK];
                let n = d.gzip_decompress(bytes, &mut out).expect("gunzip");
                assert!(n as u64 >= c.size);
            }
        })
    });
    g.bench_function("miniz_oxide", |b| {
        b.iter(|| {
            for (c, bytes) in &chunks {
                let out = miniz_oxide::inflate::decompress_to_vec(deflate_payload(bytes))
                    .expect("inflate");
                assert!(out.len() as u64 >= c.size);
            }
        })
    });
    // What a read pays: decompression plus the sha256 check against the TOC.
    g.bench_function("decompress_chunk (ours: libdeflate + sha256)", |b| {
        b.iter(|| {
            for (c, bytes) in &chunks {
                decompress_chunk(bytes, "", c).expect("chunk");
            }
        })
    });
    g.bench_function("sha256 only", |b| {
        let plain: Vec<Vec<u8>> = chunks
            .iter()
            .map(|(c, bytes)| decompress_chunk(bytes, "", c).expect("chunk"))
            .collect();
        b.iter(|| {
            for p in &plain {
                Sha256Digest::of(p);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, toc_parsing, decompression);
criterion_main!(benches);
