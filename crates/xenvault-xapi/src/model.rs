//! Datamodel plumbing: typed refs, datetimes, XAPI enums with an `Unknown`
//! fallback, the mapping from Rust types to datamodel type names, parameter
//! encoding, and the registries the datamodel conformance test reads.
//!
//! Every record field and call parameter the client uses has a Rust type
//! that implements [`DatamodelType`]; its [`DatamodelType::datamodel_type`]
//! spells the type exactly as `xenapi.json` does (`"VM ref"`,
//! `"(string -> string) map"`, `"enum vm_power_state set"`). The record
//! macro (`xapi_record!`) and the call macro (in `api`) derive the
//! registries from the same declarations that generate the code, so the test
//! in `tests/datamodel_conformance.rs` checks what the client really does.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use xenvault_types::rpc::Value;

/// A Rust type that stands for a datamodel type.
pub trait DatamodelType {
    /// The datamodel type name, spelled as in `xenapi.json`.
    fn datamodel_type() -> String;
}

/// Encodes a Rust value as an XAPI call parameter.
pub trait ToValue {
    /// The wire value.
    fn to_value(&self) -> Value;
}

impl<T: DatamodelType + ?Sized> DatamodelType for &T {
    fn datamodel_type() -> String {
        T::datamodel_type()
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

macro_rules! scalar_type {
    ($($t:ty => $name:literal, |$v:ident| $enc:expr;)*) => {$(
        impl DatamodelType for $t {
            fn datamodel_type() -> String {
                $name.to_string()
            }
        }
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                let $v = self;
                $enc
            }
        }
    )*};
}

scalar_type! {
    str => "string", |s| Value::String(s.to_string());
    String => "string", |s| Value::String(s.clone());
    i64 => "int", |i| Value::Int(*i);
    bool => "bool", |b| Value::Bool(*b);
    f64 => "float", |d| Value::Double(*d);
    () => "void", |_u| Value::String(String::new());
}

impl<T: DatamodelType> DatamodelType for [T] {
    fn datamodel_type() -> String {
        format!("{} set", T::datamodel_type())
    }
}
impl<T: ToValue> ToValue for [T] {
    fn to_value(&self) -> Value {
        Value::Array(self.iter().map(ToValue::to_value).collect())
    }
}
impl<T: DatamodelType> DatamodelType for Vec<T> {
    fn datamodel_type() -> String {
        <[T]>::datamodel_type()
    }
}
impl<T: ToValue> ToValue for Vec<T> {
    fn to_value(&self) -> Value {
        self.as_slice().to_value()
    }
}
impl<K: DatamodelType, V: DatamodelType> DatamodelType for BTreeMap<K, V> {
    fn datamodel_type() -> String {
        format!("({} -> {}) map", K::datamodel_type(), V::datamodel_type())
    }
}
impl<K: ToValue, V: ToValue> ToValue for BTreeMap<K, V> {
    /// Maps travel as structs; keys are stringified as XAPI does.
    fn to_value(&self) -> Value {
        Value::Struct(
            self.iter()
                .map(|(k, v)| (key_string(k.to_value()), v.to_value()))
                .collect(),
        )
    }
}

