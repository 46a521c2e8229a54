//! NBD client against an in-test server that behaves like xapi-nbd (built from the
//! server half of `nbd::proto`): unknown options → NBD_REP_ERR_UNSUP, GO
//! unsupported, EXPORT_NAME with 124 padding bytes, simple replies only, EINVAL on
//! unaligned requests; plus misbehaving servers (bad magic, silence, hang-up,
//! TLS policy refusals) that must give clear errors, never a panic or a hang.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use xenvault_xapi::nbd::client::{
    ExportSelect, NbdConnection, NbdError, NbdMultiReader, NbdOptions, NbdTls,
};
use xenvault_xapi::nbd::proto::{self, ExportInfo, Request, cmd, errno, opt, rep, tflag};

const SIZE: u64 = 4 * 1024 * 1024;
const EXPORT: &str = "/5f0e8f52-0000-4000-8000-000000000001?session_id=OpaqueRef:secret";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Like xapi-nbd on an `insecure_nbd` network.
    Plain,
    /// Like xapi-nbd with purpose `nbd` (TLS forced), but without a certificate:
    /// only the pre-TLS refusals are exercised.
    TlsForced,
    /// Answers reads with a reply of bad magic.
    BadMagic,
    /// Never answers reads.
    Silent,
    /// Hangs up in the middle of read data.
    HangUp,
    /// The first connection hangs up at its first read; later ones serve.
    FirstConnectionHangsUp,
}

fn byte_at(offset: u64) -> u8 {
    (offset / 512) as u8 ^ 0x5a
}

async fn handle(
    mut s: TcpStream,
    mode: Mode,
    index: usize,
    names: Arc<Mutex<Vec<String>>>,
) -> Option<()> {
    let mode = match mode {
        Mode::FirstConnectionHangsUp if index == 0 => Mode::HangUp,
        Mode::FirstConnectionHangsUp => Mode::Plain,
        other => other,
    };
    s.write_all(&proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE))
        .await
        .ok()?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).await.ok()?;
    assert!(proto::ClientFlags::decode(flags).fixed_newstyle());
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut header).await.ok()?;
        let (option, len) = proto::decode_option_header(&header).ok()?;
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.ok()?;
        if mode == Mode::TlsForced {
            match option {
                opt::EXPORT_NAME => return None, // xapi-nbd closes
                opt::STARTTLS => {
                    // Pretend TLS is impossible here: refuse as a broken host would.
                    s.write_all(&proto::encode_option_reply(option, rep::ERR_PLATFORM, b""))
                        .await
                        .ok()?;
                }
                _ => {
                    s.write_all(&proto::encode_option_reply(option, rep::ERR_TLS_REQD, b""))
                        .await
                        .ok()?;
                }
            }
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                names.lock().await.push(String::from_utf8(payload).ok()?);
                let info = ExportInfo {
                    size: SIZE,
                    flags: tflag::HAS_FLAGS | tflag::READ_ONLY,
                };
                s.write_all(&proto::encode_export_name_reply(info, false))
                    .await
                    .ok()?;
                break;
            }
            opt::STARTTLS => {
                s.write_all(&proto::encode_option_reply(option, rep::ERR_POLICY, b""))
                    .await
                    .ok()?;
            }
            _ => {
                s.write_all(&proto::encode_option_reply(option, rep::ERR_UNSUP, b""))
                    .await
                    .ok()?;
            }
        }
    }
    loop {
        let mut raw = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut raw).await.ok()?;
        let request = Request::decode(&raw).ok()?;
        match request.command {
            cmd::DISC => return Some(()),
            cmd::READ => {
                let aligned = request.offset % 512 == 0 && request.length % 512 == 0;
                match mode {
                    Mode::BadMagic => {
                        s.write_all(&[0xde, 0xad, 0xbe, 0xef]).await.ok()?;
                        s.write_all(&[0u8; 12]).await.ok()?;
                    }
                    Mode::Silent => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Mode::HangUp => {
                        s.write_all(&proto::encode_simple_reply(0, request.handle))
                            .await
                            .ok()?;
                        s.write_all(&[1u8; 100]).await.ok()?;
                        return None;
                    }
                    _ if request.offset >= 3 * 1024 * 1024 => {
                        // A disk region that fails to read.
                        s.write_all(&proto::encode_simple_reply(errno::EIO, request.handle))
                            .await
                            .ok()?;
                    }
                    _ if !aligned => {
                        s.write_all(&proto::encode_simple_reply(errno::EINVAL, request.handle))
                            .await
                            .ok()?;
                    }
                    _ => {
                        s.write_all(&proto::encode_simple_reply(0, request.handle))
                            .await
                            .ok()?;
                        let data: Vec<u8> = (request.offset
                            ..request.offset + u64::from(request.length))
                            .map(byte_at)
                            .collect();
                        s.write_all(&data).await.ok()?;
                    }
                }
            }
            _ => {
                s.write_all(&proto::encode_simple_reply(errno::EINVAL, request.handle))
                    .await
                    .ok()?;
            }
        }
    }
}

