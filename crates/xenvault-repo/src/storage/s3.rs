//! The S3 backend: a repository kept under a prefix of an S3 bucket, through Apache OpenDAL.
//!
//! OpenDAL's S3 service does the protocol (signing, path or virtual-host style
//! addressing, multipart uploads, range reads, listing); this module adds the
//! repository's semantics on top (ADR 0006):
//!
//! - `put_if_absent` sends `If-None-Match: *` where the server honours it
//!   (AWS S3 since 2024, MinIO, moto). A server that ignores the header would
//!   silently overwrite, so the strategy is chosen explicitly
//!   ([`PutIfAbsentStrategy`]): `Auto` (the default) probes the server once per
//!   opened repository by writing a probe object twice; where the second write
//!   is not refused it falls back to stat-then-put and says so in the log.
//! - Objects larger than [`S3Options::multipart_threshold`] go up as multipart
//!   uploads of [`S3Options::part_size`] parts; a stat first avoids uploading
//!   many MiB for an object that is already there.
//! - Errors become [`StorageErrorKind`]s and their messages name the bucket,
//!   the key and the likely fix (credentials, a missing bucket, an unreachable
//!   endpoint).
//!
//! Retries are not done here: wrap the backend in [`super::Retrying`]
//! ([`super::open_target`] always does).

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opendal::{ErrorKind as DalKind, Operator};
use tokio::sync::OnceCell;
use xenvault_types::config::Secret;

use super::{
    BoxFuture, ObjectMeta, Storage, StorageError, StorageErrorKind, validate_key, validate_prefix,
};

/// How `put_if_absent` keeps an existing object from being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PutIfAbsentStrategy {
    /// Probe the server once (the default): `IfNoneMatch` when it refuses a
    /// conditional overwrite, `StatThenPut` when it does not.
    #[default]
    Auto,
    /// Always a conditional `PUT` with `If-None-Match: *` (atomic).
    IfNoneMatch,
    /// A `HEAD` then an unconditional `PUT`: for servers without conditional
    /// writes. Not atomic: two writers of the same key at the same moment may
    /// both succeed and the later one wins (harmless for content-addressed
    /// chunks, whose bytes are equal; see ADR 0006 for manifests and locks).
    StatThenPut,
}