fn key_string(v: Value) -> String {
    match v {
        Value::String(s) | Value::DateTime(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Double(d) => d.to_string(),
        other => other.to_xml(),
    }
}

// ----- classes and refs -----

/// A datamodel class (or a record type with a class name).
pub trait XapiClass {
    /// The class name as in the datamodel and in method names (`VM`, `VDI`, `task`).
    const CLASS: &'static str;
}

/// A reference to an object of class `C` (`OpaqueRef:…`). Refs are opaque;
/// the null ref is `OpaqueRef:NULL`.
pub struct Ref<C: ?Sized> {
    raw: String,
    class: PhantomData<fn() -> C>,
}

/// The null reference as XAPI spells it.
pub const NULL_REF: &str = "OpaqueRef:NULL";

impl<C: ?Sized> Ref<C> {
    /// Wraps a ref string.
    pub fn new(raw: impl Into<String>) -> Self {
        Ref {
            raw: raw.into(),
            class: PhantomData,
        }
    }

    /// The null ref (`OpaqueRef:NULL`), e.g. for `VM.copy`'s `sr` to keep the SRs.
    pub fn null() -> Self {
        Ref::new(NULL_REF)
    }

    /// Whether this is the null ref (or empty, as some old records send it).
    pub fn is_null(&self) -> bool {
        self.raw == NULL_REF || self.raw.is_empty()
    }

    /// The ref string.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The same ref seen as another class (for generic code such as events).
    pub fn cast<D: ?Sized>(&self) -> Ref<D> {
        Ref::new(self.raw.clone())
    }
}

impl<C: ?Sized> Clone for Ref<C> {
    fn clone(&self) -> Self {
        Ref::new(self.raw.clone())
    }
}
impl<C: ?Sized> PartialEq for Ref<C> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<C: ?Sized> Eq for Ref<C> {}
impl<C: ?Sized> PartialOrd for Ref<C> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<C: ?Sized> Ord for Ref<C> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.raw.cmp(&other.raw)
    }
}
impl<C: ?Sized> Hash for Ref<C> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.raw.hash(state);
    }
}
impl<C: ?Sized> Default for Ref<C> {
    fn default() -> Self {
        Ref::null()
    }
}
impl<C: XapiClass + ?Sized> fmt::Debug for Ref<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ref<{}>({})", C::CLASS, self.raw)
    }
}
impl<C: ?Sized> fmt::Display for Ref<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
impl<C: XapiClass + ?Sized> DatamodelType for Ref<C> {
    fn datamodel_type() -> String {
        format!("{} ref", C::CLASS)
    }
}
impl<C: ?Sized> ToValue for Ref<C> {
    fn to_value(&self) -> Value {
        Value::String(self.raw.clone())
    }
}
impl<C: ?Sized> serde::Serialize for Ref<C> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}
impl<'de, C: ?Sized> serde::Deserialize<'de> for Ref<C> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Ref::new)
    }
}

/// Declares marker types for classes the client refers to but does not
/// decode records of.
macro_rules! class_markers {
    ($( $(#[$doc:meta])* $name:ident = $class:literal; )*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {}
        impl $crate::model::XapiClass for $name {
            const CLASS: &'static str = $class;
        }
    )*};
}
pub(crate) use class_markers;

// ----- datetimes -----

/// An XAPI datetime (`YYYYMMDDTHH:MM:SSZ` on the wire, UTC). The "unset"
/// value is the epoch (`19700101T00:00:00Z`), which is also the default.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateTime(pub time::OffsetDateTime);

impl DateTime {
    /// The epoch: XAPI's "unset" datetime.
    pub const EPOCH: DateTime = DateTime(time::OffsetDateTime::UNIX_EPOCH);

    /// Whether this is the epoch (XAPI's "never" / "unset").
    pub fn is_unset(&self) -> bool {
        *self == DateTime::EPOCH
    }

    /// Seconds since the Unix epoch.
    pub fn unix_timestamp(&self) -> i64 {
        self.0.unix_timestamp()
    }

    /// Parses XAPI's forms (`20250319T04:16:24Z`, without `Z`, or RFC 3339).
    /// The empty string is the epoch.
    pub fn parse(s: &str) -> Result<DateTime, xenvault_types::rpc::ValueError> {
        if s.trim().is_empty() {
            return Ok(DateTime::EPOCH);
        }
        xenvault_types::rpc::parse_datetime(s).map(DateTime)
    }
}

impl Default for DateTime {
    fn default() -> Self {
        DateTime::EPOCH
    }
}
impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&xenvault_types::rpc::format_datetime(self.0))
    }
}
impl fmt::Debug for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DateTime({self})")
    }
}
impl DatamodelType for DateTime {
    fn datamodel_type() -> String {
        "datetime".to_string()
    }
}
impl ToValue for DateTime {
    fn to_value(&self) -> Value {
        Value::DateTime(self.to_string())
    }
}
impl serde::Serialize for DateTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> serde::Deserialize<'de> for DateTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        DateTime::parse(&s).map_err(serde::de::Error::custom)
    }
}

// ----- enums -----

