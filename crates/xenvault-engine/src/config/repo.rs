//! Repository targets in the configuration: checking `[targets.NAME]` of
//! `type = "repository"` (where: `path` or `url`; password; S3 and SFTP
//! settings and their secrets) and the repository settings of jobs (`cbt`,
//! `base`, `nbd-connections`, `disk-concurrency`, calendar retention), plus the
//! retention in force for one VM of a repository job.
//!
//! Calendar retention (`keep-hourly` … `keep-yearly`) applies to repository
//! targets only: an archive target keeps the last N backups, and the loader
//! refuses calendar keys (and the other repository-only job keys) on jobs
//! writing to an archive, naming the key and the fix.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use xenvault_types::config::{
    BaseKeeping, CbtMode, JobConfig, RetentionConfig, TargetConfig, TargetKind,
};

use super::{Checker, ConfigError, ErrorKind, secrets};

/// Largest `nbd-connections` accepted (XAPI's NBD server serves a handful per disk).
pub const MAX_NBD_CONNECTIONS: u32 = 16;
/// Largest `disk-concurrency` accepted.
pub const MAX_DISK_CONCURRENCY: u32 = 16;

/// The calendar retention keys, as written in the file.
pub const CALENDAR_KEYS: [&str; 5] = [
    "keep-hourly",
    "keep-daily",
    "keep-weekly",
    "keep-monthly",
    "keep-yearly",
];

/// Where a repository is kept, from a target's `path` or `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryLocation {
    /// A local directory.
    Local(PathBuf),
    /// `s3://BUCKET[/PREFIX]`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix inside the bucket (no leading or trailing `/`; may be empty).
        prefix: String,
    },
    /// `sftp://[USER@]HOST[:PORT]/DIR`.
    Sftp {
        /// The login user, when given in the URL.
        user: Option<String>,
        /// The host name or address.
        host: String,
        /// The port (default 22).
        port: u16,
        /// The directory on the server (absolute; `/` when none is given).
        dir: String,
    },
}

/// Parses a repository URL: `s3://bucket[/prefix]` or
/// `sftp://[user@]host[:port]/dir`, with the storage layer's parser (the one
/// that opens it), so the loader and the backends never disagree. The error
/// says what is wrong and how to write it.
pub fn parse_repository_url(url: &str) -> Result<RepositoryLocation, String> {
    use xenvault_repo::storage::{TargetUrl, parse_target_url};
    let parsed = parse_target_url(url.trim()).map_err(|e| {
        format!(
            "{}; write s3://BUCKET[/PREFIX] or sftp://[USER@]HOST[:PORT]/DIR \
             (or path = \"…\" for a local directory)",
            e.message
        )
    })?;
    match parsed {
        TargetUrl::S3 { bucket, prefix } => Ok(RepositoryLocation::S3 { bucket, prefix }),
        TargetUrl::Sftp {
            user,
            host,
            port,
            dir,
        } => Ok(RepositoryLocation::Sftp {
            user: Some(user).filter(|u| !u.is_empty()),
            host,
            port,
            dir,
        }),
    }
}

/// The location of a repository target (after the loader checked it).
pub fn repository_location(target: &TargetConfig) -> Result<RepositoryLocation, String> {
    match &target.url {
        Some(url) => parse_repository_url(url),
        None => Ok(RepositoryLocation::Local(target.path.clone())),
    }
}

/// True when any calendar key is above 0.
pub fn has_calendar(r: &RetentionConfig) -> bool {
    r.keep_hourly > 0
        || r.keep_daily > 0
        || r.keep_weekly > 0
        || r.keep_monthly > 0
        || r.keep_yearly > 0
}

