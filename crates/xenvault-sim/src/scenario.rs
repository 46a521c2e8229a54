//! Pool scenarios: the TOML file format (`--scenario FILE`), the flags form
//! (`--vms N --disk-size SIZE --written PCT --hosts N`), and building the
//! initial pool from either: the pool, coordinator and members, local SRs
//! with PBDs, networks with PIFs and an NBD purpose, dom0 per host, default
//! templates, and VMs with disks (data written through the disk store), VIFs,
//! tags and power states.

use serde::Deserialize;
use xenvault_types::Value;

use crate::api::vdi::create_vdi;
use crate::api::vm::refresh_allowed_operations;
use crate::datamodel::NULL_REF;
use crate::db::Fields;
use crate::disk::CBT_BLOCK_SIZE;
use crate::error::ApiError;
use crate::pool::{Pool, now_value};

/// A byte size: an integer, or a string with a binary suffix (`512M`, `8G`, `1T`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// `8G`, `16MiB`, `1024`.
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, ScenarioError> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(t),
        }
    }
}

/// Parses `8G`, `512M`, `64K`, `1T`, `16MiB`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64, ScenarioError> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| {
        ScenarioError::Invalid(format!(
            "{s:?} is not a size; write e.g. 8G, 512M or 1048576"
        ))
    })?;
    if n.is_nan() || n < 0.0 {
        return Err(ScenarioError::Invalid(format!("size {s:?} is negative")));
    }
    Ok((n * mult as f64) as u64)
}

/// Parses `10%`, `10` or `0.5%` into a fraction 0..=1.
pub fn parse_percent(s: &str) -> Result<f64, ScenarioError> {
    let t = s.trim().trim_end_matches('%').trim();
    let p: f64 = t.parse().map_err(|_| {
        ScenarioError::Invalid(format!("{s:?} is not a percentage; write e.g. 10%"))
    })?;
    if !(0.0..=100.0).contains(&p) {
        return Err(ScenarioError::Invalid(format!(
            "{s:?} is not between 0% and 100%"
        )));
    }
    Ok(p / 100.0)
}

/// Why a scenario could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed.
    #[error("scenario file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or refers to something missing.
    #[error("scenario: {0}")]
    Invalid(String),
    /// Building the pool failed.
    #[error("scenario: building the pool failed: {0}")]
    Build(#[from] ApiError),
}

/// The whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Pool-level settings.
    #[serde(default)]
    pub pool: PoolSpec,
    /// Hosts; the first is the coordinator. Default: one host.
    #[serde(default)]
    pub hosts: Vec<HostSpec>,
    /// Local SRs. Default: one 1 TiB SR per host.
    #[serde(default)]
    pub srs: Vec<SrSpec>,
    /// Networks. Default: one network with the pool's NBD purpose.
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    /// VMs.
    #[serde(default)]
    pub vms: Vec<VmSpec>,
    /// Whether to add the default templates (default true).
    #[serde(default = "yes")]
    pub templates: bool,
}

fn yes() -> bool {
    true
}

/// `[pool]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// `name_label` of the pool.
    pub name: Option<String>,
    /// Seed for generated data (default 1).
    pub seed: Option<u64>,
}

/// `[[hosts]]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// `name_label`.
    pub name: Option<String>,
}

/// `[[srs]]`: a local SR (ext, thin).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrSpec {
    /// `name_label`.
    pub name: Option<String>,
    /// `physical_size`.
    pub size: Option<Size>,
    /// Index of the host it belongs to (default 0).
    #[serde(default)]
    pub host: usize,
    /// Whether it is `pool.default_SR` (default: the first SR).
    #[serde(default)]
    pub default: bool,
}

/// `[[networks]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// `name_label`.
    pub name: Option<String>,
    /// `purpose`: `["nbd"]`, `["insecure_nbd"]` or `[]`.
    #[serde(default)]
    pub purpose: Vec<String>,
}

