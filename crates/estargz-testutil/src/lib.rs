//! Test support shared by the crates' tests: a synthetic tar that covers every entry type and
//! edge case a layer can hold, and an oracle that checks an eStargz blob against the tar it
//! was made from, entry by entry and byte by byte.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::io::Read;

mod proxy;
mod stub;

use std::io::Write;

pub use proxy::{BlobRequest, Fault, FaultProxy};
pub use stub::{StubAnswer, StubRequest, StubServer};

use estargz_format::{normalize_name, EntryKind, EstargzReader, ReadAt};
use estargz_oci::{media_types, Descriptor, Digest, OciLayout, Platform};

/// Chunk size the synthetic layer is designed around (files straddle it).
pub const SMALL_CHUNK: u64 = 64 * 1024;

/// Appends a PAX extended header with `records` (applying to the next entry).
pub fn pax(b: &mut tar::Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
    let mut data = Vec::new();
    for (k, v) in records {
        // "len key=value\n", where len counts itself.
        let body_len = k.len() + v.len() + 3;
        let mut len = body_len + 1;
        while format!("{len}").len() + body_len != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/x").unwrap();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &data[..]).unwrap();
}

struct E<'a> {
    path: &'a str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    user: &'a str,
    group: &'a str,
    mtime: u64,
    link: &'a str,
    dev: (u32, u32),
    data: &'a [u8],
}

impl Default for E<'_> {
    fn default() -> Self {
        E {
            path: "",
            kind: tar::EntryType::Regular,
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: "root",
            group: "root",
            mtime: 1_700_000_000,
            link: "",
            dev: (0, 0),
            data: b"",
        }
    }
}

fn add(b: &mut tar::Builder<Vec<u8>>, e: E<'_>) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(e.kind);
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_username(e.user).unwrap();
    h.set_groupname(e.group).unwrap();
    h.set_mtime(e.mtime);
    h.set_size(e.data.len() as u64);
    if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
        h.set_device_major(e.dev.0).unwrap();
        h.set_device_minor(e.dev.1).unwrap();
    }
    if e.link.is_empty() {
        b.append_data(&mut h, e.path, e.data).unwrap();
    } else {
        b.append_link(&mut h, e.path, e.link).unwrap();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so content does not compress away.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A 64-bit little-endian x86-64 ELF object (an executable with `interp`, else a shared
/// object) whose dynamic section names `needed` (in order) and `runpath`, placed after
/// `pad` bytes of noise: with `pad` larger than a chunk, the dynamic section lies in
/// another chunk than the headers, as in a large executable. It loads nothing and runs
/// nowhere; it is what a loader, or something fetching for one, reads first.
pub fn elf_object(
    interp: Option<&str>,
    needed: &[&str],
    runpath: Option<&str>,
    pad: usize,
) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let phnum: u64 = if interp.is_some() { 3 } else { 2 };
    let interp_at = 64 + 56 * phnum;
    let interp_bytes: Vec<u8> = interp.map_or(Vec::new(), |i| [i.as_bytes(), b"\0"].concat());
    let strtab_at = interp_at + interp_bytes.len() as u64;
    let mut strtab = vec![0u8];
    let mut name_at = Vec::new();
    for n in needed.iter().chain(runpath.iter()) {
        name_at.push(strtab.len() as u64);
        strtab.extend_from_slice(n.as_bytes());
        strtab.push(0);
    }
    let dynamic_at = strtab_at + strtab.len() as u64 + pad as u64;
    let mut dynamic: Vec<(u64, u64)> = name_at[..needed.len()].iter().map(|&at| (1, at)).collect();
    if runpath.is_some() {
        dynamic.push((29, name_at[needed.len()]));
    }
    dynamic.extend([(5, BASE + strtab_at), (10, strtab.len() as u64), (0, 0)]);
    let size = dynamic_at + 16 * dynamic.len() as u64;

    let mut o = Vec::new();
    let u16le = |o: &mut Vec<u8>, v: u16| o.extend_from_slice(&v.to_le_bytes());
    let u32le = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_le_bytes());
    let u64le = |o: &mut Vec<u8>, v: u64| o.extend_from_slice(&v.to_le_bytes());
    o.extend_from_slice(b"\x7fELF\x02\x01\x01");
    o.resize(16, 0);
    u16le(&mut o, if interp.is_some() { 2 } else { 3 });
    u16le(&mut o, 62); // EM_X86_64
    u32le(&mut o, 1);
    u64le(&mut o, BASE); // entry
    u64le(&mut o, 64); // phoff
    u64le(&mut o, 0); // shoff
    u32le(&mut o, 0);
    for v in [64u16, 56, phnum as u16, 64, 0, 0] {
        u16le(&mut o, v);
    }
    let phdr = |o: &mut Vec<u8>, kind: u32, offset: u64, filesz: u64| {
        u32le(o, kind);
        u32le(o, 4);
        for v in [offset, BASE + offset, BASE + offset, filesz, filesz, 8] {
            u64le(o, v);
        }
    };
    phdr(&mut o, 1, 0, size); // PT_LOAD: the whole object
    if interp.is_some() {
        phdr(&mut o, 3, interp_at, interp_bytes.len() as u64);
    }
    phdr(&mut o, 2, dynamic_at, size - dynamic_at);
    o.extend_from_slice(&interp_bytes);
    o.extend_from_slice(&strtab);
    o.extend_from_slice(&noise(pad, size));
    for (tag, val) in dynamic {
        u64le(&mut o, tag);
        u64le(&mut o, val);
    }
    o
}

