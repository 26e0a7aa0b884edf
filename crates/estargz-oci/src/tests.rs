use super::*;

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[test]
fn digests_parse_strictly() {
    assert_eq!(Digest::parse(D).unwrap(), Digest::sha256_of(b""));
    assert_eq!(Digest::parse(D).unwrap().hex().len(), 64);
    let sha512 = format!("sha512:{}", "a".repeat(128));
    assert_eq!(Digest::parse(&sha512).unwrap().algorithm(), "sha512");
    for bad in [
        "",
        "sha256:",
        "md5:abc",
        &D.to_uppercase(),
        &D[..70],
        "sha256:../../etc/passwd",
    ] {
        assert!(Digest::parse(bad).is_err(), "{bad}");
    }
    assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
}

#[test]
fn unknown_fields_survive_a_round_trip() {
    let json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{D}","size":2,"x-extra":[1,2]}},"layers":[{{"mediaType":"{}","digest":"{D}","size":0,"annotations":{{"a":"b"}}}}],"future":{{"k":true}}}}"#,
        media_types::OCI_MANIFEST,
        media_types::OCI_CONFIG,
        media_types::OCI_LAYER_GZIP
    );
    let m = Manifest::from_slice(json.as_bytes()).unwrap();
    assert_eq!(m.extra["future"]["k"], true);
    assert_eq!(m.config.extra["x-extra"][1], 2);
    let back: serde_json::Value = serde_json::from_slice(&m.to_vec()).unwrap();
    let orig: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(back, orig);
    let idx = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{D}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}],"other":1}}"#,
        media_types::OCI_MANIFEST
    );
    let i = Index::from_slice(idx.as_bytes()).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&i.to_vec()).unwrap(),
        serde_json::from_str::<serde_json::Value>(&idx).unwrap()
    );
    assert!(Manifest::from_slice(b"{}").is_err());
}

#[test]
fn config_diff_ids_rewrite_keeps_other_fields() {
    let mut c = ImageConfig::from_slice(
        format!(r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{D}"]}}}}"#)
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(c.diff_ids().unwrap(), vec![Digest::parse(D).unwrap()]);
    let new = Digest::sha256_of(b"x");
    c.set_diff_ids(&[new.clone(), new.clone()]);
    let again = ImageConfig::from_slice(&c.to_vec()).unwrap();
    assert_eq!(again.diff_ids().unwrap(), vec![new.clone(), new]);
    assert_eq!(again.raw["config"]["Cmd"][0], "sh");
    assert_eq!(again.raw["rootfs"]["type"], "layers");
    assert_eq!(again.platform().architecture, "amd64");
    assert!(ImageConfig::from_slice(b"[]").is_err());
}

#[test]
fn layout_refs() {
    assert_eq!(parse_layout_ref("docker.io/x"), None);
    assert_eq!(parse_layout_ref("oci:dir"), Some(("dir".into(), None)));
    assert_eq!(
        parse_layout_ref("oci:/a/b:v1"),
        Some(("/a/b".into(), Some("v1".into())))
    );
    assert_eq!(
        parse_layout_ref("oci:./x:y/z"),
        Some(("./x:y/z".into(), None))
    );
}

#[test]
fn platforms() {
    let host = Platform::host();
    assert_eq!(host.os, "linux");
    assert!(!host.architecture.is_empty());
    let arm = |v: Option<&str>| Platform {
        architecture: "arm64".into(),
        os: "linux".into(),
        variant: v.map(String::from),
        os_version: None,
        os_features: None,
    };
    assert!(arm(Some("v8")).matches(&arm(None)));
    assert!(!arm(Some("v8")).matches(&arm(Some("v7"))));
    assert!(!host.matches(&Platform {
        os: "windows".into(),
        ..host.clone()
    }));
    assert_eq!(arm(Some("v8")).to_string(), "linux/arm64/v8");
}

#[test]
fn layout_blobs_tags_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        OciLayout::open(dir.path()),
        Err(Error::NotALayout(_))
    ));
    let l = OciLayout::create(dir.path()).unwrap();
    let l = OciLayout::open(l.root()).unwrap();
    let (d, size) = l.write_blob(b"hello").unwrap();
    assert_eq!(size, 5);
    assert_eq!(l.read_blob(&d).unwrap(), b"hello");
    assert_eq!(l.write_blob(b"hello").unwrap().0, d);
    assert!(matches!(
        l.read_blob_limited(&d, 2),
        Err(Error::TooLarge { .. })
    ));
    std::fs::write(l.blob_path(&d), b"HELLO").unwrap();
    assert!(matches!(l.read_blob(&d), Err(Error::DigestMismatch { .. })));
    assert!(matches!(
        l.read_blob(&Digest::sha256_of(b"nope")),
        Err(Error::MissingBlob { .. })
    ));

    assert!(matches!(l.resolve(None), Err(Error::Resolve(_))));
    let a = Descriptor::new(media_types::OCI_MANIFEST, Digest::sha256_of(b"a"), 1);
    let b = Descriptor::new(media_types::OCI_MANIFEST, Digest::sha256_of(b"b"), 1);
    l.set_tag(Some("one"), a.clone()).unwrap();
    assert_eq!(l.resolve(None).unwrap().digest, a.digest);
    l.set_tag(Some("two"), b.clone()).unwrap();
    let err = l.resolve(None).unwrap_err().to_string();
    assert!(err.contains("one") && err.contains("two"), "{err}");
    assert_eq!(l.resolve(Some("two")).unwrap().digest, b.digest);
    l.set_tag(Some("one"), b.clone()).unwrap();
    assert_eq!(l.resolve(Some("one")).unwrap().digest, b.digest);
    assert_eq!(l.read_index().unwrap().manifests.len(), 2);
    assert!(l
        .resolve(Some("three"))
        .unwrap_err()
        .to_string()
        .contains("three"));
}

#[test]
fn blob_writer_commits_or_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let l = OciLayout::create(dir.path()).unwrap();
    {
        let mut w = l.blob_writer().unwrap();
        w.write_all(b"abandoned").unwrap();
    }
    let count = || {
        std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count()
    };
    assert_eq!(count(), 0);
    let mut w = l.blob_writer().unwrap();
    w.write_all(b"kept").unwrap();
    let (d, n) = w.commit().unwrap();
    assert_eq!((d, n), (Digest::sha256_of(b"kept"), 4));
    assert_eq!(count(), 1);
    let file = dir.path().join("outside");
    std::fs::write(&file, b"imported").unwrap();
    let (d2, _) = l
        .import_blob_file(&file, Some(&Digest::sha256_of(b"imported")))
        .unwrap();
    assert_eq!(l.read_blob(&d2).unwrap(), b"imported");
    assert!(l
        .import_blob_file(&file, Some(&Digest::sha256_of(b"other")))
        .is_err());
}
