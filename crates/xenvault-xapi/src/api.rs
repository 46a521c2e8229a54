//! Typed XAPI calls: per-class accessors on [`Session`], generic getters,
//! the wrappers a backup tool needs, and the registry of every message the
//! client sends.
//!
//! # Using it
//!
//! ```no_run
//! # async fn demo(session: xenvault_xapi::session::Session) -> Result<(), xenvault_xapi::error::Error> {
//! use xenvault_xapi::records::vm_fields;
//! use xenvault_xapi::task::WaitOptions;
//! let vms = session.vm().get_all_records_where(r#"field "is_a_template"="false""#).await?;
//! for (vm, record) in &vms {
//!     let snap = session.vm().snapshot(vm, "backup", &[]).await?;     // synchronous call
//!     session.vm().set_is_a_template(&snap, false).await?;
//!     let state = session.vm().get_field(vm, vm_fields::power_state).await?;
//!     let copy = session.vm().copy(&snap, "copy", &xenvault_xapi::model::Ref::null())
//!         .run_async(&WaitOptions::default()).await?;               // Async.VM.copy + task
//! }
//! # Ok(()) }
//! ```
//!
//! Every wrapper returns a [`Call`]: `.await` it for a synchronous call,
//! `.start()` for an `Async.` call that returns an [`crate::task::AsyncTask`],
//! or `.run_async(&opts)` to start it, wait for the task and decode its result.
//!
//! # Conformance
//!
//! The wrappers are declared with a macro that generates both the method
//! and its [`MessageSpec`] (wire name, parameter names and types derived
//! from the Rust signature, result type derived from the Rust return
//! type); generic getters build their spec with the same function the test
//! reads. [`message_specs`] lists them all, and
//! `tests/datamodel_conformance.rs` checks it against `xenapi.json`.
//! `get_all_records_where` is not in the datamodel dump (it is hidden, see
//! `docs/xapi-notes.md`, "Wire protocol"); its spec is marked `hidden` and
//! the test checks it separately.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;
use xenvault_types::rpc::Value;

use crate::de::from_value;
use crate::error::{Error, ErrorCode, Result};
use crate::event::EventBatch;
use crate::model::{
    DatamodelType, Field, MessageSpec, ParamSpec, Record, Ref, ToValue, XapiClass, param_name,
};
use crate::records::{
    Host, MessageClass, MessageRef, NbdInfo, Network, Pbd, Pool, Sr, SrRef, StringMap, Task,
    TaskRef, Vbd, VbdCreate, VbdRef, Vdi, VdiCreate, VdiRef, Vif, Vm, VmOperation, VmRef,
};
use crate::session::Session;
use crate::task::{AsyncTask, WaitOptions};

