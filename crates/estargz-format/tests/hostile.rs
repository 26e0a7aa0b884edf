//! Hostile and malformed input: every case ends in its own clear error, never a panic, and
//! never in unverified bytes.

use std::io::Write;

use estargz_format::{
    convert, decompress_chunk, decompress_chunk_from, footer_bytes, ConvertOptions, Error,
    EstargzReader, JsonToc, Limits, OpenOptions, Sha256Digest, Toc, FOOTER_SIZE,
};
use estargz_testutil::{synthetic_tar, SMALL_CHUNK};

fn good_blob() -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let opts = ConvertOptions {
        chunk_size: SMALL_CHUNK,
        compression_level: 1,
        threads: 2,
        ..Default::default()
    };
    let info = convert(&synthetic_tar()[..], &mut out, &opts, &()).unwrap();
    (out, info.toc_offset)
}

fn toc_of(blob: &[u8]) -> JsonToc {
    let r = EstargzReader::open(blob, &OpenOptions::default()).unwrap();
    let off = r.footer().toc_offset as usize;
    let member = &blob[off..blob.len() - FOOTER_SIZE];
    let json = estargz_format::decode_toc_member(member, off as u64, &Limits::default()).unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// Rebuilds `blob` with the TOC JSON replaced by `json`.
fn with_toc_json(blob: &[u8], toc_offset: u64, json: &[u8], declared: Option<u64>) -> Vec<u8> {
    let mut out = blob[..toc_offset as usize].to_vec();
    out.extend_from_slice(&estargz_testutil::toc_tail(toc_offset, json, declared));
    out
}

fn with_toc(edit: impl FnOnce(&mut JsonToc)) -> Result<EstargzReader<Vec<u8>>, Error> {
    let (blob, off) = good_blob();
    let mut toc = toc_of(&blob);
    edit(&mut toc);
    let json = serde_json::to_vec(&toc).unwrap();
    EstargzReader::open(
        with_toc_json(&blob, off, &json, None),
        &OpenOptions::default(),
    )
}

fn find(toc: &JsonToc, name: &str) -> usize {
    toc.entries.iter().position(|e| e.name == name).unwrap()
}

#[test]
fn unmodified_toc_is_accepted() {
    let r = with_toc(|_| {}).unwrap();
    r.verify(|_| {}).unwrap();
}

#[test]
fn path_traversal_is_refused() {
    for bad in ["../etc/passwd", "etc/../../x", "/etc/shadow", "a\0b"] {
        let e = with_toc(|t| t.entries[5].name = bad.into()).unwrap_err();
        assert!(matches!(e, Error::PathTraversal { .. }), "{bad}: {e}");
    }
}

#[test]
fn symlinked_parent_is_refused() {
    // lib64 is a symlink in the synthetic layer: nothing may live below it.
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname");
        t.entries[i].name = "lib64/evil".into();
        t.entries.retain(|e| e.name != "etc/hostname.link");
        let lib = t.entries.iter().position(|e| e.name == "lib64").unwrap();
        let evil = t.entries.remove(i);
        t.entries.insert(lib + 1, evil);
    })
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ParentNotDirectory {
                parent_kind: "symlink",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn payload_beyond_the_toc_is_refused() {
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname");
        t.entries[i].offset = u64::MAX / 2;
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::BadEntry { detail, .. } if detail.contains("not before the TOC")),
        "{e}"
    );
}

#[test]
fn overlapping_gapped_and_missing_chunks_are_refused() {
    let shift = with_toc(|t| {
        let i = find(t, "srv/many-chunks");
        t.entries[i + 2].chunk_offset += 1;
    })
    .unwrap_err();
    assert!(
        matches!(&shift, Error::BadEntry { detail, .. } if detail.contains("overlap or leave a gap")),
        "{shift}"
    );
    let missing = with_toc(|t| {
        let i = find(t, "srv/many-chunks");
        t.entries.remove(i + 3);
    })
    .unwrap_err();
    assert!(
        matches!(&missing, Error::BadEntry { detail, .. } if detail.contains("gap")),
        "{missing}"
    );
    let last_missing = with_toc(|t| {
        let i = find(t, "srv/many-chunks");
        t.entries.remove(i + 7);
    })
    .unwrap_err();
    assert!(
        matches!(&last_missing, Error::BadEntry { detail, .. } if detail.contains("cover")),
        "{last_missing}"
    );
    let orphan = with_toc(|t| {
        let i = find(t, "srv/many-chunks");
        let c = t.entries[i + 1].clone();
        t.entries.insert(0, c);
    })
    .unwrap_err();
    assert!(
        matches!(&orphan, Error::BadEntry { detail, .. } if detail.contains("does not follow")),
        "{orphan}"
    );
}

