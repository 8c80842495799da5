//! The plugin configuration written as a YAML map in Envoy
//! (`"@type": type.googleapis.com/google.protobuf.Struct`). Envoy hands a
//! Wasm plugin the text of a `StringValue` configuration, but for any other
//! type the protobuf encoding of the message: a Struct arrives as its wire
//! bytes (measured in Envoy 1.40). This turns them into JSON text for the
//! one configuration parser, so both forms are read, checked and reported
//! the same way.
//!
//! Struct numbers are doubles: an integral one within 2^53 is written as an
//! integer (`300000`, not `300000.0`), so integer fields read as they do
//! from JSON. The JSON is written key by key, so a key given twice reaches
//! the parser twice and is refused there as in JSON text.

use std::fmt::Write as _;

/// Deepest nesting accepted (objects and lists), far beyond any real
/// configuration: bounds the recursion.
const MAX_DEPTH: usize = 64;

/// Integers up to this magnitude are exact in a double.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// The JSON text of `bytes` when they are the protobuf encoding of a
/// `google.protobuf.Struct`; `None` when they are JSON text (or nothing).
///
/// A Struct with fields starts with byte 0x0a (its field 1, length
/// delimited), which in text is a newline: bytes that parse as JSON are
/// JSON, others starting with 0x0a are a Struct.
pub(crate) fn json_text(bytes: &[u8]) -> Option<Result<String, String>> {
    if bytes.first() != Some(&0x0a)
        || serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return None;
    }
    let mut out = String::new();
    Some(write_struct(bytes, &mut out, 0).map(|()| out).map_err(|e| {
        format!("the configuration is neither JSON nor a google.protobuf.Struct: {e}")
    }))
}

/// The JSON text the filter reads for a Struct configuration written as
/// `map` in the Envoy YAML: Envoy carries every number as a double, so
/// numbers are written as [`json_text`] writes them (`check-config` reads
/// the YAML, not the wire bytes).
pub fn struct_json_text(
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, String> {
    let mut out = String::new();
    write_object(map, &mut out, 0)?;
    Ok(out)
}

fn write_object(
    map: &serde_json::Map<String, serde_json::Value>,
    out: &mut String,
    depth: usize,
) -> Result<(), String> {
    let depth = deeper(depth)?;
    out.push('{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(key, out);
        out.push(':');
        write_json(value, out, depth)?;
    }
    out.push('}');
    Ok(())
}

fn write_json(value: &serde_json::Value, out: &mut String, depth: usize) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n.as_f64().ok_or("a number JSON cannot hold")?, out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            let depth = deeper(depth)?;
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out, depth)?;
            }
            out.push(']');
        }
        Value::Object(map) => write_object(map, out, depth)?,
    }
    Ok(())
}

/// Wire types of the protobuf encoding.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH_DELIMITED: u64 = 2;

/// Reads protobuf wire format from a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn byte(&mut self) -> Result<u8, String> {
        let (&first, rest) = self.rest.split_first().ok_or("truncated")?;
        self.rest = rest;
        Ok(first)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    /// The next field's number and wire type.
    fn tag(&mut self) -> Result<(u64, u64), String> {
        let tag = self.varint()?;
        Ok((tag >> 3, tag & 7))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let (head, rest) = self.rest.split_at_checked(len).ok_or("truncated")?;
        self.rest = rest;
        Ok(head)
    }

    fn length_delimited(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "a length too large")?;
        self.take(len)
    }

    fn fixed64(&mut self) -> Result<u64, String> {
        let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| "truncated")?;
        Ok(u64::from_le_bytes(bytes))
    }
}

fn unexpected(message: &str, number: u64, wire_type: u64) -> String {
    format!("unexpected field {number} (wire type {wire_type}) in {message}")
}

fn deeper(depth: usize) -> Result<usize, String> {
    if depth >= MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(depth + 1)
}

/// `Struct { map<string, Value> fields = 1; }` as a JSON object.
fn write_struct(bytes: &[u8], out: &mut String, depth: usize) -> Result<(), String> {
    write_repeated(bytes, out, depth, ('{', '}'), "a Struct", write_entry)
}

/// `ListValue { repeated Value values = 1; }` as a JSON array.
fn write_list(bytes: &[u8], out: &mut String, depth: usize) -> Result<(), String> {
    write_repeated(bytes, out, depth, ('[', ']'), "a ListValue", write_value)
}

