//! Helpers of the remote backend tests: finding outside tools (a missing one fails
//! under `CI=true`), running a server on a free loopback port and stopping it,
//! OpenSSH's `sshd` as the current user with generated keys, and a full
//! repository round trip on any storage.

#![allow(clippy::unwrap_used, dead_code)] // test helpers panic on purpose

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use time::macros::datetime;
use xenvault_repo::storage::{SftpOptions, Storage};
use xenvault_repo::*;
use xenvault_types::config::{SftpConfig, TargetConfig, TargetKind};
use xenvault_types::{Extent, ExtentData};

pub const MIB: u64 = 1 << 20;

/// The path of `name` (searched in PATH, then in `extra` directories), or
/// `None` after a loud message. Under `CI=true` a missing tool fails the test.
pub fn tool(name: &str, extra: &[PathBuf], install: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend_from_slice(extra);
    if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{name} is missing and CI=true: install it with `{install}` (scripts/install-test-deps.sh)"
        );
    }
    eprintln!(
        "\n*** SKIPPING: {name} is not installed; install it with `{install}` \
         (scripts/install-test-deps.sh) ***\n"
    );
    None
}

/// `python3` when it can import `module`, or `None` after a loud message
/// (a failure under `CI=true`).
pub fn python_with(module: &str, install: &str) -> Option<PathBuf> {
    let python = tool("python3", &[], "apt-get install python3")?;
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "python3 cannot import {module} and CI=true: install it with `{install}` (scripts/install-test-deps.sh)"
        );
    }
    eprintln!(
        "\n*** SKIPPING: python3 cannot import {module}; install it with `{install}` \
         (scripts/install-test-deps.sh) ***\n"
    );
    None
}

/// `~/.cargo/bin` and pyenv's shims: where `cargo install` and `pip` put tools.
pub fn user_tool_dirs() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut v = vec![home.join(".cargo/bin"), home.join(".local/bin")];
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        v.push(PathBuf::from(c).join("bin"));
    }
    v.push(home.join(".pyenv/shims"));
    v
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released for the server,
/// which takes it by number: these servers cannot report a port they chose).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A server process, killed and reaped when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub name: &'static str,
}

impl Server {
    /// Starts `cmd` and waits until it accepts connections on `port`.
    pub fn start(name: &'static str, mut cmd: Command, port: u16, log: &Path) -> Server {
        let out = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut server = Server { child, port, name };
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("{name} exited ({status}) before listening on {port}:\n{text}");
            }
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("{name} did not listen on {port} within 60 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A disk image of random, repetitive and zero runs, not chunk-aligned.
pub fn image(size: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut x = seed | 1;
    let mut i = 0usize;
    while i < v.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (x % (700 * 1024)) as usize + 1;
        let end = (i + run).min(v.len());
        match x % 3 {
            0 => {}
            1 => v[i..end]
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = b"xenvault backend "[k % 17]),
            _ => {
                let mut y = x;
                for b in &mut v[i..end] {
                    y = y
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *b = (y >> 56) as u8;
                }
            }
        }
        i = end;
    }
    v
}

fn init_options(encrypted: bool) -> InitOptions {
    InitOptions {
        chunk_size: MIB as u32,
        zstd_level: 1,
        encryption: encrypted.then(|| EncryptionInit {
            password: b"backend test password".to_vec(),
            label: "test".into(),
            cipher: CipherKind::Aes256Gcm,
            kdf: KdfParams::insecure_for_tests(),
        }),
    }
}

