//! Configuration data types: pools, targets, jobs and their selection rules,
//! as written in xenvault's TOML file (no I/O here; loading, validation and
//! secrets live in `xenvault_engine::config`).
//!
//! Every table denies unknown keys and uses kebab-case names. Every field has
//! a sensible default unless it names something only the operator knows (a
//! pool's URL, a target's path). The file looks like this:
//!
//! ```toml
//! [pools.prod]
//! url = "https://xcp-pool.example"
//! password-file = "/etc/xenvault/prod.password"
//! fingerprint = "sha256:5f0c…"
//!
//! [targets.nas]
//! path = "/mnt/backups"
//!
//! [jobs.nightly]
//! pools = ["prod"]
//! target = "nas"
//! regexes = ["web-"]
//! exclude-names = ["web-test"]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// Default number of complete backups kept per VM.
pub const DEFAULT_KEEP_LAST: u32 = 7;
/// Default number of VMs backed up at the same time.
pub const DEFAULT_CONCURRENCY: u32 = 2;
/// Default number of NBD connections per disk (repository targets).
pub const DEFAULT_NBD_CONNECTIONS: u32 = 4;
/// Default number of disks of one VM read at the same time.
pub const DEFAULT_DISK_CONCURRENCY: u32 = 2;
/// Default SR usage (percent) above which a VM is skipped.
pub const DEFAULT_SR_USAGE_THRESHOLD: u8 = 80;
/// Default age (days) after which run logs are removed.
pub const DEFAULT_LOG_RETENTION_DAYS: u32 = 15;
/// Default number of attempts to send the report email.
pub const DEFAULT_EMAIL_RETRIES: u32 = 3;

/// A secret (a password): never shown by `Debug` or `Display`, never serialized.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself: only to hand it to the code that needs it (a login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where xenvault keeps its own state (the journal of temporary objects,
    /// run locks). Default: `$XENVAULT_STATE_DIR`, else `/var/lib/xenvault`
    /// for root, else `~/.local/state/xenvault`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// XAPI pools, by name (`[pools.NAME]`).
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// Backup targets, by name (`[targets.NAME]`).
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Backup jobs, by name (`[jobs.NAME]`).
    #[serde(default)]
    pub jobs: BTreeMap<String, JobConfig>,
    /// How reports are mailed (`[email]`); no email when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailConfig>,
}

impl Config {
    /// The job with this name.
    pub fn job(&self, name: &str) -> Option<&JobConfig> {
        self.jobs.get(name)
    }

    /// The pool with this name.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.get(name)
    }

    /// The target with this name.
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.get(name)
    }

    /// Copies every table's key into its `name` field (done by the loader).
    pub fn fill_names(&mut self) {
        for (name, pool) in &mut self.pools {
            pool.name.clone_from(name);
        }
        for (name, target) in &mut self.targets {
            target.name.clone_from(name);
        }
        for (name, job) in &mut self.jobs {
            job.name.clone_from(name);
        }
    }
}

/// A XAPI pool (`[pools.NAME]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolConfig {
    /// The pool's name: the table key (filled by the loader).
    #[serde(skip)]
    pub name: String,
    /// The coordinator's URL, e.g. `https://xcp-pool.example` (a member's URL works too:
    /// xenvault follows the redirect to the coordinator).
    pub url: String,
    /// The XAPI user. Default `root`.
    #[serde(default = "default_user")]
    pub user: String,
    /// A file holding the password (first line; must not be readable by group or others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The pinned SHA-256 fingerprint of the pool's TLS certificate
    /// (`xenvault trust URL` prints it). Without it (and without
    /// `insecure-skip-verify`) the certificate must chain to the system's CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Accept ANY certificate: anyone on the network path can read the
    /// password and the backups. For tests only; xenvault warns on every run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_verify: bool,
    /// The password, read by the loader from `password-file` or `password-env`.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// What kind of target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// Plain files: `<path>/<vm-name>/<timestamp>/`, readable by `xe vm-import`.
    #[default]
    Archive,
    /// xenvault's deduplicating repository (`docs/repo-format.md`): a local
    /// directory (`path`), S3 (`url = "s3://bucket/prefix"`) or SFTP
    /// (`url = "sftp://user@host:port/dir"`).
    Repository,
}

