//! Errors of the format crate.
//!
//! Every variant names what was wrong and where, so that a CLI or the daemon can show it to a
//! person unchanged. Hostile input never panics: it ends in one of these.

use std::io;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, verifying or writing an eStargz blob.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the underlying blob, spool file or output.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The blob is too small to hold a footer.
    #[error("blob is {size} bytes, too small for an eStargz footer (at least 47 bytes): not an eStargz blob")]
    BlobTooSmall {
        /// Size of the blob.
        size: u64,
    },
    /// Neither the 51-byte nor the legacy 47-byte footer was found.
    #[error(
        "no eStargz footer at the end of the blob ({detail}): not an eStargz blob, or truncated"
    )]
    BadFooter {
        /// Why the footer was rejected.
        detail: String,
    },
    /// The footer points outside the blob.
    #[error("footer points the TOC at offset {toc_offset}, outside the blob's {limit} bytes before the footer")]
    TocOffsetOutOfRange {
        /// TOC offset from the footer.
        toc_offset: u64,
        /// First byte of the footer.
        limit: u64,
    },
    /// The gzip member holding the TOC could not be decoded.
    #[error("cannot decode the TOC gzip member at offset {toc_offset}: {detail}")]
    BadTocMember {
        /// TOC offset from the footer.
        toc_offset: u64,
        /// What went wrong.
        detail: String,
    },
    /// The TOC (or its tar entry) exceeds the configured bound.
    #[error("TOC is larger than the configured limit of {limit} bytes (declared or decoded: {size} bytes); raise max_toc_size if the layer is trusted")]
    TocTooLarge {
        /// Size found.
        size: u64,
        /// Configured limit.
        limit: u64,
    },
    /// The TOC holds more entries than the configured bound.
    #[error("TOC has more than {limit} entries (files, directories and chunks); raise max_entries if the layer is trusted")]
    TooManyEntries {
        /// Configured limit.
        limit: usize,
    },
    /// Paths imply more directories than their names could hold.
    #[error("TOC entry {name:?} and those before it imply more parent directories than the TOC's names could hold: a hostile TOC")]
    ImpliedDirectories {
        /// The entry whose parents exhausted the bound (first 300 characters).
        name: String,
    },
    /// The TOC JSON does not parse.
    #[error("TOC JSON is invalid: {0}")]
    TocJson(#[source] serde_json::Error),
    /// The TOC has an unsupported version.
    #[error("TOC version {0} is not supported (expected 1)")]
    TocVersion(i64),
    /// The TOC digest differs from the one expected (for example from the manifest annotation).
    #[error("TOC digest mismatch: expected {expected}, blob has {actual}; the layer does not match its manifest and will not be used")]
    TocDigestMismatch {
        /// Expected digest.
        expected: String,
        /// Digest computed over the TOC JSON.
        actual: String,
    },
    /// A digest string could not be parsed.
    #[error("invalid digest {value:?}: {detail}")]
    BadDigest {
        /// The string given.
        value: String,
        /// Why it was rejected.
        detail: String,
    },
    /// A TOC entry is malformed.
    #[error("TOC entry #{index} ({name:?}): {detail}")]
    BadEntry {
        /// Position in the TOC's entry list.
        index: usize,
        /// Name as written in the TOC.
        name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A path escapes the layer root.
    #[error("entry {name:?} escapes the layer root ({detail})")]
    PathTraversal {
        /// Name as written.
        name: String,
        /// How it escapes.
        detail: String,
    },
    /// A path goes through a parent that is not a directory (for example a symlink).
    #[error("entry {name:?} has a parent {parent:?} that is a {parent_kind}, not a directory")]
    ParentNotDirectory {
        /// Name as written.
        name: String,
        /// The offending parent.
        parent: String,
        /// Kind of that parent.
        parent_kind: &'static str,
    },
    /// The same name appears twice with conflicting content.
    #[error("entry {name:?} appears twice (as {first} and then as {second}); only repeated directories are allowed")]
    DuplicateEntry {
        /// Normalized name.
        name: String,
        /// Kind of the first entry.
        first: &'static str,
        /// Kind of the second entry.
        second: &'static str,
    },
    /// A hardlink names a target that does not exist or is not linkable.
    #[error("hardlink {name:?} -> {target:?}: {detail}")]
    BadHardlink {
        /// Hardlink name.
        name: String,
        /// Target name.
        target: String,
        /// What is wrong.
        detail: String,
    },
    /// A chunk's uncompressed bytes do not match its digest.
    #[error("chunk of {name:?} at file offset {chunk_offset} (blob offset {offset}) has digest {actual}, TOC says {expected}: refusing to serve unverified bytes")]
    ChunkDigestMismatch {
        /// File name.
        name: String,
        /// Offset of the chunk in the file.
        chunk_offset: u64,
        /// Compressed offset of the member.
        offset: u64,
        /// Digest from the TOC.
        expected: String,
        /// Digest of what was decoded.
        actual: String,
    },
    /// A whole-file digest does not match.
    #[error("file {name:?} has digest {actual}, TOC says {expected}")]
    FileDigestMismatch {
        /// File name.
        name: String,
        /// Digest from the TOC.
        expected: String,
        /// Digest of the content.
        actual: String,
    },
    /// A chunk's gzip member could not be decoded into the expected bytes.
    #[error("chunk of {name:?} at file offset {chunk_offset} (blob offset {offset}): {detail}")]
    BadChunk {
        /// File name.
        name: String,
        /// Offset of the chunk in the file.
        chunk_offset: u64,
        /// Compressed offset of the member.
        offset: u64,
        /// What went wrong.
        detail: String,
    },
    /// The entry asked for is not a regular file.
    #[error("{name:?} is not a regular file")]
    NotAFile {
        /// Name.
        name: String,
    },
    /// The converter's input is not a tar stream it can read.
    #[error("input tar: {detail}")]
    BadInputTar {
        /// What went wrong (includes the entry name when known).
        detail: String,
    },
    /// A writer option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