struct Server {
    port: u16,
    names: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = names.clone();
    let task = tokio::spawn(async move {
        let mut index = 0;
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(handle(s, mode, index, seen.clone()));
            index += 1;
        }
    });
    Server { port, names, task }
}

fn options(port: u16) -> NbdOptions {
    let mut o = NbdOptions::new(format!("127.0.0.1:{port}"), EXPORT);
    o.io_timeout = Duration::from_secs(5);
    o.connect_timeout = Duration::from_secs(5);
    o
}

#[tokio::test]
async fn xapi_style_server_with_export_name_and_pipelined_reads() {
    let server = start(Mode::Plain).await;
    for select in [ExportSelect::ExportName, ExportSelect::Auto] {
        let mut opts = options(server.port);
        opts.select = select;
        let conn = NbdConnection::connect(&opts).await.unwrap();
        assert_eq!(conn.size(), SIZE);
        assert!(conn.export().read_only());
        assert!(
            !conn.structured_replies(),
            "xapi-nbd has no structured replies"
        );
        assert!(!conn.has_block_status());
        // Many reads in flight at once, answered in order by the server.
        let reads = (0..32u64).map(|i| conn.read(i * 65536, 65536));
        let parts = futures::future::try_join_all(reads).await.unwrap();
        for (i, part) in parts.iter().enumerate() {
            let base = i as u64 * 65536;
            assert!(
                part.iter()
                    .enumerate()
                    .all(|(j, b)| *b == byte_at(base + j as u64))
            );
        }
        let extents = conn.read_extents(0..1024 * 1024).await.unwrap();
        assert_eq!(extents.len(), 1);
        conn.disconnect().await.unwrap();
    }
    assert_eq!(
        *server.names.lock().await,
        vec![EXPORT.to_owned(), EXPORT.to_owned()]
    );
}