/// A place backups go to (`[targets.NAME]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TargetConfig {
    /// The target's name: the table key (filled by the loader).
    #[serde(skip)]
    pub name: String,
    /// `archive` (the default) or `repository`.
    #[serde(default, rename = "type")]
    pub kind: TargetKind,
    /// The directory (absolute, or relative to the configuration file). A
    /// repository has either `path` (a local directory) or `url`.
    #[serde(default)]
    pub path: PathBuf,
    /// A repository kept remotely: `s3://bucket/prefix` or
    /// `sftp://user@host[:port]/dir`. Repository targets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the repository password (first line; `chmod 600`).
    /// Repository targets only; an encrypted repository needs it (or
    /// `password-env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the repository password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The repository password, read by the loader from `password-file` or
    /// `password-env`.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// S3 settings (`[targets.NAME.s3]`), for `s3://` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
    /// SFTP settings (`[targets.NAME.sftp]`), for `sftp://` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp: Option<SftpConfig>,
    /// Free space (bytes) every run must leave on the target: a VM whose
    /// estimated size does not fit in `free - reserved-space` is skipped
    /// ("target full"). Accepts `"10G"`, `"512M"`, `"1T"` (binary units) or a
    /// number of bytes. Default 0.
    #[serde(default, deserialize_with = "size", skip_serializing_if = "is_zero")]
    pub reserved_space: u64,
}

impl TargetConfig {
    /// An archive target at `path` with every default.
    pub fn archive(name: &str, path: impl Into<PathBuf>) -> TargetConfig {
        TargetConfig {
            name: name.to_string(),
            kind: TargetKind::Archive,
            path: path.into(),
            url: None,
            reserved_space: 0,
            password_file: None,
            password_env: None,
            password: None,
            s3: None,
            sftp: None,
        }
    }
}

/// S3 settings of a repository target (`[targets.NAME.s3]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct S3Config {
    /// The endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or
    /// `http://127.0.0.1:9000` (default: AWS for the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region (default `us-east-1`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Address buckets as `bucket.endpoint` (virtual-host style) instead of
    /// `endpoint/bucket` (path style, the default: what MinIO and most
    /// self-hosted servers want).
    #[serde(default, skip_serializing_if = "is_false")]
    pub virtual_host_style: bool,
    /// The access key id (default: the environment / instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// A file holding the secret access key (first line; `chmod 600`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// An environment variable holding the secret access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_env: Option<String>,
    /// The secret access key, read by the loader.
    #[serde(skip)]
    pub secret_access_key: Option<Secret>,
}

/// SFTP settings of a repository target (`[targets.NAME.sftp]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SftpConfig {
    /// The private key used to log in (key authentication only).
    pub key_file: PathBuf,
    /// A `known_hosts` file holding the server's key (default: the user's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts_file: Option<PathBuf>,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// How a repository job finds what changed since the last backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CbtMode {
    /// Use changed block tracking where a disk has it on (the default);
    /// otherwise a VHD differencing export against the kept base snapshot.
    #[default]
    Use,
    /// Turn CBT on for the job's disks that lack it (`VDI.enable_cbt`), then use it.
    Enable,
    /// Never use CBT: differencing VHD exports against the kept base snapshot.
    Off,
}

/// What a repository job keeps on the pool as the base of the next incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseKeeping {
    /// Keep the last backed-up snapshot with its data (the default): the VHD
    /// differencing fallback can use it.
    #[default]
    Snapshot,
    /// Reduce it to CBT metadata (`VDI.data_destroy`): no SR space used, but
    /// only CBT can take the next incremental.
    Metadata,
}

/// A VM's power state, as a selection filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// Running.
    Running,
    /// Halted.
    Halted,
    /// Suspended.
    Suspended,
    /// Paused.
    Paused,
}

