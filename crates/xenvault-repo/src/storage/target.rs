//! Opening the storage a repository target names: a local path, `s3://bucket/prefix`
//! or `sftp://user@host:port/dir`, always behind [`Retrying`].

use std::sync::Arc;

use xenvault_types::config::{TargetConfig, TargetKind};

use super::{
    LocalStorage, RetryPolicy, Retrying, S3Options, S3Storage, SftpOptions, SftpStorage, Storage,
    StorageError, StorageErrorKind, validate_key,
};

/// Where a repository `url` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// `s3://BUCKET[/PREFIX]`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix (no leading or trailing `/`; `""` for the bucket root).
        prefix: String,
    },
    /// `sftp://[USER@]HOST[:PORT]/DIR` (`/~/DIR` for a directory under the login directory).
    Sftp {
        /// The login name (`""`: ssh's default, the local user or `~/.ssh/config`'s).
        user: String,
        /// The host name or address (IPv6 without brackets).
        host: String,
        /// The port (22 when absent).
        port: u16,
        /// The directory: absolute, or relative to the login directory.
        dir: String,
    },
}

fn url_error(url: &str, why: &str) -> StorageError {
    StorageError::new(
        StorageErrorKind::Permanent,
        "open",
        url,
        format!(
            "invalid repository url: {why} (expected s3://BUCKET/PREFIX or \
             sftp://USER@HOST:PORT/DIR)"
        ),
    )
}

/// Parses a repository `url` (no percent-encoding: names are taken literally).
pub fn parse_target_url(url: &str) -> Result<TargetUrl, StorageError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(url_error(url, "no bucket"));
        }
        if !(3..=63).contains(&bucket.len())
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(url_error(
                url,
                "a bucket name has 3 to 63 characters of a-z, 0-9, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key("open", prefix).map_err(|e| url_error(url, &e.message))?;
        }
        return Ok(TargetUrl::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        });
    }
    if let Some(rest) = url.strip_prefix("sftp://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some(("", _)) => return Err(url_error(url, "empty user before '@'")),
            Some((u, h)) => (u, h),
            None => ("", authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(url_error(url, "unclosed '[' in the host"));
            };
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(url_error(url, "no host"));
        }
        let port = match port {
            None => 22,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| url_error(url, "the port is not a number from 1 to 65535"))?,
        };
        let dir = if let Some(home) = path.strip_prefix("/~") {
            home.trim_start_matches('/').to_string()
        } else {
            path.to_string()
        };
        if dir.is_empty() || dir == "/" {
            return Err(url_error(
                url,
                "no directory: name one (/srv/repo, or /~/repo under the login directory)",
            ));
        }
        if dir.split('/').any(|s| s == "..") {
            return Err(url_error(url, "'..' in the directory"));
        }
        return Ok(TargetUrl::Sftp {
            user: user.to_string(),
            host: host.to_string(),
            port,
            dir,
        });
    }
    Err(match url.split_once("://") {
        Some((scheme, _)) => url_error(url, &format!("the scheme {scheme}:// is not supported")),
        None => url_error(
            url,
            "not a URL (for a local directory, write path = \"…\" instead of url)",
        ),
    })
}

/// The S3 options of a target whose url is `s3://bucket/prefix`.
pub fn s3_options(target: &TargetConfig, bucket: &str, prefix: &str) -> S3Options {
    let mut o = S3Options::new(bucket, prefix);
    if let Some(c) = &target.s3 {
        o.endpoint = c.endpoint.clone();
        o.region = c.region.clone();
        o.virtual_host_style = c.virtual_host_style;
        o.access_key_id = c.access_key_id.clone();
        o.secret_access_key = c.secret_access_key.clone();
    }
    o
}