/// `[[vms]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// `name_label`.
    pub name: String,
    /// `Running`, `Halted`, `Paused` or `Suspended` (default Halted).
    pub power_state: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Host index it runs on (default 0).
    #[serde(default)]
    pub host: usize,
    /// Memory (default 1G).
    pub memory: Option<Size>,
    /// vCPUs (default 1).
    pub vcpus: Option<u32>,
    /// `other_config` entries.
    #[serde(default)]
    pub other_config: std::collections::BTreeMap<String, String>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// VIFs.
    #[serde(default)]
    pub vifs: Vec<VifSpec>,
}

/// `[[vms.disks]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// `name_label` (default `<vm> disk <n>`).
    pub name: Option<String>,
    /// `virtual_size`.
    pub size: Size,
    /// Share of 64 KiB blocks written with seeded data (`10%`).
    pub written: Option<String>,
    /// SR index (default: the VM's host's first SR).
    pub sr: Option<usize>,
    /// Enable CBT.
    #[serde(default)]
    pub cbt: bool,
}

/// `[[vms.vifs]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VifSpec {
    /// Network index (default 0).
    #[serde(default)]
    pub network: usize,
}

/// The flags form of a scenario.
#[derive(Debug, Clone)]
pub struct FlagScenario {
    /// Number of VMs.
    pub vms: usize,
    /// Disk size per VM.
    pub disk_size: u64,
    /// Written share 0..=1.
    pub written: f64,
    /// Number of hosts.
    pub hosts: usize,
    /// NBD purpose of the network: `nbd`, `insecure_nbd` or empty.
    pub nbd_purpose: String,
}

impl Default for FlagScenario {
    fn default() -> Self {
        FlagScenario {
            vms: 3,
            disk_size: 64 << 20,
            written: 0.10,
            hosts: 1,
            nbd_purpose: "insecure_nbd".into(),
        }
    }
}

impl Scenario {
    /// Reads a TOML scenario file.
    pub fn from_file(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ScenarioError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The scenario the flags describe: VMs alternating running/halted, tags,
    /// one disk and one VIF each.
    pub fn from_flags(f: &FlagScenario) -> Scenario {
        let purpose = if f.nbd_purpose.is_empty() {
            vec![]
        } else {
            vec![f.nbd_purpose.clone()]
        };
        let written = format!("{}%", f.written * 100.0);
        let hosts = f.hosts.max(1);
        Scenario {
            pool: PoolSpec::default(),
            hosts: (0..hosts).map(|_| HostSpec::default()).collect(),
            srs: Vec::new(),
            networks: vec![NetworkSpec {
                name: Some("Pool-wide network associated with eth0".into()),
                purpose,
            }],
            vms: (0..f.vms)
                .map(|i| VmSpec {
                    name: format!("vm-{:02}", i + 1),
                    power_state: Some(if i % 2 == 0 { "Running" } else { "Halted" }.into()),
                    tags: match i % 3 {
                        0 => vec!["backup".into(), "prod".into()],
                        1 => vec!["backup".into()],
                        _ => vec!["test".into()],
                    },
                    host: i % hosts,
                    memory: None,
                    vcpus: None,
                    other_config: Default::default(),
                    disks: vec![DiskSpec {
                        name: None,
                        size: Size::Bytes(f.disk_size),
                        written: Some(written.clone()),
                        sr: None,
                        cbt: false,
                    }],
                    vifs: vec![VifSpec { network: 0 }],
                })
                .collect(),
            templates: true,
        }
    }
}

fn mac(seed: u64) -> String {
    let b = seed.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[3], b[4], b[5], b[6], b[7]
    )
}

