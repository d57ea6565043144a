//! TLS for TERMINATED_HTTPS listeners: certificates from PEM files (chain and private key in
//! one file, as HAProxy's `crt` takes them; Octavia keeps the same bundle in Barbican),
//! several of them chosen by SNI, TLS 1.2 and 1.3, HTTP/2 offered through ALPN.

use std::{path::Path, sync::Arc};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// A certificate bundle that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file cannot be read or holds no PEM certificate.
    #[error("{path}: no PEM certificate could be read: {reason}")]
    Certificate {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file holds no usable private key.
    #[error("{path}: no usable PEM private key: {reason}")]
    Key {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// One certificate chain with its key.
#[derive(Debug)]
struct Bundle {
    key: Arc<CertifiedKey>,
}

impl Bundle {
    fn load(path: &str) -> Result<Self, CertError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(Path::new(path))
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| CertError::Certificate {
                path: path.into(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(CertError::Certificate {
                path: path.into(),
                reason: "the file has no CERTIFICATE block".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(Path::new(path)).map_err(|e| CertError::Key {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::Key {
                path: path.into(),
                reason: e.to_string(),
            })?;
        let key = CertifiedKey::new(chain, signing);
        key.keys_match().map_err(|e| CertError::Key {
            path: path.into(),
            reason: format!("the key does not belong to the certificate ({e})"),
        })?;
        Ok(Self { key: Arc::new(key) })
    }

    /// Whether the leaf certificate is valid for `name` (SAN DNS names, wildcards included).
    fn serves(&self, name: &ServerName<'_>) -> bool {
        let leaf = &self.key.cert[0];
        webpki::EndEntityCert::try_from(leaf)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
    }
}

/// Picks the certificate for a handshake: the first SNI certificate valid for the name the
/// client asked for, else the listener's default certificate.
#[derive(Debug)]
struct SniResolver {
    default: Bundle,
    sni: Vec<Bundle>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name()
            && let Ok(name) = ServerName::try_from(name)
            && let Some(bundle) = self.sni.iter().find(|b| b.serves(&name))
        {
            return Some(bundle.key.clone());
        }
        Some(self.default.key.clone())
    }
}

/// Builds a listener's TLS configuration from its default certificate and SNI certificates.
pub fn server_config(
    default: &str,
    sni: &[String],
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let resolver = SniResolver {
        default: Bundle::load(default)?,
        sni: sni
            .iter()
            .map(|p| Bundle::load(p))
            .collect::<Result<_, _>>()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| CertError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
