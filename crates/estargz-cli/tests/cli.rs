//! The `estargz` binary end to end: layer convert, inspect, verify, and image convert between
//! OCI layouts (single manifest and multi-platform index).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use estargz_format::{EstargzReader, OpenOptions, Sha256Digest};
use estargz_oci::{media_types, Descriptor, Digest, ImageConfig, Index, Manifest, OciLayout};
use estargz_testutil::{assert_matches_tar, synthetic_tar, write_oci_image};

fn estargz(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_estargz"))
        .args(args)
        .output()
        .expect("run estargz")
}

fn ok(args: &[&str]) -> String {
    let out = estargz(args);
    assert!(
        out.status.success(),
        "estargz {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn layer_convert_inspect_verify() {
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("layer.tar");
    let tar = synthetic_tar();
    std::fs::write(&tar_path, &tar).unwrap();
    let list = dir.path().join("prio.txt");
    std::fs::write(&list, "# start-up files\n/etc/hostname\nusr/bin/ping\n\n").unwrap();
    let blob_path = dir.path().join("layer.esgz");
    let out = ok(&[
        "layer",
        "convert",
        p(&tar_path),
        p(&blob_path),
        "--chunk-size",
        "64K",
        "--prioritize",
        p(&list),
        "--json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let blob = std::fs::read(&blob_path).unwrap();
    assert_eq!(info["digest"], Sha256Digest::of(&blob).to_string());
    assert_eq!(info["prioritized"], 3); // etc, etc/hostname, usr/bin/ping (+ parents present)
    let toc_digest = info["tocDigest"].as_str().unwrap().to_string();

    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    assert_matches_tar(&reader, &tar);

    let text = ok(&["inspect", p(&blob_path)]);
    assert!(text.contains(&toc_digest), "{text}");
    assert!(
        text.contains("etc/hostname") && text.contains("usr/bin/ping"),
        "{text}"
    );
    let toc: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--json", p(&blob_path)])).unwrap();
    assert_eq!(toc["version"], 1);
    assert!(toc["entries"].as_array().unwrap().len() > 36);

    let verified = ok(&["verify", p(&blob_path), "--toc-digest", &toc_digest]);
    assert!(verified.starts_with("OK "), "{verified}");
    let wrong = estargz(&[
        "verify",
        p(&blob_path),
        "--toc-digest",
        &Sha256Digest::of(b"x").to_string(),
    ]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("TOC digest mismatch"));

    // Damage one payload byte: verify must fail and say which file.
    let mut bad = blob.clone();
    let huge = reader.toc().lookup("srv/huge.bin").unwrap();
    let at = reader.toc().entry(huge).chunks[1].offset as usize + 40;
    bad[at] ^= 0x55;
    let bad_path = dir.path().join("bad.esgz");
    std::fs::write(&bad_path, &bad).unwrap();
    let failed = estargz(&["verify", "--json", p(&bad_path)]);
    assert_eq!(failed.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("srv/huge.bin"), "{v}");

    // Not an eStargz blob at all.
    let plain = estargz(&["verify", p(&tar_path)]);
    assert_eq!(plain.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&plain.stderr).contains("footer"));
    // Usage errors exit 2 with a message.
    let missing = estargz(&["inspect", "/nonexistent/blob"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/blob"));
}

fn small_tar(name: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    b.append_data(&mut h, name, content).unwrap();
    b.into_inner().unwrap()
}

/// Checks a converted manifest: annotations, diff_ids, and every layer's content.
fn check_converted(layout: &OciLayout, mdesc: &Descriptor, originals: &[Vec<u8>]) {
    let m: Manifest = layout.read_manifest(mdesc).unwrap();
    assert_eq!(m.media_type.as_deref(), Some(media_types::OCI_MANIFEST));
    assert_eq!(m.annotations.as_ref().unwrap()["keep"], "me");
    let config: ImageConfig = layout.read_config(&m.config).unwrap();
    let diff_ids = config.diff_ids().unwrap();
    assert_eq!(m.layers.len(), originals.len());
    let mut sizes = Vec::new();
    for ((layer, diff_id), tar) in m.layers.iter().zip(&diff_ids).zip(originals) {
        assert_eq!(layer.media_type, media_types::OCI_LAYER_GZIP);
        let ann = layer.annotations.as_ref().expect("annotations");
        let toc_digest: Sha256Digest = ann["containerd.io/snapshot/stargz/toc.digest"]
            .parse()
            .unwrap();
        let blob = layout.read_blob(&layer.digest).unwrap();
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(
            diff_id,
            &Digest::sha256_of(&plain),
            "diff_id matches the layer"
        );
        assert_eq!(
            ann["io.containers.estargz.uncompressed-size"],
            plain.len().to_string()
        );
        let reader = EstargzReader::open(
            &blob[..],
            &OpenOptions {
                expected_toc_digest: Some(toc_digest),
                ..Default::default()
            },
        )
        .unwrap();
        assert_matches_tar(&reader, tar);
        sizes.push(format!(
            "{}={}",
            layer.digest,
            reader.blob_size() - reader.footer().toc_offset
        ));
        let path = layout.blob_path(&layer.digest);
        ok(&["verify", p(&path), "--toc-digest", &toc_digest.to_string()]);
    }
    // Each layer gives the size of its TOC (from its gzip member to the blob's end) and
    // those of the layers above it, for a snapshotter to fetch each in one request.
    for (i, layer) in m.layers.iter().enumerate() {
        let listed = &sizes[i..sizes.len().min(i + estargz_convert::TOC_SIZES_LISTED)];
        assert_eq!(
            layer.annotations.as_ref().unwrap()["containerd.io/snapshot/estargz/toc.sizes"],
            listed.join(",")
        );
    }
    // Everything but diff_ids survives in the config.
    assert_eq!(config.raw["config"]["Env"][0], "PATH=/bin");
    assert_eq!(config.raw["history"][0]["created_by"], "test");
}

#[test]
fn image_convert_single_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("src");
    let src = OciLayout::create(&src_dir).unwrap();
    // More layers than a layer's TOC sizes annotation lists.
    let mut layers = vec![
        synthetic_tar(),
        small_tar("bin/hello", b"#!/bin/sh\necho hello\n"),
    ];
    for i in 0..estargz_convert::TOC_SIZES_LISTED {
        layers.push(small_tar(
            &format!("etc/layer{i}"),
            i.to_string().as_bytes(),
        ));
    }
    let m = write_oci_image(&src, &layers, "amd64");
    src.set_tag(Some("v1"), m).unwrap();
    let dst_dir = dir.path().join("dst");
    let out = ok(&[
        "convert",
        &format!("oci:{}:v1", p(&src_dir)),
        &format!("oci:{}:v1-esgz", p(&dst_dir)),
        "--chunk-size",
        "1M",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["layers"].as_array().unwrap().len(), layers.len());
    let dst = OciLayout::open(&dst_dir).unwrap();
    let root = dst.resolve(Some("v1-esgz")).unwrap();
    assert_eq!(root.digest.as_str(), report["image"].as_str().unwrap());
    check_converted(&dst, &root, &layers);

    // Converting the converted image again keeps every layer as it is.
    let again = ok(&[
        "convert",
        &format!("oci:{}:v1-esgz", p(&dst_dir)),
        &format!("oci:{}:again", p(&dst_dir)),
        "--json",
    ]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    for l in again["layers"].as_array().unwrap() {
        assert_eq!(l["kept"], true, "{l}");
        assert_eq!(l["digest"], l["source"]);
    }
    // Their TOC sizes are read from the kept layers' footers.
    check_converted(&dst, &dst.resolve(Some("again")).unwrap(), &layers);
    // The human table names every layer.
    let text = ok(&[
        "convert",
        &format!("oci:{}:v1", p(&src_dir)),
        &format!("oci:{}:t", p(&dst_dir)),
    ]);
    assert!(
        text.contains("TOC DIGEST") && text.lines().count() >= 4,
        "{text}"
    );
    // Errors say what to do.
    let bad = estargz(&[
        "convert",
        "Not A Reference!",
        &format!("oci:{}", p(&dst_dir)),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("oci:DIR"));
}

#[test]
fn image_convert_multi_platform_index() {
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("src");
    let src = OciLayout::create(&src_dir).unwrap();
    let shared = small_tar("etc/shared", b"same on every platform\n");
    let amd = vec![shared.clone(), small_tar("bin/amd", b"amd64 binary")];
    let arm = vec![shared.clone(), small_tar("bin/arm", b"arm64 binary")];
    let m1 = write_oci_image(&src, &amd, "amd64");
    let m2 = write_oci_image(&src, &arm, "arm64");
    let index = Index {
        schema_version: 2,
        media_type: Some(media_types::OCI_INDEX.into()),
        artifact_type: None,
        manifests: vec![m1, m2],
        subject: None,
        annotations: Some(BTreeMap::from([(
            "org.example".to_string(),
            "x".to_string(),
        )])),
        extra: Default::default(),
    };
    let (d, s) = src.write_blob(&index.to_vec()).unwrap();
    src.set_tag(Some("multi"), Descriptor::new(media_types::OCI_INDEX, d, s))
        .unwrap();

    let dst_dir = dir.path().join("dst");
    let out = ok(&[
        "convert",
        &format!("oci:{}:multi", p(&src_dir)),
        &format!("oci:{}:multi", p(&dst_dir)),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The shared layer converts once: 3 distinct layers for 2 platforms.
    assert_eq!(report["layers"].as_array().unwrap().len(), 3);
    assert_eq!(report["manifests"], 2);
    let dst = OciLayout::open(&dst_dir).unwrap();
    let root = dst.resolve(Some("multi")).unwrap();
    let idx = dst.read_index_blob(&root).unwrap();
    assert_eq!(idx.annotations.as_ref().unwrap()["org.example"], "x");
    assert_eq!(idx.manifests.len(), 2);
    for (m, orig) in idx.manifests.iter().zip([&amd, &arm]) {
        assert!(m.platform.is_some());
        check_converted(&dst, m, orig);
    }
    // Layers convert in parallel within --threads; the result does not depend on it.
    let digest_with = |threads: &str| {
        let out = ok(&[
            "convert",
            &format!("oci:{}:multi", p(&src_dir)),
            &format!("oci:{}:t{threads}", p(&dst_dir)),
            "--threads",
            threads,
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["image"].clone()
    };
    assert_eq!(digest_with("1"), report["image"]);
    assert_eq!(digest_with("4"), report["image"]);
    // --platform selects one.
    ok(&[
        "convert",
        &format!("oci:{}:multi", p(&src_dir)),
        &format!("oci:{}:arm", p(&dst_dir)),
        "--platform",
        "linux/arm64",
    ]);
    let arm_root = dst.resolve(Some("arm")).unwrap();
    let arm_idx = dst.read_index_blob(&arm_root).unwrap();
    assert_eq!(arm_idx.manifests.len(), 1);
    assert_eq!(
        arm_idx.manifests[0].platform.as_ref().unwrap().architecture,
        "arm64"
    );
}
