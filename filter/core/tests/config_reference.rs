//! docs/configuration.md against the code: every field the plugin
//! configuration accepts is documented, and every documented field is
//! accepted.
//!
//! The probing, the reading of the reference and the comparison are the
//! `config-reference` crate's (tests/config-reference), shared with the
//! service's TOML; here is how a probe is placed in the JSON. So adding a
//! field, or a nested object, without documenting it fails here, and so
//! does documenting a field that does not exist.
//!
//! The reference lives between `<!-- reference:plugin -->` and
//! `<!-- /reference:plugin -->`: one `###` heading per section (`Top level`,
//! then the section's path in backticks, e.g. `rules[]`, `identity.api_keys[]`)
//! followed by a table whose rows start with the field name in backticks.
//! Every ```json block in it must be a valid configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use config_reference::{Reference, PROBE};
use countersign_core::config::{Config, ConfigError};
use serde_json::{json, Value};

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

/// Parses a configuration with `object` at `section`.
fn parse_at(section: &str, object: Value) -> Result<Config, ConfigError> {
    Config::from_json(wrap(section, object).to_string().as_bytes())
}

fn plugin_reference() -> Reference {
    Reference::read("plugin", |section| {
        parse_at(section, json!({ PROBE: 1 }))
            .map(drop)
            .map_err(|e| e.message)
    })
}

#[test]
fn probe_finds_the_known_fields() {
    plugin_reference().assert_code_has(&[
        ("", &["hold_timeout_ms", "rules"]),
        ("rules[]", &["model", "action"]),
        ("endpoints[]", &[]),
        ("passthrough[]", &[]),
    ]);
}

#[test]
fn every_accepted_field_is_documented() {
    plugin_reference().assert_every_accepted_field_documented();
}

#[test]
fn every_documented_field_is_accepted() {
    let reference = plugin_reference();
    reference.assert_every_documented_field_accepted();
    for (section, fields) in &reference.doc {
        for field in fields {
            // Present (as null) at its place, the field may be refused for its
            // value, never as unknown.
            if let Err(e) = parse_at(section, json!({ field.clone(): null })) {
                assert!(
                    !e.message.contains(&format!("unknown field `{field}`")),
                    "docs/configuration.md documents `{section}` `{field}`, which the code refuses: {e}"
                );
            }
        }
    }
}

#[test]
fn json_examples_in_the_reference_are_valid() {
    plugin_reference().assert_examples_valid("json", |example| {
        Config::from_json(example.as_bytes())
            .map(drop)
            .map_err(|e| e.to_string())
    });
}
