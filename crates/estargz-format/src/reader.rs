//! Reading eStargz blobs: footer, TOC, and verified file content from any byte range.
//!
//! Everything here works from random access to the compressed blob ([`ReadAt`]), so the same
//! code serves a local file, a byte buffer, or (in the layer filesystem) ranges fetched from a
//! registry. The pure functions ([`decode_toc_member`], [`decompress_chunk`]) are the pieces a
//! caller with its own fetching uses.

use std::io::{self, Read};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use sha2::{Digest as _, Sha256};

use crate::digest::Sha256Digest;
use crate::error::{Error, Result};
use crate::footer::{parse_footer, Footer, FOOTER_SIZE};
use crate::toc::{Chunk, EntryKind, Limits, Toc, TOC_TAR_NAME};

/// Random read access to a compressed blob.
pub trait ReadAt {
    /// Total size of the blob.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails if the blob ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        self.as_slice().size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the blob",
    )
}

/// Decodes the gzip member that holds the TOC's tar entry and returns the TOC JSON bytes.
///
/// `member` is the compressed range `[toc_offset, blob_size - footer_size)`. Decoding stops
/// after `limits.max_toc_size` bytes, so a gzip bomb cannot exhaust memory.
pub fn decode_toc_member(member: &[u8], toc_offset: u64, limits: &Limits) -> Result<Vec<u8>> {
    let bad = |detail: String| Error::BadTocMember { toc_offset, detail };
    // The tar header (and any extension headers) come before the JSON: allow for them.
    let cap = limits.max_toc_size.saturating_add(64 * 1024);
    let decoder = MultiGzDecoder::new(member).take(cap);
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar stream: {e}")))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| bad("the member holds no tar entry".into()))?
        .map_err(|e| bad(format!("bad tar header: {e}")))?;
    let path = entry.path_bytes().into_owned();
    if path != TOC_TAR_NAME.as_bytes() {
        return Err(bad(format!(
            "first tar entry is {:?}, expected {TOC_TAR_NAME}",
            String::from_utf8_lossy(&path)
        )));
    }
    let size = entry.size();
    if size > limits.max_toc_size {
        return Err(Error::TocTooLarge {
            size,
            limit: limits.max_toc_size,
        });
    }
    let mut json = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("reading the TOC: {e}")))?;
    if json.len() as u64 != size {
        return Err(bad(format!(
            "TOC entry declares {size} bytes but only {} decode",
            json.len()
        )));
    }
    Ok(json)
}

/// Decompresses one chunk from its compressed range and verifies it against its digest.
///
/// `compressed` must start at `chunk.offset`; it may extend up to `chunk.compressed_end`.
/// Only `inner_offset + size` bytes are decoded, so a bomb cannot run away. The returned
/// bytes are verified: nothing unverified ever leaves this function.
pub fn decompress_chunk(compressed: &[u8], name: &str, chunk: &Chunk) -> Result<Vec<u8>> {
    let whole = if chunk.inner_offset == 0 {
        decode_whole_member(compressed, chunk.size as usize)
    } else {
        None
    };
    let (out, actual) = match whole {
        Some(out) => {
            let actual = Sha256Digest::of(&out);
            (out, actual)
        }
        None => decode_streaming(compressed, chunk).map_err(|f| f.into_error(name, chunk))?,
    };
    checked(out, actual, name, chunk)
}

/// [`decompress_chunk`] from a reader of the compressed range (which must start at
/// `chunk.offset`), decoding as the reader yields bytes: for a range still arriving over
/// the network, so that when its last byte arrives the chunk is decoded. Reads no more
/// than the chunk needs; the caller drains the rest if it wants to.
///
/// A failure of `compressed` itself (a broken connection, a deadline) is an
/// [`Error::Io`] with the reader's error, kind included; bad data is a
/// [`Error::BadChunk`] or [`Error::ChunkDigestMismatch`].
pub fn decompress_chunk_from(compressed: impl Read, name: &str, chunk: &Chunk) -> Result<Vec<u8>> {
    let (out, actual) =
        decode_streaming(compressed, chunk).map_err(|f| f.into_error(name, chunk))?;
    checked(out, actual, name, chunk)
}