/// The retention in force for one VM of a repository job: the job's, then the
/// `keep-last` of the last `[[jobs.NAME.rule]]` selecting it by name or regex
/// (or by tag, when `tags` are known), then `[jobs.NAME.vm."NAME or UUID"]`
/// (its `keep-last`, and its `retention` table, which replaces the calendar keys).
pub fn retention_for(
    job: &JobConfig,
    vm_name: &str,
    vm_uuid: &str,
    tags: &[String],
) -> RetentionConfig {
    let mut r = job.retention.clone();
    let deciding = job.rules.iter().rev().find(|rule| {
        if let Some(n) = &rule.name {
            return n == vm_name;
        }
        if let Some(re) = &rule.regex {
            return regex::Regex::new(&format!("^(?:{re})")).is_ok_and(|re| re.is_match(vm_name));
        }
        if let Some(t) = &rule.tag {
            return tags.contains(t);
        }
        false
    });
    if let Some(k) = deciding.and_then(|rule| rule.keep_last) {
        r.keep_last = k;
    }
    for key in [vm_name, vm_uuid] {
        if let Some(o) = job.vm_overrides.get(key) {
            if let Some(own) = &o.retention {
                // The loader put the inherited keep-last in when the table has none.
                r = own.clone();
            }
            if let Some(k) = o.keep_last {
                r.keep_last = k;
            }
        }
    }
    r
}

/// The repository's retention options for a [`RetentionConfig`].
pub fn keep_options(r: &RetentionConfig) -> xenvault_repo::KeepOptions {
    xenvault_repo::KeepOptions {
        last: r.keep_last,
        hourly: r.keep_hourly,
        daily: r.keep_daily,
        weekly: r.keep_weekly,
        monthly: r.keep_monthly,
        yearly: r.keep_yearly,
        within_secs: None,
    }
}

