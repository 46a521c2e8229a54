//! Loading the TOML configuration: a good file, the shipped examples, and
//! every kind of bad input giving one line that names the file, the line and
//! the key.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use xenvault_engine::config::{self, ErrorKind, LoadOptions};
use xenvault_types::config::{Compression, DiskSelection, ExportMode, PowerState};

/// A configuration directory with a 0600 password file and a weekday file.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("prod.password");
        fs::write(&pw, "s3cret-pw\n").unwrap();
        fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(dir.path().join("weekdays.txt"), "Monday: web01\n").unwrap();
        Fixture { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("xenvault.toml")
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.path();
        fs::write(&p, text).unwrap();
        p
    }
}

const GOOD: &str = r#"
[pools.prod]
url = "https://pool.example"
password-file = "prod.password"
fingerprint = "sha256:5f0c2f6a1b9e3d7c4a8b2e1f0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170"

[targets.nas]
path = "archive"

[jobs.nightly]
pools = ["prod"]
target = "nas"
regexes = ["web"]
weekday-file = "weekdays.txt"
power-states = ["running"]
"#;

#[test]
fn a_good_file_loads_with_defaults_and_absolute_paths() {
    let fx = Fixture::new();
    let path = fx.write(GOOD);
    let cfg = config::load(&path).unwrap();
    let pool = cfg.pool("prod").unwrap();
    assert_eq!(pool.name, "prod");
    assert_eq!(pool.user, "root");
    assert_eq!(pool.password.as_ref().unwrap().expose(), "s3cret-pw");
    assert!(matches!(
        config::tls_policy(pool).unwrap(),
        xenvault_xapi::tls::TlsPolicy::Pinned(_)
    ));
    let target = cfg.target("nas").unwrap();
    assert_eq!(target.path, fx.dir.path().join("archive"));
    assert_eq!(target.reserved_space, 0);
    let job = cfg.job("nightly").unwrap();
    assert_eq!(job.name, "nightly");
    assert_eq!(job.concurrency, 2);
    assert_eq!(job.sr_usage_threshold, 80);
    assert_eq!(job.retention.keep_last, 7);
    assert_eq!(job.log_retention_days, 15);
    assert_eq!(job.mode, ExportMode::Xva);
    assert_eq!(job.disks, DiskSelection::All);
    assert_eq!(job.compression, Compression::None);
    assert_eq!(job.power_states, vec![PowerState::Running]);
    assert_eq!(
        job.weekday_file.as_deref(),
        Some(fx.dir.path().join("weekdays.txt").as_path())
    );
    assert_eq!(job.weekday_schedule.as_ref().unwrap().entries.len(), 1);
    // Secrets never show.
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("s3cret-pw"), "{debug}");
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(!json.contains("s3cret-pw"), "{json}");
}

#[test]
fn password_from_the_environment() {
    let fx = Fixture::new();
    // Cargo sets CARGO_PKG_NAME for the test process (tests cannot set variables: unsafe).
    let text = GOOD.replace(
        "password-file = \"prod.password\"",
        "password-env = \"CARGO_PKG_NAME\"",
    );
    let cfg = config::load(&fx.write(&text)).unwrap();
    assert_eq!(
        cfg.pool("prod")
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "xenvault-engine"
    );
}

/// Loads `text` and checks the one-line error: `FILE:LINE: KEY: …` containing `needle`.
fn expect_error(
    fx: &Fixture,
    text: &str,
    line: usize,
    key: &str,
    needle: &str,
) -> config::ConfigError {
    let path = fx.write(text);
    let err = config::load(&path).unwrap_err();
    let shown = err.to_string();
    assert!(!shown.contains('\n'), "not one line: {shown}");
    let prefix = format!("{}:{line}: {key}: ", path.display());
    assert!(
        shown.starts_with(&prefix),
        "expected prefix {prefix:?}, got: {shown}"
    );
    assert!(shown.contains(needle), "expected {needle:?} in: {shown}");
    assert_eq!(err.line, Some(line));
    assert_eq!(err.key.as_deref(), Some(key));
    err
}

#[test]
fn malformed_toml() {
    let fx = Fixture::new();
    let text = GOOD.replace("path = \"archive\"", "path = \"archive");
    let err = expect_error(&fx, &text, 8, "targets.nas.path", "invalid TOML");
    assert_eq!(err.kind, ErrorKind::Syntax);
}