/// Builds the initial pool from a scenario into an empty DB.
pub fn build(pool: &Pool, sc: &Scenario) -> Result<(), ScenarioError> {
    let seed = sc.pool.seed.unwrap_or(1);
    let host_specs: Vec<HostSpec> = if sc.hosts.is_empty() {
        vec![HostSpec::default()]
    } else {
        sc.hosts.clone()
    };
    let mut db = pool.db();
    // Hosts and dom0s.
    let mut hosts = Vec::new();
    for (i, h) in host_specs.iter().enumerate() {
        let name = h
            .name
            .clone()
            .unwrap_or_else(|| format!("xcp-host-{}", i + 1));
        let host = db.create(
            "host",
            [
                ("name_label", Value::str(name.clone())),
                ("hostname", Value::str(name.clone())),
                ("address", Value::str("127.0.0.1")),
                ("enabled", Value::Bool(true)),
                ("API_version_major", Value::Int(2)),
                ("API_version_minor", Value::Int(21)),
                ("API_version_vendor", Value::str("XenSource")),
                (
                    "software_version",
                    Value::Struct(vec![
                        ("product_brand".into(), Value::str("XCP-ng")),
                        ("product_version".into(), Value::str("8.3.0")),
                        ("platform_name".into(), Value::str("XCP")),
                        ("xapi".into(), Value::str("25.6")),
                        ("xapi_build".into(), Value::str("25.6.0")),
                        ("xen".into(), Value::str("4.17.5")),
                        ("hostname".into(), Value::str(name.clone())),
                        ("simulator".into(), Value::str("xapi-sim")),
                    ]),
                ),
                ("memory_overhead", Value::Int(0)),
            ],
        )?;
        let dom0 = db.create(
            "VM",
            [
                (
                    "name_label",
                    Value::str(format!("Control domain on host: {name}")),
                ),
                ("is_control_domain", Value::Bool(true)),
                ("power_state", Value::str("Running")),
                ("resident_on", Value::str(host.clone())),
                ("domid", Value::Int(0)),
                ("memory_static_max", Value::Int(4 << 30)),
                ("memory_dynamic_max", Value::Int(4 << 30)),
                ("memory_dynamic_min", Value::Int(4 << 30)),
                ("memory_static_min", Value::Int(4 << 30)),
                ("VCPUs_max", Value::Int(4)),
                ("VCPUs_at_startup", Value::Int(4)),
                ("domain_type", Value::str("pv")),
            ],
        )?;
        db.set("host", &host, "control_domain", Value::str(dom0))?;
        hosts.push(host);
    }
    // SRs.
    let sr_specs: Vec<SrSpec> = if sc.srs.is_empty() {
        (0..hosts.len())
            .map(|i| SrSpec {
                name: None,
                size: None,
                host: i,
                default: i == 0,
            })
            .collect()
    } else {
        sc.srs.clone()
    };
    let mut srs = Vec::new();
    let mut default_sr = None;
    for (i, s) in sr_specs.iter().enumerate() {
        let host = hosts.get(s.host).ok_or_else(|| {
            ScenarioError::Invalid(format!("SR {} names host {} of {}", i, s.host, hosts.len()))
        })?;
        let size = s
            .size
            .as_ref()
            .map(Size::bytes)
            .transpose()?
            .unwrap_or(1 << 40);
        let sr = db.create(
            "SR",
            [
                (
                    "name_label",
                    Value::str(s.name.clone().unwrap_or_else(|| "Local storage".into())),
                ),
                ("type", Value::str("ext")),
                ("content_type", Value::str("user")),
                ("shared", Value::Bool(false)),
                ("physical_size", Value::Int(size as i64)),
                (
                    "sm_config",
                    Value::Struct(vec![("devserial".into(), Value::str(format!("sim-{i}")))]),
                ),
                (
                    "allowed_operations",
                    Value::Array(
                        [
                            "vdi_create",
                            "vdi_destroy",
                            "vdi_snapshot",
                            "vdi_clone",
                            "vdi_enable_cbt",
                            "vdi_disable_cbt",
                            "vdi_data_destroy",
                            "vdi_list_changed_blocks",
                            "scan",
                        ]
                        .iter()
                        .map(|s| Value::str(*s))
                        .collect(),
                    ),
                ),
            ],
        )?;
        db.create(
            "PBD",
            [
                ("host", Value::str(host.clone())),
                ("SR", Value::str(sr.clone())),
                ("currently_attached", Value::Bool(true)),
                (
                    "device_config",
                    Value::Struct(vec![(
                        "device".into(),
                        Value::str(format!("/dev/sd{}", (b'a' + i as u8) as char)),
                    )]),
                ),
            ],
        )?;
        if s.default || default_sr.is_none() && i == 0 {
            default_sr = Some(sr.clone());
        }
        srs.push((sr, s.host));
    }
    // Networks and PIFs.
    let net_specs = if sc.networks.is_empty() {
        vec![NetworkSpec {
            name: None,
            purpose: vec!["insecure_nbd".into()],
        }]
    } else {
        sc.networks.clone()
    };
    let mut networks = Vec::new();
    for (i, n) in net_specs.iter().enumerate() {
        for p in &n.purpose {
            if !pool.dm.enum_has("network_purpose", p) {
                return Err(ScenarioError::Invalid(format!(
                    "network purpose {p:?} is not nbd or insecure_nbd"
                )));
            }
        }
        let net =
            db.create(
                "network",
                [
                    (
                        "name_label",
                        Value::str(n.name.clone().unwrap_or_else(|| {
                            format!("Pool-wide network associated with eth{i}")
                        })),
                    ),
                    ("bridge", Value::str(format!("xenbr{i}"))),
                    ("MTU", Value::Int(1500)),
                    (
                        "purpose",
                        Value::Array(n.purpose.iter().map(|p| Value::str(p.clone())).collect()),
                    ),
                ],
            )?;
        for (h, host) in hosts.iter().enumerate() {
            db.create(
                "PIF",
                [
                    ("device", Value::str(format!("eth{i}"))),
                    ("network", Value::str(net.clone())),
                    ("host", Value::str(host.clone())),
                    ("MAC", Value::str(mac(seed ^ ((h as u64) << 16) ^ i as u64))),
                    ("MTU", Value::Int(1500)),
                    ("currently_attached", Value::Bool(true)),
                    ("management", Value::Bool(i == 0)),
                    ("physical", Value::Bool(true)),
                    ("ip_configuration_mode", Value::str("Static")),
                    ("IP", Value::str("127.0.0.1")),
                    ("netmask", Value::str("255.0.0.0")),
                ],
            )?;
        }
        networks.push(net);
    }
    // The pool.
    db.create(
        "pool",
        [
            (
                "name_label",
                Value::str(
                    sc.pool
                        .name
                        .clone()
                        .unwrap_or_else(|| "xapi-sim pool".into()),
                ),
            ),
            ("master", Value::str(hosts[0].clone())),
            (
                "default_SR",
                Value::str(default_sr.clone().unwrap_or_else(|| NULL_REF.into())),
            ),
            (
                "suspend_image_SR",
                Value::str(default_sr.clone().unwrap_or_else(|| NULL_REF.into())),
            ),
            (
                "crash_dump_SR",
                Value::str(default_sr.unwrap_or_else(|| NULL_REF.into())),
            ),
        ],
    )?;
    // Default templates.
    if sc.templates {
        for name in [
            "Debian Bookworm 12",
            "Windows Server 2022 (64-bit)",
            "Other install media",
        ] {
            let t = db.create(
                "VM",
                [
                    ("name_label", Value::str(name)),
                    ("is_a_template", Value::Bool(true)),
                    ("is_default_template", Value::Bool(true)),
                    ("memory_static_max", Value::Int(2 << 30)),
                    ("memory_dynamic_max", Value::Int(2 << 30)),
                    ("memory_dynamic_min", Value::Int(2 << 30)),
                    ("memory_static_min", Value::Int(1 << 30)),
                    ("VCPUs_max", Value::Int(2)),
                    ("VCPUs_at_startup", Value::Int(2)),
                    ("HVM_boot_policy", Value::str("BIOS order")),
                    ("domain_type", Value::str("hvm")),
                    (
                        "other_config",
                        Value::Struct(vec![("default_template".into(), Value::str("true"))]),
                    ),
                ],
            )?;
            refresh_allowed_operations(&mut db, &t)?;
        }
    }
    // VMs.
    for (vi, v) in sc.vms.iter().enumerate() {
        let state = v.power_state.clone().unwrap_or_else(|| "Halted".into());
        if !pool.dm.enum_has("vm_power_state", &state) {
            return Err(ScenarioError::Invalid(format!(
                "VM {:?}: power_state {state:?} is not Halted, Running, Paused or Suspended",
                v.name
            )));
        }
        let host = hosts
            .get(v.host)
            .ok_or_else(|| {
                ScenarioError::Invalid(format!(
                    "VM {:?} names host {} of {}",
                    v.name,
                    v.host,
                    hosts.len()
                ))
            })?
            .clone();
        let live = state == "Running" || state == "Paused";
        let mem = v
            .memory
            .as_ref()
            .map(Size::bytes)
            .transpose()?
            .unwrap_or(1 << 30) as i64;
        let vcpus = i64::from(v.vcpus.unwrap_or(1));
        let vm = db.create(
            "VM",
            [
                ("name_label", Value::str(v.name.clone())),
                ("name_description", Value::str("created by xapi-sim")),
                ("power_state", Value::str(state.clone())),
                (
                    "tags",
                    Value::Array(v.tags.iter().map(|t| Value::str(t.clone())).collect()),
                ),
                ("memory_static_max", Value::Int(mem)),
                ("memory_dynamic_max", Value::Int(mem)),
                ("memory_dynamic_min", Value::Int(mem)),
                ("memory_static_min", Value::Int(mem.min(512 << 20))),
                ("memory_target", Value::Int(mem)),
                ("VCPUs_max", Value::Int(vcpus)),
                ("VCPUs_at_startup", Value::Int(vcpus)),
                ("HVM_boot_policy", Value::str("BIOS order")),
                (
                    "HVM_boot_params",
                    Value::Struct(vec![("order".into(), Value::str("cd"))]),
                ),
                ("domain_type", Value::str("hvm")),
                (
                    "platform",
                    Value::Struct(vec![(
                        "device-model".into(),
                        Value::str("qemu-upstream-compat"),
                    )]),
                ),
                (
                    "resident_on",
                    Value::str(if live { host.clone() } else { NULL_REF.into() }),
                ),
                ("domid", Value::Int(if live { vi as i64 + 1 } else { -1 })),
                ("actions_after_shutdown", Value::str("destroy")),
                ("actions_after_reboot", Value::str("restart")),
                ("actions_after_crash", Value::str("restart")),
                (
                    "other_config",
                    Value::Struct(
                        v.other_config
                            .iter()
                            .map(|(k, x)| (k.clone(), Value::str(x.clone())))
                            .collect(),
                    ),
                ),
            ],
        )?;
        let host_srs: Vec<&String> = srs
            .iter()
            .filter(|(_, h)| *h == v.host)
            .map(|(s, _)| s)
            .collect();
        for (di, d) in v.disks.iter().enumerate() {
            let sr = match d.sr {
                Some(i) => srs.get(i).map(|(s, _)| s.clone()).ok_or_else(|| {
                    ScenarioError::Invalid(format!("VM {:?} disk {di} names SR {i}", v.name))
                })?,
                None => host_srs
                    .first()
                    .map(|s| (*s).clone())
                    .or_else(|| srs.first().map(|(s, _)| s.clone()))
                    .ok_or_else(|| ScenarioError::Invalid("no SR for the disks".into()))?,
            };
            let size = d.size.bytes()?;
            let vdi = create_vdi(
                pool,
                &mut db,
                vec![
                    (
                        "name_label".into(),
                        Value::str(
                            d.name
                                .clone()
                                .unwrap_or_else(|| format!("{} disk {di}", v.name)),
                        ),
                    ),
                    ("SR".into(), Value::str(sr)),
                    ("virtual_size".into(), Value::Int(size as i64)),
                    ("type".into(), Value::str("user")),
                ],
            )?;
            let vdi_rec = db.get("VDI", &vdi)?.clone();
            let uuid = vdi_rec.str_of("uuid").to_string();
            if let Some(w) = &d.written {
                let share = parse_percent(w)?;
                let blocks = (vdi_rec.int_of("virtual_size") as u64).div_ceil(CBT_BLOCK_SIZE);
                let count = (blocks as f64 * share).round() as u64;
                let disk_seed = seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((vi as u64) << 8 | di as u64);
                pool.disks
                    .guest_write(&uuid, disk_seed, count)
                    .map_err(|e| ScenarioError::Build(crate::api::disk_err(e)))?;
            }
            if d.cbt {
                pool.disks
                    .enable_cbt(&uuid)
                    .map_err(|e| ScenarioError::Build(crate::api::disk_err(e)))?;
                db.set("VDI", &vdi, "cbt_enabled", Value::Bool(true))?;
            }
            db.create(
                "VBD",
                [
                    ("VM", Value::str(vm.clone())),
                    ("VDI", Value::str(vdi)),
                    ("userdevice", Value::str(di.to_string())),
                    (
                        "device",
                        Value::str(format!("xvd{}", (b'a' + di as u8) as char)),
                    ),
                    ("bootable", Value::Bool(di == 0)),
                    ("mode", Value::str("RW")),
                    ("type", Value::str("Disk")),
                    ("unpluggable", Value::Bool(true)),
                    ("currently_attached", Value::Bool(state != "Halted")),
                ],
            )?;
        }
        for (ni, n) in v.vifs.iter().enumerate() {
            let net = networks.get(n.network).ok_or_else(|| {
                ScenarioError::Invalid(format!(
                    "VM {:?} VIF {ni} names network {}",
                    v.name, n.network
                ))
            })?;
            db.create(
                "VIF",
                [
                    ("VM", Value::str(vm.clone())),
                    ("network", Value::str(net.clone())),
                    ("device", Value::str(ni.to_string())),
                    (
                        "MAC",
                        Value::str(mac(seed.wrapping_mul(31) ^ ((vi as u64) << 8) ^ ni as u64)),
                    ),
                    ("MTU", Value::Int(1500)),
                    ("currently_attached", Value::Bool(state != "Halted")),
                ],
            )?;
        }
        refresh_allowed_operations(&mut db, &vm)?;
        let _ = now_value();
    }
    for sr in db.all("SR") {
        crate::api::storage::refresh_sr(pool, &mut db, &sr);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_percent("10%").unwrap(), 0.1);
        assert!(parse_percent("120%").is_err());
    }

    #[test]
    fn scenario_toml_parses() {
        let sc: Scenario = toml::from_str(
            r#"
            [pool]
            name = "lab"
            [[hosts]]
            name = "a"
            [[hosts]]
            [[srs]]
            size = "10G"
            [[networks]]
            purpose = ["nbd"]
            [[vms]]
            name = "web"
            power_state = "Running"
            tags = ["prod"]
            [[vms.disks]]
            size = "16M"
            written = "25%"
            cbt = true
            [[vms.vifs]]
            network = 0
            "#,
        )
        .unwrap();
        assert_eq!(sc.hosts.len(), 2);
        assert_eq!(sc.vms[0].disks[0].size.bytes().unwrap(), 16 << 20);
        assert!(toml::from_str::<Scenario>("[[vms]]\nname='x'\nbogus=1\n").is_err());
    }
}
