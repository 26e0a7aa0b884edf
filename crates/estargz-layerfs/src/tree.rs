//! The inode table: the TOC turned into what the kernel sees.

use std::collections::BTreeMap;

use estargz_format::{EntryKind, Toc, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What a node is, as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Character device (whiteouts are 0/0 character devices).
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    /// TOC entry holding this inode's attributes and content; `None` for whiteouts.
    pub entry: Option<usize>,
    /// Kind.
    pub kind: NodeKind,
    /// Children of a directory: name -> inode number, sorted by name.
    pub children: Vec<(Box<str>, u64)>,
    /// Parent inode (the root is its own parent).
    pub parent: u64,
    /// Whether the directory is opaque for overlayfs.
    pub opaque: bool,
    /// Attributes for whiteouts (which have no TOC entry of their own).
    pub whiteout_of: Option<usize>,
}

/// The inode table of one layer. Inode `n` is `nodes[n - 1]`; the root is inode 1.
#[derive(Debug)]
pub struct Tree {
    /// The nodes.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// Builds the inode table for `toc`.
    pub fn build(toc: &Toc) -> Tree {
        let entries = toc.entries();
        // Inode per TOC entry that carries its own inode (hardlinks resolve to their
        // target's); whiteouts get inodes of their own.
        let mut ino_of = vec![0u64; entries.len()];
        let mut nodes: Vec<Node> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.kind == EntryKind::Hardlink {
                continue;
            }
            let kind = match e.kind {
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::Reg if e.base_name().starts_with(WHITEOUT_PREFIX) && e.size == 0 => {
                    NodeKind::Char
                }
                EntryKind::Reg => NodeKind::File,
                EntryKind::Symlink => NodeKind::Symlink,
                EntryKind::Char => NodeKind::Char,
                EntryKind::Block => NodeKind::Block,
                EntryKind::Fifo => NodeKind::Fifo,
                EntryKind::Hardlink => continue,
            };
            let whiteout = e.kind == EntryKind::Reg && kind == NodeKind::Char;
            nodes.push(Node {
                entry: if whiteout { None } else { Some(i) },
                kind,
                children: Vec::new(),
                parent: 1,
                opaque: false,
                whiteout_of: whiteout.then_some(i),
            });
            ino_of[i] = nodes.len() as u64;
        }
        for (i, e) in entries.iter().enumerate() {
            if e.kind == EntryKind::Hardlink {
                ino_of[i] = ino_of[toc.resolve(i)];
            }
        }
        // Children, with whiteouts renamed and markers hidden.
        for (i, e) in entries.iter().enumerate() {
            if e.kind != EntryKind::Dir {
                continue;
            }
            let dir_ino = ino_of[i];
            let mut children: BTreeMap<Box<str>, u64> = BTreeMap::new();
            for &c in &e.children {
                let child = &entries[c];
                let name = child.base_name();
                if i == 0 && (name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK) {
                    continue;
                }
                if name == OPAQUE_MARKER {
                    nodes[(dir_ino - 1) as usize].opaque = true;
                    continue;
                }
                let ino = ino_of[c];
                let shown = match name.strip_prefix(WHITEOUT_PREFIX) {
                    Some(hidden) if nodes[(ino - 1) as usize].whiteout_of.is_some() => hidden,
                    _ => name,
                };
                // A real entry wins over a whiteout of the same name.
                if nodes[(ino - 1) as usize].whiteout_of.is_some() && children.contains_key(shown) {
                    continue;
                }
                children.insert(shown.into(), ino);
                if child.kind == EntryKind::Dir {
                    nodes[(ino - 1) as usize].parent = dir_ino;
                }
            }
            nodes[(dir_ino - 1) as usize].children = children.into_iter().collect();
        }
        Tree { nodes }
    }

    /// The node for inode `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    /// The child `name` of directory `ino`.
    pub fn child(&self, ino: u64, name: &str) -> Option<u64> {
        let n = self.node(ino)?;
        n.children
            .binary_search_by(|(k, _)| (**k).cmp(name))
            .ok()
            .map(|i| n.children[i].1)
    }
}
