//! Where things are in a TOML text: key paths ↔ byte spans ↔ line numbers,
//! so every configuration error can name its line and key.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The spanned tree of a TOML document (parsed once, for error messages).
pub struct SpanIndex<'a> {
    text: &'a str,
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> SpanIndex<'a> {
    /// Parses `text` for positions; a text that does not parse gives an index
    /// that only counts lines.
    pub fn new(text: &'a str) -> SpanIndex<'a> {
        SpanIndex {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// True when the text parsed as TOML.
    pub fn parsed(&self) -> bool {
        self.root.is_some()
    }

    /// The 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        line_of(self.text, offset)
    }

    /// The line of the KEY at this path (e.g. `["jobs", "nightly", "target"]`;
    /// array items by index: `["jobs", "x", "rule", "0", "regex"]`); for a path
    /// that is not in the file, the line of its longest present prefix.
    pub fn line_of_path(&self, path: &[&str]) -> Option<usize> {
        let root = self.root.as_ref()?;
        find(root.get_ref(), path).map(|r| self.line_of(r.start))
    }

    /// True when the key path is in the file.
    pub fn has_path(&self, path: &[&str]) -> bool {
        let Some(root) = self.root.as_ref() else {
            return false;
        };
        let mut table: &DeTable<'_> = root.get_ref();
        for (i, part) in path.iter().enumerate() {
            let Some(value) = table.get(*part) else {
                return false;
            };
            if i + 1 == path.len() {
                return true;
            }
            match value.get_ref() {
                DeValue::Table(t) => table = t,
                _ => return false,
            }
        }
        false
    }

    /// The dotted key path whose key or value contains `offset` (deepest match).
    pub fn path_at(&self, offset: usize) -> Option<String> {
        let root = self.root.as_ref()?;
        let mut parts = Vec::new();
        walk(root.get_ref(), offset, &mut parts);
        if parts.is_empty() {
            None
        } else {
            Some(parts.join("."))
        }
    }
}

fn find(table: &DeTable<'_>, path: &[&str]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (key, value) = table.get_key_value(*first)?;
    if rest.is_empty() {
        return Some(key.span());
    }
    match value.get_ref() {
        DeValue::Table(t) => find(t, rest).or(Some(key.span())),
        DeValue::Array(items) => {
            let (index, rest) = rest.split_first()?;
            let Some(item) = index.parse::<usize>().ok().and_then(|i| items.get(i)) else {
                return Some(key.span());
            };
            match item.get_ref() {
                DeValue::Table(t) if !rest.is_empty() => find(t, rest).or(Some(item.span())),
                _ => Some(item.span()),
            }
        }
        _ => Some(key.span()),
    }
}

fn walk(table: &DeTable<'_>, offset: usize, parts: &mut Vec<String>) {
    // Prefer the key whose own span holds the offset; else a value that does.
    let mut found: Option<(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)> = None;
    for (key, value) in table.iter() {
        let ks = key.span();
        let vs = value.span();
        if (ks.start <= offset && offset < ks.end.max(ks.start + 1))
            || (vs.start <= offset && offset < vs.end.max(vs.start + 1))
        {
            found = Some((key, value));
            break;
        }
    }
    let Some((key, value)) = found.or_else(|| {
        // Header tables (`[jobs.x]`) have value spans that may not cover their
        // body: pick the table whose key starts last before the offset.
        table
            .iter()
            .filter(|(k, v)| {
                k.span().start <= offset && (v.get_ref().is_table() || v.get_ref().is_array())
            })
            .max_by_key(|(k, _)| k.span().start)
    }) else {
        return;
    };
    parts.push(key.get_ref().to_string());
    match value.get_ref() {
        DeValue::Table(t) => walk(t, offset, parts),
        DeValue::Array(items) => {
            // The item holding the offset; for `[[array]]` tables whose spans
            // stop at the header, the last one starting before it.
            let holding = items.iter().enumerate().find(|(_, item)| {
                let s = item.span();
                s.start <= offset && offset < s.end.max(s.start + 1)
            });
            let item = holding.or_else(|| {
                items
                    .iter()
                    .enumerate()
                    .filter(|(_, item)| item.span().start <= offset && item.get_ref().is_table())
                    .max_by_key(|(_, item)| item.span().start)
            });
            if let Some((i, item)) = item
                && let DeValue::Table(t) = item.get_ref()
            {
                parts.push(i.to_string());
                walk(t, offset, parts);
            }
        }
        _ => {}
    }
}

/// The 1-based line of a byte offset in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "state-dir = \"/x\"\n\n[pools.prod]\nurl = \"https://a\"\nuser = \"root\"\n\n[jobs.nightly]\npools = [\"prod\"]\ntarget = \"nas\"\n\n[[jobs.nightly.rule]]\nregex = \"a\"\n\n[[jobs.nightly.rule]]\nname = \"b\"\nkeep-last = 3\n";

    #[test]
    fn lines_of_paths() {
        let idx = SpanIndex::new(DOC);
        assert_eq!(idx.line_of_path(&["state-dir"]), Some(1));
        assert_eq!(idx.line_of_path(&["pools", "prod", "url"]), Some(4));
        assert_eq!(idx.line_of_path(&["jobs", "nightly", "target"]), Some(9));
        assert_eq!(
            idx.line_of_path(&["jobs", "nightly", "rule", "1", "keep-last"]),
            Some(16)
        );
        // Missing key: falls back to the nearest present one.
        assert_eq!(idx.line_of_path(&["pools", "prod", "nothing"]), Some(3));
    }

    #[test]
    fn paths_at_offsets() {
        let idx = SpanIndex::new(DOC);
        let off = DOC.find("\"nas\"").unwrap();
        assert_eq!(idx.path_at(off).as_deref(), Some("jobs.nightly.target"));
        let off = DOC.find("keep-last").unwrap();
        assert_eq!(
            idx.path_at(off).as_deref(),
            Some("jobs.nightly.rule.1.keep-last")
        );
    }
}
