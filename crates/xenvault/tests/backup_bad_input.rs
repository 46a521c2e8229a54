//! Bad input never touches the pool: malformed TOML, unknown keys, a bad
//! regex, an unreadable password file, a wrong password, an unknown pool
//! certificate — each a clear one-line error and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use backup_support::{PoolCheck, Sim, write_config, xenvault};

#[test]
fn bad_input_is_one_line_nonzero_and_creates_nothing() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M"]);
    let pool = PoolCheck::new(&sim);
    let before = pool.counts();
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(&sim, dir.path(), "all-vms = true", "");
    let good_text = std::fs::read_to_string(&good).unwrap();
    let pw = dir.path().join("pool.password");

    type MakeConfig<'a> = Box<dyn Fn() -> String + 'a>;
    let cases: Vec<(&str, MakeConfig<'_>, i32, &str)> = vec![
        (
            "malformed TOML",
            Box::new(|| good_text.replace("[jobs.nightly]", "[jobs.nightly")),
            2,
            "bad.toml:12",
        ),
        (
            "unknown key",
            Box::new(|| good_text.replace("all-vms = true", "all-vms = true\nkeep-lsat = 3")),
            2,
            "keep-lsat",
        ),
        (
            "bad regex",
            Box::new(|| good_text.replace("all-vms = true", "regexes = [\"web(\"]")),
            2,
            "web(",
        ),
        (
            "unreadable password file",
            Box::new(|| {
                good_text.replace(
                    pw.to_str().unwrap(),
                    dir.path().join("missing.pw").to_str().unwrap(),
                )
            }),
            2,
            "missing.pw",
        ),
        (
            "wrong password",
            Box::new(|| {
                good_text.replace(
                    pw.to_str().unwrap(),
                    dir.path().join("wrong.pw").to_str().unwrap(),
                )
            }),
            2,
            "password",
        ),
        (
            "unknown certificate",
            Box::new(|| {
                good_text.replace(
                    &sim.s("fingerprint"),
                    &format!("sha256:{}", "ab".repeat(32)),
                )
            }),
            2,
            "certificate",
        ),
    ];
    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for (name, make, code, word) in &cases {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, make()).unwrap();
        for cmd in ["backup", "plan"] {
            let out = xenvault(&[cmd, "nightly", "--config", cfg.to_str().unwrap()]);
            assert_eq!(out.code, *code, "{name} ({cmd}): {out:?}");
            let lines: Vec<&str> = out
                .stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect();
            assert_eq!(lines.len(), 1, "{name} ({cmd}): not one line: {out:?}");
            assert!(
                lines[0].contains(word),
                "{name} ({cmd}): {:?} lacks {word:?}",
                lines[0]
            );
            assert!(out.stdout.is_empty(), "{name} ({cmd}): {out:?}");
        }
        assert_eq!(
            pool.counts(),
            before,
            "{name}: something was created on the pool"
        );
        assert_eq!(pool.temporaries(), (0, 0), "{name}");
    }

    // A password file readable by others is refused too.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = xenvault(&["backup", "nightly", "--config", good.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert_eq!(pool.counts(), before);
}
