//! Tasks: waiting for `Async.` calls and client-created tasks, reading
//! their outcome, parsing `task.result`, and destroying finished tasks.
//!
//! A task finishes with `status` `success` (the return value is in
//! `result`, as XML-RPC text even over JSON-RPC), `failure` (`error_info` =
//! `[code, params…]`) or `cancelled`. The client waits with `event.from`
//! on `task/<ref>` (falling back to polling `task.get_record` with backoff
//! when events are unavailable), under a timeout, and destroys the task once
//! it has read the outcome. See `docs/xapi-notes.md`, "Tasks".
//!
//! Two handles:
//! - [`AsyncTask<T>`]: the task of an `Async.` call (from `Call::start`);
//!   [`AsyncTask::wait`] returns the decoded result.
//! - [`TaskGuard`]: a task the client creates (`task.create`) to hand to an
//!   HTTP transfer as `task_id`; [`TaskGuard::wait`] returns the outcome.
//!   Dropping an unsettled guard cancels and destroys the task in the
//!   background.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use xenvault_types::rpc::Value;

use crate::de::from_value;
use crate::error::{Error, ErrorCode, Result, XapiError};
use crate::records::{Task, TaskRef, TaskStatus};
use crate::session::Session;

/// How to learn that a task finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitMethod {
    /// `event.from(["task/<ref>"])`, falling back to polling if the host
    /// refuses it (the default).
    #[default]
    Events,
    /// `task.get_record` with exponential backoff.
    Poll,
}

/// How long and how to wait for a task.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// Give up after this long (the task is cancelled if
    /// `cancel_on_timeout`).
    pub timeout: Duration,
    /// Events or polling.
    pub method: WaitMethod,
    /// First polling delay.
    pub poll_initial: Duration,
    /// Longest polling delay.
    pub poll_max: Duration,
    /// Server-side timeout of one `event.from` call.
    pub event_timeout: Duration,
    /// Cancel the task when the wait times out.
    pub cancel_on_timeout: bool,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            timeout: Duration::from_secs(6 * 3600),
            method: WaitMethod::Events,
            poll_initial: Duration::from_millis(100),
            poll_max: Duration::from_secs(2),
            event_timeout: Duration::from_secs(30),
            cancel_on_timeout: true,
        }
    }
}

impl WaitOptions {
    /// Defaults with this timeout.
    pub fn with_timeout(timeout: Duration) -> WaitOptions {
        WaitOptions {
            timeout,
            ..WaitOptions::default()
        }
    }
}

/// Decodes `task.result`: the XML-RPC serialisation of the return value,
/// whatever the protocol. `<value></value>` (or `""` on very old hosts)
/// is the void result.
pub fn parse_task_result<T: DeserializeOwned>(method: &str, result: &str) -> Result<T> {
    let value = if result.trim().is_empty() {
        Value::String(String::new())
    } else {
        Value::from_xml(result).map_err(|e| Error::Decode {
            method: method.to_string(),
            path: "task.result".to_string(),
            detail: format!("not an XML-RPC value: {e}"),
        })?
    };
    from_value(&value).map_err(|e| e.for_method(method))
}

/// The outcome of a finished task: the record on success, the XAPI error
/// on failure or cancellation. `label` names the call in errors.
pub fn task_outcome(task: &TaskRef, record: Task, label: &str) -> Result<Task> {
    match &record.status {
        TaskStatus::Success => Ok(record),
        TaskStatus::Cancelled => {
            let error = if record.error_info.is_empty() {
                XapiError::new(ErrorCode::TaskCancelled, vec![task.to_string()])
            } else {
                XapiError::from_description(record.error_info)
            };
            Err(Error::Xapi {
                method: label.to_string(),
                error,
            })
        }
        _ => Err(Error::Xapi {
            method: label.to_string(),
            error: XapiError::from_description(record.error_info),
        }),
    }
}

enum Waited {
    Finished(Box<Task>),
    TimedOut,
    EventsUnavailable(Error),
}

/// Waits until the task is finished and returns its record (not checked,
/// not destroyed). Times out with [`Error::TaskTimeout`].
pub async fn wait_until_finished(
    session: &Session,
    task: &TaskRef,
    label: &str,
    options: &WaitOptions,
) -> Result<Task> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    let record = session.task().get_record(task).await?;
    if record.is_finished() {
        return Ok(record);
    }
    let mut waited = Waited::EventsUnavailable(Error::Unsupported("polling requested".into()));
    if options.method == WaitMethod::Events {
        waited = wait_by_events(session, task, deadline, options).await?;
        if let Waited::EventsUnavailable(e) = &waited {
            tracing::info!(task = %task, error = %e, "event.from unavailable; polling the task instead");
        }
    }
    if let Waited::EventsUnavailable(_) = waited {
        waited = wait_by_polling(session, task, deadline, options).await?;
    }
    match waited {
        Waited::Finished(record) => Ok(*record),
        Waited::TimedOut | Waited::EventsUnavailable(_) => {
            let action = if options.cancel_on_timeout {
                match session.task().cancel(task).await {
                    Ok(()) => "cancelled",
                    Err(e) => {
                        tracing::warn!(task = %task, error = %e, "cannot cancel the timed-out task");
                        "left running (cancel failed)"
                    }
                }
            } else {
                "left running"
            };
            Err(Error::TaskTimeout {
                task: task.to_string(),
                label: label.to_string(),
                waited: started.elapsed(),
                action,
            })
        }
    }
}

