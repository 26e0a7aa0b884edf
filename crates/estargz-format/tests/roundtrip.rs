//! Round trips: tar -> eStargz -> every entry read back through the reader equals the tar.

use std::io::Read;
use std::process::Command;

use estargz_format::{
    convert, ConvertOptions, EntryKind, EstargzReader, OpenOptions, Sha256Digest,
    NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};
use estargz_testutil::{assert_matches_tar, synthetic_tar, SMALL_CHUNK};

fn conv(tar: &[u8], opts: &ConvertOptions) -> (Vec<u8>, estargz_format::ConvertOutput) {
    let mut out = Vec::new();
    let info = convert(tar, &mut out, opts, &()).expect("convert");
    (out, info)
}

fn small_opts(threads: usize) -> ConvertOptions {
    ConvertOptions {
        chunk_size: SMALL_CHUNK,
        compression_level: 6,
        threads,
        ..Default::default()
    }
}

#[test]
fn synthetic_layer_round_trips_byte_for_byte() {
    let tar = synthetic_tar();
    for opts in [small_opts(2), ConvertOptions::default()] {
        let (blob, info) = conv(&tar, &opts);
        let reader = EstargzReader::open(
            &blob[..],
            &OpenOptions {
                expected_toc_digest: Some(info.toc_digest),
                ..Default::default()
            },
        )
        .unwrap();
        let n = assert_matches_tar(&reader, &tar);
        assert!(n >= 36, "compared only {n} entries");
        let report = reader.verify(|_| {}).unwrap();
        assert!(report.chunks as usize == info.chunks);
        // The huge file spans several chunks with either chunk size.
        let huge = reader.toc().lookup("srv/huge.bin").unwrap();
        assert!(reader.toc().entry(huge).chunks.len() >= 3);
        // Hardlinks share the target's entry and raise its link count.
        let again = reader.toc().lookup("srv/huge-again").unwrap();
        assert_eq!(reader.toc().resolve(again), huge);
        assert_eq!(reader.toc().entry(huge).num_link, 2);
        assert_eq!(reader.toc().entry(again).kind, EntryKind::Hardlink);
        // User names are written once per uid and carried forward by the reader.
        let f = reader.toc().lookup("srv/many-chunks").unwrap();
        assert_eq!(reader.toc().entry(f).user_name, "alice");
        assert_eq!(reader.toc().entry(f).group_name, "staff");
        assert!(reader.toc().no_prefetch_landmark().is_some());
        assert!(reader.toc().prefetch_landmark().is_none());
        // A PAX sub-second mtime survives (as an RFC 3339 fraction).
        let f = reader.toc().lookup("var/opaque/fractional-mtime").unwrap();
        let e = reader.toc().entry(f);
        assert_eq!((e.mtime, e.mtime_nanos), (1_700_000_000, 750_000_000));
    }
}

#[test]
fn digests_and_sizes_describe_the_blob() {
    let tar = synthetic_tar();
    let (blob, info) = conv(&tar, &small_opts(2));
    assert_eq!(info.blob_digest, Sha256Digest::of(&blob));
    assert_eq!(info.blob_size, blob.len() as u64);
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(info.diff_id, Sha256Digest::of(&plain));
    assert_eq!(info.uncompressed_size, plain.len() as u64);
    // The uncompressed stream is a tar whose last file is the TOC, whose digest is announced.
    let mut ar = tar::Archive::new(&plain[..]);
    let mut names = Vec::new();
    let mut toc_json = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        if name == TOC_TAR_NAME {
            e.read_to_end(&mut toc_json).unwrap();
        }
        names.push(name);
    }
    assert_eq!(names.last().unwrap(), TOC_TAR_NAME);
    assert_eq!(names[0], NO_PREFETCH_LANDMARK);
    assert_eq!(Sha256Digest::of(&toc_json), info.toc_digest);
    // And every original entry extracts identically from the output stream.
    let orig = estargz_testutil::expected_from_tar(&tar);
    let mut conv = estargz_testutil::expected_from_tar(&plain);
    conv.remove(TOC_TAR_NAME);
    conv.remove(NO_PREFETCH_LANDMARK);
    assert_eq!(orig, conv);
}

#[test]
fn output_is_identical_for_any_thread_count_and_input_compression() {
    let tar = synthetic_tar();
    let (one, _) = conv(&tar, &small_opts(1));
    let (four, _) = conv(&tar, &small_opts(4));
    assert!(one == four, "1 and 4 threads gave different bytes");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let (from_gz, _) = conv(&gz.finish().unwrap(), &small_opts(3));
    assert!(one == from_gz, "tar and tar.gz input gave different bytes");
}

