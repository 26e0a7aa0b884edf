//! Registry faults through a proxy the test controls (in front of a real docker-registry):
//! every fault ends in a correct result after retries or in a clear error, never in wrong
//! data. Also: hosts that answer a range request with the whole blob, and redirects that
//! must keep the Range header.

use std::time::{Duration, Instant};

use estargz_format::{convert, decompress_chunk, ConvertOptions, EstargzReader, OpenOptions};
use estargz_oci::{media_types, Descriptor, Digest};
use estargz_registry::{ClientConfig, Credentials, Error, ImageRef, RegistryClient, RetryPolicy};
use estargz_testutil::{
    noise, synthetic_tar, Fault, FaultProxy, StubAnswer, StubServer, TestRegistry,
};

fn client() -> RegistryClient {
    RegistryClient::new(ClientConfig {
        credentials: Credentials::none(),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(2),
        },
        request_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_secs(1),
        ..Default::default()
    })
}

struct Setup {
    _reg: TestRegistry,
    proxy: FaultProxy,
    image: ImageRef,
    desc: Descriptor,
    blob: Vec<u8>,
}

/// A registry holding `blob`, and a proxy in front of it.
async fn setup(blob: Vec<u8>) -> Setup {
    let reg = TestRegistry::start(None);
    let direct: ImageRef = format!("{}/faults/blob:v1", reg.addr).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &blob).unwrap();
    let digest = Digest::sha256_of(&blob);
    client()
        .push_blob(&direct, &digest, &path, None)
        .await
        .unwrap();
    let proxy = FaultProxy::start(&reg.addr);
    let image: ImageRef = format!("{}/faults/blob:v1", proxy.addr).parse().unwrap();
    let desc = Descriptor::new(media_types::OCI_LAYER_GZIP, digest, blob.len() as u64);
    Setup {
        _reg: reg,
        proxy,
        image,
        desc,
        blob,
    }
}

#[tokio::test]
async fn transient_faults_are_retried_to_a_correct_result() {
    let s = setup(noise(600_000, 9)).await;
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let faults = [
        Fault::Reset,
        Fault::Status(500),
        Fault::Status(503),
        Fault::Truncate,
        Fault::Stall(Duration::from_secs(3)),
        Fault::CorruptBody,
    ];
    for fault in faults {
        // Ranged read.
        s.proxy.push(fault.clone());
        let before = s.proxy.blob_requests();
        let r = c.fetch_range(&s.image, &s.desc.digest, 1000..200_000).await;
        let r = r.unwrap_or_else(|e| panic!("range after {fault:?}: {e}"));
        if fault != Fault::CorruptBody {
            // A range has no digest of its own: corruption is caught by chunk digests (see
            // corrupted_ranges_never_become_file_content); every other fault is retried.
            assert!(
                r[..] == s.blob[1000..200_000],
                "wrong range after {fault:?}"
            );
            assert!(
                s.proxy.blob_requests() - before >= 2,
                "{fault:?} was not retried"
            );
        }
        // Whole blob: size and digest are checked, so corruption is retried too.
        s.proxy.push(fault.clone());
        let before = s.proxy.blob_requests();
        let out = dir.path().join("blob");
        c.download_blob(&s.image, &s.desc, &out, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("download after {fault:?}: {e}"));
        assert!(
            std::fs::read(&out).unwrap() == s.blob,
            "wrong blob after {fault:?}"
        );
        assert!(
            s.proxy.blob_requests() - before >= 2,
            "{fault:?} was not retried"
        );
    }
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let s = setup(noise(10_000, 3)).await;
    let c = client();
    s.proxy.push(Fault::TooManyRequests(1));
    let start = Instant::now();
    let r = c
        .fetch_range(&s.image, &s.desc.digest, 0..100)
        .await
        .unwrap();
    assert_eq!(&r[..], &s.blob[..100]);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "Retry-After was not respected"
    );
}

