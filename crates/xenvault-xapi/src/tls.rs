//! TLS: verified, or pinned by SHA-256 certificate fingerprint.
//!
//! Every TLS connection xenvault makes to a pool (RPC, HTTP transfers, NBD) gets its
//! `rustls::ClientConfig` from here, always built with the aws-lc-rs provider named
//! explicitly (no process-wide default provider is installed or needed).
//!
//! - [`TlsPolicy::Verify`]: the system's trust store (PEM bundle found through
//!   `SSL_CERT_FILE` or the usual distribution paths) and webpki name checks.
//! - [`TlsPolicy::Pinned`]: only a server whose leaf certificate has exactly this
//!   SHA-256 fingerprint is accepted. Names and dates are not checked: XAPI pools
//!   use self-signed certificates whose subject rarely matches the address used
//!   (docs/xapi-notes.md "TLS certificates and pinning"). Handshake signatures
//!   are still verified, so a peer must hold the pinned certificate's private key.
//! - [`TlsPolicy::InsecureNoVerify`]: any certificate; only behind an explicit, loud
//!   user option.
//!
//! [`fetch_fingerprint`] connects without trusting anything and reports the server's
//! leaf certificate fingerprint (for `xenvault trust URL`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors of TLS configuration and certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A fingerprint string could not be parsed.
    #[error(
        "invalid certificate fingerprint {input:?}: {reason}; expected \"sha256:\" followed by 64 hex digits (colons allowed)"
    )]
    InvalidFingerprint {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No usable trust store was found for [`TlsPolicy::Verify`].
    #[error(
        "no system CA certificates found (looked at SSL_CERT_FILE and {searched}); install ca-certificates, set SSL_CERT_FILE, or pin the pool certificate with `xenvault trust URL`"
    )]
    NoSystemRoots {
        /// The paths that were tried.
        searched: String,
    },
    /// A PEM certificate could not be read.
    #[error("invalid PEM certificate ({context}): {reason}")]
    InvalidPem {
        /// Where the PEM came from.
        context: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration error: {0}")]
    Config(#[from] rustls::Error),
    /// The host part of an address is not a valid TLS server name.
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    /// Connecting or handshaking failed.
    #[error("TLS connection to {address} failed: {source}")]
    Connect {
        /// `host:port` that was tried.
        address: String,
        /// The I/O or TLS error.
        source: std::io::Error,
    },
    /// Connecting or handshaking took too long.
    #[error("TLS connection to {address} timed out after {after:?}")]
    Timeout {
        /// `host:port` that was tried.
        address: String,
        /// The time limit.
        after: Duration,
    },
    /// The server sent no certificate.
    #[error("the TLS server at {address} presented no certificate")]
    NoPeerCertificate {
        /// `host:port` that was tried.
        address: String,
    },
}

/// A SHA-256 certificate fingerprint, shown as `sha256:<64 lowercase hex digits>`.
///
/// Parsing accepts that form, the bare hex, and the colon-separated uppercase form
/// that `openssl x509 -fingerprint -sha256` prints (with or without its
/// `SHA256 Fingerprint=` prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate in a PEM text.
    pub fn of_pem(pem: &str) -> Result<Fingerprint, TlsError> {
        let cert = first_pem_certificate(pem, "fingerprint")?;
        Ok(Fingerprint::of_der(cert.as_ref()))
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    fn from_str(input: &str) -> Result<Fingerprint, TlsError> {
        let bad = |reason| TlsError::InvalidFingerprint {
            input: input.to_owned(),
            reason,
        };
        let mut rest = input.trim();
        if let Some((prefix, tail)) = rest.split_once('=') {
            // `SHA256 Fingerprint=AB:CD:...` as printed by openssl.
            if !prefix.to_ascii_lowercase().contains("sha256") {
                return Err(bad("only SHA-256 fingerprints are supported"));
            }
            rest = tail;
        } else if rest.len() > 7 && rest[..7].eq_ignore_ascii_case("sha256:") {
            rest = &rest[7..];
        } else if let Some((algo, _)) = rest.split_once(':')
            && !algo.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad("only SHA-256 fingerprints are supported"));
        }
        let digits: String = rest.chars().filter(|c| *c != ':').collect();
        if digits.len() != 64 {
            return Err(bad("a SHA-256 fingerprint has 64 hex digits"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes).map_err(|_| bad("not hexadecimal"))?;
        Ok(Fingerprint(bytes))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How a TLS server is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Verify the chain against the system trust store and the host name.
    Verify,
    /// Accept exactly the certificate with this SHA-256 fingerprint (no name or date
    /// checks; handshake signatures are still verified).
    Pinned(Fingerprint),
    /// Accept a certificate with any of these fingerprints: every host of a pool
    /// has its own certificate, and transfers redirected to a member (302) or NBD
    /// connections to it must accept the member's (pin them all, e.g. from
    /// `host.get_server_certificate` read over the pinned coordinator connection).
    PinnedAny(Vec<Fingerprint>),
    /// Accept any certificate. Insecure: only behind an explicit user option.
    InsecureNoVerify,
}

impl TlsPolicy {
    /// A `rustls::ClientConfig` for this policy (aws-lc-rs provider).
    ///
    /// It is returned by value so it can be handed to
    /// `reqwest::ClientBuilder::use_preconfigured_tls`; wrap it in an `Arc` for
    /// tokio-rustls.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        match self {
            TlsPolicy::Verify => {
                let roots = system_roots()?;
                Ok(builder()?
                    .with_root_certificates(roots)
                    .with_no_client_auth())
            }
            TlsPolicy::Pinned(fingerprint) => Ok(pinned_config(*fingerprint)?),
            TlsPolicy::PinnedAny(fingerprints) => Ok(pinned_any_config(fingerprints)?),
            TlsPolicy::InsecureNoVerify => {
                tracing::warn!("TLS certificate verification is DISABLED for this connection");
                Ok(builder()?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyVerifier::new()))
                    .with_no_client_auth())
            }
        }
    }
}