/// A prepared XAPI call returning `T`. `.await` runs it synchronously;
/// [`Call::start`] runs it as `Async.<method>`; [`Call::run_async`] also
/// waits for the task.
#[must_use = "a Call does nothing until awaited, started or run"]
pub struct Call<T> {
    session: Session,
    method: String,
    params: Vec<Value>,
    timeout: Option<Duration>,
    fallback: Option<Box<Call<T>>>,
    result: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Call<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Parameters are not shown: they may hold secrets.
        f.debug_struct("Call")
            .field("method", &self.method)
            .field("params", &self.params.len())
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Call<T> {
    /// A call of `method` with `params` (the session ref is added).
    pub(crate) fn new(session: Session, method: impl Into<String>, params: Vec<Value>) -> Call<T> {
        Call {
            session,
            method: method.into(),
            params,
            timeout: None,
            fallback: None,
            result: PhantomData,
        }
    }

    /// A call built from its spec (generic getters).
    fn from_spec(session: &Session, spec: MessageSpec, params: Vec<Value>) -> Call<T> {
        debug_assert_eq!(spec.params.len(), params.len(), "{}", spec.wire);
        Call::new(session.clone(), spec.wire, params)
    }

    /// The wire name (`VM.snapshot`).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Sets the HTTP timeout of this call (default: the session's RPC timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// If the host answers `MESSAGE_PARAMETER_COUNT_MISMATCH` (an older xapi),
    /// make `fallback` instead.
    pub(crate) fn or_on_parameter_count_mismatch(mut self, fallback: Call<T>) -> Self {
        self.fallback = Some(Box::new(fallback));
        self
    }

    /// Sends `prefix + method`, falling back on a parameter count mismatch;
    /// returns the method actually used and the raw value.
    async fn send_raw(self, prefix: &str) -> Result<(String, Value)> {
        let Call {
            session,
            method,
            params,
            timeout,
            fallback,
            ..
        } = self;
        let wire = format!("{prefix}{method}");
        match session
            .call_value_with_timeout(&wire, params, timeout)
            .await
        {
            Ok(v) => Ok((method, v)),
            Err(e)
                if e.is_code(&ErrorCode::MessageParameterCountMismatch) && fallback.is_some() =>
            {
                let Some(fallback) = fallback else {
                    return Err(e);
                };
                // docs/xapi-notes.md, "Wire protocol": older hosts lack a parameter.
                tracing::debug!(method = %wire, "parameter count mismatch; retrying with fewer parameters");
                let wire = format!("{prefix}{}", fallback.method);
                let v = session
                    .call_value_with_timeout(&wire, fallback.params, fallback.timeout)
                    .await?;
                Ok((fallback.method, v))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the call synchronously (same as `.await`).
    pub async fn send(self) -> Result<T> {
        let (method, value) = self.send_raw("").await?;
        from_value(&value).map_err(|e| e.for_method(&method))
    }

    /// Runs the call as `Async.<method>`: returns at once with the task.
    /// Argument and permission errors still come back here, synchronously.
    pub async fn start(self) -> Result<AsyncTask<T>> {
        let session = self.session.clone();
        let (method, value) = self.send_raw("Async.").await?;
        let method = format!("Async.{method}");
        let task: TaskRef = from_value(&value).map_err(|e| e.for_method(&method))?;
        Ok(AsyncTask::new(session, task, method))
    }

    /// Runs the call as a task and waits for its result (destroying the
    /// task afterwards).
    pub async fn run_async(self, options: &WaitOptions) -> Result<T> {
        self.start().await?.wait(options).await
    }
}

impl<T: DeserializeOwned + Send + 'static> IntoFuture for Call<T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

// ----- generic getters -----

/// A datamodel class with objects and the standard getters (`get_record`,
/// `get_all`, `get_all_records`, `get_by_uuid`, `get_<field>`).
pub trait ObjectClass: Record + DatamodelType + DeserializeOwned + Send + 'static {}

/// The calls of one class. Get it from the session: `session.vm()`,
/// `session.vdi()`, … or `session.api::<C>()`.
pub struct Api<C> {
    session: Session,
    class: PhantomData<fn() -> C>,
}

impl<C> Clone for Api<C> {
    fn clone(&self) -> Self {
        Api {
            session: self.session.clone(),
            class: PhantomData,
        }
    }
}

impl<C: XapiClass> std::fmt::Debug for Api<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Api<{}>", C::CLASS)
    }
}

fn spec(wire: String, params: Vec<(&str, String)>, result: String) -> MessageSpec {
    MessageSpec {
        wire,
        params: params
            .into_iter()
            .map(|(name, ty)| ParamSpec {
                name: name.to_string(),
                ty,
            })
            .collect(),
        result,
        takes_session: true,
        omits_trailing: false,
        hidden: false,
    }
}

/// `C.get_record(self)`.
pub fn get_record_spec<C: ObjectClass>() -> MessageSpec {
    spec(
        format!("{}.get_record", C::CLASS),
        vec![("self", Ref::<C>::datamodel_type())],
        C::datamodel_type(),
    )
}
/// `C.get_all()`.
pub fn get_all_spec<C: ObjectClass>() -> MessageSpec {
    spec(
        format!("{}.get_all", C::CLASS),
        vec![],
        Vec::<Ref<C>>::datamodel_type(),
    )
}
/// `C.get_all_records()`.
pub fn get_all_records_spec<C: ObjectClass>() -> MessageSpec {
    spec(
        format!("{}.get_all_records", C::CLASS),
        vec![],
        BTreeMap::<Ref<C>, C>::datamodel_type(),
    )
}
/// `C.get_by_uuid(uuid)`.
pub fn get_by_uuid_spec<C: ObjectClass>() -> MessageSpec {
    spec(
        format!("{}.get_by_uuid", C::CLASS),
        vec![("uuid", String::datamodel_type())],
        Ref::<C>::datamodel_type(),
    )
}
/// `C.get_<field>(self)`.
pub fn get_field_spec<C: ObjectClass, T: DatamodelType>(field: &str) -> MessageSpec {
    spec(
        format!("{}.get_{field}", C::CLASS),
        vec![("self", Ref::<C>::datamodel_type())],
        T::datamodel_type(),
    )
}
/// `C.get_all_records_where(expr)`: hidden from the datamodel dump.
pub fn get_all_records_where_spec<C: ObjectClass>() -> MessageSpec {
    let mut s = spec(
        format!("{}.get_all_records_where", C::CLASS),
        vec![("expr", String::datamodel_type())],
        BTreeMap::<Ref<C>, C>::datamodel_type(),
    );
    s.hidden = true;
    s
}

impl<C: ObjectClass> Api<C> {
    fn new(session: &Session) -> Api<C> {
        Api {
            session: session.clone(),
            class: PhantomData,
        }
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// `C.get_record(self)`.
    pub fn get_record(&self, self_: &Ref<C>) -> Call<C> {
        Call::from_spec(
            &self.session,
            get_record_spec::<C>(),
            vec![self_.to_value()],
        )
    }

    /// `C.get_all()`.
    pub fn get_all(&self) -> Call<Vec<Ref<C>>> {
        Call::from_spec(&self.session, get_all_spec::<C>(), vec![])
    }

    /// `C.get_all_records()`.
    pub fn get_all_records(&self) -> Call<BTreeMap<Ref<C>, C>> {
        Call::from_spec(&self.session, get_all_records_spec::<C>(), vec![])
    }

    /// `C.get_by_uuid(uuid)`; `UUID_INVALID` if there is none.
    pub fn get_by_uuid(&self, uuid: &str) -> Call<Ref<C>> {
        Call::from_spec(
            &self.session,
            get_by_uuid_spec::<C>(),
            vec![uuid.to_value()],
        )
    }

    /// `C.get_<field>(self)`, typed by the field constant
    /// (`records::vm_fields::power_state`).
    pub fn get_field<T: DatamodelType + DeserializeOwned>(
        &self,
        self_: &Ref<C>,
        field: Field<C, T>,
    ) -> Call<T> {
        Call::from_spec(
            &self.session,
            get_field_spec::<C, T>(field.name()),
            vec![self_.to_value()],
        )
    }

    /// `C.get_all_records_where(expr)`, hidden in the datamodel. `expr` uses
    /// DB column names (`name__label`) and DB strings (`"true"`), e.g.
    /// `field "is_a_template"="false" and field "is_control_domain"="false"`;
    /// build it with [`where_field`]. See `docs/xapi-notes.md`, "Wire protocol".
    pub fn get_all_records_where(&self, expr: &str) -> Call<BTreeMap<Ref<C>, C>> {
        Call::from_spec(
            &self.session,
            get_all_records_where_spec::<C>(),
            vec![expr.to_value()],
        )
    }
}

/// One `field "<db name>"="<value>"` term of a `get_all_records_where`
/// expression: the datamodel field name is turned into the DB column name
/// (a `_` after a namespace becomes `__`: `name_label` → `name__label`,
/// `memory_static_max` → `memory__static_max`). Returns `None` when the
/// value contains `"`, which the grammar cannot express.
pub fn where_field(field: &str, value: &str) -> Option<String> {
    if value.contains('"') || field.contains('"') {
        return None;
    }
    Some(format!("field \"{}\"=\"{value}\"", db_column_name(field)))
}

/// Several [`where_field`] terms joined with `and`, e.g.
/// `where_all(&[("is_a_template", "false"), ("is_control_domain", "false")])`.
/// `None` if a value contains `"`.
pub fn where_all(terms: &[(&str, &str)]) -> Option<String> {
    let terms: Option<Vec<String>> = terms.iter().map(|(f, v)| where_field(f, v)).collect();
    Some(terms?.join(" and "))
}

/// The DB column name of a datamodel field: fields declared inside a
/// datamodel namespace are stored as `<namespace>__<field>` (xen-api
/// ocaml/idl/escaping.ml `escape_id`). The namespaces of the classes
/// xenvault filters are `name`, `memory`, `VCPUs`, `actions`, `PV`, `HVM`
/// (VM) and `API_version` (host); other fields keep their name.
pub fn db_column_name(field: &str) -> String {
    const NAMESPACES: &[&str] = &[
        "name",
        "memory",
        "VCPUs",
        "actions",
        "PV",
        "HVM",
        "API_version",
    ];
    for ns in NAMESPACES {
        if let Some(rest) = field.strip_prefix(ns).and_then(|r| r.strip_prefix('_'))
            && !rest.is_empty()
        {
            return format!("{ns}__{rest}");
        }
    }
    field.to_string()
}

// ----- per-class wrappers -----

/// Marks a spec whose call omits trailing defaulted parameters.
macro_rules! omits {
    () => {
        false
    };
    (omits_trailing) => {
        true
    };
}

/// Declares typed wrappers: each line generates a method returning
/// [`Call`] and a [`MessageSpec`] in the registry function, from the same
/// tokens (wire name, parameter identifiers with a trailing `_` dropped,
/// parameter and return types).
macro_rules! xapi_calls {
    (
        impl $api:ty => $specs:ident {
            $(
                $(#[$m:meta])*
                fn $name:ident = $wire:literal $([$flag:ident])? ( $( $p:ident : $pty:ty ),* $(,)? ) -> $ret:ty;
            )*
        }
    ) => {
        impl $api {
            $(
                $(#[$m])*
                pub fn $name(&self $(, $p: $pty)*) -> Call<$ret> {
                    Call::new(self.session.clone(), $wire, vec![$( ToValue::to_value(&$p) ),*])
                }
            )*
        }

        fn $specs() -> Vec<MessageSpec> {
            vec![$(
                MessageSpec {
                    wire: $wire.to_string(),
                    params: vec![$( ParamSpec {
                        name: param_name(stringify!($p)),
                        ty: <$pty as DatamodelType>::datamodel_type(),
                    } ),*],
                    result: <$ret as DatamodelType>::datamodel_type(),
                    takes_session: true,
                    omits_trailing: omits!($($flag)?),
                    hidden: false,
                },
            )*]
        }
    };
}

xapi_calls! {
    impl Api<Vm> => vm_specs {
        /// `VM.snapshot(vm, new_name, ignore_vdis)` (xapi 21.4+). Prefer
        /// [`Api::<Vm>::snapshot`], which falls back on older hosts.
        fn snapshot_ignoring = "VM.snapshot" (vm: &VmRef, new_name: &str, ignore_vdis: &[VdiRef]) -> VmRef;
        /// `VM.snapshot(vm, new_name)` as older hosts (xapi < 21.4) take it.
        fn snapshot_without_ignore_vdis = "VM.snapshot" [omits_trailing] (vm: &VmRef, new_name: &str) -> VmRef;
        /// `VM.checkpoint(vm, new_name)`: disks and memory (VM running).
        fn checkpoint = "VM.checkpoint" (vm: &VmRef, new_name: &str) -> VmRef;
        /// `VM.clone(vm, new_name)`: copy-on-write clone of a halted VM or snapshot.
        fn clone_vm = "VM.clone" (vm: &VmRef, new_name: &str) -> VmRef;
        /// `VM.copy(vm, new_name, sr)`: full copy (`sr` null keeps the SRs).
        fn copy = "VM.copy" (vm: &VmRef, new_name: &str, sr: &SrRef) -> VmRef;
        /// `VM.destroy(self)`: removes the VM, its VBDs and VIFs, NOT its VDIs.
        fn destroy = "VM.destroy" (self_: &VmRef) -> ();
        /// `VM.revert(snapshot)`.
        fn revert = "VM.revert" (snapshot: &VmRef) -> ();
        /// `VM.set_is_a_template(self, value)`: clear it on a snapshot before
        /// exporting it, or the import makes a template.
        fn set_is_a_template = "VM.set_is_a_template" (self_: &VmRef, value: bool) -> ();
        /// `VM.set_name_label(self, value)`.
        fn set_name_label = "VM.set_name_label" (self_: &VmRef, value: &str) -> ();
        /// `VM.set_name_description(self, value)`.
        fn set_name_description = "VM.set_name_description" (self_: &VmRef, value: &str) -> ();
        /// `VM.add_tags(self, value)`.
        fn add_tags = "VM.add_tags" (self_: &VmRef, value: &str) -> ();
        /// `VM.remove_tags(self, value)`.
        fn remove_tags = "VM.remove_tags" (self_: &VmRef, value: &str) -> ();
        /// `VM.set_tags(self, value)`.
        fn set_tags = "VM.set_tags" (self_: &VmRef, value: &[String]) -> ();
        /// `VM.add_to_other_config(self, key, value)`: `MAP_DUPLICATE_KEY` if
        /// the key exists (see [`Api::<Vm>::put_other_config`]).
        fn add_to_other_config = "VM.add_to_other_config" (self_: &VmRef, key: &str, value: &str) -> ();
        /// `VM.remove_from_other_config(self, key)` (no error if absent).
        fn remove_from_other_config = "VM.remove_from_other_config" (self_: &VmRef, key: &str) -> ();
        /// `VM.set_blocked_operations(self, value)`.
        fn set_blocked_operations = "VM.set_blocked_operations" (self_: &VmRef, value: &BTreeMap<VmOperation, String>) -> ();
        /// `VM.add_to_blocked_operations(self, key, value)`.
        fn add_to_blocked_operations = "VM.add_to_blocked_operations" (self_: &VmRef, key: &VmOperation, value: &str) -> ();
        /// `VM.remove_from_blocked_operations(self, key)`.
        fn remove_from_blocked_operations = "VM.remove_from_blocked_operations" (self_: &VmRef, key: &VmOperation) -> ();
        /// `VM.update_allowed_operations(self)`: call after changing
        /// `blocked_operations`.
        fn update_allowed_operations = "VM.update_allowed_operations" (self_: &VmRef) -> ();
        /// `VM.start(vm, start_paused, force)`.
        fn start = "VM.start" (vm: &VmRef, start_paused: bool, force: bool) -> ();
        /// `VM.clean_shutdown(vm)`.
        fn clean_shutdown = "VM.clean_shutdown" (vm: &VmRef) -> ();
        /// `VM.hard_shutdown(vm)`.
        fn hard_shutdown = "VM.hard_shutdown" (vm: &VmRef) -> ();
    }
}

impl Api<Vm> {
    /// `VM.snapshot(vm, new_name, ignore_vdis)`. With no VDIs to ignore it
    /// falls back to the two-parameter form when the host is older than
    /// xapi 21.4 (`MESSAGE_PARAMETER_COUNT_MISMATCH`; `docs/xapi-notes.md`,
    /// "Wire protocol"). The snapshot has `is_a_template=true`.
    pub fn snapshot(&self, vm: &VmRef, new_name: &str, ignore_vdis: &[VdiRef]) -> Call<VmRef> {
        let full = self.snapshot_ignoring(vm, new_name, ignore_vdis);
        if ignore_vdis.is_empty() {
            full.or_on_parameter_count_mismatch(self.snapshot_without_ignore_vdis(vm, new_name))
        } else {
            full
        }
    }

    /// Sets `other_config[key] = value` whether or not the key exists
    /// (remove, then add: `add_to_other_config` refuses existing keys).
    pub async fn put_other_config(&self, vm: &VmRef, key: &str, value: &str) -> Result<()> {
        self.remove_from_other_config(vm, key).await?;
        self.add_to_other_config(vm, key, value).await
    }
}

xapi_calls! {
    impl Api<Vdi> => vdi_specs {
        /// `VDI.snapshot(vdi, driver_params)`.
        fn snapshot = "VDI.snapshot" (vdi: &VdiRef, driver_params: &StringMap) -> VdiRef;
        /// `VDI.clone(vdi, driver_params)`.
        fn clone_vdi = "VDI.clone" (vdi: &VdiRef, driver_params: &StringMap) -> VdiRef;
        /// `VDI.copy(vdi, sr, base_vdi, into_vdi)` (null refs for the defaults).
        fn copy = "VDI.copy" (vdi: &VdiRef, sr: &SrRef, base_vdi: &VdiRef, into_vdi: &VdiRef) -> VdiRef;
        /// `VDI.create(args)`.
        fn create = "VDI.create" (args: &VdiCreate) -> VdiRef;
        /// `VDI.destroy(self)`.
        fn destroy = "VDI.destroy" (self_: &VdiRef) -> ();
        /// `VDI.data_destroy(self)`: keep only the CBT log (type becomes
        /// `cbt_metadata`); `VDI_IN_USE` while VBDs remain (retryable).
        fn data_destroy = "VDI.data_destroy" (self_: &VdiRef) -> ();
        /// `VDI.enable_cbt(self)` (idempotent).
        fn enable_cbt = "VDI.enable_cbt" (self_: &VdiRef) -> ();
        /// `VDI.disable_cbt(self)` (idempotent).
        fn disable_cbt = "VDI.disable_cbt" (self_: &VdiRef) -> ();
        /// `VDI.list_changed_blocks(vdi_from, vdi_to)`: the base64 bitmap of
        /// 64 KiB blocks changed from the older `vdi_from` to the newer
        /// `vdi_to` (decode with `cbt`).
        fn list_changed_blocks = "VDI.list_changed_blocks" (vdi_from: &VdiRef, vdi_to: &VdiRef) -> String;
        /// `VDI.get_nbd_info(self)`: where to read the VDI over NBD (`[]`
        /// without an NBD network).
        fn get_nbd_info = "VDI.get_nbd_info" (self_: &VdiRef) -> Vec<NbdInfo>;
        /// `VDI.set_name_label(self, value)`.
        fn set_name_label = "VDI.set_name_label" (self_: &VdiRef, value: &str) -> ();
        /// `VDI.set_name_description(self, value)`.
        fn set_name_description = "VDI.set_name_description" (self_: &VdiRef, value: &str) -> ();
        /// `VDI.add_to_other_config(self, key, value)`.
        fn add_to_other_config = "VDI.add_to_other_config" (self_: &VdiRef, key: &str, value: &str) -> ();
        /// `VDI.remove_from_other_config(self, key)`.
        fn remove_from_other_config = "VDI.remove_from_other_config" (self_: &VdiRef, key: &str) -> ();
        /// `VDI.add_tags(self, value)`.
        fn add_tags = "VDI.add_tags" (self_: &VdiRef, value: &str) -> ();
        /// `VDI.remove_tags(self, value)`.
        fn remove_tags = "VDI.remove_tags" (self_: &VdiRef, value: &str) -> ();
    }
}

impl Api<Vdi> {
    /// Sets `other_config[key] = value` whether or not the key exists.
    pub async fn put_other_config(&self, vdi: &VdiRef, key: &str, value: &str) -> Result<()> {
        self.remove_from_other_config(vdi, key).await?;
        self.add_to_other_config(vdi, key, value).await
    }
}

xapi_calls! {
    impl Api<Vbd> => vbd_specs {
        /// `VBD.create(args)`.
        fn create = "VBD.create" (args: &VbdCreate) -> VbdRef;
        /// `VBD.destroy(self)`.
        fn destroy = "VBD.destroy" (self_: &VbdRef) -> ();
        /// `VBD.plug(self)`.
        fn plug = "VBD.plug" (self_: &VbdRef) -> ();
        /// `VBD.unplug(self)`.
        fn unplug = "VBD.unplug" (self_: &VbdRef) -> ();
    }
}

xapi_calls! {
    impl Api<Task> => task_specs {
        /// `task.create(label, description)`: a task for an HTTP transfer
        /// (see [`crate::task::TaskGuard`]).
        fn create = "task.create" (label: &str, description: &str) -> TaskRef;
        /// `task.destroy(self)`.
        fn destroy = "task.destroy" (self_: &TaskRef) -> ();
        /// `task.cancel(task)`.
        fn cancel = "task.cancel" (task: &TaskRef) -> ();
    }
}

/// The `event` calls.
#[derive(Clone, Debug)]
pub struct EventApi {
    session: Session,
}

xapi_calls! {
    impl EventApi => event_specs {
        /// `event.from(classes, token, timeout)`: blocks up to `timeout`
        /// seconds; `classes` are `"*"`, `"vm"`, or `"task/OpaqueRef:…"`.
        /// Add an HTTP timeout longer than `timeout` with [`Call::with_timeout`]
        /// (or use [`EventApi::wait_from`]).
        fn from = "event.from" (classes: &[String], token: &str, timeout: f64) -> EventBatch;
        /// `event.inject(class, ref)`: returns a token taken just before.
        fn inject = "event.inject" (class_: &str, ref_: &str) -> String;
    }
}

impl EventApi {
    /// `event.from` with an HTTP timeout 30 s longer than the server-side one.
    pub fn wait_from(
        &self,
        classes: &[String],
        token: &str,
        timeout: Duration,
    ) -> Call<EventBatch> {
        self.from(classes, token, timeout.as_secs_f64())
            .with_timeout(timeout + Duration::from_secs(30))
    }
}

/// The `message` calls.
#[derive(Clone, Debug)]
pub struct MessageApi {
    session: Session,
}

xapi_calls! {
    impl MessageApi => message_specs_of_class {
        /// `message.create(name, priority, cls, obj_uuid, body)`: an alert
        /// visible in XenCenter and Xen Orchestra.
        fn create = "message.create" (name: &str, priority: i64, cls: &MessageClass, obj_uuid: &str, body: &str) -> MessageRef;
    }
}

/// Declares the per-class accessors on [`Session`], the [`ObjectClass`]
/// impls, and the registry of generic getters for exactly those classes.
macro_rules! object_classes {
    ($( $(#[$m:meta])* $accessor:ident => $class:ty, )*) => {
        $( impl ObjectClass for $class {} )*

        impl Session {
            $(
                $(#[$m])*
                pub fn $accessor(&self) -> Api<$class> {
                    Api::new(self)
                }
            )*
        }

        fn getter_specs() -> Vec<MessageSpec> {
            let mut out = Vec::new();
            $( out.extend(class_getter_specs::<$class>()); )*
            out
        }
    };
}

object_classes! {
    /// `VM` calls.
    vm => Vm,
    /// `VBD` calls.
    vbd => Vbd,
    /// `VDI` calls.
    vdi => Vdi,
    /// `VIF` calls.
    vif => Vif,
    /// `SR` calls.
    sr => Sr,
    /// `PBD` calls.
    pbd => Pbd,
    /// `host` calls.
    host => Host,
    /// `pool` calls.
    pool => Pool,
    /// `network` calls.
    network => Network,
    /// `task` calls.
    task => Task,
}

impl Session {
    /// The calls of any object class.
    pub fn api<C: ObjectClass>(&self) -> Api<C> {
        Api::new(self)
    }

    /// `event` calls.
    pub fn event(&self) -> EventApi {
        EventApi {
            session: self.clone(),
        }
    }

    /// `message` calls.
    pub fn message(&self) -> MessageApi {
        MessageApi {
            session: self.clone(),
        }
    }

    /// The pool record and ref (there is exactly one pool).
    pub async fn pool_record(&self) -> Result<(Ref<Pool>, Pool)> {
        let pools = self.pool().get_all_records().await?;
        pools.into_iter().next().ok_or_else(|| Error::Decode {
            method: "pool.get_all_records".into(),
            path: String::new(),
            detail: "the pool has no pool record".into(),
        })
    }
}

/// The generic getters of class `C`: `get_record`, `get_all`,
/// `get_all_records`, `get_by_uuid`, every `get_<field>` of the fields the
/// record decodes, and the hidden `get_all_records_where`.
fn class_getter_specs<C: ObjectClass>() -> Vec<MessageSpec> {
    let mut out = vec![
        get_record_spec::<C>(),
        get_all_spec::<C>(),
        get_all_records_spec::<C>(),
        get_by_uuid_spec::<C>(),
        get_all_records_where_spec::<C>(),
    ];
    for field in C::spec().fields {
        let mut s = spec(
            format!("{}.get_{}", C::CLASS, field.name),
            vec![("self", Ref::<C>::datamodel_type())],
            field.ty,
        );
        s.hidden = false;
        out.push(s);
    }
    out
}

/// Every message the client sends: the typed wrappers, the generic getters
/// of every object class, the session calls, and the task and event calls
/// used by task waiting.
pub fn message_specs() -> Vec<MessageSpec> {
    let mut out = crate::session::session_specs();
    out.extend(getter_specs());
    out.extend(vm_specs());
    out.extend(vdi_specs());
    out.extend(vbd_specs());
    out.extend(task_specs());
    out.extend(event_specs());
    out.extend(message_specs_of_class());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn where_expressions_use_db_names() {
        assert_eq!(
            where_field("name_label", "web 1").unwrap(),
            r#"field "name__label"="web 1""#
        );
        assert_eq!(
            where_field("is_a_template", "false").unwrap(),
            r#"field "is_a_template"="false""#
        );
        assert_eq!(db_column_name("memory_static_max"), "memory__static_max");
        assert_eq!(db_column_name("power_state"), "power_state");
        assert_eq!(db_column_name("ha_enabled"), "ha_enabled");
        assert_eq!(db_column_name("API_version_major"), "API_version__major");
        assert_eq!(db_column_name("VCPUs_max"), "VCPUs__max");
        assert!(where_field("name_label", "a\"b").is_none());
        assert_eq!(
            where_all(&[("is_a_template", "false"), ("power_state", "Running")]).unwrap(),
            r#"field "is_a_template"="false" and field "power_state"="Running""#
        );
        assert!(where_all(&[("a", "b"), ("c", "\"")]).is_none());
    }

    #[test]
    fn specs_derive_from_signatures() {
        let specs = message_specs();
        let snap: Vec<_> = specs.iter().filter(|s| s.wire == "VM.snapshot").collect();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].params.len(), 3);
        assert_eq!(snap[0].params[2].name, "ignore_vdis");
        assert_eq!(snap[0].params[2].ty, "VDI ref set");
        assert!(snap[1].omits_trailing);
        let destroy = specs.iter().find(|s| s.wire == "VDI.destroy").unwrap();
        assert_eq!(destroy.params[0].name, "self");
        assert_eq!(destroy.result, "void");
        let gar = specs
            .iter()
            .find(|s| s.wire == "VM.get_all_records")
            .unwrap();
        assert_eq!(gar.result, "(VM ref -> VM record) map");
    }
}