#[test]
fn huge_sizes_are_refused() {
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname");
        t.entries[i].size = 1 << 50;
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::BadEntry { detail, .. } if detail.contains("exceeds the limit")),
        "{e}"
    );
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname");
        t.entries[i].inner_offset = u64::MAX - 3;
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::BadEntry { detail, .. } if detail.contains("exceeds the limit")),
        "{e}"
    );
}

#[test]
fn duplicates_and_bad_hardlinks_are_refused() {
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname");
        let mut dup = t.entries[i].clone();
        dup.name = "./etc/hostname".into();
        t.entries.push(dup);
    })
    .unwrap_err();
    assert!(matches!(e, Error::DuplicateEntry { .. }), "{e}");
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname.link");
        t.entries[i].link_name = "etc/nope".into();
    })
    .unwrap_err();
    assert!(matches!(e, Error::BadHardlink { .. }), "{e}");
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname.link");
        t.entries[i].link_name = "etc".into();
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::BadHardlink { detail, .. } if detail.contains("directory")),
        "{e}"
    );
    // A hardlink to itself (a loop) has no earlier target.
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname.link");
        t.entries[i].link_name = "etc/hostname.link".into();
    })
    .unwrap_err();
    assert!(matches!(e, Error::BadHardlink { .. }), "{e}");
}

#[test]
fn malformed_fields_are_refused() {
    let e = with_toc(|t| t.entries[3].kind = "socket".into()).unwrap_err();
    assert!(matches!(&e, Error::BadEntry { detail, .. } if detail.contains("unknown type")));
    let e = with_toc(|t| t.entries[3].mod_time = "yesterday".into()).unwrap_err();
    assert!(matches!(&e, Error::BadEntry { detail, .. } if detail.contains("RFC 3339")));
    let e = with_toc(|t| t.version = 2).unwrap_err();
    assert!(matches!(e, Error::TocVersion(2)));
    let e = with_toc(|t| {
        let i = find(t, "etc/hostname");
        t.entries[i].chunk_digest = "sha256:nothex".into();
    })
    .unwrap_err();
    assert!(matches!(e, Error::BadDigest { .. }), "{e}");
    let e = with_toc(|t| {
        let i = find(t, "srv/many-chunks");
        t.entries[i + 1].chunk_digest.clear();
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::BadEntry { detail, .. } if detail.contains("cannot be verified")),
        "{e}"
    );
}

#[test]
fn wrong_chunk_digest_never_serves_bytes() {
    let r = with_toc(|t| {
        let i = find(t, "etc/hostname");
        t.entries[i].chunk_digest = Sha256Digest::of(b"something else").to_string();
    })
    .unwrap();
    let idx = r.toc().lookup("etc/hostname").unwrap();
    let mut buf = [0u8; 4];
    let e = r.read_at(idx, 0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::ChunkDigestMismatch { .. }), "{e}");
    assert_eq!(
        buf, [0u8; 4],
        "no byte of an unverified chunk may be returned"
    );
    assert!(matches!(
        r.verify(|_| {}),
        Err(Error::ChunkDigestMismatch { .. })
    ));
}

#[test]
fn swapped_payload_offsets_are_caught_by_digests() {
    let r = with_toc(|t| {
        let a = find(t, "etc/hostname");
        let b = find(t, "usr/bin/ping");
        let (oa, ob) = (t.entries[a].offset, t.entries[b].offset);
        t.entries[a].offset = ob;
        t.entries[b].offset = oa;
    })
    .unwrap();
    let idx = r.toc().lookup("etc/hostname").unwrap();
    let e = r.read_file(idx).unwrap_err();
    assert!(matches!(e, Error::ChunkDigestMismatch { .. }), "{e}");
}

