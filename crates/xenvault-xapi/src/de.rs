//! Decoding XAPI values by datamodel type: a serde `Deserializer` over
//! [`Value`], so typed records and results decode the same from XML-RPC and
//! JSON-RPC.
//!
//! The wire does not say the datamodel type (`docs/xapi-notes.md`, "Wire
//! protocol"): XML-RPC sends int64 as untyped strings, JSON-RPC as numbers
//! that may exceed 2^53; strings may be empty `<value/>`; datetimes are
//! `YYYYMMDDTHH:MM:SSZ`; map keys are always strings. This deserializer lets
//! the Rust type decide: asked for an `i64`, it accepts a number or a decimal
//! string; asked for a set or a map, it accepts an empty `<value/>` as empty;
//! map keys are parsed from their string form. Errors carry the path to the
//! member that failed (`OpaqueRef:….memory_static_max`).

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;
use xenvault_types::rpc::Value;

/// A value that does not have the expected type, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Path elements from the outside in (struct member names, `[index]`).
    path: Vec<String>,
    message: String,
}

impl DecodeError {
    /// Where the error is: member names joined with `.`, indexes as `[i]`.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for p in &self.path {
            if !out.is_empty() && !p.starts_with('[') {
                out.push('.');
            }
            out.push_str(p);
        }
        out
    }

    /// What was wrong, without the path.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn inside(mut self, element: String) -> DecodeError {
        self.path.insert(0, element);
        self
    }

    /// Turns the error into the crate's [`crate::error::Error::Decode`],
    /// naming the call.
    pub fn for_method(self, method: &str) -> crate::error::Error {
        crate::error::Error::Decode {
            method: method.to_string(),
            path: self.path(),
            detail: self.message,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "at {}: {}", self.path(), self.message)
        }
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError {
            path: Vec::new(),
            message: msg.to_string(),
        }
    }
}

/// Decodes a typed value from an XAPI [`Value`].
pub fn from_value<'de, T: serde::Deserialize<'de>>(value: &'de Value) -> Result<T, DecodeError> {
    T::deserialize(ValueDeserializer(value))
}

/// A short description of a value for error messages (strings truncated).
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("string {short:?}…")
            } else {
                format!("string {short:?}")
            }
        }
        Value::Int(i) => format!("integer {i}"),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Double(d) => format!("double {d}"),
        Value::DateTime(s) => format!("dateTime {s:?}"),
        Value::Array(a) => format!("array of {}", a.len()),
        Value::Struct(m) => format!("struct of {} members", m.len()),
        Value::Nil => "nil".to_string(),
    }
}

fn mismatch(v: &Value, expected: &str) -> DecodeError {
    de::Error::custom(format!("expected {expected}, found {}", describe(v)))
}

/// An integer from a typed number or a decimal string (XML-RPC's int64).
fn integer(v: &Value) -> Result<i128, DecodeError> {
    match v {
        Value::Int(i) => Ok(i128::from(*i)),
        Value::String(s) => s
            .trim()
            .parse::<i128>()
            .map_err(|_| mismatch(v, "an integer")),
        Value::Double(d) if d.fract() == 0.0 && d.abs() < 9.0e15 => Ok(*d as i128),
        _ => Err(mismatch(v, "an integer")),
    }
}

fn float(v: &Value) -> Result<f64, DecodeError> {
    match v {
        Value::Double(d) => Ok(*d),
        Value::Int(i) => Ok(*i as f64),
        Value::String(s) => s.trim().parse().map_err(|_| mismatch(v, "a float")),
        _ => Err(mismatch(v, "a float")),
    }
}

/// Whether the value is an empty untyped `<value/>` or a nil, which XAPI
/// clients treat as an empty set or map.
fn is_empty_scalar(v: &Value) -> bool {
    matches!(v, Value::Nil) || matches!(v, Value::String(s) if s.is_empty())
}

/// The serde deserializer over a borrowed [`Value`].
#[derive(Clone, Copy)]
pub struct ValueDeserializer<'de>(pub &'de Value);

