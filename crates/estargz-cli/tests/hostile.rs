//! Hostile blobs against the command-line tools, each run under a memory bound
//! (`prlimit --as`) and a time bound: `estargz verify` and `estargz mount` refuse each with
//! its own clear error, never abort, and leave no mount behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions, FOOTER_SIZE};
use estargz_testutil::{synthetic_tar, toc_tail, SMALL_CHUNK};

/// Address space each run may use: far below what any of these blobs asked for before
/// they were bounded (4 GB and more), far above what a refusal needs.
const MEMORY: u64 = 3 << 30;
const TIME: Duration = Duration::from_secs(120);

fn good_blob() -> (Vec<u8>, u64, serde_json::Value) {
    let mut blob = Vec::new();
    let opts = ConvertOptions {
        chunk_size: SMALL_CHUNK,
        compression_level: 1,
        ..Default::default()
    };
    let info = convert(&synthetic_tar()[..], &mut blob, &opts, &()).unwrap();
    let r = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let off = r.footer().toc_offset;
    let member = &blob[off as usize..blob.len() - FOOTER_SIZE];
    let json = estargz_format::decode_toc_member(member, off, &Default::default()).unwrap();
    (
        blob,
        info.toc_offset,
        serde_json::from_slice(&json).unwrap(),
    )
}

/// A blob of regular files named by `name(i)` (no content), without directory entries.
fn names_blob(n: usize, name: impl Fn(usize) -> String) -> Vec<u8> {
    toc_tail(0, &estargz_testutil::names_toc(n, name), None)
}

struct Case {
    name: &'static str,
    path: PathBuf,
    /// What the error must say.
    says: &'static str,
}

fn cases(dir: &Path) -> Vec<Case> {
    let (blob, toc_offset, toc) = good_blob();
    let mut out = Vec::new();
    let mut add = |name: &'static str, says: &'static str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        out.push(Case { name, path, says });
    };
    let deep = "a/".repeat(2000);
    add(
        "deep-paths",
        "imply more parent directories",
        names_blob(10_000, |i| format!("{i}/{deep}f")),
    );
    add(
        "long-path",
        "longer than 4095",
        names_blob(1, |_| "d/".repeat(3000)),
    );
    add(
        "million-entries",
        "more than 1000000 entries",
        names_blob(1_200_000, |i| format!("f{i}")),
    );
    // Chunks that overlap: the second chunk of a file starts inside the first.
    let mut overlapping = toc.clone();
    let entries = overlapping["entries"].as_array_mut().unwrap();
    let i = entries
        .iter()
        .position(|e| e["type"] == "chunk")
        .expect("a chunked file");
    let at = entries[i]["chunkOffset"].as_u64().unwrap();
    entries[i]["chunkOffset"] = (at - 1).into();
    let json = serde_json::to_vec(&overlapping).unwrap();
    let mut b = blob[..toc_offset as usize].to_vec();
    b.extend_from_slice(&toc_tail(toc_offset, &json, None));
    add("overlapping-chunks", "overlap or leave a gap", b);
    // A TOC member that inflates without end (a gzip bomb).
    let mut bomb = br#"{"version":1,"entries":[]}"#.to_vec();
    bomb.resize(300 << 20, b' ');
    add(
        "toc-bomb",
        "larger than the configured limit",
        toc_tail(0, &bomb, None),
    );
    // A tar header that declares a TOC of a terabyte.
    add(
        "toc-declared-huge",
        "larger than the configured limit",
        toc_tail(0, b"{}", Some(1 << 40)),
    );
    out
}

fn run_bounded(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg(TIME.as_secs().to_string())
        .arg("prlimit")
        .arg(format!("--as={MEMORY}"))
        .arg(env!("CARGO_BIN_EXE_estargz"))
        .args(args)
        .output()
        .expect("running estargz under timeout and prlimit (coreutils, util-linux)");
    (out, started.elapsed())
}

fn refused(case: &Case, what: &str, out: &Output, took: Duration) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(124),
        "{}: {what} ran out of time",
        case.name
    );
    // An error exit with a message; not a signal (abort on allocation failure, OOM kill).
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{}: {what} ended with {} in {took:?}: {stderr}",
        case.name,
        out.status
    );
    assert!(
        stderr.contains(case.says),
        "{}: {what} said: {stderr}",
        case.name
    );
}

#[test]
fn verify_refuses_hostile_blobs_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases(dir.path()) {
        let (out, took) = run_bounded(&["verify", case.path.to_str().unwrap()]);
        refused(&case, "verify", &out, took);
    }
}

#[test]
fn mount_refuses_hostile_blobs_within_bounds_and_mounts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = dir.path().join("cache");
    for case in cases(dir.path()) {
        let (out, took) = run_bounded(&[
            "mount",
            case.path.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ]);
        refused(&case, "mount", &out, took);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(mnt.to_str().unwrap()),
            "{}: left a mount",
            case.name
        );
    }
}

#[test]
fn a_small_chunk_followed_by_gigabytes_costs_no_memory() {
    // The TOC 40 GiB after the payload (a sparse file): the last chunk's range once ran up
    // to it, and verify tried to allocate 40 GiB.
    let (blob, toc_offset, toc) = good_blob();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("far-toc");
    let far = 40u64 << 30;
    let json = serde_json::to_vec(&toc).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&blob[..toc_offset as usize]).unwrap();
        f.seek(SeekFrom::Start(far)).unwrap();
        f.write_all(&toc_tail(far, &json, None)).unwrap();
    }
    let (out, took) = run_bounded(&["verify", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The content is intact: verified, within the bound.
    assert!(out.status.success(), "{} in {took:?}: {stderr}", out.status);
}
