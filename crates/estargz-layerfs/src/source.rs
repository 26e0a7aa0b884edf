//! Where a layer's compressed bytes come from.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Random access to a layer blob's compressed bytes. Implementations may be slow (a
/// registry): reads are only issued for chunks missing from the cache.
pub trait BlobSource: Send + Sync {
    /// Reads bytes `range` of the blob; the result has exactly that many bytes.
    fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>>;
}

/// A blob in a local file (for `estargz mount` of a local blob, and for tests).
pub struct FileSource(std::fs::File);

impl FileSource {
    /// Opens the blob at `path`.
    pub fn open(path: &Path) -> io::Result<FileSource> {
        Ok(FileSource(std::fs::File::open(path)?))
    }
}

impl BlobSource for FileSource {
    fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.0.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }
}
