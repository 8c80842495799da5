//! docs/configuration.md against the code, for the approval service's TOML:
//! every accepted field is documented and every documented field is accepted.
//!
//! The probing, the reading of the reference and the comparison are the
//! `config-reference` crate's (tests/config-reference), shared with the
//! plugin configuration's test: a probe `zzz_probe = 1` makes the TOML
//! parser answer "unknown field `zzz_probe`, expected one of `a`, ...", at
//! the top level or inside a table / array of tables, which is also how
//! nested sections are found. The reference lives between
//! `<!-- reference:service -->` and `<!-- /reference:service -->`: `###`
//! headings (`Top level`, then `` `[[reviewers]]` `` / `` `[table]` ``) each
//! followed by a table whose rows start with the field name in backticks.
//! Every ```toml block in it must be a valid configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use config_reference::{Reference, PROBE};
use countersign_approval::Config;

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

/// Parses `toml` as the service's configuration.
fn parse(toml: &str) -> Result<(), String> {
    Config::from_toml_str(toml)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn service_reference() -> Reference {
    Reference::read("service", |section| {
        parse(&wrap(section, &format!("{PROBE} = 1")))
    })
}

#[test]
fn probe_finds_the_known_fields() {
    service_reference().assert_code_has(&[
        ("", &["listen", "reviewers"]),
        ("reviewers[]", &["token_sha256"]),
    ]);
}

#[test]
fn every_accepted_field_is_documented() {
    service_reference().assert_every_accepted_field_documented();
}

#[test]
fn every_documented_field_is_accepted() {
    service_reference().assert_every_documented_field_accepted();
}

#[test]
fn toml_examples_in_the_reference_are_valid() {
    service_reference().assert_examples_valid("toml", parse);
}
