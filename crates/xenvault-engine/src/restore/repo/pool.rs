//! Repository restores into a pool: a whole VM (an XVA rebuilt from the
//! manifest's records and the disks' chunks, through `PUT /import`, with
//! the archive restore's identity options and clean-up), and one disk into a
//! new VDI (`VDI.create` + `PUT /import_raw_vdi`, raw or VHD).

use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Serialize;
use tokio::runtime::Handle;
use xenvault_formats::xva::ChecksumKind;
use xenvault_repo::{Manifest, Repository};
use xenvault_xapi::http::handler_url;
use xenvault_xapi::records::VdiRef;

use super::encode::{
    DiskBody, VHD_BLOCK_SIZE, disk_upload_body, dynamic_vhd, manifest_ova, raw_pieces, sending,
    vhd_blocks_of_index, vhd_pieces, xva_pieces,
};
use super::{DEFAULT_PARALLEL, RepoDisk, RepoFailure, point_label, select_disk};
use crate::restore::connect::{PoolConnection, settle_transfer};
use crate::restore::content::blocking_stream;
use crate::restore::disk::{VdiGuard, create_vdi};
use crate::restore::rebuild::{blank_disks_xva, measure_ova};
use crate::restore::vm::{
    XvaImport, check_identity, default_name, edit_ova, free_name, import_xva, missing_networks,
};
use crate::restore::{
    Cancel, DiskSelector, ProgressFn, RestoreError, RestorePhase, RestoreProgress, RestoredDisk,
    RestoredVm, VmIdentity,
};

/// How to restore a VM from the repository.
#[derive(Debug, Clone)]
pub struct RepoVmRestoreOptions {
    /// SR uuid or ref; `None` = the pool's default SR.
    pub sr: Option<String>,
    /// New VM or original identity.
    pub identity: VmIdentity,
    /// Start the VM once restored.
    pub start: bool,
    /// How the disks' data reaches the pool.
    pub method: VmRestoreMethod,
    /// Disks uploaded at once ([`VmRestoreMethod::RawVdis`]).
    pub disk_concurrency: usize,
    /// Chunks fetched at once per disk.
    pub parallel: usize,
    /// Stops the restore when set.
    pub cancel: Cancel,
}

impl Default for RepoVmRestoreOptions {
    fn default() -> Self {
        RepoVmRestoreOptions {
            sr: None,
            identity: VmIdentity::New { name: None },
            start: false,
            method: VmRestoreMethod::default(),
            disk_concurrency: 2,
            parallel: DEFAULT_PARALLEL,
            cancel: Cancel::default(),
        }
    }
}

/// How a VM's disks reach the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRestoreMethod {
    /// One XVA holding everything through `PUT /import` (every chunk of
    /// every disk is sent, zeros included).
    #[default]
    Xva,
    /// The VM and blank disks through `PUT /import` (a few MiB), then each
    /// disk's data as a VHD of its allocated blocks through
    /// `PUT /import_raw_vdi`, several disks at once: much less to send for
    /// sparse disks.
    RawVdis,
}

/// The format a disk is sent to `/import_raw_vdi` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadFormat {
    /// Every byte (holes as zeros).
    Raw,
    /// A dynamic VHD holding the blocks with data (smaller on sparse disks).
    #[default]
    Vhd,
}

impl UploadFormat {
    fn as_str(self) -> &'static str {
        match self {
            UploadFormat::Raw => "raw",
            UploadFormat::Vhd => "vhd",
        }
    }
}

/// How to restore one disk from the repository into a new VDI.
#[derive(Debug, Clone)]
pub struct RepoDiskRestoreOptions {
    /// Which disk.
    pub disk: DiskSelector,
    /// SR uuid or ref; `None` = the pool's default SR.
    pub sr: Option<String>,
    /// The new VDI's name (default `"<disk name> (restored <id>)"`).
    pub name: Option<String>,
    /// Upload format.
    pub format: UploadFormat,
    /// Chunks fetched at once.
    pub parallel: usize,
    /// Stops the restore when set.
    pub cancel: Cancel,
}

