//! Reading passwords: from a file only its owner can read, or from an
//! environment variable. The values only ever live in a `Secret`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use xenvault_types::config::Secret;

/// Why a password could not be read: (problem, fix), both one line.
pub type SecretProblem = (String, String);

/// Reads the first line of `path`; refuses a file readable or writable by
/// group or others.
pub fn read_password_file(path: &Path) -> Result<Secret, SecretProblem> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            format!("cannot read the password file {shown}: {e}"),
            "create it with the password on its first line and `chmod 600` it".to_string(),
        )
    })?;
    if !meta.is_file() {
        return Err((
            format!("the password file {shown} is not a regular file"),
            "point password-file at a file holding the password".to_string(),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err((
            format!("the password file {shown} can be read by group or others (mode {mode:04o})"),
            format!("run `chmod 600 {shown}`"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        (
            format!("cannot read the password file {shown}: {e}"),
            "check its owner: xenvault must be able to read it".to_string(),
        )
    })?;
    let first = text.lines().next().unwrap_or_default();
    if first.is_empty() {
        return Err((
            format!("the password file {shown} is empty"),
            "write the password on its first line".to_string(),
        ));
    }
    Ok(Secret::new(first))
}

/// Reads the environment variable `name`.
pub fn read_password_env(name: &str) -> Result<Secret, SecretProblem> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
        Ok(_) => Err((
            format!("the environment variable {name} is empty"),
            format!("set {name} to the password before running xenvault"),
        )),
        Err(std::env::VarError::NotPresent) => Err((
            format!("the environment variable {name} is not set"),
            format!(
                "export {name}=<password> before running xenvault, or use password-file instead"
            ),
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err((
            format!("the environment variable {name} is not valid UTF-8"),
            format!("set {name} to the password in UTF-8"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn file_permissions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        fs::write(&p, "s3cret\nignored\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&p).unwrap().expose(), "s3cret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let (problem, fix) = read_password_file(&p).unwrap_err();
        assert!(problem.contains("0640"), "{problem}");
        assert!(fix.contains("chmod 600"), "{fix}");
        let (problem, _) = read_password_file(&dir.path().join("missing")).unwrap_err();
        assert!(problem.contains("cannot read"), "{problem}");
    }

    #[test]
    fn env_missing() {
        let (problem, fix) = read_password_env("XENVAULT_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert!(problem.contains("is not set"));
        assert!(fix.contains("export XENVAULT_TEST_SURELY_UNSET_VAR"));
    }
}