/// A tar holding every entry type and edge case a container layer can hold: empty and huge
/// files across many chunks (of [`SMALL_CHUNK`] and of 4 MiB), files of exactly one chunk and
/// one byte more, long and non-ASCII names, long link targets, hardlinks (to files, in other
/// directories, to symlinks), symlinks (relative, absolute, dangling), character and block
/// devices, fifos, xattrs (text, binary, opaque directories), whiteouts, setuid, setgid and
/// sticky modes, large uids and gids, and extreme mtimes.
pub fn synthetic_tar() -> Vec<u8> {
    use tar::EntryType::*;
    let mut b = tar::Builder::new(Vec::new());
    let dir = |p| E {
        path: p,
        kind: Directory,
        mode: 0o755,
        ..Default::default()
    };
    add(&mut b, dir("./"));
    add(&mut b, dir("etc/"));
    add(
        &mut b,
        E {
            path: "etc/hostname",
            data: b"estargz\n",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "etc/empty",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "tmp/",
            kind: Directory,
            mode: 0o1777,
            mtime: 0,
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "srv/",
            kind: Directory,
            mode: 0o2750,
            uid: 1000,
            gid: 1000,
            user: "alice",
            group: "staff",
            ..Default::default()
        },
    );
    let one_chunk = noise(SMALL_CHUNK as usize, 1);
    let one_more = noise(SMALL_CHUNK as usize + 1, 2);
    let many = noise(SMALL_CHUNK as usize * 7 + 123, 3);
    let huge = noise(9 * 1024 * 1024 + 17, 4);
    let zeros = vec![0u8; 5 * 1024 * 1024];
    for (p, d) in [
        ("srv/one-chunk", &one_chunk),
        ("srv/one-chunk-plus-one", &one_more),
        ("srv/many-chunks", &many),
        ("srv/huge.bin", &huge),
        ("srv/zeros.img", &zeros),
    ] {
        add(
            &mut b,
            E {
                path: p,
                uid: 1000,
                gid: 1000,
                user: "alice",
                group: "staff",
                data: d,
                ..Default::default()
            },
        );
    }
    add(
        &mut b,
        E {
            path: "usr/bin/sudo-like",
            mode: 0o4755,
            data: b"#!/bin/sh\necho root\n",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "usr/bin/setgid-tool",
            mode: 0o2711,
            gid: 42,
            group: "shadow",
            data: b"\x7fELF fake",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "usr/share/big-ids",
            uid: 4_000_000,
            gid: 3_000_000,
            user: "",
            group: "",
            mtime: 4_102_444_800, // 2100-01-01
            data: b"ids beyond ustar's octal fields\n",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "usr/share/epoch",
            mtime: 0,
            mode: 0o000,
            data: b"mode 000 and mtime 0\n",
            ..Default::default()
        },
    );
    let long_dir = "usr/share/".to_string() + &"d".repeat(120) + "/";
    let long_name = long_dir.clone() + &"n".repeat(200) + ".txt";
    add(&mut b, dir(&long_dir));
    add(
        &mut b,
        E {
            path: &long_name,
            data: b"a name longer than 100 and 255 bytes in total\n",
            ..Default::default()
        },
    );
    add(&mut b, dir("données/"));
    add(
        &mut b,
        E {
            path: "données/日本語 ファイル.txt",
            data: "non-ASCII: ü é 日本語 🦀\n".as_bytes(),
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "données/spaces and\ttabs",
            data: b"whitespace in names\n",
            ..Default::default()
        },
    );
    // Links.
    add(
        &mut b,
        E {
            path: "etc/hostname.link",
            kind: Link,
            link: "etc/hostname",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "srv/huge-again",
            kind: Link,
            link: "./srv/huge.bin",
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "lib64",
            kind: Symlink,
            link: "usr/lib64",
            mode: 0o777,
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "etc/passwd-abs",
            kind: Symlink,
            link: "/etc/passwd",
            mode: 0o777,
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "etc/dangling",
            kind: Symlink,
            link: "../nowhere/at/all",
            mode: 0o777,
            ..Default::default()
        },
    );
    let long_target = "/".to_string() + &"t".repeat(150) + "/target";
    add(
        &mut b,
        E {
            path: "etc/long-link",
            kind: Symlink,
            link: &long_target,
            mode: 0o777,
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "etc/link-to-symlink",
            kind: Link,
            link: "etc/dangling",
            ..Default::default()
        },
    );
    // Devices and fifos.
    add(&mut b, dir("dev/"));
    add(
        &mut b,
        E {
            path: "dev/null",
            kind: Char,
            mode: 0o666,
            dev: (1, 3),
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "dev/sda",
            kind: Block,
            mode: 0o660,
            gid: 6,
            group: "disk",
            dev: (8, 0),
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "dev/big-dev",
            kind: Char,
            mode: 0o600,
            dev: (511, 1_048_575),
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "run/initctl",
            kind: Fifo,
            mode: 0o600,
            ..Default::default()
        },
    );
    // Xattrs (PAX SCHILY.xattr), text and binary, and an opaque directory.
    pax(
        &mut b,
        &[
            ("SCHILY.xattr.user.comment", b"hello xattr"),
            (
                "SCHILY.xattr.security.capability",
                b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ),
        ],
    );
    add(
        &mut b,
        E {
            path: "usr/bin/ping",
            mode: 0o755,
            data: b"ping with cap_net_raw",
            ..Default::default()
        },
    );
    pax(&mut b, &[("SCHILY.xattr.trusted.overlay.opaque", b"y")]);
    add(
        &mut b,
        E {
            path: "var/opaque/",
            kind: Directory,
            mode: 0o755,
            ..Default::default()
        },
    );
    // Fractional PAX mtime (rounded to the second).
    pax(&mut b, &[("mtime", b"1700000000.75")]);
    add(
        &mut b,
        E {
            path: "var/opaque/fractional-mtime",
            data: b"x",
            ..Default::default()
        },
    );
    // Whiteouts, as layers carry them in tar.
    add(
        &mut b,
        E {
            path: "var/.wh.deleted-file",
            mode: 0o600,
            ..Default::default()
        },
    );
    add(
        &mut b,
        E {
            path: "var/opaque/.wh..wh..opq",
            mode: 0o600,
            ..Default::default()
        },
    );
    // A directory repeated later with other attributes: tar applies the later one.
    add(
        &mut b,
        E {
            path: "etc/",
            kind: Directory,
            mode: 0o750,
            mtime: 1_600_000_000,
            ..Default::default()
        },
    );
    b.into_inner().unwrap()
}

