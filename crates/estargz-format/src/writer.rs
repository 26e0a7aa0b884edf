//! Converting a tar or tar.gz stream into an eStargz blob.
//!
//! The input is spooled (uncompressed) to a temporary file while its entries are indexed and
//! their digests computed. The output is then planned as a list of gzip members whose
//! boundaries depend only on the entries and the chunk size: one member starts at the blob's
//! beginning and at every chunk of every non-empty regular file, and the tar headers that
//! follow a chunk ride in that chunk's member. Members are compressed independently, in
//! parallel, and written in order, so the output is byte-identical whatever the number of
//! threads. The original tar headers are copied verbatim, so every entry (PAX records, long
//! names, xattrs) extracts exactly as before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

use flate2::read::MultiGzDecoder;
use sha2::{Digest as _, Sha256};

use crate::digest::Sha256Digest;
use crate::error::{Error, Result};
use crate::footer::footer_bytes;
use crate::toc::{
    format_mtime, normalize_name, EntryKind, JsonEntry, JsonToc, Limits, Toc, LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};

const BLOCK: u64 = 512;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Largest chunk of a file's content in one gzip member (default 4 MiB).
    pub chunk_size: u64,
    /// Compression level, 0 (none) to 12 (smallest); default 10. Members are compressed
    /// with libdeflate, whose levels 10-12 go beyond zlib's 9.
    pub compression_level: u32,
    /// Paths to move to the front of the layer, before `.prefetch.landmark`, in this order.
    pub prioritized_files: Vec<String>,
    /// The byte ranges a recorded start read of some files (by path; `estargz optimize`'s
    /// record): each such regular file is cut in [`STARTUP_CHUNK_SIZE`] chunks, and those
    /// holding a byte of its ranges are marked `readAtStart` in the TOC, for a lazy mount to
    /// prefetch them first; unless that leaves less than [`STARTUP_MIN_SAVING`] bytes
    /// unmarked (a file read whole), which is cut as usual. Files not named are cut as
    /// usual.
    pub startup_ranges: HashMap<String, Vec<Range<u64>>>,
    /// Compression threads; 0 means one per available core. Does not change the output.
    pub threads: usize,
    /// Directory for the temporary spool file (default: the system temp directory).
    pub spool_dir: Option<PathBuf>,
    /// Record in each ELF object's TOC entry what it loads (`elfNeeds`, see [`crate::elf`]);
    /// default true. False writes only the fields the reference's converter writes.
    pub elf_needs: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: 4 << 20,
            compression_level: DEFAULT_LEVEL,
            prioritized_files: Vec::new(),
            startup_ranges: HashMap::new(),
            threads: 0,
            spool_dir: None,
            elf_needs: true,
        }
    }
}

/// Receives progress of a conversion. Both counters are running totals.
pub trait Progress {
    /// Bytes of the (possibly compressed) input consumed so far.
    fn input(&self, _bytes: u64) {}
    /// Bytes of eStargz output written so far.
    fn output(&self, _bytes: u64) {}
}

impl Progress for () {}

/// What a conversion produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOutput {
    /// sha256 of the blob (the layer digest in a manifest).
    pub blob_digest: Sha256Digest,
    /// Size of the blob.
    pub blob_size: u64,
    /// sha256 of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: Sha256Digest,
    /// sha256 of the uncompressed tar (the layer's DiffID in the image config).
    pub diff_id: Sha256Digest,
    /// Size of the uncompressed tar (`io.containers.estargz.uncompressed-size`).
    pub uncompressed_size: u64,
    /// Offset of the TOC's gzip member.
    pub toc_offset: u64,
    /// Tar entries in the output (landmark included, TOC excluded).
    pub entries: usize,
    /// Chunks over all files.
    pub chunks: usize,
    /// Entries placed before `.prefetch.landmark`.
    pub prioritized: usize,
    /// Prioritized paths that the layer does not contain.
    pub missing_prioritized: Vec<String>,
}

/// One input entry, indexed in the spool file.
struct InEntry {
    /// Start of this entry's headers (extension headers included).
    seg_start: u64,
    data_start: u64,
    data_len: u64,
    /// End of the padded data.
    seg_end: u64,
    norm: String,
    kind: EntryKind,
    /// The TOC entry, without offsets and chunk fields.
    json: JsonEntry,
    chunk_digests: Vec<Sha256Digest>,
    /// The size of this file's chunks ([`ConvertOptions::chunk_size`], or
    /// [`ARCHIVE_CHUNK_SIZE`] for an `ar` archive, or [`STARTUP_CHUNK_SIZE`] for a file with
    /// startup ranges).
    chunk_size: u64,
    /// Whether each chunk holds a byte of the file's startup ranges (empty: no ranges).
    read_at_start: Vec<bool>,
    /// Normalized hardlink target.
    link_norm: Option<String>,
}

