//! Canned XML-RPC and JSON-RPC bodies in the exact shapes xapi emits
//! (xapi-facts §1.2, §1.3), decoded into typed records and errors.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::collections::BTreeMap;

use xenvault_types::rpc::{Envelope, Value};
use xenvault_xapi::de::from_value;
use xenvault_xapi::error::{ErrorCode, XapiError};
use xenvault_xapi::event::EventBatch;
use xenvault_xapi::model::Ref;
use xenvault_xapi::records::{
    EventOperation, NbdInfo, PowerState, Task, TaskStatus, Vdi, VdiType, Vm, VmOperation, VmRef,
};
use xenvault_xapi::task::parse_task_result;
use xenvault_xapi::transport::{decode_json_response, decode_xml_response, encode_xml_request};

fn success(envelope: Envelope) -> Value {
    match envelope {
        Envelope::Success(v) => v,
        Envelope::Failure(d) => panic!("unexpected failure {d:?}"),
    }
}

fn failure(envelope: Envelope) -> XapiError {
    match envelope {
        Envelope::Failure(d) => XapiError::from_description(d),
        Envelope::Success(v) => panic!("unexpected success {v:?}"),
    }
}

/// `VM.get_all_records` as xapi's XML-RPC sends it: strings and int64 untyped,
/// booleans and datetimes typed, empty `<value/>`, maps as structs.
const XML_VM_RECORDS: &str = r#"<?xml version="1.0"?>
<methodResponse><params><param><value><struct>
<member><name>Status</name><value>Success</value></member>
<member><name>Value</name><value><struct>
 <member><name>OpaqueRef:0b9c</name><value><struct>
  <member><name>uuid</name><value>5e1c2a8e-0f1e-4b6b-9d0a-111111111111</value></member>
  <member><name>name_label</name><value>web &amp; db</value></member>
  <member><name>name_description</name><value/></member>
  <member><name>power_state</name><value>Running</value></member>
  <member><name>is_a_template</name><value><boolean>0</boolean></value></member>
  <member><name>is_a_snapshot</name><value><boolean>0</boolean></value></member>
  <member><name>is_control_domain</name><value><boolean>0</boolean></value></member>
  <member><name>memory_static_max</name><value>4294967296</value></member>
  <member><name>VCPUs_max</name><value>2</value></member>
  <member><name>domid</name><value>-1</value></member>
  <member><name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value></member>
  <member><name>snapshot_of</name><value>OpaqueRef:NULL</value></member>
  <member><name>VBDs</name><value><array><data><value>OpaqueRef:vbd1</value><value>OpaqueRef:vbd2</value></data></array></value></member>
  <member><name>VIFs</name><value><array><data/></array></value></member>
  <member><name>tags</name><value><array><data></data></array></value></member>
  <member><name>other_config</name><value><struct><member><name>xenvault-job</name><value>nightly</value></member></struct></value></member>
  <member><name>blocked_operations</name><value><struct><member><name>destroy</name><value>protected</value></member><member><name>teleport</name><value>future op</value></member></struct></value></member>
  <member><name>allowed_operations</name><value><array><data><value>snapshot</value><value>some_new_operation</value></data></array></value></member>
  <member><name>current_operations</name><value><struct/></value></member>
  <member><name>domain_type</name><value>hvm</value></member>
  <member><name>field_from_the_future</name><value>ignored</value></member>
 </struct></value></member>
</struct></value></member>
</struct></value></param></params></methodResponse>"#;

#[test]
fn xml_rpc_records_decode_by_datamodel_type() {
    let value = success(decode_xml_response(XML_VM_RECORDS.as_bytes()).unwrap());
    let vms: BTreeMap<VmRef, Vm> = from_value(&value).unwrap();
    let (vm_ref, vm) = vms.iter().next().unwrap();
    assert_eq!(vm_ref.as_str(), "OpaqueRef:0b9c");
    assert_eq!(vm.name_label, "web & db");
    assert_eq!(vm.name_description, "");
    assert_eq!(vm.power_state, PowerState::Running);
    assert_eq!(vm.memory_static_max, 4_294_967_296);
    assert_eq!(vm.vcpus_max, 2);
    assert_eq!(vm.domid, -1);
    assert!(vm.snapshot_time.is_unset());
    assert!(vm.snapshot_of.is_null());
    assert_eq!(vm.vbds.len(), 2);
    assert!(vm.vifs.is_empty() && vm.tags.is_empty());
    assert_eq!(vm.other_config["xenvault-job"], "nightly");
    assert_eq!(vm.blocked_operations[&VmOperation::Destroy], "protected");
    assert_eq!(
        vm.blocked_operations[&VmOperation::Unknown("teleport".into())],
        "future op"
    );
    assert_eq!(
        vm.allowed_operations,
        vec![
            VmOperation::Snapshot,
            VmOperation::Unknown("some_new_operation".into())
        ]
    );
    assert!(vm.is_regular_vm());
    // Fields the record lacks (older hosts) take their defaults.
    assert!(!vm.has_vendor_device);
    assert!(vm.suspend_vdi.is_null());
}

