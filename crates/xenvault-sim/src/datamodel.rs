//! The XAPI datamodel (classes, fields, messages, enums, types), loaded from the
//! embedded copy of xen-api's `doc/data/xenapi.json` (see `datamodel/README.md`).
//!
//! The object database and the generic RPC messages are derived from it: every
//! record gets every field with its default and type, and every implicit
//! getter, setter and map/set modifier exists for every field.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use xenvault_types::Value;

use crate::error::{ApiError, ApiResult};

/// The datamodel JSON, embedded.
pub const DATAMODEL_JSON: &str = include_str!("../datamodel/xenapi.json");

/// A datamodel type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    /// `string` (also uuids).
    String,
    /// `int` (int64).
    Int,
    /// `float`.
    Float,
    /// `bool`.
    Bool,
    /// `datetime`.
    DateTime,
    /// `enum <name>`.
    Enum(String),
    /// `<class> ref`.
    Ref(String),
    /// `<t> set`.
    Set(Box<Type>),
    /// `(<k> -> <v>) map`.
    Map(Box<Type>, Box<Type>),
    /// `<class> record`.
    Record(String),
    /// `void` (results only).
    Void,
}

impl Type {
    /// Parses a datamodel type string such as `(string -> enum vm_operations) map`.
    pub fn parse(s: &str) -> Type {
        let s = s.trim();
        if let Some(inner) = s.strip_suffix(" map")
            && let Some(inner) = inner.strip_prefix('(').and_then(|i| i.strip_suffix(')'))
        {
            // Split at the top-level " -> ".
            let bytes = inner.as_bytes();
            let mut depth = 0i32;
            for i in 0..bytes.len() {
                match bytes[i] {
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    b'-' if depth == 0 && inner[i..].starts_with("->") => {
                        return Type::Map(
                            Box::new(Type::parse(&inner[..i])),
                            Box::new(Type::parse(&inner[i + 2..])),
                        );
                    }
                    _ => {}
                }
            }
        }
        if let Some(inner) = s.strip_suffix(" set") {
            return Type::Set(Box::new(Type::parse(inner)));
        }
        if let Some(c) = s.strip_suffix(" ref") {
            return Type::Ref(c.trim().to_string());
        }
        if let Some(c) = s.strip_suffix(" record") {
            return Type::Record(c.trim().to_string());
        }
        if let Some(e) = s.strip_prefix("enum ") {
            return Type::Enum(e.trim().to_string());
        }
        match s {
            "string" => Type::String,
            "int" => Type::Int,
            "float" => Type::Float,
            "bool" => Type::Bool,
            "datetime" => Type::DateTime,
            "void" | "" => Type::Void,
            other => Type::Record(other.to_string()),
        }
    }

    /// The zero value of this type, as xapi's DB would default it.
    pub fn zero(&self, dm: &Datamodel) -> Value {
        match self {
            Type::String | Type::Void => Value::str(""),
            Type::Int => Value::Int(0),
            Type::Float => Value::Double(0.0),
            Type::Bool => Value::Bool(false),
            Type::DateTime => Value::DateTime("19700101T00:00:00Z".into()),
            Type::Enum(e) => Value::str(
                dm.enums
                    .get(e)
                    .and_then(|v| v.first())
                    .cloned()
                    .unwrap_or_default(),
            ),
            Type::Ref(_) => Value::str(NULL_REF),
            Type::Set(_) => Value::Array(Vec::new()),
            Type::Map(_, _) | Type::Record(_) => Value::Struct(Vec::new()),
        }
    }
}

/// The null reference.
pub const NULL_REF: &str = "OpaqueRef:NULL";

/// Who may write a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    /// Read-write: has a public setter.
    Rw,
    /// Set by the constructor, read-only afterwards.
    RoConstructor,
    /// Maintained by the server.
    RoRuntime,
}

/// A field of a class.
#[derive(Debug, Clone)]
pub struct Field {
    /// The field's API name, e.g. `name_label`.
    pub name: String,
    /// The DB column name, e.g. `name__label`.
    pub db_name: String,
    /// Its type.
    pub ty: Type,
    /// Who may write it.
    pub qualifier: Qualifier,
    /// The default value.
    pub default: Value,
    /// Whether the field's lifecycle says it was removed.
    pub removed: bool,
}

/// A message parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: Type,
}

/// A message (API call) of a class.
#[derive(Debug, Clone)]
pub struct Message {
    /// The name, e.g. `snapshot`.
    pub name: String,
    /// The parameters, the session first for most messages.
    pub params: Vec<Param>,
    /// The result type.
    pub result: Type,
    /// Whether it is a generated getter/setter/constructor.
    pub implicit: bool,
    /// Whether its lifecycle says it was removed (`MESSAGE_REMOVED`).
    pub removed: bool,
}

