//! TLS settings per host: system roots plus `ca` files, client certificates, `skip_verify`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};
use crate::hosts::RegistryHost;

/// The system's trusted roots (loading them reads and parses every file of the system's
/// CA directory: about 40 ms, once per client rather than once per host).
pub(crate) fn system_roots() -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    Arc::new(roots)
}

/// Builds the rustls configuration for `host`, trusting `system` roots and the host's own.
pub(crate) fn client_config(
    host: &RegistryHost,
    system: impl FnOnce() -> Arc<RootCertStore>,
) -> Result<rustls::ClientConfig> {
    let err = |detail: String| Error::Tls {
        host: host.authority(),
        detail,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?;
    let builder = if host.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
    } else {
        let mut roots = system();
        for ca in &host.ca {
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| err(format!("reading CA {}: {e}", ca.display())))?;
            let mut n = 0;
            for c in certs {
                let c = c.map_err(|e| err(format!("CA {}: {e}", ca.display())))?;
                Arc::make_mut(&mut roots)
                    .add(c)
                    .map_err(|e| err(format!("CA {}: {e}", ca.display())))?;
                n += 1;
            }
            if n == 0 {
                return Err(err(format!("CA {} holds no certificate", ca.display())));
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match host.client.first() {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| {
                    err(format!(
                        "reading client certificate {}: {e}",
                        cert.display()
                    ))
                })?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| err(format!("client certificate {}: {e}", cert.display())))?;
            let key_path = key.as_ref().unwrap_or(cert);
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| err(format!("reading client key {}: {e}", key_path.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| err(format!("client certificate: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// `skip_verify = true`: accept any server certificate (signatures are still checked).
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
