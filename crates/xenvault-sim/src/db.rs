//! The object database: one table per datamodel class, complete records with
//! every field, refs `OpaqueRef:<uuid>`, back-references kept consistent, a
//! generation counter for `event.from`, the `get_all_records_where` filter
//! language, and JSON persistence.

use std::collections::{BTreeMap, VecDeque};

use xenvault_types::Value;

use crate::datamodel::{Datamodel, NULL_REF, datamodel};
use crate::error::{ApiError, ApiResult};

/// A record: field name → value, in the canonical stored form of its type.
pub type Record = BTreeMap<String, Value>;

/// Typed reads of record fields (missing or mistyped fields read as empty).
pub trait Fields {
    /// A string, ref, enum or datetime field.
    fn str_of(&self, f: &str) -> &str;
    /// An int field.
    fn int_of(&self, f: &str) -> i64;
    /// A bool field.
    fn bool_of(&self, f: &str) -> bool;
    /// A float field.
    fn float_of(&self, f: &str) -> f64;
    /// A set of strings or refs.
    fn strs_of(&self, f: &str) -> Vec<String>;
    /// A map entry of a map field.
    fn map_get(&self, f: &str, key: &str) -> Option<String>;
}

impl Fields for Record {
    fn str_of(&self, f: &str) -> &str {
        match self.get(f) {
            Some(Value::String(s)) | Some(Value::DateTime(s)) => s,
            _ => "",
        }
    }
    fn int_of(&self, f: &str) -> i64 {
        self.get(f).and_then(|v| v.as_i64().ok()).unwrap_or(0)
    }
    fn bool_of(&self, f: &str) -> bool {
        matches!(self.get(f), Some(Value::Bool(true)))
    }
    fn float_of(&self, f: &str) -> f64 {
        self.get(f).and_then(|v| v.as_f64().ok()).unwrap_or(0.0)
    }
    fn strs_of(&self, f: &str) -> Vec<String> {
        match self.get(f) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().ok().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
    fn map_get(&self, f: &str, key: &str) -> Option<String> {
        self.get(f)?.get(key)?.as_str().ok().map(str::to_string)
    }
}

/// One-to-many relations kept consistent automatically:
/// `(class, forward ref field, target class, back-reference set field)`.
/// Mirrors xen-api's `Datamodel.all_relations`.
pub const RELATIONS: &[(&str, &str, &str, &str)] = &[
    ("VBD", "VM", "VM", "VBDs"),
    ("VBD", "VDI", "VDI", "VBDs"),
    ("VDI", "SR", "SR", "VDIs"),
    ("VIF", "VM", "VM", "VIFs"),
    ("VIF", "network", "network", "VIFs"),
    ("PBD", "SR", "SR", "PBDs"),
    ("PBD", "host", "host", "PBDs"),
    ("PIF", "host", "host", "PIFs"),
    ("PIF", "network", "network", "PIFs"),
    ("VM", "snapshot_of", "VM", "snapshots"),
    ("VDI", "snapshot_of", "VDI", "snapshots"),
    ("VM", "parent", "VM", "children"),
    ("VM", "resident_on", "host", "resident_VMs"),
    ("task", "subtask_of", "task", "subtasks"),
    ("host_cpu", "host", "host", "host_CPUs"),
    ("VTPM", "VM", "VM", "VTPMs"),
    ("VUSB", "VM", "VM", "VUSBs"),
    ("crashdump", "VM", "VM", "crash_dumps"),
    ("console", "VM", "VM", "consoles"),
    ("VGPU", "VM", "VM", "VGPUs"),
    ("host_crashdump", "host", "host", "crashdumps"),
];

/// Classes whose tables are not persisted (as in xapi, they do not survive a
/// restart).
pub const NON_PERSISTENT: &[&str] = &["session", "task", "event"];

/// A row: the record and its creation/modification generations.
#[derive(Debug, Clone)]
pub struct Row {
    /// The fields.
    pub fields: Record,
    /// Generation at creation.
    pub ctime: u64,
    /// Generation at the last change.
    pub mtime: u64,
}

/// An event as `event.from` reports it.
#[derive(Debug, Clone)]
pub struct DbEvent {
    /// The class, as the datamodel spells it.
    pub class: String,
    /// The object.
    pub r: String,
    /// `add`, `mod` or `del`.
    pub op: &'static str,
    /// The record (absent for `del`).
    pub snapshot: Option<Value>,
    /// The generation of the change.
    pub generation: u64,
}

#[derive(Debug, Clone)]
struct Deletion {
    generation: u64,
    class: String,
    r: String,
    ctime: u64,
}

/// The database.
pub struct Db {
    dm: &'static Datamodel,
    tables: BTreeMap<String, BTreeMap<String, Row>>,
    generation: u64,
    deletions: VecDeque<Deletion>,
    deletions_floor: u64,
    persistent_generation: u64,
    changed: tokio::sync::watch::Sender<u64>,
}

const MAX_DELETIONS: usize = 100_000;

/// A fresh `OpaqueRef:<uuid>`.
pub fn new_ref() -> String {
    format!("OpaqueRef:{}", uuid::Uuid::new_v4())
}

impl Db {
    /// An empty database that announces every change on `changed`.
    pub fn new(changed: tokio::sync::watch::Sender<u64>) -> Db {
        Db {
            dm: datamodel(),
            tables: BTreeMap::new(),
            generation: 0,
            deletions: VecDeque::new(),
            deletions_floor: 0,
            persistent_generation: 0,
            changed,
        }
    }