impl RepoDiskRestoreOptions {
    /// Disk `disk`, default SR and name, VHD upload.
    pub fn new(disk: DiskSelector) -> RepoDiskRestoreOptions {
        RepoDiskRestoreOptions {
            disk,
            sr: None,
            name: None,
            format: UploadFormat::default(),
            parallel: DEFAULT_PARALLEL,
            cancel: Cancel::default(),
        }
    }
}

/// How restored objects name where they come from.
fn source_dir(repo: &Repository, manifest: &Manifest) -> String {
    format!("repository {}: {}", repo.config().id, manifest.name())
}

/// Restores the VM of restore point `manifest` into the pool: an XVA is
/// rebuilt from the manifest's records with the disks' chunks and sent to
/// `PUT /import` (Content-Length computed first). A damaged chunk stops the
/// upload; XAPI's half-made VM is removed and the error names the chunk.
pub async fn restore_repo_vm(
    pool: &PoolConnection,
    repo: &Repository,
    manifest: &Manifest,
    options: &RepoVmRestoreOptions,
    progress: ProgressFn,
) -> Result<RestoredVm, RestoreError> {
    let started_at = Instant::now();
    let label = point_label(manifest);
    // 1. The VM from its records, before anything touches the pool.
    let (mut ova, disks) = manifest_ova(manifest)?;

    // 2. The pool side: SR, identity clash, name.
    let (sr_ref, sr) = pool.choose_sr(options.sr.as_deref()).await?;
    check_identity(pool, &options.identity, &manifest.vm_uuid).await?;
    let preserve = matches!(options.identity, VmIdentity::Preserve { .. });
    let name = match &options.identity {
        VmIdentity::New { name: Some(n) } => n.clone(),
        VmIdentity::New { name: None } => {
            free_name(pool, default_name(&manifest.vm_name, &manifest.id)).await?
        }
        VmIdentity::Preserve { .. } => manifest.vm_name.clone(),
    };
    edit_ova(
        &mut ova,
        &name,
        preserve.then_some(manifest.vm_uuid.as_str()),
        pool.restoring_tag(),
    );
    let upload_len = measure_ova(&ova).map_err(|reason| RestoreError::Unusable {
        dir: label.clone().into(),
        reason,
    })?;
    let networks_created = missing_networks(pool, &ova).await?;

    let what = format!(
        "import of restore point {label} into SR {} ({})",
        sr.uuid, sr.name_label
    );
    let mut restored = match options.method {
        VmRestoreMethod::Xva => {
            // The XVA encoded on a blocking thread from the chunks.
            let failure = RepoFailure::default();
            let body = xva_body(
                repo, manifest, ova, disks, upload_len, options, &failure, &progress,
            );
            import_xva(
                pool,
                XvaImport {
                    label,
                    what,
                    sr_ref,
                    sr,
                    preserve,
                    name,
                    body,
                    upload_len,
                    start: options.start,
                    cancel: options.cancel.clone(),
                    completes: true,
                },
                progress,
            )
            .await
            .map_err(|e| failure.explain(e))?
        }
        VmRestoreMethod::RawVdis => {
            let xva = blank_disks_xva(&ova).map_err(|reason| RestoreError::Unusable {
                dir: label.clone().into(),
                reason,
            })?;
            let len = xva.len() as u64;
            let body = futures::stream::once(async move { Ok(Bytes::from(xva)) }).boxed();
            let restored = import_xva(
                pool,
                XvaImport {
                    label,
                    what,
                    sr_ref,
                    sr,
                    preserve,
                    name,
                    body,
                    upload_len: len,
                    start: false,
                    cancel: options.cancel.clone(),
                    completes: false,
                },
                progress.clone(),
            )
            .await?;
            fill_disks(pool, repo, manifest, &disks, restored, options, progress).await?
        }
    };
    restored.source_dir = source_dir(repo, manifest);
    restored.original_uuid = manifest.vm_uuid.clone();
    restored.networks_created = networks_created;
    // Every chunk is checked against its id as it is read.
    restored.verified = true;
    restored.seconds = started_at.elapsed().as_secs_f64();
    Ok(restored)
}