/// A message whose only field (1) is repeated and length delimited: each
/// item written by `write_item`, comma separated, between `brackets`.
fn write_repeated(
    bytes: &[u8],
    out: &mut String,
    depth: usize,
    brackets: (char, char),
    message: &str,
    write_item: fn(&[u8], &mut String, usize) -> Result<(), String>,
) -> Result<(), String> {
    let depth = deeper(depth)?;
    let mut reader = Reader::new(bytes);
    out.push(brackets.0);
    let mut first = true;
    while !reader.is_empty() {
        match reader.tag()? {
            (1, LENGTH_DELIMITED) => {
                if !first {
                    out.push(',');
                }
                first = false;
                write_item(reader.length_delimited()?, out, depth)?;
            }
            (number, wire_type) => return Err(unexpected(message, number, wire_type)),
        }
    }
    out.push(brackets.1);
    Ok(())
}

/// One map entry: `key = 1` (string), `value = 2` (Value).
fn write_entry(bytes: &[u8], out: &mut String, depth: usize) -> Result<(), String> {
    let mut reader = Reader::new(bytes);
    let (mut key, mut value) = (None, None);
    while !reader.is_empty() {
        match reader.tag()? {
            (1, LENGTH_DELIMITED) => key = Some(reader.length_delimited()?),
            (2, LENGTH_DELIMITED) => value = Some(reader.length_delimited()?),
            (number, wire_type) => return Err(unexpected("a Struct field", number, wire_type)),
        }
    }
    let key =
        std::str::from_utf8(key.unwrap_or_default()).map_err(|_| "a key that is not UTF-8")?;
    write_string(key, out);
    out.push(':');
    write_value(
        value.ok_or_else(|| format!("field {key:?} has no value"))?,
        out,
        depth,
    )
}

/// `Value`: exactly one of null (1), number (2), string (3), bool (4),
/// struct (5), list (6).
fn write_value(bytes: &[u8], out: &mut String, depth: usize) -> Result<(), String> {
    let mut reader = Reader::new(bytes);
    let kind = reader
        .tag()
        .map_err(|_| "a Value with no kind set".to_string())?;
    match kind {
        (1, VARINT) => {
            reader.varint()?;
            out.push_str("null");
        }
        (2, FIXED64) => write_number(f64::from_bits(reader.fixed64()?), out)?,
        (3, LENGTH_DELIMITED) => {
            let text = std::str::from_utf8(reader.length_delimited()?)
                .map_err(|_| "a string that is not UTF-8")?;
            write_string(text, out);
        }
        (4, VARINT) => out.push_str(if reader.varint()? != 0 {
            "true"
        } else {
            "false"
        }),
        (5, LENGTH_DELIMITED) => write_struct(reader.length_delimited()?, out, depth)?,
        (6, LENGTH_DELIMITED) => write_list(reader.length_delimited()?, out, depth)?,
        (number, wire_type) => return Err(unexpected("a Value", number, wire_type)),
    }
    if !reader.is_empty() {
        return Err("a Value with more than one kind set".into());
    }
    Ok(())
}

fn write_number(number: f64, out: &mut String) -> Result<(), String> {
    if !number.is_finite() {
        return Err(format!("a number JSON cannot hold ({number})"));
    }
    if number.fract() == 0.0 && number.abs() <= MAX_EXACT_INTEGER {
        // Exact: the magnitude is checked above.
        #[allow(clippy::cast_possible_truncation)]
        let integer = number as i64;
        let _ = write!(out, "{integer}");
    } else {
        let _ = write!(out, "{number}");
    }
    Ok(())
}

