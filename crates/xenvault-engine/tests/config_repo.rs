//! Loading repository targets and the repository settings of jobs: a good
//! file with S3, SFTP and local repositories, and every kind of bad input
//! giving one line that names the file, the line, the key and the fix.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use xenvault_engine::config::{self, ErrorKind};
use xenvault_types::config::{BaseKeeping, CbtMode, TargetKind};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("prod.password", "pool-pw\n"),
            ("repo.password", "repo-pw\nsecond line ignored\n"),
            ("s3.secret", "s3-secret\n"),
            ("id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\n"),
        ] {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        }
        fs::write(dir.path().join("known_hosts"), "host ssh-ed25519 AAAA\n").unwrap();
        Fixture { dir }
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("xenvault.toml");
        fs::write(&p, text).unwrap();
        p
    }
}

const POOL: &str = r#"
[pools.prod]
url = "https://pool.example"
password-file = "prod.password"
"#;

const GOOD: &str = r#"
[targets.local]
type = "repository"
path = "repo"
password-file = "repo.password"

[targets.bucket]
type = "repository"
url = "s3://xenvault-test/prod/"

[targets.bucket.s3]
endpoint = "http://127.0.0.1:9000"
access-key-id = "AKIA"
secret-access-key-file = "s3.secret"

[targets.ssh]
type = "repository"
url = "sftp://backup@127.0.0.1:2222/srv/repo"
password-env = "CARGO_PKG_NAME"

[targets.ssh.sftp]
key-file = "id_ed25519"
known-hosts-file = "known_hosts"

[jobs.nightly]
pool = "prod"
target = "local"
all-vms = true
cbt = "enable"
base = "metadata"
nbd-connections = 8
disk-concurrency = 3

[jobs.nightly.retention]
keep-last = 0
keep-daily = 7
keep-weekly = 4

[jobs.nightly.vm."mail"]
keep-last = 5
retention = { keep-monthly = 12 }

[jobs.nightly.vm."web"]
retention = { keep-last = 2, keep-yearly = 1 }
"#;

#[test]
fn repository_targets_load_with_secrets_and_absolute_paths() {
    let fx = Fixture::new();
    let cfg = config::load(&fx.write(&format!("{POOL}{GOOD}"))).unwrap();
    let local = cfg.target("local").unwrap();
    assert_eq!(local.kind, TargetKind::Repository);
    assert_eq!(local.path, fx.dir.path().join("repo"));
    assert_eq!(local.password.as_ref().unwrap().expose(), "repo-pw");
    let bucket = cfg.target("bucket").unwrap();
    let s3 = bucket.s3.as_ref().unwrap();
    assert_eq!(s3.region, "us-east-1");
    assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), "s3-secret");
    assert_eq!(
        s3.secret_access_key_file.as_deref(),
        Some(fx.dir.path().join("s3.secret").as_path())
    );
    assert!(bucket.password.is_none(), "a plain repository");
    assert_eq!(
        config::repo::repository_location(bucket).unwrap(),
        config::repo::RepositoryLocation::S3 {
            bucket: "xenvault-test".into(),
            prefix: "prod".into()
        }
    );
    let ssh = cfg.target("ssh").unwrap();
    assert_eq!(ssh.password.as_ref().unwrap().expose(), "xenvault-engine");
    let sftp = ssh.sftp.as_ref().unwrap();
    assert_eq!(sftp.key_file, fx.dir.path().join("id_ed25519"));
    assert_eq!(
        sftp.known_hosts_file.as_deref(),
        Some(fx.dir.path().join("known_hosts").as_path())
    );

    let job = cfg.job("nightly").unwrap();
    assert_eq!(job.cbt, CbtMode::Enable);
    assert_eq!(job.base, BaseKeeping::Metadata);
    assert_eq!((job.nbd_connections, job.disk_concurrency), (8, 3));
    assert_eq!(
        (
            job.retention.keep_last,
            job.retention.keep_daily,
            job.retention.keep_weekly
        ),
        (0, 7, 4)
    );
    // A VM's retention table replaces the calendar keys; keep-last is
    // inherited (the VM's own, else the job's) unless the table sets it.
    let mail = config::repo::retention_for(job, "mail", "u1", &[]);
    assert_eq!(
        (mail.keep_last, mail.keep_monthly, mail.keep_daily),
        (5, 12, 0)
    );
    let web = config::repo::retention_for(job, "web", "u2", &[]);
    assert_eq!((web.keep_last, web.keep_yearly, web.keep_daily), (2, 1, 0));
    let other = config::repo::retention_for(job, "db", "u3", &[]);
    assert_eq!((other.keep_last, other.keep_daily), (0, 7));

    let debug = format!("{cfg:?}");
    for secret in ["repo-pw", "s3-secret"] {
        assert!(!debug.contains(secret), "{debug}");
        assert!(!serde_json::to_string(&cfg).unwrap().contains(secret));
    }
}

