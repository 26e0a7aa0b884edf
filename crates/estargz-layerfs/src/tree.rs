//! The inode table: the TOC turned into what the kernel sees, in a compact form.
//!
//! A mounted layer keeps only this table, not the TOC it came from: a large image has
//! hundreds of thousands of entries per layer, and the validated TOC (owned strings per path,
//! user and group names, a name index, per-entry vectors) costs several hundred bytes per
//! entry. Here every inode is one fixed-size record; names and symlink targets live in one
//! string arena; directory entries and chunks live in one flat array each, addressed by
//! ranges; the rare extended attributes sit in a side table. Offsets are `u32`: the TOC JSON
//! is at most `u32::MAX` bytes (the format crate refuses larger ones), and every name, entry
//! and chunk here comes from a distinct part of that text.

use std::collections::{BTreeMap, HashMap, HashSet};

use estargz_format::elf::Needs;
use estargz_format::{
    Chunk, EntryKind, Sha256Digest, Toc, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Whether an extended attribute of the TOC is shown. overlayfs's own attributes other
/// than `opaque` (`redirect`, `metacopy`, `origin`, ...) are dropped: in a lower layer they
/// would make overlayfs take a file's content or a directory's entries from another path,
/// of this image or (where data-only lower layers are stacked, see `local`) of the node's
/// chunk cache; a layer's tar has no business carrying them.
fn kept_xattr(name: &str) -> bool {
    !name.starts_with("trusted.overlay.") || name == "trusted.overlay.opaque"
}

/// What a node is, as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Dir,
    File,
    Symlink,
    /// Character device (whiteouts are 0/0 character devices).
    Char,
    Block,
    Fifo,
}

/// One inode's attributes, and where its children, chunks or link target are.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub size: u64,
    pub mtime: i64,
    pub mtime_nanos: u32,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Device number (`makedev(major, minor)`).
    pub rdev: u32,
    /// Parent directory (the root is its own parent; for files, the first directory that
    /// lists them).
    pub parent: u32,
    /// Directories: range in `dirents`; files: range in `chunks`; symlinks: range in
    /// `strings`.
    first: u32,
    count: u32,
    pub kind: NodeKind,
    /// Directory marked opaque for overlayfs.
    pub opaque: bool,
    /// An overlayfs whiteout (a `.wh.NAME` entry shown as a 0/0 character device `NAME`).
    pub whiteout: bool,
    /// Whether the node has extended attributes in the side table.
    has_xattrs: bool,
}

/// Extended attributes of one node: (name, value) pairs.
type XattrList = Box<[(Box<str>, Box<[u8]>)]>;

/// A directory entry: a name in the arena and the inode it names.
#[derive(Debug, Clone, Copy)]
struct Dirent {
    name_at: u32,
    name_len: u32,
    ino: u32,
}

/// The inode table of one layer. Inode `n` is `nodes[n - 1]`; the root is inode 1.
#[derive(Debug)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
    dirents: Vec<Dirent>,
    chunks: Vec<Chunk>,
    /// The file (inode) each chunk of `chunks` belongs to.
    chunk_owner: Vec<u32>,
    /// Indexes into `chunks` in blob order (by offset), for fetching neighbours in the blob.
    blob_order: Vec<u32>,
    strings: String,
    xattrs: HashMap<u32, XattrList>,
    /// Whole-file sha256 of the files of more than one chunk, as the TOC gives it: the key
    /// of their content assembled as one file for passthrough (a file of one chunk has its
    /// chunk's digest).
    file_digests: HashMap<u32, Sha256Digest>,
    /// What the ELF objects among the files load, where the TOC records it (a few
    /// hundred entries in an image with programs; none in one converted without it).
    elf_needs: HashMap<u32, Box<Needs>>,
    /// The files the TOC marks as `ar` archives (`arArchive`): read in pieces, not
    /// fetched ahead. Few (a side table keeps them out of every node's size).
    archives: HashSet<u32>,
    /// Of each file with a page profile (`estargz optimize`'s; none in other layers): the
    /// offsets in the file of the chunks the TOC marks `readAtStart` (a recorded start read
    /// them), ascending.
    read_at_start: HashMap<u32, Box<[u64]>>,
    /// Compressed bytes before `.prefetch.landmark`'s content, if the layer has one.
    pub prefetch_size: Option<u64>,
    /// Sum of regular file sizes.
    pub total_size: u64,
}