/// The crypto provider every config here uses: aws-lc-rs, named explicitly.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?)
}

/// A config that accepts only the certificate with this fingerprint.
pub fn pinned_config(fingerprint: Fingerprint) -> Result<ClientConfig, TlsError> {
    pinned_any_config(&[fingerprint])
}

/// A config that accepts only certificates with one of these fingerprints (none
/// given: nothing is accepted).
pub fn pinned_any_config(fingerprints: &[Fingerprint]) -> Result<ClientConfig, TlsError> {
    Ok(builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(fingerprints.to_vec())))
        .with_no_client_auth())
}

/// A config that accepts only the (first) certificate of this PEM text, e.g. the
/// `cert` field of `VDI.get_nbd_info`.
pub fn pinned_pem_config(pem: &str) -> Result<ClientConfig, TlsError> {
    pinned_config(Fingerprint::of_pem(pem)?)
}

/// A config that trusts the given PEM CA (or self-signed) certificates, with full
/// webpki checks (chain, dates, host name).
pub fn roots_pem_config(pem: &str) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::InvalidPem {
            context: "trust roots".into(),
            reason: e.to_string(),
        })?;
        roots.add(cert)?;
    }
    Ok(builder()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn first_pem_certificate(pem: &str, context: &str) -> Result<CertificateDer<'static>, TlsError> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(cert)) => Ok(cert),
        Some(Err(e)) => Err(TlsError::InvalidPem {
            context: context.into(),
            reason: e.to_string(),
        }),
        None => Err(TlsError::InvalidPem {
            context: context.into(),
            reason: "no CERTIFICATE block found".into(),
        }),
    }
}

/// PEM bundles of the common distributions, tried in order after `SSL_CERT_FILE`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system trust store, read from the first PEM bundle that yields certificates.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut candidates: Vec<String> = Vec::new();
    if let Ok(path) = std::env::var("SSL_CERT_FILE") {
        candidates.push(path);
    }
    candidates.extend(SYSTEM_BUNDLES.iter().map(|s| (*s).to_owned()));
    for path in &candidates {
        let Ok(text) = std::fs::read(path) else {
            continue;
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_slice_iter(&text).filter_map(Result::ok);
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added > 0 {
            tracing::debug!(path, added, "loaded system trust roots");
            return Ok(roots);
        }
    }
    Err(TlsError::NoSystemRoots {
        searched: SYSTEM_BUNDLES.join(", "),
    })
}

/// The certificate a pinned verifier found instead of the pinned one.
struct PinMismatch {
    expected: Vec<Fingerprint>,
    presented: Fingerprint,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate {} does not match the pinned {}; if the pool certificate was renewed, check it and run `xenvault trust URL` again",
            self.presented,
            self.expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        )
    }
}

// rustls shows `CertificateError::Other` with `{:?}`: make that the readable text.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