    /// The current generation (bumped by every change).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The generation of the last change to a persisted table (the state
    /// saver skips saves when only sessions or tasks changed).
    pub fn persistent_generation(&self) -> u64 {
        self.persistent_generation
    }

    fn bump(&mut self, class: &str) -> u64 {
        self.generation += 1;
        if !NON_PERSISTENT.contains(&class) {
            self.persistent_generation = self.generation;
        }
        self.changed.send_replace(self.generation);
        self.generation
    }

    /// Creates an object with every field at its default, then `fields`
    /// applied (coerced to their types). A missing `uuid` is generated.
    pub fn create<'a>(
        &mut self,
        class: &str,
        fields: impl IntoIterator<Item = (&'a str, Value)>,
    ) -> ApiResult<String> {
        let r = new_ref();
        self.create_with_ref(class, &r, fields)?;
        Ok(r)
    }

    /// Like [`Db::create`] with a given ref.
    pub fn create_with_ref<'a>(
        &mut self,
        class: &str,
        r: &str,
        fields: impl IntoIterator<Item = (&'a str, Value)>,
    ) -> ApiResult<()> {
        let c = self
            .dm
            .class(class)
            .ok_or_else(|| ApiError::internal(format!("no class {class} in the datamodel")))?;
        let mut rec: Record = c
            .fields
            .iter()
            .map(|f| (f.name.clone(), f.default.clone()))
            .collect();
        for (k, v) in fields {
            let f = c
                .field(k)
                .ok_or_else(|| ApiError::internal(format!("class {class} has no field {k}")))?;
            rec.insert(k.to_string(), self.dm.coerce(&v, &f.ty)?);
        }
        if c.field("uuid").is_some() && rec.str_of("uuid").is_empty() {
            rec.insert("uuid".into(), Value::str(uuid::Uuid::new_v4().to_string()));
        }
        let g = self.bump(class);
        let links: Vec<(String, String, String)> = RELATIONS
            .iter()
            .filter(|(cl, _, _, _)| *cl == class)
            .map(|(_, fwd, tc, back)| {
                (
                    rec.str_of(fwd).to_string(),
                    tc.to_string(),
                    back.to_string(),
                )
            })
            .collect();
        self.tables.entry(class.to_string()).or_default().insert(
            r.to_string(),
            Row {
                fields: rec,
                ctime: g,
                mtime: g,
            },
        );
        for (target, tc, back) in links {
            self.link(&tc, &target, &back, r, true, g);
        }
        Ok(())
    }

    fn link(&mut self, class: &str, target: &str, back: &str, r: &str, add: bool, g: u64) {
        if target == NULL_REF || target.is_empty() {
            return;
        }
        if let Some(row) = self.tables.get_mut(class).and_then(|t| t.get_mut(target)) {
            let set = row
                .fields
                .entry(back.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(items) = set {
                items.retain(|v| v.as_str().ok() != Some(r));
                if add {
                    items.push(Value::str(r));
                }
            }
            row.mtime = g;
        }
    }

    /// Whether an object exists.
    pub fn exists(&self, class: &str, r: &str) -> bool {
        self.tables.get(class).is_some_and(|t| t.contains_key(r))
    }

    /// A record, or `HANDLE_INVALID [class, ref]`.
    pub fn get(&self, class: &str, r: &str) -> ApiResult<&Record> {
        self.tables
            .get(class)
            .and_then(|t| t.get(r))
            .map(|row| &row.fields)
            .ok_or_else(|| ApiError::handle_invalid(class, r))
    }

    /// One field of a record.
    pub fn field(&self, class: &str, r: &str, name: &str) -> ApiResult<Value> {
        self.get(class, r)?
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::internal(format!("class {class} has no field {name}")))
    }