#[test]
fn toc_digest_must_match_when_expected() {
    let (blob, _) = good_blob();
    let e = EstargzReader::open(
        &blob[..],
        &OpenOptions {
            expected_toc_digest: Some(Sha256Digest::of(b"other")),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::TocDigestMismatch { .. }), "{e}");
}

#[test]
fn oversized_tocs_are_refused() {
    let (blob, off) = good_blob();
    let small = OpenOptions {
        limits: Limits {
            max_toc_size: 1024,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = EstargzReader::open(&blob[..], &small).unwrap_err();
    assert!(matches!(e, Error::TocTooLarge { .. }), "{e}");
    // A tar header that declares a gigantic TOC is refused before reading it.
    let json = serde_json::to_vec(&toc_of(&blob)).unwrap();
    let lying = with_toc_json(&blob, off, &json, Some(1 << 40));
    let e = EstargzReader::open(&lying[..], &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::TocTooLarge { .. }), "{e}");
    // A gzip bomb in place of the TOC: decoding stops at the bound.
    let zeros = vec![b' '; 8 << 20];
    let mut bomb = br#"{"version":1,"entries":[]}"#.to_vec();
    bomb.extend_from_slice(&zeros);
    let boom = with_toc_json(&blob, off, &bomb, None);
    let opts = OpenOptions {
        limits: Limits {
            max_toc_size: 1 << 20,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = EstargzReader::open(&boom[..], &opts).unwrap_err();
    assert!(matches!(e, Error::TocTooLarge { .. }), "{e}");
}

/// A chunk whose gzip member is all of `member`, declared to hold `content`.
fn member_chunk(member: &[u8], content: &[u8]) -> estargz_format::Chunk {
    estargz_format::Chunk {
        offset: 0,
        compressed_end: member.len() as u64,
        inner_offset: 0,
        chunk_offset: 0,
        size: content.len() as u64,
        digest: Sha256Digest::of(content),
    }
}

#[test]
fn gzip_bomb_chunk_decodes_only_what_it_declares() {
    // A member of 64 MiB of zeros compresses to ~64 KiB; the chunk claims 10 bytes.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![0u8; 64 << 20]).unwrap();
    let member = gz.finish().unwrap();
    let chunk = member_chunk(&member, &[0u8; 10]);
    assert_eq!(
        decompress_chunk(&member, "bomb", &chunk).unwrap(),
        vec![0u8; 10]
    );
    let short = estargz_format::Chunk {
        size: 100,
        digest: Sha256Digest::of(&[0u8; 100]),
        ..chunk
    };
    let e = decompress_chunk(&member[..12], "bomb", &short).unwrap_err();
    assert!(matches!(e, Error::BadChunk { .. }), "{e}");
}

#[test]
fn a_chunk_decoded_from_a_reader_tells_bad_data_from_a_failing_reader() {
    let data = b"the chunk's bytes".repeat(1000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&data).unwrap();
    let member = gz.finish().unwrap();
    let chunk = member_chunk(&member, &data);
    // Whole, and in pieces of one byte: the same verified chunk.
    assert_eq!(
        decompress_chunk_from(&member[..], "c", &chunk).unwrap(),
        data
    );
    let one_by_one = std::io::BufReader::with_capacity(1, &member[..]);
    assert_eq!(
        decompress_chunk_from(one_by_one, "c", &chunk).unwrap(),
        data
    );
    // Cut short, or with a byte changed: bad data, never the bytes.
    let e = decompress_chunk_from(&member[..member.len() / 2], "c", &chunk).unwrap_err();
    assert!(matches!(e, Error::BadChunk { .. }), "{e}");
    let mut changed = member.clone();
    changed[member.len() / 2] ^= 0x40;
    let e = decompress_chunk_from(&changed[..], "c", &chunk).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadChunk { .. } | Error::ChunkDigestMismatch { .. }
        ),
        "{e}"
    );
    // A reader that fails (a deadline) after some bytes: its error, kind and all.
    struct Failing<'a>(&'a [u8]);
    impl std::io::Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "deadline",
                ));
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let e = decompress_chunk_from(Failing(&member[..member.len() / 2]), "c", &chunk).unwrap_err();
    assert!(
        matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
        "{e}"
    );
}