/// Why [`decode_streaming`] failed.
enum Failure {
    /// The compressed bytes are not a chunk of that size.
    Corrupt(String),
    /// Reading them failed.
    Source(io::Error),
}

impl Failure {
    /// The error of decoding chunk `chunk` of file `name`: bad data is a
    /// [`Error::BadChunk`], a failing reader an [`Error::Io`] (a slice never fails).
    fn into_error(self, name: &str, chunk: &Chunk) -> Error {
        match self {
            Failure::Source(e) => Error::io("reading a chunk's compressed bytes", e),
            Failure::Corrupt(detail) => Error::BadChunk {
                name: name.to_string(),
                chunk_offset: chunk.chunk_offset,
                offset: chunk.offset,
                detail,
            },
        }
    }
}

impl From<io::Error> for Failure {
    /// The decoder's own errors say the data is bad (flate2 reports them as invalid
    /// input or data, and a member cut short as an unexpected end); any other error came
    /// from the reader under it.
    fn from(e: io::Error) -> Failure {
        use io::ErrorKind::{InvalidData, InvalidInput, UnexpectedEof};
        match e.kind() {
            InvalidData | InvalidInput | UnexpectedEof => {
                Failure::Corrupt(format!("corrupt gzip data: {e}"))
            }
            _ => Failure::Source(e),
        }
    }
}

