//! The relay's TLS identity and QUIC server configuration.

use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::RelayConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a dev certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {path}: {source}")]
    Pem {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}

pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate, which agents pin.
    pub cert_sha256: [u8; 32],
}

impl Identity {
    pub fn load_or_generate(config: &RelayConfig) -> Result<Self, TlsError> {
        let (chain, key) = match &config.tls_files {
            Some((cert, key)) => {
                let pem_err = |path: &std::path::Path| {
                    let path = path.display().to_string();
                    move |source| TlsError::Pem {
                        path: path.clone(),
                        source,
                    }
                };
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(pem_err(cert))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(pem_err(cert))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
                (chain, key)
            }
            None => {
                let generated =
                    rcgen::generate_simple_self_signed(vec![config.server_name.clone()])?;
                let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
                    .map_err(|e| TlsError::Quic(e.to_string()))?;
                (vec![generated.cert.der().clone()], key)
            }
        };
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate(format!("{:?}", config.tls_files)))?;
        let cert_sha256 = Sha256::digest(leaf.as_ref()).into();
        Ok(Self {
            chain,
            key,
            cert_sha256,
        })
    }

    pub fn server_config(&self, config: &RelayConfig) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![kakehashi_proto::dataplane::ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        // One signal stream, and one uni stream per data channel; more is a misbehaving client.
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(8u32.into());
        transport.keep_alive_interval(Some(config.keep_alive));
        transport.max_idle_timeout(Some(
            config
                .idle_timeout
                .try_into()
                .map_err(|_| TlsError::Quic("idle timeout out of range".into()))?,
        ));
        server.transport_config(Arc::new(transport));
        Ok(server)
    }
}
