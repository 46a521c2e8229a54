//! Events: the `event.from` batch and its records, and the event
//! snapshot whose shape depends on the class.
//!
//! `event.from(classes, token, timeout)` blocks until an event matches or the
//! timeout passes (`docs/xapi-notes.md`, "Tasks"). The batch has no class in
//! the datamodel (its result type is literally "an event batch"), so
//! [`EventBatch`] is handled explicitly by the conformance test.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use xenvault_types::rpc::Value;

use crate::de::{DecodeError, RawValue, from_value};
use crate::model::{DatamodelType, ToValue};
use crate::records::{Event, EventOperation};

/// The record carried by an event (`<class> record` in the datamodel):
/// kept raw, decoded on demand with [`Snapshot::decode`]. `Nil` when absent
/// (`del` events).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot(pub Value);

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot(Value::Nil)
    }
}

impl Snapshot {
    /// Whether the event carried no record.
    pub fn is_absent(&self) -> bool {
        matches!(self.0, Value::Nil)
    }

    /// Decodes the record as `T` (e.g. [`crate::records::Task`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        from_value(&self.0)
    }
}

impl DatamodelType for Snapshot {
    fn datamodel_type() -> String {
        "<class> record".to_string()
    }
}
impl ToValue for Snapshot {
    fn to_value(&self) -> Value {
        self.0.clone()
    }
}
impl serde::Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.to_json().serialize(s)
    }
}
impl<'de> serde::Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawValue::deserialize(d).map(|RawValue(v)| Snapshot(v))
    }
}

/// The result of `event.from`.
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize)]
#[serde(default)]
pub struct EventBatch {
    /// The events, oldest first.
    pub events: Vec<Event>,
    /// Number of valid refs per class.
    pub valid_ref_counts: BTreeMap<String, i64>,
    /// The token to pass to the next `event.from`.
    pub token: String,
}

impl DatamodelType for EventBatch {
    fn datamodel_type() -> String {
        // The datamodel's own spelling of the result type of event.from.
        "an event batch".to_string()
    }
}

impl EventBatch {
    /// The events about the object `reference`.
    pub fn events_for<'a>(&'a self, reference: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
        self.events.iter().filter(move |e| e.ref_ == reference)
    }
}

impl Event {
    /// Whether the object was deleted.
    pub fn is_delete(&self) -> bool {
        self.operation == EventOperation::Del
    }
}
