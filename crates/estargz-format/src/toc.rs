//! The table of contents (TOC): its JSON form and the validated model readers use.
//!
//! [`JsonToc`] mirrors the reference's `stargz.index.json` field for field, so that what we
//! write reads in the reference and vice versa. [`Toc`] is what a reader works with: names
//! normalized, parents present, chunk lists checked, hardlinks resolved, link counts computed.
//! Building a [`Toc`] is where hostile input is refused.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Deserializer, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::digest::Sha256Digest;
use crate::error::{Error, Result};

/// Name of the TOC's tar entry (the last entry of the blob).
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Landmark that ends the prioritized (prefetched) files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark that says the layer has no prioritized files.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Content of either landmark file.
pub const LANDMARK_CONTENTS: u8 = 0x0f;

/// Bounds applied to untrusted TOCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest TOC JSON accepted, in bytes (uncompressed).
    pub max_toc_size: u64,
    /// Largest uncompressed chunk (plus its inner offset) accepted, in bytes. Bounds the memory
    /// one chunk read can take and defeats gzip bombs.
    pub max_chunk_size: u64,
    /// Most entries a TOC may hold: its JSON entries (files, directories, chunks) and the
    /// directories it only implies. Bounds the memory of parsing whatever the JSON's size.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_toc_size: 128 << 20,
            max_chunk_size: 64 << 20,
            // Ten times the largest layers seen in practice (about 100,000 files); a TOC of
            // a million entries takes about 700 MB to parse and index.
            max_entries: 1_000_000,
        }
    }
}

/// Longest path accepted, in bytes: Linux's `PATH_MAX` (4096, with its NUL).
pub const MAX_PATH_LEN: usize = 4095;

/// Compressed bytes a chunk's range may take beyond its uncompressed bytes: gzip's header
/// and trailer, deflate's worst case on incompressible data (5 bytes per 64 KiB stored
/// block) with a wide margin, and the tar padding and headers that share its member.
fn max_compressed_span(raw: u64) -> u64 {
    raw.saturating_add(raw / 16).saturating_add(128 << 10)
}

/// The TOC as serialized in `stargz.index.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JsonToc {
    /// Format version; 1.
    pub version: i64,
    /// Entries in tar order; chunked files continue with `chunk` entries.
    #[serde(default)]
    pub entries: Vec<JsonEntry>,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// One TOC entry as serialized; see `estargz-format.md` for the meaning of each field.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JsonEntry {
    /// Path inside the tar, as written in the tar.
    pub name: String,
    /// `dir`, `reg`, `symlink`, `hardlink`, `char`, `block`, `fifo` or `chunk`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Uncompressed file size (regular files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// RFC 3339 modification time.
    #[serde(rename = "modtime", default, skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    /// Symlink or hardlink target.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Mode bits as in the tar header.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: u32,
    /// Owner; absent means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u32,
    /// Group; absent means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u32,
    /// Owner name; may be written only once per uid.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    /// Group name; may be written only once per gid.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    /// Compressed offset of the gzip member holding this payload or chunk.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Uncompressed offset of the payload inside that member.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    /// Device major number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: u32,
    /// Device minor number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: u32,
    /// Extended attributes; values are base64 in JSON.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "base64_map"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of the whole file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Offset of this chunk in the file.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    /// Length of this chunk; 0 on the last chunk means "to the end of the file".
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    /// sha256 of the uncompressed chunk.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
    /// Our extension: what an ELF object (a regular file) loads, so that a lazy mount
    /// can fetch its libraries at its first miss. Readers that do not know it (the
    /// reference's, Go's `encoding/json`) skip it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elf_needs: Option<crate::elf::Needs>,
    /// Our extension: the file is an `ar` archive (a static library), which programs read
    /// in pieces (its symbol index, then the members a link needs), so a lazy mount
    /// fetches it only as it is read: never ahead, and of a prioritized one only the first
    /// chunk. Readers that do not know it skip it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ar_archive: bool,
    /// Our extension, on a regular file or chunk entry: a recorded start of a workload
    /// (`estargz optimize`) read this chunk, so a lazy mount prefetches it first; the
    /// chunks of such a file that it did not read come after what starts read in every
    /// layer. Readers that do not know it skip it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_at_start: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

