//! The simulator's TLS identity: a self-signed certificate made with rcgen at
//! first start and kept in the state directory (`tls/cert.pem`, `tls/key.pem`),
//! so its SHA-256 fingerprint is stable across restarts.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

/// The certificate, its key, its fingerprint and a server config using them.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The certificate, PEM (what `VDI.get_nbd_info` returns as `cert`).
    pub cert_pem: String,
    /// `sha256:<64 lowercase hex digits>` of the DER certificate.
    pub fingerprint: String,
    /// The DNS name in the certificate (`subject` of `get_nbd_info`).
    pub subject: String,
    /// A rustls server config for HTTPS and NBD STARTTLS.
    pub server_config: Arc<rustls::ServerConfig>,
}

/// The DNS name the certificate is made for.
pub const SUBJECT: &str = "localhost";

/// Errors loading or making the identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// Reading or writing the PEM files failed.
    #[error("TLS files in {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The PEM files could not be used; delete them to make new ones.
    #[error(
        "TLS identity in {dir} is unusable ({reason}); delete that directory to generate a new certificate"
    )]
    Invalid {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
}

/// Loads the identity from `dir`, generating and saving it first if absent.
pub fn load_or_create(dir: &Path) -> Result<TlsIdentity, TlsSetupError> {
    let io = |source| TlsSetupError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let invalid = |reason: String| TlsSetupError::Invalid {
        dir: dir.display().to_string(),
        reason,
    };
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
        let ck =
            rcgen::generate_simple_self_signed(vec![SUBJECT.to_string(), "127.0.0.1".to_string()])
                .map_err(|e| invalid(e.to_string()))?;
        crate::state::write_atomic(&key_path, ck.signing_key.serialize_pem().as_bytes())
            .map_err(io)?;
        crate::state::write_atomic(&cert_path, ck.cert.pem().as_bytes()).map_err(io)?;
    }
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(io)?;
    let key_pem = std::fs::read_to_string(&key_path).map_err(io)?;
    let cert =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    let fingerprint = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(cert.as_ref()))
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(TlsIdentity {
        cert_pem,
        fingerprint,
        subject: SUBJECT.to_string(),
        server_config: Arc::new(server_config),
    })
}
