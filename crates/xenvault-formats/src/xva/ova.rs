//! `ova.xml`: the typed model of an XVA's metadata, and the builder that turns
//! XAPI records into it the way xapi's `/export` does.
//!
//! `ova.xml` is one XML-RPC value (no `<?xml?>` declaration): a struct of
//! `version` and `objects`, each object a struct of `class`, `id` (`Ref:<n>`)
//! and `snapshot` (the full XAPI record). See `docs/xapi-notes.md`, "XVA",
//! and xapi's `ocaml/xapi/importexport.ml` and `ocaml/xapi/export.ml`.

use std::collections::HashMap;

use xenvault_types::Value;

use super::XvaError;

/// The null reference.
pub const NULL_REF: &str = "OpaqueRef:NULL";

/// What `snapshot_time` becomes on a plain export (xapi's `Date.never`).
pub const NEVER: &str = "19700101T00:00:00Z";

/// The format version xapi has written since Miami: inline checksums only.
pub const EXPORT_VSN: i64 = 2;

/// The `version` struct of `ova.xml`.
///
/// An importing xapi refuses the archive (`IMPORT_INCOMPATIBLE_VERSION`) when
/// `(xapi_major, xapi_minor)` is greater than its own, so a writer should claim
/// a low version. [`OvaVersion::default`] claims 1.20, as Xen Orchestra does,
/// which every xapi since XenServer 6 accepts (`docs/xapi-notes.md`, "XVA").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvaVersion {
    /// Host name of the exporter.
    pub hostname: String,
    /// Build date of the exporter (free text).
    pub date: String,
    /// Product version (free text).
    pub product_version: String,
    /// Product brand (free text).
    pub product_brand: String,
    /// Build number (free text).
    pub build_number: String,
    /// xapi major version; checked on import.
    pub xapi_major: i64,
    /// xapi minor version; checked on import.
    pub xapi_minor: i64,
    /// Archive format: 2 = inline checksums only (Miami and later).
    pub export_vsn: i64,
}

impl Default for OvaVersion {
    fn default() -> Self {
        OvaVersion {
            hostname: "xenvault".to_string(),
            date: String::new(),
            product_version: env!("CARGO_PKG_VERSION").to_string(),
            product_brand: "xenvault".to_string(),
            build_number: String::new(),
            xapi_major: 1,
            xapi_minor: 20,
            export_vsn: EXPORT_VSN,
        }
    }
}

impl OvaVersion {
    /// True when a host running xapi `major.minor` accepts this archive
    /// (xapi's `Importexport.assert_compatible`).
    pub fn importable_by(&self, major: i64, minor: i64) -> bool {
        (self.xapi_major, self.xapi_minor) <= (major, minor)
    }

    /// The XML-RPC struct, members in xapi's order.
    pub fn to_value(&self) -> Value {
        Value::record([
            ("hostname", Value::str(&self.hostname)),
            ("date", Value::str(&self.date)),
            ("product_version", Value::str(&self.product_version)),
            ("product_brand", Value::str(&self.product_brand)),
            ("build_number", Value::str(&self.build_number)),
            ("xapi_major", Value::Int(self.xapi_major)),
            ("xapi_minor", Value::Int(self.xapi_minor)),
            ("export_vsn", Value::Int(self.export_vsn)),
        ])
    }

    /// Reads the struct as xapi does: the five strings and two versions are
    /// required, `export_vsn` defaults to 0 when absent.
    pub fn from_value(v: &Value) -> Result<OvaVersion, XvaError> {
        let s = |name: &str| -> Result<String, XvaError> {
            Ok(v.member(name)
                .and_then(Value::as_str)
                .map_err(|e| XvaError::OvaXml(format!("version.{name}: {e}")))?
                .to_string())
        };
        let i = |name: &str| -> Result<i64, XvaError> {
            v.member(name)
                .and_then(Value::as_i64)
                .map_err(|e| XvaError::OvaXml(format!("version.{name}: {e}")))
        };
        Ok(OvaVersion {
            hostname: s("hostname")?,
            date: s("date")?,
            product_version: s("product_version")?,
            product_brand: s("product_brand")?,
            build_number: s("build_number")?,
            xapi_major: i("xapi_major")?,
            xapi_minor: i("xapi_minor")?,
            export_vsn: match v.get("export_vsn") {
                None => 0,
                Some(x) => x
                    .as_i64()
                    .map_err(|e| XvaError::OvaXml(format!("version.export_vsn: {e}")))?,
            },
        })
    }
}