#[test]
fn broken_footers_and_truncation_are_reported() {
    let (blob, _) = good_blob();
    let e = EstargzReader::open(&blob[..blob.len() - 1], &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::BadFooter { .. }), "{e}");
    let e = EstargzReader::open(&b"tiny"[..], &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::BlobTooSmall { .. }), "{e}");
    // A plain tar.gz is not an eStargz blob.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&synthetic_tar()).unwrap();
    let plain = gz.finish().unwrap();
    let e = EstargzReader::open(&plain[..], &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::BadFooter { .. }), "{e}");
    // Cutting the TOC member short.
    let off = EstargzReader::open(&blob[..], &OpenOptions::default())
        .unwrap()
        .footer()
        .toc_offset as usize;
    let mut cut = blob[..off + 20].to_vec();
    cut.extend_from_slice(&footer_bytes(off as u64));
    let e = EstargzReader::open(&cut[..], &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::BadTocMember { .. }), "{e}");
    // Invalid JSON.
    let e = Toc::parse(b"{not json", 100, &Limits::default()).unwrap_err();
    assert!(matches!(e, Error::TocJson(_)), "{e}");
}

#[test]
fn hostile_input_tars_are_refused_by_the_converter() {
    let build = |name: &str, kind: tar::EntryType, link: Option<&str>| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        // Bypass the tar crate's own path checks to write what an attacker would.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        b.into_inner().unwrap()
    };
    let conv = |tar: Vec<u8>| convert(&tar[..], std::io::sink(), &Default::default(), &());
    let e = conv(build("../escape", tar::EntryType::Regular, None)).unwrap_err();
    assert!(matches!(e, Error::PathTraversal { .. }), "{e}");
    let e = conv(build("/abs", tar::EntryType::Regular, None)).unwrap_err();
    assert!(matches!(e, Error::PathTraversal { .. }), "{e}");
    let e = conv(build("h", tar::EntryType::Link, Some("../../etc/shadow"))).unwrap_err();
    assert!(matches!(e, Error::BadHardlink { .. }), "{e}");
    let e = conv(build("h", tar::EntryType::Link, Some("missing"))).unwrap_err();
    assert!(matches!(e, Error::BadHardlink { .. }), "{e}");
    let e = conv(b"this is not a tar archive at all, just text".repeat(20)).unwrap_err();
    assert!(matches!(e, Error::BadInputTar { .. }), "{e}");
    let e = conv(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap_err();
    assert!(
        matches!(&e, Error::BadInputTar { detail } if detail.contains("zstd")),
        "{e}"
    );
    // Truncated in the middle of a file's data.
    let mut t = synthetic_tar();
    t.truncate(300_000);
    let e = conv(t).unwrap_err();
    assert!(matches!(e, Error::BadInputTar { .. }), "{e}");
    let opts = ConvertOptions {
        chunk_size: 10,
        ..Default::default()
    };
    let e = convert(&synthetic_tar()[..], std::io::sink(), &opts, &()).unwrap_err();
    assert!(matches!(e, Error::InvalidOption(_)), "{e}");
}

#[test]
fn long_paths_are_refused() {
    let ok = format!("{}/f", "d".repeat(200)).repeat(19);
    assert!(ok.len() <= estargz_format::MAX_PATH_LEN);
    Toc::parse(
        &estargz_testutil::names_toc(1, |_| ok.clone()),
        1 << 20,
        &Limits::default(),
    )
    .unwrap();
    for long in [
        "a/".repeat(2048) + "b",
        format!("{}/", "d".repeat(255)).repeat(17),
        "./".repeat(1 << 20) + "x",
    ] {
        let e = Toc::parse(
            &estargz_testutil::names_toc(1, |_| long.clone()),
            1 << 20,
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::PathTraversal { detail, .. } if detail.contains("longer than")),
            "{e}"
        );
    }
}

