//! Small edits of a configuration text that keep everything else (comments,
//! order, spacing) as it is: pinning a pool's certificate fingerprint, for
//! `xenvault trust URL --pool NAME`.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// Sets `fingerprint = "<fingerprint>"` in `[pools.<pool>]` of `text`: replaces
/// the existing value, or adds the line after the pool's `url`. An
/// `insecure-skip-verify` line of that pool is commented out (a pin replaces it).
/// Returns the new text, or why it cannot (one line).
pub fn pin_fingerprint(text: &str, pool: &str, fingerprint: &str) -> Result<String, String> {
    let root = DeTable::parse(text).map_err(|e| {
        format!(
            "the configuration is not valid TOML ({}); fix it first",
            super::one_line(e.message())
        )
    })?;
    let pools = root
        .get_ref()
        .get("pools")
        .and_then(|v| v.get_ref().as_table())
        .ok_or_else(|| format!("there is no [pools.{pool}] table; add one with its url first"))?;
    let (pool_key, table) = pools
        .get_key_value(pool)
        .and_then(|(k, v)| v.get_ref().as_table().map(|t| (k, t)))
        .ok_or_else(|| format!("there is no [pools.{pool}] table; add one with its url first"))?;
    let quoted = format!("\"{fingerprint}\"");
    // Edits as (range, replacement), applied from the end.
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    if let Some(value) = table.get("fingerprint") {
        if !matches!(value.get_ref(), DeValue::String(_)) {
            return Err(format!(
                "pools.{pool}.fingerprint is not a string; fix it first"
            ));
        }
        edits.push((value.span(), quoted));
    } else {
        let anchor = table
            .get_key_value("url")
            .map(|(_, v)| v.span().end)
            .unwrap_or_else(|| pool_key.span().end);
        let line_end = text[anchor..]
            .find('\n')
            .map(|i| anchor + i)
            .unwrap_or(text.len());
        let (prefix, newline) = if line_end == text.len() && !text.ends_with('\n') {
            ("\n", "")
        } else {
            ("", "\n")
        };
        // Inserted right after the end of the url line.
        let at = if line_end < text.len() {
            line_end + 1
        } else {
            line_end
        };
        edits.push((at..at, format!("{prefix}fingerprint = {quoted}{newline}")));
    }
    if let Some((key, _)) = table.get_key_value("insecure-skip-verify") {
        let start = text[..key.span().start]
            .rfind('\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        edits.push((
            start..start,
            "# (replaced by the pinned fingerprint) ".to_string(),
        ));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = text.to_string();
    for (range, replacement) in edits {
        out.replace_range(range, &replacement);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:5f0c2f6a1b9e3d7c4a8b2e1f0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170";

    #[test]
    fn adds_after_url_keeping_comments() {
        let text = "# my pools\n[pools.prod]\nurl = \"https://p\" # coordinator\npassword-env = \"X\"\n\n[pools.lab]\nurl = \"https://l\"\n";
        let out = pin_fingerprint(text, "prod", FP).unwrap();
        assert_eq!(
            out,
            format!(
                "# my pools\n[pools.prod]\nurl = \"https://p\" # coordinator\nfingerprint = \"{FP}\"\npassword-env = \"X\"\n\n[pools.lab]\nurl = \"https://l\"\n"
            )
        );
        let out = pin_fingerprint(text, "lab", FP).unwrap();
        assert!(
            out.ends_with(&format!("url = \"https://l\"\nfingerprint = \"{FP}\"\n")),
            "{out}"
        );
    }

    #[test]
    fn replaces_an_existing_pin_and_comments_out_insecure() {
        let text = "[pools.prod]\nurl = \"https://p\"\nfingerprint = \"sha256:00\"\n  insecure-skip-verify = true\n";
        let out = pin_fingerprint(text, "prod", FP).unwrap();
        assert_eq!(
            out,
            format!(
                "[pools.prod]\nurl = \"https://p\"\nfingerprint = \"{FP}\"\n# (replaced by the pinned fingerprint)   insecure-skip-verify = true\n"
            )
        );
    }

    #[test]
    fn no_trailing_newline_and_missing_pool() {
        let out = pin_fingerprint("[pools.a]\nurl = \"https://a\"", "a", FP).unwrap();
        assert_eq!(
            out,
            format!("[pools.a]\nurl = \"https://a\"\nfingerprint = \"{FP}\"")
        );
        assert!(
            pin_fingerprint("[pools.a]\nurl = \"x\"\n", "b", FP)
                .unwrap_err()
                .contains("[pools.b]")
        );
        assert!(
            pin_fingerprint("[pools.a\n", "a", FP)
                .unwrap_err()
                .contains("not valid TOML")
        );
    }
}
