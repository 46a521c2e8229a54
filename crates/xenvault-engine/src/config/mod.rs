//! Loading the configuration: the TOML file (every error names the file, line
//! and key, and says how to fix it), the passwords it points to, the weekday
//! files and NAUbackup `.cfg` files it names.
//!
//! The data types are in [`xenvault_types::config`]; this module reads and
//! checks them. After [`load`] succeeds: every job names existing pools and a
//! target, every regex compiles, every password is read, every weekday file
//! and NAUbackup file is parsed into the job, and every relative path is made
//! absolute (relative to the configuration file's directory).

pub mod edit;
pub mod naubackup;
pub mod repo;
pub mod secrets;
pub mod spans;
pub mod weekday;

use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use xenvault_types::config::{
    Compression, Config, DiskSelection, EmailConfig, ExportMode, ExtraBackupConfig, JobConfig,
    PoolConfig, TargetConfig, TargetKind,
};
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};

use spans::SpanIndex;

/// What kind of configuration problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file cannot be read.
    Io,
    /// Not valid TOML.
    Syntax,
    /// A key no table knows.
    UnknownKey,
    /// A required key is missing.
    MissingKey,
    /// A value of the wrong type or out of range.
    BadValue,
    /// A job names a pool or target that is not defined.
    UnknownReference,
    /// A regex that does not compile.
    BadRegex,
    /// A password that cannot be read (file, permissions, environment).
    Secret,
    /// A problem in a weekday file.
    Weekday,
    /// A problem in a NAUbackup `.cfg` file.
    NauCfg,
}

