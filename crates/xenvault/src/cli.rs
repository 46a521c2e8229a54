//! The command line: every subcommand and option, with examples in `--help`.

use clap::{Args, Parser, Subcommand};

/// xenvault backs up virtual machines on XenServer / XCP-ng pools.
#[derive(Debug, Parser)]
#[command(name = "xenvault", version, about, long_about = None)]
pub struct Cli {
    /// Print results as JSON on stdout (for scripts); messages still go to stderr.
    #[arg(long, global = true)]
    pub json: bool,

    /// Show more of what happens on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run xenvault's main job against a built-in simulated pool, then check the result.
    #[command(
        after_help = "Examples:\n  xenvault demo\n  xenvault demo --vms 4 --disk-size 32M\n  xenvault demo --keep /tmp/demo   # keep the simulator's state and the files"
    )]
    Demo(DemoArgs),

    /// Show a pool's TLS certificate fingerprint, to pin it.
    #[command(
        after_help = "Examples:\n  xenvault trust https://pool.example.com\n  xenvault trust https://10.0.0.5:443 --json"
    )]
    Trust(TrustArgs),

    /// Show what a backup job would do tonight, creating nothing on the pool.
    #[command(
        after_help = "Shows the settings in force, the VMs that will be backed up, why every other VM\nwill not, and the result of every check (target writable, free space, SR usage,\nleftovers of earlier runs). Exit code 0 when the plan is clean, 1 when a check or\nthe selection found an error, 2 for a configuration error.\n\nExamples:\n  xenvault plan nightly\n  xenvault plan nightly --config /etc/xenvault/xenvault.toml --today saturday\n  xenvault plan nightly --json | jq '.vms[].name'"
    )]
    Plan(JobArgs),

    /// Run a backup job: snapshot, export, write the archive, clean up, keep the last N.
    #[command(
        after_help = "Progress goes to stderr (a live line with rate and ETA on a terminal, plain lines\nunder cron), the summary to stdout (the JSON report with --json).\nExit codes: 0 success, 1 failure, 2 bad configuration, 3 partial (some VMs failed or\nwere skipped), 130/143 stopped by SIGINT/SIGTERM (this run's snapshots removed,\nreport written; a second signal exits at once).\n\nExamples:\n  xenvault backup nightly\n  XENVAULT_CONFIG=/srv/xenvault.toml xenvault backup weekly --json > report.json\n  # crontab: 30 1 * * *  /usr/local/bin/xenvault backup nightly >> /var/log/xenvault.log 2>&1"
    )]
    Backup(JobArgs),

    /// List what can be restored: the restore points of an archive or a repository, per VM.
    #[command(
        after_help = "Archives: per VM each restore point's time, size, format, whether it is complete or\npartial, and its checksum status (--verify re-reads every file against SHA256SUMS).\nRepositories: per VM each restore point's id, time, disks, size, bytes it stored, full\nor incremental, and its job (--verify re-reads and re-hashes every chunk).\n--target takes a directory (archive or local repository) or a target's name.\nExit code 1 when --verify finds a damaged restore point.\n\nExamples:\n  xenvault list nightly\n  xenvault list --target /mnt/backups --vm web-01\n  xenvault list --target /mnt/backups --verify\n  xenvault list --config /etc/xenvault/xenvault.toml --target offsite   # a repository target\n  xenvault list --repo /srv/xenvault-repo --password-env REPO_PW\n  xenvault list nightly --json | jq '.[] | select(.complete) | .dir'"
    )]
    List(crate::list::ListArgs),

    /// Restore a VM (or one disk) from an archive or a repository into a pool, or to a file.
    #[command(
        after_help = "The archive's checksums are checked first: a damaged restore point is refused,\nnaming the file. Repository chunks are checked as they are read: a damaged one stops\nthe restore, naming its object. Anything a failed restore created on the pool is\nremoved. From a repository also: one disk into an existing VDI (--into-vdi; only the\nchunks that differ are written) and to a file (--to-file: raw, vhd or xva; no pool).\nExit codes: 0 restored, 1 failed, 2 bad usage (unknown VM, restore point, SR; the\noriginal VM still exists; wrong password), 3 restored but not started.\n\nExamples:\n  xenvault restore --config /etc/xenvault/xenvault.toml --target local --vm web-01 --at 20261122\n  xenvault restore --repo /srv/xenvault-repo --vm web-01 --disk 0 --to-file /tmp/web-01.raw\n  xenvault restore --target local --vm web-01 --to-file /tmp/web-01.xva\n  xenvault restore --target local --vm web-01 --disk 0 --into-vdi 7c1e…   # only changed chunks\n  xenvault restore nightly --vm web-01                      # newest backup, new VM, default SR\n  xenvault restore --target /mnt/backups --vm web-01 --at 20261122 --sr 5f0c… --start\n  xenvault restore nightly --vm web-01 --preserve-identity  # same uuid and MACs (original gone)\n  xenvault restore nightly --vm web-01 --disk 1 --name 'web-01 data'   # one disk into a new VDI\n  xenvault restore nightly --vm web-01 --pool dr-site --sr 9a1e…       # into another pool"
    )]
    Restore(crate::restore::RestoreArgs),

    /// Create a deduplicating repository (`repo init`); manage its keys (`repo key`).
    #[command(subcommand)]
    Repo(crate::repo::RepoCommand),

    /// Manage the key slots of an encrypted repository: list, add, change, export, import, remove.
    #[command(subcommand)]
    Key(crate::key::KeyCommand),

    /// Check a repository's structure: every manifest and index readable, every chunk present.
    #[command(
        after_help = "Names each damaged or missing object and every restore point it breaks.\nExit codes: 0 clean, 1 damaged (or failed), 2 bad usage (no repository, wrong password).\n\nExamples:\n  xenvault check --config /etc/xenvault/xenvault.toml --target local\n  xenvault check --repo /srv/xenvault-repo --password-env REPO_PW --json"
    )]
    Check(crate::check::CheckArgs),

    /// Re-read, authenticate and re-hash a repository's chunks (all, or a sample).
    #[command(
        after_help = "Does everything `check` does, then downloads the chunks and checks their content\nagainst their ids (a tampered encrypted chunk fails authentication). Names each\ndamaged chunk and every restore point it breaks.\nExit codes: 0 clean, 1 damaged (or failed), 2 bad usage.\n\nExamples:\n  xenvault verify --target local\n  xenvault verify --target offsite --sample 5          # 5% of the chunks, a new sample each run\n  xenvault verify --repo /srv/xenvault-repo --sample 10 --seed 42"
    )]
    Verify(crate::check::VerifyArgs),

    /// Apply the jobs' retention to a repository, then free the chunks no restore point uses.
    #[command(
        after_help = "Shows the retention plan per VM (each restore point kept with its reasons:\nlast, hourly, daily, weekly, monthly, yearly — or removed), from the configuration's\njobs writing to the repository (the job named in a VM's newest restore point). Then\nforgets the removed restore points and prunes in two phases: chunks an earlier\nprune marked unused at least --grace ago and still unused are deleted, and what\nis unused now is marked. Safe while backups run (the sweep waits for them).\nStale locks (of crashed processes) are reported and removed.\nExit codes: 0 done, 1 failed (e.g. unreadable metadata: run check), 2 bad usage.\n\nExamples:\n  xenvault prune --config /etc/xenvault/xenvault.toml --target local --dry-run\n  xenvault prune --target local\n  xenvault prune --repo /srv/xenvault-repo --config /etc/xenvault/xenvault.toml --grace 2h"
    )]
    Prune(crate::prune::PruneArgs),

    /// The snapshots repository jobs keep on the pools: list them; release those of a job.
    #[command(subcommand)]
    Snapshots(crate::snapshots::SnapshotsCommand),
}