/// The whole XVA as an upload body, encoded on a blocking thread.
#[allow(clippy::too_many_arguments)] // the pieces of one upload
fn xva_body(
    repo: &Repository,
    manifest: &Manifest,
    ova: xenvault_formats::xva::OvaXml,
    disks: Vec<RepoDisk>,
    upload_len: u64,
    options: &RepoVmRestoreOptions,
    failure: &RepoFailure,
    progress: &ProgressFn,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let (repo, manifest) = (repo.clone(), manifest.clone());
    let (failure, progress) = (failure.clone(), progress.clone());
    let parallel = options.parallel.max(1);
    blocking_stream(options.cancel.clone(), move |tx| {
        let handle = Handle::current();
        let produced = xva_pieces(
            &handle,
            &repo,
            &manifest,
            &ova,
            &disks,
            parallel,
            &failure,
            // What current XAPI writes.
            ChecksumKind::XxHash,
            &mut sending(tx, &progress, upload_len),
        )?;
        if produced != upload_len {
            return Err(std::io::Error::other(format!(
                "the rebuilt XVA has {produced} bytes, {upload_len} were announced"
            )));
        }
        Ok(())
    })
    .boxed()
}

/// After the VM and its blank disks were imported: each disk's data into
/// its new VDI (several at once), then the start. Any failure removes the
/// VM and its disks.
async fn fill_disks(
    pool: &PoolConnection,
    repo: &Repository,
    manifest: &Manifest,
    disks: &[RepoDisk],
    mut restored: RestoredVm,
    options: &RepoVmRestoreOptions,
    progress: ProgressFn,
) -> Result<RestoredVm, RestoreError> {
    let vm_ref = xenvault_xapi::records::VmRef::new(&restored.vm_ref);
    let filled = async {
        // Pair each new VDI with its repository disk: by position, else in order.
        let mut jobs = Vec::new();
        for (i, new) in restored.disks.iter().enumerate() {
            let disk = disks
                .iter()
                .find(|d| d.userdevice.as_deref() == Some(new.userdevice.as_str()))
                .or_else(|| disks.get(i))
                .ok_or_else(|| RestoreError::Unusable {
                    dir: point_label(manifest).into(),
                    reason: format!(
                        "the import made disk {} that the restore point lacks",
                        new.userdevice
                    ),
                })?;
            let vdi = pool
                .session
                .vdi()
                .get_by_uuid(&new.vdi_uuid)
                .await
                .map_err(|e| RestoreError::xapi("cannot find a restored VDI", e))?;
            let upload = prepare_upload(repo, manifest, disk, UploadFormat::Vhd).await?;
            jobs.push((disk.clone(), vdi, upload));
        }
        let total: u64 = jobs.iter().map(|(_, _, u)| u.len).sum();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let uploads = jobs.into_iter().map(|(disk, vdi, upload)| {
            let sent = sent.clone();
            let outer = progress.clone();
            let last = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let per_disk: ProgressFn = std::sync::Arc::new(move |p: RestoreProgress| {
                use std::sync::atomic::Ordering::Relaxed;
                if p.phase == RestorePhase::Uploading {
                    let before = last.swap(p.done, Relaxed);
                    let delta = p.done.saturating_sub(before);
                    let now = sent.fetch_add(delta, Relaxed) + delta;
                    outer(RestoreProgress {
                        phase: RestorePhase::Uploading,
                        done: now,
                        total,
                    });
                }
            });
            async move {
                upload_disk(
                    pool,
                    repo,
                    manifest,
                    &disk,
                    &vdi,
                    upload,
                    options.parallel,
                    &per_disk,
                    &options.cancel,
                )
                .await
            }
        });
        let results: Vec<Result<u64, RestoreError>> = futures::stream::iter(uploads)
            .buffer_unordered(options.disk_concurrency.max(1))
            .collect()
            .await;
        let mut bytes = 0;
        for r in results {
            bytes += r?;
        }
        Ok::<u64, RestoreError>(bytes)
    }
    .await;
    // Whole: the VM's restoring tag goes before it may start.
    let filled = match filled {
        Ok(bytes) => pool.finish_vm(&vm_ref).await.map(|()| bytes),
        Err(e) => Err(e),
    };
    match filled {
        Ok(bytes) => restored.bytes += bytes,
        Err(e) => {
            return Err(match pool.destroy_vm_and_disks(&vm_ref).await {
                Ok(()) => e,
                Err(leftovers) => RestoreError::CleanupFailed {
                    cause: Box::new(e),
                    leftovers,
                },
            });
        }
    }
    if options.start {
        match pool.session.vm().start(&vm_ref, false, false).await {
            Ok(()) => restored.started = true,
            Err(e) => restored.start_error = Some(e.to_string()),
        }
    }
    Ok(restored)
}