mod base64_map {
    use std::collections::BTreeMap;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    /// Longest attribute name Linux takes (`XATTR_NAME_MAX`).
    const NAME_MAX: usize = 255;
    /// Largest attribute value Linux takes (`XATTR_SIZE_MAX`).
    const VALUE_MAX: usize = 64 << 10;
    /// Most bytes of names, each with its NUL, one inode can list (`XATTR_LIST_MAX`).
    const LIST_MAX: usize = 64 << 10;

    /// The attributes of one entry, within what Linux lets one inode hold: a tar from a
    /// real file system never holds more, and a hostile TOC's attributes would otherwise
    /// be bounded only by its size (a million tiny ones in one entry).
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        d.deserialize_option(OptionalMap)
    }

    struct OptionalMap;

    impl<'de> serde::de::Visitor<'de> for OptionalMap {
        type Value = BTreeMap<String, Vec<u8>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of extended attributes to base64 values")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            let mut listed = 0;
            while let Some((k, v)) = map.next_entry::<String, Option<String>>()? {
                if k.len() > NAME_MAX {
                    return Err(A::Error::custom(format!(
                        "xattr name of {} bytes is longer than {NAME_MAX}",
                        k.len()
                    )));
                }
                listed += k.len() + 1;
                if listed > LIST_MAX {
                    return Err(A::Error::custom(format!(
                        "xattr names take more than the {LIST_MAX} bytes one file may list"
                    )));
                }
                let bytes = match v {
                    Some(v) => STANDARD
                        .decode(v.as_bytes())
                        .map_err(|e| A::Error::custom(format!("xattr {k:?} is not base64: {e}")))?,
                    None => Vec::new(),
                };
                if bytes.len() > VALUE_MAX {
                    return Err(A::Error::custom(format!(
                        "xattr {k:?} has a value of {} bytes, more than {VALUE_MAX}",
                        bytes.len()
                    )));
                }
                out.insert(k, bytes);
            }
            Ok(out)
        }
    }
}

/// What a TOC entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Directory.
    Dir,
    /// Regular file.
    Reg,
    /// Symbolic link.
    Symlink,
    /// Hard link to an earlier entry (see [`TocEntry::link_target`]).
    Hardlink,
    /// Character device (overlayfs whiteouts are 0/0 character devices).
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

impl EntryKind {
    /// The TOC's name for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Dir => "dir",
            EntryKind::Reg => "reg",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::Char => "char",
            EntryKind::Block => "block",
            EntryKind::Fifo => "fifo",
        }
    }

    /// Parses the TOC's `type` field (not `chunk`).
    pub fn from_toc(s: &str) -> Option<Self> {
        Some(match s {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::Reg,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            _ => return None,
        })
    }
}

/// One chunk of a regular file: a verified piece of its content inside one gzip member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Compressed offset of the gzip member holding the chunk.
    pub offset: u64,
    /// End of the compressed range to fetch: the next member offset in the blob (or the TOC).
    pub compressed_end: u64,
    /// Uncompressed offset of the chunk inside the member.
    pub inner_offset: u64,
    /// Where the chunk starts in the file.
    pub chunk_offset: u64,
    /// Length of the chunk (never 0).
    pub size: u64,
    /// sha256 of the uncompressed chunk.
    pub digest: Sha256Digest,
}