/// Declares an XAPI enum: known variants plus `Unknown(String)` for values
/// this client does not know (newer hosts add values; decoding must not
/// fail). Wire names match exactly, then case-insensitively.
macro_rules! xapi_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident in $dm:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this client does not know, kept verbatim.
            Unknown(String),
        }

        impl $name {
            /// The datamodel enum name.
            pub const DATAMODEL_NAME: &'static str = $dm;
            /// The wire names of the known values.
            pub const KNOWN: &'static [&'static str] = &[$($wire),*];

            /// The value as it travels on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )*
                    Self::Unknown(s) => s,
                }
            }

            /// The value for a wire name (unknown names are kept in `Unknown`).
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $( $wire => return Self::$variant, )*
                    _ => {}
                }
                $( if s.eq_ignore_ascii_case($wire) { return Self::$variant; } )*
                Self::Unknown(s.to_string())
            }
        }

        impl Default for $name {
            /// `Unknown("")`: what a record missing the field decodes to.
            fn default() -> Self {
                Self::Unknown(String::new())
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $name {
            type Err = std::convert::Infallible;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(Self::from_wire(s))
            }
        }
        impl $crate::model::DatamodelType for $name {
            fn datamodel_type() -> String {
                format!("enum {}", $dm)
            }
        }
        impl $crate::model::ToValue for $name {
            fn to_value(&self) -> xenvault_types::rpc::Value {
                xenvault_types::rpc::Value::String(self.as_str().to_string())
            }
        }
        impl $crate::model::XapiEnum for $name {
            fn spec() -> $crate::model::EnumSpec {
                $crate::model::EnumSpec { name: $dm, values: Self::KNOWN }
            }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok(Self::from_wire(&s))
            }
        }
    };
}
pub(crate) use xapi_enum;

/// An XAPI enum declared with `xapi_enum!`.
pub trait XapiEnum {
    /// Its name and known values, for the conformance test.
    fn spec() -> EnumSpec;
}

/// A datamodel enum as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumSpec {
    /// The datamodel name (`vm_power_state`).
    pub name: &'static str,
    /// The wire names of the values the client has variants for.
    pub values: &'static [&'static str],
}

// ----- records -----

/// One record field the client decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    /// The field name as in the datamodel.
    pub name: &'static str,
    /// The datamodel type, derived from the Rust field type.
    pub ty: String,
}

/// A record type the client decodes (or sends, for constructors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSpec {
    /// The datamodel class.
    pub class: &'static str,
    /// The Rust type name, for messages.
    pub rust_name: &'static str,
    /// The fields, as declared.
    pub fields: Vec<FieldSpec>,
}

/// A record type declared with `xapi_record!`.
pub trait Record: XapiClass {
    /// The fields the client decodes, with their datamodel types.
    fn spec() -> RecordSpec;
}

/// A typed field of a record class, for the generic field getter
/// (`Class.get_<field>`).
pub struct Field<C, T> {
    name: &'static str,
    types: PhantomData<fn() -> (C, T)>,
}

impl<C, T> Field<C, T> {
    /// A field by its datamodel name. Prefer the constants the record
    /// macro generates (e.g. `records::vm_fields::power_state`).
    pub const fn new(name: &'static str) -> Self {
        Field {
            name,
            types: PhantomData,
        }
    }

    /// The datamodel name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}
impl<C, T> Clone for Field<C, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C, T> Copy for Field<C, T> {}
impl<C, T> fmt::Debug for Field<C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Field({})", self.name)
    }
}

