//! Datamodel conformance: every XAPI message the client calls exists in
//! `xenapi.json` with the same parameters (names, types, order, after the
//! session), every record field the client decodes exists with the same
//! type, constructor records supply every required field, and every enum
//! value the client names exists.
//!
//! The lists come from the client's registries (`api::message_specs`,
//! `records::record_specs`, …), which the call and record macros derive from
//! the same declarations that generate the code. `get_all_records_where` is
//! hidden from the datamodel dump: its specs are marked `hidden`, and this
//! test checks that the dump indeed lacks them and that their shape matches
//! the class's `get_all_records`.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as J;
use xenvault_xapi::api::message_specs;
use xenvault_xapi::model::{MessageSpec, ParamSpec, RecordSpec};
use xenvault_xapi::records::{constructor_specs, enum_specs, record_specs};

struct Datamodel {
    classes: BTreeMap<String, J>,
    enums: BTreeMap<String, BTreeSet<String>>,
}

impl Datamodel {
    fn load() -> Datamodel {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/xenapi-datamodel.json"
        );
        let text = std::fs::read_to_string(path).expect("the datamodel fixture is readable");
        let all: Vec<J> = serde_json::from_str(&text).expect("the datamodel fixture is JSON");
        let mut classes = BTreeMap::new();
        let mut enums = BTreeMap::new();
        for class in all {
            let name = class["name"].as_str().expect("class name").to_string();
            for e in class["enums"].as_array().into_iter().flatten() {
                let values = e["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v["name"].as_str().map(str::to_string))
                    .collect();
                enums.insert(e["name"].as_str().expect("enum name").to_string(), values);
            }
            classes.insert(name, class);
        }
        assert!(classes.len() > 50, "the fixture looks truncated");
        Datamodel { classes, enums }
    }

    fn message(&self, class: &str, name: &str) -> Option<&J> {
        self.classes.get(class)?["messages"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == name)
    }

    fn field(&self, class: &str, name: &str) -> Option<&J> {
        self.classes.get(class)?["fields"]
            .as_array()?
            .iter()
            .find(|f| f["name"] == name)
    }
}