/// What a tar entry means once extracted, for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Entry kind.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, whole seconds (the TOC's precision).
    pub mtime: i64,
    /// Sub-second part of the modification time (from a PAX `mtime` record).
    pub mtime_nanos: u32,
    /// Symlink target or normalized hardlink target.
    pub link: String,
    /// Device numbers.
    pub dev: (u32, u32),
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// File content (regular files and hardlinks to them).
    pub content: Vec<u8>,
}

/// Reads a tar (or tar.gz) the way an extractor would: later entries replace earlier ones,
/// repeated directories take the later attributes. Keys are normalized names.
pub fn expected_from_tar(tar_bytes: &[u8]) -> BTreeMap<String, Expected> {
    let raw: Box<dyn Read + '_> = if tar_bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(tar_bytes))
    } else {
        Box::new(tar_bytes)
    };
    let mut ar = tar::Archive::new(raw);
    let mut out: BTreeMap<String, Expected> = BTreeMap::new();
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let h = entry.header().clone();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let norm = normalize_name(&name).unwrap();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Char => EntryKind::Char,
            tar::EntryType::Block => EntryKind::Block,
            tar::EntryType::Fifo => EntryKind::Fifo,
            tar::EntryType::XGlobalHeader => continue,
            _ => EntryKind::Reg,
        };
        let mut xattrs = BTreeMap::new();
        let mut mtime = h.mtime().unwrap_or(0) as i64;
        let mut mtime_nanos = 0u32;
        if let Some(exts) = entry.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                let key = ext.key().unwrap().to_string();
                if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(x.to_string(), ext.value_bytes().to_vec());
                }
                if key == "mtime" {
                    // "secs[.fraction]", parsed exactly (no floating point).
                    let v = ext.value().unwrap();
                    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
                    mtime = int.parse().unwrap();
                    let digits: String =
                        frac.chars().chain(std::iter::repeat('0')).take(9).collect();
                    mtime_nanos = digits.parse().unwrap();
                    if mtime < 0 && mtime_nanos > 0 {
                        mtime -= 1;
                        mtime_nanos = 1_000_000_000 - mtime_nanos;
                    }
                }
            }
        }
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap())
            .unwrap_or_default();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        let (link, content) = match kind {
            EntryKind::Hardlink => {
                let t = normalize_name(&link).unwrap();
                let c = out.get(&t).map(|e| e.content.clone()).unwrap_or_default();
                (t, c)
            }
            EntryKind::Symlink => (link, Vec::new()),
            _ => (String::new(), content),
        };
        let e = Expected {
            kind,
            mode: h.mode().unwrap() & 0o7777,
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mtime,
            mtime_nanos,
            link,
            dev: (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            ),
            xattrs,
            content,
        };
        if norm.is_empty() {
            continue;
        }
        out.insert(norm, e);
    }
    out
}