impl Checker<'_> {
    /// Checks a target's repository keys: refused on archives; on
    /// repositories exactly one of `path`/`url`, a supported URL with its
    /// settings table, readable secrets and key files.
    pub(super) fn check_target_kind(
        &self,
        name: &str,
        target: &mut TargetConfig,
    ) -> Result<(), ConfigError> {
        match target.kind {
            TargetKind::Archive => self.check_archive_target(name, target),
            TargetKind::Repository => self.check_repository_target(name, target),
        }
    }

    fn check_archive_target(&self, name: &str, target: &TargetConfig) -> Result<(), ConfigError> {
        let repo_only: [(&str, bool); 5] = [
            ("url", target.url.is_some()),
            ("password-file", target.password_file.is_some()),
            ("password-env", target.password_env.is_some()),
            ("s3", target.s3.is_some()),
            ("sftp", target.sftp.is_some()),
        ];
        if let Some((key, _)) = repo_only.iter().find(|(_, set)| *set) {
            return Err(self.err(
                ErrorKind::BadValue,
                &["targets", name, key],
                format!(
                    "`{key}` only applies to repository targets, and target {name} is an archive"
                ),
                "add type = \"repository\" to this target, or remove the key".to_string(),
            ));
        }
        Ok(())
    }

    fn check_repository_target(
        &self,
        name: &str,
        target: &mut TargetConfig,
    ) -> Result<(), ConfigError> {
        let key = |k: &'static str| vec!["targets", name, k];
        let has_path = !target.path.as_os_str().is_empty();
        match (&target.url, has_path) {
            (Some(_), true) => {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &key("url"),
                    "both path and url are set".to_string(),
                    "keep path for a local directory, or url for S3/SFTP, not both".to_string(),
                ));
            }
            (None, false) => {
                return Err(self.err(
                    ErrorKind::MissingKey,
                    &["targets", name],
                    format!("repository target {name} has neither path nor url"),
                    "add path = \"/srv/xenvault-repo\" (a local directory) or url = \"s3://BUCKET/PREFIX\" / \"sftp://USER@HOST/DIR\"".to_string(),
                ));
            }
            _ => {}
        }
        let location = match &target.url {
            Some(url) => Some(parse_repository_url(url).map_err(|p| {
                self.err(
                    ErrorKind::BadValue,
                    &key("url"),
                    p,
                    "see docs/configuration.md, repository targets".to_string(),
                )
            })?),
            None => None,
        };
        let is_s3 = matches!(location, Some(RepositoryLocation::S3 { .. }));
        let is_sftp = matches!(location, Some(RepositoryLocation::Sftp { .. }));
        if is_s3 && target.s3.is_none() {
            return Err(self.err(
                ErrorKind::MissingKey,
                &key("url"),
                "an s3:// repository needs its [targets.NAME.s3] table".to_string(),
                format!("add [targets.{name}.s3] with endpoint, region, access-key-id and secret-access-key-file (or -env)"),
            ));
        }
        if is_sftp && target.sftp.is_none() {
            return Err(self.err(
                ErrorKind::MissingKey,
                &key("url"),
                "an sftp:// repository needs its [targets.NAME.sftp] table".to_string(),
                format!("add [targets.{name}.sftp] with key-file = \"/etc/xenvault/id_ed25519\""),
            ));
        }
        if target.s3.is_some() && !is_s3 {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("s3"),
                "S3 settings on a target that is not s3://".to_string(),
                "set url = \"s3://BUCKET/PREFIX\", or remove the s3 table".to_string(),
            ));
        }
        if target.sftp.is_some() && !is_sftp {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("sftp"),
                "SFTP settings on a target that is not sftp://".to_string(),
                "set url = \"sftp://USER@HOST/DIR\", or remove the sftp table".to_string(),
            ));
        }
        if has_path {
            target.path = self.resolve(&target.path);
        }

        // The repository password (optional: plain repositories have none).
        target.password = self.secret_from(
            &["targets", name],
            ("password-file", "password-env"),
            &mut target.password_file,
            &target.password_env,
        )?;

        if let Some(s3) = &mut target.s3 {
            let sk = |k: &'static str| vec!["targets", name, "s3", k];
            if let Some(ep) = &s3.endpoint {
                let rest = ep
                    .strip_prefix("https://")
                    .or_else(|| ep.strip_prefix("http://"));
                if rest.is_none_or(|r| r.trim_matches('/').is_empty()) {
                    return Err(self.err(
                        ErrorKind::BadValue,
                        &sk("endpoint"),
                        format!("{ep:?} is not an endpoint URL"),
                        "write e.g. endpoint = \"https://s3.eu-west-1.amazonaws.com\" or \"http://127.0.0.1:9000\"".to_string(),
                    ));
                }
            }
            if s3.region.trim().is_empty() {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &sk("region"),
                    "the region is empty".to_string(),
                    "write e.g. region = \"us-east-1\" (any value for most self-hosted servers)"
                        .to_string(),
                ));
            }
            let has_secret =
                s3.secret_access_key_file.is_some() || s3.secret_access_key_env.is_some();
            match (&s3.access_key_id, has_secret) {
                (Some(_), false) => {
                    return Err(self.err(
                        ErrorKind::MissingKey,
                        &sk("access-key-id"),
                        "an access key id without its secret".to_string(),
                        "add secret-access-key-file = \"/path\" (chmod 600) or secret-access-key-env = \"VARIABLE\"".to_string(),
                    ));
                }
                (None, true) => {
                    return Err(self.err(
                        ErrorKind::MissingKey,
                        &["targets", name, "s3"],
                        "a secret access key without its access key id".to_string(),
                        "add access-key-id = \"…\"".to_string(),
                    ));
                }
                _ => {}
            }
            s3.secret_access_key = self.secret_from(
                &["targets", name, "s3"],
                ("secret-access-key-file", "secret-access-key-env"),
                &mut s3.secret_access_key_file,
                &s3.secret_access_key_env,
            )?;
        }

        if let Some(sftp) = &mut target.sftp {
            let sk = |k: &'static str| vec!["targets", name, "sftp", k];
            let key_file = self.resolve(&sftp.key_file);
            if self.read_secrets {
                check_private_key(&key_file)
                    .map_err(|(p, f)| self.err(ErrorKind::Secret, &sk("key-file"), p, f))?;
            }
            sftp.key_file = key_file;
            if let Some(kh) = &sftp.known_hosts_file {
                let kh = self.resolve(kh);
                if self.read_secrets && !kh.is_file() {
                    return Err(self.err(
                        ErrorKind::Io,
                        &sk("known-hosts-file"),
                        format!("the known_hosts file {} does not exist", kh.display()),
                        format!(
                            "create it, e.g. `ssh-keyscan -p PORT HOST > {}`, and check the key it holds",
                            kh.display()
                        ),
                    ));
                }
                sftp.known_hosts_file = Some(kh);
            }
        }
        Ok(())
    }

    /// Checks a job's repository settings against its target's kind.
    pub(super) fn check_job_repository(
        &self,
        name: &str,
        job: &mut JobConfig,
        target: Option<&TargetConfig>,
    ) -> Result<(), ConfigError> {
        let kind = target.map_or(TargetKind::Archive, |t| t.kind);
        let target_name = target.map_or(job.target.as_str(), |t| t.name.as_str());
        if kind == TargetKind::Archive {
            let archive_fix = |k: &str| {
                format!(
                    "remove `{k}` (archives keep the last N: keep-last), or add type = \"repository\" to [targets.{target_name}]"
                )
            };
            for (key, set) in [
                ("cbt", job.cbt != CbtMode::default()),
                ("base", job.base != BaseKeeping::default()),
                (
                    "nbd-connections",
                    self.spans.has_path(&["jobs", name, "nbd-connections"]),
                ),
                (
                    "disk-concurrency",
                    self.spans.has_path(&["jobs", name, "disk-concurrency"]),
                ),
            ] {
                if set {
                    return Err(self.err(
                        ErrorKind::BadValue,
                        &["jobs", name, key],
                        format!("`{key}` only applies to jobs writing to a repository, and target {target_name} is an archive"),
                        archive_fix(key),
                    ));
                }
            }
            for k in CALENDAR_KEYS {
                if self.spans.has_path(&["jobs", name, "retention", k]) {
                    return Err(self.err(
                        ErrorKind::BadValue,
                        &["jobs", name, "retention", k],
                        format!("calendar retention (`{k}`) only applies to repository targets, and target {target_name} is an archive"),
                        archive_fix(k),
                    ));
                }
            }
            for vm in job.vm_overrides.keys() {
                if self.spans.has_path(&["jobs", name, "vm", vm, "retention"]) {
                    return Err(self.err(
                        ErrorKind::BadValue,
                        &["jobs", name, "vm", vm, "retention"],
                        format!("a per-VM retention table only applies to repository targets, and target {target_name} is an archive"),
                        "write keep-last = N in the VM's table instead".to_string(),
                    ));
                }
            }
            return self.check_keep(
                job.retention.keep_last,
                &["jobs", name, "retention", "keep-last"],
            );
        }

        for (key, set) in [
            ("pool-metadata", job.pool_metadata.is_some()),
            ("host-backup", job.host_backup.is_some()),
        ] {
            if set {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &["jobs", name, key],
                    format!("`{key}` backups are files, not VM disks: a repository does not store them, and target {target_name} is a repository"),
                    format!("remove [jobs.{name}.{key}] here and put it in a job writing to an archive target"),
                ));
            }
        }
        if job.nbd_connections == 0 || job.nbd_connections > MAX_NBD_CONNECTIONS {
            return Err(self.err(
                ErrorKind::BadValue,
                &["jobs", name, "nbd-connections"],
                format!(
                    "{} NBD connections per disk is out of range",
                    job.nbd_connections
                ),
                format!("write 1 to {MAX_NBD_CONNECTIONS} (default 4)"),
            ));
        }
        if job.disk_concurrency == 0 || job.disk_concurrency > MAX_DISK_CONCURRENCY {
            return Err(self.err(
                ErrorKind::BadValue,
                &["jobs", name, "disk-concurrency"],
                format!("disk-concurrency {} is out of range", job.disk_concurrency),
                format!("write 1 to {MAX_DISK_CONCURRENCY} (default 2)"),
            ));
        }
        if job.base == BaseKeeping::Metadata && job.cbt == CbtMode::Off {
            return Err(self.err(
                ErrorKind::BadValue,
                &["jobs", name, "base"],
                "base = \"metadata\" keeps only CBT metadata, but cbt = \"off\": no incremental could ever be taken".to_string(),
                "use cbt = \"use\" or \"enable\" with base = \"metadata\", or base = \"snapshot\" with cbt = \"off\"".to_string(),
            ));
        }
        self.check_retention(&job.retention, &["jobs", name, "retention"])?;
        let inherited = job.retention.keep_last;
        let vms: Vec<String> = job.vm_overrides.keys().cloned().collect();
        for vm in vms {
            let path = ["jobs", name, "vm", vm.as_str(), "retention"];
            let has_keep_last = self.spans.has_path(&[&path[..], &["keep-last"]].concat());
            let Some(o) = job.vm_overrides.get_mut(&vm) else {
                continue;
            };
            if let Some(r) = &mut o.retention {
                if !has_keep_last {
                    // Not written: the VM's keep-last, else the job's.
                    r.keep_last = o.keep_last.unwrap_or(inherited);
                }
                let r = r.clone();
                self.check_retention(&r, &path)?;
            }
        }
        Ok(())
    }

    /// keep-last 0 is allowed only beside a calendar key.
    fn check_retention(&self, r: &RetentionConfig, path: &[&str]) -> Result<(), ConfigError> {
        if r.keep_last == 0 && !has_calendar(r) {
            let mut key = path.to_vec();
            key.push("keep-last");
            return Err(self.err(
                ErrorKind::BadValue,
                &key,
                "keep-last is 0 and no keep-hourly … keep-yearly is set: only the newest restore point would be kept".to_string(),
                "write keep-last = 1 or more, or add e.g. keep-daily = 7".to_string(),
            ));
        }
        Ok(())
    }
}

