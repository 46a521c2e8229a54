//! The client over real HTTP against a scripted loopback endpoint
//! (`rpc_mock::MockXapi`): protocol choice and fallback, login and
//! originator, `HOST_IS_SLAVE`, `SESSION_INVALID`, the `VM.snapshot`
//! fallback, async calls and tasks, task guards, logout.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod rpc_mock;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_mock::{JsonMode, MockXapi, Received, Reply, fail, session_of};
use xenvault_types::rpc::Value;
use xenvault_xapi::error::{Error, ErrorCode};
use xenvault_xapi::model::Ref;
use xenvault_xapi::records::{TaskStatus, VdiRef, VmRef};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::task::{WaitMethod, WaitOptions};
use xenvault_xapi::tls::TlsPolicy;
use xenvault_xapi::transport::{ConnectOptions, Protocol, ProtocolChoice};

fn creds() -> Credentials {
    Credentials::new("root", "s3cret-pw")
}

async fn connect(url: &str) -> Result<Session, Error> {
    Client::connect(url, creds(), TlsPolicy::Verify).await
}

fn vm_records() -> Value {
    Value::record([(
        "OpaqueRef:vm1",
        Value::record([
            ("uuid", Value::str("u-vm1")),
            ("name_label", Value::str("web")),
            ("power_state", Value::str("Halted")),
            ("is_a_template", Value::Bool(false)),
            ("memory_static_max", Value::Int(1 << 60)),
        ]),
    )])
}

fn task_record(status: &str, result: &str, error_info: &[&str]) -> Value {
    Value::record([
        ("uuid", Value::str("u-task")),
        ("name_label", Value::str("task")),
        ("status", Value::str(status)),
        (
            "progress",
            Value::Double(if status == "pending" { 0.5 } else { 1.0 }),
        ),
        ("result", Value::str(result)),
        (
            "error_info",
            Value::Array(error_info.iter().map(|s| Value::str(*s)).collect()),
        ),
        ("created", Value::DateTime("20250319T04:16:24Z".into())),
        ("finished", Value::DateTime("19700101T00:00:00Z".into())),
    ])
}

/// A minimal pool: logins hand out `OpaqueRef:s<N>`, and calls with a
/// session other than the valid one fail with `SESSION_INVALID`.
struct PoolState {
    logins: AtomicUsize,
    valid: Mutex<String>,
}

impl PoolState {
    fn new() -> Arc<PoolState> {
        Arc::new(PoolState {
            logins: AtomicUsize::new(0),
            valid: Mutex::new(String::new()),
        })
    }

    fn login(&self, r: &Received) -> Reply {
        let n = self.logins.fetch_add(1, Ordering::SeqCst) + 1;
        let session = format!("OpaqueRef:s{n}");
        *self.valid.lock().unwrap() = session.clone();
        let _ = r;
        Reply::Ok(Value::str(session))
    }

    fn check(&self, r: &Received) -> Option<Reply> {
        let valid = self.valid.lock().unwrap().clone();
        let given = session_of(r);
        (given != valid).then(|| fail(&["SESSION_INVALID", &given]))
    }

    fn invalidate(&self) {
        *self.valid.lock().unwrap() = String::new();
    }
}

fn pool_handler(state: Arc<PoolState>) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |r: &Received| {
        if r.method == "session.login_with_password" {
            return state.login(r);
        }
        if let Some(reply) = state.check(r) {
            return reply;
        }
        match r.method.as_str() {
            "VM.get_all_records" => Reply::Ok(vm_records()),
            "VM.get_all" => Reply::Ok(Value::Array(vec![Value::str("OpaqueRef:vm1")])),
            "session.logout" => Reply::Ok(Value::str("")),
            other => fail(&["MESSAGE_METHOD_UNKNOWN", other]),
        }
    }
}

