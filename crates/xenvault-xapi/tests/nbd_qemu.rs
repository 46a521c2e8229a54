//! NBD client against qemu-nbd on 127.0.0.1: full reads, block status of sparse
//! raw and VHD images, several connections, local alignment checks, and STARTTLS
//! with a pinned certificate (accepted) and a different one (refused).
//!
//! qemu-nbd is required: the tests fail when it is missing and CI=true, and skip
//! loudly otherwise.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use xenvault_types::extent::{Extent, ExtentData};
use xenvault_xapi::nbd::client::{
    ExportSelect, NbdConnection, NbdError, NbdMultiReader, NbdOptions, NbdTls,
};
use xenvault_xapi::nbd::proto::alloc;

const MIB: u64 = 1024 * 1024;
const DISK_SIZE: u64 = 8 * MIB;
/// Data regions of the test disk (offset, length); the rest is holes.
const DATA_REGIONS: &[(u64, u64)] = &[(0, 64 * 1024), (3 * MIB, MIB), (6 * MIB + 4096, 8192)];

fn tool_present(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required for this test (CI=true) but was not found");
        }
        eprintln!("!!!!! SKIPPING: {tool} not found; install qemu-utils to run this test !!!!!");
    }
    found
}

fn pattern_byte(offset: u64) -> u8 {
    ((offset / 512) as u8) ^ (offset as u8).wrapping_mul(31) | 1
}

/// Writes the sparse test disk and returns its expected content.
fn make_disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let mut expected = vec![0u8; DISK_SIZE as usize];
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(DISK_SIZE).unwrap();
    let mut file = file;
    use std::io::{Seek, SeekFrom};
    for &(offset, len) in DATA_REGIONS {
        let data: Vec<u8> = (offset..offset + len).map(pattern_byte).collect();
        expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&data).unwrap();
    }
    file.sync_all().unwrap();
    (path, expected)
}

