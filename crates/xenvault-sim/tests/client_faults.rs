//! Our client against the real `xapi-sim` binary: every injected fault turns into the
//! right typed error of the client, and nothing hangs (each step is bounded by a
//! timeout that fails the test). Call failures (`/_sim/faults/call`), cut and slow
//! streams (`/_sim/faults/stream`), expired sessions, `HOST_IS_SLAVE`, a wrong password,
//! a wrong certificate pin, HTTP without a valid session, exporting a running VM, and a
//! chunked import.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod client_support;

use std::time::{Duration, Instant};

use client_support::{Ctx, STEP, SimProc, error_chain, raw_http, within};
use futures::StreamExt as _;
use xenvault_xapi::error::{Error, ErrorCode};
use xenvault_xapi::http::{HttpError, HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::nbd::client::NbdError;
use xenvault_xapi::session::{Client, Credentials};
use xenvault_xapi::task::WaitOptions;
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};
use xenvault_xapi::transport::{ConnectOptions, ProtocolChoice};

fn sim(extra: &[&str]) -> SimProc {
    let mut args = vec!["--vms", "2", "--disk-size", "4M", "--written", "25%"];
    args.extend_from_slice(extra);
    SimProc::spawn(&args)
}

/// The XAPI error of a client error, or a panic naming what came instead.
fn xapi_code(err: &Error) -> (&ErrorCode, &[String]) {
    match err {
        Error::Xapi { error, .. } => (&error.code, &error.params),
        other => panic!("expected an XAPI error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_call_failure_is_a_typed_xapi_error() {
    let sim = sim(&[]);
    // Both wire protocols carry XAPI errors differently (JSON-RPC `error`, XML-RPC
    // `Status: Failure`): the client must give the same typed error for each.
    for protocol in [ProtocolChoice::JsonRpc, ProtocolChoice::XmlRpc] {
        let mut options = ConnectOptions::new(TlsPolicy::Pinned(sim.fingerprint()));
        options.protocol = protocol;
        let session = within(
            STEP,
            "login",
            Client::connect_with(
                &sim.info.https_url,
                Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
                options,
            ),
        )
        .await
        .unwrap();
        let vms = session.vm().get_all_records().await.unwrap();
        let vm = vms
            .iter()
            .find(|(_, v)| v.name_label == "vm-01")
            .map(|(r, _)| r.clone())
            .unwrap();
        sim.control(
            "POST",
            "/_sim/faults/call",
            serde_json::json!({"method": "VM.snapshot", "nth": 1, "error": ["SR_FULL", "4194304", "0"]}),
        )
        .await;
        let err = within(STEP, "VM.snapshot", session.vm().snapshot(&vm, "full", &[]))
            .await
            .unwrap_err();
        match &err {
            Error::Xapi { method, error } => {
                assert_eq!(method, "VM.snapshot", "{protocol:?}");
                assert_eq!(error.code, ErrorCode::SrFull, "{protocol:?}");
                assert_eq!(
                    error.params,
                    vec!["4194304".to_string(), "0".to_string()],
                    "{protocol:?}"
                );
            }
            other => panic!("{protocol:?}: expected Error::Xapi SR_FULL, got {other:?}"),
        }
        assert!(!err.is_retryable());
        // The fault fired once: the next snapshot works.
        within(STEP, "VM.snapshot", session.vm().snapshot(&vm, "ok", &[]))
            .await
            .unwrap();

        // The same fault on the async form surfaces through the task.
        sim.control(
            "POST",
            "/_sim/faults/call",
            serde_json::json!({"method": "VM.snapshot", "error": ["SR_FULL", "1", "2"]}),
        )
        .await;
        let err = within(
            STEP,
            "Async.VM.snapshot",
            session
                .vm()
                .snapshot(&vm, "async", &[])
                .run_async(&WaitOptions::with_timeout(STEP)),
        )
        .await
        .unwrap_err();
        let (code, params) = xapi_code(&err);
        assert_eq!(code, &ErrorCode::SrFull, "{protocol:?}");
        assert_eq!(params, ["1", "2"], "{protocol:?}");

        // A full SR (the sr-full switch) refuses snapshots the same way.
        sim.control(
            "POST",
            "/_sim/faults/sr-full",
            serde_json::json!({"on": true}),
        )
        .await;
        let err = within(
            STEP,
            "VM.snapshot",
            session.vm().snapshot(&vm, "no room", &[]),
        )
        .await
        .unwrap_err();
        assert_eq!(xapi_code(&err).0, &ErrorCode::SrFull, "{protocol:?}: {err}");
        sim.control("POST", "/_sim/faults/reset", serde_json::json!({}))
            .await;
        session.logout().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_streams_fail_with_the_simulators_error() {
    let sim = sim(&[]);
    let ctx = Ctx::http(&sim).await;
    let (vm, _) = ctx.vm("vm-02").await; // Halted: exportable
    let (vdi_ref, vdi) = ctx.only_disk(&vm).await;

    // A raw export cut after 1 MB: short body, task failed with VDI_IO_ERROR.
    sim.control(
        "POST",
        "/_sim/faults/stream",
        serde_json::json!({"handler": "export_raw_vdi", "cut_after": 1_000_000, "times": 1}),
    )
    .await;
    let f = ctx
        .fetch(
            "/export_raw_vdi",
            &[("vdi", vdi.uuid.as_str()), ("format", "raw")],
        )
        .await;
    if let Ok(body) = &f.body {
        assert_eq!(body.len(), 1_000_000, "a cut stream ends where it was cut");
    }
    let err = f.task.expect_err("the task of a cut export must fail");
    let (code, params) = xapi_code(&err);
    assert_eq!(code, &ErrorCode::VdiIoError, "{err}");
    assert!(params[0].contains("cut after 1000000"), "{params:?}");
    // The fault was used up: the next export is whole.
    ctx.export_raw(&vdi).await;

    // An XVA export cut mid-way: the decoder reports a truncated archive, the task
    // the simulator's error.
    sim.control(
        "POST",
        "/_sim/faults/stream",
        serde_json::json!({"handler": "export", "cut_after": 300_000, "times": 1}),
    )
    .await;
    let f = ctx.fetch("/export", &[("ref", vm.as_str())]).await;
    let err = f.task.expect_err("the task of a cut XVA export must fail");
    assert_eq!(xapi_code(&err).0, &ErrorCode::VdiIoError);
    if let Ok(body) = f.body {
        assert_eq!(body.len(), 300_000);
        let mut dec = xenvault_formats::xva::XvaDecoder::new();
        let fed = dec.feed(&body);
        assert!(
            fed.is_err() || dec.finish().is_err(),
            "a truncated XVA must not decode as complete"
        );
    }

    // NBD cut after 100 kB: the reader fails with a typed error instead of waiting.
    sim.control(
        "POST",
        "/_sim/faults/stream",
        serde_json::json!({"handler": "nbd", "cut_after": 100_000, "times": 1}),
    )
    .await;
    let err = ctx
        .nbd_read(&vdi_ref, std::iter::once(0..(1 << 20)).collect(), 1)
        .await
        .expect_err("an NBD stream cut mid-reply must fail");
    eprintln!("NBD cut: {err}");
    assert!(
        matches!(
            err,
            NbdError::ConnectionLost(_) | NbdError::Io { .. } | NbdError::NoConnection(_)
        ),
        "NBD cut: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_stream_completes_and_a_stalled_one_times_out() {
    // The simulator paces whole 4 MiB pieces of a raw export: 12 MiB make three.
    let sim = SimProc::spawn(&["--vms", "2", "--disk-size", "12M", "--written", "10%"]);
    let ctx = Ctx::http(&sim).await;
    let (vm, _) = ctx.vm("vm-02").await;
    let (_, vdi) = ctx.only_disk(&vm).await;
    let t0 = Instant::now();
    let whole = ctx.export_raw(&vdi).await;
    let unthrottled = t0.elapsed();
    let size = whole.len() as u64;

    // Throttled to 16 MiB/s: slower, but complete and equal.
    sim.control(
        "POST",
        "/_sim/faults/stream",
        serde_json::json!({"handler": "export_raw_vdi", "bytes_per_sec": 16 << 20, "times": 1}),
    )
    .await;
    let t0 = Instant::now();
    let slow = ctx.export_raw(&vdi).await;
    let took = t0.elapsed();
    assert!(slow == whole);
    let due = Duration::from_secs_f64(size as f64 / (16 << 20) as f64);
    eprintln!("raw export of {size} bytes: {unthrottled:?} unthrottled, {took:?} at 16 MiB/s");
    // The simulator sleeps until each piece is due: the last one ends at `due`.
    assert!(
        took >= due.mul_f64(0.95) && took > unthrottled,
        "the throttle was not applied: {took:?} for {size} bytes ({unthrottled:?} unthrottled)"
    );

    // Throttled to 100 kB/s with a 500 ms idle timeout: the first piece arrives, then
    // the stream stalls and our transfer gives up with IdleTimeout, well before the
    // throttled stream would end.
    let impatient = HttpTransfer::new(
        &ctx.policy,
        TransferOptions {
            idle_timeout: Duration::from_millis(500),
            ..TransferOptions::default()
        },
    )
    .unwrap();
    sim.control(
        "POST",
        "/_sim/faults/stream",
        serde_json::json!({"handler": "export_raw_vdi", "bytes_per_sec": 100_000, "times": 1}),
    )
    .await;
    let task = ctx.session.create_task("stalled export", "").await.unwrap();
    let url = handler_url(
        &ctx.session.base_url(),
        "/export_raw_vdi",
        ctx.session.session_ref().expose(),
        Some(task.id()),
        &[("vdi", vdi.uuid.as_str()), ("format", "raw")],
    );
    let t0 = Instant::now();
    let outcome = within(Duration::from_secs(10), "stalled download", async {
        let download = impatient.get(url).await?;
        let mut body = download.body;
        let mut got = 0u64;
        while let Some(piece) = body.next().await {
            got += piece?.len() as u64;
        }
        Ok::<u64, HttpError>(got)
    })
    .await;
    let elapsed = t0.elapsed();
    match outcome {
        Err(HttpError::IdleTimeout { after, bytes, .. }) => {
            assert_eq!(after, Duration::from_millis(500));
            assert!(bytes < size, "{bytes} bytes before the stall");
        }
        other => panic!("expected HttpError::IdleTimeout, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_secs(5),
        "the idle timeout took {elapsed:?}"
    );
    task.abandon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_session_logs_in_again_and_http_401_is_an_auth_error() {
    let sim = sim(&[]);
    let ctx = Ctx::http(&sim).await;
    assert_eq!(ctx.session.relogin_count(), 0);
    let before = ctx.session.session_ref();

    // RPC: SESSION_INVALID → a transparent new login, the call succeeds.
    let expired = sim
        .control(
            "POST",
            "/_sim/faults/expire-session",
            serde_json::json!({"all": true}),
        )
        .await;
    assert!(expired["expired"].as_u64().unwrap() >= 1);
    let vms = within(STEP, "VM.get_all", ctx.session.vm().get_all())
        .await
        .unwrap();
    assert!(!vms.is_empty());
    assert_eq!(ctx.session.relogin_count(), 1);
    assert_ne!(ctx.session.session_ref(), before);

    // HTTP with an expired session: 401 → HttpError::Unauthorized; renew, then it works.
    let (vm, _) = ctx.vm("vm-02").await;
    let (_, vdi) = ctx.only_disk(&vm).await;
    let stale = ctx.session.session_ref();
    sim.control(
        "POST",
        "/_sim/faults/expire-session",
        serde_json::json!({"all": true}),
    )
    .await;
    let url = handler_url(
        &ctx.session.base_url(),
        "/export_raw_vdi",
        stale.expose(),
        None,
        &[("vdi", vdi.uuid.as_str()), ("format", "raw")],
    );
    let err = within(STEP, "GET with an expired session", ctx.transfer.get(url))
        .await
        .err()
        .expect("an expired session must be refused");
    assert!(
        matches!(err, HttpError::Unauthorized { method: "GET", .. }),
        "{err:?}"
    );
    assert!(
        !err.to_string().contains(stale.expose()),
        "the session ref leaked into {err}"
    );
    ctx.session.renew(&stale).await.unwrap();
    assert_eq!(ctx.session.relogin_count(), 2);
    ctx.export_raw(&vdi).await;

    // HTTP without any session: 401 too.
    let mut url = handler_url(&ctx.session.base_url(), "/export_raw_vdi", "", None, &[]);
    url.set_query(Some(&format!("vdi={}&format=raw", vdi.uuid)));
    let err = within(STEP, "GET without a session", ctx.transfer.get(url))
        .await
        .err()
        .expect("no session must be refused");
    assert!(matches!(err, HttpError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_slave_is_followed_to_the_coordinator() {
    let sim = sim(&["--hosts", "2"]);
    let hosts = sim
        .control("GET", "/_sim/hosts", serde_json::Value::Null)
        .await;
    let hosts = hosts["hosts"].as_array().unwrap().clone();
    assert_eq!(hosts.len(), 2);
    let coordinator = hosts.iter().find(|h| h["coordinator"] == true).unwrap();
    let member = hosts.iter().find(|h| h["coordinator"] == false).unwrap();
    let port = |u: &serde_json::Value| {
        u.as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };

    // Logging in at the member (plain and TLS) ends at the coordinator, same scheme.
    for (key, policy) in [
        ("url", TlsPolicy::Pinned(sim.fingerprint())),
        ("https_url", TlsPolicy::Pinned(sim.fingerprint())),
    ] {
        let ctx = Ctx::connect(
            &sim,
            member[key].as_str().unwrap(),
            policy,
            TransferOptions::default(),
        )
        .await;
        let base = ctx.session.base_url();
        assert_eq!(base.port(), Some(port(&coordinator[key])), "{key}");
        assert_eq!(base.scheme(), if key == "url" { "http" } else { "https" });
        assert!(!ctx.session.vm().get_all().await.unwrap().is_empty());
        assert_eq!(ctx.session.relogin_count(), 0);
    }

    // The coordinator changes under a live session: its next login (after the session
    // expired) meets HOST_IS_SLAVE at the old coordinator and follows to the new one.
    let ctx = Ctx::http(&sim).await;
    let (vm, _) = ctx.vm("vm-02").await;
    let (_, vdi) = ctx.only_disk(&vm).await;
    let moved = sim
        .control("POST", "/_sim/coordinator", serde_json::json!({}))
        .await;
    assert_eq!(moved["coordinator"], member["ref"]);
    sim.control(
        "POST",
        "/_sim/faults/expire-session",
        serde_json::json!({"all": true}),
    )
    .await;
    let vms = within(
        STEP,
        "VM.get_all after the move",
        ctx.session.vm().get_all(),
    )
    .await
    .unwrap();
    assert!(!vms.is_empty());
    assert_eq!(ctx.session.base_url().port(), Some(port(&member["url"])));
    assert_eq!(ctx.session.relogin_count(), 1);
    // HTTP transfers follow the session to the new coordinator.
    ctx.export_raw(&vdi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_wrong_pin_are_refused() {
    let sim = sim(&[]);
    let err = within(
        STEP,
        "login with a wrong password",
        Client::connect(
            &sim.info.url,
            Credentials::new("root", "not-the-password"),
            TlsPolicy::Pinned(sim.fingerprint()),
        ),
    )
    .await
    .unwrap_err();
    let (code, params) = xapi_code(&err);
    assert_eq!(code, &ErrorCode::SessionAuthenticationFailed);
    assert_eq!(params[0], "root");
    assert!(!err.to_string().contains("not-the-password"));

    // A pin that is not the server's certificate: a TLS error that names the pin.
    let wrong: Fingerprint = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    let err = within(
        STEP,
        "login with a wrong pin",
        Client::connect(
            &sim.info.https_url,
            Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
            TlsPolicy::Pinned(wrong),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    let text = error_chain(&err);
    assert!(
        text.contains(&wrong.to_string()) && text.contains("pinned"),
        "the TLS error must name the pin: {text}"
    );
    assert!(
        text.contains(&sim.info.fingerprint),
        "and the certificate presented: {text}"
    );

    // The data plane refuses the same way.
    let ctx = Ctx::https(&sim).await;
    let transfer =
        HttpTransfer::new(&TlsPolicy::Pinned(wrong), TransferOptions::default()).unwrap();
    let url = handler_url(
        &ctx.session.base_url(),
        "/export_raw_vdi",
        ctx.session.session_ref().expose(),
        None,
        &[("vdi", "whatever")],
    );
    let err = within(STEP, "GET with a wrong pin", transfer.get(url))
        .await
        .err()
        .expect("a wrong pin must be refused");
    match &err {
        HttpError::Request { reason, .. } => {
            assert!(reason.contains(&wrong.to_string()), "{reason}")
        }
        other => panic!("expected HttpError::Request naming the pin, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporting_a_running_vm_is_vm_bad_power_state() {
    let sim = sim(&[]);
    let ctx = Ctx::http(&sim).await;
    let (vm, record) = ctx.vm("vm-01").await;
    assert_eq!(
        record.power_state,
        xenvault_xapi::records::PowerState::Running
    );
    let f = ctx.fetch("/export", &[("ref", vm.as_str())]).await;
    match &f.body {
        Err(HttpError::Status {
            status, task_id, ..
        }) => {
            assert!(*status >= 400, "status {status}");
            assert!(task_id.is_some(), "the refusal names its task");
        }
        other => panic!(
            "expected an HTTP status error, got {:?}",
            other.as_ref().map(Vec::len)
        ),
    }
    let err = f.task.expect_err("the export task must fail");
    let (code, params) = xapi_code(&err);
    assert_eq!(code, &ErrorCode::VmBadPowerState);
    assert_eq!(params[0], vm.as_str());
    assert_eq!(params[2], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_import_is_refused() {
    let sim = sim(&[]);
    let ctx = Ctx::http(&sim).await;
    // Our HttpTransfer never sends chunked bodies (put takes a Content-Length), so the
    // chunked request goes over a raw socket; the task is ours.
    let task = ctx.session.create_task("chunked import", "").await.unwrap();
    let base = ctx.session.base_url();
    let addr = format!("{}:{}", base.host_str().unwrap(), base.port().unwrap());
    let head = format!(
        "PUT /import?session_id={}&task_id={} HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        ctx.session.session_ref().expose(),
        task.id()
    );
    let (status, _, _) = within(
        STEP,
        "chunked PUT",
        raw_http(&addr, head.as_bytes(), b"5\r\nhello\r\n0\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 403);
    sim.control("POST", "/_sim/faults/reset", serde_json::json!({}))
        .await;
    let err = within(
        STEP,
        "import task",
        task.wait(&WaitOptions::with_timeout(STEP)),
    )
    .await
    .unwrap_err();
    let (code, _) = xapi_code(&err);
    assert_eq!(code.as_str(), "IMPORT_ERROR_CANNOT_HANDLE_CHUNKED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_import_fails_its_task_and_leaves_no_vm() {
    let sim = sim(&[]);
    let ctx = Ctx::http(&sim).await;
    let (vm, _) = ctx.vm("vm-02").await;
    let xva = ctx.fetch_ok("/export", &[("ref", vm.as_str())]).await;
    assert!(xva.len() > 300_000);
    let vms_before = ctx.session.vm().get_all().await.unwrap().len();

    sim.control(
        "POST",
        "/_sim/faults/stream",
        // Not `times: 1`: our PUT first sends an empty-body probe for redirects, which is
        // an import stream of its own and would use the fault up.
        serde_json::json!({"handler": "import", "cut_after": 200_000}),
    )
    .await;
    let task = ctx.session.create_task("cut import", "").await.unwrap();
    let url = handler_url(
        &ctx.session.base_url(),
        "/import",
        ctx.session.session_ref().expose(),
        Some(task.id()),
        &[],
    );
    let len = xva.len() as u64;
    let body = futures::stream::iter(
        xva.chunks(64 << 10)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let upload = within(STEP, "cut upload", ctx.transfer.put(url, body, len)).await;
    eprintln!("cut upload: {:?}", upload.as_ref().map(|u| u.bytes_sent));
    if let Err(e) = &upload {
        assert!(
            matches!(
                e,
                HttpError::Upload { .. } | HttpError::Request { .. } | HttpError::BodyRead { .. }
            ),
            "{e:?}"
        );
    }
    sim.control("POST", "/_sim/faults/reset", serde_json::json!({}))
        .await;
    let err = within(
        STEP,
        "import task",
        task.wait(&WaitOptions::with_timeout(STEP)),
    )
    .await
    .unwrap_err();
    let (code, params) = xapi_code(&err);
    assert_eq!(code, &ErrorCode::VdiIoError, "{err}");
    assert!(params[0].contains("cut after"), "{params:?}");
    assert_eq!(
        ctx.session.vm().get_all().await.unwrap().len(),
        vms_before,
        "a failed import leaves no VM behind"
    );
}