impl<'de> de::Deserializer<'de> for ValueDeserializer<'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::String(s) | Value::DateTime(s) => visitor.visit_borrowed_str(s),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Double(d) => visitor.visit_f64(*d),
            Value::Array(items) => visitor.visit_seq(SeqAccess {
                items: items.iter(),
                index: 0,
            }),
            Value::Struct(members) => visitor.visit_map(MapAccess {
                members: members.iter(),
                current: None,
            }),
            Value::Nil => visitor.visit_unit(),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Bool(b) => visitor.visit_bool(*b),
            // xapi always types booleans; accept the obvious strings anyway.
            Value::String(s) => match s.trim() {
                "1" | "true" => visitor.visit_bool(true),
                "0" | "false" => visitor.visit_bool(false),
                _ => Err(mismatch(self.0, "a boolean")),
            },
            Value::Int(i @ (0 | 1)) => visitor.visit_bool(*i == 1),
            other => Err(mismatch(other, "a boolean")),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_i64(visitor)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_i64(visitor)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_i64(visitor)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let n = integer(self.0)?;
        let n = i64::try_from(n).map_err(|_| mismatch(self.0, "a 64-bit signed integer"))?;
        visitor.visit_i64(n)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_i128(integer(self.0)?)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_u64(visitor)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_u64(visitor)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_u64(visitor)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let n = integer(self.0)?;
        let n = u64::try_from(n).map_err(|_| mismatch(self.0, "an unsigned 64-bit integer"))?;
        visitor.visit_u64(n)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let n = integer(self.0)?;
        let n = u128::try_from(n).map_err(|_| mismatch(self.0, "an unsigned integer"))?;
        visitor.visit_u128(n)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_f64(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_f64(float(self.0)?)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::String(s) | Value::DateTime(s) => visitor.visit_borrowed_str(s),
            // A JSON-RPC number where a string is expected: keep its digits.
            Value::Int(i) => visitor.visit_string(i.to_string()),
            Value::Double(d) => visitor.visit_string(d.to_string()),
            Value::Bool(b) => visitor.visit_borrowed_str(if *b { "true" } else { "false" }),
            other => Err(mismatch(other, "a string")),
        }
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(visitor)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::String(s) => visitor.visit_borrowed_bytes(s.as_bytes()),
            other => Err(mismatch(other, "a string")),
        }
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    /// A void result: XAPI sends `<value></value>` (an empty string), and
    /// the value carries no information, so any value is accepted.
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(SeqAccess {
                items: items.iter(),
                index: 0,
            }),
            v if is_empty_scalar(v) => visitor.visit_seq(SeqAccess {
                items: [].iter(),
                index: 0,
            }),
            other => Err(mismatch(other, "a set (array)")),
        }
    }
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Struct(members) => visitor.visit_map(MapAccess {
                members: members.iter(),
                current: None,
            }),
            v if is_empty_scalar(v) => visitor.visit_map(MapAccess {
                members: [].iter(),
                current: None,
            }),
            other => Err(mismatch(other, "a map or record (struct)")),
        }
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(mismatch(other, "an enum value (string)")),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }
}

struct SeqAccess<'de> {
    items: std::slice::Iter<'de, Value>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        seed.deserialize(ValueDeserializer(item))
            .map(Some)
            .map_err(|e| e.inside(format!("[{index}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'de> {
    members: std::slice::Iter<'de, (String, Value)>,
    current: Option<&'de (String, Value)>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some(member) = self.members.next() else {
            return Ok(None);
        };
        self.current = Some(member);
        seed.deserialize(KeyDeserializer(&member.0))
            .map(Some)
            .map_err(|e| e.inside(format!("{:?} (key)", member.0)))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let Some(member) = self.current.take() else {
            return Err(de::Error::custom("map value requested before its key"));
        };
        seed.deserialize(ValueDeserializer(&member.1))
            .map_err(|e| e.inside(member.0.clone()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.members.len())
    }
}

/// Map keys: XAPI stringifies every key (ints in decimal, enums by name,
/// refs as strings), so the key type decides how to read the string.
struct KeyDeserializer<'de>(&'de str);

impl<'de> KeyDeserializer<'de> {
    fn integer(&self) -> Result<i128, DecodeError> {
        self.0.trim().parse().map_err(|_| {
            de::Error::custom(format!("expected an integer map key, found {:?}", self.0))
        })
    }
}