/// One exported object: its class, its XVA id and its full record.
#[derive(Debug, Clone, PartialEq)]
pub struct OvaObject {
    /// `"VM"`, `"VBD"`, `"VDI"`, `"SR"`, `"VIF"`, `"network"`, …
    pub class: String,
    /// The XVA id, `Ref:<n>`; references between objects use it.
    pub id: String,
    /// The full XAPI record (a struct), references rewritten to XVA ids.
    pub snapshot: Value,
}

/// A disk whose data an XVA carries, as the importer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XvaDisk {
    /// The VDI's XVA id; also the directory of its chunks (`Ref:4/00000000`).
    pub id: String,
    /// The VDI's `uuid` in `ova.xml` (empty if absent).
    pub vdi_uuid: String,
    /// The VDI's `virtual_size`: the chunks cover exactly this many bytes.
    pub virtual_size: u64,
}

/// The whole `ova.xml`.
#[derive(Debug, Clone, PartialEq)]
pub struct OvaXml {
    /// The exporter's version.
    pub version: OvaVersion,
    /// All exported objects.
    pub objects: Vec<OvaObject>,
}

impl OvaXml {
    /// The XML-RPC value.
    pub fn to_value(&self) -> Value {
        Value::record([
            ("version", self.version.to_value()),
            (
                "objects",
                Value::Array(
                    self.objects
                        .iter()
                        .map(|o| {
                            Value::record([
                                ("class", Value::str(&o.class)),
                                ("id", Value::str(&o.id)),
                                ("snapshot", o.snapshot.clone()),
                            ])
                        })
                        .collect(),
                ),
            ),
        ])
    }

    /// The `ova.xml` text, as xapi writes it (no XML declaration).
    pub fn to_xml(&self) -> String {
        self.to_value().to_xml()
    }

    /// Reads the model from its XML-RPC value.
    pub fn from_value(v: &Value) -> Result<OvaXml, XvaError> {
        let bad = |what: &str, e: xenvault_types::rpc::ValueError| {
            XvaError::OvaXml(format!("{what}: {e}"))
        };
        let version = OvaVersion::from_value(v.member("version").map_err(|e| bad("ova.xml", e))?)?;
        let objs = v
            .member("objects")
            .and_then(Value::as_array)
            .map_err(|e| bad("ova.xml", e))?;
        let mut objects = Vec::with_capacity(objs.len());
        for (i, o) in objs.iter().enumerate() {
            let what = format!("objects[{i}]");
            let class = o
                .member("class")
                .and_then(Value::as_str)
                .map_err(|e| bad(&what, e))?;
            let id = o
                .member("id")
                .and_then(Value::as_str)
                .map_err(|e| bad(&what, e))?;
            let snapshot = o.member("snapshot").map_err(|e| bad(&what, e))?;
            snapshot
                .as_struct()
                .map_err(|e| bad(&format!("{what}.snapshot"), e))?;
            objects.push(OvaObject {
                class: class.to_string(),
                id: id.to_string(),
                snapshot: snapshot.clone(),
            });
        }
        Ok(OvaXml { version, objects })
    }

    /// Parses `ova.xml` text.
    pub fn from_xml(text: &str) -> Result<OvaXml, XvaError> {
        let v = Value::from_xml(text).map_err(|e| XvaError::OvaXml(e.to_string()))?;
        OvaXml::from_value(&v)
    }

    /// The object with XVA id `id`.
    pub fn object(&self, id: &str) -> Option<&OvaObject> {
        self.objects.iter().find(|o| o.id == id)
    }

    /// The objects of one class, in file order.
    pub fn objects_of_class<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a OvaObject> {
        self.objects.iter().filter(move |o| o.class == class)
    }