/// `usize` to `u32` for sizes bounded by the TOC's length (see the module docs).
fn small(n: usize) -> u32 {
    debug_assert!(n <= u32::MAX as usize);
    n as u32
}

impl Tree {
    /// Builds the inode table for `toc`.
    pub fn build(toc: &Toc) -> Tree {
        let entries = toc.entries();
        let mut tree = Tree {
            nodes: Vec::with_capacity(entries.len()),
            dirents: Vec::with_capacity(entries.len()),
            chunks: Vec::with_capacity(toc.chunk_count()),
            chunk_owner: Vec::with_capacity(toc.chunk_count()),
            blob_order: Vec::new(),
            strings: String::new(),
            xattrs: HashMap::new(),
            file_digests: HashMap::new(),
            elf_needs: HashMap::new(),
            archives: HashSet::new(),
            read_at_start: HashMap::new(),
            prefetch_size: toc.prefetch_size(),
            total_size: 0,
        };
        // An inode per TOC entry that carries its own (hardlinks resolve to their target's);
        // whiteouts get inodes of their own.
        let mut ino_of = vec![0u32; entries.len()];
        for (i, e) in entries.iter().enumerate() {
            let whiteout = e.kind == EntryKind::Reg
                && e.size == 0
                && e.base_name().starts_with(WHITEOUT_PREFIX);
            let kind = match e.kind {
                EntryKind::Hardlink => continue,
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::Reg if whiteout => NodeKind::Char,
                EntryKind::Reg => NodeKind::File,
                EntryKind::Symlink => NodeKind::Symlink,
                EntryKind::Char => NodeKind::Char,
                EntryKind::Block => NodeKind::Block,
                EntryKind::Fifo => NodeKind::Fifo,
            };
            let ino = small(tree.nodes.len() + 1);
            let (first, count) = match kind {
                NodeKind::File => {
                    tree.total_size += e.size;
                    let at = tree.chunks.len();
                    tree.chunks.extend_from_slice(&e.chunks);
                    tree.chunk_owner.resize(tree.chunks.len(), ino);
                    if let (true, Some(d)) = (e.chunks.len() > 1, e.digest) {
                        tree.file_digests.insert(ino, d);
                    }
                    if let Some(needs) = &e.elf_needs {
                        tree.elf_needs.insert(ino, needs.clone());
                    }
                    if e.ar_archive {
                        tree.archives.insert(ino);
                    }
                    let marked: Box<[u64]> = e
                        .read_at_start
                        .iter()
                        .filter_map(|&i| e.chunks.get(i as usize).map(|c| c.chunk_offset))
                        .collect();
                    if !marked.is_empty() {
                        tree.read_at_start.insert(ino, marked);
                    }
                    (small(at), small(e.chunks.len()))
                }
                NodeKind::Symlink => tree.intern(&e.link_name),
                _ => (0, 0),
            };
            let kept = || e.xattrs.iter().filter(|(k, _)| kept_xattr(k));
            let has_xattrs = !whiteout && kept().next().is_some();
            if has_xattrs {
                let list = kept().map(|(k, v)| (k.as_str().into(), v.as_slice().into()));
                tree.xattrs.insert(ino, list.collect());
            }
            let device = matches!(e.kind, EntryKind::Char | EntryKind::Block);
            tree.nodes.push(Node {
                size: if kind == NodeKind::File { e.size } else { 0 },
                mtime: e.mtime,
                mtime_nanos: e.mtime_nanos,
                mode: if whiteout { 0 } else { e.mode },
                uid: e.uid,
                gid: e.gid,
                nlink: if whiteout { 1 } else { e.num_link },
                rdev: if device {
                    libc::makedev(e.dev_major, e.dev_minor) as u32
                } else {
                    0
                },
                parent: 1,
                first,
                count,
                kind,
                opaque: false,
                whiteout,
                has_xattrs,
            });
            ino_of[i] = ino;
        }
        for (i, e) in entries.iter().enumerate() {
            if e.kind == EntryKind::Hardlink {
                ino_of[i] = ino_of[toc.resolve(i)];
            }
        }
        // Directory entries, with whiteouts renamed and markers hidden.
        let mut parent_set = vec![false; tree.nodes.len()];
        for (i, e) in entries.iter().enumerate() {
            if e.kind != EntryKind::Dir {
                continue;
            }
            let dir = ino_of[i];
            let mut children: BTreeMap<&str, u32> = BTreeMap::new();
            for &c in &e.children {
                let name = entries[c].base_name();
                if i == 0 && (name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK) {
                    continue;
                }
                if name == OPAQUE_MARKER {
                    tree.nodes[(dir - 1) as usize].opaque = true;
                    continue;
                }
                let ino = ino_of[c];
                let is_whiteout = tree.nodes[(ino - 1) as usize].whiteout;
                let shown = match name.strip_prefix(WHITEOUT_PREFIX) {
                    Some(hidden) if is_whiteout => hidden,
                    _ => name,
                };
                // A real entry wins over a whiteout of the same name.
                if is_whiteout && children.contains_key(shown) {
                    continue;
                }
                children.insert(shown, ino);
                if !std::mem::replace(&mut parent_set[(ino - 1) as usize], true) {
                    tree.nodes[(ino - 1) as usize].parent = dir;
                }
            }
            let at = small(tree.dirents.len());
            for (name, ino) in &children {
                let (name_at, name_len) = tree.intern(name);
                tree.dirents.push(Dirent {
                    name_at,
                    name_len,
                    ino: *ino,
                });
            }
            let node = &mut tree.nodes[(dir - 1) as usize];
            node.first = at;
            node.count = small(children.len());
        }
        let mut order: Vec<u32> = (0..small(tree.chunks.len())).collect();
        order.sort_by_key(|&i| {
            let c = &tree.chunks[i as usize];
            (c.offset, c.inner_offset)
        });
        tree.blob_order = order;
        tree.nodes.shrink_to_fit();
        tree.dirents.shrink_to_fit();
        tree.strings.shrink_to_fit();
        tree
    }

