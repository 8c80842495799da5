//! Reading YAML files: documents, template placeholders, protobuf-JSON
//! numbers and durations, and the lenient serde helpers the typed views of
//! manifests are built with.
//!
//! The checks read only the fields they need and say nothing about a field
//! of another type than expected: Envoy's validator and the Kubernetes API
//! server do that. So a field of the wrong type reads as absent, exactly as
//! `Value::pointer` would, instead of failing the whole document.

use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use serde_json::Value;

/// Parses every YAML document of a file into JSON values (empty documents
/// are skipped).
pub(super) fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| e.to_string())?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Finds the first `{{NAME}}` placeholder outside comments: (line, NAME).
pub(super) fn find_placeholder(text: &str) -> Option<(usize, String)> {
    for (n, line) in text.lines().enumerate() {
        let code = line.split_once(" #").map_or(line, |(c, _)| c);
        if code.trim_start().starts_with('#') {
            continue;
        }
        if let Some(start) = code.find("{{") {
            let rest = &code[start + 2..];
            if let Some(end) = rest.find("}}") {
                let name = rest[..end].trim();
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Some((n + 1, name.to_string()));
                }
            }
        }
    }
    None
}

/// `value` as a `T`, or `None` when it has another shape. Arrays never make
/// a struct (serde would fill its fields by position).
fn typed<T: DeserializeOwned>(value: Value) -> Option<T> {
    if value.is_array() {
        return None;
    }
    T::deserialize(value).ok()
}

/// serde `deserialize_with` for `Option<T>` fields (with `default`): the
/// value when it has the expected type, `None` otherwise.
pub(super) fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    Ok(typed(Value::deserialize(d)?))
}

/// serde `deserialize_with` for `Vec<T>` fields (with `default`): the items of
/// an array, each one `T::default()` when it has another shape (so indexes
/// in messages stay those of the file); no items when it is not an array.
pub(super) fn lenient_items<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| typed(item).unwrap_or_default())
            .collect(),
        _ => Vec::new(),
    })
}

/// serde `deserialize_with` for `Option<Value>` fields (with `default`)
/// whose presence matters: `Some` whenever the key is there, `null` too.
pub(super) fn present<'de, D>(d: D) -> Result<Option<Value>, D::Error>
where
    D: Deserializer<'de>,
{
    Value::deserialize(d).map(Some)
}

/// serde `deserialize_with` for protobuf-JSON 64-bit integers: a number or
/// a string holding one; `None` for anything else.
pub(super) fn proto_u64<'de, D>(d: D) -> Result<Option<u64>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(as_u64(&Value::deserialize(d)?))
}

/// A number, or a string holding one (protobuf JSON writes 64-bit integers
/// as strings).
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A typed view of a value; the default (every field absent) when it has
/// another shape.
pub(super) fn view<T: DeserializeOwned + Default>(value: &Value) -> T {
    typed(value.clone()).unwrap_or_default()
}

/// The string field `key` of an object, if it is one.
pub(super) fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// Collects the values of every `key` under `v`, at any depth.
pub(super) fn find_key<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == key {
                    out.push(child);
                } else {
                    find_key(child, key, out);
                }
            }
        }
        Value::Array(items) => {
            for child in items {
                find_key(child, key, out);
            }
        }
        _ => {}
    }
}

/// A plugin configuration given inline in a manifest, as JSON text (empty
/// when absent).
pub(super) fn json_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(v) => v.to_string(),
    }
}

/// Reads a duration: protobuf JSON (`"3600s"`, `"0.5s"`), Gateway API / Go
/// style (`"1h30m"`, `"500ms"`), or `{seconds, nanos}`. In milliseconds.
pub(super) fn duration_ms(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => parse_duration_ms(s),
        Value::Object(m) => {
            let secs = m.get("seconds").map_or(Some(0), as_u64)?;
            let nanos = m.get("nanos").map_or(Some(0), as_u64)?;
            Some(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000))
        }
        _ => None,
    }
}

fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let factor = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * factor;
    }
    if total.is_finite() && total >= 0.0 {
        // Durations here are far below 2^53 ms; rounding is intended.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = total.round() as u64;
        Some(ms)
    } else {
        None
    }
}

/// A duration for a message: whole seconds as `300s`, else `1500ms`.
pub(super) fn show_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde::Deserialize;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("3600s"), Some(3_600_000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        assert_eq!(parse_duration_ms("0.5s"), Some(500));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("soon"), None);
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(
            duration_ms(&serde_json::json!({"seconds": 2, "nanos": 5_000_000})),
            Some(2005)
        );
    }

    #[test]
    fn placeholder_detection_ignores_comments() {
        assert_eq!(
            find_placeholder("# {{X}} in a comment\na: 1 # {{Y}}\n"),
            None
        );
        assert_eq!(
            find_placeholder("a: '{{FILTER_CONFIG}}'\n"),
            Some((1, "FILTER_CONFIG".into()))
        );
    }

    #[derive(Deserialize, Default, Debug, PartialEq)]
    #[serde(default)]
    struct Inner {
        #[serde(deserialize_with = "lenient")]
        name: Option<String>,
    }

    #[derive(Deserialize, Default, Debug, PartialEq)]
    #[serde(default)]
    struct Outer {
        #[serde(deserialize_with = "lenient")]
        inner: Option<Inner>,
        #[serde(deserialize_with = "lenient_items")]
        items: Vec<Inner>,
        #[serde(deserialize_with = "present")]
        marker: Option<Value>,
        #[serde(deserialize_with = "proto_u64")]
        limit: Option<u64>,
    }

    #[test]
    fn fields_of_another_type_read_as_absent() {
        let named = |n: &str| Inner {
            name: Some(n.into()),
        };
        let v = serde_json::json!({
            "inner": {"name": "a"}, "items": [{"name": "b"}, "x", {"name": 5}, [1]],
            "marker": null, "limit": "42"
        });
        assert_eq!(
            view::<Outer>(&v),
            Outer {
                inner: Some(named("a")),
                items: vec![
                    named("b"),
                    Inner::default(),
                    Inner::default(),
                    Inner::default()
                ],
                marker: Some(Value::Null),
                limit: Some(42),
            }
        );
        let v = serde_json::json!({"inner": ["a"], "items": {"name": "b"}, "limit": -1});
        assert_eq!(view::<Outer>(&v), Outer::default());
        assert_eq!(view::<Outer>(&serde_json::json!("text")), Outer::default());
    }
}