    /// The record as the wire struct, fields in datamodel order.
    pub fn record_value(&self, class: &str, r: &str) -> ApiResult<Value> {
        let rec = self.get(class, r)?;
        Ok(self.to_value(class, rec))
    }

    fn to_value(&self, class: &str, rec: &Record) -> Value {
        match self.dm.class(class) {
            Some(c) => Value::Struct(
                c.fields
                    .iter()
                    .map(|f| {
                        (
                            f.name.clone(),
                            rec.get(&f.name)
                                .cloned()
                                .unwrap_or_else(|| f.default.clone()),
                        )
                    })
                    .collect(),
            ),
            None => Value::Struct(rec.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        }
    }

    /// Sets one field (coerced to its type), keeping back-references right.
    pub fn set(&mut self, class: &str, r: &str, name: &str, value: Value) -> ApiResult<()> {
        let ty = self
            .dm
            .class(class)
            .and_then(|c| c.field(name))
            .map(|f| f.ty.clone())
            .ok_or_else(|| ApiError::internal(format!("class {class} has no field {name}")))?;
        let v = self.dm.coerce(&value, &ty)?;
        self.update(class, r, |rec| {
            rec.insert(name.to_string(), v);
        })
    }

    /// Changes a record in place (values must already be in canonical form),
    /// keeping back-references right.
    pub fn update(&mut self, class: &str, r: &str, f: impl FnOnce(&mut Record)) -> ApiResult<()> {
        let rels: Vec<_> = RELATIONS
            .iter()
            .filter(|(c, _, _, _)| *c == class)
            .collect();
        let g = self.generation + 1;
        let row = self
            .tables
            .get_mut(class)
            .and_then(|t| t.get_mut(r))
            .ok_or_else(|| ApiError::handle_invalid(class, r))?;
        let before: Vec<String> = rels
            .iter()
            .map(|(_, fwd, _, _)| row.fields.str_of(fwd).to_string())
            .collect();
        f(&mut row.fields);
        row.mtime = g;
        let after: Vec<String> = rels
            .iter()
            .map(|(_, fwd, _, _)| row.fields.str_of(fwd).to_string())
            .collect();
        self.bump(class);
        for (i, (_, _, tc, back)) in rels.iter().enumerate() {
            if before[i] != after[i] {
                self.link(tc, &before[i], back, r, false, g);
                self.link(tc, &after[i], back, r, true, g);
            }
        }
        Ok(())
    }

    /// Marks an object modified without changing it (`event.inject`).
    pub fn touch(&mut self, class: &str, r: &str) -> ApiResult<()> {
        self.update(class, r, |_| {})
    }

    /// Deletes an object, removing it from the back-references that name it.
    pub fn destroy(&mut self, class: &str, r: &str) -> ApiResult<Record> {
        let row = self
            .tables
            .get_mut(class)
            .and_then(|t| t.remove(r))
            .ok_or_else(|| ApiError::handle_invalid(class, r))?;
        let g = self.bump(class);
        for (_, fwd, tc, back) in RELATIONS.iter().filter(|(c, _, _, _)| *c == class) {
            let target = row.fields.str_of(fwd).to_string();
            self.link(tc, &target, back, r, false, g);
        }
        self.deletions.push_back(Deletion {
            generation: g,
            class: class.to_string(),
            r: r.to_string(),
            ctime: row.ctime,
        });
        while self.deletions.len() > MAX_DELETIONS {
            if let Some(d) = self.deletions.pop_front() {
                self.deletions_floor = d.generation;
            }
        }
        Ok(row.fields)
    }

    /// All refs of a class.
    pub fn all(&self, class: &str) -> Vec<String> {
        self.tables
            .get(class)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// All `(ref, record)` pairs of a class.
    pub fn rows(&self, class: &str) -> impl Iterator<Item = (&String, &Record)> {
        self.tables
            .get(class)
            .into_iter()
            .flat_map(|t| t.iter().map(|(r, row)| (r, &row.fields)))
    }

    /// The ref of the object with this uuid, if any.
    pub fn find_by_uuid(&self, class: &str, uuid: &str) -> Option<String> {
        self.rows(class)
            .find(|(_, rec)| rec.str_of("uuid") == uuid)
            .map(|(r, _)| r.clone())
    }

    /// The ref of the object with this uuid, or `UUID_INVALID [class, uuid]`.
    pub fn by_uuid(&self, class: &str, uuid: &str) -> ApiResult<String> {
        self.find_by_uuid(class, uuid)
            .ok_or_else(|| ApiError::uuid_invalid(class, uuid))
    }

    /// A ref given either as a ref or as a uuid (as HTTP handlers accept).
    pub fn resolve(&self, class: &str, ref_or_uuid: &str) -> ApiResult<String> {
        if self.exists(class, ref_or_uuid) {
            return Ok(ref_or_uuid.to_string());
        }
        if ref_or_uuid.starts_with("OpaqueRef:") {
            return Err(ApiError::handle_invalid(class, ref_or_uuid));
        }
        self.by_uuid(class, ref_or_uuid)
    }

    /// Refs whose record matches a `get_all_records_where` expression.
    pub fn where_refs(&self, class: &str, expr: &str) -> ApiResult<Vec<String>> {
        let e = crate::db_filter::parse(expr)?;
        let c = self
            .dm
            .class(class)
            .ok_or_else(|| ApiError::internal(format!("no class {class}")))?;
        let mut out = Vec::new();
        for (r, rec) in self.rows(class) {
            let lookup = |db_field: &str| -> ApiResult<String> {
                if db_field == "_ref" {
                    return Ok(r.clone());
                }
                let f = c.field_by_db_name(db_field).ok_or_else(|| {
                    ApiError::internal(format!(
                        "Db_exn.DBCache_NotFound(\"missing field\", \"{db_field}\", \"{class}\")"
                    ))
                })?;
                Ok(db_string(rec.get(&f.name).unwrap_or(&f.default)))
            };
            if e.eval(&lookup)? {
                out.push(r.clone());
            }
        }
        // An unknown field must fail even on an empty table.
        e.check_fields(&|f| f == "_ref" || c.field_by_db_name(f).is_some(), class)?;
        Ok(out)
    }

    /// Events since generation `since` for the classes `wanted` accepts
    /// (`(class, ref) → bool`). Returns `EVENTS_LOST` when deletions that old
    /// were forgotten, or for a token newer than the DB (from before a restart).
    pub fn events_since(
        &self,
        since: u64,
        wanted: &dyn Fn(&str, &str) -> bool,
    ) -> ApiResult<Vec<DbEvent>> {
        // A token from the future (taken before a restart) or older than the
        // remembered deletions cannot be served: the client must start over.
        if since < self.deletions_floor || since > self.generation {
            return Err(ApiError::new("EVENTS_LOST", Vec::<String>::new()));
        }
        let mut out = Vec::new();
        for (class, table) in &self.tables {
            for (r, row) in table {
                if row.mtime > since && wanted(class, r) {
                    out.push(DbEvent {
                        class: class.clone(),
                        r: r.clone(),
                        op: if row.ctime > since { "add" } else { "mod" },
                        snapshot: Some(self.to_value(class, &row.fields)),
                        generation: row.mtime,
                    });
                }
            }
        }
        for d in &self.deletions {
            if d.generation > since && d.ctime <= since && wanted(&d.class, &d.r) {
                out.push(DbEvent {
                    class: d.class.clone(),
                    r: d.r.clone(),
                    op: "del",
                    snapshot: None,
                    generation: d.generation,
                });
            }
        }
        out.sort_by_key(|e| e.generation);
        Ok(out)
    }

    /// The persistent tables as JSON: `{class: {ref: {field: value}}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut tables = serde_json::Map::new();
        for (class, table) in &self.tables {
            if NON_PERSISTENT.contains(&class.as_str()) {
                continue;
            }
            let mut rows = serde_json::Map::new();
            for (r, row) in table {
                let rec: serde_json::Map<String, serde_json::Value> = row
                    .fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect();
                rows.insert(r.clone(), serde_json::Value::Object(rec));
            }
            tables.insert(class.clone(), serde_json::Value::Object(rows));
        }
        serde_json::json!({ "format": "xapi-sim-db/1", "tables": tables })
    }

    /// Loads tables saved by [`Db::to_json`], re-typing values by the
    /// datamodel. Unknown classes and fields are dropped.
    pub fn load_json(&mut self, j: &serde_json::Value) -> Result<(), String> {
        let tables = j["tables"]
            .as_object()
            .ok_or("state file has no \"tables\" object")?;
        for (class, rows) in tables {
            let Some(c) = self.dm.class(class) else {
                continue;
            };
            let Some(rows) = rows.as_object() else {
                continue;
            };
            for (r, rec) in rows {
                let Some(rec) = rec.as_object() else { continue };
                let mut fields: Record = c
                    .fields
                    .iter()
                    .map(|f| (f.name.clone(), f.default.clone()))
                    .collect();
                for (k, v) in rec {
                    if let Some(f) = c.field(k) {
                        let val = Value::from_json(v);
                        let val = self
                            .dm
                            .coerce(&val, &f.ty)
                            .unwrap_or_else(|_| f.default.clone());
                        fields.insert(k.clone(), val);
                    }
                }
                let g = self.bump(class);
                self.tables.entry(class.clone()).or_default().insert(
                    r.clone(),
                    Row {
                        fields,
                        ctime: g,
                        mtime: g,
                    },
                );
            }
        }
        Ok(())
    }
}

/// A value as xapi's DB marshals it to a string (what `get_all_records_where`
/// compares): bools `true`/`false`, ints in decimal, sets and maps as
/// S-expressions.
pub fn db_string(v: &Value) -> String {
    match v {
        Value::String(s) | Value::DateTime(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Double(d) => {
            if d.fract() == 0.0 && d.is_finite() {
                format!("{d:.0}.")
            } else {
                d.to_string()
            }
        }
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| format!("'{}'", db_string(i)))
                .collect();
            format!("({})", parts.join(" "))
        }
        Value::Struct(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("('{}' '{}')", k, db_string(v)))
                .collect();
            format!("({})", parts.join(" "))
        }
        Value::Nil => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Db {
        Db::new(tokio::sync::watch::channel(0).0)
    }