struct QemuNbd {
    child: Child,
    port: u16,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_qemu_nbd(format: &str, file: &Path, extra: &[String]) -> QemuNbd {
    let port = free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", format, "-r", "-t", "-e", "8", "-b", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .args(extra)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().expect("qemu-nbd starts");
    let server = QemuNbd { child, port };
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn options(port: u16) -> NbdOptions {
    let mut o = NbdOptions::new(format!("127.0.0.1:{port}"), "");
    o.io_timeout = Duration::from_secs(20);
    o.connect_timeout = Duration::from_secs(20);
    o
}

/// Applies extents onto a zeroed buffer, checking order and coverage.
fn assemble(extents: &[Extent], size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let mut last_end = 0;
    for e in extents {
        assert!(e.offset >= last_end, "extents out of order at {}", e.offset);
        last_end = e.end();
        if let ExtentData::Data(bytes) = &e.data {
            out[e.offset as usize..e.end() as usize].copy_from_slice(bytes);
        }
    }
    out
}

#[tokio::test]
async fn raw_full_read_with_export_name_and_go() {
    if !tool_present("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, expected) = make_disk(dir.path());
    let server = start_qemu_nbd("raw", &path, &[]);
    for select in [
        ExportSelect::ExportName,
        ExportSelect::Go,
        ExportSelect::Auto,
    ] {
        let mut opts = options(server.port);
        opts.select = select;
        opts.structured_replies = false;
        let conn = NbdConnection::connect(&opts).await.unwrap();
        assert_eq!(conn.size(), DISK_SIZE, "{select:?}");
        assert!(conn.export().read_only());
        assert!(!conn.structured_replies());
        let mut got = Vec::new();
        for offset in (0..DISK_SIZE).step_by(MIB as usize) {
            got.extend(conn.read(offset, MIB as u32).await.unwrap());
        }
        assert!(got == expected, "content differs with {select:?}");
        conn.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn structured_reads_and_block_status_of_sparse_raw() {
    if !tool_present("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, expected) = make_disk(dir.path());
    let server = start_qemu_nbd("raw", &path, &[]);
    let mut opts = options(server.port);
    opts.select = ExportSelect::Go;
    let conn = NbdConnection::connect(&opts).await.unwrap();
    assert!(conn.structured_replies());
    assert!(conn.has_block_status());

    // Pipelined structured reads, all in flight at once.
    let reads = (0..DISK_SIZE / MIB).map(|i| conn.read(i * MIB, MIB as u32));
    let parts = futures::future::try_join_all(reads).await.unwrap();
    assert!(parts.concat() == expected);

    // Block status: every data region is reported as data, the big holes as zero.
    let mut status = Vec::new();
    let mut at = 0;
    while at < DISK_SIZE {
        let runs = conn
            .block_status(at, (DISK_SIZE - at) as u32)
            .await
            .unwrap();
        at = runs.last().map(|r| r.0 + r.1).unwrap();
        status.extend(runs);
    }
    let is_zero_at = |offset: u64| {
        status
            .iter()
            .find(|r| r.0 <= offset && offset < r.0 + r.1)
            .map(|r| r.2 & alloc::ZERO != 0)
            .unwrap()
    };
    for &(offset, len) in DATA_REGIONS {
        assert!(!is_zero_at(offset), "data at {offset} reported as zero");
        assert!(!is_zero_at(offset + len - 1));
    }
    for hole in [MIB, 2 * MIB, 5 * MIB, 7 * MIB + 512 * 1024] {
        assert!(
            is_zero_at(hole),
            "hole at {hole} reported as data: {status:?}"
        );
    }

    // read_extents turns the holes into Zero extents and still gives the content.
    let extents = conn.read_extents(0..DISK_SIZE).await.unwrap();
    let zero_bytes: u64 = extents
        .iter()
        .filter(|e| matches!(e.data, ExtentData::Zero(_)))
        .map(|e| e.len())
        .sum();
    assert!(
        zero_bytes >= DISK_SIZE - 2 * MIB,
        "only {zero_bytes} zero bytes: {:?}",
        extents
            .iter()
            .map(|e| (e.offset, e.len()))
            .collect::<Vec<_>>()
    );
    assert!(assemble(&extents, DISK_SIZE) == expected);
    conn.disconnect().await.unwrap();
}

#[tokio::test]
async fn sparse_vhd_reads_equal_raw_and_reports_holes() {
    if !tool_present("qemu-nbd") || !tool_present("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, expected) = make_disk(dir.path());
    let vhd = dir.path().join("disk.vhd");
    let status = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ])
        .arg(&raw)
        .arg(&vhd)
        .status()
        .unwrap();
    assert!(status.success());
    let server = start_qemu_nbd("vpc", &vhd, &[]);
    let opts = options(server.port);
    let reader = NbdMultiReader::connect(&opts, 2).await.unwrap();
    assert_eq!(reader.size(), DISK_SIZE);
    let extents: Vec<Extent> = reader
        .read_ranges(std::iter::once(0..DISK_SIZE))
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert!(assemble(&extents, DISK_SIZE) == expected);
    // VHD blocks are 2 MiB: blocks 0, 1 (3 MiB..4 MiB is in block 1) and 3 hold
    // data; block 2 (4..6 MiB) is unallocated and must come back as a Zero extent.
    let covers_zero = |offset: u64| {
        extents.iter().any(|e| {
            matches!(e.data, ExtentData::Zero(_)) && e.offset <= offset && offset < e.end()
        })
    };
    assert!(covers_zero(4 * MIB) && covers_zero(6 * MIB - 1));
    reader.disconnect().await;
}

#[tokio::test]
async fn several_connections_read_ranges_in_order() {
    if !tool_present("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, expected) = make_disk(dir.path());
    let server = start_qemu_nbd("raw", &path, &[]);
    let mut opts = options(server.port);
    opts.structured_replies = false; // plain reads, as against xapi-nbd
    opts.max_in_flight = 3;
    let reader = NbdMultiReader::connect(&opts, 4)
        .await
        .unwrap()
        .with_piece_size(64 * 1024);
    assert_eq!(reader.connection_count(), 4);
    // Unsorted, overlapping and adjacent ranges, as a CBT walk could produce.
    let ranges = vec![
        3 * MIB..4 * MIB,
        0..128 * 1024,
        64 * 1024..192 * 1024,
        6 * MIB..6 * MIB + 64 * 1024,
        6 * MIB + 64 * 1024..6 * MIB + 128 * 1024,
        DISK_SIZE - 512..DISK_SIZE,
    ];
    let extents: Vec<Extent> = reader
        .read_ranges(ranges)
        .map(|r| r.unwrap())
        .collect()
        .await;
    let mut last_end = 0;
    let mut covered = 0;
    for e in &extents {
        assert!(e.offset >= last_end, "out of order");
        last_end = e.end();
        covered += e.len();
        let ExtentData::Data(bytes) = &e.data else {
            panic!("no block status negotiated, yet a zero extent");
        };
        assert!(
            bytes[..] == expected[e.offset as usize..e.end() as usize],
            "content at {}",
            e.offset
        );
    }
    assert_eq!(covered, MIB + 192 * 1024 + 128 * 1024 + 512);
    reader.disconnect().await;
}

#[tokio::test]
async fn unaligned_and_out_of_range_reads_are_rejected_locally() {
    if !tool_present("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_disk(dir.path());
    let server = start_qemu_nbd("raw", &path, &[]);
    let conn = NbdConnection::connect(&options(server.port)).await.unwrap();
    assert!(matches!(
        conn.read(1, 512).await,
        Err(NbdError::Unaligned { offset: 1, .. })
    ));
    assert!(matches!(
        conn.read(0, 100).await,
        Err(NbdError::Unaligned { length: 100, .. })
    ));
    assert!(matches!(
        conn.read(DISK_SIZE, 512).await,
        Err(NbdError::OutOfRange { .. })
    ));
    assert!(matches!(
        conn.read_extents(512..1000).await,
        Err(NbdError::Unaligned { .. })
    ));
    // The connection is still fine afterwards.
    assert_eq!(conn.read(512, 512).await.unwrap().len(), 512);
}

/// Writes CA, server certificate and key in qemu's tls-creds-x509 layout; returns
/// the server certificate PEM.
fn make_tls_dir(dir: &Path) -> String {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "xenvault test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.as_ref().pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    cert.pem()
}

#[tokio::test]
async fn starttls_with_pinned_certificate() {
    if !tool_present("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, expected) = make_disk(dir.path());
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let server_pem = make_tls_dir(&tls_dir);
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
        tls_dir.display()
    );
    let server = start_qemu_nbd(
        "raw",
        &path,
        &[
            "--object".into(),
            object,
            "--tls-creds".into(),
            "tls0".into(),
        ],
    );

    // The pinned certificate is accepted: plain reads and block status over TLS.
    let mut opts = options(server.port);
    opts.tls = NbdTls::PinnedPem(server_pem);
    let reader = NbdMultiReader::connect(&opts, 2).await.unwrap();
    let extents: Vec<Extent> = reader
        .read_ranges(std::iter::once(0..DISK_SIZE))
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert!(assemble(&extents, DISK_SIZE) == expected);
    reader.disconnect().await;

    // A different certificate is refused, with the pin mismatch named.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let mut wrong = options(server.port);
    wrong.tls = NbdTls::PinnedPem(other.cert.pem());
    let err = NbdConnection::connect(&wrong).await.unwrap_err();
    assert!(matches!(err, NbdError::TlsHandshake { .. }), "{err}");
    assert!(
        err.to_string().contains("does not match the pinned"),
        "{err}"
    );

    // Without TLS the server says TLS is required, and the error says what to do.
    let plain = options(server.port);
    let err = NbdConnection::connect(&plain).await.unwrap_err();
    assert!(err.to_string().contains("NBD_REP_ERR_TLS_REQD"), "{err}");
    assert!(err.to_string().contains("requires TLS"), "{err}");
}
