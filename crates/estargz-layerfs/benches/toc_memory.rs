//! Memory per TOC entry of a mounted layer, for a layer of 100,000 files (a counting
//! allocator measures the heap): the validated TOC while mounting, and what stays for as long
//! as the layer is mounted (the inode table and the file system's own state).
//!
//! cargo bench -p estargz-layerfs --bench toc_memory

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions};
use estargz_layerfs::{FetchOptions, FetchScheduler, FileSource, LayerFs};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    // A realistic shape: 100 directories of 1,000 small files with typical path lengths.
    let tar = estargz_testutil::many_files_tar(100_000);
    let mut blob = Vec::new();
    convert(
        &tar[..],
        &mut blob,
        &ConvertOptions {
            compression_level: 1,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.esgz");
    std::fs::write(&path, &blob).unwrap();
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let json_size = reader.toc_json_size();

    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: dir.path().join("cache"),
        max_bytes: 1 << 30,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }));
    let scheduler = FetchScheduler::new(FetchOptions::default());
    let base = LIVE.load(Ordering::SeqCst);
    let toc = reader.toc().clone();
    let entries = toc.len();
    let toc_bytes = LIVE.load(Ordering::SeqCst) - base;
    let fs = LayerFs::new(
        &toc,
        Arc::new(FileSource::open(&path).unwrap()),
        cache,
        scheduler,
    );
    let peak = LIVE.load(Ordering::SeqCst) - base;
    // A mounted layer keeps the inode table only; the TOC is dropped once it is built.
    drop(toc);
    let kept = LIVE.load(Ordering::SeqCst) - base;
    let per = |b: isize| b / entries as isize;
    println!("| entries | TOC JSON bytes | validated TOC bytes/entry (transient) | mounted layer bytes/entry | mounted MB |");
    println!("|---|---|---|---|---|");
    println!(
        "| {entries} | {json_size} | {} | {} | {:.1} |",
        per(toc_bytes),
        per(kept),
        kept as f64 / 1e6
    );
    println!(
        "(peak while building: {} bytes/entry; inode table alone: {} bytes/entry)",
        per(peak),
        fs.index_bytes() / entries
    );
    drop(fs);
}
