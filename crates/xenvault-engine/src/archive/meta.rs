//! The metadata files of a VM restore point: `vm.json` (the full XAPI
//! records) and NAUbackup-style `vm.cfg`, `vbd-N.cfg`, `vdi-N.cfg`,
//! `vif-N.cfg` (`key=value` lines a person can read, with the keys
//! NAUbackup's VmBackup.py writes plus a few more).
//!
//! `N` is the VBD's `userdevice` (the disk's slot: 0 = first disk) and the
//! VIF's `device`.

use xenvault_formats::xva::ExportRecords;
use xenvault_types::Value;

use crate::sink::DiskMeta;

/// Format name written into `vm.json`.
pub const VM_JSON_FORMAT: &str = "xenvault-vm-records";

/// Renders `vm.json`: `{"format", "version", "vm_uuid", "snapshot_uuid",
/// "VM": {"ref", "record"}, "source_VM": record, "VBDs": {ref: record},
/// "VDIs", "VIFs", "networks", "SRs", "disks": [DiskMeta]}`.
pub fn vm_json(
    vm_uuid: &str,
    records: &ExportRecords,
    source_vm: &Value,
    disks: &[DiskMeta],
) -> String {
    use serde_json::{Map, Value as J, json};
    let map = |list: &[(String, Value)]| -> J {
        J::Object(
            list.iter()
                .map(|(r, v)| (r.clone(), v.to_json()))
                .collect::<Map<String, J>>(),
        )
    };
    let doc = json!({
        "format": VM_JSON_FORMAT,
        "version": 1,
        "vm_uuid": vm_uuid,
        "snapshot_uuid": field(&records.vm.1, "uuid"),
        "VM": { "ref": records.vm.0, "record": records.vm.1.to_json() },
        "source_VM": source_vm.to_json(),
        "VBDs": map(&records.vbds),
        "VDIs": map(&records.vdis),
        "VIFs": map(&records.vifs),
        "networks": map(&records.networks),
        "SRs": map(&records.srs),
        "disks": serde_json::to_value(disks).unwrap_or(J::Null),
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string());
    text.push('\n');
    text
}

/// A field of a record rendered for a `.cfg` line (empty when absent).
pub fn field(record: &Value, name: &str) -> String {
    record.get(name).map(cfg_value).unwrap_or_default()
}

/// A value rendered on one line: scalars as text, sets as `a; b`, maps as
/// `k: v; k2: v2`, newlines escaped as `\n`.
pub fn cfg_value(v: &Value) -> String {
    let text = match v {
        Value::String(s) | Value::DateTime(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Array(items) => items.iter().map(cfg_value).collect::<Vec<_>>().join("; "),
        Value::Struct(members) => members
            .iter()
            .map(|(k, v)| format!("{k}: {}", cfg_value(v)))
            .collect::<Vec<_>>()
            .join("; "),
        Value::Nil => String::new(),
    };
    text.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

fn lines(pairs: &[(&str, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

fn lookup<'a>(list: &'a [(String, Value)], reference: &str) -> Option<&'a Value> {
    list.iter().find(|(r, _)| r == reference).map(|(_, v)| v)
}

/// `vm.cfg`: the VM's identity and size. Names come from the live VM
/// (`source_vm`), the rest from the exported snapshot when the live record
/// lacks it.
pub fn vm_cfg(vm_uuid: &str, records: &ExportRecords, source_vm: &Value) -> String {
    let snap = &records.vm.1;
    let pick = |name: &str| {
        let live = field(source_vm, name);
        if live.is_empty() {
            field(snap, name)
        } else {
            live
        }
    };
    lines(&[
        ("name_label", pick("name_label")),
        ("name_description", pick("name_description")),
        ("memory_static_max", pick("memory_static_max")),
        ("memory_dynamic_max", pick("memory_dynamic_max")),
        ("memory_dynamic_min", pick("memory_dynamic_min")),
        ("VCPUs_max", pick("VCPUs_max")),
        ("VCPUs_at_startup", pick("VCPUs_at_startup")),
        ("HVM_boot_policy", pick("HVM_boot_policy")),
        ("PV_bootloader", pick("PV_bootloader")),
        ("domain_type", pick("domain_type")),
        ("power_state", field(source_vm, "power_state")),
        ("tags", pick("tags")),
        ("os_version", pick("os_version")),
        ("orig_uuid", vm_uuid.to_string()),
        ("snapshot_uuid", field(snap, "uuid")),
        ("snapshot_time", field(snap, "snapshot_time")),
    ])
}

/// The `.cfg` files of the VM's disks and VIFs: `(file name, text)`.
/// Only disk VBDs (not CD drives) get `vbd-N.cfg` / `vdi-N.cfg`.
pub fn device_cfgs(records: &ExportRecords, disks: &[DiskMeta]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, (vbd_ref, vbd)) in records.vbds.iter().enumerate() {
        if !field(vbd, "type").eq_ignore_ascii_case("disk") {
            continue;
        }
        let _ = vbd_ref;
        let mut n = field(vbd, "userdevice");
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric()) {
            n = i.to_string();
        }
        out.push((
            format!("vbd-{n}.cfg"),
            lines(&[
                ("userdevice", field(vbd, "userdevice")),
                ("device", field(vbd, "device")),
                ("bootable", field(vbd, "bootable")),
                ("mode", field(vbd, "mode")),
                ("type", field(vbd, "type")),
                ("unpluggable", field(vbd, "unpluggable")),
                ("empty", field(vbd, "empty")),
                ("orig_uuid", field(vbd, "uuid")),
            ]),
        ));
        let vdi_ref = field(vbd, "VDI");
        if let Some(vdi) = lookup(&records.vdis, &vdi_ref) {
            let sr_uuid = lookup(&records.srs, &field(vdi, "SR"))
                .map(|sr| field(sr, "uuid"))
                .unwrap_or_default();
            let vdi_uuid = field(vdi, "uuid");
            let meta = disks.iter().find(|d| d.vdi_uuid == vdi_uuid);
            let orig = meta
                .filter(|d| !d.source_vdi_uuid.is_empty())
                .map(|d| d.source_vdi_uuid.clone())
                .unwrap_or_else(|| vdi_uuid.clone());
            out.push((
                format!("vdi-{n}.cfg"),
                lines(&[
                    ("name_label", field(vdi, "name_label")),
                    ("name_description", field(vdi, "name_description")),
                    ("virtual_size", field(vdi, "virtual_size")),
                    ("type", field(vdi, "type")),
                    ("sharable", field(vdi, "sharable")),
                    ("read_only", field(vdi, "read_only")),
                    ("orig_uuid", orig),
                    ("snapshot_uuid", vdi_uuid),
                    ("orig_sr_uuid", sr_uuid),
                ]),
            ));
        }
    }
    for (i, (_, vif)) in records.vifs.iter().enumerate() {
        let mut n = field(vif, "device");
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric()) {
            n = i.to_string();
        }
        let network = lookup(&records.networks, &field(vif, "network"));
        out.push((
            format!("vif-{n}.cfg"),
            lines(&[
                ("device", field(vif, "device")),
                (
                    "network_name_label",
                    network.map(|n| field(n, "name_label")).unwrap_or_default(),
                ),
                (
                    "network_uuid",
                    network.map(|n| field(n, "uuid")).unwrap_or_default(),
                ),
                ("MTU", field(vif, "MTU")),
                ("MAC", field(vif, "MAC")),
                ("other_config", field(vif, "other_config")),
                ("orig_uuid", field(vif, "uuid")),
            ]),
        ));
    }
    out
}

/// `RESTORE.txt`: what the directory holds and how to restore it with
/// plain `xe` commands, without xenvault.
pub fn restore_notes(m: &crate::sink::VmMeta, kind: &str, files: &[String]) -> String {
    let mut files: Vec<&String> = files.iter().collect();
    files.dedup();
    let mut out = format!(
        "Backup of the VM \"{name}\" (uuid {uuid}), snapshot taken {time} UTC,\n\
         written by xenvault (job {job}, pool {pool}, run {run}).\n\n\
         COMPLETE marks a finished backup: a directory without it is incomplete and must not be used.\n\
         Check every file:   sha256sum -c SHA256SUMS\n\
         Metadata:           vm.cfg, vbd-N.cfg, vdi-N.cfg, vif-N.cfg (key=value), vm.json (full XAPI records)\n\n",
        name = m.vm_name,
        uuid = m.vm_uuid,
        time = crate::archive::layout::format_timestamp(m.snapshot_time),
        job = m.job,
        pool = m.pool,
        run = m.run_id,
    );
    let decompress =
        "Files ending in .zst or .gz are compressed: `zstd -d FILE` or `gunzip FILE` first.\n";
    if kind == "xva" {
        out.push_str("Restore the whole VM (a new VM; add preserve=true to keep its MAC addresses and identity):\n");
        for f in &files {
            let plain = f.trim_end_matches(".zst").trim_end_matches(".gz");
            out.push_str(&format!(
                "  xe vm-import filename={plain} sr-uuid=<target SR uuid>\n"
            ));
        }
        out.push_str(decompress);
    } else {
        out.push_str("Restore a disk into a new VDI (format=vhd for .vhd files, format=raw for .raw files):\n");
        for d in &m.disks {
            let file = files
                .iter()
                .find(|f| f.starts_with(&format!("disk-{}.", d.userdevice)))
                .map(|f| {
                    f.trim_end_matches(".zst")
                        .trim_end_matches(".gz")
                        .to_string()
                })
                .unwrap_or_else(|| format!("disk-{}.{kind}", d.userdevice));
            out.push_str(&format!(
                "  # disk {} \"{}\" ({} bytes, userdevice {}{})\n  \
                 xe vdi-create sr-uuid=<target SR uuid> name-label=\"{}\" virtual-size={} type=user\n  \
                 xe vdi-import uuid=<the new VDI uuid> filename={file} format={kind}\n",
                d.index,
                d.name,
                d.virtual_size,
                d.userdevice,
                if d.bootable { ", bootable" } else { "" },
                d.name,
                d.virtual_size,
            ));
        }
        out.push_str(decompress);
        out.push_str("Then attach each VDI to a VM with xe vbd-create (see vbd-N.cfg for the device and bootable flag).\n");
    }
    out
}

/// Reads a `key=value` file (as written here or by NAUbackup) into pairs.
pub fn parse_cfg(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn records() -> ExportRecords {
        let mut r = xenvault_formats::xva::tests_support::one_disk_vm(4 << 20);
        if let Value::Struct(m) = &mut r.vbds[0].1 {
            m.push(("userdevice".into(), Value::str("0")));
            m.push(("bootable".into(), Value::Bool(true)));
            m.push(("uuid".into(), Value::str("vbd-uuid")));
        }
        if let Value::Struct(m) = &mut r.srs[0].1 {
            m.push(("uuid".into(), Value::str("sr-uuid")));
        }
        if let Value::Struct(m) = &mut r.vdis[0].1 {
            m.push(("name_label".into(), Value::str("root\ndisk")));
        }
        r.vifs.push((
            "OpaqueRef:vif".into(),
            Value::record([
                ("device", Value::str("0")),
                ("network", Value::str("OpaqueRef:net")),
                ("MAC", Value::str("aa:bb:cc:dd:ee:ff")),
                ("other_config", Value::record([("a", Value::str("b"))])),
            ]),
        ));
        r.networks.push((
            "OpaqueRef:net".into(),
            Value::record([("name_label", Value::str("Pool-wide network"))]),
        ));
        r
    }

    #[test]
    fn cfg_files() {
        let r = records();
        let live = Value::record([
            ("name_label", Value::str("web")),
            ("power_state", Value::str("Running")),
        ]);
        let vm = vm_cfg("live-uuid", &r, &live);
        assert!(vm.contains("name_label=web\n"), "{vm}");
        assert!(vm.contains("orig_uuid=live-uuid\n"));
        assert!(vm.contains("power_state=Running\n"));
        let files = device_cfgs(&r, &[]);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["vbd-0.cfg", "vdi-0.cfg", "vif-0.cfg"]);
        assert!(files[0].1.contains("bootable=true\n"));
        assert!(files[1].1.contains("name_label=root\\ndisk\n"));
        assert!(files[1].1.contains("orig_sr_uuid=sr-uuid\n"));
        assert!(files[1].1.contains(&format!("virtual_size={}\n", 4 << 20)));
        assert!(
            files[2]
                .1
                .contains("network_name_label=Pool-wide network\n")
        );
        assert!(files[2].1.contains("other_config=a: b\n"));
        let pairs = parse_cfg(&files[2].1);
        assert!(pairs.contains(&("MAC".to_string(), "aa:bb:cc:dd:ee:ff".to_string())));
    }

    #[test]
    fn json_has_all_records() {
        let r = records();
        let text = vm_json(
            "live",
            &r,
            &Value::record([("name_label", Value::str("web"))]),
            &[],
        );
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["format"], VM_JSON_FORMAT);
        assert_eq!(j["vm_uuid"], "live");
        assert_eq!(j["VM"]["ref"], "OpaqueRef:vm");
        assert!(j["VBDs"]["OpaqueRef:vbd"].is_object());
        assert!(j["networks"]["OpaqueRef:net"].is_object());
        assert!(j["SRs"]["OpaqueRef:sr"].is_object());
        assert_eq!(j["source_VM"]["name_label"], "web");
    }
}