/// Checks that every entry of `tar_bytes` reads identically through the eStargz reader, and
/// that the blob holds nothing else but landmarks and implied directories. Panics with the
/// first difference. Returns the number of entries compared.
pub fn assert_matches_tar<R: ReadAt>(reader: &EstargzReader<R>, tar_bytes: &[u8]) -> usize {
    let expected = expected_from_tar(tar_bytes);
    let toc = reader.toc();
    for (name, exp) in &expected {
        let idx = toc
            .lookup(name)
            .unwrap_or_else(|| panic!("{name:?} is in the tar but not in the eStargz TOC"));
        let entry = toc.entry(idx);
        assert_eq!(entry.kind, exp.kind, "{name:?}: kind");
        let attrs = toc.entry(toc.resolve(idx));
        if exp.kind != EntryKind::Hardlink {
            assert_eq!(entry.mode, exp.mode, "{name:?}: mode");
            assert_eq!(entry.uid, exp.uid, "{name:?}: uid");
            assert_eq!(entry.gid, exp.gid, "{name:?}: gid");
            if entry.mtime_nanos == 0 && exp.mtime_nanos != 0 {
                // A writer that keeps whole seconds only (the reference rounds): accept the
                // rounded time, never anything else.
                let rounded = exp.mtime + i64::from(exp.mtime_nanos >= 500_000_000);
                assert_eq!(entry.mtime, rounded, "{name:?}: mtime (rounded to seconds)");
            } else {
                assert_eq!(
                    (entry.mtime, entry.mtime_nanos),
                    (exp.mtime, exp.mtime_nanos),
                    "{name:?}: mtime"
                );
            }
            assert_eq!(entry.xattrs, exp.xattrs, "{name:?}: xattrs");
        }
        match exp.kind {
            EntryKind::Symlink => assert_eq!(entry.link_name, exp.link, "{name:?}: target"),
            EntryKind::Hardlink => {
                assert_eq!(entry.link_name, exp.link, "{name:?}: hardlink target");
                let t = toc.lookup(&exp.link).expect("hardlink target in TOC");
                assert_eq!(toc.resolve(idx), toc.resolve(t), "{name:?}: same inode");
            }
            EntryKind::Char | EntryKind::Block => {
                assert_eq!((entry.dev_major, entry.dev_minor), exp.dev, "{name:?}: dev")
            }
            _ => {}
        }
        if attrs.kind == EntryKind::Reg {
            assert_eq!(attrs.size, exp.content.len() as u64, "{name:?}: size");
            let data = reader.read_file(idx).unwrap();
            assert!(data == exp.content, "{name:?}: content differs");
            // Ranged reads across chunk boundaries.
            if data.len() > 3 {
                let mid = data.len() as u64 / 2 - 1;
                let mut buf = vec![0u8; (data.len() / 2).min(200_000)];
                let n = reader.read_at(idx, mid, &mut buf).unwrap();
                assert_eq!(&buf[..n], &data[mid as usize..mid as usize + n], "{name:?}");
            }
        }
    }
    for e in toc.entries() {
        if e.name.is_empty() || e.toc_index.is_none() {
            continue;
        }
        let landmark = e.name == estargz_format::PREFETCH_LANDMARK
            || e.name == estargz_format::NO_PREFETCH_LANDMARK;
        assert!(
            landmark || expected.contains_key(&e.name),
            "{:?} is in the TOC but not in the tar",
            e.name
        );
    }
    expected.len()
}