#[test]
fn unknown_key_with_suggestion() {
    let fx = Fixture::new();
    let text = GOOD.replace("password-file", "pasword-file");
    let err = expect_error(
        &fx,
        &text,
        4,
        "pools.prod.pasword-file",
        "unknown key `pasword-file`; did you mean `password-file`?",
    );
    assert_eq!(err.kind, ErrorKind::UnknownKey);
    let text = format!("{GOOD}colour = \"blue\"\n");
    expect_error(
        &fx,
        &text,
        16,
        "jobs.nightly.colour",
        "unknown key `colour`",
    );
}

#[test]
fn wrong_types() {
    let fx = Fixture::new();
    let text = format!("{GOOD}concurrency = \"2\"\n");
    let err = expect_error(&fx, &text, 16, "jobs.nightly.concurrency", "invalid type");
    assert_eq!(err.kind, ErrorKind::BadValue);
    let text = format!("{GOOD}mode = \"qcow2\"\n");
    expect_error(
        &fx,
        &text,
        16,
        "jobs.nightly.mode",
        "unknown variant `qcow2`",
    );
    let text = GOOD.replace("power-states = [\"running\"]", "power-states = [\"on\"]");
    expect_error(
        &fx,
        &text,
        15,
        "jobs.nightly.power-states",
        "unknown variant `on`",
    );
}

#[test]
fn missing_required_key() {
    let fx = Fixture::new();
    let text = GOOD.replace("url = \"https://pool.example\"\n", "");
    let err = expect_error(
        &fx,
        &text,
        2,
        "pools.prod.url",
        "required key `url` is missing",
    );
    assert_eq!(err.kind, ErrorKind::MissingKey);
}

#[test]
fn job_naming_a_missing_pool_or_target() {
    let fx = Fixture::new();
    let text = GOOD.replace("pools = [\"prod\"]", "pools = [\"prdo\"]");
    let err = expect_error(
        &fx,
        &text,
        11,
        "jobs.nightly.pools.0",
        "pool \"prdo\" is not defined; did you mean \"prod\"?",
    );
    assert_eq!(err.kind, ErrorKind::UnknownReference);
    let text = GOOD.replace("target = \"nas\"", "target = \"tape\"");
    expect_error(
        &fx,
        &text,
        12,
        "jobs.nightly.target",
        "target \"tape\" is not defined",
    );
}

#[test]
fn bad_regex() {
    let fx = Fixture::new();
    let text = GOOD.replace("regexes = [\"web\"]", "regexes = [\"web[\"]");
    let err = expect_error(
        &fx,
        &text,
        13,
        "jobs.nightly.regexes",
        "invalid regex `web[`",
    );
    assert_eq!(err.kind, ErrorKind::BadRegex);
}

