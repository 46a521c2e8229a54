//! Typed XAPI records and enums: pool, host, SR, PBD, VM, VBD, VDI, VIF,
//! network, task and `vdi_nbd_server_info` — the fields a backup tool uses
//! (`docs/xapi-notes.md`, "Wire protocol"; xapi-facts §2.1) — plus the
//! constructor records for `VBD.create` and `VDI.create`.
//!
//! Every record field is `#[serde(default)]`: a record from an older host
//! that lacks a newer field (e.g. `VDI.cbt_enabled` before XS 7.3) still
//! decodes, with the field at its default (false, empty, null ref, epoch,
//! `Unknown("")` for enums). Enums keep unknown values in `Unknown(String)`.
//!
//! The structs are declared with `xapi_record!`, which also produces the
//! field list the datamodel conformance test checks; [`record_specs`],
//! [`constructor_specs`] and [`enum_specs`] are the registries.

use std::collections::BTreeMap;
use std::fmt;

use crate::event::Snapshot;
use crate::model::{
    DateTime, EnumSpec, Record, RecordSpec, Ref, XapiEnum, class_markers, xapi_enum, xapi_record,
};

/// A string-to-string map (`other_config`, `sm_config`, …).
pub type StringMap = BTreeMap<String, String>;

class_markers! {
    /// The `VTPM` class (refs only).
    Vtpm = "VTPM";
    /// The `VUSB` class (refs only).
    Vusb = "VUSB";
    /// The `VGPU` class (refs only).
    Vgpu = "VGPU";
    /// The `VM_guest_metrics` class (refs only).
    VmGuestMetrics = "VM_guest_metrics";
    /// The `VM_metrics` class (refs only).
    VmMetrics = "VM_metrics";
    /// The `host_metrics` class (refs only).
    HostMetrics = "host_metrics";
    /// The `PIF` class (refs only).
    Pif = "PIF";
    /// The `message` class (refs only).
    Message = "message";
}

/// A VM ref.
pub type VmRef = Ref<Vm>;
/// A VBD ref.
pub type VbdRef = Ref<Vbd>;
/// A VDI ref.
pub type VdiRef = Ref<Vdi>;
/// A VIF ref.
pub type VifRef = Ref<Vif>;
/// An SR ref.
pub type SrRef = Ref<Sr>;
/// A PBD ref.
pub type PbdRef = Ref<Pbd>;
/// A host ref.
pub type HostRef = Ref<Host>;
/// A pool ref.
pub type PoolRef = Ref<Pool>;
/// A network ref.
pub type NetworkRef = Ref<Network>;
/// A task ref.
pub type TaskRef = Ref<Task>;
/// A message ref.
pub type MessageRef = Ref<Message>;

xapi_enum! {
    /// The power state of a VM (`VM.power_state`).
    pub enum PowerState in "vm_power_state" {
        /// `Halted`
        Halted = "Halted",
        /// `Paused`
        Paused = "Paused",
        /// `Running`
        Running = "Running",
        /// `Suspended`
        Suspended = "Suspended",
    }
}