/// An entry of the output, in output order.
#[derive(Clone, Copy)]
enum OutItem {
    Input(usize),
    Landmark(&'static str),
}

enum Part {
    Spool { start: u64, len: u64 },
    Bytes(Vec<u8>),
}

#[derive(Default)]
struct Member {
    parts: Vec<Part>,
    len: u64,
}

impl Member {
    fn push(&mut self, part: Part) {
        let n = match &part {
            Part::Spool { len, .. } => *len,
            Part::Bytes(b) => b.len() as u64,
        };
        if n > 0 {
            self.len += n;
            self.parts.push(part);
        }
    }
}

/// Converts a tar (or gzip-compressed tar) stream into an eStargz blob written to `output`.
pub fn convert<R: Read, W: Write>(
    input: R,
    output: W,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertOutput> {
    let limits = Limits::default();
    if opts.chunk_size < 4096 || opts.chunk_size > limits.max_chunk_size {
        return Err(Error::InvalidOption(format!(
            "chunk size {} is outside 4096..={} bytes",
            opts.chunk_size, limits.max_chunk_size
        )));
    }
    if opts.compression_level > MAX_LEVEL {
        return Err(Error::InvalidOption(format!(
            "compression level {} is outside 0..={MAX_LEVEL}",
            opts.compression_level
        )));
    }
    let spool = match &opts.spool_dir {
        Some(dir) => tempfile::tempfile_in(dir),
        None => tempfile::tempfile(),
    }
    .map_err(|e| Error::io("creating the spool file", e))?;

    let mut startup: HashMap<String, &[Range<u64>]> = HashMap::new();
    for (path, ranges) in &opts.startup_ranges {
        let norm = normalize_name(path.trim_start_matches('/')).map_err(|d| {
            Error::InvalidOption(format!("startup ranges of {path:?}: not a layer path: {d}"))
        })?;
        startup.insert(norm, ranges);
    }
    let mut entries = spool_and_index(input, &spool, opts.chunk_size, &startup, progress)?;
    profile_hardlink_targets(&mut entries, &spool, &startup, opts.chunk_size)?;
    if opts.elf_needs {
        record_elf_needs(&mut entries, &spool);
    }
    let (order, prioritized, missing) = plan_order(&entries, &opts.prioritized_files);

    // Validate the tree with the reader's rules before spending time compressing: the writer
    // must never produce a TOC the reader refuses.
    let draft = build_toc(&entries, &order, opts.chunk_size, |_| 0);
    Toc::from_json(&draft, u64::MAX, &limits)?;

    let (members, chunk_members) = plan_members(&entries, &order);
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };

    let mut out = CountingWriter::new(output);
    let mut diff = Sha256::new();
    let mut member_offsets = Vec::with_capacity(members.len());
    compress_members(
        &members,
        &spool,
        opts.compression_level,
        threads,
        |compressed, raw| {
            member_offsets.push(out.count);
            diff.update(raw);
            out.write_all(compressed)
                .map_err(|e| Error::io("writing the eStargz blob", e))?;
            progress.output(out.count);
            Ok(())
        },
    )?;

    let toc = build_toc(&entries, &order, opts.chunk_size, |(item, chunk)| {
        member_offsets[chunk_members[&(item, chunk)]]
    });
    let mut json = Vec::new();
    {
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut json, fmt);
        serde::Serialize::serialize(&toc, &mut ser)
            .map_err(|e| Error::io("serializing the TOC", io::Error::other(e)))?;
    }
    let toc_digest = Sha256Digest::of(&json);
    let mut toc_raw = tar_header(TOC_TAR_NAME, json.len() as u64);
    toc_raw.extend_from_slice(&json);
    toc_raw.resize(round_up(toc_raw.len() as u64) as usize, 0);
    toc_raw.extend_from_slice(&[0u8; 1024]);
    let toc_offset = out.count;
    let toc_member = Gzip::new(opts.compression_level)?.compress(&toc_raw)?;
    diff.update(&toc_raw);
    out.write_all(&toc_member)
        .and_then(|_| out.write_all(&footer_bytes(toc_offset)))
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("writing the eStargz blob", e))?;
    progress.output(out.count);

    let uncompressed_size = members.iter().map(|m| m.len).sum::<u64>() + toc_raw.len() as u64;
    Ok(ConvertOutput {
        blob_digest: Sha256Digest::from(out.hasher),
        blob_size: out.count,
        toc_digest,
        diff_id: Sha256Digest::from(diff),
        uncompressed_size,
        toc_offset,
        entries: order.len(),
        chunks: chunk_members.len(),
        prioritized,
        missing_prioritized: missing,
    })
}

fn landmark_entry_json(name: &str) -> JsonEntry {
    JsonEntry {
        name: name.to_string(),
        kind: "reg".into(),
        size: 1,
        mod_time: format_mtime(0, 0),
        mode: 0o644,
        digest: Sha256Digest::of(&[LANDMARK_CONTENTS]).to_string(),
        ..Default::default()
    }
}