#[test]
fn blobs_are_ordinary_tar_gz_for_system_tools() {
    let (blob, _) = conv(&synthetic_tar(), &small_opts(2));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar.gz");
    std::fs::write(&path, &blob).unwrap();
    let gz = Command::new("gzip")
        .arg("-t")
        .arg(&path)
        .status()
        .expect("gzip must be installed");
    assert!(gz.success(), "gzip -t rejected the blob");
    let out = Command::new("tar")
        .arg("-tzf")
        .arg(&path)
        .output()
        .expect("tar must be installed");
    assert!(out.status.success(), "tar -tzf failed: {out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("srv/huge.bin"));
    assert!(listing.lines().last().unwrap().ends_with(TOC_TAR_NAME));
}

#[test]
fn prioritized_files_come_first_with_their_parents() {
    let tar = synthetic_tar();
    let opts = ConvertOptions {
        prioritized_files: vec![
            "/srv/many-chunks".into(),
            "srv/huge-again".into(),
            "usr/bin/ping".into(),
            "does/not/exist".into(),
        ],
        ..small_opts(2)
    };
    let (blob, info) = conv(&tar, &opts);
    assert_eq!(info.missing_prioritized, vec!["does/not/exist".to_string()]);
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_matches_tar(&reader, &tar);
    let toc = reader.toc();
    let names: Vec<&str> = toc
        .prioritized()
        .iter()
        .map(|&i| toc.entry(i).name.as_str())
        .collect();
    // Parents first, and the hardlink's target before the hardlink.
    assert_eq!(
        names,
        vec![
            "srv",
            "srv/many-chunks",
            "srv/huge.bin",
            "srv/huge-again",
            "usr/bin/ping"
        ]
    );
    assert_eq!(info.prioritized, 5);
    let lm = toc.prefetch_landmark().expect("prefetch landmark");
    assert_eq!(toc.entry(lm).name, PREFETCH_LANDMARK);
    assert!(toc.no_prefetch_landmark().is_none());
    // The prefetch range covers every prioritized chunk and nothing after the landmark.
    let end = toc.prefetch_size().unwrap();
    for &i in &toc.prioritized() {
        for c in &toc.entry(i).chunks {
            assert!(c.compressed_end <= end);
        }
    }
    let ls = toc.lookup("etc/hostname").unwrap();
    assert!(toc.entry(ls).chunks[0].offset > end);
}

#[test]
fn empty_layer_converts() {
    let empty = tar::Builder::new(Vec::new()).into_inner().unwrap();
    let (blob, info) = conv(&empty, &small_opts(1));
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_eq!(info.entries, 1);
    assert!(reader.toc().no_prefetch_landmark().is_some());
}

#[test]
fn converting_an_estargz_blob_again_is_stable() {
    let (blob, _) = conv(&synthetic_tar(), &small_opts(2));
    let (again, _) = conv(&blob, &small_opts(2));
    assert!(
        blob == again,
        "re-converting must drop the old TOC and landmark"
    );
}

#[test]
fn inner_offset_selects_a_payload_inside_a_shared_member() {
    // Writers may pack several small payloads into one gzip member (the reference's
    // minimum-chunk-size mode); innerOffset says where each starts.
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"first-payload|second|third-payload").unwrap();
    let member = gz.finish().unwrap();
    let chunk = |inner: u64, size: u64, data: &[u8]| estargz_format::Chunk {
        offset: 0,
        compressed_end: member.len() as u64,
        inner_offset: inner,
        chunk_offset: 0,
        size,
        digest: Sha256Digest::of(data),
    };
    let second = estargz_format::decompress_chunk(&member, "f", &chunk(14, 6, b"second")).unwrap();
    assert_eq!(second, b"second");
    let third =
        estargz_format::decompress_chunk(&member, "f", &chunk(21, 13, b"third-payload")).unwrap();
    assert_eq!(third, b"third-payload");
    // Past the end of the member: an error, not a short read.
    assert!(estargz_format::decompress_chunk(&member, "f", &chunk(30, 13, b"x")).is_err());
}