fn write_string(text: &str, out: &mut String) {
    // Serialising a str cannot fail.
    out.push_str(&serde_json::Value::from(text).to_string());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A minimal protobuf encoder for the test inputs (what Envoy sends).
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn field(number: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | LENGTH_DELIMITED, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }
    fn value(v: &serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        match v {
            serde_json::Value::Null => out.extend_from_slice(&[0x08, 0x00]),
            serde_json::Value::Number(n) => {
                out.push(0x11);
                out.extend_from_slice(&n.as_f64().unwrap().to_bits().to_le_bytes());
            }
            serde_json::Value::String(s) => field(3, s.as_bytes(), &mut out),
            serde_json::Value::Bool(b) => out.extend_from_slice(&[0x20, u8::from(*b)]),
            serde_json::Value::Object(_) => field(5, &encode(v), &mut out),
            serde_json::Value::Array(items) => {
                let mut list = Vec::new();
                for item in items {
                    field(1, &value(item), &mut list);
                }
                field(6, &list, &mut out);
            }
        }
        out
    }
    fn encode(v: &serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, item) in v.as_object().unwrap() {
            let mut entry = Vec::new();
            field(1, key.as_bytes(), &mut entry);
            field(2, &value(item), &mut entry);
            field(1, &entry, &mut out);
        }
        out
    }

    #[test]
    fn a_struct_becomes_the_json_it_holds() {
        let config = serde_json::json!({
            "approval_cluster": "countersign_approval",
            "hold_timeout_ms": 300000,
            "ratio": 0.5,
            "negative": -3,
            "nothing": null,
            "flag": true,
            "off": false,
            "quote": "it's \"quoted\" \u{e9}",
            "rules": [{"name": "a", "model": "demo-allow*", "action": "allow"}, [], {}],
        });
        let text = json_text(&encode(&config)).unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            config
        );
        // Integral numbers are written as integers.
        assert!(text.contains("\"hold_timeout_ms\":300000,"), "{text}");
        assert!(text.contains("\"negative\":-3,"), "{text}");
    }

    #[test]
    fn a_yaml_map_reads_as_its_wire_bytes_would() {
        let config = serde_json::json!({
            "hold_timeout_ms": 300000.0, "ratio": 0.25, "rules": [{"name": "it's", "n": 2}], "x": null, "b": true,
        });
        let from_wire = json_text(&encode(&config)).unwrap().unwrap();
        assert_eq!(
            struct_json_text(config.as_object().unwrap()).unwrap(),
            from_wire
        );
        assert!(
            from_wire.contains("\"hold_timeout_ms\":300000"),
            "{from_wire}"
        );
    }

    #[test]
    fn json_text_and_empty_input_are_left_to_the_json_parser() {
        assert!(json_text(b"").is_none());
        assert!(json_text(b"{\"a\":1}").is_none());
        // A newline first is still JSON text when it parses.
        assert!(json_text(b"\n{\"a\":1}\n").is_none());
        assert!(json_text(b"  {bad").is_none());
    }

    #[test]
    fn a_broken_encoding_is_an_error_not_a_guess() {
        let good = encode(&serde_json::json!({"a": "b"}));
        let truncated = &good[..good.len() - 1];
        let e = json_text(truncated).unwrap().unwrap_err();
        assert!(
            e.contains("neither JSON nor a google.protobuf.Struct"),
            "{e}"
        );
        // An entry without a value; a Value with two kinds; an unknown field.
        let mut entry = Vec::new();
        field(1, b"a", &mut entry);
        let mut no_value = Vec::new();
        field(1, &entry, &mut no_value);
        assert!(json_text(&no_value)
            .unwrap()
            .unwrap_err()
            .contains("\"a\" has no value"));
        let mut two = value(&serde_json::json!(true));
        two.extend(value(&serde_json::json!(false)));
        let mut entry = Vec::new();
        field(1, b"a", &mut entry);
        field(2, &two, &mut entry);
        let mut both = Vec::new();
        field(1, &entry, &mut both);
        assert!(json_text(&both)
            .unwrap()
            .unwrap_err()
            .contains("more than one kind"));
        let mut unknown = good.clone();
        unknown.extend_from_slice(&[0x10, 0x01]);
        assert!(json_text(&unknown)
            .unwrap()
            .unwrap_err()
            .contains("unexpected field 2"));
    }

    #[test]
    fn non_finite_numbers_and_deep_nesting_are_refused() {
        let mut nan = Vec::new();
        nan.push(0x11);
        nan.extend_from_slice(&f64::NAN.to_bits().to_le_bytes());
        let mut entry = Vec::new();
        field(1, b"n", &mut entry);
        field(2, &nan, &mut entry);
        let mut config = Vec::new();
        field(1, &entry, &mut config);
        assert!(json_text(&config)
            .unwrap()
            .unwrap_err()
            .contains("a number JSON cannot hold"));

        let mut deep = serde_json::json!({});
        for _ in 0..MAX_DEPTH {
            deep = serde_json::json!({ "a": deep });
        }
        assert!(json_text(&encode(&deep))
            .unwrap()
            .unwrap_err()
            .contains("nested deeper"));
    }

    #[test]
    fn a_key_given_twice_stays_twice_for_the_parser_to_refuse() {
        let mut config = encode(&serde_json::json!({"a": 1}));
        config.extend(encode(&serde_json::json!({"a": 2})));
        assert_eq!(json_text(&config).unwrap().unwrap(), "{\"a\":1,\"a\":2}");
    }
}