xapi_enum! {
    /// An operation on a VM (`allowed_operations`, `blocked_operations` keys).
    pub enum VmOperation in "vm_operations" {
        /// `snapshot`
        Snapshot = "snapshot",
        /// `clone`
        Clone = "clone",
        /// `copy`
        Copy = "copy",
        /// `create_template`
        CreateTemplate = "create_template",
        /// `revert`
        Revert = "revert",
        /// `checkpoint`
        Checkpoint = "checkpoint",
        /// `snapshot_with_quiesce`
        SnapshotWithQuiesce = "snapshot_with_quiesce",
        /// `provision`
        Provision = "provision",
        /// `start`
        Start = "start",
        /// `start_on`
        StartOn = "start_on",
        /// `pause`
        Pause = "pause",
        /// `unpause`
        Unpause = "unpause",
        /// `clean_shutdown`
        CleanShutdown = "clean_shutdown",
        /// `clean_reboot`
        CleanReboot = "clean_reboot",
        /// `hard_shutdown`
        HardShutdown = "hard_shutdown",
        /// `power_state_reset`
        PowerStateReset = "power_state_reset",
        /// `hard_reboot`
        HardReboot = "hard_reboot",
        /// `suspend`
        Suspend = "suspend",
        /// `csvm`
        Csvm = "csvm",
        /// `resume`
        Resume = "resume",
        /// `resume_on`
        ResumeOn = "resume_on",
        /// `pool_migrate`
        PoolMigrate = "pool_migrate",
        /// `migrate_send`
        MigrateSend = "migrate_send",
        /// `get_boot_record`
        GetBootRecord = "get_boot_record",
        /// `send_sysrq`
        SendSysrq = "send_sysrq",
        /// `send_trigger`
        SendTrigger = "send_trigger",
        /// `query_services`
        QueryServices = "query_services",
        /// `shutdown`
        Shutdown = "shutdown",
        /// `call_plugin`
        CallPlugin = "call_plugin",
        /// `changing_memory_live`
        ChangingMemoryLive = "changing_memory_live",
        /// `awaiting_memory_live`
        AwaitingMemoryLive = "awaiting_memory_live",
        /// `changing_dynamic_range`
        ChangingDynamicRange = "changing_dynamic_range",
        /// `changing_static_range`
        ChangingStaticRange = "changing_static_range",
        /// `changing_memory_limits`
        ChangingMemoryLimits = "changing_memory_limits",
        /// `changing_shadow_memory`
        ChangingShadowMemory = "changing_shadow_memory",
        /// `changing_shadow_memory_live`
        ChangingShadowMemoryLive = "changing_shadow_memory_live",
        /// `changing_VCPUs`
        ChangingVcpus = "changing_VCPUs",
        /// `changing_VCPUs_live`
        ChangingVcpusLive = "changing_VCPUs_live",
        /// `changing_NVRAM`
        ChangingNvram = "changing_NVRAM",
        /// `assert_operation_valid`
        AssertOperationValid = "assert_operation_valid",
        /// `data_source_op`
        DataSourceOp = "data_source_op",
        /// `update_allowed_operations`
        UpdateAllowedOperations = "update_allowed_operations",
        /// `make_into_template`
        MakeIntoTemplate = "make_into_template",
        /// `import`
        Import = "import",
        /// `export`
        Export = "export",
        /// `metadata_export`
        MetadataExport = "metadata_export",
        /// `reverting`
        Reverting = "reverting",
        /// `destroy`
        Destroy = "destroy",
        /// `create_vtpm`
        CreateVtpm = "create_vtpm",
    }
}

xapi_enum! {
    /// The domain type of a VM.
    pub enum DomainType in "domain_type" {
        /// `hvm`
        Hvm = "hvm",
        /// `pv`
        Pv = "pv",
        /// `pv_in_pvh`
        PvInPvh = "pv_in_pvh",
        /// `pvh`
        Pvh = "pvh",
        /// `unspecified`
        Unspecified = "unspecified",
    }
}

xapi_enum! {
    /// Whether a VBD is read-only or read-write.
    pub enum VbdMode in "vbd_mode" {
        /// `RO`
        Ro = "RO",
        /// `RW`
        Rw = "RW",
    }
}

xapi_enum! {
    /// The kind of device a VBD is.
    pub enum VbdType in "vbd_type" {
        /// `CD`
        Cd = "CD",
        /// `Disk`
        Disk = "Disk",
        /// `Floppy`
        Floppy = "Floppy",
    }
}

xapi_enum! {
    /// An operation on a VBD.
    pub enum VbdOperation in "vbd_operations" {
        /// `attach`
        Attach = "attach",
        /// `eject`
        Eject = "eject",
        /// `insert`
        Insert = "insert",
        /// `plug`
        Plug = "plug",
        /// `unplug`
        Unplug = "unplug",
        /// `unplug_force`
        UnplugForce = "unplug_force",
        /// `pause`
        Pause = "pause",
        /// `unpause`
        Unpause = "unpause",
    }
}

xapi_enum! {
    /// The type of a VDI (`cbt_metadata` after `VDI.data_destroy`).
    pub enum VdiType in "vdi_type" {
        /// `system`
        System = "system",
        /// `user`
        User = "user",
        /// `ephemeral`
        Ephemeral = "ephemeral",
        /// `suspend`
        Suspend = "suspend",
        /// `crashdump`
        Crashdump = "crashdump",
        /// `ha_statefile`
        HaStatefile = "ha_statefile",
        /// `metadata`
        Metadata = "metadata",
        /// `redo_log`
        RedoLog = "redo_log",
        /// `rrd`
        Rrd = "rrd",
        /// `pvs_cache`
        PvsCache = "pvs_cache",
        /// `cbt_metadata`
        CbtMetadata = "cbt_metadata",
    }
}

