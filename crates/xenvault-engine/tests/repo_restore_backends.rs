//! Repository restores from remote backends: a repository on S3 (s3s-fs on
//! 127.0.0.1) and on SFTP (OpenSSH `sshd` on 127.0.0.1), opened through the
//! engine's `open_repository` as the CLI does, restores bit for bit to raw,
//! VHD and XVA, plain and encrypted. The restore code reads every backend
//! the same way (`Repository::read_disk`), so the pool paths, tested on a
//! local repository, read these the same way too.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

#[path = "../../xenvault-repo/tests/backend_support/mod.rs"]
mod backend_support;
mod repo_restore_support;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use backend_support::{Server, free_port, tool, user_tool_dirs};
use repo_restore_support::{TestDisk, disk_meta, pattern_disk, write_point};
use xenvault_engine::restore::repo::{
    FileFormat, FileRestoreOptions, find_repo_point, restore_repo_to_file,
};
use xenvault_engine::restore::{DiskSelector, no_progress};
use xenvault_repo::{CipherKind, EncryptionInit, InitOptions, KdfParams, Repository};
use xenvault_types::config::{S3Config, Secret, SftpConfig, TargetConfig, TargetKind};

const VM: &str = "11111111-2222-3333-4444-555555555555";
const SNAP_VDI: &str = "00000000-0000-0000-0000-000000000002";
const LIVE_VDI: &str = "aaaaaaaa-0000-0000-0000-00000000000a";
const SIZE: usize = (5 << 20) + (64 << 10);
const ACCESS: &str = "xenvaulttest";
const SECRET: &str = "xenvault-test-secret-key";

/// Creates the repository of `target`, writes one restore point, reopens it
/// as the CLI does and restores it to every file format.
async fn round_trip(target: &mut TargetConfig, encrypted: bool) {
    let storage = xenvault_engine::repository::open_storage(target)
        .await
        .unwrap();
    let encryption = encrypted.then(|| EncryptionInit {
        password: b"pw".to_vec(),
        label: "test".into(),
        cipher: CipherKind::ChaCha20Poly1305,
        kdf: KdfParams::insecure_for_tests(),
    });
    let repo = Repository::init(
        storage,
        InitOptions {
            encryption,
            ..InitOptions::default()
        },
    )
    .await
    .unwrap();
    let bytes = pattern_disk(SIZE, 9);
    let records = xenvault_formats::xva::tests_support::one_disk_vm(SIZE as u64);
    let source = xenvault_types::Value::record([("name_label", xenvault_types::Value::str("web"))]);
    let vm_records: serde_json::Value = serde_json::from_str(
        &xenvault_engine::archive::meta::vm_json(VM, &records, &source, &[]),
    )
    .unwrap();
    write_point(
        &repo,
        VM,
        "web",
        time::OffsetDateTime::now_utc(),
        &[TestDisk {
            key: LIVE_VDI.into(),
            bytes: bytes.clone(),
            meta: disk_meta("0", SNAP_VDI, LIVE_VDI, "root", SIZE as u64),
        }],
        vm_records,
    )
    .await;

    target.password = encrypted.then(|| Secret::new("pw"));
    let repo = xenvault_engine::repository::open_repository(target)
        .await
        .unwrap();
    let point = find_repo_point(&repo, "web", None).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    for format in [FileFormat::Raw, FileFormat::Vhd, FileFormat::Xva] {
        let path = out.path().join(format!("disk.{format:?}"));
        let mut o = FileRestoreOptions::new(&path, format);
        o.disk = Some(DiskSelector::Position("0".into()));
        restore_repo_to_file(&repo, &point, &o, no_progress())
            .await
            .unwrap();
        let got = match format {
            FileFormat::Raw => std::fs::read(&path).unwrap(),
            FileFormat::Vhd => {
                let raw = out.path().join("from-vhd.raw");
                let st = Command::new("qemu-img")
                    .args(["convert", "-f", "vpc", "-O", "raw"])
                    .arg(&path)
                    .arg(&raw)
                    .status()
                    .expect("qemu-img");
                assert!(st.success());
                std::fs::read(&raw).unwrap()
            }
            FileFormat::Xva => xva_disk(&path),
        };
        assert!(
            got == bytes,
            "{format:?} restore from {:?} differs",
            target.url
        );
    }
}

