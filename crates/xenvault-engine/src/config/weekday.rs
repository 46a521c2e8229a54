//! The weekday file: a plain text file saying which VMs are backed up on
//! which day, editable by someone who knows no Linux.
//!
//! ```text
//! # Lines starting with # are notes.
//! Monday:    web01, web02, db-*
//! Tuesday:   mail
//! Weekend:   fileserver
//! Every day: dns1
//! ```
//!
//! A line is `DAYS: VM, VM, …`. DAYS is one day (`Monday`, or `Mon`), several
//! (`Monday, Thursday` or `Monday and Thursday`), `Every day` (or `Daily`),
//! `Weekdays` (Monday to Friday) or `Weekend` (Saturday and Sunday); any case.
//! A `*` in a VM name stands for any text. A day may appear on several lines.
//! ` # …` after the names is a note. Windows line ends and a UTF-8 BOM are fine.
//! Unknown day names are errors (with a suggestion); VM names that match no VM
//! are reported by the selection.

use std::path::Path;

use xenvault_types::config::{Weekday, WeekdayEntry, WeekdaySchedule};

use super::{ConfigError, ErrorKind, closest};

/// Parses a weekday file's text; `path` is used in messages.
pub fn parse(text: &str, path: &Path) -> Result<WeekdaySchedule, ConfigError> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim_start_matches('\u{feff}').trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // A note after the names: ` # …`.
        let note = trimmed
            .char_indices()
            .find(|(i, c)| *c == '#' && trimmed[..*i].ends_with([' ', '\t']))
            .map(|(i, _)| i);
        let trimmed = match note {
            Some(i) => trimmed[..i].trim_end(),
            None => trimmed,
        };
        let Some((day_part, vm_part)) = trimmed.split_once(':') else {
            return Err(ConfigError::new(
                ErrorKind::Weekday,
                path,
                Some(line),
                None,
                format!("{trimmed:?} has no ':' between the day and the VM names"),
                "write the day, a colon, then the VMs, e.g. `Monday: web01, db01`".to_string(),
            ));
        };
        let days = parse_days(day_part, path, line)?;
        let vms: Vec<String> = vm_part
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        entries.push(WeekdayEntry { days, vms, line });
    }
    Ok(WeekdaySchedule {
        path: path.to_path_buf(),
        entries,
    })
}

const DAY_WORDS: &[(&str, &[Weekday])] = &[
    ("monday", &[Weekday::Monday]),
    ("mon", &[Weekday::Monday]),
    ("tuesday", &[Weekday::Tuesday]),
    ("tue", &[Weekday::Tuesday]),
    ("tues", &[Weekday::Tuesday]),
    ("wednesday", &[Weekday::Wednesday]),
    ("wed", &[Weekday::Wednesday]),
    ("thursday", &[Weekday::Thursday]),
    ("thu", &[Weekday::Thursday]),
    ("thur", &[Weekday::Thursday]),
    ("thurs", &[Weekday::Thursday]),
    ("friday", &[Weekday::Friday]),
    ("fri", &[Weekday::Friday]),
    ("saturday", &[Weekday::Saturday]),
    ("sat", &[Weekday::Saturday]),
    ("sunday", &[Weekday::Sunday]),
    ("sun", &[Weekday::Sunday]),
    ("every day", &Weekday::ALL),
    ("everyday", &Weekday::ALL),
    ("daily", &Weekday::ALL),
    ("all days", &Weekday::ALL),
    (
        "weekdays",
        &[
            Weekday::Monday,
            Weekday::Tuesday,
            Weekday::Wednesday,
            Weekday::Thursday,
            Weekday::Friday,
        ],
    ),
    ("weekend", &[Weekday::Saturday, Weekday::Sunday]),
    ("weekends", &[Weekday::Saturday, Weekday::Sunday]),
];

fn parse_days(text: &str, path: &Path, line: usize) -> Result<Vec<Weekday>, ConfigError> {
    let normalized = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    let mut days = Vec::new();
    let words = normalized
        .split([',', '/', '&', '+'])
        .flat_map(|part| part.split(" and "))
        .map(str::trim)
        .filter(|w| !w.is_empty());
    let mut any = false;
    for word in words {
        any = true;
        let Some((_, found)) = DAY_WORDS.iter().find(|(w, _)| *w == word) else {
            let known: Vec<&str> = DAY_WORDS.iter().map(|(w, _)| *w).collect();
            let hint = match closest(word, known.iter().copied()) {
                Some(s) => format!("did you mean {}?", capitalise(s)),
                None => "use an English day name (Monday … Sunday), Every day, Weekdays or Weekend"
                    .to_string(),
            };
            return Err(ConfigError::new(
                ErrorKind::Weekday,
                path,
                Some(line),
                Some(word.to_string()),
                format!("{word:?} is not a day"),
                hint,
            ));
        };
        for d in found.iter() {
            if !days.contains(d) {
                days.push(*d);
            }
        }
    }
    if !any {
        return Err(ConfigError::new(
            ErrorKind::Weekday,
            path,
            Some(line),
            None,
            "the line names no day before the ':'".to_string(),
            "start the line with a day, e.g. `Monday: web01`".to_string(),
        ));
    }
    days.sort();
    Ok(days)
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().collect::<String>() + chars.as_str(),
        None => String::new(),
    }
}

/// Does `name` match `pattern`, where `*` stands for any text (case-sensitive)?
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.len() >= part.len() && rest.ends_with(part);
        } else if let Some(pos) = rest.find(part) {
            rest = &rest[pos + part.len()..];
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_days_and_names() {
        let text = "# notes\n\nMonday: web01, db-*\nmon and THURSDAY: mail,\nWeekend: fs\nEvery day: dns\nSunday:\n";
        let s = parse(text, Path::new("w.txt")).unwrap();
        assert_eq!(s.entries.len(), 5);
        assert_eq!(s.entries[0].days, vec![Weekday::Monday]);
        assert_eq!(s.entries[0].vms, vec!["web01", "db-*"]);
        assert_eq!(s.entries[0].line, 3);
        assert_eq!(s.entries[1].days, vec![Weekday::Monday, Weekday::Thursday]);
        assert_eq!(s.entries[1].vms, vec!["mail"]);
        assert_eq!(s.entries[2].days, vec![Weekday::Saturday, Weekday::Sunday]);
        assert_eq!(s.entries[3].days.len(), 7);
        assert!(s.entries[4].vms.is_empty());
    }

    #[test]
    fn notes_crlf_and_bom() {
        let text = "\u{feff}Monday: web01, web02 # the shop\r\nTuesday: db#1\r\n";
        let s = parse(text, Path::new("w.txt")).unwrap();
        assert_eq!(s.entries[0].vms, vec!["web01", "web02"]);
        assert_eq!(s.entries[1].vms, vec!["db#1"]);
    }

    #[test]
    fn typo_in_day_is_an_error_with_a_suggestion() {
        let err = parse("Monday: a\nWendesday: b\n", Path::new("/etc/w.txt")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/w.txt:2:"), "{text}");
        assert!(text.contains("did you mean Wednesday?"), "{text}");
        assert!(!text.contains('\n'));
        let err = parse("Monday web01\n", Path::new("w.txt")).unwrap_err();
        assert!(err.to_string().contains("no ':'"), "{err}");
    }

    #[test]
    fn globs() {
        assert!(glob_match("db-*", "db-01"));
        assert!(glob_match("db-*", "db-"));
        assert!(!glob_match("db-*", "xdb-01"));
        assert!(glob_match("*-prod", "web-prod"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(glob_match("web01", "web01"));
        assert!(!glob_match("web01", "web011"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