    /// The disks whose data follows `ova.xml`, in stream order (ids sorted as
    /// strings, so `Ref:10` comes before `Ref:9`).
    ///
    /// Same rule as xapi's importer (`Import.non_cdrom_vdis`): the VDIs of the
    /// VBDs whose `type` is not `CD` and whose SR's `content_type` is not
    /// `iso`, plus every VDI of type `suspend`. A non-CD VBD whose VDI or SR
    /// is missing from `ova.xml` is an error, as in xapi.
    pub fn disks(&self) -> Result<Vec<XvaDisk>, XvaError> {
        let mut ids: Vec<&str> = Vec::new();
        for vbd in self.objects_of_class("VBD") {
            let kind = field_str(&vbd.snapshot, "type").unwrap_or("");
            if kind.eq_ignore_ascii_case("CD") {
                continue;
            }
            let vdi_id = field_str(&vbd.snapshot, "VDI").unwrap_or(NULL_REF);
            let vdi = self.object(vdi_id).ok_or_else(|| {
                XvaError::OvaXml(format!(
                    "VBD {} (type {kind}) points at VDI {vdi_id}, which is not in ova.xml",
                    vbd.id
                ))
            })?;
            let sr_id = field_str(&vdi.snapshot, "SR").unwrap_or(NULL_REF);
            let sr = self.object(sr_id).ok_or_else(|| {
                XvaError::OvaXml(format!(
                    "VDI {vdi_id} is on SR {sr_id}, which is not in ova.xml"
                ))
            })?;
            if field_str(&sr.snapshot, "content_type") == Some("iso") {
                continue;
            }
            ids.push(&vdi.id);
        }
        for vdi in self.objects_of_class("VDI") {
            if field_str(&vdi.snapshot, "type").is_some_and(|t| t.eq_ignore_ascii_case("suspend")) {
                ids.push(&vdi.id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let mut disks = Vec::with_capacity(ids.len());
        for id in ids {
            let vdi = self
                .object(id)
                .filter(|o| o.class == "VDI")
                .ok_or_else(|| {
                    XvaError::OvaXml(format!("{id} is referenced as a VDI but is not one"))
                })?;
            let size = vdi
                .snapshot
                .member("virtual_size")
                .and_then(Value::as_i64)
                .map_err(|e| XvaError::OvaXml(format!("VDI {id}: virtual_size: {e}")))?;
            let virtual_size = u64::try_from(size)
                .map_err(|_| XvaError::OvaXml(format!("VDI {id}: negative virtual_size {size}")))?;
            disks.push(XvaDisk {
                id: id.to_string(),
                vdi_uuid: field_str(&vdi.snapshot, "uuid").unwrap_or("").to_string(),
                virtual_size,
            });
        }
        Ok(disks)
    }
}

fn field_str<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record.get(name).and_then(|v| v.as_str().ok())
}

/// The XAPI records of one VM to export, each keyed by its reference
/// (`OpaqueRef:…`), as `get_record` returns them.
///
/// Give every object the VM reaches: the VBDs in `VM.VBDs`, the VDIs of the
/// non-empty VBDs (CD images included), their SRs, the VIFs in `VM.VIFs` and
/// their networks. Records that the VM does not reach are ignored.
#[derive(Debug, Clone)]
pub struct ExportRecords {
    /// The VM: `(ref, record)`.
    pub vm: (String, Value),
    /// VBD records.
    pub vbds: Vec<(String, Value)>,
    /// VDI records.
    pub vdis: Vec<(String, Value)>,
    /// VIF records.
    pub vifs: Vec<(String, Value)>,
    /// Network records.
    pub networks: Vec<(String, Value)>,
    /// SR records.
    pub srs: Vec<(String, Value)>,
}

/// How the builder rewrites records (xapi's `/export` flags). The default is
/// a plain `/export`: version 1.20, ids from `Ref:0`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OvaBuilder {
    /// The `version` struct to write.
    pub version: OvaVersion,
    /// The number of the first id (`Ref:<first_id>`); xapi uses a process-wide
    /// counter, so any start is valid.
    pub first_id: u64,
    /// `/export?preserve_power_state=true`: keep `power_state`, the suspend VDI
    /// and `currently_attached`.
    pub preserve_power_state: bool,
    /// Keep the snapshot fields (`/export_metadata` with `export_snapshots`).
    pub with_snapshot_metadata: bool,
}

struct Table {
    ids: HashMap<String, String>,
    order: Vec<(&'static str, String)>,
    next: u64,
}

impl Table {
    fn add(&mut self, class: &'static str, r: &str) {
        if r == NULL_REF || self.ids.contains_key(r) {
            return;
        }
        self.ids.insert(r.to_string(), format!("Ref:{}", self.next));
        self.next += 1;
        self.order.push((class, r.to_string()));
    }

    /// xapi's `lookup`: the XVA id, or the null reference.
    fn lookup(&self, r: &Value) -> Value {
        let id = r
            .as_str()
            .ok()
            .and_then(|r| self.ids.get(r))
            .map_or(NULL_REF, String::as_str);
        Value::str(id)
    }