impl PowerState {
    /// The lowercase name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Halted => "halted",
            PowerState::Suspended => "suspended",
            PowerState::Paused => "paused",
        }
    }

    /// Parses XAPI's spelling (`Running`, `Halted`, …) or ours, any case.
    pub fn parse(text: &str) -> Option<PowerState> {
        match text.to_ascii_lowercase().as_str() {
            "running" => Some(PowerState::Running),
            "halted" => Some(PowerState::Halted),
            "suspended" => Some(PowerState::Suspended),
            "paused" => Some(PowerState::Paused),
            _ => None,
        }
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a VM is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportMode {
    /// The whole VM as one `.xva` (`xe vm-import` reads it). NAUbackup's `vm-export`.
    #[default]
    Xva,
    /// Each disk as a `.vhd` file. NAUbackup's `vdi-export` with `vdi_export_format=vhd`.
    Vhd,
    /// Each disk as a `.raw` image. NAUbackup's `vdi-export` with `vdi_export_format=raw`.
    Raw,
}

impl ExportMode {
    /// True for the per-disk modes.
    pub fn is_disks(self) -> bool {
        matches!(self, ExportMode::Vhd | ExportMode::Raw)
    }

    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportMode::Xva => "xva",
            ExportMode::Vhd => "vhd",
            ExportMode::Raw => "raw",
        }
    }
}

impl fmt::Display for ExportMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which disks of a VM a per-disk export takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSelection {
    /// Every disk (VBD of type Disk) of the VM.
    #[default]
    All,
    /// Only the boot disk (the bootable VBD, else device 0 — NAUbackup's `xvda`).
    Boot,
}

impl DiskSelection {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskSelection::All => "all",
            DiskSelection::Boot => "boot",
        }
    }
}

/// Compression of what is written to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// None: files `xe vm-import` / `xe vdi-import` read directly.
    #[default]
    None,
    /// zstd, done by xenvault (files end in `.zst`).
    Zstd,
    /// gzip done by the host (`use_compression=true` on `/export`; XVA only).
    HostGzip,
    /// zstd done by the host (`use_compression=zstd` on `/export`; XVA only).
    HostZstd,
}

impl Compression {
    /// True when the host compresses (only `/export`, i.e. XVA, can).
    pub fn is_host(self) -> bool {
        matches!(self, Compression::HostGzip | Compression::HostZstd)
    }

    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::HostGzip => "host-gzip",
            Compression::HostZstd => "host-zstd",
        }
    }
}

/// How many backups to keep (`[jobs.NAME.retention]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionConfig {
    /// Keep the last N complete backups of each VM (default 7). Failed or
    /// partial backups never count.
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// Also keep the newest backup of each of the last N hours that have one
    /// (repository targets). Default 0.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub keep_hourly: u32,
    /// ... of each of the last N days (repository targets). Default 0.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub keep_daily: u32,
    /// ... of each of the last N ISO weeks (repository targets). Default 0.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub keep_weekly: u32,
    /// ... of each of the last N months (repository targets). Default 0.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub keep_monthly: u32,
    /// ... of each of the last N years (repository targets). Default 0.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub keep_yearly: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_last: DEFAULT_KEEP_LAST,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
        }
    }
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// Pool metadata (`/pool/xmldbdump`) or host (`/host_backup`) backups of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExtraBackupConfig {
    /// Keep the last N of them (default 7).
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
}

impl Default for ExtraBackupConfig {
    fn default() -> Self {
        ExtraBackupConfig {
            keep_last: DEFAULT_KEEP_LAST,
        }
    }
}

/// One include rule with its own settings (`[[jobs.NAME.rule]]`). Exactly one
/// of `name`, `regex`, `tag` is set. When several rules select a VM, the LAST
/// one in the file decides its settings (the job's settings fill what it leaves
/// out) — NAUbackup's "last definition wins".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SelectRule {
    /// A VM name, compared literally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A regex matched at the start of the VM name (`web` matches `web01`;
    /// end it with `$` for an exact match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// A XAPI tag the VM carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Keep this many backups of the VMs of this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Export mode for the VMs of this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ExportMode>,
    /// Which disks, for the per-disk modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskSelection>,
    /// Where the rule came from, for messages (e.g. `nightly.cfg:12`); set by readers.
    #[serde(skip)]
    pub origin: Option<String>,
}