async fn wait_by_events(
    session: &Session,
    task: &TaskRef,
    deadline: Instant,
    options: &WaitOptions,
) -> Result<Waited> {
    let classes = vec![format!("task/{task}")];
    let mut token = String::new();
    let mut idle_delay = options.poll_initial;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited::TimedOut);
        }
        let wait = (deadline - now).min(options.event_timeout);
        let batch = match session.event().wait_from(&classes, &token, wait).await {
            Ok(batch) => batch,
            // MESSAGE_METHOD_UNKNOWN, EVENTS_LOST, a token from a previous
            // session…: polling still works.
            Err(e @ Error::Xapi { .. }) => return Ok(Waited::EventsUnavailable(e)),
            Err(e) => return Err(e),
        };
        token = batch.token.clone();
        let mut saw_event = false;
        for event in batch.events_for(task.as_str()) {
            saw_event = true;
            if event.is_delete() {
                return Err(Error::Xapi {
                    method: "event.from".into(),
                    error: XapiError::new(
                        ErrorCode::HandleInvalid,
                        vec!["task".into(), task.to_string()],
                    ),
                });
            }
            match event.snapshot.decode::<Task>() {
                Ok(record) if record.is_finished() => {
                    return Ok(Waited::Finished(Box::new(record)));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(task = %task, error = %e, "undecodable task snapshot in event; reading the record");
                    let record = session.task().get_record(task).await?;
                    if record.is_finished() {
                        return Ok(Waited::Finished(Box::new(record)));
                    }
                }
            }
        }
        if !saw_event {
            // An empty batch: the server-side timeout passed (or the server
            // does not report the initial state). Check the record, and do
            // not spin if the server answers at once.
            let record = session.task().get_record(task).await?;
            if record.is_finished() {
                return Ok(Waited::Finished(Box::new(record)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Waited::TimedOut);
            }
            tokio::time::sleep(idle_delay.min(deadline - now)).await;
            idle_delay = (idle_delay * 3 / 2).min(options.poll_max);
        }
    }
}

async fn wait_by_polling(
    session: &Session,
    task: &TaskRef,
    deadline: Instant,
    options: &WaitOptions,
) -> Result<Waited> {
    let mut delay = options.poll_initial;
    loop {
        let record = session.task().get_record(task).await?;
        if record.is_finished() {
            return Ok(Waited::Finished(Box::new(record)));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited::TimedOut);
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 3 / 2).min(options.poll_max);
    }
}

/// Destroys a finished task; an already gone task is fine, other errors
/// are logged (the task is garbage-collected by xapi after 65 minutes).
async fn destroy_quietly(session: &Session, task: &TaskRef) {
    match session.task().destroy(task).await {
        Ok(()) => {}
        Err(e) if e.is_code(&ErrorCode::HandleInvalid) => {}
        Err(e) => tracing::warn!(task = %task, error = %e, "cannot destroy the finished task"),
    }
}

/// Waits for the task, destroys it, and returns its outcome.
async fn settle(
    session: &Session,
    task: &TaskRef,
    label: &str,
    options: &WaitOptions,
) -> Result<Task> {
    let record = wait_until_finished(session, task, label, options).await?;
    destroy_quietly(session, task).await;
    task_outcome(task, record, label)
}

/// The task of an `Async.` call whose result decodes as `T`.
pub struct AsyncTask<T> {
    session: Session,
    task: TaskRef,
    method: String,
    result: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for AsyncTask<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncTask")
            .field("task", &self.task)
            .field("method", &self.method)
            .finish()
    }
}

impl<T: DeserializeOwned> AsyncTask<T> {
    /// Wraps the task ref an `Async.` call returned.
    pub fn new(session: Session, task: TaskRef, method: String) -> AsyncTask<T> {
        AsyncTask {
            session,
            task,
            method,
            result: PhantomData,
        }
    }

    /// The task ref.
    pub fn task_ref(&self) -> &TaskRef {
        &self.task
    }

    /// The call (`Async.VM.copy`).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Waits for the task, destroys it, and decodes its result (failure →
    /// [`Error::Xapi`] from `error_info`, named after the call).
    pub async fn wait(self, options: &WaitOptions) -> Result<T> {
        let record = settle(&self.session, &self.task, &self.method, options).await?;
        parse_task_result(&self.method, &record.result)
    }

    /// Asks XAPI to cancel the task (long streams notice within ~10 s).
    pub async fn cancel(&self) -> Result<()> {
        self.session.task().cancel(&self.task).await
    }
}