/// Where and how to reach an S3 repository.
#[derive(Clone)]
pub struct S3Options {
    /// The bucket.
    pub bucket: String,
    /// The key prefix the repository lives under (`""` for the bucket's root).
    pub prefix: String,
    /// The endpoint URL (`http://127.0.0.1:9000`); `None` for AWS in `region`.
    pub endpoint: Option<String>,
    /// The region (`us-east-1` by default).
    pub region: String,
    /// `bucket.endpoint/key` addressing instead of `endpoint/bucket/key`.
    pub virtual_host_style: bool,
    /// The access key id; `None` loads credentials from the environment
    /// (`AWS_ACCESS_KEY_ID`…, `~/.aws`, instance profile).
    pub access_key_id: Option<String>,
    /// The secret access key belonging to `access_key_id`.
    pub secret_access_key: Option<Secret>,
    /// How `put_if_absent` is made safe.
    pub put_if_absent: PutIfAbsentStrategy,
    /// Objects larger than this are uploaded in parts.
    pub multipart_threshold: usize,
    /// The size of one multipart part (at least 5 MiB on AWS).
    pub part_size: usize,
    /// How long establishing a connection may take before it counts as a
    /// transient failure.
    pub connect_timeout: Duration,
    /// How long one request may take in total.
    pub request_timeout: Duration,
    /// Static host name overrides (`bucket.s3.example`, address): for
    /// split-horizon setups and tests of virtual-host style on loopback.
    pub resolve: Vec<(String, SocketAddr)>,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("virtual_host_style", &self.virtual_host_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("put_if_absent", &self.put_if_absent)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

impl S3Options {
    /// Options for `bucket` under `prefix` with every default.
    pub fn new(bucket: &str, prefix: &str) -> S3Options {
        S3Options {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: "us-east-1".to_string(),
            virtual_host_style: false,
            access_key_id: None,
            secret_access_key: None,
            put_if_absent: PutIfAbsentStrategy::Auto,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            resolve: Vec::new(),
        }
    }
}

/// A repository in an S3 bucket (see the module documentation).
pub struct S3Storage {
    op: Operator,
    opts: S3Options,
    /// The strategy `Auto` resolved to (`true`: conditional writes work).
    conditional: OnceCell<bool>,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("opts", &self.opts)
            .field("conditional", &self.conditional.get())
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// Builds the client. Does not contact the server: the first operation does.
    pub fn new(opts: S3Options) -> Result<S3Storage, StorageError> {
        let place = format!("s3://{}/{}", opts.bucket, opts.prefix);
        let bad = |msg: String| StorageError::new(StorageErrorKind::Permanent, "open", &place, msg);
        if opts.bucket.is_empty() {
            return Err(bad("no bucket named: use s3://BUCKET/PREFIX".into()));
        }
        if opts.part_size < 5 << 20 {
            return Err(bad(format!(
                "part size {} is below S3's minimum of 5 MiB",
                opts.part_size
            )));
        }
        let mut b = opendal::services::S3::default()
            .bucket(&opts.bucket)
            .root(&format!("/{}", opts.prefix))
            .region(&opts.region);
        if let Some(ep) = &opts.endpoint {
            b = b.endpoint(ep);
        }
        if opts.virtual_host_style {
            b = b.enable_virtual_host_style();
        }
        match (&opts.access_key_id, &opts.secret_access_key) {
            (Some(id), Some(secret)) => {
                // Explicit keys: never fall back to other credentials silently.
                b = b
                    .access_key_id(id)
                    .secret_access_key(secret.expose())
                    .disable_config_load()
                    .disable_ec2_metadata();
            }
            (Some(_), None) => {
                return Err(bad("access-key-id is set but no secret access key: set \
                     secret-access-key-file or secret-access-key-env"
                    .into()));
            }
            (None, Some(_)) => {
                return Err(bad(
                    "a secret access key is set without access-key-id".into()
                ));
            }
            (None, None) => {}
        }
        let mut client = reqwest_opendal::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout);
        for (host, addr) in &opts.resolve {
            client = client.resolve(host, *addr);
        }
        let client = client
            .build()
            .map_err(|e| bad(format!("cannot build the HTTP client: {e}")))?;
        let transport = opendal::HttpTransporter::new(
            opendal_http_transport_reqwest::ReqwestTransport::new(client),
        );
        let op = Operator::new(b).map_err(|e| bad(format!("invalid S3 settings: {e}")))?;
        let op = op.with_context(opendal::OperationContext::new().with_http_transport(transport));
        Ok(S3Storage {
            op,
            opts,
            conditional: OnceCell::new(),
        })
    }

    /// The options this backend was built with.
    pub fn options(&self) -> &S3Options {
        &self.opts
    }

    /// Whether `put_if_absent` uses `If-None-Match: *` (probing the server
    /// first when the strategy is `Auto`).
    pub async fn uses_conditional_writes(&self) -> Result<bool, StorageError> {
        match self.opts.put_if_absent {
            PutIfAbsentStrategy::IfNoneMatch => Ok(true),
            PutIfAbsentStrategy::StatThenPut => Ok(false),
            PutIfAbsentStrategy::Auto => self
                .conditional
                .get_or_try_init(|| self.probe_conditional_writes())
                .await
                .copied(),
        }
    }

    /// Writes a probe object, then writes it again with `If-None-Match: *`:
    /// a server that refuses the second write honours conditional writes.
    async fn probe_conditional_writes(&self) -> Result<bool, StorageError> {
        let mut rnd = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut rnd);
        let key = format!("probe/if-none-match-{}", hex::encode(rnd));
        let body = Bytes::from_static(b"xenvault conditional write probe");
        self.op
            .write(&key, body.clone())
            .await
            .map_err(|e| self.error("probe", &key, &e))?;
        let second = self.op.write_with(&key, body).if_not_exists(true).await;
        let cleanup = self.op.delete(&key).await;
        let supported = match second {
            Err(e)
                if matches!(
                    e.kind(),
                    DalKind::ConditionNotMatch | DalKind::AlreadyExists
                ) =>
            {
                true
            }
            Ok(_) => false,
            // 501 NotImplemented and friends: no conditional writes here.
            Err(e) if matches!(e.kind(), DalKind::Unsupported) || !e.is_temporary() => {
                tracing::debug!(error = %e, "conditional write probe refused");
                false
            }
            Err(e) => return Err(self.error("probe", &key, &e)),
        };
        if let Err(e) = cleanup {
            tracing::warn!(key, error = %e, "could not delete the conditional write probe object");
        }
        if supported {
            tracing::debug!(bucket = %self.opts.bucket, "S3 server honours If-None-Match: *");
        } else {
            tracing::warn!(bucket = %self.opts.bucket, endpoint = ?self.opts.endpoint,
                "this S3 server ignores If-None-Match: put-if-absent falls back to \
                 stat-then-put (not atomic; see docs/design/0006-storage-backends.md)");
        }
        Ok(supported)
    }