/// Sends `body` (exactly `len` bytes, in the format `query` says:
/// `format=…`, maybe `chunked`) into `vdi` through `PUT /import_raw_vdi`
/// inside a task, and waits for XAPI to finish.
#[allow(clippy::too_many_arguments)] // one upload, described in full
pub(crate) async fn put_raw_vdi(
    pool: &PoolConnection,
    label: &str,
    vdi: &VdiRef,
    query: &[(&str, &str)],
    body: BoxStream<'static, std::io::Result<Bytes>>,
    len: u64,
    what: &str,
    progress: &ProgressFn,
    cancel: &Cancel,
) -> Result<(), RestoreError> {
    let session = &pool.session;
    let task = session
        .create_task(&format!("xenvault restore disk {label}"), "")
        .await
        .map_err(|e| RestoreError::xapi("cannot create the import task", e))?;
    let url = handler_url(
        &session.base_url(),
        "/import_raw_vdi",
        session.session_ref().expose(),
        Some(task.id()),
        &[&[("vdi", vdi.as_str())], query].concat(),
    );
    let sent = pool.transfer.put(url, body, len).await;
    progress(RestoreProgress {
        phase: RestorePhase::Finishing,
        done: len,
        total: len,
    });
    settle_transfer(task, sent, what, cancel).await?;
    if cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }
    Ok(())
}

/// The upload of one disk: its format, length and (for VHD) encoder.
struct DiskUpload {
    format: UploadFormat,
    len: u64,
    vhd: Option<xenvault_formats::vhd::VhdEncoder>,
}

/// Prepares the upload of `disk` (a VHD's BAT comes first: its blocks are
/// known from the index).
async fn prepare_upload(
    repo: &Repository,
    manifest: &Manifest,
    disk: &RepoDisk,
    format: UploadFormat,
) -> Result<DiskUpload, RestoreError> {
    let label = point_label(manifest);
    // XAPI takes no VHD over 2040 GiB, and VHD sizes are whole sectors: such
    // disks go raw.
    let vhd_possible =
        disk.size.is_multiple_of(512) && disk.size <= xenvault_formats::vhd::MAX_WRITE_VIRTUAL_SIZE;
    if format == UploadFormat::Vhd && !vhd_possible {
        tracing::info!(disk = %disk.key, size = disk.size, "the disk cannot be sent as a VHD: sending it raw");
    }
    let format = if vhd_possible {
        format
    } else {
        UploadFormat::Raw
    };
    match format {
        UploadFormat::Raw => Ok(DiskUpload {
            format,
            len: disk.size,
            vhd: None,
        }),
        UploadFormat::Vhd => {
            let entry = manifest
                .disk(&disk.key)
                .map_err(|e| RestoreError::repo(format!("restore point {label}"), e))?;
            let index = repo.load_index(&entry.index).await.map_err(|e| {
                RestoreError::repo(format!("reading disk {} of {label}", disk.key), e)
            })?;
            let blocks = vhd_blocks_of_index(&index, VHD_BLOCK_SIZE);
            let enc = dynamic_vhd(disk.size, &blocks).map_err(|reason| RestoreError::Unusable {
                dir: label.clone().into(),
                reason,
            })?;
            Ok(DiskUpload {
                format,
                len: enc.total_len(),
                vhd: Some(enc),
            })
        }
    }
}