/// gzip-compresses `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Writes an image (config + manifest) of the given layer tars into `layout`, alternating
/// gzip and uncompressed layers; returns the manifest descriptor (with its platform).
pub fn write_oci_image(layout: &OciLayout, layers: &[Vec<u8>], arch: &str) -> Descriptor {
    write_oci_image_with(layout, layers, arch, r#"{"Env":["PATH=/bin"]}"#)
}

/// [`write_oci_image`] with `run_config` as the config's `config` object (Entrypoint,
/// Cmd, Env, WorkingDir, User), as JSON.
pub fn write_oci_image_with(
    layout: &OciLayout,
    layers: &[Vec<u8>],
    arch: &str,
    run_config: &str,
) -> Descriptor {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, tar) in layers.iter().enumerate() {
        diff_ids.push(format!("\"{}\"", Digest::sha256_of(tar)));
        // Alternate compressed and uncompressed layers.
        let (blob, mt) = if i % 2 == 0 {
            (gzip(tar), media_types::OCI_LAYER_GZIP)
        } else {
            (tar.clone(), media_types::OCI_LAYER_TAR)
        };
        let (d, s) = layout.write_blob(&blob).unwrap();
        descs.push(Descriptor::new(mt, d, s));
    }
    let config = format!(
        "{{\"architecture\":\"{arch}\",\"os\":\"linux\",\"config\":{run_config},\
         \"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}},\"history\":[{{\"created_by\":\"test\"}}]}}",
        diff_ids.join(",")
    );
    let (cd, cs) = layout.write_blob(config.as_bytes()).unwrap();
    let manifest = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{}\",\"config\":{},\"layers\":{},\"annotations\":{{\"keep\":\"me\"}}}}",
        media_types::OCI_MANIFEST,
        serde_json::to_string(&Descriptor::new(media_types::OCI_CONFIG, cd, cs)).unwrap(),
        serde_json::to_string(&descs).unwrap()
    );
    let (md, ms) = layout.write_blob(manifest.as_bytes()).unwrap();
    let mut d = Descriptor::new(media_types::OCI_MANIFEST, md, ms);
    d.platform = Some(Platform {
        architecture: arch.into(),
        os: "linux".into(),
        variant: None,
        os_version: None,
        os_features: None,
    });
    d
}

/// The `estargz` CLI in the same target directory as `bin` (another binary of the
/// workspace, such as a test's `CARGO_BIN_EXE_*`); panics saying how to build it if it is
/// missing (`cargo test --workspace` builds every binary).
pub fn cli_beside(bin: &std::path::Path) -> std::path::PathBuf {
    let estargz = bin.with_file_name("estargz");
    assert!(
        estargz.is_file(),
        "{} is missing: build the CLI first (cargo build -p estargz-cli) or run the workspace's tests",
        estargz.display()
    );
    estargz
}

/// The repository's test scripts (`testdata/scripts`).
pub fn scripts_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/scripts")
}