    /// `s3://bucket/prefix/key`, for messages.
    fn url_of(&self, key: &str) -> String {
        if self.opts.prefix.is_empty() {
            format!("s3://{}/{key}", self.opts.bucket)
        } else {
            format!("s3://{}/{}/{key}", self.opts.bucket, self.opts.prefix)
        }
    }

    fn endpoint_name(&self) -> String {
        self.opts
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 in {}", self.opts.region))
    }

    /// Maps an OpenDAL error to a storage error whose message names the
    /// object and the fix.
    fn error(&self, op: &'static str, key: &str, e: &opendal::Error) -> StorageError {
        let url = self.url_of(key);
        let text = chain(e);
        let (kind, hint) = match e.kind() {
            DalKind::NotFound => (StorageErrorKind::NotFound, String::new()),
            DalKind::ConditionNotMatch | DalKind::AlreadyExists => {
                (StorageErrorKind::AlreadyExists, String::new())
            }
            DalKind::ConfigInvalid if text.contains("NoSuchBucket") => (
                StorageErrorKind::Permanent,
                format!(
                    "bucket '{}' does not exist at {}: create it or correct the url",
                    self.opts.bucket,
                    self.endpoint_name()
                ),
            ),
            DalKind::PermissionDenied => (
                StorageErrorKind::Permanent,
                format!(
                    "access denied by {}: check access-key-id and the secret access key \
                     (and the bucket policy for bucket '{}')",
                    self.endpoint_name(),
                    self.opts.bucket
                ),
            ),
            DalKind::RateLimited => (
                StorageErrorKind::Transient,
                "the server asks to slow down".to_string(),
            ),
            _ if e.is_temporary() => {
                let unreachable = ["connect", "dns error", "timed out", "Connection refused"]
                    .iter()
                    .any(|w| text.contains(w));
                let hint = if unreachable {
                    format!(
                        "cannot reach {}: check the endpoint and that the server runs",
                        self.endpoint_name()
                    )
                } else {
                    String::new()
                };
                (StorageErrorKind::Transient, hint)
            }
            _ => (StorageErrorKind::Permanent, String::new()),
        };
        let message = if hint.is_empty() {
            format!("{url}: {text}")
        } else {
            format!("{url}: {hint} ({text})")
        };
        StorageError::new(kind, op, key, message)
    }

    async fn write(&self, key: &str, data: Bytes, if_not_exists: bool) -> opendal::Result<()> {
        if data.len() > self.opts.multipart_threshold {
            let mut w = self
                .op
                .writer_with(key)
                .chunk(self.opts.part_size)
                .concurrent(2)
                .if_not_exists(if_not_exists)
                .await?;
            // A failed upload is aborted so its parts do not linger (and cost).
            if let Err(e) = w.write(data).await {
                let _ = w.abort().await;
                return Err(e);
            }
            if let Err(e) = w.close().await {
                let _ = w.abort().await;
                return Err(e);
            }
        } else {
            self.op
                .write_with(key, data)
                .if_not_exists(if_not_exists)
                .await?;
        }
        Ok(())
    }

