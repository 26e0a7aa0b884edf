//! TLS settings from hosts.toml against a real registry serving HTTPS: a private CA,
//! skip_verify, and client certificates (mutual TLS).

use estargz_registry::{ClientConfig, Error, HostsConfig, ImageRef, RegistryClient, RetryPolicy};
use estargz_testutil::TestRegistry;

fn client_with_hosts(reg: &TestRegistry, body: &str) -> (RegistryClient, tempfile::TempDir) {
    client_for(
        &reg.addr,
        &format!("server = \"https://{}\"\n{body}", reg.addr),
    )
}

/// A client whose only hosts.toml is `hosts` for `registry`.
fn client_for(registry: &str, hosts: &str) -> (RegistryClient, tempfile::TempDir) {
    let dir = estargz_testutil::hosts_dir(registry, hosts);
    let c = RegistryClient::new(ClientConfig {
        hosts: HostsConfig {
            dirs: vec![dir.path().to_path_buf()],
            insecure: vec![],
        },
        retry: RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        },
        ..Default::default()
    });
    (c, dir)
}

async fn reachable(c: &RegistryClient, reg: &TestRegistry) -> Result<(), Error> {
    let image: ImageRef = format!("{}/tls/app:missing", reg.addr).parse().unwrap();
    // A successful TLS exchange ends in "not found" for a tag that does not exist.
    match c.resolve(&image).await {
        Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => panic!("the tag should not exist"),
    }
}

#[tokio::test]
async fn private_ca_and_skip_verify() {
    let reg = TestRegistry::start_tls(false);
    let ca = reg.dir().join("ca.crt");
    let (c, _d) = client_with_hosts(&reg, &format!("ca = \"{}\"\n", ca.display()));
    reachable(&c, &reg).await.unwrap();
    // Without the CA the certificate is refused, and the error says it is about TLS.
    let (c, _d) = client_with_hosts(&reg, "");
    let e = reachable(&c, &reg).await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    let (c, _d) = client_with_hosts(&reg, "skip_verify = true\n");
    reachable(&c, &reg).await.unwrap();
    // A CA file that holds no certificate is a configuration error.
    let (c, _d) = client_with_hosts(
        &reg,
        &format!("ca = \"{}\"\n", reg.dir().join("server.key").display()),
    );
    assert!(matches!(reachable(&c, &reg).await, Err(Error::Tls { .. })));
}

#[tokio::test]
async fn client_certificates() {
    let reg = TestRegistry::start_tls(true);
    let ca = reg.dir().join("ca.crt");
    let cert = reg.dir().join("client.crt");
    let key = reg.dir().join("client.key");
    let (c, _d) = client_with_hosts(
        &reg,
        &format!(
            "ca = \"{}\"\nclient = [[\"{}\", \"{}\"]]\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    reachable(&c, &reg).await.unwrap();
    let (c, _d) = client_with_hosts(&reg, &format!("ca = \"{}\"\n", ca.display()));
    assert!(
        reachable(&c, &reg).await.is_err(),
        "a client certificate is required"
    );
}

#[tokio::test]
async fn a_hosts_skip_verify_does_not_follow_its_redirects() {
    // The redirect target serves a certificate nobody trusts; the host that redirects
    // there is configured with skip_verify, which must not apply to the target.
    let reg = TestRegistry::start_tls(false);
    let target = format!("https://{}/v2/tls/app/manifests/missing", reg.addr);
    let stub = estargz_testutil::StubServer::start(move |_, _| {
        estargz_testutil::StubAnswer::new(307, &format!("Location: {target}\r\n"), "")
    });
    let (c, _dir) = client_for(
        &stub.addr,
        &format!("server = \"http://{}\"\nskip_verify = true\n", stub.addr),
    );
    let image: ImageRef = format!("{}/tls/app:missing", stub.addr).parse().unwrap();
    let e = c.resolve(&image).await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}