/// Builds the TOC for the planned order; `offset_of((item, chunk))` gives a chunk's member
/// offset.
fn build_toc(
    entries: &[InEntry],
    order: &[OutItem],
    chunk_size: u64,
    offset_of: impl Fn((usize, usize)) -> u64,
) -> JsonToc {
    let mut out = Vec::with_capacity(order.len() + 8);
    let mut last_user: HashMap<u32, String> = HashMap::new();
    let mut last_group: HashMap<u32, String> = HashMap::new();
    for (item, o) in order.iter().enumerate() {
        let (mut head, digests, chunk_size, read_at_start) = match *o {
            OutItem::Input(i) => (
                entries[i].json.clone(),
                entries[i].chunk_digests.clone(),
                entries[i].chunk_size,
                entries[i].read_at_start.as_slice(),
            ),
            OutItem::Landmark(name) => (
                landmark_entry_json(name),
                vec![Sha256Digest::of(&[LANDMARK_CONTENTS])],
                chunk_size,
                &[][..],
            ),
        };
        // Names are written once per id, as the reference does; readers carry them forward.
        if last_user.get(&head.uid) == Some(&head.user_name) {
            head.user_name.clear();
        } else {
            last_user.insert(head.uid, head.user_name.clone());
        }
        if last_group.get(&head.gid) == Some(&head.group_name) {
            head.group_name.clear();
        } else {
            last_group.insert(head.gid, head.group_name.clone());
        }
        let size = head.size;
        let name = head.name.clone();
        for (ci, digest) in digests.iter().enumerate() {
            let chunk_offset = ci as u64 * chunk_size;
            let len = chunk_size.min(size - chunk_offset);
            let mut e = if ci == 0 {
                std::mem::take(&mut head)
            } else {
                JsonEntry {
                    name: name.clone(),
                    kind: "chunk".into(),
                    ..Default::default()
                }
            };
            e.offset = offset_of((item, ci));
            e.chunk_offset = chunk_offset;
            e.chunk_size = if len == chunk_size { len } else { 0 };
            e.chunk_digest = digest.to_string();
            e.read_at_start = read_at_start.get(ci).copied().unwrap_or(false);
            out.push(e);
        }
        if digests.is_empty() {
            out.push(head);
        }
    }
    JsonToc {
        version: 1,
        entries: out,
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    // Names here are short constants; set_path cannot fail for them.
    let _ = h.set_path(name);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// Reads the input into the spool file and indexes its entries.
fn spool_and_index<R: Read>(
    input: R,
    spool: &File,
    chunk_size: u64,
    startup: &HashMap<String, &[Range<u64>]>,
    progress: &dyn Progress,
) -> Result<Vec<InEntry>> {
    let counted = CountingReader {
        inner: input,
        count: 0,
        progress,
    };
    let mut buffered = BufReader::with_capacity(1 << 20, counted);
    let head = buffered
        .fill_buf()
        .map_err(|e| Error::io("reading the input", e))?;
    let decoded: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(Error::BadInputTar {
            detail: "the input is zstd-compressed; only tar and tar.gz layers are supported".into(),
        });
    } else {
        Box::new(buffered)
    };
    let mut tee = Tee {
        inner: decoded,
        out: BufWriter::with_capacity(1 << 20, spool),
    };
    let mut index = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut tee);
        let iter = archive.entries().map_err(|e| bad_tar(None, e))?;
        let mut seg_start = 0u64;
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut link_targets: HashSet<String> = HashSet::new();
        let mut dropped: HashSet<usize> = HashSet::new();
        for entry in iter {
            let mut entry = entry.map_err(|e| bad_tar(None, e))?;
            let et = entry.header().entry_type();
            if et.is_pax_global_extensions() {
                // Global headers belong to what follows; keep them in the next segment.
                io::copy(&mut entry, &mut io::sink()).map_err(|e| bad_tar(None, e))?;
                continue;
            }
            let raw_name = String::from_utf8(entry.path_bytes().into_owned()).map_err(|e| {
                Error::BadInputTar {
                    detail: format!(
                        "entry name {:?} is not UTF-8, which a TOC cannot represent",
                        String::from_utf8_lossy(e.as_bytes())
                    ),
                }
            })?;
            let mut e = index_entry(&mut entry, raw_name, seg_start, chunk_size, startup)?;
            seg_start = e.seg_end;
            if skip_generated(&e.norm) {
                continue;
            }
            if let Some(&prev) = by_name.get(&e.norm) {
                let prev_e: &InEntry = &index[prev];
                match (prev_e.kind, e.kind) {
                    (EntryKind::Dir, EntryKind::Dir) => {}
                    (a, b) if a != EntryKind::Dir && b != EntryKind::Dir => {
                        if link_targets.contains(&e.norm) {
                            return Err(Error::BadInputTar {
                                detail: format!(
                                    "{:?} is replaced by a later entry after a hardlink was made to it; \
                                     such a layer cannot be represented faithfully",
                                    e.norm
                                ),
                            });
                        }
                        // Tar semantics: the later entry wins. Drop the earlier one.
                        dropped.insert(prev);
                    }
                    (a, b) => {
                        return Err(Error::DuplicateEntry {
                            name: e.norm.clone(),
                            first: a.as_str(),
                            second: b.as_str(),
                        })
                    }
                }
            }
            if let Some(t) = &e.link_norm {
                link_targets.insert(t.clone());
            }
            by_name.insert(e.norm.clone(), index.len());
            if e.kind == EntryKind::Reg && e.json.size == 0 {
                e.chunk_digests.clear();
            }
            index.push(e);
        }
        if !dropped.is_empty() {
            let mut i = 0;
            index.retain(|_| {
                i += 1;
                !dropped.contains(&(i - 1))
            });
        }
    }
    let Tee { mut out, .. } = tee;
    out.flush()
        .map_err(|e| Error::io("writing the spool file", e))?;
    drop(out);
    // A tar that ends without padding or end-of-archive blocks is still read; pad the spool
    // so every segment is whole.
    if let Some(last) = index.last() {
        let len = spool
            .metadata()
            .map_err(|e| Error::io("reading the spool file size", e))?
            .len();
        if len < last.seg_end {
            spool
                .set_len(last.seg_end)
                .map_err(|e| Error::io("padding the spool file", e))?;
        }
    }
    Ok(index)
}

