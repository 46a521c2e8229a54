//! Wire fidelity against xapi (xapi-facts §1): raw XML-RPC bodies (ints and
//! strings untyped, failure envelopes), JSON-RPC v1/v2 shapes, transport
//! errors as HTTP 500, parameter-count and removed-message errors, the
//! `Class_method` spelling, keep-alive, the 300 KiB limit, and a restart that
//! keeps the state.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{SimProcess, call, jsonrpc, login, post, raw};
use serde_json::json;

fn xml_call(method: &str, params: &[&str]) -> String {
    let mut s =
        format!("<?xml version='1.0'?><methodCall><methodName>{method}</methodName><params>");
    for p in params {
        s.push_str(&format!(
            "<param><value><string>{p}</string></value></param>"
        ));
    }
    s.push_str("</params></methodCall>");
    s
}

#[test]
fn xml_rpc_bodies_are_shaped_like_xapi() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "2", "--disk-size", "4M"]);
    let addr = sim.addr();
    let pw = sim.password();
    let (st, head, body) = post(
        &addr,
        "/",
        "text/xml",
        &xml_call("session.login_with_password", &["root", &pw]),
    );
    assert_eq!(st, 200);
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/xml"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("content-length: "),
        "{head}"
    );
    assert!(
        !body.contains("<string>"),
        "xapi sends untyped strings: {body}"
    );
    let session = body
        .split("<name>Value</name><value>")
        .nth(1)
        .and_then(|r| r.split("</value>").next())
        .unwrap()
        .to_string();
    assert!(session.starts_with("OpaqueRef:"), "{body}");

    // A VM record: ints untyped, booleans typed, datetimes typed.
    let vms = call(
        &addr,
        "VM.get_all_records_where",
        json!([
            session,
            "field \"is_control_domain\"=\"false\" and field \"is_a_template\"=\"false\""
        ]),
    );
    let vm = vms.as_object().unwrap().keys().next().unwrap().clone();
    let (_, _, body) = post(
        &addr,
        "/RPC2",
        "text/xml",
        &xml_call("VM.get_record", &[&session, &vm]),
    );
    assert!(
        body.contains("<name>memory_static_max</name><value>1073741824</value>"),
        "{body}"
    );
    assert!(
        body.contains("<name>is_a_template</name><value><boolean>0</boolean></value>"),
        "{body}"
    );
    assert!(body.contains("<name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value>"), "{body}");
    assert!(
        body.contains("<name>HVM_shadow_multiplier</name><value><double>1"),
        "{body}"
    );
    assert!(
        !body.contains("<string>") && !body.contains("<i4>") && !body.contains("<int>"),
        "{body}"
    );

    // Failure envelope, exactly.
    let (st, _, body) = post(
        &addr,
        "/",
        "text/xml",
        &xml_call("VM.get_record", &[&session, "OpaqueRef:nope"]),
    );
    assert_eq!(st, 200);
    assert_eq!(
        body,
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value><value>VM</value><value>OpaqueRef:nope</value></data></array></value></member></struct></value></param></params></methodResponse>"
    );

    // Any other POST path is XML-RPC too (XO posts to /xmlrpc).
    let (st, _, body) = post(
        &addr,
        "/xmlrpc",
        "text/xml",
        &xml_call("VM.get_all", &[&session]),
    );
    assert_eq!(st, 200);
    assert!(
        body.contains("<name>Status</name><value>Success</value>"),
        "{body}"
    );

    // Malformed XML is a transport error: HTTP 500.
    let (st, _, _) = post(&addr, "/", "text/xml", "<methodCall><methodName>x");
    assert_eq!(st, 500);

    // Void results are an empty value.
    let (_, _, body) = post(
        &addr,
        "/",
        "text/xml",
        &xml_call("VM.set_name_description", &[&session, &vm, "d"]),
    );
    assert!(body.contains("<name>Value</name><value></value>"), "{body}");
    assert!(sim.stop());
}