/// A validated entry of the layer's file tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    /// Normalized path: no leading `./` or `/`, no trailing `/`; the root is `""`.
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// File size (regular files; for hardlinks see the target).
    pub size: u64,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Owner name (carried forward from the first entry with this uid).
    pub user_name: String,
    /// Group name (carried forward from the first entry with this gid).
    pub group_name: String,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nanos: u32,
    /// Symlink target as written, or the normalized name of a hardlink's target.
    pub link_name: String,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of the whole file, when the TOC gives it.
    pub digest: Option<Sha256Digest>,
    /// The file's chunks in file order (regular files with content).
    pub chunks: Vec<Chunk>,
    /// Link count: 1 + hardlinks for files, 2 + subdirectories for directories.
    pub num_link: u32,
    /// Parent directory (the root is its own parent).
    pub parent: usize,
    /// Directory children, sorted by name.
    pub children: Vec<usize>,
    /// For hardlinks: the entry holding the content and attributes.
    pub link_target: Option<usize>,
    /// Position in the TOC's entry list; `None` for directories the TOC only implies.
    pub toc_index: Option<usize>,
    /// For an ELF object: what it loads, as the TOC records it, held to
    /// [`Needs::bounded`](crate::elf::Needs::bounded). A hint for fetching, never trusted
    /// for anything else.
    pub elf_needs: Option<Box<crate::elf::Needs>>,
    /// A regular file the TOC marks as an `ar` archive (`arArchive`): read in pieces,
    /// not fetched ahead. A hint for fetching, never trusted for anything else.
    pub ar_archive: bool,
    /// Indexes in `chunks` of the chunks the TOC marks `readAtStart` (a recorded start read
    /// them), in file order; empty for a file without a recorded profile. A hint for
    /// fetching, never trusted for anything else.
    pub read_at_start: Vec<u32>,
}

impl TocEntry {
    fn new_dir(name: String, parent: usize) -> Self {
        TocEntry {
            name,
            kind: EntryKind::Dir,
            size: 0,
            mode: 0o755,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            mtime: 0,
            mtime_nanos: 0,
            link_name: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
            num_link: 2,
            parent,
            children: Vec::new(),
            link_target: None,
            toc_index: None,
            elf_needs: None,
            ar_archive: false,
            read_at_start: Vec::new(),
        }
    }

    /// Last path component (`""` for the root).
    pub fn base_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or("")
    }
}

/// Normalizes a tar path: drops `.` components, leading `./` and trailing `/`.
///
/// Refuses absolute paths, `..` components, NUL bytes, components longer than 255 bytes
/// and paths longer than [`MAX_PATH_LEN`]: such names either escape the layer root or
/// cannot exist on Linux.
pub fn normalize_name(name: &str) -> std::result::Result<String, &'static str> {
    const TOO_LONG: &str = "the path is longer than 4095 bytes";
    // A name of `./` repeated can normalize to something short; anything longer than this
    // is hostile, and refusing it up front keeps the work linear in a bounded input.
    if name.len() > 4 * MAX_PATH_LEN {
        return Err(TOO_LONG);
    }
    if name.contains('\0') {
        return Err("the name contains a NUL byte");
    }
    if name.starts_with('/') {
        return Err("the name is an absolute path");
    }
    let mut out = String::with_capacity(name.len());
    for comp in name.split('/') {
        match comp {
            "" | "." => continue,
            ".." => return Err("the name has a '..' component"),
            c if c.len() > 255 => return Err("a path component is longer than 255 bytes"),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    if out.len() > MAX_PATH_LEN {
        return Err(TOO_LONG);
    }
    Ok(out)
}

/// Formats a modification time as RFC 3339 in UTC, as the reference writes it; a
/// sub-second part (from PAX headers) is kept as a fraction, which RFC 3339 (and the
/// reference's parser) accept, so that lazily mounted files keep tar's exact mtime.
pub fn format_mtime(secs: i64, nanos: u32) -> String {
    // RFC 3339 has four-digit years; clamp rather than fail on absurd tar mtimes.
    const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let t = OffsetDateTime::from_unix_timestamp(secs.clamp(MIN, MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let t = if (MIN..=MAX).contains(&secs) {
        t.replace_nanosecond(nanos.min(999_999_999)).unwrap_or(t)
    } else {
        t
    };
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Parses an RFC 3339 modification time into seconds and nanoseconds since the epoch.
pub fn parse_mtime(s: &str) -> Option<(i64, u32)> {
    if s.is_empty() {
        return Some((0, 0));
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some((t.unix_timestamp(), t.nanosecond()))
}

/// A validated TOC: the layer's file tree with every file's chunks.
#[derive(Debug, Clone)]
pub struct Toc {
    entries: Vec<TocEntry>,
    by_name: HashMap<String, usize>,
    toc_offset: u64,
    prefetch_landmark: Option<usize>,
    no_prefetch_landmark: Option<usize>,
    toc_order: Vec<usize>,
}

struct Builder<'a> {
    toc: Toc,
    limits: &'a Limits,
    user_names: HashMap<u32, String>,
    group_names: HashMap<u32, String>,
    /// Regular file that `chunk` entries continue, with the raw chunk size of its last chunk.
    open_file: Option<(usize, u64)>,
    /// Bytes of names that directories only implied by deeper paths may still take: each
    /// such directory stores its whole path, so without a bound one deep name would cost
    /// memory quadratic in its length.
    implied_name_budget: u64,
}

/// Deserializes a [`JsonToc`], refusing more than `max` entries before they are all in
/// memory (a small entry takes 13 times its JSON size once parsed). Sets `overflow` when
/// that is why it failed.
#[derive(Clone, Copy)]
struct BoundedToc<'a> {
    max: usize,
    overflow: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BoundedToc<'_> {
    type Value = JsonToc;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<JsonToc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedToc<'_> {
    type Value = JsonToc;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOC object with version and entries")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<JsonToc, A::Error> {
        let mut toc = JsonToc::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => toc.version = map.next_value()?,
                "entries" => toc.entries = map.next_value_seed(BoundedEntries(self))?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(toc)
    }
}

struct BoundedEntries<'a>(BoundedToc<'a>);

impl<'de> serde::de::DeserializeSeed<'de> for BoundedEntries<'_> {
    type Value = Vec<JsonEntry>;
    fn deserialize<D: Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Vec<JsonEntry>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedEntries<'_> {
    type Value = Vec<JsonEntry>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Vec<JsonEntry>, A::Error> {
        let mut entries = Vec::new();
        // Each entry's attributes are bounded by what one file may hold; all of them by
        // the entry limit too, or a TOC's size alone would bound them.
        let mut xattrs = 0usize;
        while let Some(e) = seq.next_element::<JsonEntry>()? {
            if entries.len() == self.0.max {
                self.0.overflow.set(true);
                return Err(serde::de::Error::custom("too many entries"));
            }
            xattrs += e.xattrs.len();
            if xattrs > self.0.max {
                return Err(serde::de::Error::custom(format!(
                    "more than {} extended attributes in all",
                    self.0.max
                )));
            }
            entries.push(e);
        }
        Ok(entries)
    }
}