/// Initialises a repository on `storage` (plain or encrypted), writes a restore
/// point of two disks, reopens the repository, reads both disks back bit for
/// bit, and checks and verifies it clean.
pub async fn repository_round_trip(storage: Arc<dyn Storage>, encrypted: bool) {
    let repo = Repository::init(storage.clone(), init_options(encrypted))
        .await
        .unwrap();
    let disk_a = image(3 * MIB + 12_345, 7);
    let mut disk_b = vec![0u8; (2 * MIB) as usize];
    disk_b[MIB as usize + 3] = 0x5a;
    let t = datetime!(2026-11-22 03:00 UTC);
    let rp = repo
        .begin_restore_point("vm-backend", "backend-vm", t, None, WriteOptions::default())
        .await
        .unwrap();
    for (key, img) in [("xvda", &disk_a), ("xvdb", &disk_b)] {
        let mut w = rp
            .full_disk(key, img.len() as u64, json!({"disk": key}))
            .unwrap();
        let mut off = 0u64;
        while off < img.len() as u64 {
            let n = (256 * 1024 + 3).min(img.len() as u64 - off);
            let piece = &img[off as usize..(off + n) as usize];
            let e = if piece.iter().all(|&b| b == 0) {
                Extent::zero(off, n)
            } else {
                Extent::data(off, piece.to_vec())
            };
            w.write_extent(e).await.unwrap();
            off += n;
        }
        w.finish().await.unwrap();
    }
    let records = json!({"VM": {"uuid": "vm-backend"}, "VBDs": [], "VDIs": []});
    let m = rp
        .commit(
            records.clone(),
            json!({"format": "test"}),
            json!({"job": "backend"}),
        )
        .await
        .unwrap();

    let pw: Option<&[u8]> = encrypted.then_some(b"backend test password");
    let repo = Repository::open(storage.clone(), pw).await.unwrap();
    assert_eq!(repo.is_encrypted(), encrypted);
    let listed = repo.list_restore_points(None).await.unwrap();
    assert_eq!(listed, vec![("vm-backend".to_string(), m.id.clone())]);
    let loaded = repo.load_manifest("vm-backend", &m.id).await.unwrap();
    assert_eq!(loaded, m);
    assert_eq!(loaded.vm_records, records);
    for (key, img) in [("xvda", &disk_a), ("xvdb", &disk_b)] {
        let mut out = vec![0xEEu8; img.len()];
        let mut r = repo.read_disk(&loaded, key, 3).await.unwrap();
        let mut expect = 0;
        while let Some(e) = r.next_extent().await {
            let e = e.unwrap();
            assert_eq!(e.offset, expect, "extents in order, no gaps");
            expect = e.end();
            match e.data {
                ExtentData::Data(d) => {
                    out[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(&d)
                }
                ExtentData::Zero(n) => out[e.offset as usize..(e.offset + n) as usize].fill(0),
            }
        }
        assert_eq!(expect, img.len() as u64);
        assert!(out == *img, "disk {key} reads back bit for bit");
    }
    let check = repo.check().await.unwrap();
    assert!(check.is_clean(), "check: {:?}", check.damage);
    let verify = repo.verify(VerifyOptions::default()).await.unwrap();
    assert!(verify.is_clean(), "verify: {:?}", verify.damage);
    assert!(verify.chunks_verified > 0);
    assert_eq!(verify.chunks_verified, verify.chunks_referenced);
    if encrypted {
        let wrong = Repository::open(storage.clone(), Some(b"wrong password")).await;
        assert!(wrong.is_err(), "a wrong password is refused");
    }
}

/// A running sshd and the files a client needs to log in to it.
pub struct Sshd {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub user: String,
    pub user_key: PathBuf,
    pub known_hosts: PathBuf,
}

pub fn keygen(ssh_keygen: &Path, file: &Path) {
    let st = Command::new(ssh_keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "xenvault-test", "-f"])
        .arg(file)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen failed");
}

pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts sshd on a free loopback port, or `None` (skipped) without OpenSSH.
pub fn sshd() -> Option<Sshd> {
    let install = "apt-get install openssh-server openssh-client";
    let sbin = [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")];
    let sshd = tool("sshd", &sbin, install)?;
    let keygen_bin = tool("ssh-keygen", &[], install)?;
    tool("ssh", &[], install)?;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&keygen_bin, &d.join("host_key"));
    keygen(&keygen_bin, &d.join("user_key"));
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    // sshd started by root insists on its privilege separation directory.
    if current_user() == "root" {
        std::fs::create_dir_all("/run/sshd").unwrap();
    }
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
         AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n",
        d = d.display()
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let mut cmd = Command::new(sshd);
    cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
    let server = Server::start("sshd", cmd, port, &d.join("sshd.log"));
    let host_key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
    let known_hosts = d.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key}")).unwrap();
    Some(Sshd {
        server,
        user: current_user(),
        user_key: d.join("user_key"),
        known_hosts,
        dir,
    })
}

impl Sshd {
    pub fn options(&self, repo_dir: &str) -> SftpOptions {
        let dir = self.dir.path().join(repo_dir);
        let mut o = SftpOptions::new(
            &self.user,
            "127.0.0.1",
            dir.to_str().unwrap(),
            &self.user_key,
        );
        o.port = self.server.port;
        o.known_hosts_file = Some(self.known_hosts.clone());
        o.connect_timeout = Duration::from_secs(10);
        o
    }

    pub fn target(&self, repo_dir: &str) -> TargetConfig {
        let mut t = TargetConfig::archive("sftptest", "");
        t.kind = TargetKind::Repository;
        t.url = Some(format!(
            "sftp://{}@127.0.0.1:{}{}",
            self.user,
            self.server.port,
            self.dir.path().join(repo_dir).display()
        ));
        t.sftp = Some(SftpConfig {
            key_file: self.user_key.clone(),
            known_hosts_file: Some(self.known_hosts.clone()),
        });
        t
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}