/// Sends `disk`'s data into `vdi` (blank: only data is written); returns
/// the bytes sent. A damaged chunk comes back as the repository's error.
#[allow(clippy::too_many_arguments)] // one upload, described in full
async fn upload_disk(
    pool: &PoolConnection,
    repo: &Repository,
    manifest: &Manifest,
    disk: &RepoDisk,
    vdi: &VdiRef,
    upload: DiskUpload,
    parallel: usize,
    progress: &ProgressFn,
    cancel: &Cancel,
) -> Result<u64, RestoreError> {
    let label = point_label(manifest);
    let DiskUpload { format, len, vhd } = upload;
    let failure = RepoFailure::default();
    let size = disk.size;
    let body = disk_upload_body(
        DiskBody {
            repo: repo.clone(),
            manifest: manifest.clone(),
            key: disk.key.clone(),
            chunks: None,
            parallel,
            failure: failure.clone(),
            progress: progress.clone(),
            cancel: cancel.clone(),
            len,
        },
        move |reader, emit| match vhd {
            None => raw_pieces(reader, size, emit),
            Some(enc) => vhd_pieces(reader, enc, emit),
        },
    );
    let what = format!(
        "upload of disk {} of {label} into VDI {vdi}",
        disk.describe()
    );
    put_raw_vdi(
        pool,
        &label,
        vdi,
        &[("format", format.as_str())],
        body,
        len,
        &what,
        progress,
        cancel,
    )
    .await
    .map_err(|e| failure.explain(e))?;
    Ok(len)
}

/// Restores one disk of `manifest` into a new VDI on the chosen SR. A
/// failure (a damaged chunk included) destroys the new VDI.
pub async fn restore_repo_disk(
    pool: &PoolConnection,
    repo: &Repository,
    manifest: &Manifest,
    options: &RepoDiskRestoreOptions,
    progress: ProgressFn,
) -> Result<RestoredDisk, RestoreError> {
    let started_at = Instant::now();
    let label = point_label(manifest);
    let disk = select_disk(manifest, &options.disk)?;
    let upload = prepare_upload(repo, manifest, &disk, options.format).await?;
    let format = upload.format;

    // The new VDI.
    let (sr_ref, sr) = pool.choose_sr(options.sr.as_deref()).await?;
    let name = options.name.clone().unwrap_or_else(|| {
        let base = if disk.name.is_empty() {
            format!(
                "{} disk {}",
                manifest.vm_name,
                disk.userdevice.as_deref().unwrap_or("?")
            )
        } else {
            disk.name.clone()
        };
        default_name(&base, &manifest.id)
    });
    let vdi_ref = create_vdi(pool, &sr_ref, &sr.uuid, &name, &label, disk.size).await?;
    let mut guard = VdiGuard {
        pool: pool.clone(),
        vdi: Some(vdi_ref.clone()),
    };

    // The data; any failure removes the VDI.
    let uploaded = upload_disk(
        pool,
        repo,
        manifest,
        &disk,
        &vdi_ref,
        upload,
        options.parallel,
        &progress,
        &options.cancel,
    )
    .await;
    let uploaded = match uploaded {
        Ok(len) => match pool.finish_vdi(&vdi_ref).await {
            Ok(()) => pool
                .session
                .vdi()
                .get_record(&vdi_ref)
                .await
                .map(|r| (len, r))
                .map_err(|e| RestoreError::xapi("cannot read the restored VDI", e)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let (len, record) = match uploaded {
        Ok(r) => r,
        Err(e) => {
            guard.vdi = None;
            return Err(match pool.destroy_vdi(&vdi_ref).await {
                Ok(()) => e,
                Err(leftovers) => RestoreError::CleanupFailed {
                    cause: Box::new(e),
                    leftovers,
                },
            });
        }
    };
    guard.vdi = None;
    Ok(RestoredDisk {
        source: label,
        source_dir: source_dir(repo, manifest),
        vdi_ref: vdi_ref.as_str().to_string(),
        vdi_uuid: record.uuid,
        name,
        sr_uuid: sr.uuid,
        virtual_size: disk.size,
        userdevice: disk.userdevice,
        backed_up_vdi_uuid: disk.snapshot_vdi_uuid,
        original_vdi_uuid: disk.source_vdi_uuid.or(Some(disk.key)),
        format: format.as_str().to_string(),
        bytes: len,
        seconds: started_at.elapsed().as_secs_f64(),
        verified: true,
    })
}