/// Options of `xenvault plan` and `xenvault backup`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job's name (a `[jobs.NAME]` table of the configuration).
    pub job: String,

    /// The configuration file [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml].
    #[arg(long, short = 'c')]
    pub config: Option<std::path::PathBuf>,

    /// Select as if today were this weekday (weekday files), e.g. `saturday`.
    #[arg(long, value_parser = parse_weekday)]
    pub today: Option<xenvault_types::config::Weekday>,
}

/// Parses a weekday name (`mon`, `Monday`, …).
pub fn parse_weekday(text: &str) -> Result<xenvault_types::config::Weekday, String> {
    use xenvault_types::config::Weekday;
    let t = text.trim().to_ascii_lowercase();
    Weekday::ALL
        .into_iter()
        .find(|d| {
            let name = d.name().to_ascii_lowercase();
            t.len() >= 3 && name.starts_with(&t)
        })
        .ok_or_else(|| format!("{text:?} is not a weekday; write e.g. monday or sat"))
}

/// Options of `xenvault demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of VMs in the simulated pool.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub vms: u32,

    /// Virtual size of each VM disk (e.g. 16M, 64M, 1G).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub disk_size: u64,

    /// Keep the simulator's state and the demo's files in this directory
    /// (default: a temporary directory removed at the end).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

/// Options of `xenvault trust`.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The pool's URL (https://host[:port]) or host[:port].
    pub url: String,

    /// Record the fingerprint in this configuration file (with --pool).
    #[arg(long, requires = "pool")]
    pub config: Option<std::path::PathBuf>,

    /// The pool (its `[pools.NAME]` table) whose `fingerprint` to set.
    #[arg(long, requires = "config")]
    pub pool: Option<String>,
}

/// Parses a size such as `512`, `64K`, `32M`, `8G`, `1T` (binary units; an
/// optional `iB`/`B` suffix is accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. 64M or 8G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn weekdays() {
        use xenvault_types::config::Weekday;
        assert_eq!(parse_weekday("sat").unwrap(), Weekday::Saturday);
        assert_eq!(parse_weekday("Monday").unwrap(), Weekday::Monday);
        assert!(parse_weekday("mo").is_err());
        assert!(parse_weekday("funday").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