/// The chunks of a file of `len` bytes cut in `chunk`s that hold a byte of `ranges`, or
/// none (the file keeps its usual chunks) when the unread ones would come to less than
/// [`STARTUP_MIN_SAVING`]: a file a start reads whole (a Python module's source) gains
/// nothing from being cut; it keeps one chunk, which a lazy layer serves as a local file.
fn startup_marks(ranges: &[Range<u64>], len: u64, chunk: u64) -> Vec<bool> {
    let marks = touched_chunks(ranges, len, chunk);
    let unread = marks.iter().filter(|&&m| !m).count() as u64;
    if unread * chunk >= STARTUP_MIN_SAVING {
        marks
    } else {
        Vec::new()
    }
}

/// Startup ranges recorded under a hard link's name belong to the file it links to: a lazy
/// layer serves both names as one file, and a recorder sees the name the workload opened
/// (`python3` for `python3.11`, say). The file holding the content, indexed before its
/// links, is cut and marked again from its spooled content with the ranges of all its
/// names; if all of them together read it nearly whole, it goes back to the chunks of a
/// file without ranges, unmarked, even when its own name's ranges alone had marked it.
fn profile_hardlink_targets(
    entries: &mut [InEntry],
    spool: &File,
    startup: &HashMap<String, &[Range<u64>]>,
    chunk_size: u64,
) -> Result<()> {
    let mut by_target: HashMap<String, Vec<Range<u64>>> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == EntryKind::Hardlink) {
        if let (Some(target), Some(ranges)) = (&e.link_norm, startup.get(e.norm.as_str())) {
            by_target
                .entry(target.clone())
                .or_default()
                .extend(ranges.iter().cloned());
        }
    }
    if by_target.is_empty() {
        return Ok(());
    }
    let startup_chunk = chunk_size.min(STARTUP_CHUNK_SIZE);
    for e in entries.iter_mut().filter(|e| e.kind == EntryKind::Reg) {
        let Some(linked) = by_target.get(e.norm.as_str()) else {
            continue;
        };
        let mut ranges = linked.clone();
        ranges.extend(
            startup
                .get(e.norm.as_str())
                .into_iter()
                .flat_map(|r| r.iter().cloned()),
        );
        let marks = startup_marks(&ranges, e.data_len, startup_chunk);
        if marks == e.read_at_start {
            continue;
        }
        let chunk = if marks.is_empty() {
            unprofiled_chunk_size(chunk_size, e.json.ar_archive)
        } else {
            startup_chunk
        };
        if chunk != e.chunk_size {
            e.chunk_digests = chunk_digests_in(spool, e.data_start, e.data_len, chunk)
                .map_err(|err| Error::io("reading the spool file", err))?;
            e.chunk_size = chunk;
        }
        e.read_at_start = marks;
    }
    Ok(())
}

/// The chunk size of a regular file without startup ranges: an `ar` archive (a static
/// library, read member by member) is cut finer than other files.
fn unprofiled_chunk_size(chunk_size: u64, ar_archive: bool) -> u64 {
    if ar_archive {
        chunk_size.min(ARCHIVE_CHUNK_SIZE)
    } else {
        chunk_size
    }
}

/// The digests of the `chunk`-sized pieces of the `len` bytes at `start` of `spool`.
fn chunk_digests_in(
    spool: &File,
    start: u64,
    len: u64,
    chunk: u64,
) -> io::Result<Vec<Sha256Digest>> {
    let mut digests = Vec::with_capacity(len.div_ceil(chunk) as usize);
    let mut buf = vec![0u8; chunk as usize];
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at) as usize;
        spool.read_exact_at(&mut buf[..n], start + at)?;
        digests.push(Sha256Digest::of(&buf[..n]));
        at += n as u64;
    }
    Ok(digests)
}