#[test]
fn toc_from_any_tail_matches_the_two_read_path() {
    use estargz_format::{read_toc_json, toc_json_from_tail, Limits};
    let (blob, _) = conv(&synthetic_tar(), &ConvertOptions::default());
    let limits = Limits::default();
    let size = blob.len() as u64;
    let (want_json, want_footer, got_size) = read_toc_json(&blob, &limits).unwrap();
    assert_eq!(got_size, size);
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_eq!(reader.toc_digest(), Sha256Digest::of(&want_json));
    for tail_len in [51, 1000, 40_000, blob.len()] {
        let tail = &blob[blob.len() - tail_len..];
        let mut asked = None;
        let (json, footer) = toc_json_from_tail(
            tail,
            size,
            |r| {
                asked = Some(r.clone());
                Ok(blob[r.start as usize..r.end as usize].to_vec())
            },
            &limits,
        )
        .unwrap();
        assert_eq!(
            (&json, footer),
            (&want_json, want_footer),
            "tail of {tail_len}"
        );
        // Only what the tail lacks is fetched.
        let tail_start = size - tail_len as u64;
        match asked {
            Some(r) => assert_eq!((r.start, r.end), (footer.toc_offset, tail_start)),
            None => assert!(footer.toc_offset >= tail_start),
        }
    }
    // A tail without a footer is refused, and so is a short answer for the member.
    let whole = |r: std::ops::Range<u64>| Ok(blob[r.start as usize..r.end as usize].to_vec());
    assert!(toc_json_from_tail(&blob[..100], size, whole, &limits).is_err());
    let short = |_: std::ops::Range<u64>| Ok(vec![0u8; 3]);
    assert!(toc_json_from_tail(&blob[blob.len() - 51..], size, short, &limits).is_err());
}

/// An `ar` archive (a static library) is cut in chunks of `ARCHIVE_CHUNK_SIZE` when the
/// chunk size is larger, and of the chunk size when it is not; other files, and a file
/// that only mentions the magic later, keep the chunk size. Everything reads back as
/// written.
#[test]
fn archives_are_cut_in_small_chunks() {
    use estargz_format::{ARCHIVE_CHUNK_SIZE, ARCHIVE_MAGIC};
    use estargz_testutil::{files_tar, noise};
    let mut archive = ARCHIVE_MAGIC.to_vec();
    archive.extend(noise(1_000_000, 1));
    let plain = noise(archive.len(), 2);
    let mut late = noise(100, 3);
    late.extend_from_slice(ARCHIVE_MAGIC);
    late.extend(noise(900_000, 4));
    let tar = files_tar(&[
        ("usr/lib/libx.a", &archive),
        ("usr/lib/plain", &plain),
        ("usr/lib/late", &late),
        ("usr/lib/tiny.a", ARCHIVE_MAGIC),
    ]);
    let sizes = |blob: &[u8], name: &str| -> Vec<u64> {
        let r = EstargzReader::open(blob, &OpenOptions::default()).unwrap();
        let toc = r.toc();
        toc.entry(toc.lookup(name).unwrap())
            .chunks
            .iter()
            .map(|c| c.size)
            .collect()
    };
    let big = ConvertOptions {
        chunk_size: 4 << 20,
        ..small_opts(2)
    };
    let (blob, _) = conv(&tar, &big);
    let cut = sizes(&blob, "usr/lib/libx.a");
    assert_eq!(
        cut.len(),
        archive.len().div_ceil(ARCHIVE_CHUNK_SIZE as usize)
    );
    assert!(
        cut[..cut.len() - 1]
            .iter()
            .all(|&s| s == ARCHIVE_CHUNK_SIZE),
        "{cut:?}"
    );
    assert_eq!(cut.iter().sum::<u64>(), archive.len() as u64);
    assert_eq!(sizes(&blob, "usr/lib/plain"), [plain.len() as u64]);
    assert_eq!(sizes(&blob, "usr/lib/late"), [late.len() as u64]);
    assert_eq!(sizes(&blob, "usr/lib/tiny.a"), [ARCHIVE_MAGIC.len() as u64]);
    let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_matches_tar(&r, &tar);
    // The TOC marks the archives (`arArchive`), and only them, whatever their size.
    let toc = r.toc();
    let marked = |name: &str| toc.entry(toc.lookup(name).unwrap()).ar_archive;
    assert!(marked("usr/lib/libx.a") && marked("usr/lib/tiny.a"));
    assert!(!marked("usr/lib/plain") && !marked("usr/lib/late"));
    // A chunk size below the archive's: the chunk size.
    let (blob, _) = conv(&tar, &small_opts(2));
    let cut = sizes(&blob, "usr/lib/libx.a");
    assert!(
        cut[..cut.len() - 1].iter().all(|&s| s == SMALL_CHUNK),
        "{cut:?}"
    );
    let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_matches_tar(&r, &tar);
}

