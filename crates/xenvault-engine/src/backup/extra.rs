//! Pool metadata (`/pool/xmldbdump`) and host (`/host_backup`) backups:
//! whole files streamed from the pool into an [`crate::sink::ArtifactSink`].

use futures::StreamExt as _;
use time::OffsetDateTime;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::records::Host;

use super::stream::ArtifactThread;
use super::{Pipeline, Step, StepError, step_err};
use crate::sink::{ArtifactKind, ArtifactMeta, Committed, Compression};

/// What became of one whole-file backup.
#[derive(Debug, Clone)]
pub struct ArtifactResult {
    /// Start time.
    pub started: OffsetDateTime,
    /// End time.
    pub finished: OffsetDateTime,
    /// Bytes received.
    pub bytes_received: u64,
    /// Stored, or why not.
    pub outcome: Result<Committed, StepError>,
}

/// Backs up the pool database (`GET /pool/xmldbdump` on the coordinator).
pub async fn pool_metadata(p: &Pipeline) -> ArtifactResult {
    download(
        p,
        ArtifactKind::PoolDatabase,
        None,
        "/pool/xmldbdump",
        "pool database dump",
    )
    .await
}

/// Backs up one host's dom0 (`GET /host_backup` on that host: the handler
/// backs up the host that serves it). The URL is the coordinator's with the
/// host's `address` as host name (same scheme and port).
pub async fn host_backup(p: &Pipeline, host: &Host) -> ArtifactResult {
    let coordinator_host = p.session.base_url().host_str().map(str::to_string);
    let is_coordinator = match p.session.pool_record().await {
        Ok((_, pool)) => match p.session.host().get_by_uuid(&host.uuid).await {
            Ok(r) => r == pool.master,
            Err(_) => false,
        },
        Err(_) => false,
    };
    let other_host = (!is_coordinator
        && !host.address.is_empty()
        && coordinator_host.as_deref() != Some(host.address.as_str()))
    .then(|| host.address.clone());
    let kind = ArtifactKind::HostBackup {
        host_uuid: host.uuid.clone(),
        host_name: host.name_label.clone(),
    };
    download(
        p,
        kind,
        other_host,
        "/host_backup",
        &format!("host backup of {}", host.name_label),
    )
    .await
}

async fn download(
    p: &Pipeline,
    kind: ArtifactKind,
    other_host: Option<String>,
    path: &str,
    what: &str,
) -> ArtifactResult {
    let started = OffsetDateTime::now_utc();
    let mut received = 0u64;
    let outcome = async {
        let guard = p
            .session
            .create_task(&format!("xenvault: {what}"), "xenvault backup")
            .await
            .map_err(|e| e.to_string())
            .map_err(step_err(Step::ExportStart))?;
        let mut base = p.session.base_url();
        if let Some(h) = &other_host {
            let _ = base.set_host(Some(h));
        }
        let url = handler_url(
            &base,
            path,
            p.session.session_ref().expose(),
            Some(guard.id()),
            &[],
        );
        let meta = ArtifactMeta {
            job: p.run.job.clone(),
            run_id: p.run.run_id.clone(),
            pool: p.pool_label.clone(),
            kind,
            started,
            compression: Compression::None,
        };
        let download = match p.transfer.get(url).await {
            Ok(d) => d,
            Err(e) => {
                let detail = match guard.wait(&p.wait).await {
                    Err(t) => format!("{t} ({e})"),
                    Ok(_) => e.to_string(),
                };
                return Err(StepError {
                    step: Step::ExportStart,
                    detail,
                });
            }
        };
        let sink = ArtifactThread::start(p.target.clone(), meta);
        let mut body = download.body;
        let mut streamed: Result<(), StepError> = Ok(());
        while let Some(piece) = body.next().await {
            match piece {
                Ok(bytes) => {
                    received += bytes.len() as u64;
                    if sink.send(bytes).await.is_err() {
                        streamed = Err(StepError {
                            step: Step::Write,
                            detail: "the target stopped taking data".into(),
                        });
                        break;
                    }
                }
                Err(e) => {
                    streamed = Err(StepError {
                        step: Step::ExportStream,
                        detail: e.to_string(),
                    });
                    break;
                }
            }
        }
        drop(body);
        let waited = guard.wait(&p.wait).await;
        match (streamed, waited) {
            (Ok(()), Ok(_)) => match sink.finish(true).await {
                Ok(Some(c)) => Ok(c),
                Ok(None) => Err(StepError {
                    step: Step::Write,
                    detail: "the target did not commit".into(),
                }),
                Err(e) => Err(StepError {
                    step: Step::Write,
                    detail: e.to_string(),
                }),
            },
            (streamed, waited) => {
                let sink_err = sink.finish(false).await.err();
                Err(match (streamed, waited, sink_err) {
                    (Err(s), _, Some(e)) if s.step == Step::Write => StepError {
                        step: Step::Write,
                        detail: e.to_string(),
                    },
                    (_, Err(t), _) => StepError {
                        step: Step::ExportStream,
                        detail: t.to_string(),
                    },
                    (Err(s), _, _) => s,
                    (Ok(()), Ok(_), _) => StepError {
                        step: Step::ExportStream,
                        detail: "unexpected state".into(),
                    },
                })
            }
        }
    }
    .await;
    ArtifactResult {
        started,
        finished: OffsetDateTime::now_utc(),
        bytes_received: received,
        outcome,
    }
}
