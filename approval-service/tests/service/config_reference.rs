//! docs/configuration.md against the code, for the approval service's TOML:
//! every accepted field is documented and every documented field is accepted.
//!
//! The accepted fields come from the code: a probe `zzz_probe = 1` makes the
//! TOML parser answer "unknown field `zzz_probe`, expected one of `a`, ...",
//! at the top level or inside a table / array of tables, which is also how
//! nested sections are found. The reference lives between
//! `<!-- reference:service -->` and `<!-- /reference:service -->`: `###`
//! headings (`Top level`, then `` `[[reviewers]]` `` / `` `[table]` ``) each
//! followed by a table whose rows start with the field name in backticks.
//! Every ```toml block in it must be a valid configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use countersign_approval::Config;

const PROBE: &str = "zzz_probe";
const DOC: &str = include_str!("../../../docs/configuration.md");
const START: &str = "<!-- reference:service -->";
const END: &str = "<!-- /reference:service -->";

/// TOML that puts `body` inside `section` (`reviewers[]`, `a.b`, ...).
fn wrap(section: &str, body: &str) -> String {
    let mut out = String::new();
    if !section.is_empty() {
        let parts: Vec<&str> = section.split('.').collect();
        for i in 0..parts.len() {
            let name = parts[..=i]
                .iter()
                .map(|p| p.trim_end_matches("[]"))
                .collect::<Vec<_>>()
                .join(".");
            if parts[i].ends_with("[]") {
                out.push_str(&format!("[[{name}]]\n"));
            } else {
                out.push_str(&format!("[{name}]\n"));
            }
        }
    }
    out.push_str(body);
    out.push('\n');
    out
}

fn expected_fields(message: &str) -> Option<Vec<String>> {
    let marker = format!("unknown field `{PROBE}`");
    let rest = &message[message.find(&marker)? + marker.len()..];
    let rest = rest.lines().next().unwrap_or_default();
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

fn fields_at(section: &str) -> Option<Vec<String>> {
    match Config::from_toml_str(&wrap(section, &format!("{PROBE} = 1"))) {
        Ok(_) => None,
        Err(e) => expected_fields(&e.to_string()),
    }
}

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
        .expect("docs/configuration.md has no <!-- reference:service --> marker");
    let end = DOC
        .find(END)
        .expect("docs/configuration.md has no <!-- /reference:service --> marker");
    &DOC[start + START.len()..end]
}

fn doc_sections() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in reference().lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            let name = if heading.trim() == "Top level" {
                String::new()
            } else {
                let raw = heading
                    .split('`')
                    .nth(1)
                    .unwrap_or_else(|| panic!("heading without a `section`: {line}"));
                match raw.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
                    Some(array) => array
                        .split('.')
                        .map(|p| format!("{p}[]"))
                        .collect::<Vec<_>>()
                        .join("."),
                    None => raw
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                }
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
            assert!(
                out.get_mut(section).unwrap().insert(field.clone()),
                "`{field}` documented twice in `{section}`"
            );
        }
    }
    out
}

#[test]
fn probe_finds_the_known_fields() {
    let code = code_sections();
    assert!(
        code[""].contains("listen") && code[""].contains("reviewers"),
        "{code:?}"
    );
    assert!(code["reviewers[]"].contains("token_sha256"), "{code:?}");
}

#[test]
fn every_accepted_field_is_documented() {
    let code = code_sections();
    let doc = doc_sections();
    let mut missing = Vec::new();
    for (section, fields) in &code {
        for field in fields {
            if !doc.get(section).is_some_and(|d| d.contains(field)) {
                missing.push(if section.is_empty() {
                    field.clone()
                } else {
                    format!("{section}.{field}")
                });
            }
        }
    }
    assert!(
        missing.is_empty(),
        "accepted by the service but not in docs/configuration.md: {missing:?}"
    );
}

#[test]
fn every_documented_field_is_accepted() {
    let code = code_sections();
    for (section, fields) in doc_sections() {
        let accepted = code
            .get(&section)
            .unwrap_or_else(|| panic!("docs/configuration.md documents section `{section}`, which the service does not have"));
        for field in fields {
            assert!(accepted.contains(&field), "docs/configuration.md documents `{field}` in `{section}`, which the service refuses");
        }
    }
}

#[test]
fn toml_examples_in_the_reference_are_valid() {
    let mut count = 0;
    let mut rest = reference();
    while let Some(start) = rest.find("```toml") {
        let body = &rest[start + "```toml".len()..];
        let end = body.find("```").expect("unclosed ```toml block");
        if let Err(e) = Config::from_toml_str(&body[..end]) {
            panic!(
                "invalid example in docs/configuration.md: {e}\n{}",
                &body[..end]
            );
        }
        count += 1;
        rest = &body[end + 3..];
    }
    assert!(count > 0, "the service reference has no ```toml example");
}
