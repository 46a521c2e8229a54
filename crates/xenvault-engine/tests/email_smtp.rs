//! The report email, received by a real SMTP server (aiosmtpd on 127.0.0.1):
//! subject with job, host and outcome; body with the per-VM times and the
//! summary; retries with backoff; clear errors.
//!
//! Needs `python3 -m aiosmtpd` (scripts/install-test-deps.sh). Under CI=true
//! a missing aiosmtpd fails the test; otherwise it is skipped loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xenvault_engine::report::{EmailError, EmailSettings, SmtpSecurity, email, subject_line};

mod report_support;

const HANDLER: &str = r#"
import os

class Saver:
    """aiosmtpd handler: writes each message to <dir>/msg-N.eml (atomically)."""

    def __init__(self, outdir):
        self.outdir = outdir
        self.count = 0

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        path = os.path.join(self.outdir, "msg-%d.eml" % self.count)
        with open(path + ".tmp", "wb") as f:
            f.write(("X-Envelope-To: %s\r\n" % ",".join(envelope.rcpt_tos)).encode())
            f.write(envelope.original_content or envelope.content)
        os.rename(path + ".tmp", path)
        return "250 Message accepted for delivery"
"#;

fn aiosmtpd_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "aiosmtpd is required under CI=true: run scripts/install-test-deps.sh (python3 -m pip install aiosmtpd)"
        );
        eprintln!(
            "SKIPPING email test: python3 -m aiosmtpd is not installed (pip install aiosmtpd)"
        );
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running aiosmtpd; killed on drop.
struct SmtpServer {
    child: Child,
    port: u16,
    inbox: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpServer {
    fn start_on(port: u16) -> SmtpServer {
        SmtpServer::start_with(port, &[])
    }

    /// `extra` goes before `-c` (e.g. `--tlscert F --tlskey K`).
    fn start_with(port: u16, extra: &[&str]) -> SmtpServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("xv_saver.py"), HANDLER).unwrap();
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(["-c", "xv_saver.Saver"])
            .arg(&inbox)
            .env("PYTHONPATH", dir.path())
            .stdout(Stdio::null())
            // The server's own log (handshake errors of the refusal tests are expected noise).
            .stderr(std::fs::File::create(dir.path().join("aiosmtpd.log")).unwrap())
            .spawn()
            .expect("start python3 -m aiosmtpd");
        let server = SmtpServer {
            child,
            port,
            inbox,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn messages(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.inbox)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn settings(port: u16) -> EmailSettings {
    let mut s = EmailSettings::new(
        "127.0.0.1",
        "xenvault <backup@example.org>",
        vec!["ops@example.org".into(), "boss@example.org".into()],
    );
    s.port = Some(port);
    s.security = SmtpSecurity::Plain;
    s.backoff = Duration::from_millis(100);
    s.timeout = Duration::from_secs(10);
    s
}

/// Splits a received message into unfolded headers and the decoded body
/// (7bit, 8bit or quoted-printable, as lettre chooses by line length).
fn parse_message(raw: &str) -> (String, String) {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").expect("headers and body");
    let head = head.replace("\n ", " ").replace("\n\t", " ");
    let qp = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("Content-Transfer-Encoding: quoted-printable"));
    let body = if qp {
        decode_quoted_printable(body)
    } else {
        body.to_string()
    };
    (head + "\n", body)
}

fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).expect("quoted-printable escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn the_report_email_arrives_with_per_vm_times_and_the_summary() {
    if !aiosmtpd_available() {
        return;
    }
    let server = SmtpServer::start_on(free_port());
    let report = report_support::sample_report();
    let attempts = email::send_report(&settings(server.port), &report)
        .await
        .unwrap();
    assert_eq!(attempts, 1);
    let messages = server.messages();
    assert_eq!(messages.len(), 1);
    let (msg, body) = parse_message(&messages[0]);
    assert!(
        msg.starts_with("X-Envelope-To: ops@example.org,boss@example.org\n"),
        "{msg}"
    );
    let subject = subject_line(&report);
    assert!(
        msg.contains(&format!("Subject: {subject}\n")),
        "subject {subject:?} missing:\n{msg}"
    );
    assert!(
        subject.starts_with(
            "[xenvault] nightly on pool1 (xcp-master.example): 1/3 succeeded, 1 failed"
        )
    );
    assert!(
        msg.contains("From: xenvault <backup@example.org>\n"),
        "{msg}"
    );
    assert!(msg.contains("Content-Type: text/plain"), "{msg}");
    let web = body
        .lines()
        .find(|l| l.trim_start().starts_with("web-01 "))
        .expect("web-01 line in the body");
    for part in [
        "2026-11-22 01:00:05",
        "2026-11-22 01:05:13",
        "5m08s",
        "3.00 GiB",
        "SUCCEEDED",
    ] {
        assert!(web.contains(part), "{part:?} missing in {web:?}");
    }
    assert!(body.contains("\nSummary\n"), "{body}");
    assert!(body.contains("  expected   3\n") && body.contains("  succeeded  1\n"));
    assert!(body.contains("  failed     1\n") && body.contains("  skipped    1\n"));
    assert!(body.contains(
        "FAILED  db-02 (aaaaaaaa-0000-0000-0000-000000000002): export mid-stream: VDI_IO_ERROR"
    ));
    assert!(body.contains("SKIPPED big-03"));
}