/// A file with startup ranges (`estargz optimize`'s page profile) is cut in 64 KiB chunks,
/// those holding a byte of the ranges marked `readAtStart` in the TOC and no others; a
/// file read whole keeps the chunk size; the layer reads as the tar did. Paths are
/// matched as the layer's normalized names.
#[test]
fn startup_ranges_mark_the_chunks_a_start_read() {
    use estargz_format::STARTUP_CHUNK_SIZE as CHUNK;
    use estargz_testutil::{files_tar, noise};
    let prog = noise(1_000_000, 1);
    let plain = noise(1_000_000, 2);
    let tar = files_tar(&[("usr/bin/prog", &prog), ("usr/lib/plain", &plain)]);
    let opts = ConvertOptions {
        chunk_size: 4 << 20,
        prioritized_files: vec!["usr/bin/prog".into()],
        startup_ranges: [
            (
                "/usr/bin/prog".to_string(),
                vec![10..20, 3 * CHUNK - 1..3 * CHUNK + 1, 999_000..1_000_000],
            ),
            (
                "usr/lib/plain".to_string(),
                std::iter::once(0..1_000_000).collect(),
            ),
        ]
        .into(),
        ..small_opts(2)
    };
    let (blob, _) = conv(&tar, &opts);
    let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_matches_tar(&r, &tar);
    let toc = r.toc();
    let prog_entry = toc.entry(toc.lookup("usr/bin/prog").unwrap());
    let sizes: Vec<u64> = prog_entry.chunks.iter().map(|c| c.size).collect();
    assert_eq!(sizes.len(), 1_000_000usize.div_ceil(CHUNK as usize));
    assert!(
        sizes[..sizes.len() - 1].iter().all(|&s| s == CHUNK),
        "{sizes:?}"
    );
    assert_eq!(prog_entry.read_at_start, [0, 2, 3, 15]);
    let plain_entry = toc.entry(toc.lookup("usr/lib/plain").unwrap());
    assert_eq!(plain_entry.chunks.len(), 1);
    assert!(plain_entry.read_at_start.is_empty());
    // In the TOC's JSON, on the file's entry (chunk 0) and its chunk entries.
    let off = r.footer().toc_offset;
    let end = blob.len() - r.footer().kind.size();
    let member = &blob[off as usize..end];
    let json = estargz_format::decode_toc_member(member, off, &Default::default()).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let marked: Vec<u64> = json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["readAtStart"] == true)
        .map(|e| {
            assert_eq!(e["name"], "usr/bin/prog");
            e["chunkOffset"].as_u64().unwrap_or(0) / CHUNK
        })
        .collect();
    assert_eq!(marked, [0, 2, 3, 15]);
    // A path that is no layer path is refused, not ignored.
    let bad = ConvertOptions {
        startup_ranges: [("usr/../../etc".to_string(), std::iter::once(0..1).collect())].into(),
        ..opts
    };
    let err = convert(&tar[..], Vec::new(), &bad, &()).unwrap_err();
    assert!(err.to_string().contains("startup ranges"), "{err}");
}

/// Ranges recorded under a hard link's name (the name the workload opened) cut and mark
/// the file holding the content, merged with those recorded under its own name.
#[test]
fn startup_ranges_of_a_hard_link_mark_its_target() {
    use estargz_format::STARTUP_CHUNK_SIZE as CHUNK;
    let prog = estargz_testutil::noise(1_000_000, 1);
    let mut b = tar::Builder::new(Vec::new());
    estargz_testutil::append_file(&mut b, "usr/bin/python3.11", &prog);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_link_name("usr/bin/python3.11").unwrap();
    h.set_cksum();
    b.append_data(&mut h, "usr/bin/python3", &[][..]).unwrap();
    let tar = b.into_inner().unwrap();
    let opts = |ranges: Vec<(&str, Vec<std::ops::Range<u64>>)>| ConvertOptions {
        chunk_size: 4 << 20,
        prioritized_files: vec!["usr/bin/python3".into()],
        startup_ranges: ranges
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect(),
        ..small_opts(2)
    };
    let marked = |opts: &ConvertOptions| {
        let (blob, _) = conv(&tar, opts);
        let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
        assert_matches_tar(&r, &tar);
        let toc = r.toc();
        let e = toc.entry(toc.lookup("usr/bin/python3.11").unwrap());
        (e.chunks.len(), e.read_at_start.clone())
    };
    let chunks = 1_000_000usize.div_ceil(CHUNK as usize);
    assert_eq!(
        marked(&opts(vec![(
            "usr/bin/python3",
            vec![0..10, 5 * CHUNK..5 * CHUNK + 1]
        )])),
        (chunks, vec![0, 5])
    );
    assert_eq!(
        marked(&opts(vec![
            ("usr/bin/python3", std::iter::once(0..10).collect()),
            (
                "usr/bin/python3.11",
                std::iter::once(7 * CHUNK..7 * CHUNK + 1).collect()
            ),
        ])),
        (chunks, vec![0, 7])
    );
    // Read nearly whole under the link's name: one chunk, unmarked, as any such file.
    assert_eq!(
        marked(&opts(vec![(
            "usr/bin/python3",
            std::iter::once(0..999_000).collect()
        )])),
        (1, vec![])
    );
    // Marked by its own name's ranges, read nearly whole with its link's: unmarked again,
    // one chunk.
    assert_eq!(
        marked(&opts(vec![
            ("usr/bin/python3.11", std::iter::once(0..10).collect()),
            ("usr/bin/python3", std::iter::once(10..999_000).collect()),
        ])),
        (1, vec![])
    );
}

