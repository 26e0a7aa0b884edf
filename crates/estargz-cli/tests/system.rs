//! System tests with real components: a real Debian root filesystem (built with `dpkg -x`)
//! and the reference converter (`ctr-remote image convert --estargz --oci`, Debian package
//! `stargz-snapshotter`) driven through a private containerd. They need root and the
//! packages `make test` installs; a missing prerequisite fails the test, it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use estargz_format::{convert, ConvertOptions, EstargzReader, OpenOptions, Sha256Digest};
use estargz_oci::OciLayout;
use estargz_testutil::{assert_matches_tar, synthetic_tar};

fn scripts() -> PathBuf {
    estargz_testutil::scripts_dir()
}

fn run_script(name: &str, args: &[&Path], env: &[(&str, &str)]) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|p| p.as_os_str()).collect();
    estargz_testutil::run_script(name, &args, env);
}

fn real_rootfs(dir: &Path) -> Vec<u8> {
    estargz_testutil::real_rootfs_tar(dir)
}

fn estargz(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "estargz {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn real_debian_rootfs_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tar = real_rootfs(dir.path());
    assert!(tar.len() > 20 << 20, "the rootfs is suspiciously small");
    let mut one = Vec::new();
    let opts = |threads| ConvertOptions {
        threads,
        ..Default::default()
    };
    let info = convert(&tar[..], &mut one, &opts(1), &()).unwrap();
    let mut two = Vec::new();
    convert(&tar[..], &mut two, &opts(2), &()).unwrap();
    assert!(
        one == two,
        "1 and 2 threads gave different bytes on a real rootfs"
    );
    let reader = EstargzReader::open(
        &one[..],
        &OpenOptions {
            expected_toc_digest: Some(info.toc_digest),
            ..Default::default()
        },
    )
    .unwrap();
    let n = assert_matches_tar(&reader, &tar);
    assert!(n > 2000, "compared only {n} entries");
    // And with small chunks, so that many real files span several chunks.
    let mut small = Vec::new();
    let opts = ConvertOptions {
        chunk_size: 16 * 1024,
        compression_level: 1,
        ..Default::default()
    };
    convert(&tar[..], &mut small, &opts, &()).unwrap();
    let reader = EstargzReader::open(&small[..], &OpenOptions::default()).unwrap();
    assert_matches_tar(&reader, &tar);
    assert!(reader.toc().chunk_count() > reader.toc().len() / 2);
}

/// What the reference converter produced: for each layer, the blob path and TOC digest.
fn reference_layers(layout_dir: &Path) -> Vec<(PathBuf, Sha256Digest)> {
    let layout = OciLayout::open(layout_dir).unwrap();
    let root = layout.resolve(Some("esgz")).unwrap();
    let manifest = layout.read_manifest(&root).unwrap();
    manifest
        .layers
        .iter()
        .map(|l| {
            let toc = l.annotations.as_ref().expect("reference annotates layers")
                ["containerd.io/snapshot/stargz/toc.digest"]
                .parse()
                .unwrap();
            (layout.blob_path(&l.digest), toc)
        })
        .collect()
}

#[test]
fn reference_converter_output_reads_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = real_rootfs(dir.path());
    let synthetic = dir.path().join("synthetic.tar");
    let synthetic_bytes = synthetic_tar();
    std::fs::write(&synthetic, &synthetic_bytes).unwrap();
    let out = dir.path().join("ref");
    // Small chunks, so that the reference writes multi-chunk files for us to read.
    run_script(
        "reference-convert.sh",
        &[&out, &dir.path().join("rootfs.tar"), &synthetic],
        &[("EXTRA_CONVERT_ARGS", "--estargz-chunk-size 65536")],
    );
    let layers = reference_layers(&out);
    assert_eq!(layers.len(), 2);
    for ((blob, toc_digest), tar) in layers.iter().zip([&rootfs, &synthetic_bytes]) {
        let bytes = std::fs::read(blob).unwrap();
        let reader = EstargzReader::open(
            &bytes[..],
            &OpenOptions {
                expected_toc_digest: Some(*toc_digest),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("reading the reference's blob {}: {e}", blob.display()));
        assert_matches_tar(&reader, tar);
        assert!(reader.toc().chunk_count() > reader.toc().len() / 4);
        let verified = estargz(&[
            "verify",
            blob.to_str().unwrap(),
            "--toc-digest",
            &toc_digest.to_string(),
        ]);
        assert!(verified.starts_with("OK "), "{verified}");
    }
    // Our converter recognises the reference's layers as eStargz and keeps them.
    let out_ref = format!("oci:{}:esgz", out.display());
    let again = format!("oci:{}:again", out.display());
    let report: serde_json::Value =
        serde_json::from_str(&estargz(&["convert", &out_ref, &again, "--json"])).unwrap();
    for l in report["layers"].as_array().unwrap() {
        assert_eq!(l["kept"], true, "{l}");
    }
}

/// Our output through containerd's ordinary path: import unpacks every layer with overlayfs
/// (checking each DiffID against the config) and runc runs a command from the image.
#[test]
fn converted_image_unpacks_and_runs_in_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = real_rootfs(dir.path());
    let extra = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        let msg = b"converted by estargz\n";
        h.set_size(msg.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, "etc/estargz-message", &msg[..])
            .unwrap();
        b.into_inner().unwrap()
    };
    let src_dir = dir.path().join("src");
    let src = OciLayout::create(&src_dir).unwrap();
    let arch = estargz_oci::Platform::host().architecture;
    let m = estargz_testutil::write_oci_image(&src, &[rootfs, extra], &arch);
    src.set_tag(Some("orig"), m).unwrap();
    let dst_dir = dir.path().join("dst");
    estargz(&[
        "convert",
        &format!("oci:{}:orig", src_dir.display()),
        &format!("oci:{}:esgz", dst_dir.display()),
        "--prioritize",
        scripts().join("../python-startup.txt").to_str().unwrap(),
    ]);
    let out = Command::new("bash")
        .arg(scripts().join("containerd-run.sh"))
        .arg(&dst_dir)
        .arg("esgz")
        .args([
            "/bin/sh",
            "-c",
            "cat /etc/estargz-message; /usr/bin/python3.11 -c 'print(6*7)'",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "containerd-run.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("converted by estargz\n42\n"), "{stdout}");
}