/// Opens the storage of a `type = "repository"` target: the local directory
/// `path`, or the `url` (S3, SFTP), wrapped in [`Retrying`] with the default
/// policy. Does not contact a remote server yet: the first operation does.
pub fn open_target(target: &TargetConfig) -> Result<Arc<dyn Storage>, StorageError> {
    let name = &target.name;
    let bad = |msg: String| StorageError::new(StorageErrorKind::Permanent, "open", name, msg);
    if target.kind != TargetKind::Repository {
        return Err(bad(format!(
            "target {name} is an archive, not a repository: set type = \"repository\""
        )));
    }
    let policy = RetryPolicy::default();
    let Some(url) = &target.url else {
        if target.path.as_os_str().is_empty() {
            return Err(bad(format!(
                "target {name} has neither path nor url: set one of them"
            )));
        }
        let local = LocalStorage::new(&target.path)?;
        return Ok(Arc::new(Retrying::new(local, policy)));
    };
    match parse_target_url(url)? {
        TargetUrl::S3 { bucket, prefix } => {
            if target.sftp.is_some() {
                return Err(bad(format!(
                    "target {name}: [sftp] settings given for an s3:// url"
                )));
            }
            let s3 = S3Storage::new(s3_options(target, &bucket, &prefix))?;
            Ok(Arc::new(Retrying::new(s3, policy)))
        }
        TargetUrl::Sftp {
            user,
            host,
            port,
            dir,
        } => {
            let Some(cfg) = &target.sftp else {
                return Err(bad(format!(
                    "target {name}: an sftp:// url needs [targets.{name}.sftp] with key-file \
                     (key authentication only)"
                )));
            };
            if target.s3.is_some() {
                return Err(bad(format!(
                    "target {name}: [s3] settings given for an sftp:// url"
                )));
            }
            let mut o = SftpOptions::new(&user, &host, &dir, &cfg.key_file);
            o.port = port;
            o.known_hosts_file = cfg.known_hosts_file.clone();
            let sftp = SftpStorage::new(o)?;
            Ok(Arc::new(Retrying::new(sftp, policy)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_target_url("s3://bkt/some/prefix/").unwrap(),
            TargetUrl::S3 {
                bucket: "bkt".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            parse_target_url("s3://bkt").unwrap(),
            TargetUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse_target_url("sftp://backup@nas.example:2222/srv/repo").unwrap(),
            TargetUrl::Sftp {
                user: "backup".into(),
                host: "nas.example".into(),
                port: 2222,
                dir: "/srv/repo".into()
            }
        );
        assert_eq!(
            parse_target_url("sftp://nas:2200/srv/r").unwrap(),
            TargetUrl::Sftp {
                user: String::new(),
                host: "nas".into(),
                port: 2200,
                dir: "/srv/r".into()
            }
        );
        assert_eq!(
            parse_target_url("sftp://me@[::1]/~/repo").unwrap(),
            TargetUrl::Sftp {
                user: "me".into(),
                host: "::1".into(),
                port: 22,
                dir: "repo".into()
            }
        );
        for bad in [
            "s3://",
            "s3://Bad_Bucket/x",
            "s3://ab/x",
            "s3://b/a//b",
            "sftp://@host/dir",
            "sftp://u@host:0/dir",
            "sftp://u@host:99999/dir",
            "sftp://u@host",
            "sftp://u@host/",
            "sftp://u@host/a/../b",
            "ftp://x/y",
        ] {
            let e = parse_target_url(bad).unwrap_err();
            assert!(e.message.contains("invalid repository url"), "{bad}: {e}");
        }
    }

    #[test]
    fn targets_open_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TargetConfig::archive("r", dir.path());
        let e = open_target(&t).err().unwrap();
        assert!(e.message.contains("set type = \"repository\""), "{e}");
        t.kind = TargetKind::Repository;
        assert!(open_target(&t).is_ok());
        t.url = Some("sftp://u@h/srv/r".into());
        let e = open_target(&t).err().unwrap();
        assert!(e.message.contains("key-file"), "{e}");
        t.url = Some("s3://bucket/p".into());
        assert!(open_target(&t).is_ok(), "S3 opens lazily");
    }
}
