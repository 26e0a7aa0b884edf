//! Property tests (fuzzing with arbitrary input, run on every `make test`): the footer, TOC
//! and chunk parsers never panic, and a damaged blob never yields wrong bytes.
//!
//! PROPTEST_CASES raises the number of cases for a longer fuzzing run.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use estargz_format::{
    convert, decode_toc_member, decompress_chunk, parse_footer, Chunk, ConvertOptions,
    EstargzReader, JsonEntry, JsonToc, Limits, OpenOptions, Sha256Digest, Toc,
};
use proptest::prelude::*;

/// A blob, its TOC digest, and the expected content of each file.
type Fixture = (Vec<u8>, Sha256Digest, BTreeMap<String, Vec<u8>>);

/// A small layer (a few chunks) and the expected content of each file.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut b = tar::Builder::new(Vec::new());
        let mut files = BTreeMap::new();
        for (name, len, seed) in [("a", 10usize, 1u64), ("d/b", 9000, 2), ("d/c", 5000, 3)] {
            let data = estargz_testutil::noise(len, seed);
            let mut h = tar::Header::new_gnu();
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
            files.insert(name.to_string(), data);
        }
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        let opts = ConvertOptions {
            chunk_size: 4096,
            compression_level: 1,
            threads: 1,
            ..Default::default()
        };
        let info = convert(&tar[..], &mut blob, &opts, &()).unwrap();
        (blob, info.toc_digest, files)
    })
}

fn arb_entry() -> impl Strategy<Value = JsonEntry> {
    let names = prop::sample::select(vec![
        "a",
        "a/b",
        "./a/b/",
        "..",
        "../x",
        "/abs",
        "a//b",
        "a/./c",
        "",
        ".",
        "b",
        "a/b/c",
        "stargz.index.json",
        ".prefetch.landmark",
    ]);
    let kinds = prop::sample::select(vec![
        "dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus",
    ]);
    (
        names,
        kinds,
        any::<u64>(),
        prop::sample::select(vec![0u64, 1, 4096, 4097, 1 << 40, u64::MAX]),
        prop::sample::select(vec![0u64, 1, 100, 4096, u64::MAX]),
        prop::sample::select(vec![0u64, 1, 4095, 4096]),
        prop::sample::select(vec!["", "a", "b", "a/b", "../x"]),
        any::<bool>(),
    )
        .prop_map(
            |(name, kind, offset, size, chunk_offset, chunk_size, link, with_digest)| JsonEntry {
                name: name.into(),
                kind: kind.into(),
                size,
                offset: offset % 10_000,
                inner_offset: if offset % 7 == 0 { offset } else { 0 },
                chunk_offset,
                chunk_size,
                link_name: link.into(),
                chunk_digest: if with_digest {
                    Sha256Digest::of(name.as_bytes()).to_string()
                } else {
                    String::new()
                },
                ..Default::default()
            },
        )
}

/// Strings as a hostile TOC could hold them: empty, long, with `/`, NUL or `:`.
fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z./:]{0,12}",
        "/[a-z0-9/]{0,300}",
        "[a-z\\x00]{1,4}",
        prop::sample::select(vec![String::new(), "x".repeat(256), "y".repeat(5000)]),
    ]
}

fn arb_needs() -> impl Strategy<Value = estargz_format::elf::Needs> {
    (
        prop::option::of(arb_name()),
        prop::collection::vec(arb_name(), 0..200),
        prop::collection::vec(arb_name(), 0..50),
        any::<u16>(),
    )
        .prop_map(
            |(interp, needed, runpath, machine)| estargz_format::elf::Needs {
                interp,
                needed,
                runpath,
                machine,
            },
        )
}

