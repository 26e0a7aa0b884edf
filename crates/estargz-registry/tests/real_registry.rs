//! The client against a real registry (Debian's docker-registry on 127.0.0.1).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use estargz_oci::{media_types, Descriptor, Digest, Platform};
use estargz_registry::{
    ClientConfig, Credential, Credentials, Error, ImageRef, PushOutcome, RegistryClient,
};
use estargz_testutil::{noise, TestRegistry};

fn client(creds: Credentials) -> RegistryClient {
    RegistryClient::new(ClientConfig {
        credentials: creds,
        ..Default::default()
    })
}

/// Pushes a one-layer image; returns (image ref, layer bytes, layer descriptor, manifest digest).
async fn push_image(
    c: &RegistryClient,
    addr: &str,
    repo: &str,
    layer: &[u8],
) -> (ImageRef, Descriptor, Digest) {
    let image: ImageRef = format!("{addr}/{repo}:v1").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layer_path = dir.path().join("layer");
    std::fs::write(&layer_path, layer).unwrap();
    let layer_digest = Digest::sha256_of(layer);
    assert_eq!(
        c.push_blob(&image, &layer_digest, &layer_path, None)
            .await
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(
        c.push_blob(&image, &layer_digest, &layer_path, None)
            .await
            .unwrap(),
        PushOutcome::AlreadyPresent
    );
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        Platform::host().architecture,
        layer_digest
    );
    let config_path = dir.path().join("config");
    std::fs::write(&config_path, &config).unwrap();
    let config_digest = Digest::sha256_of(config.as_bytes());
    c.push_blob(&image, &config_digest, &config_path, None)
        .await
        .unwrap();
    let layer_desc = Descriptor::new(
        media_types::OCI_LAYER_GZIP,
        layer_digest,
        layer.len() as u64,
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]}}"#,
        media_types::OCI_MANIFEST,
        serde_json::to_string(&Descriptor::new(
            media_types::OCI_CONFIG,
            config_digest,
            config.len() as u64
        ))
        .unwrap(),
        serde_json::to_string(&layer_desc).unwrap()
    );
    let md = c
        .push_manifest(
            &image,
            "v1",
            media_types::OCI_MANIFEST,
            Bytes::from(manifest),
        )
        .await
        .unwrap();
    (image, layer_desc, md)
}

