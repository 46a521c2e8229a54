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
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
