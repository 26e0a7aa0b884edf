//! Read, verify and write eStargz blobs.
//!
//! An eStargz blob is an ordinary tar.gz made of many gzip members, ending with a table of
//! contents (`stargz.index.json`) and a footer that points at it. The TOC lists every file
//! with the compressed offsets and digests of its chunks, so a reader with random access to
//! the compressed bytes can read any byte range of any file, verified, without the rest.
//!
//! - [`footer`]: the 51-byte (and legacy 47-byte) footer.
//! - [`toc`]: the TOC's JSON form and the validated file tree ([`Toc`], [`TocEntry`]).
//! - [`reader`]: [`EstargzReader`] over anything with random access ([`ReadAt`]).
//! - [`writer`]: converting a tar or tar.gz stream into an eStargz blob ([`convert`]).
//! - [`elf`]: what an ELF object loads, as the writer records it in the TOC.
//!
//! This crate does no network I/O and is not async: callers bring the bytes.

#![warn(missing_docs)]

pub mod digest;
pub mod elf;
pub mod error;
pub mod footer;
pub mod reader;
pub mod toc;
pub mod writer;

pub use digest::Sha256Digest;
pub use error::{Error, Result};
pub use footer::{footer_bytes, parse_footer, Footer, FooterKind, FOOTER_SIZE, LEGACY_FOOTER_SIZE};
pub use reader::{
    decode_toc_member, decompress_chunk, decompress_chunk_from, read_toc_json, toc_json_from_tail,
    EstargzReader, OpenOptions, ReadAt, VerifyReport,
};
pub use toc::{
    normalize_name, Chunk, EntryKind, JsonEntry, JsonToc, Limits, Toc, TocEntry, MAX_PATH_LEN,
    NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};
pub use writer::{
    convert, ConvertOptions, ConvertOutput, Progress, ARCHIVE_CHUNK_SIZE, ARCHIVE_MAGIC,
    DEFAULT_LEVEL, MAX_LEVEL, STARTUP_CHUNK_SIZE,
};
