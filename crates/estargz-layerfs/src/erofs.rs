//! A writer of EROFS images holding metadata and small files, for serving a local layer
//! without FUSE (see `local`).
//!
//! Why our own writer rather than `mkfs.erofs` over a staging tree: erofs-utils 1.5 (what
//! Debian 12 ships) reads and hashes every byte of every file it is given, even of sparse
//! files standing in for content that lives elsewhere: 2-5 s for the gcc image's tree,
//! where writing the metadata takes milliseconds; and the staging tree itself costs a
//! file, an owner, a mode, times and attributes per entry on disk. The subset written here
//! is small: uncompressed, 4 KiB blocks, extended (64-byte) inodes, inline extended
//! attributes only, directories, symlink targets and small files' content inline after
//! their inode where they fit in its block (in blocks of their own otherwise), and other
//! regular files as one hole (a chunk-based file whose only chunk is unmapped: it reads as
//! zeros, overlayfs reads its content from the data layer its redirect names). Layout, from the
//! kernel's `fs/erofs/erofs_fs.h`: the superblock at byte 1024 of block 0, inodes from
//! block 1 (`meta_blkaddr`; an inode's `nid` is its offset there / 32, the root's first,
//! in the order given), then the blocks of larger directories and symlinks.

use std::io::{self, Write};

const BLOCK: u64 = 4096;
const BLOCK_BITS: u8 = 12;
const MAGIC: u32 = 0xE0F5_E1E2;
/// Superblock `feature_incompat`: chunk-based files.
const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `i_format`: extended inode (bit 0), data layout in bits 1-3.
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_CHUNK_BASED: u16 = 4;
const EXTENDED: u16 = 1;
const INODE_SIZE: u64 = 64;
/// An unmapped chunk of a chunk-based file's block map (a hole).
const NULL_ADDR: u32 = u32::MAX;
/// Longest name (`EROFS_NAME_LEN`).
const NAME_MAX: usize = 255;
/// Largest chunk: `chunkbits - blkszbits` is a 5-bit field.
const MAX_CHUNK_BITS: u32 = BLOCK_BITS as u32 + 31;

/// What an inode is.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A directory: its entries (name, index of the inode), without `.` and `..`.
    Dir(Vec<(Vec<u8>, usize)>),
    /// A regular file of `size` bytes, all of them a hole (content elsewhere).
    File,
    /// A regular file whose content the image holds (a small file: right after its inode
    /// where it fits in the inode's block, in blocks of its own otherwise).
    Data(Vec<u8>),
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A character or block device, fifo or socket, by `mode`; `rdev` for devices.
    Special(u32),
}

/// One inode to write.
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    /// `st_mode`, file type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nanos: u32,
    pub nlink: u32,
    /// Size of a regular file.
    pub size: u64,
    pub kind: Kind,
    /// Extended attributes by full name (`user.x`, `trusted.overlay.redirect`, ...).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Why an image cannot hold a tree.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    /// An extended attribute EROFS cannot store (namespace, or size).
    #[error("extended attribute {0:?} cannot be stored in EROFS")]
    Xattr(String),
    /// Extended attributes of one inode taking more room than EROFS can count.
    #[error("extended attributes of {0} bytes are more than EROFS can hold for one inode")]
    Xattrs(usize),
    /// A name longer than EROFS allows.
    #[error("a name of {0} bytes is longer than EROFS allows (255)")]
    Name(usize),
    /// The image would exceed EROFS's 32-bit block addresses.
    #[error("the image would be too large")]
    TooLarge,
    /// Writing it failed.
    #[error("writing the image: {0}")]
    Io(#[from] io::Error),
}

/// The name index and suffix EROFS stores an attribute name as.
fn xattr_name(name: &str) -> Option<(u8, &str)> {
    const PREFIXES: [(&str, u8); 3] = [("user.", 1), ("trusted.", 4), ("security.", 6)];
    match name {
        "system.posix_acl_access" => return Some((2, "")),
        "system.posix_acl_default" => return Some((3, "")),
        _ => {}
    }
    PREFIXES
        .iter()
        .find_map(|(p, i)| name.strip_prefix(p).map(|rest| (*i, rest)))
}

