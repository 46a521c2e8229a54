//! The SFTP backend against OpenSSH's `sshd`, run as the current user on
//! 127.0.0.1 with a generated host key and user key: the conformance suite,
//! full repository round trips through `open_target`, and the login errors
//! (unknown host key, refused user key, nothing listening).

#![allow(clippy::unwrap_used)] // test helpers panic on purpose

mod backend_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use backend_support::*;
use bytes::Bytes;
use xenvault_repo::storage::*;

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

#[tokio::test]
async fn sftp_conformance() {
    let Some(sshd) = sshd() else {
        return;
    };
    let s = SftpStorage::new(sshd.options("conformance/nested/repo")).unwrap();
    let r = run_conformance(Arc::new(s), ConformanceOptions::default()).await;
    assert!(r.is_ok(), "{:?}\nsshd log:\n{}", r, sshd.log());
    // The repository directory was created; no temporary file is left behind.
    let repo = sshd.dir.path().join("conformance/nested/repo");
    assert!(repo.is_dir());
    let mut stack = vec![repo];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            assert!(!name.starts_with(".tmp-"), "leftover {name}");
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    // Behind the retry decorator too.
    let s = fast_retry(SftpStorage::new(sshd.options("retrying")).unwrap());
    run_conformance(Arc::new(s), ConformanceOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn sftp_repository_round_trips_plain_and_encrypted() {
    let Some(sshd) = sshd() else {
        return;
    };
    for (dir, encrypted) in [("plain", false), ("encrypted", true)] {
        let storage = open_target(&sshd.target(dir)).unwrap();
        repository_round_trip(storage, encrypted).await;
    }
    // The objects are plain files in the directory the url names.
    assert!(sshd.dir.path().join("plain/config").is_file());
}

#[tokio::test]
async fn sftp_login_errors_name_the_fix() {
    let Some(sshd) = sshd() else {
        return;
    };
    let body = Bytes::from_static(b"x");

    // The host key is not in the known_hosts file: refused, permanently.
    let other_hosts = sshd.dir.path().join("other_known_hosts");
    std::fs::write(&other_hosts, "").unwrap();
    let mut o = sshd.options("r");
    o.known_hosts_file = Some(other_hosts);
    let e = fast_retry(SftpStorage::new(o).unwrap())
        .put("config", body.clone())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Permanent, "{e}");
    assert!(e.message.contains("host key"), "{e}");
    assert!(e.message.contains("ssh-keyscan"), "{e}");

    // A key the server does not accept.
    let keygen_bin = tool("ssh-keygen", &[], "apt-get install openssh-client").unwrap();
    let stranger = sshd.dir.path().join("stranger_key");
    keygen(&keygen_bin, &stranger);
    let mut o = sshd.options("r");
    o.key_file = stranger;
    let e = fast_retry(SftpStorage::new(o).unwrap())
        .get("config")
        .await
        .unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Permanent, "{e}");
    assert!(e.message.contains("authorized_keys"), "{e}");

    // Nothing listens on the port: transient, retried, then given up.
    let mut o = sshd.options("r");
    o.port = free_port();
    let e = fast_retry(SftpStorage::new(o).unwrap())
        .stat("config")
        .await
        .unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Transient, "{e}");
    assert!(e.message.contains("cannot reach 127.0.0.1"), "{e}");
    assert!(e.message.contains("gave up after 3 attempts"), "{e}");

    // A missing key file is refused before any connection.
    let mut o = sshd.options("r");
    o.key_file = sshd.dir.path().join("no-such-key");
    let e = SftpStorage::new(o).unwrap_err();
    assert!(e.message.contains("key-file"), "{e}");
}

/// The pids of the direct children of `parent` (sshd's per-connection processes).
fn children_of(parent: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn a_broken_connection_is_reopened_by_the_retry() {
    let Some(sshd) = sshd() else {
        return;
    };
    let storage = Retrying::new(
        SftpStorage::new(sshd.options("reconnect")).unwrap(),
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        },
    );
    storage
        .put_if_absent("chunks/aa/aa01", Bytes::from_static(b"before"))
        .await
        .unwrap();
    // Kill the server side of the connection (sshd's session processes; the
    // listener stays): the next operation meets a dead connection.
    let sessions = children_of(sshd.server.child.id());
    assert!(!sessions.is_empty(), "no sshd session process found");
    for pid in sessions {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let got = tokio::time::timeout(Duration::from_secs(60), storage.get("chunks/aa/aa01"))
        .await
        .expect("the read neither failed nor succeeded within 60 s");
    assert_eq!(&got.unwrap()[..], b"before", "read after reconnecting");
    // It did log in again.
    let logins = sshd.log().matches("Accepted publickey").count();
    assert!(logins >= 2, "{logins} logins:\n{}", sshd.log());
    storage
        .put_if_absent("chunks/aa/aa02", Bytes::from_static(b"after"))
        .await
        .unwrap();
}

/// Temporaries of interrupted uploads are removed once old enough (ADR 0008);
/// objects and recent temporaries stay.
#[tokio::test]
async fn sftp_stale_temporaries_are_removed() {
    let Some(sshd) = sshd() else {
        return;
    };
    let s = SftpStorage::new(sshd.options("temporaries")).unwrap();
    s.put_if_absent("chunks/ab/ab01", Bytes::from_static(b"kept"))
        .await
        .unwrap();
    let repo = sshd.dir.path().join("temporaries");
    let old = repo.join("chunks/ab/.tmp-1-old");
    let recent = repo.join(".tmp-1-recent");
    std::fs::write(&old, b"torn").unwrap();
    std::fs::write(&recent, b"torn").unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(hour_ago - Duration::from_secs(60))
        .unwrap();
    assert_eq!(s.remove_stale_temporaries(hour_ago).await.unwrap(), 1);
    assert!(!old.exists() && recent.exists());
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    assert_eq!(s.remove_stale_temporaries(later).await.unwrap(), 1);
    assert!(!recent.exists());
    assert_eq!(&s.get("chunks/ab/ab01").await.unwrap()[..], b"kept");
}