    #[test]
    fn records_are_complete_and_back_references_follow() {
        let mut db = db();
        let vm = db.create("VM", [("name_label", Value::str("a"))]).unwrap();
        let vdi = db.create("VDI", []).unwrap();
        let vbd = db
            .create(
                "VBD",
                [
                    ("VM", Value::str(vm.clone())),
                    ("VDI", Value::str(vdi.clone())),
                ],
            )
            .unwrap();
        let rec = db.get("VM", &vm).unwrap();
        assert_eq!(rec.strs_of("VBDs"), vec![vbd.clone()]);
        assert_eq!(rec.str_of("power_state"), "Halted");
        assert_eq!(rec.len(), datamodel().class("VM").unwrap().fields.len());
        assert_eq!(
            db.get("VDI", &vdi).unwrap().strs_of("VBDs"),
            vec![vbd.clone()]
        );
        db.destroy("VBD", &vbd).unwrap();
        assert!(db.get("VM", &vm).unwrap().strs_of("VBDs").is_empty());
        assert_eq!(db.get("VBD", &vbd).unwrap_err().code, "HANDLE_INVALID");
        for (c, fwd, tc, back) in RELATIONS {
            let dm = datamodel();
            assert!(
                dm.class(c).and_then(|k| k.field(fwd)).is_some(),
                "{c}.{fwd}"
            );
            assert!(
                dm.class(tc).and_then(|k| k.field(back)).is_some(),
                "{tc}.{back}"
            );
        }
    }

