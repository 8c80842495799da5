//! Masking output, byte for byte, against goldens written by the code as it
//! was before the masking engine was made faster (issue #17): the
//! benchmark's request bodies (`tests/bench/workloads.py`, 2 KB and 20 KB,
//! with and without matches) and every text of the detector corpus
//! (`tests/corpus/`), masked by all built-in detectors at once with
//! `redact` and with `pseudonymize` + `restore`. Any change in what is
//! masked, where, with which placeholder, or in the counts, fails here.
//!
//! `MASK_GOLDEN_WRITE=1` rewrites the goldens instead of comparing: only for
//! an intended change of masking behaviour, never to make a speed-up pass.

// Reads fixtures from disk, which the wasm32 test runner cannot do.
#![cfg(not(target_os = "wasi"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::path::PathBuf;

use countersign_core::mask::{mask_request, MaskPolicy, MaskingConfig};
use countersign_core::wire::ApiKind;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn policy(action: &str, restore: bool) -> MaskPolicy {
    let config = json!({
        "salt": "golden-salt-0123456789abcdef",
        "profiles": {"default": {"detectors": {"*": action}, "restore": restore}},
    });
    let config = MaskingConfig::from_json(config.to_string().as_bytes()).unwrap();
    config.default_profile().unwrap().clone()
}

/// Everything `mask_request` says about `body`, as text.
fn describe(policy: &MaskPolicy, body: &[u8]) -> String {
    let out = mask_request(policy, ApiKind::OpenaiChat, body).unwrap();
    let mut s = String::new();
    match &out.body {
        Some(b) => s.push_str(std::str::from_utf8(b).unwrap()),
        None => s.push_str("(unchanged)"),
    }
    s.push('\n');
    for h in &out.hits {
        writeln!(s, "hit {} {} {}", h.detector, h.action.as_str(), h.count).unwrap();
    }
    writeln!(s, "blocked_by {:?}", out.blocked_by).unwrap();
    for (k, v) in out.restore.iter() {
        writeln!(s, "restore {k} {v:?}").unwrap();
    }
    writeln!(s, "placeholders {:?}", out.placeholders).unwrap();
    for m in &out.prompt {
        writeln!(s, "prompt {}", serde_json::to_string(m).unwrap()).unwrap();
    }
    s
}

fn check(name: &str, actual: &str) {
    let path = dir().join("mask_golden").join(name);
    if std::env::var_os("MASK_GOLDEN_WRITE").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name}: masking output differs from the golden, first at line {}:\nexpected: {:?}\nactual:   {:?}",
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

#[test]
fn bench_bodies_mask_as_before() {
    for case in ["2k", "2k-sensitive", "20k", "20k-sensitive"] {
        let body = std::fs::read(dir().join(format!("mask_golden/body-{case}.json"))).unwrap();
        for (action, restore) in [("redact", false), ("pseudonymize", true)] {
            check(
                &format!("expected-{case}-{action}.txt"),
                &describe(&policy(action, restore), &body),
            );
        }
    }
}

#[test]
fn corpus_masks_as_before() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir().join("corpus"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    for (action, restore) in [("redact", false), ("pseudonymize", true)] {
        let policy = policy(action, restore);
        let mut all = String::new();
        for f in &files {
            for line in std::fs::read_to_string(f).unwrap().lines() {
                let item: Value = serde_json::from_str(line).unwrap();
                let body = json!({"model": "m", "messages": [
                    {"role": item["role"], "content": item["text"]}]});
                // One line per text: its id and a digest of everything
                // masking said about it (the bench bodies keep the full text).
                let digest = Sha256::digest(describe(&policy, body.to_string().as_bytes()));
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(all, "{} {hex}", item["id"].as_str().unwrap()).unwrap();
            }
        }
        check(&format!("expected-corpus-{action}.txt"), &all);
    }
}