/// Sets `elfNeeds` on each regular file that is an ELF executable or shared object
/// naming an interpreter or libraries, read from its spooled content. A file that cannot
/// be parsed is only left without it: the hint is for fetching ahead, not for reading.
fn record_elf_needs(entries: &mut [InEntry], spool: &File) {
    for e in entries
        .iter_mut()
        .filter(|e| e.kind == EntryKind::Reg && e.data_len >= 64)
    {
        let (start, len) = (e.data_start, e.data_len);
        let mut read = |offset: u64, want: usize| -> io::Result<Vec<u8>> {
            let n = (want as u64).min(len.saturating_sub(offset));
            let mut buf = vec![0; n as usize];
            spool.read_exact_at(&mut buf, start.saturating_add(offset))?;
            Ok(buf)
        };
        if let Ok(Some(needs)) = crate::elf::needs(&mut read, &mut |_| {}) {
            e.json.elf_needs = needs.bounded();
        }
    }
}

fn skip_generated(norm: &str) -> bool {
    norm == TOC_TAR_NAME || norm == PREFETCH_LANDMARK || norm == NO_PREFETCH_LANDMARK
}

fn bad_tar(name: Option<&str>, e: io::Error) -> Error {
    Error::BadInputTar {
        detail: match name {
            Some(n) => format!("entry {n:?}: {e}"),
            None => e.to_string(),
        },
    }
}