#[tokio::test]
async fn go_only_gets_the_named_refusal() {
    let server = start(Mode::Plain).await;
    let mut opts = options(server.port);
    opts.select = ExportSelect::Go;
    let err = NbdConnection::connect(&opts).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("NBD_OPT_GO") && text.contains("NBD_REP_ERR_UNSUP"),
        "{text}"
    );
    assert!(text.contains("use NBD_OPT_EXPORT_NAME"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

#[tokio::test]
async fn debug_output_hides_the_export_name() {
    let opts = options(1);
    let shown = format!("{opts:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}

#[tokio::test]
async fn tls_policy_refusals_are_named() {
    // insecure_nbd: STARTTLS is refused with POLICY.
    let server = start(Mode::Plain).await;
    let mut opts = options(server.port);
    let pem = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .unwrap()
        .cert
        .pem();
    opts.tls = NbdTls::PinnedPem(pem);
    let err = NbdConnection::connect(&opts).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("NBD_REP_ERR_POLICY"), "{text}");
    assert!(text.contains("insecure_nbd"), "{text}");

    // nbd purpose (TLS forced): options in clear get TLS_REQD...
    let forced = start(Mode::TlsForced).await;
    let err = NbdConnection::connect(&options(forced.port))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NBD_REP_ERR_TLS_REQD"), "{err}");
    // ...and EXPORT_NAME in clear makes the server hang up.
    let mut opts = options(forced.port);
    opts.structured_replies = false;
    let err = NbdConnection::connect(&opts).await.unwrap_err();
    assert!(matches!(err, NbdError::ExportRefused), "{err}");
}

#[tokio::test]
async fn server_errors_and_local_checks() {
    let server = start(Mode::Plain).await;
    let conn = NbdConnection::connect(&options(server.port)).await.unwrap();
    // Reads past the end and unaligned reads never reach the server.
    assert!(matches!(
        conn.read(SIZE - 512, 1024).await,
        Err(NbdError::OutOfRange { .. })
    ));
    assert!(matches!(
        conn.read(100, 512).await,
        Err(NbdError::Unaligned { .. })
    ));
    assert!(matches!(
        conn.block_status(0, 512).await,
        Err(NbdError::NoBlockStatus)
    ));
    // A server-side failure is named, and the connection survives it.
    let err = conn.read(3 * 1024 * 1024, 4096).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("NBD_CMD_READ") && text.contains("EIO"),
        "{text}"
    );
    assert!(!err.is_transient());
    assert_eq!(conn.read(0, 512).await.unwrap()[0], byte_at(0));
}

#[tokio::test]
async fn bad_replies_silence_and_hangups_give_errors() {
    let bad = start(Mode::BadMagic).await;
    let conn = NbdConnection::connect(&options(bad.port)).await.unwrap();
    let err = conn.read(0, 512).await.unwrap_err();
    assert!(err.to_string().contains("bad reply magic"), "{err}");
    // The connection is dead now; later requests fail fast.
    assert!(matches!(
        conn.read(0, 512).await,
        Err(NbdError::ConnectionLost(_))
    ));

    let silent = start(Mode::Silent).await;
    let mut opts = options(silent.port);
    opts.io_timeout = Duration::from_millis(300);
    let conn = NbdConnection::connect(&opts).await.unwrap();
    let started = std::time::Instant::now();
    let err = conn.read(0, 512).await.unwrap_err();
    assert!(matches!(err, NbdError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let hangup = start(Mode::HangUp).await;
    let conn = NbdConnection::connect(&options(hangup.port)).await.unwrap();
    let err = conn.read(0, 4096).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("closed the connection"), "{err}");
}

#[tokio::test]
async fn multi_reader_moves_a_failed_piece_to_another_connection() {
    let server = start(Mode::FirstConnectionHangsUp).await;
    let reader = NbdMultiReader::connect(&options(server.port), 2)
        .await
        .unwrap()
        .with_piece_size(256 * 1024);
    assert_eq!(reader.connection_count(), 2);
    let extents: Vec<_> = reader
        .read_ranges(vec![
            0..1024 * 1024,
            2 * 1024 * 1024..2 * 1024 * 1024 + 4096,
        ])
        .map(|r| r.unwrap())
        .collect()
        .await;
    let total: u64 = extents.iter().map(|e| e.len()).sum();
    assert_eq!(total, 1024 * 1024 + 4096);
    let mut last_end = 0;
    for e in &extents {
        assert!(e.offset >= last_end);
        last_end = e.end();
        let xenvault_types::extent::ExtentData::Data(bytes) = &e.data else {
            panic!("zero extent without block status");
        };
        assert!(
            bytes
                .iter()
                .enumerate()
                .all(|(j, b)| *b == byte_at(e.offset + j as u64))
        );
    }
}

#[tokio::test]
async fn multi_reader_reconnects_a_dead_connection() {
    let server = start(Mode::FirstConnectionHangsUp).await;
    let reader = NbdMultiReader::connect(&options(server.port), 1)
        .await
        .unwrap()
        .with_retries(3, Duration::from_millis(10));
    let extents: Vec<_> = reader
        .read_ranges(std::iter::once(0..512 * 1024))
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(extents.iter().map(|e| e.len()).sum::<u64>(), 512 * 1024);
    // One connection at first, one re-opened after the hang-up.
    assert_eq!(server.names.lock().await.len(), 2);

    // Without reconnection options (from_connections) the failure is reported.
    let broken = start(Mode::HangUp).await;
    let conn = NbdConnection::connect(&options(broken.port)).await.unwrap();
    let reader = NbdMultiReader::from_connections(vec![Arc::new(conn)], 2);
    let results: Vec<_> = reader.read_ranges(std::iter::once(0..4096)).collect().await;
    assert!(matches!(results.as_slice(), [Err(e)] if e.is_transient()));
}