    #[test]
    fn where_uses_db_names_and_strings() {
        let mut db = db();
        let a = db
            .create(
                "VM",
                [
                    ("name_label", Value::str("a")),
                    ("is_a_template", Value::Bool(false)),
                ],
            )
            .unwrap();
        db.create(
            "VM",
            [
                ("name_label", Value::str("b")),
                ("is_a_template", Value::Bool(true)),
            ],
        )
        .unwrap();
        assert_eq!(
            db.where_refs("VM", r#"field "is_a_template"="false""#)
                .unwrap(),
            vec![a.clone()]
        );
        assert_eq!(
            db.where_refs(
                "VM",
                r#"field "name__label" = "a" and not (field "is_a_template" = "true")"#
            )
            .unwrap(),
            vec![a]
        );
        assert_eq!(db.where_refs("VM", "true").unwrap().len(), 2);
        assert!(db.where_refs("VM", r#"field "name_label" = "a""#).is_err());
    }

    #[test]
    fn events_and_persistence() {
        let mut db = db();
        let a = db.create("VM", [("name_label", Value::str("a"))]).unwrap();
        let g = db.generation();
        db.set("VM", &a, "name_label", Value::str("b")).unwrap();
        let ev = db.events_since(g, &|_, _| true).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].op, "mod");
        let j = db.to_json();
        let mut db2 = self::tests::db();
        db2.load_json(&j).unwrap();
        assert_eq!(db2.get("VM", &a).unwrap().str_of("name_label"), "b");
        assert_eq!(
            db2.get("VM", &a).unwrap().get("memory_static_max"),
            Some(&Value::Int(0))
        );
    }
}
