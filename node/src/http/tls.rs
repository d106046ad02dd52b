//! TLS client configuration shared by every connection of a node: webpki roots, or a
//! verifier that accepts any certificate when the operator opted out of verification for a
//! test environment. Owns only building the `rustls::ClientConfig`; handshakes happen in
//! the client when a connection is opened, never per request. The config is built once
//! and shared behind an `Arc` (rustls keeps its session-resumption cache inside it).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::error::{HttpError, HttpErrorKind};

/// Builds the client config. `alpn` lists the protocols to offer, most preferred first.
pub(crate) fn client_config(insecure: bool, alpn: &[&[u8]]) -> Result<ClientConfig, HttpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            HttpError::new(
                HttpErrorKind::Tls,
                format!("cannot set up TLS protocol versions: {e}"),
            )
        })?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth()
    } else {
        let roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Skips certificate and host-name checks but still checks handshake signatures, so the
/// connection is encrypted to whoever holds the presented key: exactly "no verification",
/// nothing weaker.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_and_insecure_configs_build_with_alpn() {
        let secure = client_config(false, &[b"h2", b"http/1.1"]).unwrap();
        assert_eq!(
            secure.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let insecure = client_config(true, &[b"http/1.1"]).unwrap();
        assert_eq!(insecure.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn insecure_verifier_accepts_any_certificate_but_knows_schemes() {
        let v = AcceptAnyCertificate {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        let name = ServerName::try_from("example.invalid").unwrap();
        let junk = CertificateDer::from(vec![1u8, 2, 3]);
        assert!(v
            .verify_server_cert(&junk, &[], &name, &[], UnixTime::now())
            .is_ok());
        assert!(v
            .supported_verify_schemes()
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    }
}