fn index_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    raw_name: String,
    seg_start: u64,
    chunk_size: u64,
    startup: &HashMap<String, &[Range<u64>]>,
) -> Result<InEntry> {
    let name = raw_name.as_str();
    let et = entry.header().entry_type();
    let data_start = entry.raw_file_position();
    let data_len = entry.size();
    let kind = match et {
        tar::EntryType::Regular | tar::EntryType::Continuous
            if name.ends_with('/') && data_len == 0 =>
        {
            EntryKind::Dir
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::Reg,
        tar::EntryType::Link => EntryKind::Hardlink,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Char => EntryKind::Char,
        tar::EntryType::Block => EntryKind::Block,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Fifo => EntryKind::Fifo,
        other => {
            let code = et.as_byte() as char;
            return Err(Error::BadInputTar {
                detail: format!(
                    "entry {name:?} has tar type {code:?} ({other:?}), unused in layers"
                ),
            });
        }
    };
    let norm = normalize_name(name).map_err(|d| Error::PathTraversal {
        name: name.to_string(),
        detail: d.to_string(),
    })?;
    let header = entry.header().clone();
    let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if let Some(exts) = entry.pax_extensions().map_err(|e| bad_tar(Some(name), e))? {
        for ext in exts {
            let ext = ext.map_err(|e| bad_tar(Some(name), e))?;
            if let Ok(k) = ext.key() {
                pax.insert(k.to_string(), ext.value_bytes().to_vec());
            }
        }
    }
    let pax_str = |k: &str| pax.get(k).and_then(|v| std::str::from_utf8(v).ok());
    // GNU tar and Go read a numeric field that is all NULs or spaces as 0; so do we.
    let num = |r: io::Result<u64>, what: &str| -> Result<u64> {
        let raw: &[u8] = match what {
            "uid" => &header.as_old().uid,
            "gid" => &header.as_old().gid,
            _ => &header.as_old().mtime,
        };
        if r.is_err() && raw.iter().all(|&b| b == 0 || b == b' ') {
            return Ok(0);
        }
        r.map_err(|e| bad_tar(Some(name), io::Error::other(format!("{what}: {e}"))))
    };
    let id = |v: u64, what: &str| -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::BadInputTar {
            detail: format!("entry {name:?}: {what} {v} does not fit in 32 bits"),
        })
    };
    let (mtime, mtime_nanos) = match pax_str("mtime") {
        Some(s) => parse_pax_time(s).ok_or_else(|| Error::BadInputTar {
            detail: format!("entry {name:?}: PAX mtime {s:?} is not a number"),
        })?,
        None => (num(header.mtime(), "mtime")? as i64, 0),
    };
    let user_name = match pax_str("uname") {
        Some(s) => s.to_string(),
        None => header
            .username()
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_string(),
    };
    let group_name = match pax_str("gname") {
        Some(s) => s.to_string(),
        None => header
            .groupname()
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_string(),
    };
    let xattrs: BTreeMap<String, Vec<u8>> = pax
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("SCHILY.xattr.")
                .map(|x| (x.to_string(), v.clone()))
        })
        .collect();
    let link_name = match entry.link_name_bytes() {
        Some(l) if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) => {
            String::from_utf8(l.into_owned()).map_err(|_| Error::BadInputTar {
                detail: format!("entry {name:?} has a link target that is not UTF-8"),
            })?
        }
        _ => String::new(),
    };
    let link_norm = if kind == EntryKind::Hardlink {
        Some(normalize_name(&link_name).map_err(|d| Error::BadHardlink {
            name: name.to_string(),
            target: link_name.clone(),
            detail: d.to_string(),
        })?)
    } else {
        None
    };
    let (dev_major, dev_minor) = if matches!(kind, EntryKind::Char | EntryKind::Block) {
        (
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        )
    } else {
        (0, 0)
    };
    let mode = header.mode().map_err(|e| bad_tar(Some(name), e))?;

    // Read the content (it also lands in the spool) and compute the file and chunk digests.
    let mut file_hash = Sha256::new();
    let mut chunk_hash = Sha256::new();
    let mut chunk_digests = Vec::new();
    let mut in_chunk = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    // The first bytes choose the file's chunk size: an `ar` archive is cut finer.
    let mut head = [0u8; ARCHIVE_MAGIC.len()];
    let head_len = data_len.min(head.len() as u64) as usize;
    while (total as usize) < head_len {
        let n = entry
            .read(&mut head[total as usize..head_len])
            .map_err(|e| bad_tar(Some(name), e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let ar_archive = kind == EntryKind::Reg && head == *ARCHIVE_MAGIC;
    let startup_chunk = chunk_size.min(STARTUP_CHUNK_SIZE);
    let read_at_start = match startup.get(norm.as_str()) {
        Some(ranges) if kind == EntryKind::Reg => startup_marks(ranges, data_len, startup_chunk),
        _ => Vec::new(),
    };
    let chunk_size = if read_at_start.is_empty() {
        unprofiled_chunk_size(chunk_size, ar_archive)
    } else {
        startup_chunk
    };
    file_hash.update(&head[..total as usize]);
    chunk_hash.update(&head[..total as usize]);
    in_chunk += total;
    loop {
        let want = buf.len().min((chunk_size - in_chunk) as usize);
        let n = entry
            .read(&mut buf[..want])
            .map_err(|e| bad_tar(Some(name), e))?;
        if n == 0 {
            break;
        }
        file_hash.update(&buf[..n]);
        chunk_hash.update(&buf[..n]);
        in_chunk += n as u64;
        total += n as u64;
        if in_chunk == chunk_size {
            chunk_digests.push(Sha256Digest::from(std::mem::take(&mut chunk_hash)));
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        chunk_digests.push(Sha256Digest::from(chunk_hash));
    }
    if total != data_len {
        return Err(Error::BadInputTar {
            detail: format!("entry {name:?} is truncated: {total} of {data_len} bytes"),
        });
    }
    let is_reg = kind == EntryKind::Reg;
    let json = JsonEntry {
        name: raw_name.clone(),
        kind: kind.as_str().into(),
        size: if is_reg { data_len } else { 0 },
        mod_time: format_mtime(mtime, mtime_nanos),
        link_name,
        mode: mode & 0o7777,
        uid: id(num(header.uid(), "uid")?, "uid")?,
        gid: id(num(header.gid(), "gid")?, "gid")?,
        user_name,
        group_name,
        dev_major,
        dev_minor,
        xattrs,
        digest: if is_reg && data_len > 0 {
            Sha256Digest::from(file_hash).to_string()
        } else {
            String::new()
        },
        ar_archive,
        ..Default::default()
    };
    Ok(InEntry {
        seg_start,
        data_start,
        data_len,
        seg_end: data_start + round_up(data_len),
        norm,
        kind,
        json,
        read_at_start,
        chunk_digests: if is_reg { chunk_digests } else { Vec::new() },
        chunk_size,
        link_norm,
    })
}

/// Parses a PAX time ("1700000000.5") into seconds and nanoseconds (floor semantics, as
/// the file system stores it).
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    if nanos == 0 {
        return Some((secs, 0));
    }
    if int.starts_with('-') {
        // -1.25 is 1.25 s before the epoch: -2 s plus 0.75 s.
        Some((secs - 1, 1_000_000_000 - nanos))
    } else {
        Some((secs, nanos))
    }
}

/// Orders the output: prioritized files (with the parents and hardlink targets they need),
/// then the landmark, then everything else in input order.
fn plan_order(entries: &[InEntry], prioritized: &[String]) -> (Vec<OutItem>, usize, Vec<String>) {
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_name.entry(e.norm.as_str()).or_default().push(i);
    }
    let mut placed = vec![false; entries.len()];
    let mut order = Vec::with_capacity(entries.len() + 1);
    let mut missing = Vec::new();
    for p in prioritized {
        let Ok(norm) = normalize_name(p.trim_start_matches('/')) else {
            missing.push(p.clone());
            continue;
        };
        let Some(list) = by_name.get(norm.as_str()) else {
            missing.push(p.clone());
            continue;
        };
        for &i in list {
            place(i, entries, &by_name, &mut placed, &mut order);
        }
    }
    let n_prioritized = order.len();
    if n_prioritized > 0 {
        order.push(OutItem::Landmark(PREFETCH_LANDMARK));
    } else {
        order.insert(0, OutItem::Landmark(NO_PREFETCH_LANDMARK));
    }
    for (i, done) in placed.iter().enumerate() {
        if !done {
            order.push(OutItem::Input(i));
        }
    }
    (order, n_prioritized, missing)
}

fn place(
    start: usize,
    entries: &[InEntry],
    by_name: &HashMap<&str, Vec<usize>>,
    placed: &mut [bool],
    order: &mut Vec<OutItem>,
) {
    // Explicit stack: hardlink chains in hostile input must not overflow the call stack.
    let mut stack = vec![(start, false)];
    while let Some((i, ready)) = stack.pop() {
        if placed[i] {
            continue;
        }
        if ready {
            placed[i] = true;
            order.push(OutItem::Input(i));
            continue;
        }
        stack.push((i, true));
        let e = &entries[i];
        let mut deps: Vec<usize> = Vec::new();
        let mut end = 0;
        while let Some(pos) = e.norm[end..].find('/') {
            end += pos;
            if let Some(l) = by_name.get(&e.norm[..end]) {
                deps.extend(l.iter().copied().filter(|&j| j < i));
            }
            end += 1;
        }
        if let Some(t) = &e.link_norm {
            if let Some(l) = by_name.get(t.as_str()) {
                deps.extend(l.iter().copied().filter(|&j| j < i));
            }
        }
        for d in deps.into_iter().rev() {
            if !placed[d] {
                stack.push((d, false));
            }
        }
    }
}

/// Splits the output into gzip members; returns them and, per (output item, chunk), the member
/// holding that chunk.
fn plan_members(
    entries: &[InEntry],
    order: &[OutItem],
) -> (Vec<Member>, HashMap<(usize, usize), usize>) {
    let mut members = Vec::new();
    let mut chunk_members = HashMap::new();
    let mut cur = Member::default();
    let close = |cur: &mut Member, members: &mut Vec<Member>| {
        let m = std::mem::take(cur);
        if m.len > 0 {
            members.push(m);
        }
    };
    for (item, o) in order.iter().enumerate() {
        match *o {
            OutItem::Input(i) => {
                let e = &entries[i];
                cur.push(Part::Spool {
                    start: e.seg_start,
                    len: e.data_start - e.seg_start,
                });
                if e.kind == EntryKind::Reg && e.data_len > 0 {
                    let mut off = 0;
                    let mut ci = 0;
                    while off < e.data_len {
                        let len = e.chunk_size.min(e.data_len - off);
                        close(&mut cur, &mut members);
                        chunk_members.insert((item, ci), members.len());
                        cur.push(Part::Spool {
                            start: e.data_start + off,
                            len,
                        });
                        off += len;
                        ci += 1;
                    }
                    let data_end = e.data_start + e.data_len;
                    cur.push(Part::Spool {
                        start: data_end,
                        len: e.seg_end - data_end,
                    });
                } else {
                    cur.push(Part::Spool {
                        start: e.data_start,
                        len: e.seg_end - e.data_start,
                    });
                }
            }
            OutItem::Landmark(name) => {
                cur.push(Part::Bytes(tar_header(name, 1)));
                close(&mut cur, &mut members);
                chunk_members.insert((item, 0), members.len());
                let mut data = vec![0u8; BLOCK as usize];
                data[0] = LANDMARK_CONTENTS;
                cur.push(Part::Bytes(data));
            }
        }
    }
    close(&mut cur, &mut members);
    (members, chunk_members)
}

/// The first bytes of an `ar` archive (a static library: `libgcc.a`, `libc.a`, a Rust
/// `.rlib`).
pub const ARCHIVE_MAGIC: &[u8; 8] = b"!<arch>\n";
/// The chunk size of an `ar` archive, when [`ConvertOptions::chunk_size`] is larger: a
/// linker reads an archive's symbol index at its start and then only the members it needs
/// (linking hello world reads 16 KiB of gcc 12's 3 MB `libgcc.a`), so whole 4 MiB chunks
/// would fetch megabytes that nothing reads. The TOC marks archives (`arArchive`): a lazy
/// layer fetches them only as they are read.
pub const ARCHIVE_CHUNK_SIZE: u64 = 256 << 10;

/// For a file of `len` bytes cut in `chunk` byte chunks: whether each chunk holds a byte
/// of `ranges` (in any order; parts past the end are ignored).
fn touched_chunks(ranges: &[Range<u64>], len: u64, chunk: u64) -> Vec<bool> {
    let mut marks = vec![false; len.div_ceil(chunk) as usize];
    for r in ranges.iter().filter(|r| r.start < r.end.min(len)) {
        let (first, last) = (r.start / chunk, (r.end.min(len) - 1) / chunk);
        marks[first as usize..=last as usize].fill(true);
    }
    marks
}

/// Least a page profile must leave unread in a file for the file to be cut for it: the
/// chunks no start reads must hold at least this many bytes.
pub const STARTUP_MIN_SAVING: u64 = 256 << 10;

/// The chunk size of a file with startup ranges ([`ConvertOptions::startup_ranges`]), when
/// [`ConvertOptions::chunk_size`] is larger: a start touches 28-54 % of the bytes of the
/// files it opens, spread through them (`cc1`'s code and constants), and the 64 KiB chunks
/// holding those pages are 63-77 % of the files' compressed bytes, against 91-100 % at
/// 1 MiB (BENCHMARKS.md, "What a start touches, page by page").
pub const STARTUP_CHUNK_SIZE: u64 = 64 << 10;

/// The highest compression level (libdeflate's).
pub const MAX_LEVEL: u32 = 12;
/// The default compression level: on real root filesystems libdeflate's level 10 is 3.7 to
/// 4.1 % smaller than zlib's level 9 (what the reference writes) in 1.2 to 1.8 times its
/// time; level 12 gains another 0.2 % in twice the time of level 10.
pub const DEFAULT_LEVEL: u32 = 10;

/// A gzip compressor, kept per thread (libdeflate's slower levels allocate their matching
/// structures up front). libdeflate rather than zlib: every member is in memory anyway, and
/// it compresses better; those are bytes that cross the link on every lazy start.
struct Gzip(libdeflater::Compressor);

impl Gzip {
    fn new(level: u32) -> Result<Gzip> {
        let level = libdeflater::CompressionLvl::new(level as i32).map_err(|_| {
            Error::InvalidOption(format!(
                "compression level {level} is outside 0..={MAX_LEVEL}"
            ))
        })?;
        Ok(Gzip(libdeflater::Compressor::new(level)))
    }

    /// One gzip member of `raw`, with mtime 0 and OS "unknown" as the reference writes
    /// them: the bytes depend on nothing else.
    fn compress(&mut self, raw: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.0.gzip_compress_bound(raw.len())];
        let n = self
            .0
            .gzip_compress(raw, &mut out)
            .map_err(|e| Error::io("compressing", io::Error::other(format!("{e:?}"))))?;
        out.truncate(n);
        Ok(out)
    }
}