impl<'de> de::Deserializer<'de> for KeyDeserializer<'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_borrowed_str(self.0)
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            "true" | "1" => visitor.visit_bool(true),
            "false" | "0" => visitor.visit_bool(false),
            other => Err(de::Error::custom(format!(
                "expected a boolean map key, found {other:?}"
            ))),
        }
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let n = i64::try_from(self.integer()?)
            .map_err(|_| de::Error::custom("map key out of the int64 range"))?;
        visitor.visit_i64(n)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_i64(visitor)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let n = u64::try_from(self.integer()?)
            .map_err(|_| de::Error::custom("map key out of the uint64 range"))?;
        visitor.visit_u64(n)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_u64(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let f = self.0.trim().parse().map_err(|_| {
            de::Error::custom(format!("expected a float map key, found {:?}", self.0))
        })?;
        visitor.visit_f64(f)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    forward_to_deserialize_any! {
        i8 i16 i128 u8 u16 u128 f32 char str string bytes byte_buf unit unit_struct seq
        tuple tuple_struct map struct identifier ignored_any
    }
}

/// Any XAPI value, kept as it came: for the parts of a result whose shape
/// depends on data (an event's `snapshot` is a record of the event's class).
#[derive(Debug, Clone, PartialEq)]
pub struct RawValue(pub Value);

impl<'de> serde::Deserialize<'de> for RawValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any XAPI value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                Ok(i64::try_from(v).map_or_else(|_| Value::String(v.to_string()), Value::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Double(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::String(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::String(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Nil)
            }
            fn visit_none<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Nil)
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(RawValue(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut members = Vec::new();
                while let Some((k, RawValue(v))) = map.next_entry::<String, RawValue>()? {
                    members.push((k, v));
                }
                Ok(Value::Struct(members))
            }
        }
        d.deserialize_any(RawVisitor).map(RawValue)
    }
}

impl serde::Serialize for RawValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.to_json().serialize(s)
    }
}

impl Default for RawValue {
    fn default() -> Self {
        RawValue(Value::Nil)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn integers_from_strings_and_numbers() {
        assert_eq!(
            from_value::<i64>(&Value::str("4294967296")).unwrap(),
            4_294_967_296
        );
        assert_eq!(from_value::<i64>(&Value::Int(-3)).unwrap(), -3);
        assert_eq!(
            from_value::<u64>(&Value::str("18446744073709551615")).unwrap(),
            u64::MAX
        );
        assert!(from_value::<i64>(&Value::str("18446744073709551615")).is_err());
        assert!(from_value::<i64>(&Value::str("12x")).is_err());
        assert_eq!(from_value::<f64>(&Value::str("0.25")).unwrap(), 0.25);
        assert_eq!(from_value::<f64>(&Value::Int(1)).unwrap(), 1.0);
    }

    #[test]
    fn empty_value_is_an_empty_set_or_map_or_string() {
        let empty = Value::str("");
        assert!(from_value::<Vec<String>>(&empty).unwrap().is_empty());
        assert!(
            from_value::<BTreeMap<String, String>>(&empty)
                .unwrap()
                .is_empty()
        );
        assert_eq!(from_value::<String>(&empty).unwrap(), "");
        assert!(from_value::<Vec<String>>(&Value::str("x")).is_err());
    }

    #[test]
    fn map_keys_are_parsed_by_type() {
        let v = Value::record([("1", Value::str("2")), ("30", Value::Int(40))]);
        let m: BTreeMap<i64, i64> = from_value(&v).unwrap();
        assert_eq!(m, BTreeMap::from([(1, 2), (30, 40)]));
        let bad = Value::record([("x", Value::str("2"))]);
        let err = from_value::<BTreeMap<i64, i64>>(&bad).unwrap_err();
        assert!(err.path().contains("\"x\""), "{err}");
    }

    #[test]
    fn errors_name_the_path() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Inner {
            size: i64,
        }
        let v = Value::record([(
            "OpaqueRef:a",
            Value::record([(
                "items",
                Value::Array(vec![Value::record([("size", Value::str("big"))])]),
            )]),
        )]);
        let err = from_value::<BTreeMap<String, BTreeMap<String, Vec<Inner>>>>(&v).unwrap_err();
        assert_eq!(err.path(), "OpaqueRef:a.items[0].size");
        assert!(err.message().contains("expected an integer"), "{err}");
    }

    #[test]
    fn raw_value_round_trips_structure() {
        let v = Value::record([
            ("a", Value::Array(vec![Value::Int(1), Value::Bool(true)])),
            ("b", Value::Nil),
        ]);
        let RawValue(back) = from_value(&v).unwrap();
        assert_eq!(back, v);
    }
}