/// The inline attribute area of an inode: header and entries, 4-byte aligned.
fn xattr_area(xattrs: &[(String, Vec<u8>)]) -> Result<Vec<u8>, ImageError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    // erofs_xattr_ibody_header: name filter (unused), shared count, reserved.
    let mut out = vec![0u8; 12];
    for (name, value) in xattrs {
        let bad = || ImageError::Xattr(name.clone());
        let (index, suffix) = xattr_name(name).ok_or_else(bad)?;
        let len = u8::try_from(suffix.len()).map_err(|_| bad())?;
        let size = u16::try_from(value.len()).map_err(|_| bad())?;
        out.push(len);
        out.push(index);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(suffix.as_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    // `i_xattr_icount` counts the area in 4-byte units in 16 bits: a larger area (five
    // values of 60 KiB) would wrap it, and the kernel would take attribute bytes for the
    // overlay redirect that follows.
    if (out.len() - 12) / 4 + 1 > u16::MAX as usize {
        return Err(ImageError::Xattrs(out.len()));
    }
    Ok(out)
}

/// `i_xattr_icount` of an attribute area of `len` bytes.
fn xattr_icount(len: usize) -> u16 {
    match len {
        0 => 0,
        n => ((n - 12) / 4 + 1) as u16,
    }
}

/// EROFS's directory entry file types.
fn file_type(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 1,
        libc::S_IFDIR => 2,
        libc::S_IFCHR => 3,
        libc::S_IFBLK => 4,
        libc::S_IFIFO => 5,
        libc::S_IFSOCK => 6,
        libc::S_IFLNK => 7,
        _ => 0,
    }
}

/// The blocks of a directory: its entries with `.` and `..`, sorted by name, packed into
/// blocks (entries first, then their names; each block's first `nameoff` tells how many
/// entries it holds). Returns the blocks and the directory's size (the last block counts
/// only the bytes it uses).
fn dir_blocks(entries: &[(&[u8], u64, u8)]) -> Result<(Vec<u8>, u64), ImageError> {
    // The kernel refuses a directory holding a longer name as corrupted.
    if let Some((name, _, _)) = entries.iter().find(|(n, _, _)| n.len() > NAME_MAX) {
        return Err(ImageError::Name(name.len()));
    }
    let mut out = Vec::new();
    let mut i = 0;
    let mut last_used = 0;
    while i < entries.len() {
        // As many entries as fit: 12 bytes of dirent and the name each.
        let (mut n, mut used) = (0, 0);
        while i + n < entries.len() {
            let need = 12 + entries[i + n].0.len();
            if used + need > BLOCK as usize {
                break;
            }
            used += need;
            n += 1;
        }
        let mut block = vec![0u8; BLOCK as usize];
        let mut nameoff = 12 * n;
        for (k, (name, nid, ft)) in entries[i..i + n].iter().enumerate() {
            let d = &mut block[12 * k..12 * k + 12];
            d[..8].copy_from_slice(&nid.to_le_bytes());
            d[8..10].copy_from_slice(&(nameoff as u16).to_le_bytes());
            d[10] = *ft;
            block[nameoff..nameoff + name.len()].copy_from_slice(name);
            nameoff += name.len();
        }
        out.extend_from_slice(&block);
        last_used = used;
        i += n;
    }
    let size = out.len() as u64 - BLOCK + last_used as u64;
    Ok((out, size))
}