#[tokio::test]
async fn persistent_faults_end_in_clear_errors() {
    let s = setup(noise(10_000, 4)).await;
    let c = client();
    s.proxy.set_always(Some(Fault::Status(500)));
    let before = s.proxy.blob_requests();
    let e = c
        .fetch_range(&s.image, &s.desc.digest, 10..20)
        .await
        .unwrap_err();
    assert_eq!(s.proxy.blob_requests() - before, 4, "retries are bounded");
    let msg = e.to_string();
    assert!(matches!(e, Error::Status { status: 500, .. }), "{e}");
    assert!(
        msg.contains(&s.proxy.addr)
            && msg.contains("faults/blob")
            && msg.contains(s.desc.digest.as_str())
            && msg.contains("10-19"),
        "{msg}"
    );
    s.proxy.set_always(Some(Fault::Reset));
    let e = c
        .fetch_range(&s.image, &s.desc.digest, 10..20)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    s.proxy.set_always(Some(Fault::Truncate));
    let e = c
        .download_blob(
            &s.image,
            &s.desc,
            &tempfile::tempdir().unwrap().path().join("b"),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::BadResponse { .. } | Error::Transport { .. }),
        "{e}"
    );
    // Once the registry is healthy again, the same client succeeds.
    s.proxy.set_always(None);
    let r = c
        .fetch_range(&s.image, &s.desc.digest, 10..20)
        .await
        .unwrap();
    assert_eq!(&r[..], &s.blob[10..20]);
}

#[tokio::test]
async fn corrupted_ranges_never_become_file_content() {
    // A registry that flips bytes in a range: the chunk digest check refuses the chunk.
    let tar = synthetic_tar();
    let mut blob = Vec::new();
    convert(
        &tar[..],
        &mut blob,
        &ConvertOptions {
            compression_level: 1,
            ..Default::default()
        },
        &(),
    )
    .unwrap();
    let s = setup(blob.clone()).await;
    let reader = EstargzReader::open(&blob[..], &OpenOptions::default()).unwrap();
    let idx = reader.toc().lookup("srv/huge.bin").unwrap();
    let entry = reader.toc().entry(idx);
    let chunk = entry.chunks[1];
    let c = client();
    s.proxy.push(Fault::CorruptBody);
    let bytes = c
        .fetch_range(&s.image, &s.desc.digest, chunk.offset..chunk.compressed_end)
        .await
        .unwrap();
    assert!(decompress_chunk(&bytes, &entry.name, &chunk).is_err());
    // Fetched again cleanly, it verifies.
    let bytes = c
        .fetch_range(&s.image, &s.desc.digest, chunk.offset..chunk.compressed_end)
        .await
        .unwrap();
    let data = decompress_chunk(&bytes, &entry.name, &chunk).unwrap();
    assert_eq!(data.len() as u64, chunk.size);
}

#[tokio::test]
async fn redirects_keep_the_range_header() {
    let s = setup(noise(50_000, 8)).await;
    s.proxy.set_always(Some(Fault::Redirect));
    let c = client();
    let r = c
        .fetch_range(&s.image, &s.desc.digest, 100..300)
        .await
        .unwrap();
    assert!(r[..] == s.blob[100..300]);
}

/// A host that ignores `Range` still gives the right tail and size (the whole blob is read,
/// within a limit); a truncated answer is retried, never returned short.
#[tokio::test]
async fn tail_of_a_blob_through_faults() {
    let s = setup(noise(100_000, 9)).await;
    let c = client();
    s.proxy.push(Fault::IgnoreRange);
    let (tail, size) = c.fetch_tail(&s.image, &s.desc.digest, 5000).await.unwrap();
    assert_eq!(size, 100_000);
    assert!(tail[..] == s.blob[95_000..]);
    s.proxy.push(Fault::Truncate);
    s.proxy.push(Fault::Status(503));
    let (tail, size) = c
        .fetch_tail(&s.image, &s.desc.digest, 70_000)
        .await
        .unwrap();
    assert_eq!(size, 100_000);
    assert!(tail[..] == s.blob[30_000..]);
}