fn member_bytes(m: &Member, spool: &File) -> Result<Vec<u8>> {
    let mut raw = vec![0u8; m.len as usize];
    let mut at = 0usize;
    for p in &m.parts {
        match p {
            Part::Spool { start, len } => {
                let dst = &mut raw[at..at + *len as usize];
                spool
                    .read_exact_at(dst, *start)
                    .map_err(|e| Error::io("reading the spool file", e))?;
                at += *len as usize;
            }
            Part::Bytes(b) => {
                raw[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
        }
    }
    Ok(raw)
}

fn lock(m: &Mutex<Pipeline>) -> std::sync::MutexGuard<'_, Pipeline> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Pipeline {
    next: usize,
    written: usize,
    done: BTreeMap<usize, (Vec<u8>, Vec<u8>)>,
    failed: Option<Error>,
    stop: bool,
}

/// Compresses members on `threads` workers and hands them to `sink` in order. At most
/// `2 * threads` members are in memory at once.
fn compress_members(
    members: &[Member],
    spool: &File,
    level: u32,
    threads: usize,
    mut sink: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let threads = threads.clamp(1, 256);
    let window = threads * 2;
    let state = Mutex::new(Pipeline {
        next: 0,
        written: 0,
        done: BTreeMap::new(),
        failed: None,
        stop: false,
    });
    let cv = Condvar::new();
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            s.spawn(|| {
                let mut gz = match Gzip::new(level) {
                    Ok(gz) => gz,
                    Err(e) => {
                        lock(&state).failed.get_or_insert(e);
                        cv.notify_all();
                        return;
                    }
                };
                loop {
                    let idx = {
                        let mut st = lock(&state);
                        loop {
                            if st.stop || st.failed.is_some() || st.next >= members.len() {
                                return;
                            }
                            if st.next < st.written + window {
                                break;
                            }
                            st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        st.next += 1;
                        st.next - 1
                    };
                    let result = member_bytes(&members[idx], spool)
                        .and_then(|raw| gz.compress(&raw).map(|c| (c, raw)));
                    let mut st = lock(&state);
                    match result {
                        Ok(pair) => {
                            st.done.insert(idx, pair);
                        }
                        Err(e) => {
                            st.failed.get_or_insert(e);
                        }
                    }
                    cv.notify_all();
                }
            });
        }
        let result = (|| {
            for idx in 0..members.len() {
                let (compressed, raw) = {
                    let mut st = lock(&state);
                    loop {
                        if let Some(e) = st.failed.take() {
                            return Err(e);
                        }
                        if let Some(pair) = st.done.remove(&idx) {
                            break pair;
                        }
                        st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                };
                sink(&compressed, &raw)?;
                lock(&state).written = idx + 1;
                cv.notify_all();
            }
            Ok(())
        })();
        lock(&state).stop = true;
        cv.notify_all();
        result
    })
}

struct Tee<'a, R> {
    inner: R,
    out: BufWriter<&'a File>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

struct CountingReader<'a, R> {
    inner: R,
    count: u64,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        self.progress.input(self.count);
        Ok(n)
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
    hasher: Sha256,
}

impl<W: Write> CountingWriter<W> {
    fn new(inner: W) -> Self {
        CountingWriter {
            inner,
            count: 0,
            hasher: Sha256::new(),
        }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
