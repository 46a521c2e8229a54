//! The repository commands end to end through the real binary, on local
//! repositories whose restore points the test writes with the repository
//! API: `repo init`, `key …`, `check`, `verify` (flipped bytes and missing
//! chunks named with every restore point they break), `prune` (the plan
//! per VM from the configuration's jobs, forget, mark and sweep), `list`,
//! `restore --to-file`, and the exit codes and one-line errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod backup_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backup_support::{Out, xenvault};
use serde_json::json;
use time::OffsetDateTime;
use xenvault_repo::storage::{LocalStorage, Storage};
use xenvault_repo::{Repository, WriteOptions};
use xenvault_types::Extent;

fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Concatenates argument lists.
fn cat<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// Runs xenvault with the arguments; asserts the exit code.
fn run(args: &[&str], code: i32) -> Out {
    let out = xenvault(args);
    assert_eq!(out.code, code, "xenvault {args:?}: {out:?}");
    out
}

/// The error line of a failed command: exactly one line on stderr.
fn one_line_error(out: &Out) -> &str {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(lines[0].starts_with("xenvault: error: "), "{out:?}");
    lines[0]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn open(dir: &Path, password: Option<&str>) -> Repository {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
    Repository::open(storage, password.map(str::as_bytes))
        .await
        .unwrap()
}

/// A disk image of `mib` MiB whose chunks differ by `seed` (chunk 1 is zero).
fn image(mib: usize, seed: u8) -> Vec<u8> {
    let mut img = vec![0u8; mib << 20];
    for (c, chunk) in img.chunks_mut(1 << 20).enumerate() {
        if c == 1 {
            continue;
        }
        for (i, b) in chunk.iter_mut().enumerate().step_by(512) {
            *b = seed.wrapping_add(c as u8).wrapping_mul(31) ^ (i >> 9) as u8;
        }
    }
    img
}

/// Writes a full restore point of `vm` at `time` labelled with `job`.
async fn backup(
    repo: &Repository,
    vm: &str,
    name: &str,
    time: OffsetDateTime,
    job: &str,
    img: &[u8],
) -> String {
    let rp = repo
        .begin_restore_point(vm, name, time, None, WriteOptions::default())
        .await
        .unwrap();
    let mut w = rp.full_disk("disk0", img.len() as u64, json!({})).unwrap();
    w.write_extent(Extent::data(0, img.to_vec())).await.unwrap();
    w.finish().await.unwrap();
    let m = rp
        .commit(json!({}), json!({}), json!({"job": job}))
        .await
        .unwrap();
    m.id
}

#[test]
fn init_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let pw = secret_file(dir.path(), "pw", "first-password");
    let pw2 = secret_file(dir.path(), "pw2", "second-password");
    let pw3 = secret_file(dir.path(), "pw3", "third-password");

    // --encrypt needs a password; a password needs --encrypt.
    let out = run(&["repo", "init", "--repo", s(&repo), "--encrypt"], 2);
    assert!(
        one_line_error(&out).contains("--encrypt needs a password"),
        "{out:?}"
    );
    let out = run(
        &[
            "repo",
            "init",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw),
        ],
        2,
    );
    assert!(one_line_error(&out).contains("add --encrypt"), "{out:?}");
    let out = run(
        &["repo", "init", "--repo", s(&repo), "--chunk-size", "3M"],
        2,
    );
    assert!(
        one_line_error(&out).contains("use 256 KiB, 512 KiB, 1 MiB, 2 MiB or 4 MiB"),
        "{out:?}"
    );

    let out = run(
        &[
            "repo",
            "init",
            "--repo",
            s(&repo),
            "--encrypt",
            "--password-file",
            s(&pw),
            "--chunk-size",
            "2M",
            "--json",
        ],
        0,
    );
    let created = out.json();
    assert_eq!(created["encrypted"], true);
    assert_eq!(created["chunk_size"], 2 << 20);
    let first_slot = created["key_slots"][0]["id"].as_str().unwrap().to_string();
    // Refuses an existing repository, and a directory holding something else.
    let out = run(&["repo", "init", "--repo", s(&repo)], 2);
    assert!(one_line_error(&out).contains("already exists"), "{out:?}");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("file"), "x").unwrap();
    let out = run(&["repo", "init", "--repo", s(&other)], 2);
    assert!(one_line_error(&out).contains("not empty"), "{out:?}");

    // Wrong or missing password: one line, exit 2.
    let out = run(
        &[
            "key",
            "list",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw2),
        ],
        2,
    );
    let line = one_line_error(&out);
    assert!(line.contains("wrong password"), "{line}");
    assert!(line.contains(s(&repo)), "{line}");
    let out = run(&["check", "--repo", s(&repo)], 2);
    assert!(one_line_error(&out).contains("encrypted"), "{out:?}");
    let out = run(&["check", "--repo", s(&dir.path().join("nothing"))], 2);
    assert!(one_line_error(&out).contains("repo init"), "{out:?}");

    // add, list, export, change, import, remove.
    let base = ["--repo", s(&repo), "--password-file", s(&pw)];
    let out = run(
        &cat(&[
            &["key", "add"],
            &base,
            &["--new-password-file", s(&pw2), "--label", "spare", "--json"],
        ]),
        0,
    );
    let spare = out.json()["added"].as_str().unwrap().to_string();
    let out = run(&cat(&[&["key", "list"], &base, &["--json"]]), 0);
    let labels: Vec<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, ["initial", "spare"]);
    // Export needs a slot when there are several; writes a 0600 file, never overwrites.
    let out = run(&cat(&[&["key", "export"], &base, &[]]), 2);
    assert!(
        one_line_error(&out).contains("name the one to export"),
        "{out:?}"
    );
    let exported = dir.path().join("spare.json");
    run(
        &cat(&[
            &["key", "export", &spare],
            &base,
            &["--output", s(&exported)],
        ]),
        0,
    );
    let mode = std::fs::metadata(&exported).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&exported).unwrap();
    assert!(
        text.contains(&spare) && !text.contains("second-password"),
        "{text}"
    );
    run(
        &cat(&[
            &["key", "export", &spare],
            &base,
            &["--output", s(&exported)],
        ]),
        2,
    );
    // The spare slot opens the repository; then it is removed and imported back.
    run(
        &[
            "key",
            "list",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw2),
        ],
        0,
    );
    run(&cat(&[&["key", "remove", &spare], &base, &[]]), 0);
    run(
        &[
            "key",
            "list",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw2),
        ],
        2,
    );
    let out = run(
        &cat(&[
            &["key", "import", s(&exported)],
            &base,
            &["--new-password-file", s(&pw3)],
        ]),
        2,
    );
    assert!(one_line_error(&out).contains("wrong password"), "{out:?}");
    run(
        &cat(&[
            &["key", "import", s(&exported)],
            &base,
            &["--new-password-file", s(&pw2)],
        ]),
        0,
    );
    run(
        &[
            "key",
            "list",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw2),
        ],
        0,
    );
    // change: the first password stops working, the new one opens.
    run(
        &cat(&[&["key", "change"], &base, &["--new-password-file", s(&pw3)]]),
        0,
    );
    run(
        &["key", "list", "--repo", s(&repo), "--password-file", s(&pw)],
        2,
    );
    let out = run(
        &[
            "repo",
            "key",
            "list",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw3),
            "--json",
        ],
        0,
    );
    let ids: Vec<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !ids.contains(&first_slot) && ids.contains(&spare),
        "{ids:?}"
    );
    // Unknown slot, and never the last one.
    let out = run(
        &[
            "key",
            "remove",
            "0000",
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw3),
        ],
        2,
    );
    assert!(one_line_error(&out).contains("no key slot"), "{out:?}");
    run(
        &[
            "key",
            "remove",
            &spare,
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw3),
        ],
        0,
    );
    let last = ids.iter().find(|i| **i != spare).unwrap();
    let out = run(
        &[
            "key",
            "remove",
            last,
            "--repo",
            s(&repo),
            "--password-file",
            s(&pw3),
        ],
        2,
    );
    assert!(one_line_error(&out).contains("last key slot"), "{out:?}");

    // A plain repository has no keys: a clear usage error.
    let plain = dir.path().join("plain");
    run(&["repo", "init", "--repo", s(&plain)], 0);
    let out = run(&["key", "list", "--repo", s(&plain)], 2);
    assert!(one_line_error(&out).contains("not encrypted"), "{out:?}");
}