#[tokio::test]
async fn json_rpc_v2_is_tried_first_and_login_sends_the_originator() {
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, pool_handler(state.clone())).await;
    let session = connect(&mock.url).await.unwrap();
    let vms = session.vm().get_all_records().await.unwrap();
    let vm = &vms[&Ref::new("OpaqueRef:vm1")];
    assert_eq!(vm.memory_static_max, 1 << 60);
    assert_eq!(session.protocol(), Some(Protocol::JsonRpc));

    let received = mock.received();
    assert!(received.iter().all(|r| r.path == "/jsonrpc" && r.json));
    assert!(
        received
            .iter()
            .all(|r| r.jsonrpc_version.as_deref() == Some("2.0"))
    );
    let login = &received[0];
    assert_eq!(login.method, "session.login_with_password");
    assert_eq!(
        login.params,
        vec![
            Value::str("root"),
            Value::str("s3cret-pw"),
            Value::str("1.1"),
            Value::str("xenvault")
        ]
    );
    assert_eq!(session_of(&received[1]), "OpaqueRef:s1");
    assert!(
        !format!("{session:?}").contains("s3cret")
            && !format!("{session:?}").contains("OpaqueRef:s1")
    );
}

#[tokio::test]
async fn falls_back_to_xml_rpc_when_jsonrpc_is_not_offered_and_remembers() {
    for mode in [JsonMode::XmlOnly, JsonMode::NotFound] {
        let state = PoolState::new();
        let mock = MockXapi::start(mode, pool_handler(state.clone())).await;
        let session = connect(&mock.url).await.unwrap();
        assert_eq!(session.protocol(), Some(Protocol::XmlRpc), "{mode:?}");
        let vms = session.vm().get_all_records().await.unwrap();
        // XML-RPC carries the int64 as an untyped string.
        assert_eq!(vms[&Ref::new("OpaqueRef:vm1")].memory_static_max, 1 << 60);
        let all = session.vm().get_all().await.unwrap();
        assert_eq!(all.len(), 1);
        let received = mock.received();
        assert_eq!(received.len(), 3, "{mode:?}: {:?}", mock.methods());
        assert!(
            received.iter().all(|r| r.path == "/" && !r.json),
            "{mode:?}"
        );
    }
}

#[tokio::test]
async fn json_rpc_v1_replies_and_failures() {
    let state = PoolState::new();
    let handler_state = state.clone();
    let mock = MockXapi::start(JsonMode::V1, move |r: &Received| match r.method.as_str() {
        "session.login_with_password" => handler_state.login(r),
        "VM.get_record" => fail(&["HANDLE_INVALID", "VM", "OpaqueRef:gone"]),
        _ => Reply::Ok(vm_records()),
    })
    .await;
    let session = connect(&mock.url).await.unwrap();
    assert_eq!(session.protocol(), Some(Protocol::JsonRpc));
    let err = session
        .vm()
        .get_record(&Ref::new("OpaqueRef:gone"))
        .await
        .unwrap_err();
    assert!(err.is_code(&ErrorCode::HandleInvalid), "{err}");
    assert!(matches!(&err, Error::Xapi { method, .. } if method == "VM.get_record"));
    assert_eq!(err.xapi().unwrap().params, vec!["VM", "OpaqueRef:gone"]);
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn forced_protocols_are_respected() {
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, pool_handler(state)).await;
    let mut options = ConnectOptions::new(TlsPolicy::Verify);
    options.protocol = ProtocolChoice::XmlRpc;
    options.originator = "xenvault-test".into();
    let session = Client::connect_with(&mock.url, creds(), options)
        .await
        .unwrap();
    session.vm().get_all().await.unwrap();
    assert!(mock.received().iter().all(|r| r.path == "/"));
    assert_eq!(mock.received()[0].params[3], Value::str("xenvault-test"));
}

#[tokio::test]
async fn wrong_password_is_a_typed_error_without_the_password() {
    let mock = MockXapi::start(JsonMode::V2, |r: &Received| {
        fail(&[
            "SESSION_AUTHENTICATION_FAILED",
            &session_of(r),
            "Authentication failure",
        ])
    })
    .await;
    let err = connect(&mock.url).await.unwrap_err();
    assert!(err.is_code(&ErrorCode::SessionAuthenticationFailed));
    assert!(!format!("{err} {err:?}").contains("s3cret-pw"));
}

#[tokio::test]
async fn unreachable_hosts_are_transport_errors() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let err = connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err}");
    assert!(err.is_retryable());
}

