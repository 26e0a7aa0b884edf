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

    /// Reads several ranges, at once where the source can (a registry: one request each,
    /// all in flight together, so they cost one round trip).
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Vec<u8>>> {
        ranges.iter().map(|r| self.read_range(r.clone())).collect()
    }
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
    deadline: std::time::Duration,
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
            deadline: DEFAULT_READ_DEADLINE,
        }
    }

    /// Fails each fetch (with `TimedOut`, an EIO for the reader) that has not completed
    /// within `deadline`, retries included: a registry that trickles bytes must not hold a
    /// FUSE read, and the thread serving it, for minutes.
    pub fn with_deadline(mut self, deadline: std::time::Duration) -> RegistrySource {
        self.deadline = deadline;
        self
    }

    /// Runs `fetch` (of the bytes `span`) on the runtime, failing it at the deadline.
    fn within<T>(
        &self,
        span: Range<u64>,
        fetch: impl std::future::Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        self.runtime
            .block_on(async { tokio::time::timeout(self.deadline, fetch).await })
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} bytes {span:?}: no complete answer from the registry within {:?}",
                        self.digest, self.deadline
                    ),
                ))
            })
    }
}

/// How long one fetch may take by default, retries included.
pub const DEFAULT_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl RegistrySource {
    /// Starts fetching `range` on the runtime.
    fn start(&self, range: Range<u64>) -> RangeFetch {
        let (client, image, digest) =
            (self.client.clone(), self.image.clone(), self.digest.clone());
        self.runtime
            .spawn(async move { client.fetch_range(&image, &digest, range).await })
    }
}

type RangeFetch = tokio::task::JoinHandle<estargz_registry::Result<bytes::Bytes>>;

impl BlobSource for RegistrySource {
    fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let fetch = self
            .client
            .fetch_range(&self.image, &self.digest, range.clone());
        self.within(range, async {
            fetch.await.map(|b| b.to_vec()).map_err(io::Error::other)
        })
    }

    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Vec<u8>>> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let fetches: Vec<RangeFetch> = ranges.iter().map(|r| self.start(r.clone())).collect();
        let aborts: Vec<_> = fetches.iter().map(|f| f.abort_handle()).collect();
        let all = async {
            let mut out = Vec::with_capacity(fetches.len());
            for f in fetches {
                let bytes = f.await.map_err(io::Error::other)?;
                out.push(bytes.map_err(io::Error::other)?.to_vec());
            }
            Ok(out)
        };
        let result = self.within(ranges[0].start..ranges[ranges.len() - 1].end, all);
        // Fetches nobody waits for any more must not go on using the link.
        aborts.iter().for_each(|a| a.abort());
        result
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
    let tail_len = blob_size.min(estargz_format::FOOTER_SIZE as u64);
    let tail = source
        .read_range(blob_size - tail_len..blob_size)
        .map_err(|e| estargz_format::Error::io("fetching the footer", e))?;
    toc_json_from_tail(&tail, blob_size, |r| source.read_range(r), limits)
}

/// The TOC JSON and the TOC's offset from `tail`, the last bytes of a blob of `blob_size`
/// bytes (at least its footer), fetching with `fetch` only the part of the TOC member that
/// lies before `tail` (nothing, when the tail holds the whole member: one round trip for a
/// layer's TOC). Decoded within `limits`; neither verified nor parsed.
pub fn toc_json_from_tail(
    tail: &[u8],
    blob_size: u64,
    fetch: impl FnOnce(Range<u64>) -> io::Result<Vec<u8>>,
    limits: &estargz_format::Limits,
) -> Result<(Vec<u8>, u64), estargz_format::Error> {
    use estargz_format::{decode_toc_member, parse_footer, Error, FOOTER_SIZE};
    let tail = &tail[tail.len().saturating_sub(blob_size as usize)..];
    let footer = parse_footer(&tail[tail.len().saturating_sub(FOOTER_SIZE)..], blob_size)?;
    let end = blob_size - footer.kind.size() as u64;
    if end - footer.toc_offset > limits.max_toc_size.saturating_add(1 << 20) {
        return Err(Error::TocTooLarge {
            size: end - footer.toc_offset,
            limit: limits.max_toc_size,
        });
    }
    let tail_start = blob_size - tail.len() as u64;
    let in_tail = |from: u64| &tail[(from - tail_start) as usize..(end - tail_start) as usize];
    let json = if footer.toc_offset >= tail_start {
        decode_toc_member(in_tail(footer.toc_offset), footer.toc_offset, limits)?
    } else {
        let mut member =
            fetch(footer.toc_offset..tail_start).map_err(|e| Error::io("fetching the TOC", e))?;
        member.extend_from_slice(in_tail(tail_start));
        decode_toc_member(&member, footer.toc_offset, limits)?
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_from_any_tail_matches_the_two_request_fetch() {
        let mut blob = Vec::new();
        let tar = estargz_testutil::synthetic_tar();
        estargz_format::convert(&tar[..], &mut blob, &Default::default(), &()).unwrap();
        let limits = estargz_format::Limits::default();
        let size = blob.len() as u64;
        let source = BufSource(blob.clone());
        let want = fetch_toc_json(&source, size, &limits).unwrap();
        for tail_len in [51, 1000, 40_000, blob.len()] {
            let tail = &blob[blob.len() - tail_len..];
            let mut asked = None;
            let got = toc_json_from_tail(
                tail,
                size,
                |r| {
                    asked = Some(r.clone());
                    source.read_range(r)
                },
                &limits,
            )
            .unwrap();
            assert_eq!(got, want, "tail of {tail_len}");
            // Only what the tail lacks is fetched.
            let tail_start = size - tail_len as u64;
            match asked {
                Some(r) => assert_eq!((r.start, r.end), (want.1, tail_start)),
                None => assert!(want.1 >= tail_start),
            }
        }
        // A tail without a footer is refused.
        let err = toc_json_from_tail(&blob[..100], size, |r| source.read_range(r), &limits);
        assert!(err.is_err());
    }

    struct BufSource(Vec<u8>);

    impl BlobSource for BufSource {
        fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
            Ok(self.0[range.start as usize..range.end as usize].to_vec())
        }
    }
}
