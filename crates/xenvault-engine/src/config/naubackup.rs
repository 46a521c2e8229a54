//! NAUbackup (`VmBackup.py`) `.cfg` files, read unchanged, turned into a job's
//! selection rules and settings.
//!
//! NAUbackup's rules, as its README and `VmBackup.py` (3.x) define them:
//! - `key=value` lines; `#` lines are comments.
//! - `vm-export=X` backs up the whole VM (XVA); `vdi-export=X` only its first
//!   disk, in `vdi_export_format` (`raw` by default, or `vhd`).
//! - `X:N` keeps N backups of the VMs X selects instead of `max_backups`
//!   (default 4).
//! - X made only of letters, digits, spaces, `-` and `_` is a literal name;
//!   anything else is a Python regex matched at the START of the name
//!   (`re.match`). An invalid regex is an error.
//! - The last definition of a VM wins; a `vdi-export` wins over a `vm-export`
//!   wherever it is in the file; excludes are applied last.
//! - An empty `vm-export=` selects every VM (the empty regex matches all);
//!   empty `vdi-export=` and `exclude=` lines are ignored.
//!
//! Differences, on purpose: `pre_clean` (a command-line option of VmBackup.py)
//! is also read from the file; regexes use Rust's `regex` syntax (no
//! look-around or back-references: such a regex is reported as invalid);
//! a line with more than one `=` keeps everything after the first as the
//! value (VmBackup.py crashes on it).

use std::path::{Path, PathBuf};

use regex::Regex;
use xenvault_types::config::{DiskSelection, ExportMode, SelectRule};

use super::{ConfigError, ErrorKind, closest};

/// VmBackup.py's default `max_backups`.
pub const NAU_DEFAULT_MAX_BACKUPS: u32 = 4;
/// VmBackup.py's default `backup_dir`.
pub const NAU_DEFAULT_BACKUP_DIR: &str = "/snapshots/BACKUPS";

/// The keys a NAUbackup `.cfg` may hold.
pub const NAU_KEYS: &[&str] = &[
    "pool_db_backup",
    "max_backups",
    "backup_dir",
    "status_log",
    "vdi_export_format",
    "pre_clean",
    "vm-export",
    "vdi-export",
    "exclude",
];

/// What a NAUbackup `.cfg` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NauCfg {
    /// The file.
    pub path: PathBuf,
    /// `pool_db_backup=1`.
    pub pool_db_backup: bool,
    /// `max_backups=` (VmBackup.py's default 4 when absent).
    pub max_backups: u32,
    /// `backup_dir=` (VmBackup.py's default `/snapshots/BACKUPS` when absent).
    pub backup_dir: PathBuf,
    /// `status_log=`.
    pub status_log: Option<PathBuf>,
    /// `vdi_export_format=`: `Raw` (default) or `Vhd`.
    pub vdi_export_format: ExportMode,
    /// `pre_clean=true`.
    pub pre_clean: bool,
    /// The include rules: every `vm-export` (file order) then every
    /// `vdi-export` (file order), so that the last matching rule decides and a
    /// `vdi-export` always wins, as in VmBackup.py.
    pub rules: Vec<SelectRule>,
    /// `exclude=` literal names.
    pub exclude_names: Vec<String>,
    /// `exclude=` regexes.
    pub exclude_regexes: Vec<String>,
}

/// NAUbackup's test for a plain (non-regex) VM name: `^[\w\s\-_]+$`.
pub fn is_plain_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_alphanumeric() || c.is_whitespace() || c == '-' || c == '_')
}