/// Declares a record: the struct (serde, every field defaulted so records
/// from older hosts that lack newer fields still decode), its [`Record`]
/// spec, [`ToValue`] (for constructors such as `VBD.create`), its datamodel
/// type `<class> record`, and a module of typed [`Field`] constants.
macro_rules! xapi_record {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident in $class:literal, fields $fmod:ident {
            $( $(#[$fmeta:meta])* $wire:literal => $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        $vis struct $name {
            $( $(#[$fmeta])* #[serde(rename = $wire)] pub $field: $ty, )*
        }

        impl $crate::model::XapiClass for $name {
            const CLASS: &'static str = $class;
        }
        impl $crate::model::Record for $name {
            fn spec() -> $crate::model::RecordSpec {
                $crate::model::RecordSpec {
                    class: $class,
                    rust_name: stringify!($name),
                    fields: vec![$( $crate::model::FieldSpec {
                        name: $wire,
                        ty: <$ty as $crate::model::DatamodelType>::datamodel_type(),
                    }, )*],
                }
            }
        }
        impl $crate::model::DatamodelType for $name {
            fn datamodel_type() -> String {
                format!("{} record", $class)
            }
        }
        impl $crate::model::ToValue for $name {
            fn to_value(&self) -> xenvault_types::rpc::Value {
                xenvault_types::rpc::Value::Struct(vec![$(
                    ($wire.to_string(), $crate::model::ToValue::to_value(&self.$field)),
                )*])
            }
        }

        #[doc = concat!("Typed field names of [`", stringify!($name), "`] for `", $class, ".get_<field>`.")]
        #[allow(non_upper_case_globals)]
        pub mod $fmod {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[doc = concat!("`", $class, ".", $wire, "`")]
                pub const $field: $crate::model::Field<super::$name, $ty> =
                    $crate::model::Field::new($wire);
            )*
        }
    };
}
pub(crate) use xapi_record;

// ----- messages -----

/// One parameter of a call, as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// The datamodel parameter name.
    pub name: String,
    /// The datamodel type, derived from the Rust parameter type.
    pub ty: String,
}

/// One XAPI message the client calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpec {
    /// `Class.message`.
    pub wire: String,
    /// The parameters after the session, in order.
    pub params: Vec<ParamSpec>,
    /// The datamodel result type (`void`, `VM ref`, …).
    pub result: String,
    /// Whether the session ref goes first (all calls but the logins).
    pub takes_session: bool,
    /// Sent with fewer parameters than the datamodel lists, relying on
    /// xapi's trailing defaults (e.g. `VM.snapshot` without `ignore_vdis`
    /// for hosts older than xapi 21.4).
    pub omits_trailing: bool,
    /// Hidden from the datamodel dump (`get_all_records_where`).
    pub hidden: bool,
}

impl MessageSpec {
    /// The class part of the wire name.
    pub fn class(&self) -> &str {
        self.wire.split_once('.').map_or("", |(c, _)| c)
    }

    /// The message part of the wire name.
    pub fn message(&self) -> &str {
        self.wire
            .split_once('.')
            .map_or(self.wire.as_str(), |(_, m)| m)
    }
}

/// The datamodel name of a Rust parameter identifier: a trailing `_` (used
/// for keywords such as `self_`, `class_`, `ref_`) is dropped.
pub fn param_name(rust_ident: &str) -> String {
    rust_ident
        .strip_suffix('_')
        .unwrap_or(rust_ident)
        .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    class_markers! {
        /// Test class.
        Thing = "thing";
    }

    xapi_enum! {
        /// Test enum.
        pub enum Colour in "colour" {
            /// red
            Red = "Red",
            /// dark_blue
            DarkBlue = "dark_blue",
        }
    }

    #[test]
    fn type_names_follow_the_datamodel() {
        assert_eq!(<Ref<Thing>>::datamodel_type(), "thing ref");
        assert_eq!(<Vec<Ref<Thing>>>::datamodel_type(), "thing ref set");
        assert_eq!(
            <BTreeMap<Colour, String>>::datamodel_type(),
            "(enum colour -> string) map"
        );
        assert_eq!(<&[String]>::datamodel_type(), "string set");
        assert_eq!(<()>::datamodel_type(), "void");
    }

    #[test]
    fn unknown_enum_values_survive() {
        let v: Colour = crate::de::from_value(&Value::str("green")).unwrap();
        assert_eq!(v, Colour::Unknown("green".into()));
        assert_eq!(v.as_str(), "green");
        let v: Colour = crate::de::from_value(&Value::str("DARK_BLUE")).unwrap();
        assert_eq!(v, Colour::DarkBlue);
        assert_eq!(Colour::DATAMODEL_NAME, "colour");
        let set: Vec<Colour> =
            crate::de::from_value(&Value::Array(vec![Value::str("Red"), Value::str("x")])).unwrap();
        assert_eq!(set, vec![Colour::Red, Colour::Unknown("x".into())]);
    }

    #[test]
    fn maps_encode_with_string_keys() {
        let m = BTreeMap::from([(Colour::Red, 5i64)]);
        assert_eq!(m.to_value(), Value::record([("Red", Value::Int(5))]));
    }

    #[test]
    fn datetimes() {
        let d: DateTime =
            crate::de::from_value(&Value::DateTime("20250319T04:16:24Z".into())).unwrap();
        assert_eq!(d.to_string(), "20250319T04:16:24Z");
        let unset: DateTime = crate::de::from_value(&Value::str("19700101T00:00:00Z")).unwrap();
        assert!(unset.is_unset());
        assert!(crate::de::from_value::<DateTime>(&Value::str("soon")).is_err());
        assert_eq!(param_name("self_"), "self");
    }
}
