//! What the client sends where: a host's credentials, `hosts.toml` headers and TLS settings
//! stay with that host. Redirect targets, mirrors and token servers elsewhere get none of
//! them, and credentials or tokens never cross plain HTTP except on loopback.

use std::time::Duration;

use estargz_oci::Digest;
use estargz_registry::{
    ClientConfig, Credential, Credentials, Error, HostsConfig, ImageRef, RegistryClient,
    RetryPolicy,
};
use estargz_testutil::{StubAnswer, StubServer};

fn client(credentials: Credentials, hosts: Option<&std::path::Path>) -> RegistryClient {
    RegistryClient::new(ClientConfig {
        credentials,
        hosts: HostsConfig {
            dirs: hosts.map(|d| vec![d.to_path_buf()]).unwrap_or_default(),
            insecure: vec![],
        },
        retry: RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    })
}

fn basic(user: &str, password: &str) -> Credential {
    Credential::Basic {
        username: user.into(),
        password: password.into(),
    }
}

fn digest() -> Digest {
    Digest::sha256_of(b"0123456789")
}

/// Blob storage elsewhere: serves any blob.
fn storage() -> StubServer {
    StubServer::start(|_, _| StubAnswer::new(206, "Content-Range: bytes 0-9/10\r\n", "0123456789"))
}

#[tokio::test]
async fn redirects_elsewhere_carry_neither_credentials_nor_host_headers() {
    let storage = storage();
    let target = format!("http://{}/blob", storage.addr);
    // The registry wants a password, then redirects blob reads to the storage.
    let registry = StubServer::start(move |req, _| match req.header("authorization") {
        Some(_) => StubAnswer::new(307, &format!("Location: {target}\r\n"), ""),
        None => StubAnswer::new(401, "WWW-Authenticate: Basic realm=\"r\"\r\n", ""),
    });
    let dir = estargz_testutil::hosts_dir(
        &registry.addr,
        &format!(
            "server = \"http://{0}\"\n[header]\n  x-secret = \"for the registry only\"\n",
            registry.addr
        ),
    );
    let mut creds = Credentials::none();
    creds.insert(&registry.addr, basic("user", "registry-password"));
    let c = client(creds, Some(dir.path()));
    let image: ImageRef = format!("{}/app/x:v1", registry.addr).parse().unwrap();
    let got = c.fetch_range(&image, &digest(), 0..10).await.unwrap();
    assert_eq!(&got[..], b"0123456789");
    let at_registry = registry.requests();
    assert!(at_registry
        .iter()
        .any(|r| r.header("authorization").is_some()));
    assert!(at_registry.iter().all(|r| r.header("x-secret").is_some()));
    let at_storage = storage.requests();
    assert_eq!(at_storage.len(), 1, "{at_storage:?}");
    let r = &at_storage[0];
    assert_eq!(r.header("range"), Some("bytes=0-9"), "the range goes along");
    assert_eq!(r.header("authorization"), None, "{r:?}");
    assert_eq!(r.header("x-secret"), None, "{r:?}");
}

#[tokio::test]
async fn a_mirror_never_gets_the_registrys_credentials() {
    // The mirror asks for a password; the client has one, but for the registry only.
    let mirror = StubServer::start(|req, _| match req.header("authorization") {
        Some(_) => StubAnswer::new(206, "Content-Range: bytes 0-9/10\r\n", "0123456789"),
        None => StubAnswer::new(401, "WWW-Authenticate: Basic realm=\"m\"\r\n", ""),
    });
    let upstream = "127.0.0.1:9"; // discard port: nothing answers
    let dir = estargz_testutil::hosts_dir(
        upstream,
        &format!(
            "server = \"http://{upstream}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr
        ),
    );
    let mut creds = Credentials::none();
    creds.insert(upstream, basic("user", "registry-password"));
    let image: ImageRef = format!("{upstream}/app/x:v1").parse().unwrap();
    let e = client(creds, Some(dir.path()))
        .fetch_range(&image, &digest(), 0..10)
        .await
        .unwrap_err();
    assert!(
        mirror
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "the registry's password went to the mirror"
    );
    drop(e);
    // With credentials of its own, the mirror gets those.
    let mut creds = Credentials::none();
    creds.insert(upstream, basic("user", "registry-password"));
    creds.insert(&mirror.addr, basic("m", "mirror-password"));
    let got = client(creds, Some(dir.path()))
        .fetch_range(&image, &digest(), 0..10)
        .await
        .unwrap();
    assert_eq!(&got[..], b"0123456789");
    let sent: Vec<_> = mirror
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(String::from))
        .collect();
    assert_eq!(
        sent,
        ["Basic bTptaXJyb3ItcGFzc3dvcmQ="],
        "m:mirror-password"
    );
}

#[tokio::test]
async fn token_servers_on_plain_http_elsewhere_are_refused() {
    // 192.0.2.1 (TEST-NET-1) is never contacted: the realm is refused before.
    let registry = StubServer::start(|_, _| {
        StubAnswer::new(
            401,
            "WWW-Authenticate: Bearer realm=\"http://192.0.2.1/token\",service=\"s\"\r\n",
            "",
        )
    });
    let image: ImageRef = format!("{}/app/x:v1", registry.addr).parse().unwrap();
    let mut creds = Credentials::none();
    creds.insert(&registry.addr, basic("user", "pw"));
    for creds in [Credentials::none(), creds] {
        let e = tokio::time::timeout(
            Duration::from_secs(20),
            client(creds, None).fetch_range(&image, &digest(), 0..10),
        )
        .await
        .expect("the token server was contacted")
        .unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
        assert!(e.to_string().contains("plain HTTP"), "{e}");
    }
}

#[tokio::test]
async fn a_redirect_targets_challenge_gets_none_of_the_registrys_credentials() {
    // A token server the storage names: it must never be asked, with the registry's
    // password or without.
    let tokens = StubServer::start(|_, _| StubAnswer::new(200, "", r#"{"token":"t"}"#));
    let realm = format!("http://{}/token", tokens.addr);
    let storage = StubServer::start(move |_, _| {
        StubAnswer::new(
            401,
            &format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"cdn\"\r\n"),
            "",
        )
    });
    let target = format!("http://{}/blob", storage.addr);
    // The registry lets anyone read, and has the client's password all the same.
    let registry =
        StubServer::start(move |_, _| StubAnswer::new(307, &format!("Location: {target}\r\n"), ""));
    let mut creds = Credentials::none();
    creds.insert(&registry.addr, basic("user", "registry-password"));
    let image: ImageRef = format!("{}/app/x:v1", registry.addr).parse().unwrap();
    let e = client(creds, None)
        .fetch_range(&image, &digest(), 0..10)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    assert!(
        e.to_string().contains(&storage.addr),
        "says who refused: {e}"
    );
    assert!(tokens.requests().is_empty(), "{:?}", tokens.requests());
    assert!(storage
        .requests()
        .iter()
        .all(|r| r.header("authorization").is_none()));
}
