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

#[test]
fn digest_traits_and_serde() {
    let d: Digest = D.parse().unwrap();
    assert_eq!(d.to_string(), D);
    assert_eq!(d.as_str(), D);
    assert_eq!(d.algorithm(), "sha256");
    assert_eq!(&d.hex()[..8], "e3b0c442");
    assert_eq!(Digest::from_sha256_bytes([0xab; 32]).hex(), "ab".repeat(32));
    assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{D}\""));
    assert_eq!(
        serde_json::from_str::<Digest>(&format!("\"{D}\"")).unwrap(),
        d
    );
    assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_err());
    assert!(Digest::parse(&format!("{D}0")).is_err());
    assert!(Digest::parse(&format!(" {D}")).is_err());
    let msg = Digest::parse("sha256:xyz").unwrap_err().to_string();
    assert!(msg.contains("sha256:xyz"), "{msg}");
}

#[test]
fn media_type_helpers() {
    use media_types::*;
    assert!(is_manifest(OCI_MANIFEST) && is_manifest(DOCKER_MANIFEST));
    assert!(!is_manifest(OCI_INDEX));
    assert!(is_index(OCI_INDEX) && is_index(DOCKER_MANIFEST_LIST));
    assert!(!is_index(OCI_MANIFEST));
    for l in [
        OCI_LAYER_TAR,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_NONDIST_GZIP,
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER_FOREIGN_GZIP,
    ] {
        assert!(is_layer(l), "{l}");
    }
    assert!(!is_layer(OCI_CONFIG) && !is_layer(DOCKER_CONFIG));
    assert!(is_gzip_layer(DOCKER_LAYER_GZIP) && is_gzip_layer(OCI_LAYER_GZIP));
    assert!(!is_gzip_layer(OCI_LAYER_ZSTD) && !is_gzip_layer(OCI_LAYER_TAR));
    assert!(is_uncompressed_layer(OCI_LAYER_TAR) && !is_uncompressed_layer(OCI_LAYER_GZIP));
}

#[test]
fn descriptor_skips_none_and_keeps_extra() {
    let d = Descriptor::new(media_types::OCI_LAYER_GZIP, Digest::parse(D).unwrap(), 7);
    assert_eq!(
        String::from_utf8(serde_json::to_vec(&d).unwrap()).unwrap(),
        format!(
            r#"{{"mediaType":"{}","digest":"{D}","size":7}}"#,
            media_types::OCI_LAYER_GZIP
        )
    );
    let json = format!(
        r#"{{"mediaType":"x","digest":"{D}","size":1,"urls":["u"],"artifactType":"a","platform":{{"architecture":"amd64","os":"windows","os.version":"10","os.features":["f"]}},"data":"AA=="}}"#
    );
    let d: Descriptor = serde_json::from_str(&json).unwrap();
    let p = d.platform.as_ref().unwrap();
    assert_eq!(p.os_version.as_deref(), Some("10"));
    assert_eq!(p.os_features, Some(vec!["f".to_string()]));
    assert_eq!(d.artifact_type.as_deref(), Some("a"));
    assert_eq!(d.extra["data"], "AA==");
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::from_str::<serde_json::Value>(&json).unwrap()
    );
    // A malformed digest inside a descriptor is rejected.
    assert!(serde_json::from_str::<Descriptor>(
        r#"{"mediaType":"x","digest":"sha256:1","size":1}"#
    )
    .is_err());
}

#[test]
fn config_platform_reads_features() {
    let c = ImageConfig::from_slice(
        br#"{"architecture":"arm64","os":"linux","variant":"v8","os.features":["a"],"rootfs":{}}"#,
    )
    .unwrap();
    let p = c.platform();
    assert_eq!((p.architecture.as_str(), p.os.as_str()), ("arm64", "linux"));
    assert_eq!(p.variant.as_deref(), Some("v8"));
    assert_eq!(p.os_features, Some(vec!["a".to_string()]));
    assert!(c.diff_ids().is_err());
}

#[test]
fn create_is_idempotent_and_keeps_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nested/layout");
    let l = OciLayout::open_or_create(&root).unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    assert!(root.join("blobs/sha256").is_dir());
    assert!(l.read_index().unwrap().manifests.is_empty());
    let a = Descriptor::new(media_types::OCI_MANIFEST, Digest::sha256_of(b"a"), 1);
    l.set_tag(Some("t"), a.clone()).unwrap();
    for again in [
        OciLayout::create(&root).unwrap(),
        OciLayout::open_or_create(&root).unwrap(),
    ] {
        assert_eq!(again.resolve(Some("t")).unwrap().digest, a.digest);
    }
    // Only index.json and oci-layout and blobs: no temporary files left behind.
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["blobs", "index.json", "oci-layout"]);
    std::fs::write(root.join("index.json"), b"{not json").unwrap();
    let err = l.read_index().unwrap_err().to_string();
    assert!(err.contains("index.json"), "{err}");
}