/// A configuration error: where (file, line, key), what, and how to fix it.
/// Its `Display` is one line: `FILE:LINE: KEY: PROBLEM; FIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The kind of problem.
    pub kind: ErrorKind,
    /// The file the problem is in.
    pub file: PathBuf,
    /// The line (1-based), when known.
    pub line: Option<usize>,
    /// The key (dotted path for TOML, e.g. `jobs.nightly.target`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl ConfigError {
    /// A new error (problem and fix are flattened to one line).
    pub fn new(
        kind: ErrorKind,
        file: &Path,
        line: Option<usize>,
        key: Option<String>,
        problem: String,
        fix: String,
    ) -> ConfigError {
        ConfigError {
            kind,
            file: file.to_path_buf(),
            line,
            key,
            problem: one_line(&problem),
            fix: one_line(&fix),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Options of [`load_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Read the passwords (files, environment). Without it the password
    /// settings are still checked for consistency, but nothing is read and
    /// every `password` stays `None` (for documentation checks and dry tools).
    pub read_secrets: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { read_secrets: true }
    }
}

/// Reads, parses and checks the configuration file at `path`, passwords included.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, LoadOptions::default())
}

/// [`load`] with options.
pub fn load_with(path: &Path, options: LoadOptions) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            ErrorKind::Io,
            path,
            None,
            None,
            format!("cannot read the configuration file: {e}"),
            "check the path given with --config".to_string(),
        )
    })?;
    load_str_with(&text, path, options)
}

/// Parses and checks a configuration text as if read from `path` (relative
/// paths inside are taken relative to `path`'s directory).
pub fn load_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
    load_str_with(text, path, LoadOptions::default())
}

/// [`load_str`] with options.
pub fn load_str_with(text: &str, path: &Path, options: LoadOptions) -> Result<Config, ConfigError> {
    let spans = SpanIndex::new(text);
    let mut config: Config =
        toml::from_str(text).map_err(|e| toml_error(&e, text, path, &spans))?;
    config.fill_names();
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let checker = Checker {
        path,
        spans: &spans,
        base: &base,
        read_secrets: options.read_secrets,
    };
    checker.check(&mut config)?;
    Ok(config)
}

/// The TLS policy of a pool: its pinned fingerprint, or no verification when
/// `insecure-skip-verify` is set, or the system's CAs.
pub fn tls_policy(pool: &PoolConfig) -> Result<TlsPolicy, String> {
    if pool.insecure_skip_verify {
        return Ok(TlsPolicy::InsecureNoVerify);
    }
    match &pool.fingerprint {
        Some(fp) => fp
            .parse::<Fingerprint>()
            .map(TlsPolicy::Pinned)
            .map_err(|e| format!("pool {}: fingerprint: {e}", pool.name)),
        None => Ok(TlsPolicy::Verify),
    }
}

/// The mail settings of the report module for this `[email]` table (the
/// password comes from its `Secret`; read by [`load`]).
pub fn email_settings(email: &EmailConfig) -> crate::report::email::EmailSettings {
    use crate::report::email::SmtpSecurity as Mode;
    use xenvault_types::config::SmtpSecurity;
    let mut settings = crate::report::email::EmailSettings::new(
        email.server.clone(),
        email.from.clone(),
        email.to.clone(),
    );
    settings.port = email.port;
    settings.security = match email.security {
        SmtpSecurity::Starttls => Mode::Starttls,
        SmtpSecurity::Tls => Mode::Tls,
        SmtpSecurity::None => Mode::Plain,
    };
    settings.username = email.user.clone();
    settings.password = email.password.as_ref().map(|s| s.expose().to_string());
    settings.attempts = email.retries.max(1);
    settings
}

/// Flattens text to one line.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The candidate closest to `word` (case-insensitive edit distance), if close enough.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = edit_distance(&lower, &c.to_lowercase());
        let limit = (word.chars().count().max(c.chars().count()) / 3).clamp(1, 3);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    // Optimal string alignment distance (an adjacent swap counts as one edit).
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// Turns a toml/serde error into one line naming the line and the key.
fn toml_error(e: &toml::de::Error, text: &str, path: &Path, spans: &SpanIndex<'_>) -> ConfigError {
    let message = one_line(e.message());
    let offset = e.span().map(|s| s.start);
    let line = offset.map(|o| spans.line_of(o));
    let on_header = line
        .and_then(|l| text.lines().nth(l - 1))
        .is_some_and(|t| t.trim_start().starts_with('['));
    let key = if on_header {
        line.and_then(|l| key_on_line(text, l))
    } else {
        offset
            .and_then(|o| spans.path_at(o))
            .or_else(|| line.and_then(|l| key_on_line(text, l)))
    };
    // serde's own wording, reworded with a fix.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = expected
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        let fix = match closest(field, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None if expected.is_empty() => "remove it".to_string(),
            None => format!("remove it; known keys here: {}", expected.join(", ")),
        };
        let key = key.map(|k| {
            if k.ends_with(field) {
                k
            } else {
                format!("{k}.{field}")
            }
        });
        return ConfigError::new(
            ErrorKind::UnknownKey,
            path,
            line,
            key,
            format!("unknown key `{field}`"),
            fix,
        );
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        let key = key.map(|k| {
            if k.ends_with(field) {
                k
            } else {
                format!("{k}.{field}")
            }
        });
        return ConfigError::new(
            ErrorKind::MissingKey,
            path,
            line,
            key.or_else(|| Some(field.to_string())),
            format!("the required key `{field}` is missing"),
            format!("add `{field} = …` to this table (see docs/configuration.md)"),
        );
    }
    if message.starts_with("invalid type")
        || message.starts_with("unknown variant")
        || message.starts_with("invalid value")
    {
        return ConfigError::new(
            ErrorKind::BadValue,
            path,
            line,
            key,
            message,
            "fix the value (see docs/configuration.md)".to_string(),
        );
    }
    if spans.parsed() {
        // Valid TOML, but a value serde refused with its own wording.
        return ConfigError::new(
            ErrorKind::BadValue,
            path,
            line,
            key,
            if message.is_empty() {
                "invalid value".to_string()
            } else {
                message
            },
            "fix the value (see docs/configuration.md)".to_string(),
        );
    }
    ConfigError::new(
        ErrorKind::Syntax,
        path,
        line,
        key,
        if message.is_empty() {
            "invalid TOML".to_string()
        } else {
            format!("invalid TOML: {message}")
        },
        "fix the syntax (strings in \"quotes\", one `key = value` per line, [table] headers)"
            .to_string(),
    )
}

/// For a text that does not parse: the dotted key written on `line` (the
/// last `[table]` header above it, plus the key before `=`).
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let this = lines.get(line.checked_sub(1)?)?.trim();
    let bare = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '"'))
    };
    let key = this
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| bare(k));
    let header = lines[..line - 1].iter().rev().find_map(|l| {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.strip_suffix("]]"))
            .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))?;
        Some(inner.trim().to_string())
    });
    match (header, key) {
        (Some(h), Some(k)) => Some(format!("{h}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        _ if this.starts_with('[') => Some(this.trim_matches(['[', ']', ' ']).to_string()),
        _ => None,
    }
}

struct Checker<'a> {
    path: &'a Path,
    spans: &'a SpanIndex<'a>,
    base: &'a Path,
    read_secrets: bool,
}

impl Checker<'_> {
    fn err(&self, kind: ErrorKind, key: &[&str], problem: String, fix: String) -> ConfigError {
        ConfigError::new(
            kind,
            self.path,
            self.spans.line_of_path(key),
            Some(key.join(".")),
            problem,
            fix,
        )
    }

    /// A secret given as `<file_key>` (a path, resolved against the
    /// configuration's directory and written back resolved) or `<env_key>`
    /// (an environment variable) in the table at `table`. `None` when
    /// neither is set, or when secrets are not read (the path is still
    /// resolved); both set is an error.
    fn secret_from(
        &self,
        table: &[&str],
        (file_key, env_key): (&'static str, &'static str),
        file: &mut Option<PathBuf>,
        env: &Option<String>,
    ) -> Result<Option<xenvault_types::config::Secret>, ConfigError> {
        let at = |k: &'static str| {
            let mut path = table.to_vec();
            path.push(k);
            path
        };
        if file.is_some() && env.is_some() {
            return Err(self.err(
                ErrorKind::Secret,
                &at(env_key),
                format!("both {file_key} and {env_key} are set"),
                "keep one of them".to_string(),
            ));
        }
        if let Some(f) = file.as_mut() {
            *f = self.resolve(f);
        }
        if !self.read_secrets {
            return Ok(None);
        }
        match (file.as_deref(), env) {
            (Some(f), _) => secrets::read_password_file(f)
                .map(Some)
                .map_err(|(p, fix)| self.err(ErrorKind::Secret, &at(file_key), p, fix)),
            (None, Some(var)) => secrets::read_password_env(var)
                .map(Some)
                .map_err(|(p, fix)| self.err(ErrorKind::Secret, &at(env_key), p, fix)),
            (None, None) => Ok(None),
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn check(&self, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(dir) = &config.state_dir {
            config.state_dir = Some(self.resolve(dir));
        }
        for (name, pool) in &mut config.pools {
            self.check_pool(name, pool)?;
        }
        for (name, target) in &mut config.targets {
            self.check_target(name, target)?;
        }
        if let Some(email) = &mut config.email {
            self.check_email(email)?;
        }
        let mut nau_targets = Vec::new();
        let names: Vec<String> = config.jobs.keys().cloned().collect();
        for name in names {
            let Some(job) = config.jobs.get_mut(&name) else {
                continue;
            };
            if let Some(target) = self.check_job(&name, job, &config.pools, &config.targets)? {
                nau_targets.push(target);
            }
        }
        for target in nau_targets {
            config.targets.insert(target.name.clone(), target);
        }
        Ok(())
    }

    fn check_pool(&self, name: &str, pool: &mut PoolConfig) -> Result<(), ConfigError> {
        let key = |k: &'static str| ["pools", name, k];
        let url = pool.url.trim();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        match rest {
            Some(r) if !r.trim_start_matches('/').is_empty() => {}
            _ => {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &key("url"),
                    format!("{:?} is not a pool URL", pool.url),
                    "write the coordinator's address as https://HOST (or https://HOST:PORT)"
                        .to_string(),
                ));
            }
        }
        if pool.user.trim().is_empty() {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("user"),
                "the user is empty".to_string(),
                "write the XAPI user, e.g. user = \"root\"".to_string(),
            ));
        }
        if pool.insecure_skip_verify && pool.fingerprint.is_some() {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("insecure-skip-verify"),
                "both a pinned fingerprint and insecure-skip-verify are set".to_string(),
                "remove insecure-skip-verify: the fingerprint already secures the connection"
                    .to_string(),
            ));
        }
        if let Some(fp) = &pool.fingerprint {
            if url.starts_with("http://") {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &key("fingerprint"),
                    "a fingerprint is pinned but the URL is plain http://".to_string(),
                    "use an https:// URL".to_string(),
                ));
            }
            if let Err(e) = fp.parse::<Fingerprint>() {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &key("fingerprint"),
                    format!("not a SHA-256 fingerprint: {e}"),
                    format!(
                        "copy the value `xenvault trust {}` prints (sha256:<64 hex digits>)",
                        pool.url
                    ),
                ));
            }
        }
        if pool.password_file.is_none() && pool.password_env.is_none() {
            return Err(self.err(
                ErrorKind::MissingKey,
                &["pools", name],
                format!("pool {name} has no password"),
                "add password-file = \"/path\" (chmod 600) or password-env = \"VARIABLE\""
                    .to_string(),
            ));
        }
        if let Some(password) = self.secret_from(
            &["pools", name],
            ("password-file", "password-env"),
            &mut pool.password_file,
            &pool.password_env,
        )? {
            pool.password = Some(password);
        }
        Ok(())
    }

    fn check_target(&self, name: &str, target: &mut TargetConfig) -> Result<(), ConfigError> {
        self.check_target_kind(name, target)?;
        if target.kind == TargetKind::Repository {
            return Ok(());
        }
        if target.path.as_os_str().is_empty() {
            return Err(self.err(
                ErrorKind::BadValue,
                &["targets", name, "path"],
                "the path is empty".to_string(),
                "write the archive directory, e.g. path = \"/mnt/backups\"".to_string(),
            ));
        }
        target.path = self.resolve(&target.path);
        Ok(())
    }

    fn check_email(&self, email: &mut EmailConfig) -> Result<(), ConfigError> {
        let key = |k: &'static str| ["email", k];
        if email.server.trim().is_empty() {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("server"),
                "the SMTP server is empty".to_string(),
                "write its host name, e.g. server = \"smtp.example.org\"".to_string(),
            ));
        }
        if !email.from.contains('@') {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("from"),
                format!("{:?} is not an email address", email.from),
                "write the sender address, e.g. from = \"xenvault@example.org\"".to_string(),
            ));
        }
        if email.to.is_empty() {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("to"),
                "no recipient".to_string(),
                "write at least one address, e.g. to = [\"admin@example.org\"]".to_string(),
            ));
        }
        if let Some(bad) = email.to.iter().find(|a| !a.contains('@')) {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("to"),
                format!("{bad:?} is not an email address"),
                "write addresses like admin@example.org".to_string(),
            ));
        }
        if email.retries == 0 {
            return Err(self.err(
                ErrorKind::BadValue,
                &key("retries"),
                "retries is 0: the email would never be sent".to_string(),
                "write retries = 1 or more".to_string(),
            ));
        }
        let has_password = email.password_file.is_some() || email.password_env.is_some();
        match (&email.user, has_password) {
            (Some(_), false) => {
                return Err(self.err(
                    ErrorKind::MissingKey,
                    &key("user"),
                    "an SMTP user is set without a password".to_string(),
                    "add password-file = \"/path\" (chmod 600) or password-env = \"VARIABLE\""
                        .to_string(),
                ));
            }
            (None, true) => {
                return Err(self.err(
                    ErrorKind::MissingKey,
                    &key("user"),
                    "an SMTP password is set without a user".to_string(),
                    "add user = \"login\"".to_string(),
                ));
            }
            _ => {}
        }
        email.password = self.secret_from(
            &["email"],
            ("password-file", "password-env"),
            &mut email.password_file,
            &email.password_env,
        )?;
        Ok(())
    }

    /// Checks a job; returns the target a NAUbackup `backup_dir` defines, if any.
    fn check_job(
        &self,
        name: &str,
        job: &mut JobConfig,
        pools: &std::collections::BTreeMap<String, PoolConfig>,
        targets: &std::collections::BTreeMap<String, TargetConfig>,
    ) -> Result<Option<TargetConfig>, ConfigError> {
        let jk = |k: &'static str| vec!["jobs", name, k];
        let mut nau_target = None;

        if let Some(cfg_path) = &job.naubackup_cfg {
            let cfg_path = self.resolve(cfg_path);
            if job.all_vms
                || !job.names.is_empty()
                || !job.regexes.is_empty()
                || !job.tags.is_empty()
                || !job.rules.is_empty()
                || job.weekday_file.is_some()
            {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &jk("naubackup-cfg"),
                    "the job has both a NAUbackup .cfg and its own selection".to_string(),
                    "select the VMs in the .cfg only, or remove naubackup-cfg".to_string(),
                ));
            }
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
                self.err(
                    ErrorKind::Io,
                    &jk("naubackup-cfg"),
                    format!("cannot read {}: {e}", cfg_path.display()),
                    "check the path (relative paths start at the configuration file's directory)"
                        .to_string(),
                )
            })?;
            let cfg = naubackup::parse(&text, &cfg_path)?;
            job.rules = cfg.rules;
            job.exclude_names.extend(cfg.exclude_names);
            job.exclude_regexes.extend(cfg.exclude_regexes);
            job.retention.keep_last = cfg.max_backups;
            job.pre_clean = job.pre_clean || cfg.pre_clean;
            if cfg.pool_db_backup && job.pool_metadata.is_none() {
                job.pool_metadata = Some(ExtraBackupConfig {
                    keep_last: cfg.max_backups,
                });
            }
            // Relative paths of the .cfg start at the .cfg's directory.
            let cfg_dir = cfg_path.parent().unwrap_or(self.base);
            let in_cfg_dir = |p: &Path| {
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    cfg_dir.join(p)
                }
            };
            if let Some(log) = &cfg.status_log {
                job.status_log = Some(in_cfg_dir(log));
            }
            if job.target.is_empty() {
                let target_name = format!("{name}.backup_dir");
                nau_target = Some(TargetConfig::archive(
                    &target_name,
                    in_cfg_dir(&cfg.backup_dir),
                ));
                job.target = target_name;
            }
            job.naubackup_cfg = Some(cfg_path);
        }

        if job.pools.is_empty() {
            return Err(self.err(
                ErrorKind::BadValue,
                &jk("pools"),
                "the job names no pool".to_string(),
                "write pools = [\"NAME\"] with a pool defined as [pools.NAME]".to_string(),
            ));
        }
        for (i, pool) in job.pools.iter().enumerate() {
            if !pools.contains_key(pool) {
                let known: Vec<&str> = pools.keys().map(String::as_str).collect();
                let field = if self.spans.has_path(&["jobs", name, "pool"]) {
                    "pool"
                } else {
                    "pools"
                };
                let idx = i.to_string();
                let key: Vec<&str> = if field == "pools" {
                    vec!["jobs", name, field, idx.as_str()]
                } else {
                    vec!["jobs", name, field]
                };
                return Err(self.err(
                    ErrorKind::UnknownReference,
                    &key,
                    format!("pool {pool:?} is not defined"),
                    reference_fix("pools", pool, &known),
                ));
            }
        }
        if job.target.is_empty() {
            return Err(self.err(
                ErrorKind::MissingKey,
                &["jobs", name],
                format!("job {name} has no target"),
                "add target = \"NAME\" with a target defined as [targets.NAME]".to_string(),
            ));
        }
        if nau_target.is_none() && !targets.contains_key(&job.target) {
            let known: Vec<&str> = targets.keys().map(String::as_str).collect();
            return Err(self.err(
                ErrorKind::UnknownReference,
                &jk("target"),
                format!("target {:?} is not defined", job.target),
                reference_fix("targets", &job.target, &known),
            ));
        }

        // Selection.
        if let Some(file) = &job.weekday_file {
            let file = self.resolve(file);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                self.err(
                    ErrorKind::Io,
                    &jk("weekday-file"),
                    format!("cannot read the weekday file {}: {e}", file.display()),
                    "check the path (relative paths start at the configuration file's directory)"
                        .to_string(),
                )
            })?;
            job.weekday_schedule = Some(weekday::parse(&text, &file)?);
            job.weekday_file = Some(file);
        }
        if !job.has_include_rule() {
            return Err(self.err(
                ErrorKind::MissingKey,
                &["jobs", name],
                format!("job {name} selects no VM"),
                "add names, regexes, tags, [[jobs.NAME.rule]], weekday-file or all-vms = true"
                    .to_string(),
            ));
        }
        for (i, n) in job.names.iter().enumerate() {
            if n.is_empty() {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &["jobs", name, "names", &i.to_string()],
                    "an empty VM name".to_string(),
                    "remove the empty string".to_string(),
                ));
            }
        }
        for (field, list) in [
            ("regexes", &job.regexes),
            ("exclude-regexes", &job.exclude_regexes),
        ] {
            for r in list {
                self.check_regex(r, &["jobs", name, field])?;
            }
        }
        for (i, rule) in job.rules.iter().enumerate() {
            let idx = i.to_string();
            let rk = ["jobs", name, "rule", idx.as_str()];
            let set = [
                rule.name.is_some(),
                rule.regex.is_some(),
                rule.tag.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                return Err(self.err(
                    ErrorKind::BadValue,
                    &rk,
                    format!("a rule must have exactly one of name, regex, tag (it has {set})"),
                    "write one [[jobs.NAME.rule]] per name, regex or tag".to_string(),
                ));
            }
            if let Some(r) = &rule.regex
                && job.naubackup_cfg.is_none()
            {
                self.check_regex(r, &["jobs", name, "rule", idx.as_str(), "regex"])?;
            }
            if let Some(k) = rule.keep_last {
                self.check_keep(k, &["jobs", name, "rule", idx.as_str(), "keep-last"])?;
            }
            let mode = rule.mode.unwrap_or(job.mode);
            let disks = rule.disks.unwrap_or(job.disks);
            self.check_mode(
                mode,
                disks,
                job.compression,
                &["jobs", name, "rule", idx.as_str()],
            )?;
        }
        for (vm, o) in &job.vm_overrides {
            if let Some(k) = o.keep_last {
                self.check_keep(k, &["jobs", name, "vm", vm, "keep-last"])?;
            }
            let mode = o.mode.unwrap_or(job.mode);
            let disks = o.disks.unwrap_or(job.disks);
            self.check_mode(mode, disks, job.compression, &["jobs", name, "vm", vm])?;
        }

        // Export and limits.
        self.check_mode(job.mode, job.disks, job.compression, &["jobs", name])?;
        self.check_job_repository(name, job, targets.get(&job.target))?;
        if let Some(m) = &job.pool_metadata {
            self.check_keep(m.keep_last, &["jobs", name, "pool-metadata", "keep-last"])?;
        }
        if let Some(m) = &job.host_backup {
            self.check_keep(m.keep_last, &["jobs", name, "host-backup", "keep-last"])?;
        }
        if job.concurrency == 0 {
            return Err(self.err(
                ErrorKind::BadValue,
                &jk("concurrency"),
                "concurrency is 0: nothing would run".to_string(),
                "write concurrency = 1 or more (default 2)".to_string(),
            ));
        }
        if job.per_host_limit == Some(0) {
            return Err(self.err(
                ErrorKind::BadValue,
                &jk("per-host-limit"),
                "per-host-limit is 0: nothing would run".to_string(),
                "write 1 or more, or remove it for no limit".to_string(),
            ));
        }
        if job.sr_usage_threshold == 0 || job.sr_usage_threshold > 100 {
            return Err(self.err(
                ErrorKind::BadValue,
                &jk("sr-usage-threshold"),
                format!(
                    "{} is not a percentage between 1 and 100",
                    job.sr_usage_threshold
                ),
                "write e.g. sr-usage-threshold = 80".to_string(),
            ));
        }
        if job.log_retention_days == 0 {
            return Err(self.err(
                ErrorKind::BadValue,
                &jk("log-retention-days"),
                "log-retention-days is 0: every log would be removed at once".to_string(),
                "write 1 or more (default 15)".to_string(),
            ));
        }
        if let Some(log) = &job.status_log {
            job.status_log = Some(self.resolve(log));
        }
        Ok(nau_target)
    }

    fn check_regex(&self, pattern: &str, key: &[&str]) -> Result<(), ConfigError> {
        match Regex::new(&format!("^(?:{pattern})")) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(
                ErrorKind::BadRegex,
                key,
                format!("invalid regex `{pattern}`: {}", one_line(&e.to_string())),
                "fix the regex, or list the exact name under `names` instead".to_string(),
            )),
        }
    }

    fn check_keep(&self, keep: u32, key: &[&str]) -> Result<(), ConfigError> {
        if keep == 0 {
            return Err(self.err(
                ErrorKind::BadValue,
                key,
                "keep-last is 0: every backup would be deleted".to_string(),
                "write keep-last = 1 or more".to_string(),
            ));
        }
        Ok(())
    }

    fn check_mode(
        &self,
        mode: ExportMode,
        disks: DiskSelection,
        compression: Compression,
        key: &[&str],
    ) -> Result<(), ConfigError> {
        let with = |last: &'static str| {
            let mut k = key.to_vec();
            k.push(last);
            k
        };
        if disks == DiskSelection::Boot && !mode.is_disks() {
            return Err(self.err(
                ErrorKind::BadValue,
                &with("disks"),
                "disks = \"boot\" needs a per-disk mode, but the mode is xva".to_string(),
                "set mode = \"vhd\" or \"raw\", or remove disks = \"boot\"".to_string(),
            ));
        }
        if compression.is_host() && mode != ExportMode::Xva {
            return Err(self.err(
                ErrorKind::BadValue,
                &with("compression"),
                format!(
                    "compression = \"{}\" is only possible for mode = \"xva\" (mode here: {mode})",
                    compression.as_str()
                ),
                "use compression = \"zstd\" (done by xenvault) for per-disk modes".to_string(),
            ));
        }
        Ok(())
    }
}

fn reference_fix(table: &str, name: &str, known: &[&str]) -> String {
    match closest(name, known.iter().copied()) {
        Some(s) => format!("did you mean {s:?}? (defined: {})", known.join(", ")),
        None if known.is_empty() => format!("define it as [{table}.{name}]"),
        None => format!(
            "define it as [{table}.{name}] or use one of: {}",
            known.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_settings_map_every_field() {
        let email = EmailConfig {
            server: "smtp.example".into(),
            port: None,
            security: xenvault_types::config::SmtpSecurity::None,
            user: Some("u".into()),
            password_file: None,
            password_env: None,
            from: "a@b".into(),
            to: vec!["c@d".into()],
            retries: 5,
            password: Some(xenvault_types::config::Secret::new("pw")),
        };
        let s = email_settings(&email);
        assert_eq!(s.server, "smtp.example");
        assert_eq!(s.port, None);
        assert_eq!(s.security, crate::report::email::SmtpSecurity::Plain);
        assert_eq!(s.username.as_deref(), Some("u"));
        assert_eq!(s.password.as_deref(), Some("pw"));
        assert_eq!(s.from, "a@b");
        assert_eq!(s.to, vec!["c@d"]);
        assert_eq!(s.attempts, 5);
    }

    #[test]
    fn closest_words() {
        assert_eq!(closest("targte", ["target", "pools"]), Some("target"));
        assert_eq!(closest("zzz", ["target", "pools"]), None);
        assert_eq!(
            closest("Wendesday", ["wednesday", "monday"]),
            Some("wednesday")
        );
    }

    #[test]
    fn display_is_one_line() {
        let e = ConfigError::new(
            ErrorKind::BadValue,
            Path::new("/etc/x.toml"),
            Some(3),
            Some("jobs.a.target".into()),
            "bad\nthing".into(),
            "fix it".into(),
        );
        assert_eq!(
            e.to_string(),
            "/etc/x.toml:3: jobs.a.target: bad thing; fix it"
        );
    }
}
