//! The shared pool state ([`Pool`], used as `Arc<Pool>` everywhere): the object
//! database, sessions, tasks, the disk store, the TLS identity, the listener
//! endpoints of every host, fault injection and counters.
//!
//! Locking: the DB is one `std::sync::Mutex`; take it with [`Pool::db`], keep
//! it only for short, non-blocking work and never across an `.await`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use xenvault_types::Value;
use xenvault_types::rpc::format_datetime;

use crate::datamodel::{Datamodel, NULL_REF, datamodel};
use crate::db::{Db, Fields};
use crate::disk::DiskStore;
use crate::error::{ApiError, ApiResult};
use crate::faults::{Faults, Stats};
use crate::http::Request;
use crate::tls::TlsIdentity;

/// Where one host listens (all on 127.0.0.1).
#[derive(Debug, Clone)]
pub struct HostEndpoint {
    /// The host's ref.
    pub host: String,
    /// Plain HTTP (RPC and handlers).
    pub http: SocketAddr,
    /// HTTPS.
    pub https: SocketAddr,
    /// NBD.
    pub nbd: SocketAddr,
}

/// Credentials and the state directory.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The only user (`root` by default).
    pub user: String,
    /// Its password.
    pub password: String,
    /// The state directory.
    pub state_dir: PathBuf,
}

/// The simulated pool.
pub struct Pool {
    /// The datamodel.
    pub dm: &'static Datamodel,
    db: Mutex<Db>,
    /// Receives the DB generation after every change.
    pub changed: tokio::sync::watch::Receiver<u64>,
    /// Credentials and paths.
    pub config: PoolConfig,
    /// The disk store (SIM-DATA's), keyed by VDI uuid.
    pub disks: Arc<DiskStore>,
    /// The TLS identity shared by every host (HTTPS and NBD).
    pub tls: TlsIdentity,
    /// Injected faults.
    pub faults: Faults,
    /// Counters.
    pub stats: Stats,
    endpoints: Mutex<Vec<HostEndpoint>>,
    owned_tasks: Mutex<std::collections::HashSet<String>>,
}

/// An authenticated HTTP request's session. A session made from HTTP Basic
/// credentials is temporary and logged out when this is dropped, as xapi does.
pub struct HttpSession {
    /// The session ref.
    pub session: String,
    temporary: bool,
    pool: Arc<Pool>,
}

impl Drop for HttpSession {
    fn drop(&mut self) {
        if self.temporary {
            let _ = self.pool.db().destroy("session", &self.session);
        }
    }
}

/// Now, as xapi's datetime value.
pub fn now_value() -> Value {
    Value::DateTime(format_datetime(time::OffsetDateTime::now_utc()))
}