/// Writes an image of `inodes` (the root is `inodes[0]`) to `out`.
pub(crate) fn write(inodes: &[Inode], out: &mut impl Write) -> Result<(), ImageError> {
    // Inode placement: each 32-byte aligned, not crossing a block where it fits in one.
    // A directory, symlink or small file whose data fits in the inode's block keeps it
    // there, right after the inode and its attributes (`FLAT_INLINE`): one block read less
    // per lookup.
    let mut areas = Vec::with_capacity(inodes.len());
    let mut nids = Vec::with_capacity(inodes.len());
    let mut at = 0u64; // offset in the inode area
    for inode in inodes {
        let xattrs = xattr_area(&inode.xattrs)?;
        let map = matches!(inode.kind, Kind::File) && inode.size > 0;
        let data_len = match &inode.kind {
            // Every entry's dirent and name, `.` and `..` included.
            Kind::Dir(children) => {
                let named: u64 = children.iter().map(|(n, _)| 12 + n.len() as u64).sum();
                named + (12 + 1) + (12 + 2)
            }
            Kind::Symlink(bytes) | Kind::Data(bytes) => bytes.len() as u64,
            _ => 0,
        };
        let fixed = INODE_SIZE + xattrs.len() as u64 + if map { 4 } else { 0 };
        let inline = data_len > 0 && fixed + data_len <= BLOCK;
        let len = fixed + if inline { data_len } else { 0 };
        if at % BLOCK + len > BLOCK && len <= BLOCK {
            at = at.next_multiple_of(BLOCK);
        }
        nids.push(at / 32);
        areas.push((xattrs, map, inline));
        at = (at + len).next_multiple_of(32);
    }
    let meta_blocks = at.div_ceil(BLOCK).max(1);
    // Data blocks of directories, symlinks and files with content, after the inodes.
    let mut data: Vec<u8> = Vec::new();
    let mut placed = Vec::with_capacity(inodes.len()); // (blkaddr, size) per inode
    let first_data = 1 + meta_blocks;
    let mut parent = vec![0usize; inodes.len()];
    for (i, inode) in inodes.iter().enumerate() {
        if let Kind::Dir(children) = &inode.kind {
            for (_, c) in children {
                if matches!(inodes[*c].kind, Kind::Dir(_)) {
                    parent[*c] = i;
                }
            }
        }
    }
    // Inline data by inode.
    let mut inline_data: Vec<Vec<u8>> = vec![Vec::new(); inodes.len()];
    for (i, inode) in inodes.iter().enumerate() {
        let blkaddr = first_data + data.len() as u64 / BLOCK;
        let inline = areas[i].2;
        let size = match &inode.kind {
            Kind::Dir(children) => {
                let mut entries: Vec<(&[u8], u64, u8)> =
                    vec![(b".", nids[i], 2), (b"..", nids[parent[i]], 2)];
                entries.extend(
                    children
                        .iter()
                        .map(|(n, c)| (&n[..], nids[*c], file_type(inodes[*c].mode))),
                );
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let (blocks, size) = dir_blocks(&entries)?;
                if inline {
                    inline_data[i] = blocks[..size as usize].to_vec();
                } else {
                    data.extend_from_slice(&blocks);
                }
                size
            }
            Kind::Symlink(bytes) | Kind::Data(bytes) if inline => {
                inline_data[i] = bytes.clone();
                bytes.len() as u64
            }
            Kind::Symlink(bytes) | Kind::Data(bytes) => {
                data.extend_from_slice(bytes);
                data.resize(data.len().next_multiple_of(BLOCK as usize), 0);
                bytes.len() as u64
            }
            Kind::File => inode.size,
            Kind::Special(_) => 0,
        };
        placed.push((blkaddr, size));
    }
    let blocks = first_data + data.len() as u64 / BLOCK;
    let blocks = u32::try_from(blocks).map_err(|_| ImageError::TooLarge)?;
    let root_nid = u16::try_from(nids[0]).map_err(|_| ImageError::TooLarge)?;

    // Block 0: the superblock at 1024.
    let mut sb = vec![0u8; BLOCK as usize];
    let s = &mut sb[1024..1024 + 128];
    s[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    s[12] = BLOCK_BITS;
    s[14..16].copy_from_slice(&root_nid.to_le_bytes());
    s[16..24].copy_from_slice(&(inodes.len() as u64).to_le_bytes());
    s[36..40].copy_from_slice(&blocks.to_le_bytes());
    s[40..44].copy_from_slice(&1u32.to_le_bytes()); // meta_blkaddr
    s[80..84].copy_from_slice(&INCOMPAT_CHUNKED_FILE.to_le_bytes());
    out.write_all(&sb)?;
    // The inode area.
    let mut meta = vec![0u8; (meta_blocks * BLOCK) as usize];
    for (i, inode) in inodes.iter().enumerate() {
        let (xattrs, map, inline) = &areas[i];
        let (blkaddr, size) = placed[i];
        let off = (nids[i] * 32) as usize;
        let layout = match (*map, *inline) {
            (true, _) => LAYOUT_CHUNK_BASED,
            (_, true) => LAYOUT_FLAT_INLINE,
            _ => LAYOUT_FLAT_PLAIN,
        };
        let i_u: u32 = match &inode.kind {
            Kind::Dir(_) | Kind::Symlink(_) | Kind::Data(_) if *inline => 0,
            Kind::Dir(_) | Kind::Symlink(_) | Kind::Data(_) => {
                u32::try_from(blkaddr).map_err(|_| ImageError::TooLarge)?
            }
            // One chunk covering the file: chunkbits - blkszbits in the low 5 bits.
            Kind::File if *map => {
                let bits = (64 - (inode.size - 1).leading_zeros()).max(BLOCK_BITS as u32);
                if bits > MAX_CHUNK_BITS {
                    return Err(ImageError::TooLarge);
                }
                bits - BLOCK_BITS as u32
            }
            Kind::File => 0,
            Kind::Special(rdev) => *rdev,
        };
        let d = &mut meta[off..off + INODE_SIZE as usize];
        d[0..2].copy_from_slice(&(EXTENDED | layout << 1).to_le_bytes());
        d[2..4].copy_from_slice(&xattr_icount(xattrs.len()).to_le_bytes());
        d[4..6].copy_from_slice(&(inode.mode as u16).to_le_bytes());
        d[8..16].copy_from_slice(&size.to_le_bytes());
        d[16..20].copy_from_slice(&i_u.to_le_bytes());
        d[20..24].copy_from_slice(&(i as u32 + 1).to_le_bytes()); // i_ino
        d[24..28].copy_from_slice(&inode.uid.to_le_bytes());
        d[28..32].copy_from_slice(&inode.gid.to_le_bytes());
        d[32..40].copy_from_slice(&(inode.mtime as u64).to_le_bytes());
        d[40..44].copy_from_slice(&inode.mtime_nanos.to_le_bytes());
        d[44..48].copy_from_slice(&inode.nlink.to_le_bytes());
        let x = off + INODE_SIZE as usize;
        meta[x..x + xattrs.len()].copy_from_slice(xattrs);
        let m = x + xattrs.len();
        if *map {
            meta[m..m + 4].copy_from_slice(&NULL_ADDR.to_le_bytes());
        }
        meta[m..m + inline_data[i].len()].copy_from_slice(&inline_data[i]);
    }
    out.write_all(&meta)?;
    out.write_all(&data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_blocks_hold_sorted_entries_and_their_names() {
        let names: Vec<Vec<u8>> = (0..600)
            .map(|i| format!("file-{i:04}").into_bytes())
            .collect();
        let entries: Vec<(&[u8], u64, u8)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (&n[..], i as u64, 1))
            .collect();
        let (blocks, size) = dir_blocks(&entries).unwrap();
        // 21 bytes per entry: 195 fit a block.
        assert_eq!(blocks.len(), 4 * BLOCK as usize);
        assert_eq!(size, 3 * BLOCK + (600 - 3 * 195) as u64 * 21);
        let first = u16::from_le_bytes([blocks[8], blocks[9]]);
        assert_eq!(first, 12 * 195);
        assert_eq!(&blocks[first as usize..first as usize + 9], b"file-0000");
        let long = vec![b'x'; 256];
        assert!(matches!(
            dir_blocks(&[(&long[..], 1, 1)]),
            Err(ImageError::Name(256))
        ));
    }

    #[test]
    fn attribute_names_use_erofs_prefix_indexes() {
        let area = xattr_area(&[("user.k".into(), b"v".to_vec())]).unwrap();
        assert_eq!(area.len(), 12 + 8); // 4 + "k" + "v", aligned
        assert_eq!(&area[12..16], &[1, 1, 1, 0]);
        assert_eq!(xattr_icount(area.len()), 3);
        assert!(xattr_area(&[("system.other".into(), vec![])]).is_err());
        // Four values of 60 KiB fit the 16-bit count of 4-byte units; five do not.
        let values = |n: usize| -> Vec<(String, Vec<u8>)> {
            (0..n)
                .map(|i| (format!("user.{i}"), vec![0; 60 << 10]))
                .collect()
        };
        let four = xattr_area(&values(4)).unwrap();
        assert_eq!(xattr_icount(four.len()) as usize, (four.len() - 12) / 4 + 1);
        assert!(matches!(xattr_area(&values(5)), Err(ImageError::Xattrs(_))));
        assert_eq!(xattr_name("system.posix_acl_access"), Some((2, "")));
        assert_eq!(xattr_name("security.capability"), Some((6, "capability")));
    }
}
