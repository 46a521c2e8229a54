//! `xenvault check` (structure: every manifest and index readable, every
//! chunk they use present) and `xenvault verify` (also re-read,
//! authenticate and re-hash all or a sample of the chunks): each damaged
//! object with every restore point it breaks.

use std::collections::BTreeMap;

use clap::Args;
use xenvault_repo::{CheckReport, Repository, VerifyOptions};

use crate::exit::ExitCode;
use crate::repo::{Chosen, RepoSelect, choose, open, repo_error};

/// Options of `xenvault check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub select: RepoSelect,
}

/// Options of `xenvault verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub select: RepoSelect,

    /// Re-read only this share of the chunks, in percent (e.g. 10 or 2.5);
    /// each run picks a different sample unless --seed is given.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub sample: Option<f64>,

    /// The sample's seed (the same seed picks the same chunks).
    #[arg(long, value_name = "N", requires = "sample")]
    pub seed: Option<u64>,

    /// Chunks downloaded at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim().trim_end_matches('%');
    match t.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!(
            "{text:?} is not a percentage above 0 and at most 100; write e.g. 10 or 2.5"
        )),
    }
}

/// Runs `xenvault check`.
pub async fn run_check(args: CheckArgs, json: bool) -> anyhow::Result<ExitCode> {
    let chosen = choose(&args.select)?;
    let repo = open(&chosen).await?;
    let report = repo.check().await.map_err(|e| repo_error(&chosen, e))?;
    finish(&chosen, &repo, &report, None, json).await
}

/// Runs `xenvault verify`.
pub async fn run_verify(args: VerifyArgs, json: bool) -> anyhow::Result<ExitCode> {
    let chosen = choose(&args.select)?;
    let repo = open(&chosen).await?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let options = VerifyOptions {
        sample: args.sample.map_or(1.0, |p| p / 100.0),
        seed,
        parallel: usize::from(args.parallel),
    };
    let report = repo
        .verify(options)
        .await
        .map_err(|e| repo_error(&chosen, e))?;
    finish(&chosen, &repo, &report, Some((args.sample, seed)), json).await
}

/// Prints the report; exit 1 when anything is damaged.
async fn finish(
    chosen: &Chosen,
    repo: &Repository,
    report: &CheckReport,
    verify: Option<(Option<f64>, u64)>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let names = vm_names(repo, report).await;
    if json {
        let doc = serde_json::json!({
            "repository": chosen.location(),
            "clean": report.is_clean(),
            "restore_points": report.restore_points,
            "indexes": report.indexes,
            "chunks_referenced": report.chunks_referenced,
            "chunks_verified": report.chunks_verified,
            "sample_percent": verify.and_then(|(s, _)| s),
            "seed": verify.filter(|(s, _)| s.is_some()).map(|(_, seed)| seed),
            "damage": report.damage,
            "broken_restore_points": report.broken_restore_points().iter().map(|rp| {
                serde_json::json!({"restore_point": rp, "vm": names.get(rp.split('/').next().unwrap_or(""))})
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render(chosen, report, verify, &names));
    }
    Ok(if report.is_clean() {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

/// VM names by uuid, read from the restore points damage names (best effort).
async fn vm_names(repo: &Repository, report: &CheckReport) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for rp in report.broken_restore_points() {
        let Some((vm, id)) = rp.split_once('/') else {
            continue;
        };
        if names.contains_key(vm) {
            continue;
        }
        if let Ok(m) = repo.load_manifest(vm, id).await {
            names.insert(vm.to_string(), m.vm_name);
        }
    }
    names
}

fn render(
    chosen: &Chosen,
    report: &CheckReport,
    verify: Option<(Option<f64>, u64)>,
    names: &BTreeMap<String, String>,
) -> String {
    let mut out = format!(
        "{}: {} restore point{}, {} disk index{}, {} chunk{} referenced",
        chosen.label,
        report.restore_points,
        plural(report.restore_points),
        report.indexes,
        if report.indexes == 1 { "" } else { "es" },
        report.chunks_referenced,
        plural(report.chunks_referenced)
    );
    match verify {
        Some((Some(p), seed)) => out.push_str(&format!(
            ", {} re-read and re-hashed (sample {p}%, seed {seed})",
            report.chunks_verified
        )),
        Some((None, _)) => out.push_str(&format!(
            ", {} re-read and re-hashed",
            report.chunks_verified
        )),
        None => {}
    }
    out.push('\n');
    if report.is_clean() {
        out.push_str("OK: nothing is damaged.\n");
        return out;
    }
    let point = |rp: &str| match rp.split_once('/') {
        Some((vm, id)) => match names.get(vm) {
            Some(n) => format!("VM {n} ({vm}) restore point {id}"),
            None => format!("VM {vm} restore point {id}"),
        },
        None => rp.to_string(),
    };
    for d in &report.damage {
        out.push_str(&format!("DAMAGED {}: {}\n", d.object, d.problem));
        for rp in &d.restore_points {
            out.push_str(&format!("  breaks {}\n", point(rp)));
        }
    }
    let broken = report.broken_restore_points();
    out.push_str(&format!(
        "{} damaged object{} break{} {} restore point{}:\n",
        report.damage.len(),
        plural(report.damage.len()),
        if report.damage.len() == 1 { "s" } else { "" },
        broken.len(),
        plural(broken.len())
    ));
    for rp in &broken {
        out.push_str(&format!("  {}\n", point(rp)));
    }
    out.push_str(
        "Fix: restore these VMs from a restore point not listed, or from another copy of the repository; the listed restore points stay broken. Delete a damaged chunk's object (it is unusable) so that a later backup reading that data stores it again.\n",
    );
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10").unwrap(), 10.0);
        assert_eq!(parse_percent("2.5%").unwrap(), 2.5);
        assert!(parse_percent("0").is_err());
        assert!(parse_percent("101").is_err());
        assert!(parse_percent("lots").is_err());
    }
}