impl Pool {
    /// A pool over an (empty or loaded) DB.
    pub fn new(config: PoolConfig, disks: Arc<DiskStore>, tls: TlsIdentity) -> Pool {
        let (tx, rx) = tokio::sync::watch::channel(0);
        Pool {
            dm: datamodel(),
            db: Mutex::new(Db::new(tx)),
            changed: rx,
            config,
            disks,
            tls,
            faults: Faults::default(),
            stats: Stats::default(),
            endpoints: Mutex::new(Vec::new()),
            owned_tasks: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The database, locked. Do not hold it across an `.await`.
    pub fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every host's endpoints.
    pub fn endpoints(&self) -> Vec<HostEndpoint> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The endpoints of one host.
    pub fn endpoint(&self, host: &str) -> Option<HostEndpoint> {
        self.endpoints().into_iter().find(|e| e.host == host)
    }

    /// Records the endpoints (done once listeners are bound).
    pub fn set_endpoints(&self, eps: Vec<HostEndpoint>) {
        *self.endpoints.lock().unwrap_or_else(|e| e.into_inner()) = eps;
    }

    /// The pool object's ref.
    pub fn pool_ref(&self) -> String {
        self.db()
            .all("pool")
            .into_iter()
            .next()
            .unwrap_or_else(|| NULL_REF.to_string())
    }

    /// The coordinator host (`pool.master`).
    pub fn coordinator(&self) -> String {
        let db = self.db();
        db.rows("pool")
            .next()
            .map(|(_, p)| p.str_of("master").to_string())
            .unwrap_or_else(|| NULL_REF.to_string())
    }

    /// `pool.default_SR`.
    pub fn default_sr(&self) -> String {
        let db = self.db();
        db.rows("pool")
            .next()
            .map(|(_, p)| p.str_of("default_SR").to_string())
            .unwrap_or_else(|| NULL_REF.to_string())
    }

    /// The address a client must use to reach the coordinator, for
    /// `HOST_IS_SLAVE`: `127.0.0.1:PORT` of the same scheme (xapi sends a bare
    /// IP; see docs/simulator.md, "Differences").
    pub fn coordinator_address(&self, tls: bool) -> String {
        let c = self.coordinator();
        match self.endpoint(&c) {
            Some(ep) => (if tls { ep.https } else { ep.http }).to_string(),
            None => "127.0.0.1".to_string(),
        }
    }

    // ----- sessions -----

    /// `session.login_with_password` received by `host`.
    pub fn login(
        &self,
        user: &str,
        password: &str,
        originator: &str,
        host: &str,
        tls: bool,
    ) -> ApiResult<String> {
        // xen-api ocaml/xapi/xapi_session.ml: a member refuses logins over TCP.
        if host != self.coordinator() {
            return Err(ApiError::new(
                "HOST_IS_SLAVE",
                [self.coordinator_address(tls)],
            ));
        }
        if user != self.config.user || password != self.config.password {
            return Err(ApiError::new(
                "SESSION_AUTHENTICATION_FAILED",
                [user, "Authentication failure"],
            ));
        }
        Ok(self.new_session(user, originator, host))
    }

    /// Creates a session without checks (HTTP Basic, internal use).
    pub fn new_session(&self, user: &str, originator: &str, host: &str) -> String {
        let mut db = self.db();
        db.create(
            "session",
            [
                ("this_host", Value::str(host)),
                ("last_active", now_value()),
                ("validation_time", now_value()),
                ("originator", Value::str(originator)),
                ("auth_user_name", Value::str(user)),
                ("is_local_superuser", Value::Bool(true)),
                ("pool", Value::Bool(false)),
                ("uuid", Value::str(uuid::Uuid::new_v4().to_string())),
            ],
        )
        .unwrap_or_else(|_| NULL_REF.to_string())
    }

    /// `SESSION_INVALID [ref]` unless the session exists.
    pub fn check_session(&self, session: &str) -> ApiResult<()> {
        if self.db().exists("session", session) {
            Ok(())
        } else {
            Err(ApiError::session_invalid(session))
        }
    }

    /// Authenticates an HTTP request as xapi's `Xapi_http.assert_credentials_ok`:
    /// `session_id` from a cookie, then the query; else HTTP Basic (a temporary
    /// session). `None` → answer `401` ([`crate::http::Response::unauthorized`]).
    pub fn authenticate_http(self: &Arc<Self>, req: &Request) -> Option<HttpSession> {
        if let Some(s) = req.param("session_id") {
            return self.check_session(&s).ok().map(|_| HttpSession {
                session: s,
                temporary: false,
                pool: self.clone(),
            });
        }
        let (u, p) = req.basic_auth()?;
        if u != self.config.user || p != self.config.password {
            return None;
        }
        let coordinator = self.coordinator();
        Some(HttpSession {
            session: self.new_session(&u, "http-basic", &coordinator),
            temporary: true,
            pool: self.clone(),
        })
    }

    // ----- tasks -----

    /// Creates a pending task.
    pub fn task_create(&self, label: &str, description: &str) -> String {
        let host = self.coordinator();
        let mut db = self.db();
        let subtask_of = NULL_REF.to_string();
        let r = db.create(
            "task",
            [
                ("name_label", Value::str(label)),
                ("name_description", Value::str(description)),
                ("status", Value::str("pending")),
                ("progress", Value::Double(0.0)),
                ("created", now_value()),
                ("resident_on", Value::str(host)),
                ("subtask_of", Value::str(subtask_of)),
                (
                    "allowed_operations",
                    Value::Array(vec![Value::str("cancel")]),
                ),
            ],
        );
        r.unwrap_or_else(|_| NULL_REF.to_string())
    }

    /// The task an HTTP handler runs in: the request's `task_id` (cookie or
    /// query) when it names a task, else a new one. Sets progress 0.0 to show
    /// the handler took it over. The handler must send `task-id: <ref>`.
    pub fn http_task(&self, req: &Request, label: &str) -> String {
        if let Some(t) = req.param("task_id")
            && self.db().exists("task", &t)
        {
            self.task_set_progress(&t, 0.0);
            self.task_own(&t);
            return t;
        }
        let t = self.task_create(label, "");
        if let Some(parent) = req.param("subtask_of")
            && self.db().exists("task", &parent)
        {
            let _ = self.db().set("task", &t, "subtask_of", Value::str(parent));
        }
        self.task_own(&t);
        t
    }

    /// Marks a task as run by someone in the simulator (an async call or an
    /// HTTP handler): `task.cancel` then only asks it to cancel.
    pub fn task_own(&self, task: &str) {
        self.owned_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task.to_string());
    }

    /// Ends [`Pool::task_own`] (done by `task_complete` and `task_fail`).
    pub fn task_disown(&self, task: &str) {
        self.owned_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(task);
    }

    /// Whether a task is run by someone in the simulator.
    pub fn task_is_owned(&self, task: &str) -> bool {
        self.owned_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(task)
    }

    /// Sets a task's progress (0.0..=1.0).
    pub fn task_set_progress(&self, task: &str, progress: f64) {
        let _ = self.db().update("task", task, |rec| {
            rec.insert("progress".into(), Value::Double(progress));
        });
    }

    /// Completes a task with `result` = an XML-RPC value fragment
    /// (`<value>OpaqueRef:…</value>`; `""` for void results is written as
    /// `<value></value>`).
    pub fn task_complete(&self, task: &str, result_xml: &str) {
        self.task_disown(task);
        let _ = self.db().update("task", task, |rec| {
            if matches!(rec.str_of("status"), "pending" | "cancelling") {
                rec.insert("progress".into(), Value::Double(1.0));
                rec.insert("finished".into(), now_value());
                rec.insert("result".into(), Value::str(result_xml));
                rec.insert("status".into(), Value::str("success"));
                rec.insert("allowed_operations".into(), Value::Array(vec![]));
            }
        });
    }

    /// Fails a task with `error_info = [code, params…]` (status `cancelled`
    /// for `TASK_CANCELLED`).
    pub fn task_fail(&self, task: &str, err: &ApiError) {
        self.task_disown(task);
        let status = if err.code == "TASK_CANCELLED" {
            "cancelled"
        } else {
            "failure"
        };
        let _ = self.db().update("task", task, |rec| {
            if matches!(rec.str_of("status"), "pending" | "cancelling") {
                rec.insert("finished".into(), now_value());
                rec.insert(
                    "error_info".into(),
                    Value::Array(err.description().into_iter().map(Value::String).collect()),
                );
                rec.insert("status".into(), Value::str(status));
                rec.insert("allowed_operations".into(), Value::Array(vec![]));
            }
        });
    }

    /// A task's status (`pending`, `success`, …), `None` if it is gone.
    pub fn task_status(&self, task: &str) -> Option<String> {
        self.db()
            .get("task", task)
            .ok()
            .map(|r| r.str_of("status").to_string())
    }

    /// Whether a client asked to cancel the task (long streams check this and
    /// fail with `TASK_CANCELLED [task]`).
    pub fn task_is_cancelling(&self, task: &str) -> bool {
        self.task_status(task).as_deref() == Some("cancelling")
    }
}
