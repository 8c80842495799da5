//! docs/configuration.md against the code, for the tests of the plugin
//! configuration (`countersign-core`) and of the service's TOML
//! (`countersign-approval`): every accepted field is documented, every
//! documented field is accepted, and every example parses.
//!
//! The accepted fields come from the code itself: a probe with an unknown
//! field [`PROBE`] makes the parser answer "unknown field `zzz_probe`,
//! expected one of `a`, `b`, ..." at any depth, and a field is a nested
//! section when a probe placed inside it (as an object, or as the element of
//! a list) gets the same answer. Each crate says how to place a probe in its
//! format ([`Reference::read`]); the walk and the comparison are here.
//!
//! A reference lives between `<!-- reference:NAME -->` and
//! `<!-- /reference:NAME -->`: one `###` heading per section (`Top level`,
//! then the section in backticks) followed by a table whose rows start with
//! the field name in backticks.
//!
//! Sections are named by their path: field names joined by `.`, a list of
//! objects marked `[]` (`rules[]`, `identity.api_keys[]`, `reviewers[]`);
//! the top level is `""`.

// Test support: a finding fails the test that asked, with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

/// The field no section has.
pub const PROBE: &str = "zzz_probe";

const DOC: &str = include_str!("../../../docs/configuration.md");

/// Each section's fields, by section path.
pub type Sections = BTreeMap<String, BTreeSet<String>>;

/// One reference of docs/configuration.md and what the code accepts.
pub struct Reference {
    name: &'static str,
    text: &'static str,
    /// The sections and fields the parser accepts, found by probing.
    pub code: Sections,
    /// The sections and field rows of the reference.
    pub doc: Sections,
}

impl Reference {
    /// Reads the reference `name` (`plugin`, `service`) and probes the code:
    /// `parse_probe(section)` parses a configuration with [`PROBE`] placed
    /// at `section` and returns the parser's error message.
    pub fn read(name: &'static str, parse_probe: impl Fn(&str) -> Result<(), String>) -> Reference {
        let text = reference_text(name);
        let fields_at = |section: &str| match parse_probe(section) {
            Ok(()) => None,
            Err(message) => expected_fields(&message),
        };
        Reference {
            name,
            text,
            code: code_sections(fields_at),
            doc: doc_sections(text),
        }
    }

    /// Fails unless the probe found each section with (at least) its
    /// fields: guards the probing itself against a change in the parser's
    /// wording.
    #[track_caller]
    pub fn assert_code_has(&self, expected: &[(&str, &[&str])]) {
        for (section, fields) in expected {
            let found = self.code.get(*section).unwrap_or_else(|| {
                panic!(
                    "the probe did not find section `{section}`: {:?}",
                    self.code
                )
            });
            for field in *fields {
                assert!(
                    found.contains(*field),
                    "the probe did not find `{field}` in `{section}`: {:?}",
                    self.code
                );
            }
        }
    }

    /// Fails naming every field the code accepts that the reference does
    /// not document.
    #[track_caller]
    pub fn assert_every_accepted_field_documented(&self) {
        let mut missing = Vec::new();
        for (section, fields) in &self.code {
            let documented = self.doc.get(section);
            for field in fields {
                if !documented.is_some_and(|d| d.contains(field)) {
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
            "accepted by the {} configuration's parser but not in docs/configuration.md \
             (add a table row under the section's ### heading): {missing:?}",
            self.name
        );
    }

    /// Fails at the first documented section or field the code does not
    /// have.
    #[track_caller]
    pub fn assert_every_documented_field_accepted(&self) {
        for (section, fields) in &self.doc {
            let accepted = self.code.get(section).unwrap_or_else(|| {
                panic!(
                    "docs/configuration.md documents section `{section}`, which the {} configuration does not have",
                    self.name
                )
            });
            for field in fields {
                assert!(
                    accepted.contains(field),
                    "docs/configuration.md documents `{field}` in `{section}`, which the {} configuration refuses",
                    self.name
                );
            }
        }
    }

    /// Fails unless the reference has ```` ```LANG ```` examples and `parse`
    /// accepts each of them.
    #[track_caller]
    pub fn assert_examples_valid(&self, lang: &str, parse: impl Fn(&str) -> Result<(), String>) {
        let fence = format!("```{lang}");
        let mut count = 0;
        let mut rest = self.text;
        while let Some(start) = rest.find(&fence) {
            let body = &rest[start + fence.len()..];
            let end = body
                .find("```")
                .unwrap_or_else(|| panic!("unclosed {fence} block"));
            let example = &body[..end];
            if let Err(e) = parse(example) {
                panic!("invalid example in docs/configuration.md: {e}\n{example}");
            }
            count += 1;
            rest = &body[end + 3..];
        }
        assert!(
            count > 0,
            "the {} reference has no {fence} example",
            self.name
        );
    }
}

fn reference_text(name: &str) -> &'static str {
    let start_marker = format!("<!-- reference:{name} -->");
    let end_marker = format!("<!-- /reference:{name} -->");
    let start = DOC
        .find(&start_marker)
        .unwrap_or_else(|| panic!("docs/configuration.md has no {start_marker} marker"));
    let end = DOC
        .find(&end_marker)
        .unwrap_or_else(|| panic!("docs/configuration.md has no {end_marker} marker"));
    &DOC[start + start_marker.len()..end]
}

/// The field names a parser lists after "unknown field `zzz_probe`" (on the
/// same line: a TOML error goes on with the offending source lines).
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

/// Every section the code accepts, with its fields, found by probing from
/// the top level; `fields_at(section)` is `None` when `section` is not an
/// object section.
fn code_sections(fields_at: impl Fn(&str) -> Option<Vec<String>>) -> Sections {
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

/// The section path a `###` heading names: `Top level`, a path as written
/// (`` `rules[]` ``), or a TOML table header (`` `[a.b]` ``,
/// `` `[[reviewers]]` ``).
fn heading_section(line: &str, heading: &str) -> String {
    if heading.trim() == "Top level" {
        return String::new();
    }
    let raw = heading
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("heading without a `section`: {line}"));
    if let Some(array) = raw.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
        array
            .split('.')
            .map(|p| format!("{p}[]"))
            .collect::<Vec<_>>()
            .join(".")
    } else if let Some(table) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        table.to_string()
    } else {
        raw.to_string()
    }
}

/// Sections and field rows of a reference.
fn doc_sections(reference: &str) -> Sections {
    let mut out = Sections::new();
    let mut current: Option<String> = None;
    for line in reference.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            let name = heading_section(line, heading);
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