/// Parses a `.cfg` file's text; `path` is used in messages and origins.
pub fn parse(text: &str, path: &Path) -> Result<NauCfg, ConfigError> {
    let err = |line: usize, key: &str, problem: String, fix: String| {
        ConfigError::new(
            ErrorKind::NauCfg,
            path,
            Some(line),
            Some(key.to_string()),
            problem,
            fix,
        )
    };
    let mut cfg = NauCfg {
        path: path.to_path_buf(),
        pool_db_backup: false,
        max_backups: NAU_DEFAULT_MAX_BACKUPS,
        backup_dir: PathBuf::from(NAU_DEFAULT_BACKUP_DIR),
        status_log: None,
        vdi_export_format: ExportMode::Raw,
        pre_clean: false,
        rules: Vec::new(),
        exclude_names: Vec::new(),
        exclude_regexes: Vec::new(),
    };
    let mut seen: Vec<(&str, usize)> = Vec::new();
    let mut vm_rules = Vec::new();
    let mut vdi_rules = Vec::new();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());

    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim().trim_start_matches('\u{feff}');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(err(
                line,
                trimmed,
                format!("{trimmed:?} is not a `key=value` line"),
                "write `key=value` (e.g. `vm-export=web01`) or start the line with # to make it a comment".to_string(),
            ));
        };
        let key = key.trim();
        let value = value.trim();
        let Some(known) = NAU_KEYS.iter().copied().find(|k| *k == key) else {
            let hint = match closest(key, NAU_KEYS.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("NAUbackup .cfg keys are: {}", NAU_KEYS.join(", ")),
            };
            return Err(err(line, key, format!("unknown key `{key}`"), hint));
        };
        let bad_value = |what: &str| {
            err(
                line,
                known,
                format!("`{known}={value}`: {what}"),
                match known {
                    "pool_db_backup" => "write pool_db_backup=0 or pool_db_backup=1".to_string(),
                    "max_backups" => {
                        "write a whole number of at least 1, e.g. max_backups=4".to_string()
                    }
                    "vdi_export_format" => {
                        "write vdi_export_format=raw or vdi_export_format=vhd".to_string()
                    }
                    "pre_clean" => "write pre_clean=true or pre_clean=false".to_string(),
                    _ => "write a path".to_string(),
                },
            )
        };
        if !matches!(known, "vm-export" | "vdi-export" | "exclude") {
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == known) {
                return Err(err(
                    line,
                    known,
                    format!("`{known}` is set twice (lines {first} and {line})"),
                    "keep one of the two lines".to_string(),
                ));
            }
            seen.push((known, line));
        }
        match known {
            "pool_db_backup" => {
                cfg.pool_db_backup = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad_value("must be 0 or 1")),
                }
            }
            "max_backups" => {
                cfg.max_backups = match value.parse::<u32>() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(bad_value("must be a whole number of at least 1")),
                }
            }
            "backup_dir" => {
                if value.is_empty() {
                    return Err(bad_value("is empty"));
                }
                cfg.backup_dir = PathBuf::from(value);
            }
            "status_log" => {
                if value.is_empty() {
                    return Err(bad_value("is empty"));
                }
                cfg.status_log = Some(PathBuf::from(value));
            }
            "vdi_export_format" => {
                cfg.vdi_export_format = match value {
                    "raw" => ExportMode::Raw,
                    "vhd" => ExportMode::Vhd,
                    _ => return Err(bad_value("must be raw or vhd")),
                }
            }
            "pre_clean" => {
                cfg.pre_clean = match value.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(bad_value("must be true or false")),
                }
            }
            "exclude" => {
                if value.is_empty() {
                    continue;
                }
                if is_plain_name(value) {
                    cfg.exclude_names.push(value.to_string());
                } else {
                    check_regex(value, path, line, known)?;
                    cfg.exclude_regexes.push(value.to_string());
                }
            }
            "vm-export" | "vdi-export" => {
                if known == "vdi-export" && value.is_empty() {
                    continue;
                }
                // VmBackup.py splits at the first ':'; what follows is the count.
                let (pattern, keep_last) = match value.split_once(':') {
                    None => (value, None),
                    Some((p, n)) => match n.trim().parse::<u32>() {
                        Ok(n) if n >= 1 => (p.trim(), Some(n)),
                        _ => {
                            return Err(err(
                                line,
                                known,
                                format!(
                                    "`{known}={value}`: after ':' must come the number of backups to keep"
                                ),
                                format!(
                                    "write e.g. `{known}={}:3` (a regex cannot contain ':')",
                                    p.trim()
                                ),
                            ));
                        }
                    },
                };
                let mut rule = SelectRule {
                    keep_last,
                    origin: Some(format!("{file_name}:{line}")),
                    ..SelectRule::default()
                };
                if is_plain_name(pattern) {
                    rule.name = Some(pattern.to_string());
                } else {
                    check_regex(pattern, path, line, known)?;
                    rule.regex = Some(pattern.to_string());
                }
                if known == "vm-export" {
                    rule.mode = Some(ExportMode::Xva);
                    vm_rules.push(rule);
                } else {
                    // The export format is applied below, once the whole file is read.
                    rule.disks = Some(DiskSelection::Boot);
                    vdi_rules.push(rule);
                }
            }
            _ => {}
        }
    }
    for rule in &mut vdi_rules {
        rule.mode = Some(cfg.vdi_export_format);
    }
    cfg.rules = vm_rules;
    cfg.rules.extend(vdi_rules);
    Ok(cfg)
}