/// Loads `text` (after the pool) and checks the one-line error:
/// `FILE:LINE: KEY: …` containing `needle` and naming a fix.
fn expect_error(text: &str, line: usize, key: &str, needle: &str) -> config::ConfigError {
    let fx = Fixture::new();
    let path = fx.write(&format!("{POOL}{text}"));
    let err = config::load(&path).unwrap_err();
    let shown = err.to_string();
    assert!(!shown.contains('\n'), "not one line: {shown}");
    let prefix = format!(
        "{}:{}: {key}: ",
        path.display(),
        line + POOL.lines().count()
    );
    assert!(
        shown.starts_with(&prefix),
        "expected prefix {prefix:?}, got: {shown}"
    );
    assert!(shown.contains(needle), "expected {needle:?} in: {shown}");
    assert!(!err.fix.is_empty(), "no fix in: {shown}");
    err
}

const JOB: &str = "\n[jobs.j]\npool = \"prod\"\ntarget = \"r\"\nall-vms = true\n";

#[test]
fn where_the_repository_is() {
    expect_error(
        "[targets.r]\ntype = \"repository\"\n",
        1,
        "targets.r",
        "neither path nor url",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\npath = \"/x\"\nurl = \"s3://bkt\"\n",
        4,
        "targets.r.url",
        "both path and url",
    );
    let e = expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"ftp://host/x\"\n",
        3,
        "targets.r.url",
        "ftp:// is not supported",
    );
    assert_eq!(e.kind, ErrorKind::BadValue);
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"s3://Bad_Bucket\"\n[targets.r.s3]\n",
        3,
        "targets.r.url",
        "a bucket name has 3 to 63 characters",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"s3://bkt/p\"\n",
        3,
        "targets.r.url",
        "[targets.NAME.s3]",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"sftp://h/d\"\n",
        3,
        "targets.r.url",
        "[targets.NAME.sftp]",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"sftp://h:x/d\"\n[targets.r.sftp]\nkey-file = \"id_ed25519\"\n",
        3,
        "targets.r.url",
        "the port is not a number from 1 to 65535",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\npath = \"/x\"\n[targets.r.s3]\nregion = \"x\"\n",
        4,
        "targets.r.s3",
        "not s3://",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"s3://bkt\"\n[targets.r.s3]\nendpoint = \"127.0.0.1:9000\"\n",
        5,
        "targets.r.s3.endpoint",
        "not an endpoint URL",
    );
    // Repository keys on an archive target.
    expect_error(
        "[targets.r]\npath = \"/x\"\npassword-file = \"repo.password\"\n",
        3,
        "targets.r.password-file",
        "add type = \"repository\"",
    );
    expect_error(
        "[targets.r]\npath = \"/x\"\nurl = \"s3://bkt\"\n",
        3,
        "targets.r.url",
        "only applies to repository targets",
    );
}