/// A member on 127.0.0.1 answering every call with `HOST_IS_SLAVE [coordinator]`.
///
/// Test servers bind only 127.0.0.1, so every host of these tests has its own
/// port and `HOST_IS_SLAVE` names `127.0.0.1:PORT` (as xapi-sim does). How a
/// bare address (real xapi) keeps the scheme and port, and how IPv6 is
/// bracketed, is covered by the unit tests of `transport::coordinator_url`.
async fn member(coordinator: String) -> MockXapi {
    MockXapi::start(JsonMode::V2, move |_r: &Received| {
        fail(&["HOST_IS_SLAVE", &coordinator])
    })
    .await
}

#[tokio::test]
async fn host_is_slave_at_login_reconnects_to_the_coordinator() {
    let state = PoolState::new();
    let coordinator = MockXapi::start(JsonMode::V2, pool_handler(state)).await;
    let port = coordinator.addr.port();
    let member = member(format!("127.0.0.1:{port}")).await;
    let session = connect(&member.url).await.unwrap();
    assert_eq!(
        session.base_url().as_str(),
        format!("http://127.0.0.1:{port}/")
    );
    session.vm().get_all().await.unwrap();
    assert_eq!(member.methods(), vec!["session.login_with_password"]);
    assert_eq!(
        coordinator.methods(),
        vec!["session.login_with_password", "VM.get_all"]
    );
}

#[tokio::test]
async fn host_is_slave_after_a_failover_moves_the_session() {
    let new = MockXapi::start(JsonMode::V2, pool_handler(PoolState::new())).await;
    let new_address = format!("127.0.0.1:{}", new.addr.port());
    let old_state = PoolState::new();
    let old = MockXapi::start(JsonMode::V2, {
        let state = old_state.clone();
        let demoted = Arc::new(AtomicUsize::new(0));
        let new_address = new_address.clone();
        move |r: &Received| {
            if r.method == "session.login_with_password" {
                return state.login(r);
            }
            // After the first call, this host is no longer the coordinator.
            if demoted.fetch_add(1, Ordering::SeqCst) >= 1 {
                return fail(&["HOST_IS_SLAVE", &new_address]);
            }
            Reply::Ok(Value::Array(vec![]))
        }
    })
    .await;
    let session = connect(&old.url).await.unwrap();
    assert!(session.vm().get_all().await.unwrap().is_empty());
    assert_eq!(session.vm().get_all().await.unwrap().len(), 1);
    assert_eq!(session.base_url().port(), Some(new.addr.port()));
    assert_eq!(
        new.methods(),
        vec!["session.login_with_password", "VM.get_all"]
    );
}

