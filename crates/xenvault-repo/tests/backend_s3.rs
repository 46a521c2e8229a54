//! The S3 backend against real S3 servers on 127.0.0.1: moto's server (honours
//! `If-None-Match: *` atomically, serves virtual-host style on a port),
//! s3s-fs (checks signatures) and s3rver (ignores `If-None-Match`: the
//! stat-then-put fallback). The conformance suite in
//! path and virtual-host style, multipart uploads, both put-if-absent
//! strategies, error messages, and full repository round trips through
//! `open_target`.

#![allow(clippy::unwrap_used)] // test helpers panic on purpose

mod backend_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use backend_support::*;
use bytes::Bytes;
use xenvault_repo::storage::*;
use xenvault_types::config::{S3Config, Secret, TargetConfig, TargetKind};

const ACCESS: &str = "xenvaulttest";
const SECRET: &str = "xenvault-test-secret-key";

/// moto's S3 server on a free port, or `None` (skipped) when not installed.
fn moto(dir: &std::path::Path) -> Option<Server> {
    let python = python_with("moto.server", "pip install 'moto[server]==5.2.1'")?;
    let port = free_port();
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "moto.server",
        "-H",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]);
    Some(Server::start(
        "moto_server",
        cmd,
        port,
        &dir.join("moto.log"),
    ))
}

/// s3s-fs serving `dir/data` on a free port with fixed credentials.
fn s3s_fs(dir: &std::path::Path) -> Option<Server> {
    s3s_fs_on(dir, free_port())
}

/// s3s-fs serving `dir/data` on `port`.
fn s3s_fs_on(dir: &std::path::Path, port: u16) -> Option<Server> {
    let bin = tool(
        "s3s-fs",
        &user_tool_dirs(),
        "cargo install s3s-fs --version 0.14.1 --features binary --locked",
    )?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS, "--secret-key", SECRET])
        .arg(&data);
    Some(Server::start("s3s-fs", cmd, port, &dir.join("s3s-fs.log")))
}

/// Creates a bucket on moto (which does not check signatures).
fn moto_bucket(port: u16, bucket: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
}

fn options(port: u16, bucket: &str, prefix: &str) -> S3Options {
    let mut o = S3Options::new(bucket, prefix);
    o.endpoint = Some(format!("http://127.0.0.1:{port}"));
    o.access_key_id = Some(ACCESS.into());
    o.secret_access_key = Some(Secret::new(SECRET));
    o.connect_timeout = Duration::from_secs(5);
    o
}

/// Virtual-host style: `bucket.localhost` resolved to the loopback server.
fn virtual_host_options(port: u16, bucket: &str, prefix: &str) -> S3Options {
    let mut o = options(port, bucket, prefix);
    o.endpoint = Some(format!("http://localhost:{port}"));
    o.virtual_host_style = true;
    o.resolve = vec![(
        format!("{bucket}.localhost"),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )];
    o
}

/// Small multipart settings so a few-MiB object is uploaded in parts.
fn multipart(mut o: S3Options) -> S3Options {
    o.multipart_threshold = 5 << 20;
    o.part_size = 5 << 20;
    o
}

fn fast_retry<S: Storage>(s: S) -> Retrying<S> {
    Retrying::new(
        s,
        RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
        },
    )
}

fn target(port: u16, url: &str, virtual_host: bool) -> TargetConfig {
    let mut t = TargetConfig::archive("s3test", "");
    t.kind = TargetKind::Repository;
    t.url = Some(url.to_string());
    t.s3 = Some(S3Config {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        virtual_host_style: virtual_host,
        access_key_id: Some(ACCESS.into()),
        secret_access_key_file: None,
        secret_access_key_env: None,
        secret_access_key: Some(Secret::new(SECRET)),
    });
    t
}

fn large(o: ConformanceOptions) -> ConformanceOptions {
    ConformanceOptions {
        large_object: 11 << 20,
        ..o
    }
}