/// A class of the datamodel.
#[derive(Debug, Clone)]
pub struct Class {
    /// Its name as the API spells it (`VM`, `task`, `VDI`).
    pub name: String,
    /// Its fields, in datamodel order (removed fields excluded).
    pub fields: Vec<Field>,
    field_index: HashMap<String, usize>,
    /// Its messages by name.
    pub messages: HashMap<String, Message>,
}

impl Class {
    /// A field by API name.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.field_index.get(name).map(|&i| &self.fields[i])
    }

    /// A field by DB column name (`name__label`).
    pub fn field_by_db_name(&self, db_name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.db_name == db_name)
    }
}

/// The whole datamodel.
#[derive(Debug)]
pub struct Datamodel {
    /// Classes by name.
    pub classes: BTreeMap<String, Class>,
    /// Enum values by enum name.
    pub enums: HashMap<String, Vec<String>>,
    lower: HashMap<String, String>,
}

/// The embedded datamodel, parsed once.
pub fn datamodel() -> &'static Datamodel {
    static DM: OnceLock<Datamodel> = OnceLock::new();
    DM.get_or_init(|| match Datamodel::parse(DATAMODEL_JSON) {
        Ok(dm) => dm,
        // The JSON is embedded at build time and checked by a unit test.
        Err(e) => panic!("embedded datamodel is invalid: {e}"),
    })
}

/// Namespaced fields: `(class or "*", namespace, members)`. Their DB column
/// names use a double underscore (`name__label`), per xen-api's
/// `ocaml/idl/escaping.ml` and the datamodel's `namespace` declarations
/// (see `docs/xapi-notes.md`, "get_all_records_where field names").
const NAMESPACES: &[(&str, &str, &[&str])] = &[
    ("*", "name", &["label", "description"]),
    (
        "VM",
        "memory",
        &[
            "target",
            "static_max",
            "dynamic_max",
            "dynamic_min",
            "static_min",
        ],
    ),
    ("VM", "VCPUs", &["params", "max", "at_startup"]),
    (
        "VM",
        "actions",
        &[
            "after_softreboot",
            "after_shutdown",
            "after_reboot",
            "after_crash",
        ],
    ),
    (
        "VM",
        "PV",
        &[
            "bootloader",
            "kernel",
            "ramdisk",
            "args",
            "bootloader_args",
            "legacy_args",
        ],
    ),
    (
        "VM",
        "HVM",
        &["boot_policy", "boot_params", "shadow_multiplier"],
    ),
    (
        "host",
        "API_version",
        &["major", "minor", "vendor", "vendor_implementation"],
    ),
    (
        "VBD",
        "qos",
        &["algorithm_type", "algorithm_params", "supported_algorithms"],
    ),
    (
        "VIF",
        "qos",
        &["algorithm_type", "algorithm_params", "supported_algorithms"],
    ),
    ("VM_metrics", "memory", &["actual"]),
    (
        "VM_metrics",
        "VCPUs",
        &["number", "utilisation", "CPU", "params", "flags"],
    ),
    ("host_metrics", "memory", &["total", "free"]),
    ("VBD_metrics", "io", &["read_kbs", "write_kbs"]),
    ("VIF_metrics", "io", &["read_kbs", "write_kbs"]),
    ("PIF_metrics", "io", &["read_kbs", "write_kbs"]),
];

/// The DB column name of a field.
pub fn db_name(class: &str, field: &str) -> String {
    for (c, ns, members) in NAMESPACES {
        if (*c == "*" || *c == class)
            && let Some(rest) = field.strip_prefix(ns).and_then(|r| r.strip_prefix('_'))
            && members.contains(&rest)
        {
            return format!("{ns}__{rest}");
        }
    }
    field.to_string()
}