#[tokio::test]
async fn resolve_pull_ranges_and_push() {
    let reg = TestRegistry::start(None);
    let c = client(Credentials::none());
    let layer = noise(3 * 1024 * 1024 + 7, 11);
    let (image, layer_desc, manifest_digest) = push_image(&c, &reg.addr, "test/app", &layer).await;

    let desc = c.resolve(&image).await.unwrap();
    assert_eq!(desc.digest, manifest_digest);
    assert_eq!(desc.media_type, media_types::OCI_MANIFEST);
    let (_, manifest) = c.resolve_manifest(&image, &Platform::host()).await.unwrap();
    assert_eq!(manifest.layers[0].digest, layer_desc.digest);
    // By digest too, and a wrong digest is refused.
    let by_digest = image.with_reference(manifest_digest.as_str());
    assert_eq!(c.resolve(&by_digest).await.unwrap().digest, manifest_digest);

    // Whole blob, streamed to a file, verified.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blob");
    let seen = AtomicU64::new(0);
    c.download_blob(&image, &layer_desc, &out, &|n| {
        seen.store(n, Ordering::Relaxed)
    })
    .await
    .unwrap();
    assert!(std::fs::read(&out).unwrap() == layer);
    assert_eq!(seen.load(Ordering::Relaxed), layer.len() as u64);

    // Single ranges: the middle, the first bytes and the last bytes of the blob.
    let ranges = [
        1000..5000,
        0..10,
        (layer.len() as u64 - 7)..layer.len() as u64,
    ];
    for r in ranges {
        let got = c
            .fetch_range(&image, &layer_desc.digest, r.clone())
            .await
            .unwrap();
        assert_eq!(&got[..], &layer[r.start as usize..r.end as usize]);
    }
    // The tail of a blob, with its size, in one suffix range request; all of a short blob.
    let (tail, size) = c
        .fetch_tail(&image, &layer_desc.digest, 4096)
        .await
        .unwrap();
    assert_eq!(size, layer.len() as u64);
    assert_eq!(&tail[..], &layer[layer.len() - 4096..]);
    let (all, size) = c
        .fetch_tail(&image, &layer_desc.digest, 1 << 40)
        .await
        .unwrap();
    assert_eq!(
        (all.len() as u64, size),
        (layer.len() as u64, layer.len() as u64)
    );

    // Cross-repository mount.
    let other: ImageRef = format!("{}/test/other:v1", reg.addr).parse().unwrap();
    let layer_path = dir.path().join("layer");
    std::fs::write(&layer_path, &layer).unwrap();
    assert_eq!(
        c.push_blob(&other, &layer_desc.digest, &layer_path, Some("test/app"))
            .await
            .unwrap(),
        PushOutcome::Mounted
    );
    assert_eq!(
        c.blob_exists(&other, &layer_desc.digest).await.unwrap(),
        Some(layer.len() as u64)
    );

    // Errors name what was asked for.
    let missing = Digest::sha256_of(b"missing");
    let e = c.fetch_range(&image, &missing, 0..10).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&reg.addr)
            && msg.contains("test/app")
            && msg.contains(missing.as_str())
            && msg.contains("0-9"),
        "{msg}"
    );
    let e = c.resolve(&image.with_reference("nope")).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    // A digest mismatch on download is refused: ask for the layer with another size.
    let mut wrong = layer_desc.clone();
    wrong.size -= 1;
    let e = c
        .download_blob(&image, &wrong, &dir.path().join("bad"), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BadResponse { .. }), "{e}");
    assert!(!dir.path().join("bad").exists());
}

