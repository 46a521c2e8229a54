//! `xenvault trust URL`: show a pool's certificate fingerprint, to pin it.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use xenvault_xapi::tls;

use crate::cli::TrustArgs;
use crate::exit::{ExitCode, UsageError};

/// Connects without trusting the certificate, and prints its SHA-256 fingerprint.
pub async fn run(args: TrustArgs, json: bool) -> anyhow::Result<ExitCode> {
    let host_port = host_port_of(&args.url)?;
    let presented = tls::fetch_fingerprint(&host_port, Duration::from_secs(15))
        .await
        .with_context(|| format!("cannot read the TLS certificate of {host_port}"))?;
    let fingerprint = presented.fingerprint.to_string();
    if let (Some(config), Some(pool)) = (&args.config, &args.pool) {
        record_pin(config, pool, &fingerprint)?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "address": host_port,
                "fingerprint": fingerprint,
                "recorded_in": args.config.as_ref().map(|p| p.display().to_string()),
            })
        );
    } else if let (Some(config), Some(pool)) = (&args.config, &args.pool) {
        println!("{host_port} presents the certificate {fingerprint}");
        println!(
            "Recorded it as the pin of pool {pool:?} in {}. Check it on the pool coordinator:",
            config.display()
        );
        println!("  openssl x509 -in /etc/xensource/xapi-ssl.pem -noout -fingerprint -sha256");
    } else {
        println!(
            "{host_port} presents the certificate {}",
            presented.fingerprint
        );
        println!(
            "Check it on the pool coordinator (`openssl x509 -in /etc/xensource/xapi-ssl.pem -noout -fingerprint -sha256`),"
        );
        println!(
            "then pin it in the pool's configuration: fingerprint = \"{}\"",
            presented.fingerprint
        );
    }
    Ok(ExitCode::Success)
}

/// Sets `fingerprint` of `[pools.<pool>]` in the configuration file, keeping its
/// comments, order and permissions; written through a temporary file and a rename.
fn record_pin(config: &Path, pool: &str, fingerprint: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read the configuration {}", config.display()))?;
    let updated = xenvault_engine::config::edit::pin_fingerprint(&text, pool, fingerprint)
        .map_err(|why| UsageError(format!("{}: {why}", config.display())))?;
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write next to {}", config.display()))?;
    tmp.write_all(updated.as_bytes())?;
    tmp.as_file().sync_all()?;
    let permissions = std::fs::metadata(config)?.permissions();
    std::fs::set_permissions(tmp.path(), permissions)?;
    tmp.persist(config)
        .with_context(|| format!("cannot replace {}", config.display()))?;
    Ok(())
}

/// `https://host:port/...`, `host:port` or `host` → `host:port` (443 by default).
fn host_port_of(url: &str) -> anyhow::Result<String> {
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if url.starts_with("http://") {
        return Err(UsageError(format!(
            "{url} is plain HTTP: there is no certificate to trust; use https://"
        ))
        .into());
    } else {
        url
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(UsageError(format!("{url:?} names no host")).into());
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.matches(':').count() == 1
    };
    Ok(if has_port {
        authority.to_string()
    } else if authority.contains(':') && !authority.starts_with('[') {
        format!("[{authority}]:443")
    } else {
        format!("{authority}:443")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            host_port_of("https://pool.example/").unwrap(),
            "pool.example:443"
        );
        assert_eq!(
            host_port_of("https://10.0.0.5:8443").unwrap(),
            "10.0.0.5:8443"
        );
        assert_eq!(host_port_of("pool").unwrap(), "pool:443");
        assert_eq!(
            host_port_of("https://[fe80::1]:443").unwrap(),
            "[fe80::1]:443"
        );
        assert_eq!(host_port_of("fe80::1").unwrap(), "[fe80::1]:443");
        assert!(host_port_of("http://pool").is_err());
        assert!(host_port_of("https://").is_err());
    }
}
