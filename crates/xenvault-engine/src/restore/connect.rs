//! A connection to the pool restored into: the XAPI session and the HTTP
//! transfer client, plus the look-ups every restore needs (SR choice, objects
//! created by an import task) and the clean-up of what a failed restore made.

use std::time::Duration;

use xenvault_xapi::http::{HttpTransfer, TransferOptions};
use xenvault_xapi::records::{PowerState, Sr, SrRef, VbdType, VdiRef, VmRef};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::task::TaskGuard;
use xenvault_xapi::tls::TlsPolicy;

use super::RestoreError;

/// Where restored objects go: a logged-in session and its HTTP transfers.
#[derive(Clone)]
pub struct PoolConnection {
    /// The XAPI session.
    pub session: Session,
    /// HTTP uploads (same TLS policy as the session).
    pub transfer: HttpTransfer,
    /// The running restore's mark: what it creates is tagged with it until
    /// whole (see [`super::inflight`]). `None`: nothing is tagged.
    pub restoring: Option<std::sync::Arc<super::inflight::RestoreMark>>,
}

impl std::fmt::Debug for PoolConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolConnection")
            .field("url", &self.session.base_url().as_str())
            .finish()
    }
}

/// Transfer options for uploads into the pool: redirects are followed only to
/// the pool's own hosts, since the session id travels in the query string.
async fn pool_transfer_options(session: &Session) -> TransferOptions {
    TransferOptions {
        redirect_hosts: Some(crate::job::pool_host_addresses(session).await),
        ..TransferOptions::default()
    }
}

impl PoolConnection {
    /// Logs in to the pool at `url`.
    pub async fn connect(
        url: &str,
        user: &str,
        password: &str,
        tls: TlsPolicy,
    ) -> Result<PoolConnection, RestoreError> {
        let session = Client::connect(url, Credentials::new(user, password), tls.clone())
            .await
            .map_err(|e| RestoreError::xapi(format!("cannot log in to {url}"), e))?;
        let options = pool_transfer_options(&session).await;
        let transfer = HttpTransfer::new(&tls, options).map_err(|e| RestoreError::Http {
            what: "cannot set up HTTP transfers".into(),
            source: e,
        })?;
        Ok(PoolConnection {
            session,
            transfer,
            restoring: None,
        })
    }

    /// Wraps an existing session (its HTTP client carries the TLS policy).
    pub async fn from_session(session: Session) -> PoolConnection {
        let options = pool_transfer_options(&session).await;
        let transfer = HttpTransfer::with_client(session.http_client(), options);
        PoolConnection {
            session,
            transfer,
            restoring: None,
        }
    }

    /// The SR to restore into: `choice` is an SR uuid or ref; without one, the
    /// pool's default SR. ISO SRs are refused (XAPI would fail the import).
    pub async fn choose_sr(&self, choice: Option<&str>) -> Result<(SrRef, Sr), RestoreError> {
        let sr_ref = match choice {
            Some(c) if c.starts_with("OpaqueRef:") => SrRef::new(c),
            Some(uuid) => self.session.sr().get_by_uuid(uuid).await.map_err(|e| {
                if e.is_code(&xenvault_xapi::error::ErrorCode::UuidInvalid) {
                    RestoreError::BadSr(format!("{uuid} does not exist on the pool"))
                } else {
                    RestoreError::xapi(format!("cannot look up SR {uuid}"), e)
                }
            })?,
            None => {
                let (_, pool) = self
                    .session
                    .pool_record()
                    .await
                    .map_err(|e| RestoreError::xapi("cannot read the pool record", e))?;
                if pool.default_sr.is_null() {
                    return Err(RestoreError::BadSr(
                        "none given and the pool has no default SR: choose one with --sr UUID"
                            .into(),
                    ));
                }
                pool.default_sr
            }
        };
        let sr = self
            .session
            .sr()
            .get_record(&sr_ref)
            .await
            .map_err(|e| RestoreError::xapi(format!("cannot read SR {sr_ref}"), e))?;
        if sr.content_type == "iso" {
            return Err(RestoreError::BadSr(format!(
                "{} ({}) is an ISO library: choose an SR for disks with --sr UUID",
                sr.uuid, sr.name_label
            )));
        }
        Ok((sr_ref, sr))
    }

    /// Removes a VM and its disks (halting it first if it runs). Returns what
    /// could not be removed.
    pub async fn destroy_vm_and_disks(&self, vm: &VmRef) -> Result<(), String> {
        destroy_vm_and_disks(&self.session, vm).await
    }

    /// Destroys a VDI, retrying a few times while it is still in use (a VBD
    /// of an import may linger for a moment).
    pub async fn destroy_vdi(&self, vdi: &VdiRef) -> Result<(), String> {
        destroy_vdi(&self.session, vdi).await
    }