#[test]
fn deep_paths_cannot_make_parsing_quadratic() {
    // Each name is 4 KiB deep in its own tree: materialising every parent by its whole
    // path would take 4 MiB per entry, 40 GiB for the lot.
    let deep = "a/".repeat(2000);
    let json = estargz_testutil::names_toc(10_000, |i| format!("{i}/{deep}f"));
    let started = std::time::Instant::now();
    let e = Toc::parse(&json, 1 << 20, &Limits::default()).unwrap_err();
    assert!(matches!(e, Error::ImpliedDirectories { .. }), "{e}");
    assert!(e.to_string().contains("hostile"), "{e}");
    // Not a benchmark: a generous bound that only quadratic work would exceed.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // Parents a TOC does not list are still created when their names are within reason.
    let toc = Toc::parse(
        &estargz_testutil::names_toc(100, |i| format!("usr/lib/{i}/x/y/z")),
        1 << 20,
        &Limits::default(),
    )
    .unwrap();
    assert!(toc.lookup("usr/lib/99/x/y").is_some());
}

#[test]
fn too_many_entries_are_refused_before_they_are_all_parsed() {
    let limits = Limits {
        max_entries: 1000,
        ..Default::default()
    };
    Toc::parse(
        &estargz_testutil::names_toc(999, |i| format!("f{i}")),
        1 << 20,
        &limits,
    )
    .unwrap();
    for json in [
        estargz_testutil::names_toc(5000, |i| format!("f{i}")),
        // Implied directories count too.
        estargz_testutil::names_toc(600, |i| format!("d{i}/f")),
    ] {
        let e = Toc::parse(&json, 1 << 20, &limits).unwrap_err();
        assert!(matches!(e, Error::TooManyEntries { limit: 1000 }), "{e}");
    }
}

#[test]
fn compressed_spans_are_bounded_by_the_chunk_size() {
    // One small chunk and the TOC 40 GiB later: the chunk's range must not run to the TOC.
    let (blob, off) = good_blob();
    let json = serde_json::to_vec(&toc_of(&blob)).unwrap();
    let far = 40 << 30;
    let toc = Toc::parse(&json, far, &Limits::default()).unwrap();
    let mut last = None;
    for e in toc.entries() {
        for c in &e.chunks {
            assert!(c.compressed_end > c.offset);
            assert!(
                c.compressed_end - c.offset <= c.size + c.size / 16 + (128 << 10),
                "{}: {c:?}",
                e.name
            );
            if last.is_none_or(|l: estargz_format::Chunk| c.offset > l.offset) {
                last = Some(*c);
            }
        }
    }
    // The last chunk before the (far) TOC is cut short, and still decodes.
    let last = last.unwrap();
    assert!(last.compressed_end < off + (128 << 10) + last.size * 2);
    let end = (last.compressed_end as usize).min(blob.len());
    let name = "last";
    decompress_chunk(&blob[last.offset as usize..end], name, &last).unwrap();
}

/// A TOC's `elfNeeds` is a hint for fetching: whatever it holds, the reader keeps at most
/// what an object's own headers could name (an absolute interpreter, 64 distinct names
/// without `/` of at most 255 bytes, a run path of at most 4096 bytes) and drops the rest,
/// including needs on entries that are not regular files; the layer still opens.
#[test]
fn hostile_elf_needs_are_bounded() {
    use estargz_format::elf::{Needs, MAX_NAME, MAX_NEEDED, MAX_RUNPATH};
    let (blob, off) = good_blob();
    let mut toc = toc_of(&blob);
    let file = toc
        .entries
        .iter()
        .position(|e| e.kind == "reg" && e.size > 0)
        .unwrap();
    let dir = toc.entries.iter().position(|e| e.kind == "dir").unwrap();
    let mut needed: Vec<String> = (0..10_000).map(|i| format!("lib{i}.so")).collect();
    needed.splice(
        0..0,
        [
            "../../etc/shadow".to_string(),
            String::new(),
            "x".repeat(MAX_NAME + 1),
            "nul\0.so".into(),
            "lib5.so".into(),
        ],
    );
    toc.entries[file].elf_needs = Some(Needs {
        interp: Some("relative/ld.so".into()),
        needed,
        runpath: (0..5_000).map(|i| format!("/dir{i}")).collect(),
        machine: 62,
    });
    toc.entries[dir].elf_needs = Some(Needs {
        interp: Some("/lib/ld.so".into()),
        ..Default::default()
    });
    let name = toc.entries[file].name.clone();
    let json = serde_json::to_vec(&toc).unwrap();
    let r = EstargzReader::open(
        with_toc_json(&blob, off, &json, None),
        &OpenOptions::default(),
    )
    .unwrap();
    let t = r.toc();
    let e = t.entry(t.lookup(&name).unwrap());
    let n = e.elf_needs.as_deref().unwrap();
    assert_eq!(n.interp, None);
    assert_eq!(n.needed.len(), MAX_NEEDED);
    assert_eq!(n.needed[..2], ["lib5.so", "lib0.so"]);
    assert!(!n.needed[1..].contains(&"lib5.so".to_string()));
    assert!(n.runpath.join(":").len() <= MAX_RUNPATH);
    assert!(!n.runpath.is_empty());
    assert!(t.entries().iter().filter(|e| e.elf_needs.is_some()).count() == 1);
    r.verify(|_| {}).unwrap();

    // Nothing left to load: no needs at all.
    let mut toc = toc_of(&blob);
    toc.entries[file].elf_needs = Some(Needs {
        interp: Some("ld.so".into()),
        needed: vec!["a/b.so".into()],
        ..Default::default()
    });
    let json = serde_json::to_vec(&toc).unwrap();
    let r = EstargzReader::open(
        with_toc_json(&blob, off, &json, None),
        &OpenOptions::default(),
    )
    .unwrap();
    assert!(r.toc().entries().iter().all(|e| e.elf_needs.is_none()));
}