#[test]
fn password_file_readable_by_others() {
    let fx = Fixture::new();
    fs::set_permissions(
        fx.dir.path().join("prod.password"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = expect_error(
        &fx,
        GOOD,
        4,
        "pools.prod.password-file",
        "can be read by group or others (mode 0644); run `chmod 600",
    );
    assert_eq!(err.kind, ErrorKind::Secret);
}

#[test]
fn password_file_missing() {
    let fx = Fixture::new();
    let text = GOOD.replace("prod.password", "nope.password");
    expect_error(
        &fx,
        &text,
        4,
        "pools.prod.password-file",
        "cannot read the password file",
    );
}

#[test]
fn password_env_missing() {
    let fx = Fixture::new();
    let text = GOOD.replace(
        "password-file = \"prod.password\"",
        "password-env = \"XENVAULT_SURELY_UNSET_TEST_VARIABLE\"",
    );
    expect_error(
        &fx,
        &text,
        4,
        "pools.prod.password-env",
        "the environment variable XENVAULT_SURELY_UNSET_TEST_VARIABLE is not set",
    );
}

#[test]
fn bad_fingerprint_and_insecure_conflict() {
    let fx = Fixture::new();
    let text = GOOD.replace("sha256:5f0c", "sha256:zz0c");
    expect_error(
        &fx,
        &text,
        5,
        "pools.prod.fingerprint",
        "not a SHA-256 fingerprint",
    );
    let text = GOOD.replace(
        "[targets.nas]",
        "insecure-skip-verify = true\n\n[targets.nas]",
    );
    expect_error(
        &fx,
        &text,
        7,
        "pools.prod.insecure-skip-verify",
        "both a pinned fingerprint",
    );
}

#[test]
fn inconsistent_settings() {
    let fx = Fixture::new();
    let text = format!("{GOOD}disks = \"boot\"\n");
    expect_error(
        &fx,
        &text,
        16,
        "jobs.nightly.disks",
        "disks = \"boot\" needs a per-disk mode",
    );
    let text = format!("{GOOD}mode = \"vhd\"\ncompression = \"host-gzip\"\n");
    expect_error(
        &fx,
        &text,
        17,
        "jobs.nightly.compression",
        "only possible for mode = \"xva\"",
    );
    let text = format!("{GOOD}sr-usage-threshold = 120\n");
    expect_error(
        &fx,
        &text,
        16,
        "jobs.nightly.sr-usage-threshold",
        "not a percentage",
    );
    let text = format!("{GOOD}[jobs.nightly.retention]\nkeep-last = 0\n");
    expect_error(
        &fx,
        &text,
        17,
        "jobs.nightly.retention.keep-last",
        "keep-last is 0",
    );
    let text = format!("{GOOD}[[jobs.nightly.rule]]\nname = \"a\"\nregex = \"b\"\n");
    expect_error(
        &fx,
        &text,
        16,
        "jobs.nightly.rule.0",
        "exactly one of name, regex, tag",
    );
    let text = format!("{GOOD}[jobs.nightly.vm.\"web01\"]\nmode = \"raw\"\ncompression = \"x\"\n");
    expect_error(
        &fx,
        &text,
        18,
        "jobs.nightly.vm.web01.compression",
        "unknown key `compression`",
    );
}

#[test]
fn a_job_without_selection_is_refused() {
    let fx = Fixture::new();
    let text = GOOD
        .replace("regexes = [\"web\"]\n", "")
        .replace("weekday-file = \"weekdays.txt\"\n", "");
    expect_error(&fx, &text, 10, "jobs.nightly", "selects no VM");
}

#[test]
fn weekday_file_errors_name_the_weekday_file() {
    let fx = Fixture::new();
    fs::write(
        fx.dir.path().join("weekdays.txt"),
        "# days\nMonday: web01\nFirday: db01\n",
    )
    .unwrap();
    let err = config::load(&fx.write(GOOD)).unwrap_err();
    let shown = err.to_string();
    let prefix = format!(
        "{}:3: firday: ",
        fx.dir.path().join("weekdays.txt").display()
    );
    assert!(shown.starts_with(&prefix), "{shown}");
    assert!(shown.contains("did you mean Friday?"), "{shown}");
    assert_eq!(err.kind, ErrorKind::Weekday);
    fs::remove_file(fx.dir.path().join("weekdays.txt")).unwrap();
    expect_error(
        &fx,
        GOOD,
        14,
        "jobs.nightly.weekday-file",
        "cannot read the weekday file",
    );
}

#[test]
fn naubackup_cfg_errors_name_the_cfg_file() {
    let fx = Fixture::new();
    fs::write(
        fx.dir.path().join("weekend.cfg"),
        "max_backups=3\n# comment\nvm-export=PRD-[aA.*\n",
    )
    .unwrap();
    let text = "[pools.prod]\nurl = \"https://p\"\npassword-file = \"prod.password\"\n\n[jobs.weekend]\npool = \"prod\"\nnaubackup-cfg = \"weekend.cfg\"\n";
    let err = config::load(&fx.write(text)).unwrap_err();
    let shown = err.to_string();
    let prefix = format!(
        "{}:3: vm-export: invalid regex `PRD-[aA.*`",
        fx.dir.path().join("weekend.cfg").display()
    );
    assert!(shown.starts_with(&prefix), "{shown}");
    assert!(!shown.contains('\n'));
    assert_eq!(err.kind, ErrorKind::BadRegex);
}

#[test]
fn naubackup_cfg_job_gets_its_target_from_backup_dir() {
    let fx = Fixture::new();
    fs::write(
        fx.dir.path().join("weekend.cfg"),
        "max_backups=3\nbackup_dir=/snapshots/BACKUPS\npool_db_backup=1\npre_clean=true\nvm-export=PROD.*\n",
    )
    .unwrap();
    let text = "[pools.prod]\nurl = \"https://p\"\npassword-file = \"prod.password\"\n\n[jobs.weekend]\npool = \"prod\"\nnaubackup-cfg = \"weekend.cfg\"\n";
    let cfg = config::load(&fx.write(text)).unwrap();
    let job = cfg.job("weekend").unwrap();
    assert_eq!(job.pools, vec!["prod"]);
    assert_eq!(job.target, "weekend.backup_dir");
    assert_eq!(
        cfg.target(&job.target).unwrap().path,
        Path::new("/snapshots/BACKUPS")
    );
    assert_eq!(job.retention.keep_last, 3);
    assert!(job.pre_clean);
    assert_eq!(job.pool_metadata.as_ref().unwrap().keep_last, 3);
    assert_eq!(job.rules.len(), 1);
}

#[test]
fn unreadable_config_file() {
    let err = config::load(Path::new("/nonexistent/xenvault.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/xenvault.toml: cannot read the configuration file"),
        "{err}"
    );
    assert_eq!(err.kind, ErrorKind::Io);
}

/// Every `examples/*.toml` of the repository parses and passes the checks
/// (passwords are not read: the example files do not exist here).
#[test]
fn every_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = config::load_with(
                &path,
                LoadOptions {
                    read_secrets: false,
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(!cfg.jobs.is_empty(), "{} has no job", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected examples in {}", dir.display());
    // The NAUbackup and weekday examples parse too.
    let mut others = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cfg") => {
                config::naubackup::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                others += 1;
            }
            Some("txt") => {
                let s = config::weekday::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!s.entries.is_empty());
                others += 1;
            }
            _ => {}
        }
    }
    assert!(others >= 2);
}