#[test]
fn set_tag_replaces_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let l = OciLayout::create(dir.path()).unwrap();
    let desc = |s: &[u8]| Descriptor::new(media_types::OCI_MANIFEST, Digest::sha256_of(s), 1);
    l.set_tag(Some("a"), desc(b"1")).unwrap();
    l.set_tag(Some("b"), desc(b"2")).unwrap();
    l.set_tag(None, desc(b"3")).unwrap();
    l.set_tag(None, desc(b"3")).unwrap();
    l.set_tag(Some("a"), desc(b"4")).unwrap();
    let index = l.read_index().unwrap();
    let got: Vec<(Digest, Option<String>)> = index
        .manifests
        .iter()
        .map(|m| {
            (
                m.digest.clone(),
                m.annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME_ANNOTATION).cloned()),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (Digest::sha256_of(b"4"), Some("a".into())),
            (Digest::sha256_of(b"2"), Some("b".into())),
            (Digest::sha256_of(b"3"), None),
        ]
    );
    assert_eq!(index.schema_version, 2);
    let err = l.resolve(None).unwrap_err().to_string();
    assert!(err.contains("3 images") && err.contains("a, b"), "{err}");
}

#[test]
fn reads_check_limits_and_name_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let l = OciLayout::create(dir.path()).unwrap();
    let big = vec![b' '; (MAX_JSON_BLOB + 1) as usize];
    let (d, size) = l.write_blob(&big).unwrap();
    let desc = Descriptor::new(media_types::OCI_MANIFEST, d.clone(), size);
    let err = l.read_manifest(&desc).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains(d.as_str()), "{err}");

    let (d, size) = l.write_blob(b"{\"schemaVersion\":2}").unwrap();
    let desc = Descriptor::new(media_types::OCI_MANIFEST, d.clone(), size);
    let err = l.read_manifest(&desc).unwrap_err().to_string();
    assert!(
        err.contains(d.as_str()) && err.contains("manifest"),
        "{err}"
    );

    let m = Manifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(media_types::OCI_CONFIG, Digest::sha256_of(b"c"), 1),
        layers: vec![],
        subject: None,
        annotations: None,
        extra: Default::default(),
    };
    let (d, size) = l.write_blob(&m.to_vec()).unwrap();
    let desc = Descriptor::new(media_types::OCI_MANIFEST, d, size);
    assert_eq!(l.read_manifest(&desc).unwrap(), m);
    let err = l.read_index_blob(&desc);
    assert!(err.is_ok(), "a manifest parses as an (empty) index");
    let (d, size) = l.write_blob(b"[1]").unwrap();
    let err = l
        .read_config(&Descriptor::new(media_types::OCI_CONFIG, d.clone(), size))
        .unwrap_err()
        .to_string();
    assert!(err.contains(d.as_str()), "{err}");
}

#[test]
fn import_checks_sha512_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let l = OciLayout::create(dir.path().join("l")).unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"data").unwrap();
    let good = Digest::parse(&format!(
        "sha512:{}",
        hex::encode(<sha2::Sha512 as sha2::Digest>::digest(b"data"))
    ))
    .unwrap();
    let (d, n) = l.import_blob_file(&file, Some(&good)).unwrap();
    assert_eq!((d.clone(), n), (Digest::sha256_of(b"data"), 4));
    assert_eq!(l.read_blob(&d).unwrap(), b"data");
    assert!(file.exists(), "the source file is left alone");
    let bad = Digest::parse(&format!("sha512:{}", "0".repeat(128))).unwrap();
    let err = l
        .import_blob_file(&file, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(bad.as_str()) && err.contains(good.as_str()),
        "{err}"
    );
    let w = l.blob_writer().unwrap();
    assert_eq!(w.size(), 0);
    assert!(format!("{w:?}").contains("BlobWriter"));
}

#[test]
fn more_layout_refs() {
    assert_eq!(
        parse_layout_ref("oci:rel/dir:tag"),
        Some(("rel/dir".into(), Some("tag".into())))
    );
    assert_eq!(
        parse_layout_ref("oci:a:b:c"),
        Some(("a:b".into(), Some("c".into())))
    );
    assert_eq!(parse_layout_ref("oci-archive:x"), None);
    assert_eq!(parse_layout_ref("oci:/abs"), Some(("/abs".into(), None)));
}

#[test]
fn host_platform_matches_itself_and_its_variantless_form() {
    let host = Platform::host();
    let expected = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        _ => host.architecture.as_str(),
    };
    assert_eq!(host.architecture, expected);
    assert!(host.matches(&host));
    let plain = Platform {
        variant: None,
        ..host.clone()
    };
    assert!(host.matches(&plain) && plain.matches(&host));
    let other_arch = Platform {
        architecture: if host.architecture == "s390x" {
            "amd64"
        } else {
            "s390x"
        }
        .into(),
        ..host.clone()
    };
    assert!(!host.matches(&other_arch));
}