/// Checks an SSH private key file: it exists, is a regular file, and is not
/// readable by group or others (what `ssh` itself demands).
fn check_private_key(path: &Path) -> Result<(), secrets::SecretProblem> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            format!("cannot read the SSH key file {shown}: {e}"),
            "create a key with `ssh-keygen -t ed25519 -f FILE` and add FILE.pub to the server's authorized_keys".to_string(),
        )
    })?;
    if !meta.is_file() {
        return Err((
            format!("the SSH key file {shown} is not a regular file"),
            "point key-file at the private key".to_string(),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err((
            format!("the SSH key file {shown} can be read by group or others (mode {mode:04o})"),
            format!("run `chmod 600 {shown}`"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_repository_url("s3://my-bucket/a/b/").unwrap(),
            RepositoryLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            parse_repository_url("s3://bkt").unwrap(),
            RepositoryLocation::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse_repository_url("sftp://backup@host.example:2222/srv/repo").unwrap(),
            RepositoryLocation::Sftp {
                user: Some("backup".into()),
                host: "host.example".into(),
                port: 2222,
                dir: "/srv/repo".into()
            }
        );
        assert_eq!(
            parse_repository_url("sftp://[::1]/r").unwrap(),
            RepositoryLocation::Sftp {
                user: None,
                host: "::1".into(),
                port: 22,
                dir: "/r".into()
            }
        );
        for bad in [
            "s3://",
            "s3://A_B",
            "s3://bk/../x",
            "sftp://",
            "sftp://@h/x",
            "sftp://h:99999/x",
            "sftp://h:0/x",
            "http://x/y",
            "/srv/repo",
        ] {
            let e = parse_repository_url(bad).unwrap_err();
            assert!(e.contains("write"), "{bad}: {e}");
        }
    }

    #[test]
    fn retention_per_vm() {
        use xenvault_types::config::{SelectRule, VmOverride};
        let mut job = JobConfig::new("j", vec!["p".into()], "t");
        job.retention.keep_daily = 7;
        job.rules.push(SelectRule {
            regex: Some("db".into()),
            keep_last: Some(3),
            ..Default::default()
        });
        job.vm_overrides.insert(
            "mail".into(),
            VmOverride {
                retention: Some(RetentionConfig {
                    keep_last: 2,
                    keep_hourly: 0,
                    keep_daily: 0,
                    keep_weekly: 4,
                    keep_monthly: 0,
                    keep_yearly: 0,
                }),
                ..Default::default()
            },
        );
        job.vm_overrides.insert(
            "u-1".into(),
            VmOverride {
                keep_last: Some(9),
                ..Default::default()
            },
        );
        let web = retention_for(&job, "web", "u-0", &[]);
        assert_eq!((web.keep_last, web.keep_daily), (7, 7));
        let db = retention_for(&job, "db-01", "u-1", &[]);
        assert_eq!((db.keep_last, db.keep_daily), (9, 7));
        let db2 = retention_for(&job, "db-02", "u-2", &[]);
        assert_eq!(db2.keep_last, 3);
        let mail = retention_for(&job, "mail", "u-3", &[]);
        assert_eq!(
            (mail.keep_last, mail.keep_daily, mail.keep_weekly),
            (2, 0, 4)
        );
        let k = keep_options(&mail);
        assert_eq!((k.last, k.weekly), (2, 4));
    }
}