#[tokio::test]
async fn moto_conformance_path_and_virtual_host_style_with_if_none_match() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = moto(dir.path()) else {
        return;
    };
    moto_bucket(server.port, "xv-moto");

    let s3 = S3Storage::new(multipart(options(server.port, "xv-moto", "repo/path"))).unwrap();
    assert!(
        s3.uses_conditional_writes().await.unwrap(),
        "moto honours If-None-Match: the Auto probe must find it"
    );
    run_conformance(Arc::new(s3), large(ConformanceOptions::default()))
        .await
        .unwrap();
    // The 11 MiB object went up in parts (moto logs each request line).
    let log = std::fs::read_to_string(dir.path().join("moto.log")).unwrap();
    assert!(
        log.contains("?uploads") && log.contains("uploadId="),
        "no multipart upload in the server log:\n{log}"
    );

    let vh = S3Storage::new(virtual_host_options(server.port, "xv-moto", "repo/vhost")).unwrap();
    run_conformance(Arc::new(fast_retry(vh)), ConformanceOptions::default())
        .await
        .unwrap();
    // Virtual-host style names the bucket in the Host header, never in the
    // path: moto's request lines show `/repo/vhost/…`, not `/xv-moto/repo/vhost/…`.
    let log = std::fs::read_to_string(dir.path().join("moto.log")).unwrap();
    assert!(
        log.contains(" /repo/vhost/"),
        "no virtual-host style request in the server log:\n{log}"
    );
    assert!(
        !log.contains("/xv-moto/repo/vhost"),
        "a virtual-host style request named the bucket in its path:\n{log}"
    );
    assert!(
        log.contains(" /xv-moto/repo/path/"),
        "path style names the bucket in the path:\n{log}"
    );

    // Explicit If-None-Match, behind the retry decorator.
    let mut o = options(server.port, "xv-moto", "");
    o.put_if_absent = PutIfAbsentStrategy::IfNoneMatch;
    let s3 = S3Storage::new(o).unwrap();
    run_conformance(Arc::new(fast_retry(s3)), ConformanceOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn moto_repository_round_trips_plain_and_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = moto(dir.path()) else {
        return;
    };
    moto_bucket(server.port, "xv-round");
    for (prefix, encrypted) in [("plain", false), ("encrypted/repo", true)] {
        let t = target(server.port, &format!("s3://xv-round/{prefix}"), false);
        let storage = open_target(&t).unwrap();
        repository_round_trip(storage, encrypted).await;
    }
}

/// s3s-fs keeps objects as files: HEAD of a key that is a directory there
/// answers 500 instead of 404 (a quirk of the test server, not of S3). And it
/// checks `If-None-Match: *` before writing, not atomically with the write
/// (racing conditional writers all succeed; found by this suite), so no
/// atomicity is expected of it whatever the strategy.
fn s3s_conformance(_conditional: bool) -> ConformanceOptions {
    ConformanceOptions {
        atomic_put_if_absent: false,
        stat_of_prefix_is_not_found: false,
        ..ConformanceOptions::default()
    }
}

#[tokio::test]
async fn s3s_fs_conformance_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = s3s_fs(dir.path()) else {
        return;
    };
    std::fs::create_dir_all(dir.path().join("data/xv-s3s")).unwrap();

    let s3 = S3Storage::new(multipart(options(server.port, "xv-s3s", "conf"))).unwrap();
    // s3s-fs refuses a conditional overwrite, so the probe picks If-None-Match.
    let conditional = s3.uses_conditional_writes().await.unwrap();
    assert!(
        conditional,
        "s3s-fs 0.14.1 refuses If-None-Match: * on an existing key"
    );
    run_conformance(Arc::new(s3), large(s3s_conformance(conditional)))
        .await
        .unwrap();

    // The explicit fallback, whatever the server offers.
    let mut o = options(server.port, "xv-s3s", "stat-then-put");
    o.put_if_absent = PutIfAbsentStrategy::StatThenPut;
    let s3 = S3Storage::new(o).unwrap();
    assert!(!s3.uses_conditional_writes().await.unwrap());
    run_conformance(Arc::new(s3), s3s_conformance(false))
        .await
        .unwrap();

    // No virtual-host style here: s3s-fs 0.14.1 refuses a Host header with a
    // port (`bucket.localhost:PORT`, InvalidBucketName); moto covers that style.

    for (prefix, encrypted) in [("plain", false), ("encrypted", true)] {
        let t = target(server.port, &format!("s3://xv-s3s/{prefix}"), false);
        repository_round_trip(open_target(&t).unwrap(), encrypted).await;
    }
}

#[tokio::test]
async fn s3_errors_name_the_bucket_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = s3s_fs(dir.path()) else {
        return;
    };
    std::fs::create_dir_all(dir.path().join("data/xv-err")).unwrap();
    let body = Bytes::from_static(b"x");

    // Wrong secret key: permanent, not retried, says what to check.
    let mut o = options(server.port, "xv-err", "p");
    o.secret_access_key = Some(Secret::new("not-the-secret"));
    o.put_if_absent = PutIfAbsentStrategy::IfNoneMatch;
    let e = fast_retry(S3Storage::new(o).unwrap())
        .put("config", body.clone())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Permanent, "{e}");
    assert!(e.message.contains("s3://xv-err/p/config"), "{e}");
    assert!(e.message.contains("access-key-id"), "{e}");

    // A bucket that does not exist (moto answers NoSuchBucket as AWS does;
    // s3s-fs says NoSuchKey).
    let Some(moto) = moto(dir.path()) else {
        return;
    };
    let s3 = S3Storage::new(options(moto.port, "xv-missing", "p")).unwrap();
    let e = s3.get("config").await.unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Permanent, "{e}");
    assert!(
        e.message.contains("bucket 'xv-missing' does not exist"),
        "{e}"
    );
    let e = s3.put("config", body.clone()).await.unwrap_err();
    assert!(
        e.message.contains("bucket 'xv-missing' does not exist"),
        "{e}"
    );

    // Nothing listens: transient, retried, then given up with the hint.
    let closed = free_port();
    let e = fast_retry(S3Storage::new(options(closed, "xv-err", "p")).unwrap())
        .get("config")
        .await
        .unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Transient, "{e}");
    assert!(e.message.contains("cannot reach http://127.0.0.1"), "{e}");
    assert!(e.message.contains("gave up after 3 attempts"), "{e}");
    drop(server);
}