#[tokio::test]
async fn host_is_slave_loops_end_with_a_clear_error() {
    // a says "ask b", b says "ask a": the client gives up with the chain.
    let a_port = Arc::new(std::sync::atomic::AtomicU16::new(0));
    let b = MockXapi::start(JsonMode::V2, {
        let a_port = a_port.clone();
        move |_r: &Received| {
            let a = format!("127.0.0.1:{}", a_port.load(Ordering::SeqCst));
            fail(&["HOST_IS_SLAVE", &a])
        }
    })
    .await;
    let a = member(format!("127.0.0.1:{}", b.addr.port())).await;
    a_port.store(a.addr.port(), Ordering::SeqCst);
    let err = connect(&a.url).await.unwrap_err();
    assert!(
        matches!(&err, Error::TooManyRedirects { chain } if chain.len() == 4),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_invalid_logs_in_once_for_concurrent_callers_and_retries() {
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, pool_handler(state.clone())).await;
    let session = connect(&mock.url).await.unwrap();
    state.invalidate();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let s = session.clone();
            tokio::spawn(async move { s.vm().get_all().await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().len(), 1);
    }
    assert_eq!(
        state.logins.load(Ordering::SeqCst),
        2,
        "{:?}",
        mock.methods()
    );
    assert_eq!(session.relogin_count(), 1);
    // Calls that started before the new login failed once and were retried
    // once; later ones used the new session directly.
    let calls = mock.count("VM.get_all");
    assert!((9..=16).contains(&calls), "{calls} VM.get_all calls");
}

#[tokio::test]
async fn session_invalid_twice_is_returned_after_one_retry() {
    let logins = Arc::new(AtomicUsize::new(0));
    let counter = logins.clone();
    let mock = MockXapi::start(JsonMode::V2, move |r: &Received| {
        if r.method == "session.login_with_password" {
            counter.fetch_add(1, Ordering::SeqCst);
            return Reply::Ok(Value::str("OpaqueRef:s"));
        }
        fail(&["SESSION_INVALID", "OpaqueRef:s"])
    })
    .await;
    let session = connect(&mock.url).await.unwrap();
    let err = session.vm().get_all().await.unwrap_err();
    assert!(err.is_code(&ErrorCode::SessionInvalid));
    assert!(
        !err.to_string().contains("OpaqueRef:s"),
        "the session ref is redacted: {err}"
    );
    assert_eq!(mock.count("VM.get_all"), 2);
    assert_eq!(logins.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn logout_ends_the_session_for_every_clone() {
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, pool_handler(state)).await;
    let session = connect(&mock.url).await.unwrap();
    let clone = session.clone();
    session.logout().await.unwrap();
    assert!(matches!(clone.vm().get_all().await, Err(Error::LoggedOut)));
    let logout = mock
        .received()
        .into_iter()
        .find(|r| r.method == "session.logout")
        .unwrap();
    assert_eq!(logout.params, vec![Value::str("OpaqueRef:s1")]);
}

#[tokio::test]
async fn vm_snapshot_falls_back_without_ignore_vdis_on_old_hosts() {
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, {
        let state = state.clone();
        move |r: &Received| {
            if r.method == "session.login_with_password" {
                return state.login(r);
            }
            match (r.method.as_str(), r.params.len()) {
                ("VM.snapshot" | "Async.VM.snapshot", 4) => {
                    fail(&["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.snapshot", "2", "3"])
                }
                ("VM.snapshot", 3) => Reply::Ok(Value::str("OpaqueRef:snap")),
                ("Async.VM.snapshot", 3) => Reply::Ok(Value::str("OpaqueRef:task")),
                ("task.get_record", _) => Reply::Ok(task_record(
                    "success",
                    "<value>OpaqueRef:snap2</value>",
                    &[],
                )),
                ("task.destroy", _) => Reply::Ok(Value::str("")),
                (other, _) => fail(&["MESSAGE_METHOD_UNKNOWN", other]),
            }
        }
    })
    .await;
    let session = connect(&mock.url).await.unwrap();
    let vm: VmRef = Ref::new("OpaqueRef:vm1");
    let snap = session.vm().snapshot(&vm, "backup", &[]).await.unwrap();
    assert_eq!(snap.as_str(), "OpaqueRef:snap");
    let calls: Vec<_> = mock
        .received()
        .into_iter()
        .filter(|r| r.method == "VM.snapshot")
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].params[3], Value::Array(vec![]));
    assert_eq!(calls[1].params[2], Value::str("backup"));

    // Async too: the mismatch comes back synchronously.
    let snap = session
        .vm()
        .snapshot(&vm, "backup", &[])
        .run_async(&WaitOptions::default())
        .await
        .unwrap();
    assert_eq!(snap.as_str(), "OpaqueRef:snap2");
    assert_eq!(mock.count("task.destroy"), 1);

    // With VDIs to ignore there is no silent fallback.
    let ignore: Vec<VdiRef> = vec![Ref::new("OpaqueRef:vdi9")];
    let err = session.vm().snapshot(&vm, "b", &ignore).await.unwrap_err();
    assert!(err.is_code(&ErrorCode::MessageParameterCountMismatch));
}