xapi_enum! {
    /// An operation on a VDI.
    pub enum VdiOperation in "vdi_operations" {
        /// `clone`
        Clone = "clone",
        /// `copy`
        Copy = "copy",
        /// `resize`
        Resize = "resize",
        /// `resize_online`
        ResizeOnline = "resize_online",
        /// `snapshot`
        Snapshot = "snapshot",
        /// `mirror`
        Mirror = "mirror",
        /// `destroy`
        Destroy = "destroy",
        /// `forget`
        Forget = "forget",
        /// `update`
        Update = "update",
        /// `force_unlock`
        ForceUnlock = "force_unlock",
        /// `generate_config`
        GenerateConfig = "generate_config",
        /// `enable_cbt`
        EnableCbt = "enable_cbt",
        /// `disable_cbt`
        DisableCbt = "disable_cbt",
        /// `data_destroy`
        DataDestroy = "data_destroy",
        /// `list_changed_blocks`
        ListChangedBlocks = "list_changed_blocks",
        /// `set_on_boot`
        SetOnBoot = "set_on_boot",
        /// `blocked`
        Blocked = "blocked",
    }
}

xapi_enum! {
    /// What happens to a VDI when its VM boots.
    pub enum OnBoot in "on_boot" {
        /// `reset`
        Reset = "reset",
        /// `persist`
        Persist = "persist",
    }
}

xapi_enum! {
    /// An operation on an SR.
    pub enum StorageOperation in "storage_operations" {
        /// `scan`
        Scan = "scan",
        /// `destroy`
        Destroy = "destroy",
        /// `forget`
        Forget = "forget",
        /// `plug`
        Plug = "plug",
        /// `unplug`
        Unplug = "unplug",
        /// `update`
        Update = "update",
        /// `vdi_create`
        VdiCreate = "vdi_create",
        /// `vdi_introduce`
        VdiIntroduce = "vdi_introduce",
        /// `vdi_destroy`
        VdiDestroy = "vdi_destroy",
        /// `vdi_resize`
        VdiResize = "vdi_resize",
        /// `vdi_clone`
        VdiClone = "vdi_clone",
        /// `vdi_snapshot`
        VdiSnapshot = "vdi_snapshot",
        /// `vdi_mirror`
        VdiMirror = "vdi_mirror",
        /// `vdi_enable_cbt`
        VdiEnableCbt = "vdi_enable_cbt",
        /// `vdi_disable_cbt`
        VdiDisableCbt = "vdi_disable_cbt",
        /// `vdi_data_destroy`
        VdiDataDestroy = "vdi_data_destroy",
        /// `vdi_list_changed_blocks`
        VdiListChangedBlocks = "vdi_list_changed_blocks",
        /// `vdi_set_on_boot`
        VdiSetOnBoot = "vdi_set_on_boot",
        /// `pbd_create`
        PbdCreate = "pbd_create",
        /// `pbd_destroy`
        PbdDestroy = "pbd_destroy",
    }
}

xapi_enum! {
    /// The status of a task.
    pub enum TaskStatus in "task_status_type" {
        /// `pending`
        Pending = "pending",
        /// `success`
        Success = "success",
        /// `failure`
        Failure = "failure",
        /// `cancelling`
        Cancelling = "cancelling",
        /// `cancelled`
        Cancelled = "cancelled",
    }
}

xapi_enum! {
    /// An operation on a task.
    pub enum TaskOperation in "task_allowed_operations" {
        /// `cancel`
        Cancel = "cancel",
        /// `destroy`
        Destroy = "destroy",
    }
}

xapi_enum! {
    /// A purpose of a network (NBD access).
    pub enum NetworkPurpose in "network_purpose" {
        /// `nbd`
        Nbd = "nbd",
        /// `insecure_nbd`
        InsecureNbd = "insecure_nbd",
    }
}

xapi_enum! {
    /// The locking mode of a VIF.
    pub enum VifLockingMode in "vif_locking_mode" {
        /// `network_default`
        NetworkDefault = "network_default",
        /// `locked`
        Locked = "locked",
        /// `unlocked`
        Unlocked = "unlocked",
        /// `disabled`
        Disabled = "disabled",
    }
}