proptest! {
    /// Whatever a TOC's `elfNeeds` holds, what is kept keeps the bounds an object's own
    /// headers would.
    #[test]
    fn elf_needs_are_always_bounded(needs in arb_needs()) {
        use estargz_format::elf::{MAX_NAME, MAX_NEEDED, MAX_RUNPATH};
        if let Some(n) = needs.bounded() {
            prop_assert!(n.interp.is_some() || !n.needed.is_empty());
            if let Some(i) = &n.interp {
                prop_assert!(i.starts_with('/') && i.len() <= MAX_NAME && !i.contains('\0'));
            }
            prop_assert!(n.needed.len() <= MAX_NEEDED);
            for (k, name) in n.needed.iter().enumerate() {
                prop_assert!(!name.is_empty() && name.len() <= MAX_NAME);
                prop_assert!(!name.contains('/') && !name.contains('\0'));
                prop_assert!(!n.needed[..k].contains(name));
            }
            prop_assert!(n.runpath.join(":").len() <= MAX_RUNPATH);
            prop_assert!(n.runpath.iter().all(|d| !d.is_empty() && !d.contains('\0')));
        }
    }

    #[test]
    fn footer_parser_never_panics(tail in prop::collection::vec(any::<u8>(), 0..80), size in any::<u64>()) {
        let _ = parse_footer(&tail, size);
    }

    #[test]
    fn toc_json_parser_never_panics(json in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Toc::parse(&json, 1000, &Limits::default());
    }

    #[test]
    fn structured_tocs_never_panic(entries in prop::collection::vec(arb_entry(), 0..24)) {
        let toc = JsonToc { version: 1, entries };
        if let Ok(t) = Toc::from_json(&toc, 10_000, &Limits::default()) {
            // Whatever is accepted is internally consistent.
            for e in t.entries() {
                let covered: u64 = e.chunks.iter().map(|c| c.size).sum();
                if e.kind == estargz_format::EntryKind::Reg {
                    prop_assert_eq!(covered, e.size);
                }
                for &c in &e.children {
                    prop_assert_eq!(t.entry(c).parent, t.lookup(&e.name).unwrap());
                }
                prop_assert!(!e.name.split('/').any(|c| c == ".."));
            }
        }
    }

    /// Mutate a real TOC's JSON text (the fuzzer's best seed: every field is present): it
    /// either fails to parse or yields a TOC whose invariants hold.
    #[test]
    fn mutated_real_tocs_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let (blob, _, _) = fixture();
        let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
        let off = r.footer().toc_offset;
        let member = &blob[off as usize..blob.len() - estargz_format::FOOTER_SIZE];
        let mut json = decode_toc_member(member, off, &Limits::default()).unwrap();
        for (at, byte, op) in &edits {
            let i = at.index(json.len().max(1));
            match op {
                0 if i < json.len() => json[i] = *byte,
                1 => json.insert(i.min(json.len()), *byte),
                _ if i < json.len() => { json.remove(i); }
                _ => {}
            }
        }
        let toc_offset = r.footer().toc_offset;
        if let Ok(t) = Toc::parse(&json, toc_offset, &Limits::default()) {
            for e in t.entries() {
                prop_assert!(e.name.len() <= estargz_format::MAX_PATH_LEN);
                for c in &e.chunks {
                    prop_assert!(c.offset < c.compressed_end && c.compressed_end <= toc_offset);
                    prop_assert!(c.compressed_end - c.offset <= c.inner_offset + c.size + (c.inner_offset + c.size) / 16 + (128 << 10));
                }
            }
        }
    }

    #[test]
    fn toc_member_decoder_never_panics(member in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_toc_member(&member, 0, &Limits::default());
    }

    #[test]
    fn chunk_decoder_never_panics(data in prop::collection::vec(any::<u8>(), 0..600), size in 1u64..5000, inner in 0u64..100) {
        let chunk = Chunk { offset: 0, compressed_end: data.len() as u64, inner_offset: inner,
            chunk_offset: 0, size, digest: Sha256Digest([0; 32]) };
        prop_assert!(decompress_chunk(&data, "x", &chunk).is_err());
    }

    #[test]
    fn arbitrary_blobs_never_panic(blob in prop::collection::vec(any::<u8>(), 0..2000)) {
        if let Ok(r) = EstargzReader::open(&blob[..], &OpenOptions::default()) {
            let _ = r.verify(|_| {});
        }
    }

    /// Flip bytes anywhere in a valid blob: with the TOC digest pinned, every read either fails
    /// or returns exactly the original content.
    #[test]
    fn damaged_blobs_never_serve_wrong_bytes(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6)
    ) {
        let (blob, toc_digest, files) = fixture();
        let mut bad = blob.clone();
        for (at, x) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= x;
        }
        let opts = OpenOptions { expected_toc_digest: Some(*toc_digest), ..Default::default() };
        if let Ok(r) = EstargzReader::open(&bad[..], &opts) {
            for (name, content) in files {
                let idx = r.toc().lookup(name).expect("TOC is pinned by digest");
                if let Ok(data) = r.read_file(idx) {
                    prop_assert!(&data == content, "wrong bytes served for {}", name);
                }
                let mut buf = vec![0u8; 3000];
                if let Ok(n) = r.read_at(idx, 1000, &mut buf) {
                    let end = (1000 + n).min(content.len());
                    prop_assert!(buf[..n] == content[1000.min(content.len())..end]);
                }
            }
        }
    }
}