/// A host where `Async.VM.clone` makes a task that finishes after a few
/// reads; `events` says whether `event.from` works.
fn task_host(
    events: bool,
    final_status: &'static str,
    error_info: &'static [&'static str],
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    let reads = Arc::new(AtomicUsize::new(0));
    let state = PoolState::new();
    move |r: &Received| {
        if r.method == "session.login_with_password" {
            return state.login(r);
        }
        let done = || task_record(final_status, "<value>OpaqueRef:clone</value>", error_info);
        match r.method.as_str() {
            "Async.VM.clone" | "Async.VM.copy" => Reply::Ok(Value::str("OpaqueRef:task1")),
            "task.create" => Reply::Ok(Value::str("OpaqueRef:task1")),
            "task.get_record" => {
                if reads.fetch_add(1, Ordering::SeqCst) < 3 {
                    Reply::Ok(task_record("pending", "", &[]))
                } else {
                    Reply::Ok(done())
                }
            }
            "event.from" if events => {
                let token = r.params[2].as_str().unwrap_or_default().to_string();
                // The first call reports the current (pending) state, the
                // next one the completion.
                let snapshot = if token.is_empty() {
                    task_record("pending", "", &[])
                } else {
                    done()
                };
                Reply::Ok(Value::record([
                    (
                        "events",
                        Value::Array(vec![Value::record([
                            ("id", Value::str("1")),
                            ("class", Value::str("task")),
                            (
                                "operation",
                                Value::str(if token.is_empty() { "add" } else { "mod" }),
                            ),
                            ("ref", Value::str("OpaqueRef:task1")),
                            ("snapshot", snapshot),
                        ])]),
                    ),
                    ("valid_ref_counts", Value::record([("task", Value::Int(1))])),
                    (
                        "token",
                        Value::str(format!("{:020},{:020}", token.len() + 1, 0)),
                    ),
                ]))
            }
            "event.from" => fail(&["MESSAGE_METHOD_UNKNOWN", "event.from"]),
            "task.destroy" | "task.cancel" => Reply::Ok(Value::str("")),
            other => fail(&["MESSAGE_METHOD_UNKNOWN", other]),
        }
    }
}

#[tokio::test]
async fn async_calls_wait_with_event_from_and_destroy_the_task() {
    let mock = MockXapi::start(JsonMode::V2, task_host(true, "success", &[])).await;
    let session = connect(&mock.url).await.unwrap();
    let clone = session
        .vm()
        .clone_vm(&Ref::new("OpaqueRef:vm1"), "copy")
        .run_async(&WaitOptions::default())
        .await
        .unwrap();
    assert_eq!(clone.as_str(), "OpaqueRef:clone");
    let from: Vec<_> = mock
        .received()
        .into_iter()
        .filter(|r| r.method == "event.from")
        .collect();
    assert_eq!(from.len(), 2, "{:?}", mock.methods());
    assert_eq!(
        from[0].params[1],
        Value::Array(vec![Value::str("task/OpaqueRef:task1")])
    );
    assert_eq!(from[0].params[2], Value::str(""));
    assert!(matches!(from[0].params[3], Value::Double(t) if t > 0.0));
    assert_eq!(
        from[1].params[2],
        Value::str("00000000000000000001,00000000000000000000")
    );
    let destroy = mock
        .received()
        .into_iter()
        .find(|r| r.method == "task.destroy")
        .unwrap();
    assert_eq!(destroy.params[1], Value::str("OpaqueRef:task1"));
}

#[tokio::test]
async fn async_calls_poll_when_events_are_unavailable() {
    let mock = MockXapi::start(JsonMode::V2, task_host(false, "success", &[])).await;
    let session = connect(&mock.url).await.unwrap();
    let task = session
        .vm()
        .clone_vm(&Ref::new("OpaqueRef:vm1"), "copy")
        .start()
        .await
        .unwrap();
    assert_eq!(task.task_ref().as_str(), "OpaqueRef:task1");
    let options = WaitOptions {
        poll_initial: Duration::from_millis(10),
        ..WaitOptions::default()
    };
    let clone = task.wait(&options).await.unwrap();
    assert_eq!(clone.as_str(), "OpaqueRef:clone");
    assert_eq!(mock.count("task.get_record"), 4);
    assert_eq!(mock.count("task.destroy"), 1);
}

#[tokio::test]
async fn failed_tasks_become_xapi_errors_named_after_the_call() {
    for events in [true, false] {
        let mock = MockXapi::start(
            JsonMode::V2,
            task_host(events, "failure", &["SR_FULL", "100", "50"]),
        )
        .await;
        let session = connect(&mock.url).await.unwrap();
        let err = session
            .vm()
            .copy(&Ref::new("OpaqueRef:vm1"), "c", &Ref::null())
            .run_async(&WaitOptions {
                poll_initial: Duration::from_millis(10),
                ..WaitOptions::default()
            })
            .await
            .unwrap_err();
        assert!(err.is_code(&ErrorCode::SrFull), "{err}");
        assert!(matches!(&err, Error::Xapi { method, .. } if method == "Async.VM.copy"));
        assert_eq!(err.xapi().unwrap().params, vec!["100", "50"]);
        assert_eq!(
            mock.count("task.destroy"),
            1,
            "failed tasks are destroyed too"
        );
    }
}