/// Symlink targets and extended attributes are held to what Linux lets a file have: a
/// hostile TOC's would otherwise be bounded only by its size (resolving a target of
/// megabytes, component by component, through forty links took gigabytes; a million tiny
/// attributes in one entry as much).
#[test]
fn symlink_targets_and_xattrs_are_held_to_what_linux_allows() {
    let parse = |entries: serde_json::Value, limits: &Limits| {
        let json = serde_json::json!({"version": 1, "entries": entries});
        Toc::parse(json.to_string().as_bytes(), 1 << 20, limits)
    };
    let symlink =
        |target: String| serde_json::json!([{"name": "l", "type": "symlink", "linkName": target}]);
    let with_xattrs = |xattrs: serde_json::Value| serde_json::json!([{"name": "f", "type": "reg", "xattrs": xattrs}]);
    let b64 = |len: usize| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(vec![7u8; len])
    };
    let fine = Limits::default();
    parse(symlink("a/".repeat(2047)), &fine).unwrap();
    let e = parse(symlink("a/".repeat(2048)), &fine).unwrap_err();
    assert!(
        e.to_string().contains("symlink target of 4096 bytes"),
        "{e}"
    );

    let many = |n: usize, name_len: usize| -> serde_json::Value {
        (0..n)
            .map(|i| {
                (
                    format!("user.{i:0>w$}", w = name_len - 5),
                    serde_json::Value::from(""),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let toc = parse(
        with_xattrs(serde_json::json!({"user.big": b64(64 << 10), "security.capability": null})),
        &fine,
    )
    .unwrap();
    assert_eq!(
        toc.entry(toc.lookup("f").unwrap()).xattrs["user.big"].len(),
        64 << 10
    );
    // 256 names of 255 bytes, each with its NUL: exactly 64 KiB.
    parse(with_xattrs(many(256, 255)), &fine).unwrap();
    for (xattrs, says) in [
        (
            serde_json::json!({"user.big": b64((64 << 10) + 1)}),
            "more than 65536",
        ),
        (many(1, 256), "longer than 255"),
        (many(257, 255), "more than the 65536 bytes"),
    ] {
        let e = parse(with_xattrs(xattrs), &fine).unwrap_err();
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
    // All entries' attributes together are bounded like the entries.
    let limits = Limits {
        max_entries: 1000,
        ..Default::default()
    };
    let spread = |files: usize| -> serde_json::Value {
        (0..files)
            .map(|f| serde_json::json!({"name": format!("f{f}"), "type": "reg", "xattrs": many(100, 10)}))
            .collect::<Vec<_>>()
            .into()
    };
    parse(spread(10), &limits).unwrap();
    let e = parse(spread(11), &limits).unwrap_err();
    assert!(
        e.to_string().contains("more than 1000 extended attributes"),
        "{e}"
    );
}