#[tokio::test]
async fn basic_auth_from_docker_config() {
    let reg = TestRegistry::start(Some(("alice", "s3cret")));
    let anon = client(Credentials::none());
    let image: ImageRef = format!("{}/private/app:v1", reg.addr).parse().unwrap();
    let e = anon.resolve(&image).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("docker login"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let auth = base64_encode(b"alice:s3cret");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let creds = Credentials::from_docker_config(&cfg).unwrap();
    let c = client(creds);
    let layer = noise(10_000, 5);
    let (image, layer_desc, md) = push_image(&c, &reg.addr, "private/app", &layer).await;
    assert_eq!(c.resolve(&image).await.unwrap().digest, md);
    let r = c
        .fetch_range(&image, &layer_desc.digest, 10..20)
        .await
        .unwrap();
    assert_eq!(&r[..], &layer[10..20]);

    let mut wrong = Credentials::none();
    wrong.insert(
        &reg.addr,
        Credential::Basic {
            username: "alice".into(),
            password: "nope".into(),
        },
    );
    let e = client(wrong).resolve(&image).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn bearer_tokens_from_the_challenge_are_cached_per_scope() {
    let reg = TestRegistry::start_with_tokens("bob", "tok3n");
    let image: ImageRef = format!("{}/team/app:v1", reg.addr).parse().unwrap();
    // Anonymous: the token server refuses, and the error says so.
    let e = client(Credentials::none())
        .resolve(&image)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");

    let mut creds = Credentials::none();
    creds.insert(
        &reg.addr,
        Credential::Basic {
            username: "bob".into(),
            password: "tok3n".into(),
        },
    );
    let c = client(creds);
    let layer = noise(50_000, 21);
    let (image, layer_desc, md) = push_image(&c, &reg.addr, "team/app", &layer).await;
    assert_eq!(c.resolve(&image).await.unwrap().digest, md);
    let issued = reg.tokens_issued();
    for i in 0..10u64 {
        let r = c
            .fetch_range(&image, &layer_desc.digest, i * 100..i * 100 + 50)
            .await
            .unwrap();
        assert_eq!(&r[..], &layer[(i * 100) as usize..(i * 100 + 50) as usize]);
    }
    // Ten reads with the pull scope reuse one cached token (at most one new one).
    assert!(reg.tokens_issued() - issued <= 1, "tokens are not cached");
    assert!(
        issued <= 3,
        "{issued} tokens for one push: one per scope expected"
    );
}

#[tokio::test]
async fn hosts_toml_mirror_is_preferred_and_skipped_when_down() {
    let upstream = TestRegistry::start(None);
    let mirror = TestRegistry::start(None);
    let c = client(Credentials::none());
    let layer = noise(20_000, 31);
    let (_, layer_desc, md) = push_image(&c, &upstream.addr, "lib/app", &layer).await;
    // The mirror holds the same image, plus a tag only it has.
    push_image(&c, &mirror.addr, "lib/app", &layer).await;
    let mirror_only: ImageRef = format!("{}/lib/app:mirror-only", mirror.addr)
        .parse()
        .unwrap();
    let (_, body) = c
        .get_manifest(&mirror_only.with_reference("v1"))
        .await
        .unwrap();
    c.push_manifest(&mirror_only, "mirror-only", media_types::OCI_MANIFEST, body)
        .await
        .unwrap();
    let proxy = estargz_testutil::FaultProxy::start(&mirror.addr);

    let dir = tempfile::tempdir().unwrap();
    let write_hosts = |mirror_addr: &str| {
        let d = dir.path().join(&upstream.addr);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{}\"\n\n[host.\"http://{mirror_addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                upstream.addr
            ),
        )
        .unwrap();
    };
    let with_hosts = || {
        RegistryClient::new(ClientConfig {
            hosts: estargz_registry::HostsConfig {
                dirs: vec![dir.path().to_path_buf()],
                insecure: vec![],
            },
            retry: estargz_registry::RetryPolicy {
                max_attempts: 2,
                initial_backoff: std::time::Duration::from_millis(10),
                max_backoff: std::time::Duration::from_millis(100),
            },
            ..Default::default()
        })
    };
    // Mirror up: a tag only the mirror has resolves through the upstream's name, and blob
    // reads go to the mirror.
    write_hosts(&proxy.addr);
    let mc = with_hosts();
    let via_upstream_name: ImageRef = format!("{}/lib/app:mirror-only", upstream.addr)
        .parse()
        .unwrap();
    assert_eq!(mc.resolve(&via_upstream_name).await.unwrap().digest, md);
    let before = proxy.blob_requests();
    let r = mc
        .fetch_range(&via_upstream_name, &layer_desc.digest, 0..10)
        .await
        .unwrap();
    assert_eq!(&r[..], &layer[..10]);
    assert_eq!(
        proxy.blob_requests() - before,
        1,
        "the mirror served the blob"
    );

    // Mirror down: the upstream answers.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    write_hosts(&dead);
    let dc = with_hosts();
    let image: ImageRef = format!("{}/lib/app:v1", upstream.addr).parse().unwrap();
    assert_eq!(dc.resolve(&image).await.unwrap().digest, md);
    let r = dc
        .fetch_range(&image, &layer_desc.digest, 5..15)
        .await
        .unwrap();
    assert_eq!(&r[..], &layer[5..15]);
    // The mirror-only tag is not on the upstream.
    assert!(matches!(
        dc.resolve(&via_upstream_name).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn identity_tokens_use_the_oauth2_refresh_grant() {
    let reg = TestRegistry::start_with_tokens("carol", "pw");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"identitytoken":"pw-refresh"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let c = client(Credentials::from_docker_config(&cfg).unwrap());
    let layer = noise(5_000, 41);
    let (image, layer_desc, md) = push_image(&c, &reg.addr, "oauth/app", &layer).await;
    assert_eq!(c.resolve(&image).await.unwrap().digest, md);
    let r = c
        .fetch_range(&image, &layer_desc.digest, 0..64)
        .await
        .unwrap();
    assert_eq!(&r[..], &layer[..64]);
    let mut wrong = Credentials::none();
    wrong.insert(&reg.addr, Credential::IdentityToken("stale".into()));
    let e = client(wrong).resolve(&image).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
}