/// A real registry (Debian's `docker-registry`) on 127.0.0.1 with a free port, stopped and
/// removed when dropped. Starting it fails the test if the package is missing.
pub struct TestRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The token endpoint, for a registry started with [`TestRegistry::start_with_tokens`].
    pub token_realm: Option<String>,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry; with `basic_auth` it requires that user and password.
    pub fn start(basic_auth: Option<(&str, &str)>) -> TestRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(scripts_dir().join("registry.sh"))
            .arg("start")
            .arg(dir.path());
        if let Some((u, p)) = basic_auth {
            cmd.arg(format!("{u}:{p}"));
        }
        let out = cmd.output().expect("running registry.sh");
        assert!(
            out.status.success(),
            "registry.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addr = String::from_utf8(out.stdout).unwrap().trim().to_string();
        TestRegistry {
            addr,
            token_realm: None,
            dir,
        }
    }

    /// Starts a registry that requires bearer tokens from a token server which grants them
    /// to `user`:`password` (basic auth at the token endpoint).
    pub fn start_with_tokens(user: &str, password: &str) -> TestRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = std::process::Command::new("bash")
            .arg(scripts_dir().join("registry.sh"))
            .arg("start-token")
            .arg(dir.path())
            .arg(format!("{user}:{password}"))
            .output()
            .expect("running registry.sh");
        assert!(
            out.status.success(),
            "registry.sh start-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let addr = lines.next().expect("address").trim().to_string();
        let realm = lines.next().expect("realm").trim().to_string();
        TestRegistry {
            addr,
            token_realm: Some(realm),
            dir,
        }
    }

    /// Starts a registry serving HTTPS with a certificate from a test CA (`ca.crt` in
    /// [`TestRegistry::dir`]); with `mtls` it also requires a client certificate
    /// (`client.crt`, `client.key` there).
    pub fn start_tls(mtls: bool) -> TestRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(scripts_dir().join("registry.sh"))
            .arg("start-tls")
            .arg(dir.path());
        if mtls {
            cmd.arg("mtls");
        }
        let out = cmd.output().expect("running registry.sh");
        assert!(
            out.status.success(),
            "registry.sh start-tls failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addr = String::from_utf8(out.stdout).unwrap().trim().to_string();
        TestRegistry {
            addr,
            token_realm: None,
            dir,
        }
    }

    /// The registry's working directory (certificates, storage, logs).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// How many tokens the token server has issued.
    pub fn tokens_issued(&self) -> u64 {
        let realm = self.token_realm.as_deref().expect("a token registry");
        let hostport = realm
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("host");
        let mut conn = std::net::TcpStream::connect(hostport).expect("token server");
        use std::io::Read as _;
        write!(conn, "GET /stats HTTP/1.0\r\nHost: {hostport}\r\n\r\n").expect("request");
        let mut resp = String::new();
        conn.read_to_string(&mut resp).expect("response");
        let body = resp.split("\r\n\r\n").nth(1).expect("body");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["tokens"].as_u64().expect("count")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(scripts_dir().join("registry.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Fails the calling test at once, saying what to do, unless this machine gives what the
/// tests with real components need: root (FUSE and overlayfs mounts, containerd, runc, apt
/// for missing packages) and `/dev/fuse`. A missing prerequisite is a loud failure, never a
/// skip; the tests that need none run with `cargo test --lib`.
pub fn require_root_and_fuse(test: &str) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0",
        "{test}: needs root (euid is {euid}); it mounts FUSE and overlayfs and runs real \
         components (containerd, runc, a registry). Run `make test` as root; \
         `cargo test --workspace --lib` runs the tests that need nothing"
    );
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "{test}: needs /dev/fuse; load the fuse module (`modprobe fuse`)"
    );
}

/// An overlayfs mount of `lowers` (topmost first) with a writable upper layer, as a
/// container has, in a directory of its own; unmounted when dropped, even when the test
/// fails. Needs root.
pub struct Overlay {
    dir: tempfile::TempDir,
    /// Where the overlay is mounted.
    pub merged: std::path::PathBuf,
}

impl Overlay {
    /// Mounts the overlay; panics if that fails.
    pub fn new(lowers: &[&std::path::Path]) -> Overlay {
        Overlay::with_data(lowers, &[])
    }

    /// Mounts the overlay with `data` as data-only lower layers after `lowers` (for lower
    /// layers served without FUSE); panics if that fails.
    pub fn with_data(lowers: &[&std::path::Path], data: &[&std::path::Path]) -> Overlay {
        let dir = tempfile::tempdir().expect("temp dir");
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d).expect("overlay directories");
        }
        let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let mut lower = lower.join(":");
        for d in data {
            lower = format!("{lower}::{}", d.display());
        }
        if !data.is_empty() {
            lower.push_str(",metacopy=on");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower,
            upper.display(),
            work.display()
        );
        let status = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting overlayfs with {options}");
        Overlay { dir, merged }
    }

    /// The upper (writable) layer.
    pub fn upper(&self) -> std::path::PathBuf {
        self.dir.path().join("upper")
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.merged)
            .status();
    }
}