/// Settings for one VM, by name or UUID (`[jobs.NAME.vm."web01"]`). They win
/// over every rule and the job's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmOverride {
    /// Keep this many backups of this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// This VM's calendar retention (repository targets): replaces the job's
    /// `keep-hourly` … `keep-yearly` (and `keep-last` when set here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionConfig>,
    /// Export mode for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ExportMode>,
    /// Which disks, for the per-disk modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskSelection>,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    /// Monday.
    Monday,
    /// Tuesday.
    Tuesday,
    /// Wednesday.
    Wednesday,
    /// Thursday.
    Thursday,
    /// Friday.
    Friday,
    /// Saturday.
    Saturday,
    /// Sunday.
    Sunday,
}

impl Weekday {
    /// All days, Monday first.
    pub const ALL: [Weekday; 7] = [
        Weekday::Monday,
        Weekday::Tuesday,
        Weekday::Wednesday,
        Weekday::Thursday,
        Weekday::Friday,
        Weekday::Saturday,
        Weekday::Sunday,
    ];

    /// The English name, capitalised.
    pub fn name(self) -> &'static str {
        match self {
            Weekday::Monday => "Monday",
            Weekday::Tuesday => "Tuesday",
            Weekday::Wednesday => "Wednesday",
            Weekday::Thursday => "Thursday",
            Weekday::Friday => "Friday",
            Weekday::Saturday => "Saturday",
            Weekday::Sunday => "Sunday",
        }
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<time::Weekday> for Weekday {
    fn from(day: time::Weekday) -> Self {
        match day {
            time::Weekday::Monday => Weekday::Monday,
            time::Weekday::Tuesday => Weekday::Tuesday,
            time::Weekday::Wednesday => Weekday::Wednesday,
            time::Weekday::Thursday => Weekday::Thursday,
            time::Weekday::Friday => Weekday::Friday,
            time::Weekday::Saturday => Weekday::Saturday,
            time::Weekday::Sunday => Weekday::Sunday,
        }
    }
}

/// One line of a weekday file: these days, these VM names or `*` patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeekdayEntry {
    /// The days the line names.
    pub days: Vec<Weekday>,
    /// VM names; `*` in a name stands for any text (`db-*`).
    pub vms: Vec<String>,
    /// The line number (1-based) in the file.
    pub line: usize,
}

/// A parsed weekday file: which VMs are backed up on which day.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WeekdaySchedule {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its lines, in order.
    pub entries: Vec<WeekdayEntry>,
}