/// `out`, if its digest `actual` is the chunk's.
fn checked(out: Vec<u8>, actual: Sha256Digest, name: &str, chunk: &Chunk) -> Result<Vec<u8>> {
    if actual != chunk.digest {
        return Err(Error::ChunkDigestMismatch {
            name: name.to_string(),
            chunk_offset: chunk.chunk_offset,
            offset: chunk.offset,
            expected: chunk.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(out)
}

/// Room after a chunk in its gzip member: the tar padding and the next entry's headers.
const MEMBER_SLACK: usize = 64 << 10;

/// Decodes a member that starts with the chunk in one call, into a buffer of bounded size
/// (libdeflate: 1.7x the speed of streaming through flate2 on real chunks, see
/// `benches/format.rs`). `None` when the member holds more than the chunk and its tar
/// trailer, or is corrupt: the streaming decoder then decides, and names the problem.
fn decode_whole_member(compressed: &[u8], size: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; size.checked_add(MEMBER_SLACK)?];
    let n = libdeflater::Decompressor::new()
        .gzip_decompress(compressed, &mut out)
        .ok()?;
    if n < size {
        return None;
    }
    out.truncate(size);
    Some(out)
}

/// Decodes the chunk's bytes from its member, skipping `inner_offset` bytes first, and
/// decoding no more than the chunk; hashes them as they are decoded (from a reader that
/// waits for the network, the hash is then done when the last byte is).
fn decode_streaming(
    compressed: impl Read,
    chunk: &Chunk,
) -> std::result::Result<(Vec<u8>, Sha256Digest), Failure> {
    let mut decoder = MultiGzDecoder::new(compressed);
    if chunk.inner_offset > 0 {
        let skipped = io::copy(
            &mut (&mut decoder).take(chunk.inner_offset),
            &mut io::sink(),
        )?;
        if skipped != chunk.inner_offset {
            return Err(Failure::Corrupt(format!(
                "member ends after {skipped} bytes, before the chunk's inner offset {}",
                chunk.inner_offset
            )));
        }
    }
    let mut out = vec![0u8; chunk.size as usize];
    let mut hash = Sha256::new();
    let mut filled = 0;
    while filled < out.len() {
        match decoder.read(&mut out[filled..]) {
            Ok(0) => {
                return Err(Failure::Corrupt(format!(
                    "member ends after {filled} of the chunk's {} bytes",
                    chunk.size
                )))
            }
            Ok(n) => {
                hash.update(&out[filled..filled + n]);
                filled += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((out, Sha256Digest::from(hash)))
}

/// How to open a blob.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Bounds for untrusted input.
    pub limits: Limits,
    /// When set, the TOC digest must equal this (e.g. the manifest's
    /// `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub expected_toc_digest: Option<Sha256Digest>,
}

/// An opened eStargz blob: footer and validated TOC, and verified reads of any file.
#[derive(Debug)]
pub struct EstargzReader<R> {
    blob: R,
    blob_size: u64,
    footer: Footer,
    toc: Toc,
    toc_digest: Sha256Digest,
    toc_json_size: u64,
}

/// What [`EstargzReader::verify`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Regular files whose content was checked.
    pub files: u64,
    /// Chunks decoded and checked against their digests.
    pub chunks: u64,
    /// Uncompressed bytes checked.
    pub bytes: u64,
}

/// The TOC JSON and the footer from `tail`, the last bytes of a blob of `blob_size` bytes
/// (at least its footer), fetching with `fetch` only the part of the TOC member that lies
/// before `tail` (nothing, when the tail holds the whole member: one round trip for a
/// layer's TOC over a network). Decoded within `limits`; neither verified nor parsed.
///
/// This is the one place a TOC is located and decoded: [`read_toc_json`] and
/// [`EstargzReader::open`] use it over [`ReadAt`], and the snapshotter with the tail its
/// first range request returned.
pub fn toc_json_from_tail(
    tail: &[u8],
    blob_size: u64,
    fetch: impl FnOnce(std::ops::Range<u64>) -> io::Result<Vec<u8>>,
    limits: &Limits,
) -> Result<(Vec<u8>, Footer)> {
    let tail = &tail[tail
        .len()
        .saturating_sub(usize::try_from(blob_size).unwrap_or(usize::MAX))..];
    let footer = parse_footer(&tail[tail.len().saturating_sub(FOOTER_SIZE)..], blob_size)?;
    let end = blob_size - footer.kind.size() as u64;
    // A gzip member compresses at most ~1032:1; anything beyond that bound for the TOC is
    // refused before allocating.
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
        let mut member = fetch(footer.toc_offset..tail_start)
            .map_err(|e| Error::io("reading the TOC member", e))?;
        if member.len() as u64 != tail_start - footer.toc_offset {
            return Err(Error::io(
                "reading the TOC member",
                io::Error::from(io::ErrorKind::UnexpectedEof),
            ));
        }
        member.extend_from_slice(in_tail(tail_start));
        decode_toc_member(&member, footer.toc_offset, limits)?
    };
    Ok((json, footer))
}

/// Reads a blob's TOC JSON and footer through `blob` (two reads: the footer, then the TOC
/// member), decoded within `limits`; neither verified nor parsed. Returns the blob's size too.
pub fn read_toc_json<R: ReadAt + ?Sized>(
    blob: &R,
    limits: &Limits,
) -> Result<(Vec<u8>, Footer, u64)> {
    let blob_size = blob
        .size()
        .map_err(|e| Error::io("reading the blob size", e))?;
    let tail_len = blob_size.min(FOOTER_SIZE as u64);
    let mut tail = vec![0u8; tail_len as usize];
    blob.read_exact_at(&mut tail, blob_size - tail_len)
        .map_err(|e| Error::io("reading the footer", e))?;
    let (json, footer) = toc_json_from_tail(
        &tail,
        blob_size,
        |r| {
            let mut member = vec![0u8; (r.end - r.start) as usize];
            blob.read_exact_at(&mut member, r.start).map(|_| member)
        },
        limits,
    )?;
    Ok((json, footer, blob_size))
}

impl<R: ReadAt> EstargzReader<R> {
    /// Reads the footer and TOC, checks the TOC digest when one is expected, validates it.
    pub fn open(blob: R, opts: &OpenOptions) -> Result<Self> {
        let (json, footer, blob_size) = read_toc_json(&blob, &opts.limits)?;
        let toc_digest = Sha256Digest::of(&json);
        if let Some(expected) = opts.expected_toc_digest {
            if expected != toc_digest {
                return Err(Error::TocDigestMismatch {
                    expected: expected.to_string(),
                    actual: toc_digest.to_string(),
                });
            }
        }
        let toc = Toc::parse(&json, footer.toc_offset, &opts.limits)?;
        Ok(EstargzReader {
            blob,
            blob_size,
            footer,
            toc,
            toc_digest,
            toc_json_size: json.len() as u64,
        })
    }

    /// The validated TOC, without the blob (for callers that read chunks their own way).
    pub fn into_toc(self) -> Toc {
        self.toc
    }

    /// The validated TOC.
    pub fn toc(&self) -> &Toc {
        &self.toc
    }

    /// sha256 of the TOC JSON.
    pub fn toc_digest(&self) -> Sha256Digest {
        self.toc_digest
    }

    /// Size of the TOC JSON in bytes.
    pub fn toc_json_size(&self) -> u64 {
        self.toc_json_size
    }

    /// The parsed footer.
    pub fn footer(&self) -> Footer {
        self.footer
    }

    /// Size of the compressed blob.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// The underlying blob.
    pub fn blob(&self) -> &R {
        &self.blob
    }

    fn file(&self, index: usize) -> Result<usize> {
        let i = self.toc.resolve(index);
        let e = self.toc.entry(i);
        if e.kind != EntryKind::Reg {
            return Err(Error::NotAFile {
                name: self.toc.entry(index).name.clone(),
            });
        }
        Ok(i)
    }

    /// Reads and verifies chunk `chunk` of the regular file (or hardlink) at `index`.
    pub fn read_chunk(&self, index: usize, chunk: usize) -> Result<Vec<u8>> {
        let i = self.file(index)?;
        let e = self.toc.entry(i);
        let c = e.chunks.get(chunk).ok_or_else(|| Error::BadChunk {
            name: e.name.clone(),
            chunk_offset: 0,
            offset: 0,
            detail: format!("the file has no chunk #{chunk}"),
        })?;
        let mut compressed = vec![0u8; (c.compressed_end - c.offset) as usize];
        self.blob
            .read_exact_at(&mut compressed, c.offset)
            .map_err(|err| Error::io(format!("reading chunk of {:?}", e.name), err))?;
        decompress_chunk(&compressed, &e.name, c)
    }

    /// Reads up to `buf.len()` bytes of the file at `index` from `offset`; returns the number
    /// of bytes read (0 at or past the end). Every byte returned was verified.
    pub fn read_at(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let i = self.file(index)?;
        let e = self.toc.entry(i);
        if offset >= e.size || buf.is_empty() {
            return Ok(0);
        }
        let end = e.size.min(offset.saturating_add(buf.len() as u64));
        let mut pos = offset;
        let mut ci = e
            .chunks
            .partition_point(|c| c.chunk_offset + c.size <= offset);
        while pos < end {
            let c = &e.chunks[ci];
            let data = self.read_chunk(i, ci)?;
            let from = (pos - c.chunk_offset) as usize;
            let to = ((end - c.chunk_offset) as usize).min(data.len());
            let dst = (pos - offset) as usize;
            buf[dst..dst + (to - from)].copy_from_slice(&data[from..to]);
            pos += (to - from) as u64;
            ci += 1;
        }
        Ok((end - offset) as usize)
    }

    /// Reads a whole file, checking every chunk and the whole-file digest when present.
    pub fn read_file(&self, index: usize) -> Result<Vec<u8>> {
        let i = self.file(index)?;
        let e = self.toc.entry(i);
        let mut out = Vec::with_capacity(e.size.min(1 << 30) as usize);
        let mut hasher = Sha256::new();
        for ci in 0..e.chunks.len() {
            let data = self.read_chunk(i, ci)?;
            hasher.update(&data);
            out.extend_from_slice(&data);
        }
        check_file_digest(e.digest, hasher, &e.name)?;
        Ok(out)
    }

    /// Checks every chunk of every file (and whole-file digests). `progress` is called with the
    /// uncompressed bytes checked so far.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for (i, e) in self.toc.entries().iter().enumerate() {
            if e.kind != EntryKind::Reg {
                continue;
            }
            let mut hasher = Sha256::new();
            for ci in 0..e.chunks.len() {
                let data = self.read_chunk(i, ci)?;
                hasher.update(&data);
                report.chunks += 1;
                report.bytes += data.len() as u64;
                progress(report.bytes);
            }
            check_file_digest(e.digest, hasher, &e.name)?;
            report.files += 1;
        }
        Ok(report)
    }
}

fn check_file_digest(expected: Option<Sha256Digest>, hasher: Sha256, name: &str) -> Result<()> {
    if let Some(expected) = expected {
        let actual = Sha256Digest::from(hasher);
        if actual != expected {
            return Err(Error::FileDigestMismatch {
                name: name.to_string(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(())
}