/// A task the client created for an HTTP transfer. Pass [`TaskGuard::id`]
/// as `task_id`, run the transfer, then [`TaskGuard::wait`] for the
/// outcome: the HTTP status alone does not say whether a transfer worked.
pub struct TaskGuard {
    session: Session,
    task: TaskRef,
    label: String,
    settled: bool,
}

impl std::fmt::Debug for TaskGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskGuard")
            .field("task", &self.task)
            .field("label", &self.label)
            .field("settled", &self.settled)
            .finish()
    }
}

impl Session {
    /// `task.create(label, description)`, wrapped in a [`TaskGuard`].
    pub async fn create_task(&self, label: &str, description: &str) -> Result<TaskGuard> {
        let task = self.task().create(label, description).await?;
        Ok(TaskGuard {
            session: self.clone(),
            task,
            label: label.to_string(),
            settled: false,
        })
    }

    /// Waits for any task, destroys it, and returns its record (success) or
    /// its error (failure, cancellation). `label` names it in errors.
    pub async fn wait_task(
        &self,
        task: &TaskRef,
        label: &str,
        options: &WaitOptions,
    ) -> Result<Task> {
        settle(self, task, label, options).await
    }
}

impl TaskGuard {
    /// The task ref.
    pub fn task_ref(&self) -> &TaskRef {
        &self.task
    }

    /// The ref as text, for the `task_id=` query parameter.
    pub fn id(&self) -> &str {
        self.task.as_str()
    }

    /// The label given at creation.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The session the task belongs to.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Waits for the task, destroys it, and returns its record (success) or
    /// the XAPI error from `error_info` (named `task <label>`).
    pub async fn wait(mut self, options: &WaitOptions) -> Result<Task> {
        let label = format!("task {}", self.label);
        let result = settle(&self.session, &self.task, &label, options).await;
        // On timeout the task was cancelled (or left) by the wait; the Drop
        // clean-up still destroys it.
        if !matches!(result, Err(Error::TaskTimeout { .. })) {
            self.settled = true;
        }
        result
    }

    /// Like [`TaskGuard::wait`], and decodes `task.result` as `T` (e.g. the
    /// VM refs an import created).
    pub async fn wait_result<T: DeserializeOwned>(self, options: &WaitOptions) -> Result<T> {
        let label = format!("task {}", self.label);
        let record = self.wait(options).await?;
        parse_task_result(&label, &record.result)
    }

    /// Asks XAPI to cancel the task.
    pub async fn cancel(&self) -> Result<()> {
        self.session.task().cancel(&self.task).await
    }

    /// Gives up on the task now (the transfer failed before XAPI could
    /// complete it): cancels and destroys it, ignoring errors.
    pub async fn abandon(mut self) {
        self.settled = true;
        if let Err(e) = self.session.task().cancel(&self.task).await {
            tracing::debug!(task = %self.task, error = %e, "cancel of an abandoned task failed");
        }
        destroy_quietly(&self.session, &self.task).await;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(task = %self.task, "task left behind: no runtime to destroy it (xapi removes it within 24 h)");
            return;
        };
        let session = self.session.clone();
        let task = self.task.clone();
        runtime.spawn(async move {
            let _ = session.task().cancel(&task).await;
            destroy_quietly(&session, &task).await;
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::records::VmRef;

    #[test]
    fn task_results_are_xml_fragments() {
        let r: VmRef = parse_task_result("Async.VM.clone", "<value>OpaqueRef:abc</value>").unwrap();
        assert_eq!(r.as_str(), "OpaqueRef:abc");
        let set: Vec<VmRef> = parse_task_result(
            "import",
            "<value><array><data><value>OpaqueRef:1</value><value>OpaqueRef:2</value></data></array></value>",
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        parse_task_result::<()>("Async.VM.destroy", "<value></value>").unwrap();
        parse_task_result::<()>("Async.VM.destroy", "").unwrap();
        let n: i64 = parse_task_result("x", "<value>42</value>").unwrap();
        assert_eq!(n, 42);
        let err = parse_task_result::<VmRef>("Async.VM.clone", "<value>").unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
    }

    #[test]
    fn outcomes() {
        let task = TaskRef::new("OpaqueRef:t");
        let ok = Task {
            status: TaskStatus::Success,
            ..Task::default()
        };
        assert!(task_outcome(&task, ok, "x").is_ok());
        let failed = Task {
            status: TaskStatus::Failure,
            error_info: vec!["SR_FULL".into(), "10".into(), "5".into()],
            ..Task::default()
        };
        let e = task_outcome(&task, failed, "Async.VM.copy").unwrap_err();
        assert!(e.is_code(&ErrorCode::SrFull));
        assert_eq!(e.xapi().unwrap().params, vec!["10", "5"]);
        let cancelled = Task {
            status: TaskStatus::Cancelled,
            ..Task::default()
        };
        let e = task_outcome(&task, cancelled, "x").unwrap_err();
        assert!(e.is_code(&ErrorCode::TaskCancelled));
    }
}