impl Toc {
    /// Parses and validates TOC JSON. `toc_offset` is the TOC's offset from the footer: every
    /// payload must lie before it.
    pub fn parse(json: &[u8], toc_offset: u64, limits: &Limits) -> Result<Toc> {
        // Never more than 4 GiB, whatever the limits say: consumers index names, entries
        // and chunks with 32-bit offsets into structures bounded by the TOC's length.
        let limit = limits.max_toc_size.min(u32::MAX as u64);
        if json.len() as u64 > limit {
            return Err(Error::TocTooLarge {
                size: json.len() as u64,
                limit,
            });
        }
        let overflow = std::cell::Cell::new(false);
        let seed = BoundedToc {
            max: limits.max_entries,
            overflow: &overflow,
        };
        let mut de = serde_json::Deserializer::from_slice(json);
        let raw = serde::de::DeserializeSeed::deserialize(seed, &mut de)
            .and_then(|raw| de.end().map(|_| raw))
            .map_err(|e| {
                if overflow.get() {
                    Error::TooManyEntries {
                        limit: limits.max_entries,
                    }
                } else {
                    Error::TocJson(e)
                }
            })?;
        Toc::from_json(&raw, toc_offset, limits)
    }

    /// Validates an already parsed TOC.
    pub fn from_json(raw: &JsonToc, toc_offset: u64, limits: &Limits) -> Result<Toc> {
        if raw.version != 1 {
            return Err(Error::TocVersion(raw.version));
        }
        if raw.entries.len() > limits.max_entries {
            return Err(Error::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let names: u64 = raw.entries.iter().map(|e| e.name.len() as u64).sum();
        let mut root = TocEntry::new_dir(String::new(), 0);
        root.num_link = 2;
        let mut b = Builder {
            toc: Toc {
                entries: vec![root],
                by_name: HashMap::from([(String::new(), 0)]),
                toc_offset,
                prefetch_landmark: None,
                no_prefetch_landmark: None,
                toc_order: Vec::with_capacity(raw.entries.len()),
            },
            limits,
            user_names: HashMap::new(),
            group_names: HashMap::new(),
            open_file: None,
            implied_name_budget: names.saturating_add(1 << 20),
        };
        for (i, je) in raw.entries.iter().enumerate() {
            b.add(i, je)?;
        }
        b.close_file()?;
        b.finish()
    }

    /// All entries; index 0 is the root directory.
    pub fn entries(&self) -> &[TocEntry] {
        &self.entries
    }

    /// One entry by index.
    pub fn entry(&self, index: usize) -> &TocEntry {
        &self.entries[index]
    }

    /// Number of entries, including the root and implied directories.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree holds nothing but the root.
    pub fn is_empty(&self) -> bool {
        self.entries.len() == 1
    }

    /// Index of the entry at `path` (normalized first), if any.
    pub fn lookup(&self, path: &str) -> Option<usize> {
        let name = normalize_name(path.trim_start_matches('/')).ok()?;
        self.by_name.get(&name).copied()
    }

    /// The entry holding content and attributes for `index` (itself unless a hardlink).
    pub fn resolve(&self, index: usize) -> usize {
        self.entries[index].link_target.unwrap_or(index)
    }

    /// Entries in the order the TOC lists them (implied directories excluded).
    pub fn toc_order(&self) -> &[usize] {
        &self.toc_order
    }

    /// Offset of the TOC's gzip member; every payload lies before it.
    pub fn toc_offset(&self) -> u64 {
        self.toc_offset
    }

    /// The `.prefetch.landmark` entry, if the layer has prioritized files.
    pub fn prefetch_landmark(&self) -> Option<usize> {
        self.prefetch_landmark
    }

    /// The `.no.prefetch.landmark` entry, if the layer says it has no prioritized files.
    pub fn no_prefetch_landmark(&self) -> Option<usize> {
        self.no_prefetch_landmark
    }

    /// Compressed bytes `[0, n)` to fetch at mount to get every prioritized file, when the
    /// layer has a prefetch landmark.
    pub fn prefetch_size(&self) -> Option<u64> {
        let lm = self.prefetch_landmark?;
        self.entries[lm].chunks.first().map(|c| c.offset)
    }

    /// Entries listed before `.prefetch.landmark` (the prioritized files), in TOC order.
    pub fn prioritized(&self) -> Vec<usize> {
        let Some(lm) = self.prefetch_landmark else {
            return Vec::new();
        };
        self.toc_order
            .iter()
            .copied()
            .take_while(|&i| i != lm)
            .filter(|&i| self.entries[i].name != NO_PREFETCH_LANDMARK)
            .collect()
    }

    /// Total number of chunks over all files.
    pub fn chunk_count(&self) -> usize {
        self.entries.iter().map(|e| e.chunks.len()).sum()
    }
}

impl Builder<'_> {
    fn bad(&self, index: usize, name: &str, detail: impl Into<String>) -> Error {
        Error::BadEntry {
            index,
            name: name.chars().take(300).collect(),
            detail: detail.into(),
        }
    }

    fn add(&mut self, index: usize, je: &JsonEntry) -> Result<()> {
        if je.kind == "chunk" {
            return self.add_chunk(index, je);
        }
        self.close_file()?;
        let kind = EntryKind::from_toc(&je.kind)
            .ok_or_else(|| self.bad(index, &je.name, format!("unknown type {:?}", je.kind)))?;
        let name = normalize_name(&je.name).map_err(|d| Error::PathTraversal {
            name: je.name.chars().take(300).collect(),
            detail: d.to_string(),
        })?;
        let (mtime, mtime_nanos) = parse_mtime(&je.mod_time).ok_or_else(|| {
            self.bad(
                index,
                &je.name,
                format!("modtime {:?} is not RFC 3339", je.mod_time),
            )
        })?;
        let user_name = carry_name(&mut self.user_names, je.uid, &je.user_name);
        let group_name = carry_name(&mut self.group_names, je.gid, &je.group_name);
        let digest = if je.digest.is_empty() {
            None
        } else {
            Some(je.digest.parse::<Sha256Digest>()?)
        };

        if name.is_empty() {
            if kind != EntryKind::Dir {
                return Err(self.bad(index, &je.name, "the root must be a directory"));
            }
            let root = &mut self.toc.entries[0];
            set_attrs(root, je, mtime, mtime_nanos, user_name, group_name);
            root.toc_index = Some(index);
            self.toc.toc_order.push(0);
            return Ok(());
        }

        let parent = self.ensure_parent(&name, &je.name)?;
        if let Some(&existing) = self.toc.by_name.get(&name) {
            let first = self.toc.entries[existing].kind;
            if first == EntryKind::Dir && kind == EntryKind::Dir {
                // A repeated directory: tar applies the later header's attributes.
                let e = &mut self.toc.entries[existing];
                set_attrs(e, je, mtime, mtime_nanos, user_name, group_name);
                if e.toc_index.is_none() {
                    e.toc_index = Some(index);
                    self.toc.toc_order.push(existing);
                }
                return Ok(());
            }
            return Err(Error::DuplicateEntry {
                name,
                first: first.as_str(),
                second: kind.as_str(),
            });
        }

        let idx = self.toc.entries.len();
        if idx >= self.limits.max_entries {
            return Err(Error::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let mut e = TocEntry::new_dir(name.clone(), parent);
        e.kind = kind;
        e.num_link = if kind == EntryKind::Dir { 2 } else { 1 };
        e.toc_index = Some(index);
        e.digest = digest;
        set_attrs(&mut e, je, mtime, mtime_nanos, user_name, group_name);
        match kind {
            EntryKind::Reg => {
                e.size = je.size;
                e.elf_needs = je.elf_needs.clone().and_then(|n| n.bounded()).map(Box::new);
                e.ar_archive = je.ar_archive;
                if je.size > 0 {
                    if je.chunk_offset != 0 {
                        return Err(self.bad(
                            index,
                            &je.name,
                            format!("first chunk starts at file offset {}", je.chunk_offset),
                        ));
                    }
                    let chunk = self.chunk_from(index, je, &e)?;
                    e.chunks.push(chunk);
                    if je.read_at_start {
                        e.read_at_start.push(0);
                    }
                    self.open_file = Some((idx, je.chunk_size));
                } else {
                    self.open_file = Some((idx, 0));
                }
            }
            EntryKind::Hardlink => {
                let target = normalize_name(&je.link_name).map_err(|d| Error::BadHardlink {
                    name: name.clone(),
                    target: je.link_name.clone(),
                    detail: d.into(),
                })?;
                let t = *self
                    .toc
                    .by_name
                    .get(&target)
                    .ok_or_else(|| Error::BadHardlink {
                        name: name.clone(),
                        target: target.clone(),
                        detail: "the target is not an earlier entry of the layer".into(),
                    })?;
                let t = self.toc.entries[t].link_target.unwrap_or(t);
                if self.toc.entries[t].kind == EntryKind::Dir {
                    return Err(Error::BadHardlink {
                        name,
                        target,
                        detail: "the target is a directory".into(),
                    });
                }
                self.toc.entries[t].num_link = self.toc.entries[t].num_link.saturating_add(1);
                e.link_target = Some(t);
                e.link_name = target;
            }
            EntryKind::Symlink => {
                if je.link_name.is_empty() || je.link_name.contains('\0') {
                    return Err(self.bad(index, &je.name, "symlink with an empty or NUL target"));
                }
                // Linux's bound, as for names: resolving a longer target, component by
                // component, took memory its length times the links followed.
                if je.link_name.len() > MAX_PATH_LEN {
                    return Err(self.bad(
                        index,
                        &je.name,
                        format!(
                            "symlink target of {} bytes is longer than {MAX_PATH_LEN}",
                            je.link_name.len()
                        ),
                    ));
                }
            }
            EntryKind::Char | EntryKind::Block => {
                e.dev_major = je.dev_major;
                e.dev_minor = je.dev_minor;
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        if kind != EntryKind::Reg && (je.size != 0 || !je.chunk_digest.is_empty()) {
            return Err(self.bad(index, &je.name, "only regular files may carry content"));
        }
        if kind == EntryKind::Reg && parent == 0 {
            let slot = match e.name.as_str() {
                PREFETCH_LANDMARK => Some(&mut self.toc.prefetch_landmark),
                NO_PREFETCH_LANDMARK => Some(&mut self.toc.no_prefetch_landmark),
                _ => None,
            };
            if let Some(slot) = slot {
                *slot = Some(idx);
            }
        }
        self.toc.entries.push(e);
        self.toc.entries[parent].children.push(idx);
        if kind == EntryKind::Dir {
            self.toc.entries[parent].num_link += 1;
        }
        self.toc.by_name.insert(name, idx);
        self.toc.toc_order.push(idx);
        Ok(())
    }

    fn chunk_from(&self, index: usize, je: &JsonEntry, file: &TocEntry) -> Result<Chunk> {
        let bad = |d: String| self.bad(index, &je.name, d);
        if je.offset >= self.toc.toc_offset {
            return Err(bad(format!(
                "payload offset {} is not before the TOC at {}",
                je.offset, self.toc.toc_offset
            )));
        }
        if je.chunk_offset >= file.size {
            return Err(bad(format!(
                "chunk starts at {} beyond the file size {}",
                je.chunk_offset, file.size
            )));
        }
        let remaining = file.size - je.chunk_offset;
        let size = if je.chunk_size == 0 {
            remaining
        } else {
            je.chunk_size
        };
        if size > remaining {
            return Err(bad(format!(
                "chunk at {} of {} bytes runs past the file size {}",
                je.chunk_offset, size, file.size
            )));
        }
        let span = size.saturating_add(je.inner_offset);
        if span > self.limits.max_chunk_size {
            return Err(bad(format!(
                "chunk of {size} bytes at inner offset {} exceeds the limit of {} bytes",
                je.inner_offset, self.limits.max_chunk_size
            )));
        }
        let digest = if !je.chunk_digest.is_empty() {
            je.chunk_digest.parse::<Sha256Digest>()?
        } else if je.chunk_offset == 0 && size == file.size && file.digest.is_some() {
            // Old stargz writers give only the file digest; one chunk covers the whole file.
            file.digest.unwrap_or(Sha256Digest([0; 32]))
        } else {
            return Err(bad(
                "chunk has no chunkDigest, so it cannot be verified".into()
            ));
        };
        Ok(Chunk {
            offset: je.offset,
            compressed_end: 0,
            inner_offset: je.inner_offset,
            chunk_offset: je.chunk_offset,
            size,
            digest,
        })
    }

    fn add_chunk(&mut self, index: usize, je: &JsonEntry) -> Result<()> {
        let Some((file_idx, prev_raw_size)) = self.open_file else {
            return Err(self.bad(
                index,
                &je.name,
                "chunk entry does not follow a regular file",
            ));
        };
        let same = normalize_name(&je.name).ok().as_deref()
            == Some(self.toc.entries[file_idx].name.as_str());
        if !same {
            return Err(self.bad(
                index,
                &je.name,
                format!(
                    "chunk entry follows {:?}, a different file",
                    self.toc.entries[file_idx].name
                ),
            ));
        }
        if prev_raw_size == 0 {
            return Err(self.bad(
                index,
                &je.name,
                "chunk follows a chunk that already runs to the end of the file",
            ));
        }
        let file = &self.toc.entries[file_idx];
        let last = file.chunks.last().copied();
        let expected = last.map_or(0, |c| c.chunk_offset + c.size);
        if je.chunk_offset != expected {
            return Err(self.bad(
                index,
                &je.name,
                format!(
                    "chunks overlap or leave a gap: this one starts at {}, the previous ends at {}",
                    je.chunk_offset, expected
                ),
            ));
        }
        let chunk = self.chunk_from(index, je, file)?;
        let file = &mut self.toc.entries[file_idx];
        if je.read_at_start {
            file.read_at_start.push(file.chunks.len() as u32);
        }
        file.chunks.push(chunk);
        self.open_file = Some((file_idx, je.chunk_size));
        Ok(())
    }

    /// Checks that the file whose chunks were being collected is fully covered.
    fn close_file(&mut self) -> Result<()> {
        let Some((idx, _)) = self.open_file.take() else {
            return Ok(());
        };
        let e = &self.toc.entries[idx];
        let covered = e.chunks.last().map_or(0, |c| c.chunk_offset + c.size);
        if covered != e.size {
            return Err(Error::BadEntry {
                index: e.toc_index.unwrap_or(0),
                name: e.name.clone(),
                detail: format!("chunks cover {covered} of the file's {} bytes", e.size),
            });
        }
        Ok(())
    }

    /// Makes sure every ancestor of `name` exists as a directory; returns the parent index.
    fn ensure_parent(&mut self, name: &str, raw: &str) -> Result<usize> {
        let mut parent = 0;
        let mut end = 0;
        while let Some(pos) = name[end..].find('/') {
            let prefix = &name[..end + pos];
            end += pos + 1;
            parent = match self.toc.by_name.get(prefix) {
                Some(&i) => {
                    let kind = self.toc.entries[i].kind;
                    if kind != EntryKind::Dir {
                        return Err(Error::ParentNotDirectory {
                            name: raw.chars().take(300).collect(),
                            parent: prefix.to_string(),
                            parent_kind: kind.as_str(),
                        });
                    }
                    i
                }
                None => {
                    let i = self.toc.entries.len();
                    if i >= self.limits.max_entries {
                        return Err(Error::TooManyEntries {
                            limit: self.limits.max_entries,
                        });
                    }
                    let Some(left) = self.implied_name_budget.checked_sub(prefix.len() as u64)
                    else {
                        return Err(Error::ImpliedDirectories {
                            name: raw.chars().take(300).collect(),
                        });
                    };
                    self.implied_name_budget = left;
                    self.toc
                        .entries
                        .push(TocEntry::new_dir(prefix.to_string(), parent));
                    self.toc.entries[parent].children.push(i);
                    self.toc.entries[parent].num_link += 1;
                    self.toc.by_name.insert(prefix.to_string(), i);
                    i
                }
            };
        }
        Ok(parent)
    }

    fn finish(mut self) -> Result<Toc> {
        // Each chunk's compressed range ends where the next member starts (or the TOC).
        let mut offsets: Vec<u64> = self
            .toc
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| c.offset))
            .collect();
        offsets.push(self.toc.toc_offset);
        offsets.sort_unstable();
        offsets.dedup();
        for e in &mut self.toc.entries {
            for c in &mut e.chunks {
                let next = offsets.partition_point(|&o| o <= c.offset);
                let next = offsets.get(next).copied().unwrap_or(self.toc.toc_offset);
                // Whatever lies beyond a chunk's member up to the next chunk (the headers of
                // entries without content, or a hostile gigabyte) is never needed: the
                // chunk decodes from a prefix of its member.
                let limit = max_compressed_span(c.inner_offset + c.size);
                c.compressed_end = next.min(c.offset.saturating_add(limit));
            }
        }
        let Toc {
            ref mut entries, ..
        } = self.toc;
        let names: Vec<String> = entries.iter().map(|e| e.base_name().to_string()).collect();
        for e in entries.iter_mut() {
            e.children.sort_by(|a, b| names[*a].cmp(&names[*b]));
        }
        Ok(self.toc)
    }
}

fn carry_name(seen: &mut HashMap<u32, String>, id: u32, name: &str) -> String {
    if name.is_empty() {
        seen.get(&id).cloned().unwrap_or_default()
    } else {
        seen.insert(id, name.to_string());
        name.to_string()
    }
}

fn set_attrs(
    e: &mut TocEntry,
    je: &JsonEntry,
    mtime: i64,
    mtime_nanos: u32,
    user_name: String,
    group_name: String,
) {
    e.mode = je.mode & 0o7777;
    e.uid = je.uid;
    e.gid = je.gid;
    e.user_name = user_name;
    e.group_name = group_name;
    e.mtime = mtime;
    e.mtime_nanos = mtime_nanos;
    e.xattrs = je.xattrs.clone();
    if e.kind == EntryKind::Symlink {
        e.link_name = je.link_name.clone();
    }
}