/// The disk of a one-disk XVA, decoded.
fn xva_disk(path: &Path) -> Vec<u8> {
    use xenvault_formats::xva::{XvaDecoder, XvaEvent};
    use xenvault_types::ExtentData;
    let mut dec = XvaDecoder::new();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for ev in dec.feed(&buf[..n]).unwrap() {
            if let XvaEvent::Extent(e) = ev {
                let end = e.end() as usize;
                out.resize(out.len().max(end), 0);
                if let ExtentData::Data(d) = e.data {
                    out[e.offset as usize..end].copy_from_slice(&d);
                }
            }
        }
    }
    dec.finish().unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_from_an_s3_repository() {
    let Some(bin) = tool(
        "s3s-fs",
        &user_tool_dirs(),
        "cargo install s3s-fs --version 0.14.1 --features binary --locked",
    ) else {
        return;
    };
    if tool("qemu-img", &[], "apt-get install qemu-utils").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("restorebucket")).unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS, "--secret-key", SECRET])
        .arg(&data);
    let _server = Server::start("s3s-fs", cmd, port, &dir.path().join("s3s-fs.log"));
    for (encrypted, prefix) in [(false, "plain"), (true, "encrypted")] {
        let mut t = TargetConfig::archive("s3", "");
        t.kind = TargetKind::Repository;
        t.url = Some(format!("s3://restorebucket/{prefix}"));
        t.s3 = Some(S3Config {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: "us-east-1".into(),
            virtual_host_style: false,
            access_key_id: Some(ACCESS.into()),
            secret_access_key_file: None,
            secret_access_key_env: None,
            secret_access_key: Some(Secret::new(SECRET)),
        });
        round_trip(&mut t, encrypted).await;
    }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn keygen(ssh_keygen: &Path, file: &Path) {
    let st = Command::new(ssh_keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "xenvault-test", "-f"])
        .arg(file)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_from_an_sftp_repository() {
    let install = "apt-get install openssh-server openssh-client";
    let sbin = [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")];
    let (Some(sshd), Some(keygen_bin), Some(_)) = (
        tool("sshd", &sbin, install),
        tool("ssh-keygen", &[], install),
        tool("qemu-img", &[], "apt-get install qemu-utils"),
    ) else {
        return;
    };
    // sshd run as the current user on a free loopback port (as the
    // backend's own tests do).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&keygen_bin, &d.join("host_key"));
    keygen(&keygen_bin, &d.join("user_key"));
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    if current_user() == "root" {
        std::fs::create_dir_all("/run/sshd").unwrap();
    }
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
         AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n",
        d = d.display()
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let mut cmd = Command::new(sshd);
    cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
    let _server = Server::start("sshd", cmd, port, &d.join("sshd.log"));
    let host_key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
    let known_hosts = d.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key}")).unwrap();
    for (encrypted, sub) in [(false, "plain"), (true, "encrypted")] {
        let mut t = TargetConfig::archive("sftp", "");
        t.kind = TargetKind::Repository;
        t.url = Some(format!(
            "sftp://{}@127.0.0.1:{port}{}",
            current_user(),
            d.join(sub).display()
        ));
        t.sftp = Some(SftpConfig {
            key_file: d.join("user_key"),
            known_hosts_file: Some(known_hosts.clone()),
        });
        tokio::time::timeout(Duration::from_secs(120), round_trip(&mut t, encrypted))
            .await
            .expect("the SFTP round trip hung");
    }
}