xapi_enum! {
    /// What happened to an object in an event.
    pub enum EventOperation in "event_operation" {
        /// `add`
        Add = "add",
        /// `del`
        Del = "del",
        /// `mod`
        Mod = "mod",
    }
}

xapi_enum! {
    /// The class of object a message is about (`message.create`).
    pub enum MessageClass in "cls" {
        /// `VM`
        Vm = "VM",
        /// `Host`
        Host = "Host",
        /// `SR`
        Sr = "SR",
        /// `Pool`
        Pool = "Pool",
        /// `VMPP`
        Vmpp = "VMPP",
        /// `VMSS`
        Vmss = "VMSS",
        /// `PVS_proxy`
        PvsProxy = "PVS_proxy",
        /// `VDI`
        Vdi = "VDI",
        /// `Certificate`
        Certificate = "Certificate",
    }
}

xapi_record! {
    /// A VM record (also templates, snapshots and dom0: filter with
    /// [`Vm::is_regular_vm`]).
    #[derive(Debug)]
    pub struct Vm in "VM", fields vm_fields {
        /// The VM's uuid.
        "uuid" => uuid: String,
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// Power state.
        "power_state" => power_state: PowerState,
        /// True for templates, and for snapshots.
        "is_a_template" => is_a_template: bool,
        /// True for the templates shipped with XAPI.
        "is_default_template" => is_default_template: bool,
        /// True for snapshots.
        "is_a_snapshot" => is_a_snapshot: bool,
        /// True for dom0 (and driver domains).
        "is_control_domain" => is_control_domain: bool,
        /// For a snapshot: the VM it was taken of.
        "snapshot_of" => snapshot_of: VmRef,
        /// The snapshots of this VM.
        "snapshots" => snapshots: Vec<VmRef>,
        /// When this snapshot was taken (epoch if not a snapshot).
        "snapshot_time" => snapshot_time: DateTime,
        /// `power-state-at-snapshot`, `disk-snapshot-type`, …
        "snapshot_info" => snapshot_info: StringMap,
        /// The parent in the snapshot tree.
        "parent" => parent: VmRef,
        /// The children in the snapshot tree.
        "children" => children: Vec<VmRef>,
        /// Virtual block devices.
        "VBDs" => vbds: Vec<VbdRef>,
        /// Virtual network interfaces.
        "VIFs" => vifs: Vec<VifRef>,
        /// Virtual TPMs.
        "VTPMs" => vtpms: Vec<Ref<Vtpm>>,
        /// Virtual USB devices (they block snapshots: `VM_HAS_VUSBS`).
        "VUSBs" => vusbs: Vec<Ref<Vusb>>,
        /// Virtual GPUs.
        "VGPUs" => vgpus: Vec<Ref<Vgpu>>,
        /// The memory image of a suspended VM or checkpoint.
        "suspend_VDI" => suspend_vdi: VdiRef,
        /// Where the memory image goes on suspend.
        "suspend_SR" => suspend_sr: SrRef,
        /// Tags.
        "tags" => tags: Vec<String>,
        /// Free-form configuration (xenvault marks its temporary objects here).
        "other_config" => other_config: StringMap,
        /// Operations blocked, with the reason returned to callers.
        "blocked_operations" => blocked_operations: BTreeMap<VmOperation, String>,
        /// Operations allowed now (advisory).
        "allowed_operations" => allowed_operations: Vec<VmOperation>,
        /// Running operations by task.
        "current_operations" => current_operations: BTreeMap<String, VmOperation>,
        /// The host the VM runs on (null when halted).
        "resident_on" => resident_on: HostRef,
        /// The preferred host.
        "affinity" => affinity: HostRef,
        /// Memory, bytes.
        "memory_static_max" => memory_static_max: i64,
        /// Memory, bytes.
        "memory_static_min" => memory_static_min: i64,
        /// Memory, bytes.
        "memory_dynamic_max" => memory_dynamic_max: i64,
        /// Memory, bytes.
        "memory_dynamic_min" => memory_dynamic_min: i64,
        /// Maximum vCPUs.
        "VCPUs_max" => vcpus_max: i64,
        /// vCPUs at boot.
        "VCPUs_at_startup" => vcpus_at_startup: i64,
        /// HVM boot policy (deprecated in favour of `domain_type`).
        "HVM_boot_policy" => hvm_boot_policy: String,
        /// HVM boot parameters.
        "HVM_boot_params" => hvm_boot_params: StringMap,
        /// Platform flags.
        "platform" => platform: StringMap,
        /// UEFI variables.
        "NVRAM" => nvram: StringMap,
        /// Domain type.
        "domain_type" => domain_type: DomainType,
        /// Xenstore keys written for the guest.
        "xenstore_data" => xenstore_data: StringMap,
        /// Guest metrics.
        "guest_metrics" => guest_metrics: Ref<VmGuestMetrics>,
        /// Metrics.
        "metrics" => metrics: Ref<VmMetrics>,
        /// Whether the Windows update device is present.
        "has_vendor_device" => has_vendor_device: bool,
        /// User version.
        "user_version" => user_version: i64,
        /// Domain id when running, else -1.
        "domid" => domid: i64,
        /// PV bootloader.
        "PV_bootloader" => pv_bootloader: String,
        /// PV kernel arguments.
        "PV_args" => pv_args: String,
    }
}

