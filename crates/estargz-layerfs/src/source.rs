//! Where a layer's compressed bytes come from.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

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

    /// Bytes `range` of the blob as a reader that yields them as they arrive, so that the
    /// caller can work on the first while the last are on their way (a registry); the
    /// reader fails if fewer or more bytes come. By default, [`BlobSource::read_range`]'s
    /// answer. A failure is not retried: retry with `read_range`.
    fn open_range(&self, range: Range<u64>) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read_range(range)?)))
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
            .unwrap_or_else(|_| Err(timed_out(&self.digest, span, self.deadline)))
    }
}

/// The error of a fetch of bytes `span` of blob `digest` that missed its `deadline`.
fn timed_out(digest: &estargz_oci::Digest, span: Range<u64>, deadline: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "{digest} bytes {span:?}: no complete answer from the registry within {deadline:?}"
        ),
    )
}

/// How long one fetch may take by default, retries included.
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_secs(30);

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

/// Pieces of a range body in flight between the runtime and a reading thread.
const PIECES_IN_FLIGHT: usize = 64;

/// A range body read on a blocking thread while a task on the runtime receives it
/// ([`RegistrySource::open_range`]). Dropping it ends the task.
struct StreamedRange {
    pieces: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
    task: tokio::task::AbortHandle,
}

impl io::Read for StreamedRange {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.pieces.blocking_recv() {
                Some(piece) => self.current = piece?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

impl Drop for StreamedRange {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BlobSource for RegistrySource {
    fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let fetch = self
            .client
            .fetch_range(&self.image, &self.digest, range.clone());
        self.within(range, async {
            fetch.await.map(|b| b.to_vec()).map_err(io::Error::other)
        })
    }

    fn open_range(&self, range: Range<u64>) -> io::Result<Box<dyn io::Read + Send>> {
        let (tx, rx) = tokio::sync::mpsc::channel(PIECES_IN_FLIGHT);
        let (client, image, digest) =
            (self.client.clone(), self.image.clone(), self.digest.clone());
        let (deadline, span) = (self.deadline, range.clone());
        let task = self.runtime.spawn(async move {
            let body = async {
                let mut body = client
                    .fetch_range_stream(&image, &digest, range)
                    .await
                    .map_err(io::Error::other)?;
                while let Some(piece) = body.next().await.map_err(io::Error::other)? {
                    if tx.send(Ok(piece)).await.is_err() {
                        break; // the reader is gone
                    }
                }
                Ok(())
            };
            let failed = match tokio::time::timeout(deadline, body).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => timed_out(&digest, span, deadline),
            };
            let _ = tx.send(Err(failed)).await;
        });
        Ok(Box::new(StreamedRange {
            pieces: rx,
            current: bytes::Bytes::new(),
            task: task.abort_handle(),
        }))
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

/// A [`BlobSource`] of known size seen as the format crate's [`estargz_format::ReadAt`], so
/// that a layer's TOC is located, decoded and checked by the format crate's one path.
struct SizedSource<'a> {
    source: &'a dyn BlobSource,
    size: u64,
}

impl estargz_format::ReadAt for SizedSource<'_> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.source.read_range(offset..offset + buf.len() as u64)?;
        if bytes.len() != buf.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}

/// Loads and validates a layer's TOC through `source` (two range reads: the footer, then
/// the TOC member). With `expected`, the TOC digest must match it.
pub fn load_toc(
    source: &dyn BlobSource,
    blob_size: u64,
    expected: Option<estargz_format::Sha256Digest>,
    limits: &estargz_format::Limits,
) -> Result<(estargz_format::Toc, estargz_format::Sha256Digest), estargz_format::Error> {
    let reader = estargz_format::EstargzReader::open(
        SizedSource {
            source,
            size: blob_size,
        },
        &estargz_format::OpenOptions {
            limits: *limits,
            expected_toc_digest: expected,
        },
    )?;
    let digest = reader.toc_digest();
    Ok((reader.into_toc(), digest))
}