#[test]
fn json_rpc_v2_records_with_big_integers() {
    let body = br#"{"jsonrpc":"2.0","result":{"OpaqueRef:d1":{"uuid":"u1","virtual_size":9223372036854775807,"physical_utilisation":9007199254740993,"type":"cbt_metadata","cbt_enabled":true,"managed":true,"snapshot_time":"20250319T04:16:24Z","sm_config":{"vhd-parent":"p"},"SR":"OpaqueRef:sr","VBDs":[]}},"id":3}"#;
    let value = success(decode_json_response(body).unwrap());
    let vdis: BTreeMap<Ref<Vdi>, Vdi> = from_value(&value).unwrap();
    let vdi = &vdis[&Ref::new("OpaqueRef:d1")];
    assert_eq!(vdi.virtual_size, i64::MAX);
    // 2^53 + 1: would be rounded by a float JSON parser.
    assert_eq!(vdi.physical_utilisation, 9_007_199_254_740_993);
    assert_eq!(vdi.type_, VdiType::CbtMetadata);
    assert!(vdi.cbt_enabled);
    assert_eq!(vdi.snapshot_time.to_string(), "20250319T04:16:24Z");
    assert_eq!(vdi.sm_config["vhd-parent"], "p");
}

#[test]
fn json_rpc_v1_success_and_void() {
    let v = success(
        decode_json_response(br#"{"result":"OpaqueRef:s","error":null,"id":"1"}"#).unwrap(),
    );
    assert_eq!(v, Value::str("OpaqueRef:s"));
    let v = success(decode_json_response(br#"{"result":"","error":null,"id":2}"#).unwrap());
    let () = from_value(&v).unwrap();
}

#[test]
fn failure_envelopes_v1_v2_and_xml() {
    let v1 = failure(
        decode_json_response(
            br#"{"result":null,"error":["HANDLE_INVALID","VM","OpaqueRef:x"],"id":1}"#,
        )
        .unwrap(),
    );
    assert_eq!(v1.code, ErrorCode::HandleInvalid);
    assert_eq!(v1.params, vec!["VM", "OpaqueRef:x"]);

    let v2 = failure(
        decode_json_response(
            br#"{"jsonrpc":"2.0","error":{"code":1,"message":"VM_BAD_POWER_STATE","data":["OpaqueRef:v","halted","running"]},"id":1}"#,
        )
        .unwrap(),
    );
    assert_eq!(v2.code, ErrorCode::VmBadPowerState);
    assert_eq!(v2.params, vec!["OpaqueRef:v", "halted", "running"]);

    let no_data = failure(
        decode_json_response(
            br#"{"jsonrpc":"2.0","error":{"code":1,"message":"MESSAGE_REMOVED"},"id":1}"#,
        )
        .unwrap(),
    );
    assert_eq!(no_data.code, ErrorCode::MessageRemoved);
    assert!(no_data.params.is_empty());

    let xml = br#"<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>SR_BACKEND_FAILURE_44</value><value></value><value>There is insufficient space</value><value/></data></array></value></member></struct></value></param></params></methodResponse>"#;
    let e = failure(decode_xml_response(xml).unwrap());
    assert_eq!(e.sr_backend_failure_number(), Some(44));
    assert_eq!(e.params, vec!["", "There is insufficient space", ""]);
}

#[test]
fn malformed_replies_are_errors() {
    assert!(decode_json_response(b"<html>500</html>").is_err());
    assert!(decode_json_response(br#"{"jsonrpc":"2.0","id":1}"#).is_err());
    assert!(decode_json_response(b"[1,2]").is_err());
    assert!(decode_xml_response(b"<methodResponse><params>").is_err());
    assert!(decode_xml_response(br#"<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Maybe</value></member></struct></value></param></params></methodResponse>"#).is_err());
    let fault = br#"<?xml version="1.0"?><methodResponse><fault><value><struct><member><name>faultCode</name><value><int>500</int></value></member><member><name>faultString</name><value>boom</value></member></struct></value></fault></methodResponse>"#;
    assert!(decode_xml_response(fault).unwrap_err().contains("boom"));
}

#[test]
fn xml_requests_type_booleans_and_leave_ints_untyped() {
    let xml = encode_xml_request(
        "VM.start",
        &[
            Value::str("OpaqueRef:s"),
            Value::Bool(false),
            Value::Int(1 << 40),
        ],
    );
    assert!(xml.contains("<methodName>VM.start</methodName>"));
    assert!(xml.contains("<value><boolean>0</boolean></value>"));
    assert!(xml.contains("<value>1099511627776</value>"));
}

#[test]
fn task_records_and_results() {
    let body = br#"{"jsonrpc":"2.0","result":{"uuid":"t","name_label":"Async.VM.clone","status":"success","progress":1.0,"created":"20250319T04:16:24Z","finished":"20250319T04:16:30Z","result":"<value>OpaqueRef:new</value>","error_info":[],"resident_on":"OpaqueRef:h","type":"<none/>","other_config":{},"subtask_of":"OpaqueRef:NULL","subtasks":[],"backtrace":"()","allowed_operations":[],"current_operations":{}},"id":1}"#;
    let task: Task = from_value(&success(decode_json_response(body).unwrap())).unwrap();
    assert_eq!(task.status, TaskStatus::Success);
    assert!(task.is_finished());
    assert_eq!(
        task.finished.unix_timestamp() - task.created.unix_timestamp(),
        6
    );
    let new_vm: VmRef = parse_task_result("Async.VM.clone", &task.result).unwrap();
    assert_eq!(new_vm.as_str(), "OpaqueRef:new");
}

#[test]
fn event_batches() {
    let xml = br#"<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value><struct>
<member><name>events</name><value><array><data>
 <value><struct><member><name>id</name><value>17</value></member><member><name>timestamp</name><value>0.0</value></member><member><name>class</name><value>task</value></member><member><name>operation</name><value>mod</value></member><member><name>ref</name><value>OpaqueRef:t</value></member>
 <member><name>snapshot</name><value><struct><member><name>status</name><value>failure</value></member><member><name>progress</name><value><double>1.0</double></value></member><member><name>error_info</name><value><array><data><value>SR_FULL</value><value>100</value><value>50</value></data></array></value></member></struct></value></member></struct></value>
 <value><struct><member><name>id</name><value>18</value></member><member><name>class</name><value>vm</value></member><member><name>operation</name><value>del</value></member><member><name>ref</name><value>OpaqueRef:v</value></member></struct></value>
</data></array></value></member>
<member><name>valid_ref_counts</name><value><struct><member><name>task</name><value><i4>3</i4></value></member></struct></value></member>
<member><name>token</name><value>00000000000000000018,00000000000000000002</value></member>
</struct></value></member></struct></value></param></params></methodResponse>"#;
    let batch: EventBatch = from_value(&success(decode_xml_response(xml).unwrap())).unwrap();
    assert_eq!(batch.token, "00000000000000000018,00000000000000000002");
    assert_eq!(batch.valid_ref_counts["task"], 3);
    assert_eq!(batch.events.len(), 2);
    let task: Task = batch.events[0].snapshot.decode().unwrap();
    assert_eq!(task.status, TaskStatus::Failure);
    assert_eq!(task.error_info, vec!["SR_FULL", "100", "50"]);
    assert_eq!(batch.events[1].operation, EventOperation::Del);
    assert!(batch.events[1].snapshot.is_absent());
    assert_eq!(batch.events_for("OpaqueRef:t").count(), 1);
}

#[test]
fn nbd_info_hides_the_session_in_debug() {
    let v = Value::Array(vec![Value::record([
        (
            "exportname",
            Value::str("/uuid?session_id=OpaqueRef:secret"),
        ),
        ("address", Value::str("10.0.0.1")),
        ("port", Value::str("10809")),
        ("cert", Value::str("-----BEGIN CERTIFICATE-----")),
        ("subject", Value::str("host1")),
    ])]);
    let infos: Vec<NbdInfo> = from_value(&v).unwrap();
    assert_eq!(infos[0].port, 10809);
    assert!(infos[0].exportname.contains("secret"));
    assert!(!format!("{infos:?}").contains("secret"));
}

#[test]
fn decode_errors_name_the_field() {
    let v = Value::record([(
        "OpaqueRef:v",
        Value::record([("memory_static_max", Value::str("lots"))]),
    )]);
    let err = from_value::<BTreeMap<VmRef, Vm>>(&v).unwrap_err();
    assert_eq!(err.path(), "OpaqueRef:v.memory_static_max");
    let e = err.for_method("VM.get_all_records");
    let text = e.to_string();
    assert!(
        text.contains("VM.get_all_records") && text.contains("memory_static_max"),
        "{text}"
    );
}

#[test]
fn pbd_debug_hides_device_config_secrets() {
    let v = Value::record([
        ("uuid", Value::str("p")),
        (
            "device_config",
            Value::record([
                ("server", Value::str("nas")),
                ("password", Value::str("hunter2")),
                ("chappassword_secret", Value::str("OpaqueRef:s")),
            ]),
        ),
    ]);
    let pbd: xenvault_xapi::records::Pbd = from_value(&v).unwrap();
    assert_eq!(pbd.device_config["password"], "hunter2");
    let shown = format!("{pbd:?}");
    assert!(
        shown.contains("nas") && !shown.contains("hunter2") && !shown.contains("OpaqueRef:s"),
        "{shown}"
    );
}