impl Vm {
    /// A VM a backup selects: not a template, snapshot or control domain.
    pub fn is_regular_vm(&self) -> bool {
        !self.is_a_template && !self.is_a_snapshot && !self.is_control_domain
    }
}

xapi_record! {
    /// A VBD record: a VM's attachment of a VDI (or an empty CD drive).
    #[derive(Debug)]
    pub struct Vbd in "VBD", fields vbd_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// The VM.
        "VM" => vm: VmRef,
        /// The VDI (null when empty).
        "VDI" => vdi: VdiRef,
        /// Device name in the guest (`xvda`), set when attached.
        "device" => device: String,
        /// Position (`0`, `1`, …).
        "userdevice" => userdevice: String,
        /// Bootable.
        "bootable" => bootable: bool,
        /// RO or RW.
        "mode" => mode: VbdMode,
        /// Disk, CD or Floppy.
        "type" => type_: VbdType,
        /// True for an empty CD drive.
        "empty" => empty: bool,
        /// Plugged now.
        "currently_attached" => currently_attached: bool,
        /// Hot-unpluggable.
        "unpluggable" => unpluggable: bool,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Operations allowed now.
        "allowed_operations" => allowed_operations: Vec<VbdOperation>,
        /// Running operations by task.
        "current_operations" => current_operations: BTreeMap<String, VbdOperation>,
    }
}

xapi_record! {
    /// A VDI record: a virtual disk.
    #[derive(Debug)]
    pub struct Vdi in "VDI", fields vdi_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// The SR it lives on.
        "SR" => sr: SrRef,
        /// Its VBDs.
        "VBDs" => vbds: Vec<VbdRef>,
        /// Size in bytes.
        "virtual_size" => virtual_size: i64,
        /// Space used on the SR, bytes.
        "physical_utilisation" => physical_utilisation: i64,
        /// Type (`cbt_metadata` after `data_destroy`).
        "type" => type_: VdiType,
        /// Shareable between VMs.
        "sharable" => sharable: bool,
        /// Read-only.
        "read_only" => read_only: bool,
        /// False for hidden VHD parents: skip those.
        "managed" => managed: bool,
        /// The storage backend lost it.
        "missing" => missing: bool,
        /// SR-specific location.
        "location" => location: String,
        /// SM data (`vhd-parent`, `image-format`).
        "sm_config" => sm_config: StringMap,
        /// Xenstore data.
        "xenstore_data" => xenstore_data: StringMap,
        /// True for snapshot VDIs.
        "is_a_snapshot" => is_a_snapshot: bool,
        /// For a snapshot: the VDI it was taken of.
        "snapshot_of" => snapshot_of: VdiRef,
        /// Snapshots of this VDI.
        "snapshots" => snapshots: Vec<VdiRef>,
        /// When the snapshot was taken.
        "snapshot_time" => snapshot_time: DateTime,
        /// Changed block tracking is on.
        "cbt_enabled" => cbt_enabled: bool,
        /// `persist` or `reset`.
        "on_boot" => on_boot: OnBoot,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Tags.
        "tags" => tags: Vec<String>,
        /// Operations allowed now.
        "allowed_operations" => allowed_operations: Vec<VdiOperation>,
        /// Running operations by task.
        "current_operations" => current_operations: BTreeMap<String, VdiOperation>,
        /// Locked by the storage layer.
        "storage_lock" => storage_lock: bool,
    }
}