/// Runs `testdata/scripts/NAME` with `args` and `env`; panics with its output if it fails.
/// Returns its standard output. The scripts start real components: they need root.
pub fn run_script(name: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> String {
    require_root_and_fuse(name);
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(scripts_dir().join(name)).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds a real Debian root filesystem tar (`testdata/scripts/rootfs.sh`) at
/// `dir/rootfs.tar` and returns its bytes.
pub fn real_rootfs_tar(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("rootfs.tar");
    run_script("rootfs.sh", &[path.as_os_str()], &[]);
    std::fs::read(&path).expect("reading the rootfs tar")
}

/// A one-file tar layer.
pub fn one_file_tar(name: &str, content: &[u8]) -> Vec<u8> {
    files_tar(&[(name, content)])
}

/// A tar layer of regular files, in the order given (parent directories implied).
pub fn files_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        append_file(&mut b, name, content);
    }
    b.into_inner().expect("tar")
}

/// Appends a regular file of mode 0644 to `b`, as [`files_tar`] writes each (for a tar
/// built up entry by entry, with other kinds of entries between).
pub fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    b.append_data(&mut h, path, data).expect("tar");
}

/// A tar layer of regular files (path, mode, content), then symlinks (path, target), in
/// the order given.
pub fn files_and_links_tar(files: &[(&str, u32, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(path, mode, data) in files {
        add(
            &mut b,
            E {
                path,
                mode,
                data,
                ..Default::default()
            },
        );
    }
    for (path, link) in links {
        add(
            &mut b,
            E {
                path,
                kind: tar::EntryType::Symlink,
                mode: 0o777,
                link,
                ..Default::default()
            },
        );
    }
    b.into_inner().expect("tar")
}

/// A tar layer of `files` small files in directories of 1,000, with the path lengths of a
/// typical Python package tree: the shape of the large layers the scale benchmarks mount.
pub fn many_files_tar(files: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..files.div_ceil(1000) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        let dir = format!("usr/lib/python3/dist-packages/pkg{d:03}/");
        b.append_data(&mut h, &dir, &[][..]).expect("tar");
        for f in 0..(files - d * 1000).min(1000) {
            let data = format!("module {d}/{f}\n");
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append_data(&mut h, format!("{dir}module_{f:05}.py"), data.as_bytes())
                .expect("tar");
        }
    }
    b.into_inner().expect("tar")
}

/// The end of an eStargz blob whose TOC starts at `toc_offset`: the TOC's gzip member (a
/// tar entry `stargz.index.json` holding `json`, declaring `declared` bytes if given) and
/// the footer. Hostile-input tests put any payload before it.
pub fn toc_tail(toc_offset: u64, json: &[u8], declared: Option<u64>) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(estargz_format::TOC_TAR_NAME).unwrap();
    h.set_size(declared.unwrap_or(json.len() as u64));
    h.set_mode(0o644);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(json);
    raw.resize(raw.len().div_ceil(512) * 512 + 1024, 0);
    let mut out = gzip(&raw);
    out.extend_from_slice(&estargz_format::footer_bytes(toc_offset));
    out
}

/// A containerd-style `certs.d` directory holding `REGISTRY/hosts.toml` with `body`.
pub fn hosts_dir(registry: &str, body: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join(registry);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("hosts.toml"), body).unwrap();
    dir
}

/// TOC JSON of `n` empty regular files named `name(0..n)`, without directory entries:
/// the shape of hostile TOCs (deep, long or countless names). Written entry by entry, so
/// a million names cost their JSON, not a `serde_json::Value` each.
pub fn names_toc(n: usize, name: impl Fn(usize) -> String) -> Vec<u8> {
    let mut json = Vec::with_capacity(n * 40);
    json.extend_from_slice(br#"{"version":1,"entries":["#);
    for i in 0..n {
        if i > 0 {
            json.push(b',');
        }
        let e = serde_json::json!({"name": name(i), "type": "reg"});
        json.extend_from_slice(e.to_string().as_bytes());
    }
    json.extend_from_slice(b"]}");
    json
}
