//! The layer index answers the lookups a read makes: path to file, offset to chunk.

use std::sync::Arc;

use estargz_cache::{CacheConfig, ChunkCache};
use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions};
use estargz_layerfs::{FetchOptions, FetchScheduler, FileSource, LayerFs};

#[test]
fn chunk_at_finds_the_chunk_holding_an_offset() {
    let content = estargz_testutil::noise(300_000, 3);
    let tar = estargz_testutil::one_file_tar("usr/lib/big.so", &content);
    let mut blob = Vec::new();
    let opts = ConvertOptions {
        chunk_size: 64 << 10,
        compression_level: 1,
        ..Default::default()
    };
    convert(&tar[..], &mut blob, &opts, &()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.esgz");
    std::fs::write(&path, &blob).unwrap();
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let cache = Arc::new(ChunkCache::open(&CacheConfig {
        root: dir.path().join("cache"),
        max_bytes: 1 << 30,
        memory_bytes: CacheConfig::DEFAULT_MEMORY_BYTES,
    }));
    let fs = LayerFs::new(
        reader.toc(),
        Arc::new(FileSource::open(&path).unwrap()),
        cache,
        FetchScheduler::new(FetchOptions::default()),
    );
    let c = fs.chunk_at("usr/lib/big.so", 0).unwrap();
    assert_eq!((c.chunk_offset, c.size), (0, 65536));
    let c = fs.chunk_at("/usr/lib/big.so", 70_000).unwrap();
    assert_eq!(c.chunk_offset, 65536);
    let last = fs.chunk_at("usr/lib/big.so", 299_999).unwrap();
    assert_eq!(last.chunk_offset + last.size, 300_000);
    // The chunk's bytes are the file's bytes at that offset.
    let data = estargz_format::decompress_chunk(
        &blob[c.offset as usize..c.compressed_end as usize],
        "big.so",
        &c,
    )
    .unwrap();
    assert_eq!(data, &content[65536..131072]);
    assert!(fs.chunk_at("usr/lib/big.so", 300_000).is_none());
    assert!(fs.chunk_at("usr/lib/missing.so", 0).is_none());
    assert!(fs.chunk_at("usr/lib", 0).is_none());
}