xapi_record! {
    /// An SR record: a storage repository.
    #[derive(Debug)]
    pub struct Sr in "SR", fields sr_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// SM type (`ext`, `nfs`, `lvm`, `iso`, `udev`, …).
        "type" => type_: String,
        /// Content type (`user`, `iso`, …).
        "content_type" => content_type: String,
        /// Shared between hosts.
        "shared" => shared: bool,
        /// Size in bytes.
        "physical_size" => physical_size: i64,
        /// Used, bytes.
        "physical_utilisation" => physical_utilisation: i64,
        /// Sum of virtual sizes, bytes.
        "virtual_allocation" => virtual_allocation: i64,
        /// Its PBDs.
        "PBDs" => pbds: Vec<PbdRef>,
        /// Its VDIs.
        "VDIs" => vdis: Vec<VdiRef>,
        /// SM data.
        "sm_config" => sm_config: StringMap,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Tags.
        "tags" => tags: Vec<String>,
        /// Operations allowed now.
        "allowed_operations" => allowed_operations: Vec<StorageOperation>,
        /// Running operations by task.
        "current_operations" => current_operations: BTreeMap<String, StorageOperation>,
    }
}

xapi_record! {
    /// A PBD record: an SR's connection to a host. `device_config` may hold
    /// secrets (CIFS passwords, CHAP secrets): Debug redacts those values.
    pub struct Pbd in "PBD", fields pbd_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// The host.
        "host" => host: HostRef,
        /// The SR.
        "SR" => sr: SrRef,
        /// Plugged now.
        "currently_attached" => currently_attached: bool,
        /// Device configuration (may hold secrets such as CIFS passwords).
        "device_config" => device_config: StringMap,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
    }
}

impl fmt::Debug for Pbd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let device_config: BTreeMap<&str, &str> = self
            .device_config
            .iter()
            .map(|(k, v)| {
                let key = k.to_ascii_lowercase();
                let secret = key.contains("password") || key.contains("secret");
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("Pbd")
            .field("uuid", &self.uuid)
            .field("host", &self.host)
            .field("sr", &self.sr)
            .field("currently_attached", &self.currently_attached)
            .field("device_config", &device_config)
            .field("other_config", &self.other_config)
            .finish()
    }
}

xapi_record! {
    /// A host record.
    #[derive(Debug)]
    pub struct Host in "host", fields host_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// Management address (IPv4, IPv6 or name).
        "address" => address: String,
        /// Host name.
        "hostname" => hostname: String,
        /// API major version.
        "API_version_major" => api_version_major: i64,
        /// API minor version.
        "API_version_minor" => api_version_minor: i64,
        /// API vendor.
        "API_version_vendor" => api_version_vendor: String,
        /// Software versions (`product_version`, `xapi`, …).
        "software_version" => software_version: StringMap,
        /// Enabled (not in maintenance).
        "enabled" => enabled: bool,
        /// VMs running here.
        "resident_VMs" => resident_vms: Vec<VmRef>,
        /// Its PBDs.
        "PBDs" => pbds: Vec<PbdRef>,
        /// Its PIFs.
        "PIFs" => pifs: Vec<Ref<Pif>>,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Metrics.
        "metrics" => metrics: Ref<HostMetrics>,
        /// Edition.
        "edition" => edition: String,
        /// Port 80 closed (xapi 22.27+).
        "https_only" => https_only: bool,
    }
}

xapi_record! {
    /// The pool record (one per pool).
    #[derive(Debug)]
    pub struct Pool in "pool", fields pool_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// The coordinator host.
        "master" => master: HostRef,
        /// Default SR.
        "default_SR" => default_sr: SrRef,
        /// SR for suspend images.
        "suspend_image_SR" => suspend_image_sr: SrRef,
        /// SR for crash dumps.
        "crash_dump_SR" => crash_dump_sr: SrRef,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Tags.
        "tags" => tags: Vec<String>,
        /// HA enabled.
        "ha_enabled" => ha_enabled: bool,
        /// Licence restrictions (`restrict_cbt`, …).
        "restrictions" => restrictions: StringMap,
    }
}

