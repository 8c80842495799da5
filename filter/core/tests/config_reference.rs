//! docs/configuration.md against the code: every field the plugin
//! configuration accepts is documented, and every documented field is
//! accepted.
//!
//! The accepted fields come from the code itself: a probe object with an
//! unknown field makes serde answer "unknown field `zzz_probe`, expected one
//! of `a`, `b`, ..." at any depth, and a field is a nested section when a probe
//! placed inside it (as an object, or as the element of a list) gets the same
//! answer. So adding a field, or a nested object, without documenting it
//! fails here, and so does documenting a field that does not exist.
//!
//! The reference lives between `<!-- reference:plugin -->` and
//! `<!-- /reference:plugin -->`: one `###` heading per section (`Top level`,
//! then the section's path in backticks, e.g. `rules[]`, `identity.api_keys[]`)
//! followed by a table whose rows start with the field name in backticks.
//! Every ```json block in it must be a valid configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use countersign_core::config::Config;
use serde_json::{json, Value};

const PROBE: &str = "zzz_probe";
const DOC: &str = include_str!("../../../docs/configuration.md");
const START: &str = "<!-- reference:plugin -->";
const END: &str = "<!-- /reference:plugin -->";

/// Wraps `inner` at `section` (e.g. `identity.api_keys[]`).
fn wrap(section: &str, inner: Value) -> Value {
    if section.is_empty() {
        return inner;
    }
    section
        .split('.')
        .rev()
        .fold(inner, |acc, part| match part.strip_suffix("[]") {
            Some(name) => json!({ name: [acc] }),
            None => json!({ part: acc }),
        })
}

/// The field names serde lists after "unknown field `zzz_probe`".
fn expected_fields(message: &str) -> Option<Vec<String>> {
    let marker = format!("unknown field `{PROBE}`");
    let rest = &message[message.find(&marker)? + marker.len()..];
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// The fields accepted in `section`, if it is an object section.
fn fields_at(section: &str) -> Option<Vec<String>> {
    let probe = wrap(section, json!({ PROBE: 1 }));
    match Config::from_json(probe.to_string().as_bytes()) {
        Ok(_) => None,
        Err(e) => expected_fields(&e.message),
    }
}

/// Every section the code accepts, with its fields, found by probing.
fn code_sections() -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![String::new()];
    while let Some(section) = todo.pop() {
        let fields = fields_at(&section)
            .unwrap_or_else(|| panic!("section `{section}` does not answer the probe"));
        for field in &fields {
            let child = if section.is_empty() {
                field.clone()
            } else {
                format!("{section}.{field}")
            };
            for candidate in [child.clone(), format!("{child}[]")] {
                if fields_at(&candidate).is_some() {
                    todo.push(candidate);
                    break;
                }
            }
        }
        out.insert(section, fields.into_iter().collect());
    }
    out
}

fn reference() -> &'static str {
    let start = DOC
        .find(START)
        .expect("docs/configuration.md has no <!-- reference:plugin --> marker");
    let end = DOC
        .find(END)
        .expect("docs/configuration.md has no <!-- /reference:plugin --> marker");
    &DOC[start + START.len()..end]
}

/// Sections and field rows of the reference.
fn doc_sections() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in reference().lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            let name = if heading.trim() == "Top level" {
                String::new()
            } else {
                heading
                    .split('`')
                    .nth(1)
                    .unwrap_or_else(|| panic!("heading without a `section`: {line}"))
                    .to_string()
            };
            assert!(
                !out.contains_key(&name),
                "section `{name}` documented twice"
            );
            out.insert(name.clone(), BTreeSet::new());
            current = Some(name);
        } else if let Some(row) = line.strip_prefix("| `") {
            let field = row.split('`').next().unwrap_or_default().to_string();
            let section = current
                .as_ref()
                .unwrap_or_else(|| panic!("table row before any ### heading: {line}"));
            let fields = out.get_mut(section).unwrap();
            assert!(
                fields.insert(field.clone()),
                "`{field}` documented twice in section `{section}`"
            );
        }
    }
    out
}

#[test]
fn probe_finds_the_known_fields() {
    // Guards the probing itself against a serde wording change.
    let code = code_sections();
    assert!(
        code[""].contains("hold_timeout_ms") && code[""].contains("rules"),
        "{code:?}"
    );
    assert!(
        code["rules[]"].contains("model") && code["rules[]"].contains("action"),
        "{code:?}"
    );
    assert!(
        code.contains_key("endpoints[]") && code.contains_key("passthrough[]"),
        "{code:?}"
    );
}

#[test]
fn every_accepted_field_is_documented() {
    let code = code_sections();
    let doc = doc_sections();
    let mut missing = Vec::new();
    for (section, fields) in &code {
        let documented = doc.get(section);
        for field in fields {
            if !documented.is_some_and(|d| d.contains(field)) {
                let at = if section.is_empty() {
                    field.clone()
                } else {
                    format!("{section}.{field}")
                };
                missing.push(at);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "accepted by Config::from_json but not in docs/configuration.md (add a table row under the section's ### heading): {missing:?}"
    );
}

#[test]
fn every_documented_field_is_accepted() {
    let code = code_sections();
    for (section, fields) in doc_sections() {
        assert!(
            code.contains_key(&section),
            "docs/configuration.md documents section `{section}`, which the code does not have"
        );
        for field in fields {
            // Present (as null) at its place, the field may be refused for its
            // value, never as unknown.
            let probe = wrap(&section, json!({ field.clone(): null }));
            if let Err(e) = Config::from_json(probe.to_string().as_bytes()) {
                assert!(
                    !e.message.contains(&format!("unknown field `{field}`")),
                    "docs/configuration.md documents `{section}` `{field}`, which the code refuses: {e}"
                );
            }
            assert!(
                code[&section].contains(&field),
                "`{field}` is not a field of `{section}`"
            );
        }
    }
}

#[test]
fn json_examples_in_the_reference_are_valid() {
    let mut count = 0;
    let mut rest = reference();
    while let Some(start) = rest.find("```json") {
        let body = &rest[start + "```json".len()..];
        let end = body.find("```").expect("unclosed ```json block");
        let example = &body[..end];
        if let Err(e) = Config::from_json(example.as_bytes()) {
            panic!("invalid example in docs/configuration.md: {e}\n{example}");
        }
        count += 1;
        rest = &body[end + 3..];
    }
    assert!(count > 0, "the plugin reference has no ```json example");
}