/// A configuration with a repository target `repo` (encrypted, password
/// file) and a job `nightly` writing to it with `retention`.
fn write_config(dir: &Path, retention: &str) -> PathBuf {
    secret_file(dir, "pool.pw", "pool");
    secret_file(dir, "repo.pw", "repo-password");
    let cfg = dir.join("xenvault.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[pools.p]
url = "https://127.0.0.1:1"
password-file = "pool.pw"

[targets.repo]
type = "repository"
path = "repo"
password-file = "repo.pw"

[jobs.nightly]
pool = "p"
target = "repo"
all-vms = true

[jobs.nightly.retention]
{retention}
"#
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn check_verify_list_restore_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "keep-last = 1\nkeep-daily = 2");
    let repo_dir = dir.path().join("repo");
    let t = ["--config", s(&cfg), "--target", "repo"];
    run(&cat(&[&["repo", "init", "--encrypt"], &t]), 0);

    // VM a: three restore points on two days; VM b: one of another job.
    let day1 = time::macros::datetime!(2026-11-20 03:00 UTC);
    let day2 = time::macros::datetime!(2026-11-21 03:00 UTC);
    let imgs = [image(3, 1), image(3, 2), image(3, 3)];
    let (ids, b_id) = rt().block_on(async {
        let repo = open(&repo_dir, Some("repo-password")).await;
        let mut ids = Vec::new();
        for (i, t) in [day1, day2, day2 + time::Duration::hours(1)]
            .into_iter()
            .enumerate()
        {
            ids.push(
                backup(
                    &repo,
                    "0a0a0a0a-0000-4000-8000-00000000000a",
                    "alpha",
                    t,
                    "nightly",
                    &imgs[i],
                )
                .await,
            );
        }
        let b = backup(
            &repo,
            "0b0b0b0b-0000-4000-8000-00000000000b",
            "beta",
            day1,
            "gone-job",
            &image(2, 9),
        )
        .await;
        (ids, b)
    });

    let out = run(&cat(&[&["check"], &t]), 0);
    assert!(
        out.stdout.contains("4 restore points") && out.stdout.contains("OK"),
        "{out:?}"
    );
    let out = run(&cat(&[&["verify", "--json"], &t]), 0);
    let v = out.json();
    assert_eq!(v["clean"], true);
    assert!(v["chunks_verified"].as_u64().unwrap() >= 6, "{v}");

    // list: per VM, newest first; the job-less form takes the target name.
    let out = run(
        &["list", "--config", s(&cfg), "--target", "repo", "--json"],
        0,
    );
    let listed = out.json();
    let a: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["vm"] == "alpha")
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(a, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    let out = run(&["list", "nightly", "--config", s(&cfg), "--vm", "beta"], 0);
    assert!(
        out.stdout
            .contains("VM beta (0b0b0b0b-0000-4000-8000-00000000000b)")
            && out.stdout.contains(&b_id),
        "{out:?}"
    );

    // restore --to-file: bit for bit, with and without a configuration.
    let raw = dir.path().join("a.raw");
    run(
        &cat(&[
            &[
                "restore",
                "--vm",
                "alpha",
                "--at",
                &ids[0],
                "--disk",
                "disk0",
                "--to-file",
                s(&raw),
            ],
            &t,
        ]),
        0,
    );
    assert!(std::fs::read(&raw).unwrap() == imgs[0]);
    let raw2 = dir.path().join("a2.img");
    run(
        &[
            "restore",
            "--repo",
            s(&repo_dir),
            "--password-file",
            s(&dir.path().join("repo.pw")),
            "--vm",
            "0a0a0a0a-0000-4000-8000-00000000000a",
            "--disk",
            "disk0",
            "--to-file",
            s(&raw2),
        ],
        0,
    );
    assert!(
        std::fs::read(&raw2).unwrap() == imgs[2],
        "newest by default"
    );
    let out = run(
        &[
            "restore",
            "--repo",
            s(&repo_dir),
            "--password-file",
            s(&dir.path().join("repo.pw")),
            "--vm",
            "alpha",
            "--to-file",
            s(&raw2),
            "--format",
            "raw",
        ],
        2,
    );
    assert!(one_line_error(&out).contains("--disk"), "{out:?}");

    // prune --dry-run: the plan with reasons, nothing changed.
    let out = run(&cat(&[&["prune", "--dry-run"], &t]), 0);
    let text = &out.stdout;
    assert!(
        text.contains("VM alpha (0a0a0a0a-0000-4000-8000-00000000000a) — job nightly: keep-last 1, keep-daily 2"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "keep   {} newest complete restore point of the VM; last 1 (#1); daily #1 (2026-11-21)",
            ids[2]
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("remove {} matched no keep rule", ids[1])),
        "{text}"
    );
    assert!(
        text.contains(&format!("keep   {} daily #2 (2026-11-20)", ids[0])),
        "{text}"
    );
    assert!(
        text.contains("job gone-job is not in the configuration: everything kept"),
        "{text}"
    );
    // Its two chunks are its own (the others are shared: image 3's first chunk is image 1's third).
    assert!(
        text.contains("would forget 1 restore point, then mark 2 chunks"),
        "{text}"
    );
    assert!(text.contains("Nothing was changed"), "{text}");
    run(&cat(&[&["check"], &t]), 0);
    assert!(
        run(&cat(&[&["list", "--json"], &t]), 0)
            .stdout
            .contains(&ids[1])
    );

    // A stale lock of a crashed process is reported and removed.
    let lock = json!({"id": "dead00", "kind": "exclusive", "host": xenvault_repo::lock::host_name(), "pid": 999_999_999u32,
        "purpose": "prune sweep", "started": "2026-11-22T00:00:00Z", "refreshed": "2026-11-22T00:00:00Z"});
    std::fs::write(repo_dir.join("locks/dead00"), lock.to_string()).unwrap();

    // prune: forget, then mark (grace 0); the next prune sweeps.
    let out = run(&cat(&[&["prune", "--grace", "0"], &t]), 0);
    assert!(out.stdout.contains("Stale lock dead00"), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("0a0a0a0a-0000-4000-8000-00000000000a/{}", ids[1])),
        "{out:?}"
    );
    assert!(out.stdout.contains("Marked 2 unused chunks"), "{out:?}");
    assert!(!repo_dir.join("locks/dead00").exists());
    // A temporary file of a write killed before its publish: swept, and said.
    let stale = repo_dir.join("chunks/.tmp-999999999-00000000deadbeef");
    std::fs::write(&stale, b"torn").unwrap();
    let out = run(&cat(&[&["prune", "--grace", "0", "--json"], &t]), 0);
    let p = out.json();
    assert_eq!(p["prune"]["deleted_chunks"], 2, "{p}");
    assert_eq!(p["prune"]["deleted_temporaries"], 1, "{p}");
    assert!(!stale.exists());
    std::fs::write(&stale, b"torn").unwrap();
    let out = run(&cat(&[&["prune", "--grace", "0"], &t]), 0);
    assert!(
        out.stdout
            .contains("Removed 1 temporary file left by interrupted writes"),
        "{out:?}"
    );
    assert!(!stale.exists());
    assert_eq!(p["forgotten"].as_array().unwrap().len(), 0);
    run(&cat(&[&["check"], &t]), 0);
    let out = run(&cat(&[&["list", "--json"], &t]), 0);
    assert!(
        !out.stdout.contains(&ids[1]) && out.stdout.contains(&ids[0]),
        "{out:?}"
    );
    // A grace period defers the sweep of the next mark.
    run(&cat(&[&["prune"], &t]), 0);
    let out = run(&cat(&[&["prune"], &t]), 0);
    assert!(out.stdout.contains("Sweep not run: the mark of"), "{out:?}");

    // Damage: a flipped byte (verify) and a missing chunk (check), each named
    // with every restore point it breaks; exit 1.
    let (chunk_of_a0, index_of_a0) = rt().block_on(async {
        let repo = open(&repo_dir, Some("repo-password")).await;
        let m = repo
            .load_manifest("0a0a0a0a-0000-4000-8000-00000000000a", &ids[0])
            .await
            .unwrap();
        let index = repo.load_index(&m.disks[0].index).await.unwrap();
        (index.ids[0].object_key(), m.disks[0].index.clone())
    });
    let path = repo_dir.join(&chunk_of_a0);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    run(&cat(&[&["check"], &t]), 0);
    let out = run(&cat(&[&["verify"], &t]), 1);
    assert!(
        out.stdout.contains(&format!("DAMAGED {chunk_of_a0}: ")),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "breaks VM alpha (0a0a0a0a-0000-4000-8000-00000000000a) restore point {}",
            ids[0]
        )),
        "{out:?}"
    );
    assert!(
        !out.stdout.contains(&format!(
            "breaks VM alpha (0a0a0a0a-0000-4000-8000-00000000000a) restore point {}",
            ids[2]
        )),
        "{out:?}"
    );
    let out = run(&cat(&[&["verify", "--json", "--sample", "100"], &t]), 1);
    let v = out.json();
    assert_eq!(
        v["broken_restore_points"][0]["restore_point"],
        format!("0a0a0a0a-0000-4000-8000-00000000000a/{}", ids[0])
    );
    assert_eq!(v["broken_restore_points"][0]["vm"], "alpha");
    // The damaged restore point refuses to restore, naming the chunk.
    let out = run(
        &cat(&[
            &[
                "restore",
                "--vm",
                "alpha",
                "--at",
                &ids[0],
                "--disk",
                "disk0",
                "--to-file",
                s(&dir.path().join("bad.raw")),
            ],
            &t,
        ]),
        1,
    );
    assert!(out.stderr.contains(&chunk_of_a0), "{out:?}");
    std::fs::remove_file(&path).unwrap();
    let out = run(&cat(&[&["check"], &t]), 1);
    assert!(
        out.stdout
            .contains(&format!("DAMAGED {chunk_of_a0}: chunk is missing")),
        "{out:?}"
    );
    assert!(out.stdout.contains("Fix: "), "{out:?}");
    // A missing chunk is not unreadable metadata, but an unreadable index
    // is: prune refuses (its chunks would look unused), naming the fix.
    let fidx = repo_dir.join(&index_of_a0);
    std::fs::write(&fidx, b"garbage").unwrap();
    let out = run(&cat(&[&["prune", "--grace", "0"], &t]), 1);
    let line = one_line_error(&out);
    assert!(line.contains("xenvault check"), "{line}");
}

#[test]
fn help_and_usage_errors() {
    for cmd in [
        &["repo", "init", "--help"][..],
        &["key", "add", "--help"],
        &["check", "--help"],
        &["verify", "--help"],
        &["prune", "--help"],
    ] {
        let out = run(cmd, 0);
        assert!(out.stdout.contains("Examples:"), "{cmd:?}: {out:?}");
        assert!(out.stdout.contains("Exit codes"), "{cmd:?}: {out:?}");
    }
    let out = run(&["check"], 2);
    assert!(one_line_error(&out).contains("--target NAME"), "{out:?}");
    run(&["verify", "--repo", "/x", "--sample", "0"], 2);
    run(&["prune", "--repo", "/x", "--grace", "soon"], 2);
    run(&["key", "add", "--repo", "/x"], 2); // no new password
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "keep-last = 3");
    let out = run(&["check", "--config", s(&cfg), "--target", "nope"], 2);
    assert!(
        one_line_error(&out).contains("repository targets: repo"),
        "{out:?}"
    );
}