xapi_record! {
    /// A network record.
    #[derive(Debug)]
    pub struct Network in "network", fields network_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// Bridge name.
        "bridge" => bridge: String,
        /// MTU.
        "MTU" => mtu: i64,
        /// Its PIFs.
        "PIFs" => pifs: Vec<Ref<Pif>>,
        /// Its VIFs.
        "VIFs" => vifs: Vec<VifRef>,
        /// Purposes (`nbd`, `insecure_nbd`).
        "purpose" => purpose: Vec<NetworkPurpose>,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Tags.
        "tags" => tags: Vec<String>,
        /// Managed by XAPI.
        "managed" => managed: bool,
    }
}

xapi_record! {
    /// A VIF record: a VM's network interface.
    #[derive(Debug)]
    pub struct Vif in "VIF", fields vif_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Device number.
        "device" => device: String,
        /// The network.
        "network" => network: NetworkRef,
        /// The VM.
        "VM" => vm: VmRef,
        /// MAC address.
        "MAC" => mac: String,
        /// MTU.
        "MTU" => mtu: i64,
        /// The MAC was generated.
        "MAC_autogenerated" => mac_autogenerated: bool,
        /// Plugged now.
        "currently_attached" => currently_attached: bool,
        /// Locking mode.
        "locking_mode" => locking_mode: VifLockingMode,
        /// Allowed IPv4 addresses.
        "ipv4_allowed" => ipv4_allowed: Vec<String>,
        /// Allowed IPv6 addresses.
        "ipv6_allowed" => ipv6_allowed: Vec<String>,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// QoS algorithm.
        "qos_algorithm_type" => qos_algorithm_type: String,
        /// QoS parameters.
        "qos_algorithm_params" => qos_algorithm_params: StringMap,
    }
}

xapi_record! {
    /// A task record. `result` is the XML-RPC text of the return value
    /// (see `task::parse_task_result`); `error_info` is `[code, params…]`.
    #[derive(Debug)]
    pub struct Task in "task", fields task_fields {
        /// Uuid.
        "uuid" => uuid: String,
        /// Label (the call for async tasks).
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// Operations allowed now.
        "allowed_operations" => allowed_operations: Vec<TaskOperation>,
        /// Running operations.
        "current_operations" => current_operations: BTreeMap<String, TaskOperation>,
        /// Creation time.
        "created" => created: DateTime,
        /// Completion time (epoch while pending).
        "finished" => finished: DateTime,
        /// Status.
        "status" => status: TaskStatus,
        /// The host running it.
        "resident_on" => resident_on: HostRef,
        /// Progress, 0..1.
        "progress" => progress: f64,
        /// Result type name.
        "type" => type_: String,
        /// XML-RPC text of the result (`<value>OpaqueRef:…</value>`).
        "result" => result: String,
        /// `[code, params…]` on failure.
        "error_info" => error_info: Vec<String>,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Parent task.
        "subtask_of" => subtask_of: TaskRef,
        /// Child tasks.
        "subtasks" => subtasks: Vec<TaskRef>,
        /// Server backtrace of a failure.
        "backtrace" => backtrace: String,
    }
}

impl Task {
    /// Whether the task has finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status,
            TaskStatus::Success | TaskStatus::Failure | TaskStatus::Cancelled
        )
    }
}

xapi_record! {
    /// One way to reach a VDI over NBD (`VDI.get_nbd_info`). The
    /// `exportname` embeds the caller's session ref: a secret, so Debug
    /// redacts it.
    pub struct NbdInfo in "vdi_nbd_server_info", fields nbd_info_fields {
        /// `/<vdi-uuid>?session_id=<session ref>`: a credential.
        "exportname" => exportname: String,
        /// Host address (IPv4, IPv6 or name).
        "address" => address: String,
        /// TCP port (10809).
        "port" => port: i64,
        /// PEM certificate of the host, for TLS.
        "cert" => cert: String,
        /// The DNS name to check the certificate against.
        "subject" => subject: String,
    }
}

impl fmt::Debug for NbdInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdInfo")
            .field("exportname", &"<redacted: contains the session ref>")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("cert", &format_args!("<{} bytes of PEM>", self.cert.len()))
            .field("subject", &self.subject)
            .finish()
    }
}

