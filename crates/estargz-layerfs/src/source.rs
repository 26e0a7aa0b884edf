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

/// A blob in a registry, read with HTTP range requests. FUSE threads are not async: reads
/// run on `runtime` and block the calling thread until done.
pub struct RegistrySource {
    client: std::sync::Arc<estargz_registry::RegistryClient>,
    image: estargz_registry::ImageRef,
    digest: estargz_oci::Digest,
    runtime: tokio::runtime::Handle,
}

impl RegistrySource {
    /// The blob `digest` of the repository `image` names.
    pub fn new(
        client: std::sync::Arc<estargz_registry::RegistryClient>,
        image: estargz_registry::ImageRef,
        digest: estargz_oci::Digest,
        runtime: tokio::runtime::Handle,
    ) -> RegistrySource {
        RegistrySource {
            client,
            image,
            digest,
            runtime,
        }
    }
}

impl BlobSource for RegistrySource {
    fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        self.runtime
            .block_on(self.client.fetch_range(&self.image, &self.digest, range))
            .map(|b| b.to_vec())
            .map_err(io::Error::other)
    }
}

/// Fetches a layer's TOC JSON through `source` (two range reads: the footer, then the TOC
/// member), decoded within `limits`. Returns the JSON and the TOC's offset in the blob; the
/// JSON is neither verified nor parsed.
pub fn fetch_toc_json(
    source: &dyn BlobSource,
    blob_size: u64,
    limits: &estargz_format::Limits,
) -> Result<(Vec<u8>, u64), estargz_format::Error> {
    use estargz_format::{decode_toc_member, parse_footer, Error, FOOTER_SIZE};
    let tail_len = blob_size.min(FOOTER_SIZE as u64);
    let tail = source
        .read_range(blob_size - tail_len..blob_size)
        .map_err(|e| Error::io("fetching the footer", e))?;
    let footer = parse_footer(&tail, blob_size)?;
    let end = blob_size - footer.kind.size() as u64;
    if end - footer.toc_offset > limits.max_toc_size.saturating_add(1 << 20) {
        return Err(Error::TocTooLarge {
            size: end - footer.toc_offset,
            limit: limits.max_toc_size,
        });
    }
    let member = source
        .read_range(footer.toc_offset..end)
        .map_err(|e| Error::io("fetching the TOC", e))?;
    let json = decode_toc_member(&member, footer.toc_offset, limits)?;
    Ok((json, footer.toc_offset))
}

/// Loads and validates a layer's TOC through `source` (see [`fetch_toc_json`]). With
/// `expected`, the TOC digest must match it.
pub fn load_toc(
    source: &dyn BlobSource,
    blob_size: u64,
    expected: Option<estargz_format::Sha256Digest>,
    limits: &estargz_format::Limits,
) -> Result<(estargz_format::Toc, estargz_format::Sha256Digest), estargz_format::Error> {
    use estargz_format::{Error, Toc};
    let (json, toc_offset) = fetch_toc_json(source, blob_size, limits)?;
    let digest = estargz_format::Sha256Digest::of(&json);
    if let Some(exp) = expected {
        if exp != digest {
            return Err(Error::TocDigestMismatch {
                expected: exp.to_string(),
                actual: digest.to_string(),
            });
        }
    }
    Ok((Toc::parse(&json, toc_offset, limits)?, digest))
}
