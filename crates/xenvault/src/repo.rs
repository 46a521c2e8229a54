//! `xenvault repo init`, and what every repository command shares: choosing
//! the repository (`--config F --target NAME`, or `--repo DIR`), its
//! password, opening it, and turning repository errors into one clear line
//! with the right exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use xenvault_engine::config::secrets;
use xenvault_repo::storage::Storage;
use xenvault_repo::{CipherKind, EncryptionInit, InitOptions, KdfParams, RepoError, Repository};
use xenvault_types::config::{Config, Secret, TargetConfig, TargetKind};

use crate::config_file::{config_path, load_config};
use crate::exit::{ExitCode, UsageError};

/// Which repository a command works on, and its password.
#[derive(Debug, Clone, Args)]
pub struct RepoSelect {
    /// A repository target of the configuration (`[targets.NAME]` with
    /// `type = "repository"`): local, S3 or SFTP, with its password.
    #[arg(long, value_name = "NAME", conflicts_with = "repo")]
    pub target: Option<String>,

    /// A repository in a local directory (no configuration needed).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,

    /// The configuration file (with --target; with --repo it is read only
    /// when given, for the jobs writing to that directory).
    /// [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The repository password: first line of this file (chmod 600).
    /// Overrides the target's password-file / password-env.
    #[arg(long, value_name = "FILE", conflicts_with = "password_env")]
    pub password_file: Option<PathBuf>,

    /// The repository password: this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
}

/// A new password (for `key add`, `key change`, `key import`).
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct NewPassword {
    /// The new key's password: first line of this file (chmod 600).
    #[arg(long, value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,

    /// The new key's password: this environment variable.
    #[arg(long, value_name = "VAR")]
    pub new_password_env: Option<String>,
}

impl NewPassword {
    /// Reads the password (usage error when it cannot be read).
    pub fn read(&self) -> anyhow::Result<Secret> {
        read_secret(
            self.new_password_file.as_deref(),
            self.new_password_env.as_deref(),
            "--new-password-file",
            "--new-password-env",
        )?
        .ok_or_else(|| {
            UsageError(
                "give the new password with --new-password-file or --new-password-env".into(),
            )
            .into()
        })
    }
}

fn read_secret(
    file: Option<&Path>,
    env: Option<&str>,
    file_flag: &str,
    env_flag: &str,
) -> anyhow::Result<Option<Secret>> {
    let found = match (file, env) {
        (Some(f), _) => Some(
            secrets::read_password_file(f)
                .map_err(|(p, fix)| UsageError(format!("{file_flag}: {p}; {fix}")))?,
        ),
        (None, Some(v)) => Some(
            secrets::read_password_env(v)
                .map_err(|(p, fix)| UsageError(format!("{env_flag}: {p}; {fix}")))?,
        ),
        (None, None) => None,
    };
    Ok(found)
}

/// The repository a command works on.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The target (for `--repo DIR`: a local repository target named after the directory).
    pub target: TargetConfig,
    /// How messages name it: `target NAME (WHERE)` or the directory.
    pub label: String,
    /// The configuration, when one was read.
    pub config: Option<Config>,
    /// True when the password came from the command line.
    pub password_from_cli: bool,
}

impl Chosen {
    /// Where the repository is: its directory or URL.
    pub fn location(&self) -> String {
        self.target
            .url
            .clone()
            .unwrap_or_else(|| self.target.path.display().to_string())
    }

    /// The hint added to password errors: where the password comes from.
    fn password_hint(&self) -> String {
        if self.password_from_cli {
            "check the password given with --password-file / --password-env".to_string()
        } else if self.target.password_file.is_some() || self.target.password_env.is_some() {
            format!(
                "check password-file / password-env of [targets.{}] (or give --password-file / --password-env)",
                self.target.name
            )
        } else {
            "give it with --password-file FILE or --password-env VAR (or password-file in the target)"
                .to_string()
        }
    }
}

/// A local repository target for `--repo DIR`.
pub fn local_target(dir: &Path) -> TargetConfig {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut t = TargetConfig::archive("--repo", dir);
    t.kind = TargetKind::Repository;
    t
}