xapi_record! {
    /// One event of `event.from`. `id` and `timestamp` are not decoded: on
    /// the wire they do not have their datamodel types (`docs/xapi-notes.md`,
    /// "Tasks").
    #[derive(Debug)]
    pub struct Event in "event", fields event_fields {
        /// The class, lowercase (`vm`, `task`).
        "class" => class: String,
        /// `add`, `mod` or `del`.
        "operation" => operation: EventOperation,
        /// The object's ref.
        "ref" => ref_: String,
        /// The object's record after the change (absent for `del`).
        "snapshot" => snapshot: Snapshot,
    }
}

xapi_record! {
    /// The arguments of `VBD.create`.
    #[derive(Debug)]
    pub struct VbdCreate in "VBD", fields vbd_create_fields {
        /// The VM.
        "VM" => vm: VmRef,
        /// The VDI (null for an empty CD drive).
        "VDI" => vdi: VdiRef,
        /// Position (`0`, `1`, … or `autodetect`).
        "userdevice" => userdevice: String,
        /// Bootable.
        "bootable" => bootable: bool,
        /// RO or RW.
        "mode" => mode: VbdMode,
        /// Disk, CD or Floppy.
        "type" => type_: VbdType,
        /// Empty CD drive.
        "empty" => empty: bool,
        /// Hot-unpluggable.
        "unpluggable" => unpluggable: bool,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// QoS algorithm (usually empty).
        "qos_algorithm_type" => qos_algorithm_type: String,
        /// QoS parameters.
        "qos_algorithm_params" => qos_algorithm_params: StringMap,
    }
}

impl VbdCreate {
    /// A read-write disk VBD for `vm` at `userdevice`, unplugged.
    pub fn disk(vm: &VmRef, vdi: &VdiRef, userdevice: &str, mode: VbdMode) -> VbdCreate {
        VbdCreate {
            vm: vm.clone(),
            vdi: vdi.clone(),
            userdevice: userdevice.to_string(),
            bootable: false,
            mode,
            type_: VbdType::Disk,
            empty: false,
            unpluggable: true,
            other_config: StringMap::new(),
            qos_algorithm_type: String::new(),
            qos_algorithm_params: StringMap::new(),
        }
    }
}

xapi_record! {
    /// The arguments of `VDI.create`.
    #[derive(Debug)]
    pub struct VdiCreate in "VDI", fields vdi_create_fields {
        /// Name.
        "name_label" => name_label: String,
        /// Description.
        "name_description" => name_description: String,
        /// The SR.
        "SR" => sr: SrRef,
        /// Size in bytes.
        "virtual_size" => virtual_size: i64,
        /// Type (usually `user`).
        "type" => type_: VdiType,
        /// Shareable.
        "sharable" => sharable: bool,
        /// Read-only.
        "read_only" => read_only: bool,
        /// Free-form configuration.
        "other_config" => other_config: StringMap,
        /// Xenstore data.
        "xenstore_data" => xenstore_data: StringMap,
        /// SM configuration.
        "sm_config" => sm_config: StringMap,
        /// Tags.
        "tags" => tags: Vec<String>,
    }
}

/// The record types the client decodes, as the conformance test sees them.
pub fn record_specs() -> Vec<RecordSpec> {
    vec![
        Vm::spec(),
        Vbd::spec(),
        Vdi::spec(),
        Sr::spec(),
        Pbd::spec(),
        Host::spec(),
        Pool::spec(),
        Network::spec(),
        Vif::spec(),
        Task::spec(),
        NbdInfo::spec(),
        Event::spec(),
    ]
}

/// The constructor argument records the client sends (`VBD.create`, `VDI.create`).
pub fn constructor_specs() -> Vec<RecordSpec> {
    vec![VbdCreate::spec(), VdiCreate::spec()]
}

/// The enums the client decodes or sends.
pub fn enum_specs() -> Vec<EnumSpec> {
    vec![
        PowerState::spec(),
        VmOperation::spec(),
        DomainType::spec(),
        VbdMode::spec(),
        VbdType::spec(),
        VbdOperation::spec(),
        VdiType::spec(),
        VdiOperation::spec(),
        OnBoot::spec(),
        StorageOperation::spec(),
        TaskStatus::spec(),
        TaskOperation::spec(),
        NetworkPurpose::spec(),
        VifLockingMode::spec(),
        EventOperation::spec(),
        MessageClass::spec(),
    ]
}