    /// After a failed import: removes the VMs and VDIs XAPI marked as made by
    /// `task` (`other_config`/`sm_config` key `import_task`) that XAPI did not
    /// remove itself (docs/xapi-notes.md, "Restore through /import and
    /// /import_raw_vdi").
    pub async fn sweep_import_leftovers(&self, task: &str) -> Result<(), String> {
        let mut problems = Vec::new();
        match self.session.vm().get_all_records().await {
            Ok(vms) => {
                for (r, vm) in vms {
                    if vm.other_config.get("import_task").map(String::as_str) == Some(task) {
                        tracing::warn!(vm = %vm.uuid, "removing a VM left by a failed import");
                        if let Err(e) = self.destroy_vm_and_disks(&r).await {
                            problems.push(e);
                        }
                    }
                }
            }
            Err(e) => problems.push(format!("cannot list VMs: {e}")),
        }
        match self.session.vdi().get_all_records().await {
            Ok(vdis) => {
                for (r, vdi) in vdis {
                    if vdi.sm_config.get("import_task").map(String::as_str) == Some(task) {
                        tracing::warn!(vdi = %vdi.uuid, "removing a VDI left by a failed import");
                        if let Err(e) = self.destroy_vdi(&r).await {
                            problems.push(e);
                        }
                    }
                }
            }
            Err(e) => problems.push(format!("cannot list VDIs: {e}")),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Settles an HTTP transfer's task: on a transfer error, cancels the task
/// first (so XAPI stops and cleans up), then waits for it. The task's error
/// is preferred to the HTTP error: it holds the real cause.
pub async fn settle_transfer<T, E>(
    task: TaskGuard,
    transfer: Result<T, E>,
    what: &str,
    cancel: &super::Cancel,
) -> Result<xenvault_xapi::records::Task, RestoreError>
where
    E: Into<RestoreErrorSource>,
{
    use xenvault_xapi::task::WaitOptions;
    match transfer {
        Ok(_) => {
            // The data is sent; XAPI may still be writing it. A cancel now
            // cancels the task: XAPI stops and removes what it made.
            let (session, task_ref) = (task.session().clone(), task.task_ref().clone());
            let options = WaitOptions::default();
            let wait = task.wait(&options);
            tokio::pin!(wait);
            let mut asked = false;
            loop {
                tokio::select! {
                    result = &mut wait => {
                        break result.map_err(|e| RestoreError::xapi(what, e));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)), if !asked => {
                        if cancel.is_cancelled() {
                            asked = true;
                            if let Err(e) = session.task().cancel(&task_ref).await {
                                tracing::debug!("task.cancel: {e}");
                            }
                        }
                    }
                }
            }
        }
        Err(http) => {
            let _ = task.cancel().await;
            let waited = task
                .wait(&WaitOptions::with_timeout(Duration::from_secs(120)))
                .await;
            let http: RestoreErrorSource = http.into();
            match waited {
                // XAPI says it worked after all: the task decides.
                Ok(record) => Ok(record),
                Err(e)
                    if e.is_code(&xenvault_xapi::error::ErrorCode::TaskCancelled)
                        || matches!(e, xenvault_xapi::error::Error::TaskTimeout { .. }) =>
                {
                    Err(http.into_error(what))
                }
                Err(e) => Err(RestoreError::xapi(what, e)),
            }
        }
    }
}

/// The error of the transfer side of a restore.
#[derive(Debug)]
pub enum RestoreErrorSource {
    /// The HTTP client failed.
    Http(xenvault_xapi::http::HttpError),
}

impl From<xenvault_xapi::http::HttpError> for RestoreErrorSource {
    fn from(e: xenvault_xapi::http::HttpError) -> Self {
        RestoreErrorSource::Http(e)
    }
}

impl RestoreErrorSource {
    fn into_error(self, what: &str) -> RestoreError {
        match self {
            RestoreErrorSource::Http(source) => RestoreError::Http {
                what: what.to_string(),
                source,
            },
        }
    }
}

/// Removes a VM and its disks (halting it first if it runs). Returns what
/// could not be removed.
pub async fn destroy_vm_and_disks(session: &Session, vm: &VmRef) -> Result<(), String> {
    let record = match session.vm().get_record(vm).await {
        Ok(r) => r,
        Err(e) if e.is_code(&xenvault_xapi::error::ErrorCode::HandleInvalid) => return Ok(()),
        Err(e) => return Err(format!("VM {vm}: {e}")),
    };
    let mut problems = Vec::new();
    let mut vdis = Vec::new();
    for vbd in &record.vbds {
        match session.vbd().get_record(vbd).await {
            Ok(v) if v.type_ == VbdType::Disk && !v.empty && !v.vdi.is_null() => vdis.push(v.vdi),
            Ok(_) => {}
            Err(e) => problems.push(format!("VBD {vbd}: {e}")),
        }
    }
    if record.power_state != PowerState::Halted
        && let Err(e) = session.vm().hard_shutdown(vm).await
    {
        problems.push(format!("VM {} shutdown: {e}", record.uuid));
    }
    if let Err(e) = session.vm().destroy(vm).await {
        problems.push(format!("VM {}: {e}", record.uuid));
    }
    for vdi in vdis {
        if let Err(e) = destroy_vdi(session, &vdi).await {
            problems.push(e);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Destroys a VDI, retrying a few times while it is still in use (a VBD
/// of an import may linger for a moment).
pub async fn destroy_vdi(session: &Session, vdi: &VdiRef) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..5 {
        match session.vdi().destroy(vdi).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_code(&xenvault_xapi::error::ErrorCode::HandleInvalid) => {
                return Ok(());
            }
            Err(e) => {
                last = e.to_string();
                if !e.is_code(&xenvault_xapi::error::ErrorCode::VdiInUse) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
            }
        }
    }
    Err(format!("VDI {vdi}: {last}"))
}