/// Resolves `--target` / `--repo` and the password options.
pub fn choose(sel: &RepoSelect) -> anyhow::Result<Chosen> {
    let (mut target, config, label) = match (&sel.target, &sel.repo) {
        (Some(name), _) => {
            let config = load_config(sel.config.as_deref())?;
            let target = config.target(name).cloned().ok_or_else(|| {
                UsageError(format!(
                    "no target {name:?} in {}; repository targets: {}",
                    config_path(sel.config.as_deref()).display(),
                    repository_names(&config)
                ))
            })?;
            if target.kind != TargetKind::Repository {
                return Err(UsageError(format!(
                    "target {name} is an archive, not a repository; add type = \"repository\" to [targets.{name}] (repository targets: {})",
                    repository_names(&config)
                ))
                .into());
            }
            let label = format!(
                "target {name} ({})",
                target
                    .url
                    .clone()
                    .unwrap_or_else(|| target.path.display().to_string())
            );
            (target, Some(config), label)
        }
        (None, Some(dir)) => {
            let config = if sel.config.is_some() || std::env::var_os("XENVAULT_CONFIG").is_some() {
                Some(load_config(sel.config.as_deref())?)
            } else {
                None
            };
            let target = local_target(dir);
            let label = target.path.display().to_string();
            (target, config, label)
        }
        (None, None) => {
            return Err(UsageError(
                "say which repository: --target NAME (a repository target of the configuration) or --repo DIR"
                    .into(),
            )
            .into());
        }
    };
    let given = read_secret(
        sel.password_file.as_deref(),
        sel.password_env.as_deref(),
        "--password-file",
        "--password-env",
    )?;
    let password_from_cli = given.is_some();
    if given.is_some() {
        target.password = given;
    }
    Ok(Chosen {
        target,
        label,
        config,
        password_from_cli,
    })
}

fn repository_names(config: &Config) -> String {
    let names: Vec<&str> = config
        .targets
        .values()
        .filter(|t| t.kind == TargetKind::Repository)
        .map(|t| t.name.as_str())
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Opens the chosen repository (usage error when it is not there or the
/// password is wrong).
pub async fn open(chosen: &Chosen) -> anyhow::Result<Repository> {
    if chosen.target.url.is_none() && !chosen.target.path.is_dir() {
        return Err(UsageError(format!(
            "{}: no such directory; create a repository with `xenvault repo init`",
            chosen.label
        ))
        .into());
    }
    xenvault_engine::repository::open_repository(&chosen.target)
        .await
        .map_err(|e| repo_error(chosen, e))
}

/// One line naming the repository, the problem and the fix; exit code 2
/// for what the user can fix by choosing differently (password, location,
/// key slot), 1 for damage and failures.
pub fn repo_error(chosen: &Chosen, e: RepoError) -> anyhow::Error {
    let label = &chosen.label;
    match &e {
        RepoError::WrongPassword { .. } | RepoError::PasswordRequired => {
            UsageError(format!("{label}: {e}; {}", chosen.password_hint())).into()
        }
        RepoError::NotARepository
        | RepoError::AlreadyInitialized
        | RepoError::UnsupportedVersion { .. }
        | RepoError::NotEncrypted(_)
        | RepoError::LastKey(_)
        | RepoError::NoSuchKey(_)
        | RepoError::Invalid { .. }
        | RepoError::NotFound(_) => UsageError(format!("{label}: {e}")).into(),
        _ => anyhow::anyhow!("{label}: {e}"),
    }
}

/// `xenvault repo …`.
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a repository (plain, or encrypted with --encrypt).
    #[command(
        after_help = "The password of an encrypted repository comes from the target's password-file or\npassword-env, or from --password-file / --password-env. Refuses a location that\nalready holds a repository (or, for a directory, anything else).\nExit codes: 0 created, 1 failed, 2 bad usage (existing repository, no password).\n\nExamples:\n  xenvault repo init --config /etc/xenvault/xenvault.toml --target local --encrypt\n  xenvault repo init --repo /srv/xenvault-repo --encrypt --password-file /root/repo.pw\n  xenvault repo init --repo /srv/plain-repo --chunk-size 2M"
    )]
    Init(InitArgs),

    /// Manage the keys of an encrypted repository (same as `xenvault key`).
    #[command(subcommand)]
    Key(crate::key::KeyCommand),
}

