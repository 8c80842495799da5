//! Strict JSON parsing for request bodies and for answers (plain, and each
//! event of a stream) wherever the filter reads them.
//!
//! A backend may read the *last* of two duplicate keys while a lenient parser
//! keeps the first (or the other way round); the reviewer would then approve
//! one prompt and the model would run another. So duplicate keys anywhere in a
//! body are an error, as are trailing bytes, a byte-order mark and nesting
//! deeper than serde_json's limit (128).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Value};

/// Parses `bytes` as one JSON document, refusing duplicate object keys.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, String> {
    strict(serde_json::Deserializer::from_slice(bytes))
}

/// [`parse_strict`] of text already known to be UTF-8 (a streamed event's
/// data): the same parse without checking the encoding again.
pub fn parse_strict_str(text: &str) -> Result<Value, String> {
    strict(serde_json::Deserializer::from_str(text))
}

/// One pass builds the value and finds duplicates (as costly as
/// `serde_json::from_slice`, which builds the same value).
fn strict<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
) -> Result<Value, String> {
    let value = StrictValue::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // One lookup per key: the entry both finds a duplicate and is
            // where the value goes.
            match out.entry(key) {
                Entry::Occupied(seen) => {
                    return Err(de::Error::custom(format!("duplicate key `{}`", seen.key())));
                }
                Entry::Vacant(slot) => {
                    let StrictValue(v) = map.next_value()?;
                    slot.insert(v);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accepts_ordinary_json() {
        let v = parse_strict(br#" {"a":[1,2.5,"x",null,true,{"b":{}}]} "#).unwrap();
        assert_eq!(v["a"][2], "x");
    }

    #[test]
    fn refuses_what_a_backend_might_read_differently() {
        for bad in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#,
            br#"{"a":1} {"a":2}"#,
            br#"{"a":1}garbage"#,
            b"\xef\xbb\xbf{}",
            b"{\"a\":\"\xff\"}",
            br#"{"a":1e999}"#,
            b"",
        ] {
            assert!(
                parse_strict(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse_strict(deep.as_bytes()).is_err());
    }

    #[test]
    fn text_and_bytes_parse_alike() {
        assert_eq!(
            parse_strict_str(r#"{"a":[1,"x"]}"#).unwrap(),
            parse_strict(br#"{"a":[1,"x"]}"#).unwrap()
        );
        assert!(parse_strict_str(r#"{"a":1,"a":2}"#).is_err());
        assert!(parse_strict_str(r#"{"a":{"b":1,"b":1}}"#).is_err());
    }

    #[test]
    fn unicode_escapes_are_decoded() {
        let v = parse_strict(br#"{"a":"\u0040x"}"#).unwrap();
        assert_eq!(v["a"], "@x");
    }
}