#[tokio::test]
async fn endless_bodies_are_not_read_to_their_end() {
    let s = setup(noise(10_000, 5)).await;
    let c = client();
    let bound = Duration::from_secs(30);
    // A 200 answer to a range request: only the bytes up to the range's end are read.
    s.proxy.push(Fault::Endless(200));
    let r = tokio::time::timeout(
        bound,
        c.fetch_range(&s.image, &s.desc.digest, 100_000..100_010),
    )
    .await
    .expect("a whole-blob answer to a range was read to its end")
    .unwrap();
    assert_eq!(&r[..], &[0u8; 10], "the endless body's bytes at the range");
    assert!(s.proxy.blob_bytes_served() < 64 << 20);
    // Error bodies are only shown: a little is read, then the error.
    s.proxy.set_always(Some(Fault::Endless(500)));
    let e = tokio::time::timeout(bound, c.fetch_range(&s.image, &s.desc.digest, 0..10))
        .await
        .expect("an endless error body was read to its end")
        .unwrap_err();
    assert!(matches!(e, Error::Status { status: 500, .. }), "{e}");
    // A 200 answer to a request for the whole blob stops at the size it must have.
    s.proxy.set_always(Some(Fault::Endless(200)));
    let e = tokio::time::timeout(
        bound,
        c.download_blob(
            &s.image,
            &s.desc,
            &tempfile::tempdir().unwrap().path().join("b"),
            &|_| {},
        ),
    )
    .await
    .expect("an endless blob was downloaded to its end")
    .unwrap_err();
    assert!(
        matches!(e, Error::BadResponse { .. } | Error::DigestMismatch { .. }),
        "{e}"
    );
    s.proxy.set_always(None);
}

/// A registry on 127.0.0.1 that wants a bearer token from its own `/token`, answered with
/// `token_body` (or an endless body when `None`); with the token, every blob is `0123456789`.
fn token_registry(token_body: Option<&'static str>) -> StubServer {
    StubServer::start(move |req, own| {
        if req.path().starts_with("/token") {
            match token_body {
                Some(b) => StubAnswer::new(200, "", b),
                None => StubAnswer::Endless(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"token\":\"".into(),
                ),
            }
        } else if req.header("authorization") == Some("Bearer t") {
            StubAnswer::new(200, "", "0123456789")
        } else {
            let challenge =
                format!("WWW-Authenticate: Bearer realm=\"http://{own}/token\",service=\"t\"\r\n");
            StubAnswer::new(401, &challenge, "")
        }
    })
}

#[tokio::test]
async fn hostile_token_servers_end_in_errors_not_panics() {
    let digest = Digest::sha256_of(b"0123456789");
    // A token that claims to last longer than the clock can count.
    let reg = token_registry(Some(r#"{"token":"t","expires_in":18446744073709551615}"#));
    let image: ImageRef = format!("{}/hostile/token:v1", reg.addr).parse().unwrap();
    let c = client();
    let r = c.fetch_range(&image, &digest, 2..5).await.unwrap();
    assert_eq!(&r[..], b"234");
    // The token is cached and reused.
    let r = c.fetch_range(&image, &digest, 0..1).await.unwrap();
    assert_eq!(&r[..], b"0");
    // A token response that never ends is cut off with an error.
    let reg = token_registry(None);
    let image: ImageRef = format!("{}/hostile/token:v1", reg.addr).parse().unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        client().fetch_range(&image, &digest, 0..1),
    )
    .await
    .expect("an endless token body was read to its end")
    .unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("limit"), "{e}");
}

#[tokio::test]
async fn content_ranges_at_the_edge_of_u64_are_refused_not_overflowed() {
    for range in [
        "bytes 0-18446744073709551615/0",
        "bytes 18446744073709551615-18446744073709551615/18446744073709551615",
    ] {
        let header = format!("Content-Range: {range}\r\n");
        let s = StubServer::start(move |_, _| StubAnswer::new(206, &header, "x"));
        let image: ImageRef = format!("{}/app/x:v1", s.addr).parse().unwrap();
        let e = client()
            .fetch_tail(&image, &Digest::sha256_of(b"x"), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::BadResponse { .. }), "{range}: {e}");
    }
}