    fn intern(&mut self, s: &str) -> (u32, u32) {
        let at = small(self.strings.len());
        self.strings.push_str(s);
        (at, small(s.len()))
    }

    fn string(&self, at: u32, len: u32) -> &str {
        &self.strings[at as usize..(at + len) as usize]
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node for inode `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    /// A directory's entries in name order: (name, inode).
    pub fn children(&self, node: &Node) -> impl Iterator<Item = (&str, u64)> + '_ {
        let range = if node.kind == NodeKind::Dir {
            node.first as usize..(node.first + node.count) as usize
        } else {
            0..0
        };
        self.dirents[range]
            .iter()
            .map(|d| (self.string(d.name_at, d.name_len), d.ino as u64))
    }

    /// The child `name` of directory `ino`.
    pub fn child(&self, ino: u64, name: &str) -> Option<u64> {
        let n = self.node(ino).filter(|n| n.kind == NodeKind::Dir)?;
        let list = &self.dirents[n.first as usize..(n.first + n.count) as usize];
        list.binary_search_by(|d| self.string(d.name_at, d.name_len).cmp(name))
            .ok()
            .map(|i| list[i].ino as u64)
    }

    /// A regular file's chunks in file order.
    pub fn chunks(&self, node: &Node) -> &[Chunk] {
        match node.kind {
            NodeKind::File => &self.chunks[node.first as usize..(node.first + node.count) as usize],
            _ => &[],
        }
    }

    /// The whole-file sha256 the TOC gives for file `ino` of more than one chunk.
    pub fn file_digest(&self, ino: u64) -> Option<Sha256Digest> {
        self.file_digests.get(&(ino as u32)).copied()
    }

    /// Whether the layer's prefetch brings chunk `c` of file `ino` with what starts read:
    /// it lies before the prefetch landmark (a prioritized file's), and, of a file with a
    /// page profile, a recorded start read it (the rest of such a file comes after, see
    /// the scheduler's `profile_rest_spans`); else of an archive, it is the first chunk (a
    /// link reads the symbol index there, then only the members it needs).
    pub fn is_prioritized(&self, ino: u64, c: &Chunk) -> bool {
        let before_landmark = self
            .prefetch_size
            .is_some_and(|end| c.compressed_end <= end);
        before_landmark
            && match self.read_at_start.get(&(ino as u32)) {
                Some(marked) => marked.binary_search(&c.chunk_offset).is_ok(),
                None => c.chunk_offset == 0 || !self.is_archive(ino),
            }
    }

    /// Whether regular file `ino` has a page profile: the TOC marks the chunks a recorded
    /// start read of it (`readAtStart`); they are fetched first, the rest after.
    pub fn is_profiled(&self, ino: u64) -> bool {
        self.read_at_start.contains_key(&(ino as u32))
    }

    /// Whether any file of the layer has a page profile.
    pub fn has_profiles(&self) -> bool {
        !self.read_at_start.is_empty()
    }

    /// Whether regular file `ino` is one the TOC marks as an `ar` archive (a static
    /// library): read in pieces, not fetched ahead.
    pub fn is_archive(&self, ino: u64) -> bool {
        self.archives.contains(&(ino as u32))
    }

    /// Every chunk of the layer, with its file's inode, in blob order.
    pub fn chunks_in_blob_order(&self) -> impl Iterator<Item = (u64, Chunk)> + '_ {
        self.blob_order.iter().map(|&i| self.chunk_by_index(i))
    }

    /// Number of chunks in the layer.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The `n`th chunk in blob order, with its file's inode.
    pub fn blob_chunk(&self, n: usize) -> Option<(u64, Chunk)> {
        self.blob_order.get(n).map(|&i| self.chunk_by_index(i))
    }

    /// The position in blob order of the chunk whose member starts at `offset` (the
    /// first, if several chunks share the member).
    pub fn blob_position(&self, offset: u64) -> Option<usize> {
        let n = self
            .blob_order
            .partition_point(|&i| self.chunks[i as usize].offset < offset);
        self.blob_order
            .get(n)
            .filter(|&&i| self.chunks[i as usize].offset == offset)
            .map(|_| n)
    }

    fn chunk_by_index(&self, i: u32) -> (u64, Chunk) {
        (self.chunk_owner[i as usize] as u64, self.chunks[i as usize])
    }

    /// What regular file `ino` loads, if it is an ELF object whose TOC entry says.
    pub fn elf_needs(&self, ino: u64) -> Option<&Needs> {
        self.elf_needs.get(&(ino as u32)).map(|n| &**n)
    }

    /// A symlink's target.
    pub fn link_target(&self, node: &Node) -> Option<&str> {
        (node.kind == NodeKind::Symlink).then(|| self.string(node.first, node.count))
    }

    /// A node's extended attributes from the TOC.
    pub fn xattrs(&self, ino: u64) -> &[(Box<str>, Box<[u8]>)] {
        match self.node(ino) {
            Some(n) if n.has_xattrs => self.xattrs.get(&(ino as u32)).map_or(&[], |l| l),
            _ => &[],
        }
    }

    /// One path of inode `ino` (for messages; slow: scans the parents' entries).
    pub fn path(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != 1 && parts.len() < 4096 {
            let Some(node) = self.node(at) else { break };
            let parent = node.parent as u64;
            match self
                .node(parent)
                .and_then(|p| self.children(p).find(|(_, c)| *c == at))
            {
                Some((name, _)) => parts.push(name.to_string()),
                None => break,
            }
            at = parent;
        }
        parts.reverse();
        parts.join("/")
    }

    /// Heap bytes held by the table (for the memory benchmark and metrics).
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.dirents.capacity() * std::mem::size_of::<Dirent>()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + (self.chunk_owner.capacity() + self.blob_order.capacity()) * 4
            + self.file_digests.capacity() * (4 + 32)
            + self.archives.capacity() * 4
            + self
                .read_at_start
                .values()
                .map(|m| 4 + 16 + m.len() * 8)
                .sum::<usize>()
            + self
                .elf_needs
                .values()
                .map(|n| {
                    std::mem::size_of::<Needs>()
                        + 16
                        + n.interp.as_ref().map_or(0, |i| i.len())
                        + n.needed
                            .iter()
                            .chain(&n.runpath)
                            .map(|s| s.len() + 24)
                            .sum::<usize>()
                })
                .sum::<usize>()
            + self.strings.capacity()
            + self
                .xattrs
                .values()
                .flat_map(|l| l.iter())
                .map(|(k, v)| k.len() + v.len() + 32)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions};

    fn tree() -> Tree {
        let mut blob = Vec::new();
        let tar = estargz_testutil::synthetic_tar();
        convert(&tar[..], &mut blob, &ConvertOptions::default(), &()).unwrap();
        let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
        Tree::build(reader.toc())
    }

    fn lookup(t: &Tree, path: &str) -> u64 {
        path.split('/')
            .try_fold(1, |dir, name| t.child(dir, name))
            .unwrap_or_else(|| panic!("{path} not found"))
    }

    #[test]
    fn overlay_attributes_of_the_toc_are_dropped_but_opaque() {
        let mut b = tar::Builder::new(Vec::new());
        estargz_testutil::pax(
            &mut b,
            &[
                ("SCHILY.xattr.trusted.overlay.redirect", b"/ab/secret"),
                ("SCHILY.xattr.trusted.overlay.metacopy", b""),
                ("SCHILY.xattr.user.kept", b"1"),
            ],
        );
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"hello"[..]).unwrap();
        estargz_testutil::pax(&mut b, &[("SCHILY.xattr.trusted.overlay.redirect", b"/x")]);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, "d/", &[][..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        convert(&tar[..], &mut blob, &ConvertOptions::default(), &()).unwrap();
        let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
        let t = Tree::build(reader.toc());
        let names = |p: &str| -> Vec<String> {
            t.xattrs(lookup(&t, p))
                .iter()
                .map(|(k, _)| k.to_string())
                .collect()
        };
        assert_eq!(names("f"), ["user.kept"]);
        assert!(names("d").is_empty());
        assert!(!t.node(lookup(&t, "d")).unwrap().has_xattrs);
        // The synthetic layer's opaque directory by attribute keeps it.
        let s = tree();
        let opaque: Vec<_> = (1..=s.len() as u64)
            .flat_map(|i| s.xattrs(i).iter().map(|(k, _)| k.to_string()))
            .filter(|k| k == "trusted.overlay.opaque")
            .collect();
        assert!(!opaque.is_empty());
    }

    #[test]
    fn paths_links_whiteouts_and_markers() {
        let t = tree();
        let ino = lookup(&t, "données/日本語 ファイル.txt");
        assert_eq!(t.path(ino), "données/日本語 ファイル.txt");
        // A hardlink is the same inode as its target.
        assert_eq!(lookup(&t, "etc/hostname.link"), lookup(&t, "etc/hostname"));
        let link = t.node(lookup(&t, "etc/dangling")).unwrap();
        assert!(t.link_target(link).is_some_and(|s| !s.is_empty()));
        // `.wh.deleted-file` is shown as `deleted-file`, a 0/0 character device.
        let wh = t.node(lookup(&t, "var/deleted-file")).unwrap();
        assert!(wh.whiteout && wh.kind == NodeKind::Char && wh.rdev == 0 && wh.mode == 0);
        assert_eq!(t.child(lookup(&t, "var"), ".wh.deleted-file"), None);
        // The opaque marker is hidden and marks its directory.
        let opaque = lookup(&t, "var/opaque");
        assert!(t.node(opaque).unwrap().opaque);
        assert_eq!(t.child(opaque, ".wh..wh..opq"), None);
        // Children are sorted and complete; files have chunks covering their size.
        let root = t.node(1).unwrap();
        let names: Vec<&str> = t.children(root).map(|(n, _)| n).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        let f = t.node(lookup(&t, "etc/hostname")).unwrap();
        assert_eq!(t.chunks(f).iter().map(|c| c.size).sum::<u64>(), f.size);
        assert_eq!(t.child(ino, "x"), None, "a file has no children");
    }
}