fn params_of(message: &J) -> Vec<ParamSpec> {
    message["params"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| ParamSpec {
            name: p["name"].as_str().unwrap_or_default().to_string(),
            ty: p["type"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

fn show(params: &[ParamSpec]) -> String {
    params
        .iter()
        .map(|p| format!("{} {}", p.ty, p.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The problems with one message spec, as sentences.
fn check_message(dm: &Datamodel, spec: &MessageSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let (class, name) = (spec.class(), spec.message());
    if spec.hidden {
        if dm.message(class, name).is_some() {
            problems.push(format!(
                "{}: marked hidden but the datamodel lists it; drop the hidden flag",
                spec.wire
            ));
        }
        match dm.message(class, "get_all_records") {
            None => problems.push(format!(
                "{}: class {class} has no get_all_records",
                spec.wire
            )),
            Some(gar) => {
                let expected = gar["result"][0].as_str().unwrap_or_default();
                if spec.result != expected {
                    problems.push(format!(
                        "{}: result {} but {class}.get_all_records returns {expected}",
                        spec.wire, spec.result
                    ));
                }
            }
        }
        let expr = [ParamSpec {
            name: "expr".into(),
            ty: "string".into(),
        }];
        if spec.params != expr {
            problems.push(format!(
                "{}: params ({}) instead of (string expr)",
                spec.wire,
                show(&spec.params)
            ));
        }
        return problems;
    }
    let Some(message) = dm.message(class, name) else {
        return vec![format!("{}: no such message in the datamodel", spec.wire)];
    };
    if message["lifecycle"]["state"] == "Removed_s" {
        problems.push(format!("{}: the datamodel marks it Removed", spec.wire));
    }
    let mut dm_params = params_of(message);
    let session = ParamSpec {
        name: "session_id".into(),
        ty: "session ref".into(),
    };
    if spec.takes_session {
        if dm_params.first() != Some(&session) {
            problems.push(format!(
                "{}: the datamodel does not take a session first",
                spec.wire
            ));
        } else {
            dm_params.remove(0);
        }
    } else if dm_params.iter().any(|p| p.ty == "session ref") {
        problems.push(format!(
            "{}: the datamodel takes a session but the client sends none",
            spec.wire
        ));
    }
    let params_ok = if spec.omits_trailing {
        spec.params.len() < dm_params.len() && dm_params.starts_with(&spec.params)
    } else {
        spec.params == dm_params
    };
    if !params_ok {
        problems.push(format!(
            "{}: client sends ({}){} but the datamodel has ({})",
            spec.wire,
            show(&spec.params),
            if spec.omits_trailing {
                " as a prefix"
            } else {
                ""
            },
            show(&dm_params)
        ));
    }
    let result = message["result"][0].as_str().unwrap_or_default();
    if spec.result != result {
        problems.push(format!(
            "{}: client decodes the result as {} but the datamodel returns {result}",
            spec.wire, spec.result
        ));
    }
    problems
}

fn check_record(dm: &Datamodel, spec: &RecordSpec) -> Vec<String> {
    let mut problems = Vec::new();
    if !dm.classes.contains_key(spec.class) {
        return vec![format!(
            "{} ({}): no class {}",
            spec.rust_name, spec.class, spec.class
        )];
    }
    let mut seen = BTreeSet::new();
    for field in &spec.fields {
        if !seen.insert(field.name) {
            problems.push(format!("{}.{}: declared twice", spec.class, field.name));
        }
        match dm.field(spec.class, field.name) {
            None => problems.push(format!(
                "{}.{}: no such field in the datamodel",
                spec.class, field.name
            )),
            Some(f) => {
                let ty = f["type"].as_str().unwrap_or_default();
                if ty != field.ty {
                    problems.push(format!(
                        "{}.{}: client decodes {} but the datamodel says {ty}",
                        spec.class, field.name, field.ty
                    ));
                }
            }
        }
    }
    problems
}

fn check_constructor(dm: &Datamodel, spec: &RecordSpec) -> Vec<String> {
    let mut problems = check_record(dm, spec);
    let given: BTreeSet<&str> = spec.fields.iter().map(|f| f.name).collect();
    for field in spec
        .fields
        .iter()
        .filter_map(|f| dm.field(spec.class, f.name))
    {
        if field["qualifier"] == "RO/runtime" {
            problems.push(format!(
                "{}.{}: a runtime field cannot be set by the constructor",
                spec.class, field["name"]
            ));
        }
    }
    let required = dm.classes[spec.class]["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["qualifier"] != "RO/runtime" && f.get("default").is_none())
        .filter(|f| f["lifecycle"]["state"] != "Removed_s")
        .filter_map(|f| f["name"].as_str());
    for name in required {
        if !given.contains(name) {
            problems.push(format!(
                "{} record for {}.create lacks required field {name}",
                spec.rust_name, spec.class
            ));
        }
    }
    problems
}

/// Every `enum X` inside a datamodel type string.
fn enums_in(ty: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = ty;
    while let Some(i) = rest.find("enum ") {
        rest = &rest[i + 5..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out
}

fn assert_no_problems(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn every_called_message_exists_with_the_same_parameters() {
    let dm = Datamodel::load();
    let specs = message_specs();
    assert!(
        specs.len() > 100,
        "the registry looks empty: {}",
        specs.len()
    );
    let problems = specs.iter().flat_map(|s| check_message(&dm, s)).collect();
    assert_no_problems("messages", problems);
}

#[test]
fn the_calls_a_backup_needs_are_in_the_registry() {
    let wires: BTreeSet<String> = message_specs().into_iter().map(|s| s.wire).collect();
    for needed in [
        "session.login_with_password",
        "session.logout",
        "VM.snapshot",
        "VM.checkpoint",
        "VM.clone",
        "VM.copy",
        "VM.destroy",
        "VM.set_is_a_template",
        "VM.add_tags",
        "VM.remove_tags",
        "VM.add_to_other_config",
        "VM.remove_from_other_config",
        "VM.set_blocked_operations",
        "VM.start",
        "VM.clean_shutdown",
        "VM.hard_shutdown",
        "VM.get_all_records_where",
        "VDI.snapshot",
        "VDI.destroy",
        "VDI.data_destroy",
        "VDI.enable_cbt",
        "VDI.disable_cbt",
        "VDI.list_changed_blocks",
        "VDI.get_nbd_info",
        "VBD.create",
        "VBD.destroy",
        "SR.get_all_records",
        "host.get_record",
        "pool.get_all_records",
        "task.create",
        "task.destroy",
        "task.cancel",
        "task.get_record",
        "event.from",
        "message.create",
    ] {
        assert!(wires.contains(needed), "{needed} is not in the registry");
    }
}

#[test]
fn get_all_records_where_is_hidden_and_shaped_like_get_all_records() {
    let dm = Datamodel::load();
    let hidden: Vec<MessageSpec> = message_specs().into_iter().filter(|s| s.hidden).collect();
    assert!(hidden.iter().any(|s| s.wire == "VM.get_all_records_where"));
    assert!(
        hidden
            .iter()
            .all(|s| s.message() == "get_all_records_where")
    );
    let problems = hidden.iter().flat_map(|s| check_message(&dm, s)).collect();
    assert_no_problems("hidden messages", problems);
}

#[test]
fn every_decoded_field_exists_with_the_same_type() {
    let dm = Datamodel::load();
    let problems = record_specs()
        .iter()
        .flat_map(|s| check_record(&dm, s))
        .collect();
    assert_no_problems("records", problems);
}

#[test]
fn constructor_records_supply_every_required_field() {
    let dm = Datamodel::load();
    let problems = constructor_specs()
        .iter()
        .flat_map(|s| check_constructor(&dm, s))
        .collect();
    assert_no_problems("constructors", problems);
}

#[test]
fn every_enum_value_the_client_names_exists() {
    let dm = Datamodel::load();
    let mut problems = Vec::new();
    let registered: BTreeSet<&str> = enum_specs().iter().map(|e| e.name).collect();
    for spec in enum_specs() {
        match dm.enums.get(spec.name) {
            None => problems.push(format!("enum {}: not in the datamodel", spec.name)),
            Some(values) => {
                for v in spec.values {
                    if !values.contains(*v) {
                        problems.push(format!("enum {}: no value {v:?}", spec.name));
                    }
                }
            }
        }
    }
    // Every enum type the client decodes or sends is registered, so the
    // check above covers it.
    let types = record_specs()
        .into_iter()
        .chain(constructor_specs())
        .flat_map(|r| r.fields.into_iter().map(|f| f.ty))
        .chain(
            message_specs()
                .into_iter()
                .flat_map(|m| m.params.into_iter().map(|p| p.ty).chain([m.result])),
        );
    for ty in types {
        for e in enums_in(&ty) {
            if !registered.contains(e.as_str()) {
                problems.push(format!(
                    "enum {e} (in {ty}) is used but not in records::enum_specs"
                ));
            }
        }
    }
    assert_no_problems("enums", problems);
}

#[test]
fn the_checks_catch_mismatches() {
    // A test that cannot fail is a defect: feed the checker wrong specs.
    let dm = Datamodel::load();
    let good = message_specs()
        .into_iter()
        .find(|s| s.wire == "VM.copy")
        .expect("VM.copy is registered");
    assert!(check_message(&dm, &good).is_empty());

    let mut renamed = good.clone();
    renamed.params[2].name = "target_sr".into();
    assert_eq!(check_message(&dm, &renamed).len(), 1);

    let mut retyped = good.clone();
    retyped.params[0].ty = "string".into();
    assert_eq!(check_message(&dm, &retyped).len(), 1);

    let mut reordered = good.clone();
    reordered.params.swap(0, 1);
    assert_eq!(check_message(&dm, &reordered).len(), 1);

    let mut short = good.clone();
    short.params.pop();
    assert_eq!(
        check_message(&dm, &short).len(),
        1,
        "a missing parameter is caught"
    );
    short.omits_trailing = true;
    assert!(
        check_message(&dm, &short).is_empty(),
        "unless declared as omitted"
    );

    let mut wrong_result = good.clone();
    wrong_result.result = "VM ref set".into();
    assert_eq!(check_message(&dm, &wrong_result).len(), 1);

    let mut unknown = good.clone();
    unknown.wire = "VM.teleport".into();
    assert_eq!(check_message(&dm, &unknown).len(), 1);

    let removed = MessageSpec {
        wire: "VM.snapshot_with_quiesce".into(),
        params: vec![
            ParamSpec {
                name: "vm".into(),
                ty: "VM ref".into(),
            },
            ParamSpec {
                name: "new_name".into(),
                ty: "string".into(),
            },
        ],
        result: "VM ref".into(),
        ..good.clone()
    };
    assert_eq!(
        check_message(&dm, &removed).len(),
        1,
        "Removed messages are refused"
    );

    let mut vm = record_specs()
        .into_iter()
        .find(|r| r.class == "VM")
        .expect("VM record");
    assert!(check_record(&dm, &vm).is_empty());
    vm.fields[0].ty = "int".into();
    vm.fields.push(xenvault_xapi::model::FieldSpec {
        name: "no_such_field",
        ty: "string".into(),
    });
    assert_eq!(check_record(&dm, &vm).len(), 2);

    let mut vbd = constructor_specs()
        .into_iter()
        .find(|r| r.class == "VBD")
        .expect("VBD.create");
    vbd.fields.retain(|f| f.name != "mode");
    assert_eq!(
        check_constructor(&dm, &vbd).len(),
        1,
        "a missing required field is caught"
    );

    assert_eq!(
        enums_in("(string -> enum vm_operations) map"),
        vec!["vm_operations"]
    );
}