impl Datamodel {
    /// Parses the datamodel JSON.
    pub fn parse(json: &str) -> Result<Datamodel, String> {
        let raw: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let list = raw.as_array().ok_or("datamodel is not a list of classes")?;
        let mut enums = HashMap::new();
        for c in list {
            for e in c["enums"].as_array().into_iter().flatten() {
                let name = e["name"].as_str().unwrap_or_default().to_string();
                let values = e["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v["name"].as_str().map(str::to_string))
                    .collect();
                enums.insert(name, values);
            }
        }
        let mut dm = Datamodel {
            classes: BTreeMap::new(),
            enums,
            lower: HashMap::new(),
        };
        for c in list {
            let cname = c["name"].as_str().ok_or("class without name")?.to_string();
            let mut fields = Vec::new();
            for f in c["fields"].as_array().into_iter().flatten() {
                let name = f["name"].as_str().unwrap_or_default().to_string();
                let ty = Type::parse(f["type"].as_str().unwrap_or_default());
                let qualifier = match f["qualifier"].as_str().unwrap_or_default() {
                    "RW" => Qualifier::Rw,
                    "RO/constructor" => Qualifier::RoConstructor,
                    _ => Qualifier::RoRuntime,
                };
                let removed = f["lifecycle"]["state"].as_str() == Some("Removed_s");
                let default = match f["default"].as_str() {
                    Some(d) => parse_default(d, &ty, &dm),
                    None => ty.zero(&dm),
                };
                fields.push(Field {
                    db_name: db_name(&cname, &name),
                    name,
                    ty,
                    qualifier,
                    default,
                    removed,
                });
            }
            let mut messages = HashMap::new();
            for m in c["messages"].as_array().into_iter().flatten() {
                let name = m["name"].as_str().unwrap_or_default().to_string();
                let params = m["params"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| Param {
                        name: p["name"].as_str().unwrap_or_default().to_string(),
                        ty: Type::parse(p["type"].as_str().unwrap_or_default()),
                    })
                    .collect();
                let result = Type::parse(m["result"][0].as_str().unwrap_or("void"));
                messages.insert(
                    name.clone(),
                    Message {
                        name,
                        params,
                        result,
                        implicit: m["implicit"].as_bool().unwrap_or(false),
                        removed: m["lifecycle"]["state"].as_str() == Some("Removed_s"),
                    },
                );
            }
            let fields: Vec<Field> = fields.into_iter().filter(|f| !f.removed).collect();
            let field_index = fields
                .iter()
                .enumerate()
                .map(|(i, f)| (f.name.clone(), i))
                .collect();
            dm.lower.insert(cname.to_ascii_lowercase(), cname.clone());
            dm.classes.insert(
                cname.clone(),
                Class {
                    name: cname,
                    fields,
                    field_index,
                    messages,
                },
            );
        }
        Ok(dm)
    }

    /// A class by its exact name.
    pub fn class(&self, name: &str) -> Option<&Class> {
        self.classes.get(name)
    }

    /// The exact class name for a case-insensitive one (`vm` → `VM`), as
    /// `event.from` subscriptions spell them.
    pub fn class_name_ci(&self, name: &str) -> Option<&str> {
        self.lower
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Whether `v` is a value of enum `e`.
    pub fn enum_has(&self, e: &str, v: &str) -> bool {
        self.enums
            .get(e)
            .is_some_and(|vals| vals.iter().any(|x| x == v))
    }

    /// Converts a wire value to the canonical stored form of type `ty`
    /// (int64 from strings, enums checked, maps with string keys…).
    pub fn coerce(&self, v: &Value, ty: &Type) -> ApiResult<Value> {
        let bad = || ApiError::new("FIELD_TYPE_ERROR", [format!("expected {ty:?}")]);
        Ok(match ty {
            Type::String | Type::Ref(_) | Type::Void => match v {
                Value::String(s) | Value::DateTime(s) => Value::String(s.clone()),
                Value::Nil if matches!(ty, Type::Ref(_)) => Value::str(NULL_REF),
                _ => return Err(bad()),
            },
            Type::Enum(e) => {
                let s = v.as_str().map_err(|_| bad())?;
                if !self.enum_has(e, s) {
                    return Err(ApiError::new("ENUM_INVALID_VALUE", [e.as_str(), s]));
                }
                Value::str(s)
            }
            Type::Int => Value::Int(v.as_i64().map_err(|_| bad())?),
            Type::Float => Value::Double(v.as_f64().map_err(|_| bad())?),
            Type::Bool => Value::Bool(v.as_bool().map_err(|_| bad())?),
            Type::DateTime => match v {
                Value::String(s) | Value::DateTime(s) => Value::DateTime(s.clone()),
                _ => return Err(bad()),
            },
            Type::Set(t) => match v {
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .map(|i| self.coerce(i, t))
                        .collect::<ApiResult<Vec<_>>>()?,
                ),
                _ => return Err(bad()),
            },
            Type::Map(k, val) => match v {
                Value::Struct(members) => {
                    let mut out = Vec::with_capacity(members.len());
                    for (mk, mv) in members {
                        if let Type::Enum(e) = &**k
                            && !self.enum_has(e, mk)
                        {
                            return Err(ApiError::new(
                                "ENUM_INVALID_VALUE",
                                [e.as_str(), mk.as_str()],
                            ));
                        }
                        out.push((mk.clone(), self.coerce(mv, val)?));
                    }
                    Value::Struct(out)
                }
                _ => return Err(bad()),
            },
            Type::Record(class) => match (v, self.class(class)) {
                (Value::Struct(members), Some(c)) => {
                    let mut out = Vec::with_capacity(members.len());
                    for (mk, mv) in members {
                        match c.field(mk) {
                            Some(f) => out.push((mk.clone(), self.coerce(mv, &f.ty)?)),
                            None => out.push((mk.clone(), mv.clone())),
                        }
                    }
                    Value::Struct(out)
                }
                (Value::Struct(_), None) => v.clone(),
                _ => return Err(bad()),
            },
        })
    }
}

/// Parses a default as the datamodel JSON prints it (`""`, `{}`, `1.`,
/// `OpaqueRef:NULL`, `{"k" -> "v"}`).
fn parse_default(d: &str, ty: &Type, dm: &Datamodel) -> Value {
    let d = d.trim();
    match ty {
        Type::String => Value::str(d.trim_matches('"')),
        Type::Int => d.parse().map(Value::Int).unwrap_or(Value::Int(0)),
        Type::Float => d.parse().map(Value::Double).unwrap_or(Value::Double(0.0)),
        Type::Bool => Value::Bool(d == "true"),
        Type::DateTime => Value::DateTime(d.to_string()),
        Type::Enum(_) => Value::str(d),
        Type::Ref(_) => {
            if d.starts_with("OpaqueRef:") && !d.contains('{') {
                Value::str(d)
            } else {
                Value::str(NULL_REF)
            }
        }
        Type::Set(inner) => {
            let body = d.trim_start_matches('{').trim_end_matches('}').trim();
            if body.is_empty() || matches!(**inner, Type::Ref(_)) {
                Value::Array(Vec::new())
            } else {
                Value::Array(
                    body.split([';', ','])
                        .map(|x| x.trim().trim_matches('"'))
                        .filter(|x| !x.is_empty())
                        .map(|x| match **inner {
                            Type::Int => x.parse().map(Value::Int).unwrap_or(Value::Int(0)),
                            _ => Value::str(x),
                        })
                        .collect(),
                )
            }
        }
        Type::Map(_, _) => {
            let quoted: Vec<&str> = d.split('"').skip(1).step_by(2).collect();
            Value::Struct(
                quoted
                    .chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| (c[0].to_string(), Value::str(c[1])))
                    .collect(),
            )
        }
        _ => ty.zero(dm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_datamodel_parses_with_vm_fields_and_messages() {
        let dm = datamodel();
        let vm = dm.class("VM").unwrap();
        assert_eq!(
            vm.field("power_state").unwrap().default,
            Value::str("Halted")
        );
        assert_eq!(
            vm.field("memory_static_max").unwrap().db_name,
            "memory__static_max"
        );
        assert_eq!(vm.field("name_label").unwrap().db_name, "name__label");
        assert_eq!(
            vm.field("memory_overhead").unwrap().db_name,
            "memory_overhead"
        );
        assert_eq!(vm.field("is_a_template").unwrap().db_name, "is_a_template");
        assert_eq!(
            vm.field("HVM_shadow_multiplier").unwrap().default,
            Value::Double(1.0)
        );
        assert!(vm.messages["snapshot_with_quiesce"].removed);
        assert_eq!(vm.messages["snapshot"].params.len(), 4);
        assert_eq!(
            Type::parse("(string -> enum vm_operations) map"),
            Type::Map(
                Box::new(Type::String),
                Box::new(Type::Enum("vm_operations".into()))
            )
        );
        assert_eq!(
            Type::parse("VDI ref set"),
            Type::Set(Box::new(Type::Ref("VDI".into())))
        );
        assert_eq!(dm.class_name_ci("vdi"), Some("VDI"));
        let task = dm.class("task").unwrap();
        assert_eq!(
            task.field("status").unwrap().ty,
            Type::Enum("task_status_type".into())
        );
    }

    #[test]
    fn coerce_accepts_xapi_spellings() {
        let dm = datamodel();
        assert_eq!(
            dm.coerce(&Value::str("42"), &Type::Int).unwrap(),
            Value::Int(42)
        );
        assert!(dm.coerce(&Value::str("x"), &Type::Bool).is_err());
        assert!(
            dm.coerce(&Value::str("Flying"), &Type::Enum("vm_power_state".into()))
                .is_err()
        );
    }
}