#[tokio::test]
async fn waiting_times_out_and_cancels_the_task() {
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, move |r: &Received| match r.method.as_str() {
        "session.login_with_password" => state.login(r),
        "Async.VM.copy" => Reply::Ok(Value::str("OpaqueRef:slow")),
        "task.get_record" => Reply::Ok(task_record("pending", "", &[])),
        "task.cancel" => Reply::Ok(Value::str("")),
        other => fail(&["MESSAGE_METHOD_UNKNOWN", other]),
    })
    .await;
    let session = connect(&mock.url).await.unwrap();
    let options = WaitOptions {
        timeout: Duration::from_millis(300),
        method: WaitMethod::Poll,
        poll_initial: Duration::from_millis(20),
        ..WaitOptions::default()
    };
    let started = std::time::Instant::now();
    let err = session
        .vm()
        .copy(&Ref::new("OpaqueRef:vm1"), "c", &Ref::null())
        .run_async(&options)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            &err,
            Error::TaskTimeout {
                action: "cancelled",
                ..
            }
        ),
        "{err}"
    );
    let cancel = mock
        .received()
        .into_iter()
        .find(|r| r.method == "task.cancel")
        .unwrap();
    assert_eq!(cancel.params[1], Value::str("OpaqueRef:slow"));
}

#[tokio::test]
async fn task_guards_report_the_outcome_and_clean_up() {
    let mock = MockXapi::start(JsonMode::V2, task_host(true, "success", &[])).await;
    let session = connect(&mock.url).await.unwrap();
    let guard = session.create_task("export vm1", "xenvault").await.unwrap();
    assert_eq!(guard.id(), "OpaqueRef:task1");
    let create = mock
        .received()
        .into_iter()
        .find(|r| r.method == "task.create")
        .unwrap();
    assert_eq!(
        create.params[1..],
        [Value::str("export vm1"), Value::str("xenvault")]
    );
    let record = guard.wait(&WaitOptions::default()).await.unwrap();
    assert_eq!(record.status, TaskStatus::Success);
    assert_eq!(mock.count("task.destroy"), 1);
    assert_eq!(mock.count("task.cancel"), 0);

    // A guard dropped before its transfer finished is cancelled and destroyed.
    let guard = session.create_task("import", "").await.unwrap();
    drop(guard);
    for _ in 0..100 {
        if mock.count("task.destroy") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock.count("task.cancel"), 1);
    assert_eq!(mock.count("task.destroy"), 2);
}

#[tokio::test]
async fn failed_transfer_tasks_carry_the_xapi_error() {
    let mock = MockXapi::start(
        JsonMode::V2,
        task_host(
            false,
            "failure",
            &["VM_BAD_POWER_STATE", "OpaqueRef:vm1", "halted", "running"],
        ),
    )
    .await;
    let session = connect(&mock.url).await.unwrap();
    let guard = session.create_task("export vm1", "").await.unwrap();
    let err = guard
        .wait(&WaitOptions {
            poll_initial: Duration::from_millis(10),
            ..WaitOptions::default()
        })
        .await
        .unwrap_err();
    assert!(err.is_code(&ErrorCode::VmBadPowerState));
    assert!(matches!(&err, Error::Xapi { method, .. } if method == "task export vm1"));
}

#[tokio::test]
async fn tls_failures_show_their_cause() {
    // reqwest says "error sending request" and nests the TLS cause (a pin
    // mismatch, a plain-HTTP port…) several levels deep: the error shows the
    // whole chain. Here the port speaks plain HTTP, so the handshake fails.
    let state = PoolState::new();
    let mock = MockXapi::start(JsonMode::V2, pool_handler(state)).await;
    let https = format!("https://127.0.0.1:{}", mock.addr.port());
    let pin: xenvault_xapi::tls::Fingerprint =
        format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    let err = Client::connect(&https, creds(), TlsPolicy::Pinned(pin))
        .await
        .unwrap_err();
    let Error::Transport { detail, .. } = &err else {
        panic!("expected a transport error, got {err}");
    };
    assert!(detail.contains("corrupt message"), "{detail}");
    assert!(err.to_string().contains(detail.as_str()));
}