/// The converter records what each ELF executable and shared object loads in its TOC
/// entry (`elfNeeds`), read from the object wherever its dynamic section lies; other
/// files, and objects that load nothing, get none; the reader gives them back as written.
/// Without `elf_needs` the TOC has only the reference's fields.
#[test]
fn elf_objects_carry_what_they_load() {
    use estargz_format::elf::Needs;
    use estargz_testutil::{elf_object, files_and_links_tar};
    // The executable's dynamic section lies chunks after its header.
    let prog = elf_object(
        Some("/lib64/ld-linux-x86-64.so.2"),
        &["libfoo.so.1", "libc.so.6"],
        Some("$ORIGIN/../lib"),
        3 * SMALL_CHUNK as usize,
    );
    let lib = elf_object(None, &["libc.so.6"], None, 100);
    let leaf = elf_object(None, &[], None, 100);
    let mut relocatable = lib.clone();
    relocatable[16] = 1; // ET_REL
    let tar = files_and_links_tar(
        &[
            ("usr/bin/prog", 0o755, &prog),
            ("usr/lib/libfoo.so.1", 0o644, &lib),
            ("usr/lib/ld.so", 0o755, &leaf),
            ("usr/lib/module.o", 0o644, &relocatable),
            (
                "usr/bin/script",
                0o755,
                b"#!/bin/sh\necho a script longer than a header...\n",
            ),
            ("usr/lib/short", 0o644, b"\x7fELF"),
        ],
        &[("usr/bin/prog-link", "prog")],
    );
    let (blob, _) = conv(&tar, &small_opts(2));
    let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let needs = |name: &str| {
        let toc = r.toc();
        toc.entry(toc.lookup(name).unwrap())
            .elf_needs
            .as_deref()
            .cloned()
    };
    assert_eq!(
        needs("usr/bin/prog"),
        Some(Needs {
            interp: Some("/lib64/ld-linux-x86-64.so.2".into()),
            needed: vec!["libfoo.so.1".into(), "libc.so.6".into()],
            runpath: vec!["$ORIGIN/../lib".into()],
            machine: 62,
        })
    );
    assert_eq!(needs("usr/lib/libfoo.so.1").unwrap().needed, ["libc.so.6"]);
    for other in [
        "usr/lib/ld.so",
        "usr/lib/module.o",
        "usr/bin/script",
        "usr/lib/short",
        "usr/bin/prog-link",
    ] {
        assert_eq!(needs(other), None, "{other}");
    }
    assert_matches_tar(&r, &tar);

    let opts = ConvertOptions {
        elf_needs: false,
        ..small_opts(2)
    };
    let (plain, _) = conv(&tar, &opts);
    let r = EstargzReader::open(&plain[..], &OpenOptions::default()).unwrap();
    assert!(r.toc().entries().iter().all(|e| e.elf_needs.is_none()));
    let json = |blob: &[u8]| {
        let r = EstargzReader::open(blob, &OpenOptions::default()).unwrap();
        let off = r.footer().toc_offset;
        let member = &blob[off as usize..blob.len() - estargz_format::FOOTER_SIZE];
        let limits = estargz_format::Limits::default();
        String::from_utf8(estargz_format::decode_toc_member(member, off, &limits).unwrap()).unwrap()
    };
    assert!(json(&blob).contains("\"elfNeeds\""));
    assert!(!json(&plain).contains("elfNeeds"));
}