#[test]
fn more_shapes_of_bad_input() {
    let fx = Fixture::new();
    let text = GOOD.replace("pools = [\"prod\"]", "pools = 3");
    expect_error(
        &fx,
        &text,
        11,
        "jobs.nightly.pools",
        "expected a string or an array of strings",
    );
    let text = GOOD.replace("pools = [\"prod\"]\n", "");
    expect_error(
        &fx,
        &text,
        10,
        "jobs.nightly.pools",
        "required key `pools` is missing",
    );
    let text = GOOD.replace("target = \"nas\"", "target = \"nas\"\ntarget = \"nas\"");
    let err = expect_error(&fx, &text, 13, "jobs.nightly.target", "invalid TOML");
    assert_eq!(err.kind, ErrorKind::Syntax);
    let text = format!("{GOOD}\n[email]\nserver = \"smtp\"\nfrom = \"me\"\nto = \"a@b\"\n");
    expect_error(
        &fx,
        &text,
        19,
        "email.from",
        "\"me\" is not an email address",
    );
    let text =
        format!("{GOOD}\n[email]\nserver = \"smtp\"\nfrom = \"x@y\"\nto = \"a@b\"\nuser = \"u\"\n");
    expect_error(
        &fx,
        &text,
        21,
        "email.user",
        "an SMTP user is set without a password",
    );
    let text = GOOD.replace("https://pool.example", "pool.example");
    expect_error(&fx, &text, 3, "pools.prod.url", "is not a pool URL");
}

#[test]
fn reserved_space_sizes() {
    let fx = Fixture::new();
    let text = GOOD.replace(
        "path = \"archive\"",
        "path = \"archive\"\nreserved-space = \"10G\"",
    );
    let cfg = config::load(&fx.write(&text)).unwrap();
    assert_eq!(cfg.target("nas").unwrap().reserved_space, 10 << 30);
    let text = GOOD.replace(
        "path = \"archive\"",
        "path = \"archive\"\nreserved-space = 4096",
    );
    let cfg = config::load(&fx.write(&text)).unwrap();
    assert_eq!(cfg.target("nas").unwrap().reserved_space, 4096);
    let text = GOOD.replace(
        "path = \"archive\"",
        "path = \"archive\"\nreserved-space = \"10 gigs\"",
    );
    expect_error(&fx, &text, 9, "targets.nas.reserved-space", "is not a size");
}

#[test]
fn pinning_a_fingerprint_keeps_the_file_loadable() {
    let fx = Fixture::new();
    let text = GOOD.replace(
        "fingerprint = \"sha256:5f0c2f6a1b9e3d7c4a8b2e1f0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170\"\n",
        "insecure-skip-verify = true\n",
    );
    let fp = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
    let pinned = config::edit::pin_fingerprint(&text, "prod", fp).unwrap();
    let cfg = config::load(&fx.write(&pinned)).unwrap_or_else(|e| panic!("{e}\n{pinned}"));
    let pool = cfg.pool("prod").unwrap();
    assert_eq!(pool.fingerprint.as_deref(), Some(fp));
    assert!(!pool.insecure_skip_verify);
}
