//! `estargz convert` between registries, end to end with real components: a real
//! docker-registry, containerd pulling and running the result with runc, and the reference
//! converter (`ctr-remote`) converting the same image for comparison.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use estargz_oci::{OciLayout, Platform};
use estargz_testutil::{one_file_tar, real_rootfs_tar, run_script, write_oci_image, TestRegistry};

fn estargz(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_estargz"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "estargz {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Converts `reference` into a local layout and checks that every layer is eStargz with a
/// matching TOC digest (kept as is) and passes `estargz verify`.
fn check_estargz_image(reference: &str, dir: &Path) {
    let out = format!("oci:{}:check", dir.display());
    let report = estargz(&["convert", reference, &out]);
    let layout = OciLayout::open(dir).unwrap();
    for l in report["layers"].as_array().unwrap() {
        assert_eq!(
            l["kept"], true,
            "{reference}: layer not recognised as eStargz: {l}"
        );
        let digest = l["digest"].as_str().unwrap().parse().unwrap();
        let path = layout.blob_path(&digest);
        let verify = estargz(&[
            "verify",
            path.to_str().unwrap(),
            "--toc-digest",
            l["tocDigest"].as_str().unwrap(),
        ]);
        assert_eq!(verify["ok"], true, "{verify}");
    }
}

#[test]
fn convert_between_registries_then_run_with_containerd() {
    let reg = TestRegistry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let rootfs = real_rootfs_tar(dir.path());
    let extra = one_file_tar("etc/estargz-message", b"converted by estargz\n");
    let src = OciLayout::create(dir.path().join("src")).unwrap();
    let m = write_oci_image(&src, &[rootfs, extra], &Platform::host().architecture);
    src.set_tag(Some("orig"), m).unwrap();
    let orig = format!("{}/app:orig", reg.addr);
    let skopeo = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:orig", dir.path().join("src").display()))
        .arg(format!("docker://{orig}"))
        .output()
        .expect("skopeo must be installed");
    assert!(
        skopeo.status.success(),
        "{}",
        String::from_utf8_lossy(&skopeo.stderr)
    );

    let esgz = format!("{}/app:esgz", reg.addr);
    let report = estargz(&["convert", &orig, &esgz]);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert!(layers.iter().all(|l| l["kept"] == false));
    // Converting again pushes nothing new and gives the same image.
    let again = estargz(&["convert", &orig, &esgz]);
    assert_eq!(again["image"], report["image"]);

    // containerd's ordinary pull: unpack (DiffIDs checked) and run.
    let out = run_script(
        "containerd-run.sh",
        &[
            OsStr::new("--pull"),
            OsStr::new(&esgz),
            OsStr::new("/bin/sh"),
            OsStr::new("-c"),
            OsStr::new("cat /etc/estargz-message; /usr/bin/python3.11 -c 'print(6*7)'"),
        ],
        &[],
    );
    assert!(out.contains("converted by estargz\n42\n"), "{out}");
    check_estargz_image(&esgz, &dir.path().join("ours"));

    // The reference converter, from and to the same registry: our verify accepts its output.
    let reference = format!("{}/app:ref-esgz", reg.addr);
    run_script(
        "reference-convert-registry.sh",
        &[OsStr::new(&orig), OsStr::new(&reference)],
        &[],
    );
    check_estargz_image(&reference, &dir.path().join("theirs"));
}

#[test]
fn converting_into_another_repository_mounts_kept_layers() {
    let reg = TestRegistry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let src = OciLayout::create(dir.path().join("src")).unwrap();
    let layers = [
        one_file_tar("a", b"first layer\n"),
        one_file_tar("b", b"second layer\n"),
    ];
    let m = write_oci_image(&src, &layers, &Platform::host().architecture);
    src.set_tag(Some("orig"), m).unwrap();
    // Convert into the registry once, then "convert" that eStargz image into another
    // repository: every layer is kept, so it is mounted rather than uploaded.
    let first = format!("{}/team/app:esgz", reg.addr);
    estargz(&[
        "convert",
        &format!("oci:{}:orig", dir.path().join("src").display()),
        &first,
    ]);
    let second = format!("{}/other/app:esgz", reg.addr);
    let report = estargz(&["convert", &first, &second]);
    assert!(report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["kept"] == true));
    check_estargz_image(&second, &dir.path().join("check"));
}