#[tokio::test]
async fn sending_retries_until_the_server_is_up() {
    if !aiosmtpd_available() {
        return;
    }
    let port = free_port();
    let mut s = settings(port);
    s.attempts = 20;
    s.backoff = Duration::from_millis(300);
    let report = report_support::sample_report();
    let send = tokio::spawn(async move { email::send_report(&s, &report).await });
    // The first attempt finds nobody listening.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let server = tokio::task::spawn_blocking(move || SmtpServer::start_on(port))
        .await
        .unwrap();
    let attempts = send.await.unwrap().unwrap();
    assert!(attempts >= 2, "took {attempts} attempt(s)");
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn a_dead_server_gives_a_clear_error_after_the_retries() {
    let port = free_port();
    let mut s = settings(port);
    s.attempts = 3;
    let started = Instant::now();
    let err = email::send_report(&s, &report_support::sample_report())
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, EmailError::Send { attempts: 3, .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("3 attempt(s)"),
        "{text}"
    );
    // Backoff 100 ms then 200 ms.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
}

#[tokio::test]
async fn a_login_the_server_does_not_offer_is_a_clear_error() {
    if !aiosmtpd_available() {
        return;
    }
    let server = SmtpServer::start_on(free_port());
    let mut s = settings(server.port);
    s.attempts = 1;
    s.username = Some("backup".into());
    s.password = Some("secret-password".into());
    let err = email::send_report(&s, &report_support::sample_report())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.to_lowercase().contains("authentication"), "{text}");
    assert!(!text.contains("secret-password"), "{text}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn starttls_against_a_plain_server_is_refused() {
    if !aiosmtpd_available() {
        return;
    }
    let server = SmtpServer::start_on(free_port());
    let mut s = settings(server.port);
    s.attempts = 1;
    s.security = SmtpSecurity::Starttls;
    let err = email::send_report(&s, &report_support::sample_report())
        .await
        .unwrap_err();
    assert!(matches!(err, EmailError::Send { .. }), "{err}");
    assert!(
        server.messages().is_empty(),
        "nothing may be sent in clear when STARTTLS is required"
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it (openssl).
fn test_certificates(dir: &std::path::Path) -> Option<(Vec<u8>, PathBuf, PathBuf)> {
    let has_openssl = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openssl {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "openssl is required under CI=true"
        );
        eprintln!("SKIPPING TLS email test: openssl not found");
        return None;
    }
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=xenvault test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    Some((
        std::fs::read(dir.join("ca.pem")).unwrap(),
        dir.join("server.pem"),
        dir.join("server.key"),
    ))
}

#[tokio::test]
async fn starttls_and_implicit_tls_deliver_with_a_trusted_ca() {
    if !aiosmtpd_available() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let Some((ca, cert, key)) = test_certificates(certs.path()) else {
        return;
    };
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    for (security, flags) in [
        (SmtpSecurity::Starttls, ["--tlscert", cert, "--tlskey", key]),
        (SmtpSecurity::Tls, ["--smtpscert", cert, "--smtpskey", key]),
    ] {
        let server = SmtpServer::start_with(free_port(), &flags);
        let mut s = settings(server.port);
        s.security = security;
        s.attempts = 1;
        // Without the CA the server is not trusted: a clear TLS error, nothing sent.
        let err = email::send_report(&s, &report_support::sample_report())
            .await
            .unwrap_err();
        assert!(
            matches!(err, EmailError::Send { .. }),
            "{security:?}: {err}"
        );
        assert!(server.messages().is_empty());
        s.extra_root_pem = Some(ca.clone());
        email::send_report(&s, &report_support::sample_report())
            .await
            .unwrap_or_else(|e| panic!("{security:?}: {e}"));
        let messages = server.messages();
        assert_eq!(messages.len(), 1, "{security:?}");
        let (head, body) = parse_message(&messages[0]);
        assert!(
            head.contains("Subject: [xenvault] nightly on pool1"),
            "{head}"
        );
        assert!(body.contains("\nSummary\n"));
    }
}
