//! TLS for the data plane: the relay's certificate is pinned by the SHA-256 of its DER
//! bytes, which the coordinator hands out in `RelayEndpoint.cert_sha256`. There is no CA:
//! the pin is the trust anchor, and the TLS 1.3 handshake signature is still verified so
//! the server must hold the pinned certificate's private key.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// QUIC keep-alive: a few per idle timeout, so a quiet but healthy session never idles
/// out and a dead relay is noticed within [`MAX_IDLE_MS`].
pub const KEEP_ALIVE: Duration = Duration::from_millis(400);
/// A relay silent for this long is gone and the agent resumes elsewhere. Far below
/// quinn's 30 s default: a customer on the phone notices seconds. The effective idle
/// timeout is the smaller of both ends' values, so this one wins over the relay's.
pub const MAX_IDLE_MS: u32 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("relay certificate pin must be 32 bytes (SHA-256), got {0}")]
    BadPin(usize),
    #[error("cannot build the TLS 1.3 client configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration is unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Accepts exactly one server certificate: the one whose DER hashes to the pin.
#[derive(Debug)]
pub struct PinnedCertVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedCertVerifier {
    pub fn new(pin: &[u8], provider: &CryptoProvider) -> Result<Self, TlsError> {
        let pin: [u8; 32] = pin.try_into().map_err(|_| TlsError::BadPin(pin.len()))?;
        Ok(Self {
            pin,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin names one certificate, so name, chain and validity period add nothing:
        // rotating the certificate means the coordinator publishes a new pin.
        let digest = Sha256::digest(end_entity.as_ref());
        if digest.as_slice() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only; a TLS 1.2 signature here means something is wrong.
        Err(rustls::Error::General(
            "TLS 1.2 is not accepted on the data plane".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The quinn client configuration for one relay: TLS 1.3 with the ring provider (never
/// the process default), the pinned verifier, ALPN [`kakehashi_proto::dataplane::ALPN`],
/// keep-alive and idle timeout.
pub fn client_config(cert_sha256: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCertVerifier::new(cert_sha256, &provider)?);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![kakehashi_proto::dataplane::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(MAX_IDLE_MS).into()));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> (CertificateDer<'static>, [u8; 32]) {
        let key = rcgen::generate_simple_self_signed(vec!["relay.test".into()]).expect("rcgen");
        let der = key.cert.der().clone();
        let pin: [u8; 32] = Sha256::digest(der.as_ref()).into();
        (der, pin)
    }

    fn verify(v: &PinnedCertVerifier, der: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("relay.test").expect("valid name");
        v.verify_server_cert(der, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn accepts_only_the_pinned_certificate() {
        let provider = rustls::crypto::ring::default_provider();
        let (der, pin) = cert();
        let (other, _) = cert();
        let v = PinnedCertVerifier::new(&pin, &provider).expect("32 bytes");
        assert!(verify(&v, &der).is_ok());
        assert!(matches!(
            verify(&v, &other),
            Err(rustls::Error::InvalidCertificate(_))
        ));
        let mut flipped = pin;
        flipped[0] ^= 1;
        let v = PinnedCertVerifier::new(&flipped, &provider).expect("32 bytes");
        assert!(verify(&v, &der).is_err());
    }

    #[test]
    fn bad_pin_length_is_an_error() {
        let provider = rustls::crypto::ring::default_provider();
        assert!(matches!(
            PinnedCertVerifier::new(&[0u8; 31], &provider),
            Err(TlsError::BadPin(31))
        ));
        assert!(matches!(client_config(&[]), Err(TlsError::BadPin(0))));
    }

    #[test]
    fn offers_the_providers_tls13_schemes() {
        let provider = rustls::crypto::ring::default_provider();
        let v = PinnedCertVerifier::new(&[0u8; 32], &provider).expect("32 bytes");
        let schemes = v.supported_verify_schemes();
        assert!(schemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
        assert!(schemes.contains(&SignatureScheme::ED25519));
    }

    #[test]
    fn client_config_builds() {
        assert!(client_config(&[7u8; 32]).is_ok());
    }
}