#[test]
fn json_rpc_v1_v2_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "1", "--disk-size", "4M"]);
    let addr = sim.addr();
    let s = login(&sim);

    // v1 success and failure.
    let body = json!({"method": "VM.get_all", "params": [s], "id": "a"}).to_string();
    let (st, head, text) = post(&addr, "/jsonrpc", "application/json", &body);
    assert_eq!(st, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        r["result"].is_array() && r["error"].is_null() && r["id"] == "a",
        "{r}"
    );
    let body =
        json!({"method": "VM.get_record", "params": [s, "OpaqueRef:x"], "id": 7}).to_string();
    let r: serde_json::Value =
        serde_json::from_str(&post(&addr, "/jsonrpc", "application/json", &body).2).unwrap();
    assert_eq!(
        r,
        json!({"result": null, "error": ["HANDLE_INVALID", "VM", "OpaqueRef:x"], "id": 7})
    );

    // v2 failure: code 1, message = code, data = params.
    let r = jsonrpc(&addr, "VM.get_by_uuid", json!([s, "nope"]));
    assert_eq!(
        r["error"],
        json!({"code": 1, "message": "UUID_INVALID", "data": ["VM", "nope"]})
    );
    assert_eq!(r["jsonrpc"], "2.0");

    // ints are JSON numbers.
    let vms = call(
        &addr,
        "VM.get_all_records_where",
        json!([s, "field \"is_control_domain\"=\"true\""]),
    );
    let dom0 = vms.as_object().unwrap().values().next().unwrap();
    assert!(dom0["memory_static_max"].is_i64(), "{dom0}");
    assert_eq!(dom0["power_state"], "Running");

    // A request without id → HTTP 500.
    let (st, _, _) = post(
        &addr,
        "/jsonrpc",
        "application/json",
        &json!({"method": "VM.get_all", "params": [s]}).to_string(),
    );
    assert_eq!(st, 500);
    let (st, _, _) = post(
        &addr,
        "/jsonrpc",
        "application/json",
        &json!({"method": "VM.get_all", "params": [s], "id": null}).to_string(),
    );
    assert_eq!(st, 500);

    // Datamodel-driven errors.
    let r = jsonrpc(&addr, "VM.get_record", json!([s, "OpaqueRef:x", "extra"]));
    assert_eq!(r["error"]["message"], "MESSAGE_PARAMETER_COUNT_MISMATCH");
    assert_eq!(r["error"]["data"], json!(["VM.get_record", "2", "3"]));
    let r = jsonrpc(
        &addr,
        "VM.snapshot_with_quiesce",
        json!([s, "OpaqueRef:x", "n"]),
    );
    assert_eq!(r["error"]["message"], "MESSAGE_REMOVED");
    let r = jsonrpc(&addr, "VM.fly", json!([s]));
    assert_eq!(
        r["error"],
        json!({"code": 1, "message": "MESSAGE_METHOD_UNKNOWN", "data": ["VM.fly"]})
    );
    let r = jsonrpc(&addr, "Async.VM.get_record", json!([s, "OpaqueRef:x"]));
    assert_eq!(r["error"]["message"], "Fault", "{r}");
    let r = jsonrpc(&addr, "VM.get_all", json!(["OpaqueRef:not-a-session"]));
    assert_eq!(r["error"]["data"], json!(["OpaqueRef:not-a-session"]));
    assert_eq!(r["error"]["message"], "SESSION_INVALID");

    // Class_method spelling; get_all_records_where rules.
    let all = call(&addr, "VM_get_all", json!([s]));
    assert!(all.as_array().unwrap().len() >= 2);
    let running = call(
        &addr,
        "VM.get_all_where",
        json!([
            s,
            "field \"power_state\"=\"Running\" and not field \"is_control_domain\"=\"true\""
        ]),
    );
    assert_eq!(running.as_array().unwrap().len(), 1);
    let r = jsonrpc(
        &addr,
        "VM.get_all_records_where",
        json!([s, "field \"name_label\"=\"vm-01\""]),
    );
    assert!(r.get("error").is_some(), "API names are not DB names: {r}");
    let named = call(
        &addr,
        "VM.get_all_where",
        json!([s, "field \"name__label\"=\"vm-01\""]),
    );
    assert_eq!(named.as_array().unwrap().len(), 1);
    assert!(sim.stop());
}

#[test]
fn keep_alive_and_body_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "0"]);
    let addr = sim.addr();
    let pw = sim.password();
    let b1 = xml_call("session.login_with_password", &["root", &pw]);
    let b2 = xml_call("session.login_with_password", &["root", "bad"]);
    let req = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{b1}POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b2}",
        b1.len(),
        b2.len()
    );
    let (st, _, body) = raw(&addr, req.as_bytes());
    assert_eq!(st, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("SESSION_AUTHENTICATION_FAILED"),
        "second response on the same connection: {text}"
    );

    let big = "x".repeat(301 * 1024);
    let (st, _, _) = post(&addr, "/", "text/xml", &big);
    assert_eq!(st, 413);
    assert!(sim.stop());
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "2", "--disk-size", "4M"]);
    let addr = sim.addr();
    let fp = sim.info["fingerprint"].clone();
    let pw = sim.password();
    let s = login(&sim);
    let vm = call(
        &addr,
        "VM.get_all_where",
        json!([s, "field \"name__label\"=\"vm-01\""]),
    )[0]
    .clone();
    call(&addr, "VM.set_name_label", json!([s, vm, "renamed"]));
    call(&addr, "VM.add_tags", json!([s, vm, "kept"]));
    let snap = call(&addr, "VM.snapshot", json!([s, vm, "snap"]));
    assert!(sim.stop(), "clean exit on SIGTERM");

    let sim = SimProcess::spawn(dir.path(), &[]);
    let addr = sim.addr();
    assert_eq!(sim.info["fingerprint"], fp, "certificate kept");
    assert_eq!(sim.password(), pw, "password kept");
    let r = jsonrpc(&addr, "VM.get_all", json!([s]));
    assert_eq!(
        r["error"]["message"], "SESSION_INVALID",
        "sessions do not survive a restart, as in xapi"
    );
    let s = login(&sim);
    assert_eq!(call(&addr, "VM.get_name_label", json!([s, vm])), "renamed");
    assert!(
        call(&addr, "VM.get_tags", json!([s, vm]))
            .as_array()
            .unwrap()
            .contains(&json!("kept"))
    );
    assert_eq!(call(&addr, "VM.get_is_a_snapshot", json!([s, snap])), true);
    let snaps = call(&addr, "VM.get_snapshots", json!([s, vm]));
    assert_eq!(snaps, json!([snap]));
    assert!(sim.stop());
}