/// Accepts exactly the leaf certificates with these fingerprints.
#[derive(Debug)]
struct PinnedVerifier {
    expected: Vec<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    fn new(expected: Vec<Fingerprint>) -> PinnedVerifier {
        PinnedVerifier {
            expected,
            algorithms: crypto_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of_der(end_entity.as_ref());
        if self.expected.contains(&presented) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    expected: self.expected.clone(),
                    presented,
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
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

/// Accepts any certificate (signatures are still checked against it).
#[derive(Debug)]
struct AcceptAnyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AcceptAnyVerifier {
    fn new() -> AcceptAnyVerifier {
        AcceptAnyVerifier {
            algorithms: crypto_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AcceptAnyVerifier {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
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

/// The TLS server name for the host part of `host:port` (IPv6 may be bracketed).
pub fn server_name_of(host_port: &str) -> Result<ServerName<'static>, TlsError> {
    let host = split_host(host_port);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::InvalidServerName(host.to_owned()))
}

/// The host part of `host:port`, `[v6]:port`, or a bare host.
fn split_host(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        match host_port.find(']') {
            Some(end) => &host_port[..=end],
            None => host_port,
        }
    } else if host_port.matches(':').count() == 1 {
        host_port.split(':').next().unwrap_or(host_port)
    } else {
        host_port
    }
}

/// A server certificate seen without trusting it.
#[derive(Debug, Clone)]
pub struct PresentedCertificate {
    /// SHA-256 fingerprint of the leaf certificate.
    pub fingerprint: Fingerprint,
    /// The leaf certificate, DER.
    pub der: Vec<u8>,
}

/// Connects to `host:port` (port 443 if omitted; an `https://host[:port]/…` URL is
/// accepted too), completes a TLS handshake that trusts any certificate, and
/// returns the server's leaf certificate fingerprint.
///
/// Nothing is sent over the connection; it is closed right away. The result is
/// meant to be shown to the user for confirmation (`xenvault trust URL`).
pub async fn fetch_fingerprint(
    host_port: &str,
    timeout: Duration,
) -> Result<PresentedCertificate, TlsError> {
    let host_port = host_port
        .split_once("://")
        .map_or(host_port, |(_, rest)| rest);
    let host_port = host_port.split(['/', '?']).next().unwrap_or(host_port);
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let address = if split_host(host_port) == host_port {
        format!("{host_port}:443")
    } else {
        host_port.to_owned()
    };
    let server_name = server_name_of(&address)?;
    let config = Arc::new(
        builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyVerifier::new()))
            .with_no_client_auth(),
    );
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&address).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
    };
    let stream = match tokio::time::timeout(timeout, connect).await {
        Err(_) => {
            return Err(TlsError::Timeout {
                address,
                after: timeout,
            });
        }
        Ok(Err(source)) => return Err(TlsError::Connect { address, source }),
        Ok(Ok(stream)) => stream,
    };
    let (_, connection) = stream.get_ref();
    let Some(leaf) = connection.peer_certificates().and_then(|c| c.first()) else {
        return Err(TlsError::NoPeerCertificate { address });
    };
    Ok(PresentedCertificate {
        fingerprint: Fingerprint::of_der(leaf.as_ref()),
        der: leaf.as_ref().to_vec(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn fingerprint_forms() {
        let canonical = format!("sha256:{HEX}");
        let fp: Fingerprint = canonical.parse().unwrap();
        assert_eq!(fp.to_string(), canonical);
        let colons = HEX
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            format!("SHA256:{colons}").parse::<Fingerprint>().unwrap(),
            fp
        );
        assert_eq!(
            format!("sha256 Fingerprint={colons}")
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert_eq!(HEX.parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn fingerprint_rejects() {
        for bad in [
            "",
            "sha256:",
            "sha256:abc",
            "sha1:00112233445566778899aabbccddeeff00112233",
            &format!("sha256:{}zz", &HEX[..62]),
            &format!("md5 Fingerprint={HEX}"),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fingerprint_serde_is_string() {
        let fp: Fingerprint = HEX.parse().unwrap();
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"sha256:{HEX}\""));
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
    }

    #[test]
    fn host_splitting() {
        assert_eq!(split_host("a.b:443"), "a.b");
        assert_eq!(split_host("[::1]:443"), "[::1]");
        assert_eq!(split_host("::1"), "::1");
        assert_eq!(split_host("host"), "host");
        assert!(server_name_of("[::1]:10809").is_ok());
        assert!(server_name_of("127.0.0.1:1").is_ok());
    }

    #[test]
    fn configs_build() {
        let fp: Fingerprint = HEX.parse().unwrap();
        TlsPolicy::Pinned(fp).client_config().unwrap();
        TlsPolicy::InsecureNoVerify.client_config().unwrap();
        assert!(pinned_pem_config("not pem").is_err());
    }
}