    async fn exists(&self, op: &'static str, key: &str) -> Result<bool, StorageError> {
        match self.op.stat(key).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == DalKind::NotFound => Ok(false),
            Err(e) => Err(self.error(op, key, &e)),
        }
    }
}

/// An error and its causes, on one line (the cause says "connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(t.trim());
        }
        cur = c.source();
    }
    s
}

fn modified_of(md: &opendal::Metadata) -> SystemTime {
    md.last_modified()
        .map(SystemTime::from)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Storage for S3Storage {
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            const OP: &str = "put_if_absent";
            validate_key(OP, key)?;
            let conditional = self.uses_conditional_writes().await?;
            // Without conditional writes the stat is the only guard; with them a
            // stat still saves uploading a large object that is already there.
            if (!conditional || data.len() > self.opts.multipart_threshold)
                && self.exists(OP, key).await?
            {
                return Err(StorageError::new(
                    StorageErrorKind::AlreadyExists,
                    OP,
                    key,
                    format!("{}: object already exists", self.url_of(key)),
                ));
            }
            self.write(key, data, conditional)
                .await
                .map_err(|e| self.error(OP, key, &e))
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("put", key)?;
            self.write(key, data, false)
                .await
                .map_err(|e| self.error("put", key, &e))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(async move {
            validate_key("get", key)?;
            let buf = self
                .op
                .read(key)
                .await
                .map_err(|e| self.error("get", key, &e))?;
            Ok(buf.to_bytes())
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(async move {
            const OP: &str = "get_range";
            validate_key(OP, key)?;
            let end = offset.saturating_add(len);
            if len > 0 {
                match self.op.read_with(key).range(offset..end).await {
                    Ok(buf) => return Ok(buf.to_bytes()),
                    Err(e)
                        if e.kind() == DalKind::NotFound
                            || e.is_temporary()
                            || !matches!(
                                e.kind(),
                                DalKind::RangeNotSatisfied | DalKind::Unexpected
                            ) =>
                    {
                        return Err(self.error(OP, key, &e));
                    }
                    // S3 refuses a range starting past the end (416) and OpenDAL
                    // refuses one ending past it ("too little data"): clamp below.
                    Err(_) => {}
                }
            }
            let size = match self.op.stat(key).await {
                Ok(md) => md.content_length(),
                Err(e) => return Err(self.error(OP, key, &e)),
            };
            let start = offset.min(size);
            let end = end.min(size);
            if start >= end {
                return Ok(Bytes::new());
            }
            let buf = self
                .op
                .read_with(key)
                .range(start..end)
                .await
                .map_err(|e| self.error(OP, key, &e))?;
            Ok(buf.to_bytes())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StorageError>> {
        Box::pin(async move {
            validate_prefix(prefix)?;
            let entries = self
                .op
                .list_with(prefix)
                .recursive(true)
                .await
                .map_err(|e| self.error("list", prefix, &e))?;
            let mut out = Vec::with_capacity(entries.len());
            for entry in entries {
                let path = entry.path();
                if path.ends_with('/') || !path.starts_with(prefix) {
                    continue;
                }
                let md = entry.metadata();
                out.push(ObjectMeta {
                    key: path.to_string(),
                    size: md.content_length(),
                    modified: modified_of(md),
                });
            }
            Ok(out)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("delete", key)?;
            match self.op.delete(key).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == DalKind::NotFound => Ok(()),
                Err(e) => Err(self.error("delete", key, &e)),
            }
        })
    }

    fn stat<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            validate_key("stat", key)?;
            let md = self
                .op
                .stat(key)
                .await
                .map_err(|e| self.error("stat", key, &e))?;
            if md.is_dir() {
                return Err(StorageError::not_found("stat", key));
            }
            Ok(ObjectMeta {
                key: key.to_string(),
                size: md.content_length(),
                modified: modified_of(&md),
            })
        })
    }
}