/// A backup job (`[jobs.NAME]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobConfig {
    /// The job's name: the table key (filled by the loader).
    #[serde(skip)]
    pub name: String,
    /// The pools whose VMs the job backs up (`pools = ["a", "b"]` or `pool = "a"`).
    #[serde(alias = "pool", deserialize_with = "one_or_many")]
    pub pools: Vec<String>,
    /// The target name (may be left out with `naubackup-cfg`: its `backup_dir` is then the target).
    #[serde(default)]
    pub target: String,
    /// Read this NAUbackup `.cfg` file, unchanged (absolute, or relative to the
    /// configuration file): its `vm-export`, `vdi-export`, `exclude`,
    /// `max_backups`, `backup_dir`, `status_log`, `pool_db_backup`,
    /// `vdi_export_format` and `pre_clean` lines replace the job's selection
    /// and those settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub naubackup_cfg: Option<PathBuf>,

    // --- selection: a VM is chosen when any include rule selects it, then
    // --- the filters and excludes may drop it.
    /// Select every VM of the pools (then filtered and excluded).
    #[serde(default, skip_serializing_if = "is_false")]
    pub all_vms: bool,
    /// VM names, compared literally.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Regexes matched at the START of VM names (`web` matches `web01`; add `$` to end).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regexes: Vec<String>,
    /// VMs carrying any of these XAPI tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Include rules with their own retention or export settings.
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SelectRule>,
    /// A weekday file (absolute, or relative to the configuration file): the
    /// VMs it lists for today are included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekday_file: Option<PathBuf>,
    /// Only VMs in these power states (default: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub power_states: Vec<PowerState>,
    /// Never these VM names (applied last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_names: Vec<String>,
    /// Never VMs whose name starts with a match of these regexes (applied last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_regexes: Vec<String>,
    /// Never VMs carrying any of these tags (applied last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_tags: Vec<String>,
    /// Settings for single VMs, by name or UUID.
    #[serde(default, rename = "vm", skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_overrides: BTreeMap<String, VmOverride>,

    // --- what to export and how
    /// `xva` (whole VM, default), `vhd` or `raw` (per disk).
    #[serde(default)]
    pub mode: ExportMode,
    /// `all` disks (default) or the `boot` disk only (per-disk modes).
    #[serde(default)]
    pub disks: DiskSelection,
    /// `none` (default), `zstd` (by xenvault), `host-gzip` or `host-zstd` (by the host, XVA only).
    #[serde(default)]
    pub compression: Compression,
    /// VMs backed up at the same time (default 2).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// At most this many VMs at the same time on one host (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_host_limit: Option<u32>,
    /// Skip a VM when an SR holding its disks is used above this percentage (default 80).
    #[serde(default = "default_sr_usage_threshold")]
    pub sr_usage_threshold: u8,

    // --- repository targets: incremental backups
    /// How changed blocks are found: `use` (default), `enable`, `off`.
    #[serde(default)]
    pub cbt: CbtMode,
    /// What stays on the pool as the next incremental's base: `snapshot`
    /// (default) or `metadata` (`VDI.data_destroy`).
    #[serde(default)]
    pub base: BaseKeeping,
    /// NBD connections per disk (default 4).
    #[serde(default = "default_nbd_connections")]
    pub nbd_connections: u32,
    /// Disks of one VM read at the same time (default 2).
    #[serde(default = "default_disk_concurrency")]
    pub disk_concurrency: u32,

    // --- what to keep
    /// Retention of VM backups.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Remove the oldest backups down to the retention BEFORE a VM's backup,
    /// to make room (NAUbackup's `pre_clean`). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pre_clean: bool,
    /// Back up the pool database (`/pool/xmldbdump`) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_metadata: Option<ExtraBackupConfig>,
    /// Back up every host's dom0 (`/host_backup`) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_backup: Option<ExtraBackupConfig>,

    // --- reports
    /// Remove run logs older than this many days (default 15).
    #[serde(default = "default_log_retention_days")]
    pub log_retention_days: u32,
    /// Also append NAUbackup-style lines to this status log (NAUbackup's `status_log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_log: Option<PathBuf>,
    /// Mail the report (when `[email]` is configured). Default true.
    #[serde(default = "default_true")]
    pub email: bool,

    /// The weekday file, parsed by the loader.
    #[serde(skip)]
    pub weekday_schedule: Option<WeekdaySchedule>,
}

impl JobConfig {
    /// A job with every default: no selection yet.
    pub fn new(name: &str, pools: Vec<String>, target: &str) -> JobConfig {
        JobConfig {
            name: name.to_string(),
            pools,
            target: target.to_string(),
            naubackup_cfg: None,
            all_vms: false,
            names: Vec::new(),
            regexes: Vec::new(),
            tags: Vec::new(),
            rules: Vec::new(),
            weekday_file: None,
            power_states: Vec::new(),
            exclude_names: Vec::new(),
            exclude_regexes: Vec::new(),
            exclude_tags: Vec::new(),
            vm_overrides: BTreeMap::new(),
            mode: ExportMode::default(),
            disks: DiskSelection::default(),
            compression: Compression::default(),
            concurrency: DEFAULT_CONCURRENCY,
            per_host_limit: None,
            sr_usage_threshold: DEFAULT_SR_USAGE_THRESHOLD,
            cbt: CbtMode::default(),
            base: BaseKeeping::default(),
            nbd_connections: DEFAULT_NBD_CONNECTIONS,
            disk_concurrency: DEFAULT_DISK_CONCURRENCY,
            retention: RetentionConfig::default(),
            pre_clean: false,
            pool_metadata: None,
            host_backup: None,
            log_retention_days: DEFAULT_LOG_RETENTION_DAYS,
            status_log: None,
            email: true,
            weekday_schedule: None,
        }
    }