fn check_regex(pattern: &str, path: &Path, line: usize, key: &str) -> Result<(), ConfigError> {
    match Regex::new(&format!("^(?:{pattern})")) {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError::new(
            ErrorKind::BadRegex,
            path,
            Some(line),
            Some(key.to_string()),
            format!(
                "invalid regex `{pattern}`: {}",
                super::one_line(&e.to_string())
            ),
            "fix the regex (names of only letters, digits, spaces, - and _ are taken literally)"
                .to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        assert!(is_plain_name("PROD-ubuntu14"));
        assert!(is_plain_name("DEV mySql"));
        assert!(is_plain_name("a_b"));
        assert!(!is_plain_name("PROD.*"));
        assert!(!is_plain_name("PRD-PRINT$"));
        assert!(!is_plain_name("PROD-CentOS7.large"));
        assert!(!is_plain_name(""));
    }

    #[test]
    fn parses_the_readme_example() {
        let text = "\
# Example config file for VmBackup.py
pool_db_backup=0
max_backups=3
backup_dir=/path/to/backupspace
status_log=/path/to/backupspace/logs/status.log
vdi_export_format=raw
exclude=PROD-WinDomainController
exclude=DEV-DestructiveTest 
exclude=TEMP-.*
vm-export=my-vm-name
vm-export=my-second-vm
vm-export=my-third-vm:3
vdi-export=my-vm-name
vm-export=PROD.*
vm-export=DEV.*:2
";
        let cfg = parse(text, Path::new("/etc/example.cfg")).unwrap();
        assert_eq!(cfg.max_backups, 3);
        assert!(!cfg.pool_db_backup);
        assert_eq!(cfg.backup_dir, PathBuf::from("/path/to/backupspace"));
        assert_eq!(
            cfg.exclude_names,
            vec!["PROD-WinDomainController", "DEV-DestructiveTest"]
        );
        assert_eq!(cfg.exclude_regexes, vec!["TEMP-.*"]);
        assert_eq!(cfg.rules.len(), 6);
        // vm-exports first, then the vdi-export.
        assert_eq!(cfg.rules[2].name.as_deref(), Some("my-third-vm"));
        assert_eq!(cfg.rules[2].keep_last, Some(3));
        assert_eq!(cfg.rules[4].regex.as_deref(), Some("DEV.*"));
        assert_eq!(cfg.rules[4].keep_last, Some(2));
        assert_eq!(cfg.rules[5].name.as_deref(), Some("my-vm-name"));
        assert_eq!(cfg.rules[5].mode, Some(ExportMode::Raw));
        assert_eq!(cfg.rules[5].disks, Some(DiskSelection::Boot));
        assert_eq!(cfg.rules[5].origin.as_deref(), Some("example.cfg:13"));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = parse("max_backups=3\nvm-export=PRD-[aA.*\n", Path::new("w.cfg")).unwrap_err();
        let t = e.to_string();
        assert!(
            t.starts_with("w.cfg:2: vm-export: invalid regex `PRD-[aA.*`"),
            "{t}"
        );
        assert!(!t.contains('\n'), "{t}");
        let e = parse("max_backup=3\n", Path::new("w.cfg")).unwrap_err();
        assert!(e.to_string().contains("did you mean `max_backups`?"), "{e}");
        let e = parse("max_backups=0\n", Path::new("w.cfg")).unwrap_err();
        assert!(e.to_string().starts_with("w.cfg:1: max_backups:"), "{e}");
        let e = parse("vm-export=web:x\n", Path::new("w.cfg")).unwrap_err();
        assert!(e.to_string().contains("number of backups"), "{e}");
        let e = parse("max_backups=3\nmax_backups=4\n", Path::new("w.cfg")).unwrap_err();
        assert!(e.to_string().contains("set twice (lines 1 and 2)"), "{e}");
        let e = parse("vdi_export_format=qcow2\n", Path::new("w.cfg")).unwrap_err();
        assert!(e.to_string().contains("raw or vhd"), "{e}");
    }

    #[test]
    fn vhd_format_applies_to_every_vdi_export() {
        let cfg = parse(
            "vdi-export=a\nvdi_export_format=vhd\nvdi-export=\n",
            Path::new("x.cfg"),
        )
        .unwrap();
        assert_eq!(cfg.rules.len(), 1);
        assert_eq!(cfg.rules[0].mode, Some(ExportMode::Vhd));
    }
}