/// Options of `xenvault repo init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub select: RepoSelect,

    /// Encrypt: a random master key wrapped by an Argon2id key of the password,
    /// keyed BLAKE3 chunk ids, AES-256-GCM per blob.
    #[arg(long)]
    pub encrypt: bool,

    /// Chunk size: 1M (the default, see docs/design/0005), or 256K, 512K,
    /// 2M, 4M. Fixed for the repository's life.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = crate::cli::parse_size)]
    pub chunk_size: u64,

    /// The first key slot's label.
    #[arg(long, default_value = "initial", requires = "encrypt")]
    pub label: String,
}

/// Runs `xenvault repo …`.
pub async fn run(command: RepoCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        RepoCommand::Init(args) => init(args, json).await,
        RepoCommand::Key(k) => crate::key::run(k, json).await,
    }
}

async fn init(args: InitArgs, json: bool) -> anyhow::Result<ExitCode> {
    let chosen = choose(&args.select)?;
    let chunk_size = u32::try_from(args.chunk_size).unwrap_or(u32::MAX);
    xenvault_repo::manifest::validate_chunk_size(chunk_size)
        .map_err(|e| UsageError(format!("--chunk-size {}: {e}", args.chunk_size)))?;
    let encryption = match (&chosen.target.password, args.encrypt) {
        (Some(pw), true) => Some(EncryptionInit {
            password: pw.expose().as_bytes().to_vec(),
            label: args.label.clone(),
            cipher: CipherKind::Aes256Gcm,
            kdf: KdfParams::default(),
        }),
        (None, true) => {
            return Err(UsageError(format!(
                "{}: --encrypt needs a password; {}",
                chosen.label,
                chosen.password_hint()
            ))
            .into());
        }
        (Some(_), false) => {
            return Err(UsageError(format!(
                "{}: a password is configured but --encrypt is not given; add --encrypt for an encrypted repository, or remove the password for a plain one",
                chosen.label
            ))
            .into());
        }
        (None, false) => None,
    };
    if chosen.target.url.is_none() {
        refuse_foreign_directory(&chosen)?;
    }
    let storage: Arc<dyn Storage> = xenvault_engine::repository::open_storage(&chosen.target)
        .await
        .map_err(|e| repo_error(&chosen, e))?;
    let repo = Repository::init(
        storage,
        InitOptions {
            chunk_size,
            encryption,
            ..InitOptions::default()
        },
    )
    .await
    .map_err(|e| repo_error(&chosen, e))?;
    let keys = if repo.is_encrypted() {
        repo.list_keys().await.map_err(|e| repo_error(&chosen, e))?
    } else {
        Vec::new()
    };
    if json {
        let doc = serde_json::json!({
            "id": repo.config().id,
            "location": chosen.location(),
            "encrypted": repo.is_encrypted(),
            "chunk_size": repo.chunk_size(),
            "key_slots": keys.iter().map(|k| serde_json::json!({"id": k.id, "label": k.label})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "Created {} repository {} at {} (chunks of {} MiB)",
            if repo.is_encrypted() {
                "an encrypted (AES-256-GCM)"
            } else {
                "a plain"
            },
            repo.config().id,
            chosen.location(),
            repo.chunk_size() >> 20
        );
        for k in &keys {
            println!("  key slot {} \"{}\"", k.id, k.label);
            println!(
                "  Keep the password safe, and a copy of the key slot elsewhere: xenvault key export {} --output FILE",
                k.id
            );
        }
    }
    Ok(ExitCode::Success)
}

/// Refuses a directory holding anything but a repository (which `init`
/// itself refuses): a typo must not scatter objects into an archive.
fn refuse_foreign_directory(chosen: &Chosen) -> anyhow::Result<()> {
    let dir = &chosen.target.path;
    let Ok(mut entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    if dir.join("config").exists() {
        return Ok(()); // Repository::init says "already exists".
    }
    if entries.next().is_some() {
        return Err(UsageError(format!(
            "{}: the directory is not empty and holds no repository; choose an empty or new directory",
            chosen.label
        ))
        .into());
    }
    Ok(())
}

/// Where `list` and `restore` read backups from.
#[derive(Debug)]
pub enum Backups {
    /// An archive directory.
    Archive(PathBuf),
    /// A repository.
    Repository(Box<Chosen>),
}

/// How `list` and `restore` name where the backups are.
#[derive(Debug, Clone, Copy)]
pub struct BackupsWanted<'a> {
    /// A job: its target.
    pub job: Option<&'a str>,
    /// `--target`: a directory (archive, or a local repository), or a target's name.
    pub target: Option<&'a Path>,
    /// `--repo DIR`.
    pub repo: Option<&'a Path>,
    /// `--password-file`.
    pub password_file: Option<&'a Path>,
    /// `--password-env`.
    pub password_env: Option<&'a str>,
}

impl BackupsWanted<'_> {
    /// True when `--target` names a target of the configuration rather than
    /// a directory: no `/`, not `.`/`..`, and no such directory here.
    pub fn target_is_name(&self) -> bool {
        self.target.is_some_and(|t| {
            let s = t.to_string_lossy();
            !s.contains('/') && s != "." && s != ".." && !t.is_dir()
        })
    }

    /// True when the configuration must be read to find the backups.
    pub fn needs_config(&self) -> bool {
        self.repo.is_none() && (self.target.is_none() || self.target_is_name())
    }
}

/// True when `dir` holds a repository (its `config` object names the format).
pub fn is_repository_dir(dir: &Path) -> bool {
    std::fs::read(dir.join("config"))
        .is_ok_and(|b| String::from_utf8_lossy(&b).contains("\"xenvault-repository\""))
}

/// Resolves where the backups are: `--repo`, `--target` (directory or
/// name), else the job's target.
pub fn locate(wanted: BackupsWanted<'_>, config: Option<&Config>) -> anyhow::Result<Backups> {
    let password = read_secret(
        wanted.password_file,
        wanted.password_env,
        "--password-file",
        "--password-env",
    )?;
    let repository = |mut target: TargetConfig, label: String| {
        let password_from_cli = password.is_some();
        if password.is_some() {
            target.password = password.clone();
        }
        Backups::Repository(Box::new(Chosen {
            target,
            label,
            config: config.cloned(),
            password_from_cli,
        }))
    };
    if let Some(dir) = wanted.repo {
        let t = local_target(dir);
        let label = t.path.display().to_string();
        return Ok(repository(t, label));
    }
    let named = |name: &str, what: &str| -> anyhow::Result<TargetConfig> {
        let config = config.ok_or_else(|| {
            UsageError(format!(
                "{what} {name:?} needs the configuration (--config FILE)"
            ))
        })?;
        config.target(name).cloned().ok_or_else(|| {
            UsageError(format!(
                "no target {name:?} in the configuration; targets: {} (a directory is written with a /, e.g. ./{name})",
                config.targets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
            .into()
        })
    };
    // A name the configuration defines wins over a directory of that name here.
    let defined = wanted.target.is_some_and(|t| {
        let s = t.to_string_lossy();
        !s.contains('/') && config.is_some_and(|c| c.target(&s).is_some())
    });
    let target = match (wanted.target, wanted.job) {
        (Some(t), _) if !defined && !wanted.target_is_name() => {
            return Ok(if is_repository_dir(t) {
                let t = local_target(t);
                let label = t.path.display().to_string();
                repository(t, label)
            } else {
                Backups::Archive(t.to_path_buf())
            });
        }
        (Some(t), _) => named(&t.to_string_lossy(), "target")?,
        (None, Some(job)) => {
            let config =
                config.ok_or_else(|| UsageError("a JOB needs the configuration".into()))?;
            let job_cfg = config.job(job).ok_or_else(|| {
                UsageError(format!(
                    "no job {job:?} in the configuration; jobs: {}",
                    config.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            named(&job_cfg.target, "the job's target")?
        }
        (None, None) => {
            return Err(UsageError(
                "say where the backups are: a JOB, --target DIR|NAME or --repo DIR".into(),
            )
            .into());
        }
    };
    Ok(match target.kind {
        TargetKind::Archive => Backups::Archive(target.path.clone()),
        TargetKind::Repository => {
            let label = format!(
                "target {} ({})",
                target.name,
                target
                    .url
                    .clone()
                    .unwrap_or_else(|| target.path.display().to_string())
            );
            repository(target, label)
        }
    })
}