#[test]
fn secrets_and_key_files() {
    let e = expect_error(
        "[targets.r]\ntype = \"repository\"\npath = \"/x\"\npassword-file = \"repo.password\"\npassword-env = \"HOME\"\n",
        5,
        "targets.r.password-env",
        "keep one of them",
    );
    assert_eq!(e.kind, ErrorKind::Secret);
    expect_error(
        "[targets.r]\ntype = \"repository\"\npath = \"/x\"\npassword-file = \"missing.password\"\n",
        4,
        "targets.r.password-file",
        "cannot read the password file",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\npath = \"/x\"\npassword-env = \"XENVAULT_TEST_SURELY_UNSET\"\n",
        4,
        "targets.r.password-env",
        "export XENVAULT_TEST_SURELY_UNSET",
    );
    // Group-readable repository password file.
    let fx = Fixture::new();
    fs::set_permissions(
        fx.dir.path().join("repo.password"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let err = config::load(&fx.write(&format!(
        "{POOL}[targets.r]\ntype = \"repository\"\npath = \"/x\"\npassword-file = \"repo.password\"\n"
    )))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("targets.r.password-file: the password file"),
        "{err}"
    );
    assert!(err.contains("chmod 600"), "{err}");

    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"s3://bkt\"\n[targets.r.s3]\naccess-key-id = \"A\"\n",
        5,
        "targets.r.s3.access-key-id",
        "without its secret",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"s3://bkt\"\n[targets.r.s3]\nsecret-access-key-env = \"HOME\"\n",
        4,
        "targets.r.s3",
        "without its access key id",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"s3://bkt\"\n[targets.r.s3]\naccess-key-id = \"A\"\nsecret-access-key-file = \"nope\"\n",
        6,
        "targets.r.s3.secret-access-key-file",
        "cannot read",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"sftp://h/d\"\n[targets.r.sftp]\nkey-file = \"no_key\"\n",
        5,
        "targets.r.sftp.key-file",
        "ssh-keygen",
    );
    expect_error(
        "[targets.r]\ntype = \"repository\"\nurl = \"sftp://h/d\"\n[targets.r.sftp]\nkey-file = \"id_ed25519\"\nknown-hosts-file = \"nope\"\n",
        6,
        "targets.r.sftp.known-hosts-file",
        "ssh-keyscan",
    );
    let fx = Fixture::new();
    fs::set_permissions(
        fx.dir.path().join("id_ed25519"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = config::load(&fx.write(&format!(
        "{POOL}[targets.r]\ntype = \"repository\"\nurl = \"sftp://h/d\"\n[targets.r.sftp]\nkey-file = \"id_ed25519\"\n"
    )))
    .unwrap_err()
    .to_string();
    assert!(err.contains("can be read by group or others"), "{err}");
}

#[test]
fn job_settings_on_repository_and_archive_targets() {
    let repo = "[targets.r]\ntype = \"repository\"\npath = \"/x\"\n";
    expect_error(
        &format!("{repo}{JOB}nbd-connections = 0\n"),
        9,
        "jobs.j.nbd-connections",
        "write 1 to 16",
    );
    expect_error(
        &format!("{repo}{JOB}disk-concurrency = 99\n"),
        9,
        "jobs.j.disk-concurrency",
        "out of range",
    );
    expect_error(
        &format!("{repo}{JOB}cbt = \"off\"\nbase = \"metadata\"\n"),
        10,
        "jobs.j.base",
        "no incremental could ever be taken",
    );
    expect_error(
        &format!("{repo}{JOB}[jobs.j.retention]\nkeep-last = 0\n"),
        10,
        "jobs.j.retention.keep-last",
        "keep-daily",
    );
    let e = expect_error(
        &format!("{repo}{JOB}cbt = \"sometimes\"\n"),
        9,
        "jobs.j.cbt",
        "unknown variant",
    );
    assert_eq!(e.kind, ErrorKind::BadValue);
    expect_error(
        &format!("{repo}{JOB}[jobs.j.retention]\nkeep-dialy = 3\n"),
        10,
        "jobs.j.retention.keep-dialy",
        "did you mean `keep-daily`?",
    );

    expect_error(
        &format!("{repo}{JOB}[jobs.j.pool-metadata]\nkeep-last = 3\n"),
        9,
        "jobs.j.pool-metadata",
        "a repository does not store them",
    );
    expect_error(
        &format!("{repo}{JOB}[jobs.j.host-backup]\n"),
        9,
        "jobs.j.host-backup",
        "archive target",
    );

    // On an archive target: every repository-only key is refused, with the fix.
    let archive = "[targets.r]\npath = \"/x\"\n";
    for (lines, at, key) in [
        (
            "[jobs.j.retention]\nkeep-daily = 7\n",
            9,
            "jobs.j.retention.keep-daily",
        ),
        (
            "[jobs.j.retention]\nkeep-yearly = 1\n",
            9,
            "jobs.j.retention.keep-yearly",
        ),
        ("cbt = \"enable\"\n", 8, "jobs.j.cbt"),
        ("base = \"metadata\"\n", 8, "jobs.j.base"),
        ("nbd-connections = 4\n", 8, "jobs.j.nbd-connections"),
        ("disk-concurrency = 1\n", 8, "jobs.j.disk-concurrency"),
    ] {
        let e = expect_error(&format!("{archive}{JOB}{lines}"), at, key, "is an archive");
        assert!(e.fix.contains("type = \"repository\""), "{e}");
    }
    expect_error(
        &format!("{archive}{JOB}[jobs.j.vm.\"a\"]\nretention = {{ keep-daily = 2 }}\n"),
        9,
        "jobs.j.vm.a.retention",
        "per-VM retention",
    );
    // keep-last 0 stays refused on archives.
    expect_error(
        &format!("{archive}{JOB}[jobs.j.retention]\nkeep-last = 0\n"),
        9,
        "jobs.j.retention.keep-last",
        "every backup would be deleted",
    );
}