    /// xapi's `filter`: the XVA ids of the exported members of a set.
    fn filter(&self, set: Option<&Value>) -> Value {
        let items = set.and_then(|s| s.as_array().ok()).unwrap_or(&[]);
        Value::Array(
            items
                .iter()
                .filter_map(|r| r.as_str().ok().and_then(|r| self.ids.get(r)))
                .map(|id| Value::str(id.as_str()))
                .collect(),
        )
    }
}

/// Replaces member `name` of a struct record. An absent member stays absent:
/// the records are complete for the caller's datamodel, and a field that
/// datamodel lacks must not be invented.
fn set(record: &mut Value, name: &str, value: Value) {
    if let Value::Struct(members) = record
        && let Some((_, v)) = members.iter_mut().find(|(k, _)| k == name)
    {
        *v = value;
    }
}

fn refs<'a>(record: &'a Value, name: &str) -> Vec<&'a str> {
    record
        .get(name)
        .and_then(|v| v.as_array().ok())
        .unwrap_or(&[])
        .iter()
        .filter_map(|v| v.as_str().ok())
        .collect()
}

fn empty_map() -> Value {
    Value::Struct(Vec::new())
}

fn empty_set() -> Value {
    Value::Array(Vec::new())
}

impl OvaBuilder {
    /// Builds `ova.xml` for one VM the way xapi's `Export.vm_metadata` does.
    ///
    /// Ids are given in xapi's walk order (VM; each VIF then its network; each
    /// VBD then its VDI and that VDI's SR; the suspend VDI when kept), objects
    /// are listed by class in xapi's order (VM, VBD, VIF, network, VDI, SR).
    /// Per class, the fields xapi rewrites are rewritten: references to
    /// exported objects become their ids, the others `OpaqueRef:NULL`;
    /// operations, PBDs, PIFs, consoles, blobs, crash dumps and metrics are
    /// emptied; on a plain export `power_state` becomes `Halted`,
    /// `is_a_snapshot` false, `snapshot_of`/`parent` null, `snapshots` empty,
    /// `snapshot_time` [`NEVER`] and `currently_attached` false. `is_a_template`
    /// is kept. Fields xapi does not touch (for example `VDI.snapshot_of`) are
    /// kept verbatim, as xapi does.
    pub fn build(&self, records: &ExportRecords) -> Result<OvaXml, XvaError> {
        fn record<'r>(
            class: &'static str,
            list: &'r [(String, Value)],
            r: &str,
        ) -> Result<&'r Value, XvaError> {
            list.iter()
                .find(|(k, _)| k == r)
                .map(|(_, v)| v)
                .ok_or_else(|| XvaError::MissingRecord {
                    class,
                    reference: r.to_string(),
                })
        }
        let mut t = Table {
            ids: HashMap::new(),
            order: Vec::new(),
            next: self.first_id,
        };
        let (vm_ref, vm) = &records.vm;
        let add_vdi = |t: &mut Table, vdi_ref: &str| -> Result<(), XvaError> {
            let vdi = record("VDI", &records.vdis, vdi_ref)?;
            t.add("VDI", vdi_ref);
            let sr_ref = field_str(vdi, "SR").unwrap_or(NULL_REF);
            if sr_ref != NULL_REF {
                record("SR", &records.srs, sr_ref)?;
                t.add("SR", sr_ref);
            }
            Ok(())
        };
        // The walk of xapi's Export.update_table.
        t.add("VM", vm_ref);
        for vif_ref in refs(vm, "VIFs") {
            let vif = record("VIF", &records.vifs, vif_ref)?;
            t.add("VIF", vif_ref);
            let net_ref = field_str(vif, "network").unwrap_or(NULL_REF);
            if net_ref != NULL_REF {
                record("network", &records.networks, net_ref)?;
                t.add("network", net_ref);
            }
        }
        for vbd_ref in refs(vm, "VBDs") {
            let vbd = record("VBD", &records.vbds, vbd_ref)?;
            t.add("VBD", vbd_ref);
            let empty = vbd
                .get("empty")
                .and_then(|v| v.as_bool().ok())
                .unwrap_or(false);
            let vdi_ref = field_str(vbd, "VDI").unwrap_or(NULL_REF);
            if !empty && vdi_ref != NULL_REF {
                add_vdi(&mut t, vdi_ref)?;
            }
        }
        let suspended = field_str(vm, "power_state") == Some("Suspended");
        let suspend_vdi = field_str(vm, "suspend_VDI").unwrap_or(NULL_REF);
        if self.preserve_power_state && suspended && suspend_vdi != NULL_REF {
            add_vdi(&mut t, suspend_vdi)?;
        }

        let keep_power = self.preserve_power_state;
        let keep_snap = self.with_snapshot_metadata;
        let mut objects = Vec::with_capacity(t.order.len());
        for class in ["VM", "VBD", "VIF", "network", "VDI", "SR"] {
            for (c, r) in t.order.iter().filter(|(c, _)| *c == class) {
                let mut rec = match *c {
                    "VM" => vm.clone(),
                    "VBD" => record(c, &records.vbds, r)?.clone(),
                    "VIF" => record(c, &records.vifs, r)?.clone(),
                    "network" => record(c, &records.networks, r)?.clone(),
                    "VDI" => record(c, &records.vdis, r)?.clone(),
                    _ => record(c, &records.srs, r)?.clone(),
                };
                let orig = rec.clone();
                let lookup = |name: &str| t.lookup(orig.get(name).unwrap_or(&Value::Nil));
                let filter = |name: &str| t.filter(orig.get(name));
                let kept = |name: &str, v: Value| {
                    if keep_snap {
                        orig.get(name).cloned().unwrap_or(v)
                    } else {
                        v
                    }
                };
                set(&mut rec, "current_operations", empty_map());
                set(&mut rec, "allowed_operations", empty_set());
                match *c {
                    "VM" => {
                        if !keep_power {
                            set(&mut rec, "power_state", Value::str("Halted"));
                        }
                        let suspend = if keep_power {
                            lookup("suspend_VDI")
                        } else {
                            Value::str(NULL_REF)
                        };
                        set(&mut rec, "suspend_VDI", suspend);
                        set(
                            &mut rec,
                            "is_a_snapshot",
                            kept("is_a_snapshot", Value::Bool(false)),
                        );
                        let snapshot_of = if keep_snap {
                            lookup("snapshot_of")
                        } else {
                            Value::str(NULL_REF)
                        };
                        set(&mut rec, "snapshot_of", snapshot_of);
                        set(&mut rec, "snapshots", kept("snapshots", empty_set()));
                        set(
                            &mut rec,
                            "snapshot_time",
                            kept("snapshot_time", Value::DateTime(NEVER.to_string())),
                        );
                        set(
                            &mut rec,
                            "transportable_snapshot_id",
                            kept("transportable_snapshot_id", Value::str("")),
                        );
                        let parent = if keep_snap {
                            lookup("parent")
                        } else {
                            Value::str(NULL_REF)
                        };
                        set(&mut rec, "parent", parent);
                        set(&mut rec, "VIFs", filter("VIFs"));
                        set(&mut rec, "VBDs", filter("VBDs"));
                        set(&mut rec, "VGPUs", filter("VGPUs"));
                        set(&mut rec, "crash_dumps", empty_set());
                        set(&mut rec, "VTPMs", filter("VTPMs"));
                        set(&mut rec, "resident_on", lookup("resident_on"));
                        set(&mut rec, "affinity", lookup("affinity"));
                        set(&mut rec, "consoles", empty_set());
                        set(&mut rec, "metrics", Value::str(NULL_REF));
                        set(&mut rec, "guest_metrics", lookup("guest_metrics"));
                        set(&mut rec, "protection_policy", Value::str(NULL_REF));
                        set(&mut rec, "blobs", empty_map());
                    }
                    "VBD" | "VIF" => {
                        if !keep_power {
                            set(&mut rec, "currently_attached", Value::Bool(false));
                        }
                        let target = if *c == "VBD" { "VDI" } else { "network" };
                        set(&mut rec, target, lookup(target));
                        set(&mut rec, "VM", lookup("VM"));
                        set(&mut rec, "metrics", Value::str(NULL_REF));
                    }
                    "network" => {
                        set(&mut rec, "VIFs", filter("VIFs"));
                        set(&mut rec, "PIFs", empty_set());
                    }
                    "VDI" => {
                        set(&mut rec, "VBDs", filter("VBDs"));
                        set(&mut rec, "crash_dumps", empty_set());
                        set(&mut rec, "SR", lookup("SR"));
                    }
                    _ => {
                        set(&mut rec, "VDIs", filter("VDIs"));
                        set(&mut rec, "PBDs", empty_set());
                    }
                }
                objects.push(OvaObject {
                    class: class.to_string(),
                    id: t.ids.get(r).cloned().unwrap_or_default(),
                    snapshot: rec,
                });
            }
        }
        Ok(OvaXml {
            version: self.version.clone(),
            objects,
        })
    }
}