    /// True when the job has at least one include rule.
    pub fn has_include_rule(&self) -> bool {
        self.all_vms
            || !self.names.is_empty()
            || !self.regexes.is_empty()
            || !self.tags.is_empty()
            || !self.rules.is_empty()
            || self.weekday_file.is_some()
            || self.weekday_schedule.is_some()
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (port 587). The default.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption (port 25; only on a trusted network or 127.0.0.1).
    None,
}

impl SmtpSecurity {
    /// The usual port for this security.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::None => 25,
        }
    }
}

/// Email settings (`[email]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmailConfig {
    /// The SMTP server's host name.
    pub server: String,
    /// Its port (default: 587 for STARTTLS, 465 for TLS, 25 for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub security: SmtpSecurity,
    /// The login user (no login when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A file holding the login password (must not be readable by group or others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the login password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The sender address.
    pub from: String,
    /// The recipients (`to = "a@x"` or `to = ["a@x", "b@x"]`).
    #[serde(deserialize_with = "one_or_many")]
    pub to: Vec<String>,
    /// Attempts to send before giving up (default 3).
    #[serde(default = "default_email_retries")]
    pub retries: u32,
    /// The password, read by the loader.
    #[serde(skip)]
    pub password: Option<Secret>,
}

impl EmailConfig {
    /// The port in force.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(self.security.default_port())
    }
}

fn default_user() -> String {
    "root".to_string()
}
fn default_keep_last() -> u32 {
    DEFAULT_KEEP_LAST
}
fn default_nbd_connections() -> u32 {
    DEFAULT_NBD_CONNECTIONS
}
fn default_disk_concurrency() -> u32 {
    DEFAULT_DISK_CONCURRENCY
}
fn default_concurrency() -> u32 {
    DEFAULT_CONCURRENCY
}
fn default_sr_usage_threshold() -> u8 {
    DEFAULT_SR_USAGE_THRESHOLD
}
fn default_log_retention_days() -> u32 {
    DEFAULT_LOG_RETENTION_DAYS
}
fn default_email_retries() -> u32 {
    DEFAULT_EMAIL_RETRIES
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Parses a size: a number of bytes, or a number with a binary unit
/// (`K`, `M`, `G`, `T`, `P`, optionally followed by `i`, `B` or `iB`; any case):
/// `"10G"` = 10 GiB, `"1.5T"`, `"512 MiB"`, `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => {
            return Err(format!(
                "{text:?} is not a size: use a number of bytes or e.g. \"512M\", \"10G\", \"1T\""
            ));
        }
    };
    let bad = || {
        format!("{text:?} is not a size: use a number of bytes or e.g. \"512M\", \"10G\", \"1T\"")
    };
    if number.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("{text:?} is too large"));
    }
    let f: f64 = number.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Accepts a size as an integer (bytes) or a string with a unit.
fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(
        untagged,
        expecting = "expected a size: a number of bytes or e.g. \"10G\""
    )]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(deserializer)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// Accepts `"x"` or `["x", "y"]`.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "expected a string or an array of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_never_shown() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
        let mut pool = PoolConfig {
            name: "p".into(),
            url: "https://x".into(),
            user: "root".into(),
            password_file: None,
            password_env: None,
            fingerprint: None,
            insecure_skip_verify: false,
            password: Some(s),
        };
        assert!(!format!("{pool:?}").contains("hunter2"));
        pool.name.clear();
        let json = serde_json::to_string(&pool).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1000T"), Ok(1000 << 40));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn weekday_from_time() {
        assert_eq!(Weekday::from(time::Weekday::Sunday), Weekday::Sunday);
        assert_eq!(Weekday::ALL.len(), 7);
    }

    #[test]
    fn job_defaults() {
        let job = JobConfig::new("j", vec!["p".into()], "t");
        assert_eq!(job.concurrency, 2);
        assert_eq!(job.sr_usage_threshold, 80);
        assert_eq!(job.retention.keep_last, 7);
        assert_eq!(job.log_retention_days, 15);
        assert!(!job.has_include_rule());
    }
}