#[tokio::test]
async fn a_server_restart_is_ridden_out_by_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = s3s_fs(dir.path()) else {
        return;
    };
    let port = server.port;
    std::fs::create_dir_all(dir.path().join("data/xv-restart")).unwrap();
    let storage = Retrying::new(
        S3Storage::new(options(port, "xv-restart", "r")).unwrap(),
        RetryPolicy {
            max_attempts: 40,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        },
    );
    storage
        .put("locks/a", Bytes::from_static(b"before"))
        .await
        .unwrap();
    // Stop the server; start it again on the same port a little later, while
    // the next request is being retried (refused connections are transient).
    drop(server);
    let data_dir = dir.path().to_path_buf();
    let restarted = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        s3s_fs_on(&data_dir, port)
    });
    let got = storage.get("locks/a").await;
    let _server = restarted.join().unwrap();
    assert_eq!(&got.unwrap()[..], b"before");
}

#[test]
fn open_target_refuses_incomplete_s3_settings() {
    let mut t = target(1, "s3://bkt/p", false);
    if let Some(s3) = t.s3.as_mut() {
        s3.secret_access_key = None;
    }
    let e = open_target(&t).err().unwrap();
    assert!(e.message.contains("secret-access-key-file"), "{e}");
}

/// s3rver (npm) serving `dir/data` on a free port with bucket `bucket`, or
/// `None` (skipped) when not installed. It ignores `If-None-Match`, as some
/// S3-compatible stores do, and takes its default credentials.
fn s3rver(dir: &std::path::Path, bucket: &str) -> Option<Server> {
    let bin = tool(
        "s3rver",
        &user_tool_dirs(),
        "scripts/install-test-deps.sh (npm install s3rver@3.7.1)",
    )?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--address", "127.0.0.1", "--port", &port.to_string()])
        .args(["--configure-bucket", bucket, "--directory"])
        .arg(&data);
    Some(Server::start("s3rver", cmd, port, &dir.join("s3rver.log")))
}

/// A server that accepts `If-None-Match: *` and overwrites anyway: the `Auto`
/// probe finds out and falls back to stat-then-put (with its warning), the
/// conformance suite passes but for atomicity, and repositories round trip.
#[tokio::test]
async fn a_server_ignoring_if_none_match_gets_stat_then_put() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = s3rver(dir.path(), "xv-s3rver") else {
        return;
    };
    let creds = |mut o: S3Options| {
        o.access_key_id = Some("S3RVER".into());
        o.secret_access_key = Some(Secret::new("S3RVER"));
        o
    };
    let s3 = S3Storage::new(creds(options(server.port, "xv-s3rver", "auto"))).unwrap();
    assert!(
        !s3.uses_conditional_writes().await.unwrap(),
        "s3rver overwrites under If-None-Match: the probe must notice"
    );
    // Stat-then-put keeps the single-writer promise, not the racing one.
    // And s3rver writes an object in place as its body arrives (S3 swaps it
    // whole), so racing writers of one key interleave there: one writer.
    let conformance = ConformanceOptions {
        atomic_put_if_absent: false,
        racers: 1,
        ..ConformanceOptions::default()
    };
    run_conformance(Arc::new(s3), conformance).await.unwrap();
    // What a backup relies on: a second write of a chunk is refused, and the
    // first one's bytes stay.
    let s3 = S3Storage::new(creds(options(server.port, "xv-s3rver", "chunks"))).unwrap();
    s3.put_if_absent("chunks/ab/first", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let again = s3
        .put_if_absent("chunks/ab/first", Bytes::from_static(b"two"))
        .await
        .unwrap_err();
    assert_eq!(again.kind, StorageErrorKind::AlreadyExists, "{again}");
    assert_eq!(&s3.get("chunks/ab/first").await.unwrap()[..], b"one");
    for (prefix, encrypted) in [("plain", false), ("encrypted", true)] {
        let s3 = S3Storage::new(creds(options(server.port, "xv-s3rver", prefix))).unwrap();
        repository_round_trip(Arc::new(s3), encrypted).await;
    }
}
