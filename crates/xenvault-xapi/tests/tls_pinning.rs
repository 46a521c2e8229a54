//! TLS policies against a local rustls server with an rcgen certificate: the
//! fingerprint is fetched without trust, a matching pin is accepted (raw TLS and
//! HTTPS transfers), a different pin and plain verification are refused clearly.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use xenvault_xapi::http::{HttpError, HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::tls::{self, Fingerprint, TlsPolicy};

struct TlsServer {
    port: u16,
    cert_pem: String,
    cert_der: Vec<u8>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS server that answers every connection with a tiny HTTP/1.0 export.
async fn tls_server() -> TlsServer {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_der = certified.cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert_der.clone())], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.0 200 OK\r\ntask-id: OpaqueRef:tls\r\n\r\nsecure bytes")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    TlsServer {
        port,
        cert_pem: certified.cert.pem(),
        cert_der,
        task,
    }
}

async fn handshake(config: rustls::ClientConfig, port: u16) -> std::io::Result<()> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.ok();
    assert!(reply.ends_with(b"secure bytes"));
    Ok(())
}

#[tokio::test]
async fn fetched_fingerprint_matches_the_certificate() {
    let server = tls_server().await;
    let presented = tls::fetch_fingerprint(
        &format!("127.0.0.1:{}", server.port),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(presented.der, server.cert_der);
    assert_eq!(presented.fingerprint, Fingerprint::of_der(&server.cert_der));
    assert_eq!(
        presented.fingerprint,
        Fingerprint::of_pem(&server.cert_pem).unwrap()
    );
    let shown = presented.fingerprint.to_string();
    assert!(shown.starts_with("sha256:") && shown.len() == 7 + 64);
    assert_eq!(shown.parse::<Fingerprint>().unwrap(), presented.fingerprint);
    // `xenvault trust URL` passes a URL.
    let from_url = tls::fetch_fingerprint(
        &format!("https://127.0.0.1:{}/jsonrpc", server.port),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(from_url.fingerprint, presented.fingerprint);
    // Nothing listening: a clear connect error, not a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = tls::fetch_fingerprint(&format!("127.0.0.1:{port}"), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn pinned_fingerprint_is_accepted_and_a_different_one_refused() {
    let server = tls_server().await;
    let good = Fingerprint::of_der(&server.cert_der);
    handshake(
        TlsPolicy::Pinned(good).client_config().unwrap(),
        server.port,
    )
    .await
    .unwrap();
    handshake(
        tls::pinned_pem_config(&server.cert_pem).unwrap(),
        server.port,
    )
    .await
    .unwrap();
    handshake(
        tls::roots_pem_config(&server.cert_pem).unwrap(),
        server.port,
    )
    .await
    .unwrap();

    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let wrong = Fingerprint::of_der(other.cert.der());
    let err = handshake(
        TlsPolicy::Pinned(wrong).client_config().unwrap(),
        server.port,
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not match the pinned"), "{text}");
    assert!(
        text.contains(&good.to_string()) && text.contains(&wrong.to_string()),
        "{text}"
    );

    // A set of pins accepts any of its members (pool hosts each have their own).
    let any = TlsPolicy::PinnedAny(vec![wrong, good])
        .client_config()
        .unwrap();
    handshake(any, server.port).await.unwrap();
    let none = TlsPolicy::PinnedAny(vec![wrong]).client_config().unwrap();
    assert!(handshake(none, server.port).await.is_err());

    // Plain verification refuses a self-signed certificate.
    if let Ok(config) = TlsPolicy::Verify.client_config() {
        assert!(handshake(config, server.port).await.is_err());
    }
}

#[tokio::test]
async fn https_transfers_use_the_pin() {
    let server = tls_server().await;
    let base: reqwest::Url = format!("https://127.0.0.1:{}/", server.port)
        .parse()
        .unwrap();
    let url = handler_url(&base, "/pool/xmldbdump", "OpaqueRef:secret", None, &[]);

    let pinned = HttpTransfer::new(
        &TlsPolicy::Pinned(Fingerprint::of_der(&server.cert_der)),
        TransferOptions::default(),
    )
    .unwrap();
    let download = pinned.get(url.clone()).await.unwrap();
    assert_eq!(download.task_id.as_deref(), Some("OpaqueRef:tls"));
    let mut body = Vec::new();
    let mut stream = download.body;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(body, b"secure bytes");

    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let wrong = HttpTransfer::new(
        &TlsPolicy::Pinned(Fingerprint::of_der(other.cert.der())),
        TransferOptions::default(),
    )
    .unwrap();
    let err = wrong.get(url).await.err().unwrap();
    assert!(matches!(err, HttpError::Request { .. }), "{err}");
    assert!(
        err.to_string().contains("does not match the pinned"),
        "{err}"
    );
    assert!(!err.to_string().contains("OpaqueRef:secret"), "{err}");
}
