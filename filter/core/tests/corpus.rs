//! Scores the masking detectors on the labelled corpus in `tests/corpus/`
//! (written by `tests/corpus/generate.py`, which labels each value as it
//! makes it, never by running a detector).
//!
//! Each detector runs alone, through the filter's real request masking
//! (`mask::mask_request` on an OpenAI chat body, profile `pseudonymize` with
//! `restore`, so the restore map tells exactly which text each placeholder
//! replaced). Per detector:
//!
//! - recall: labelled values it masked exactly (a match that runs past the
//!   value, swallowing the next identifier, is a miss and a false alarm);
//! - false-positive rate: its false alarms over the negatives it met, i.e.
//!   the hard negatives labelled as tempting it (versions, invalid cards and
//!   IBANs, order numbers, UUIDs, hashes, timestamps, prices) plus every
//!   other span it masked without a label.
//!
//! The table is printed (`cargo test -p countersign-core --test corpus --
//! --nocapture`); the test fails when a detector falls below the floor in
//! `tests/corpus/floors.json` (recall at least, false-positive rate at
//! most). `CORPUS_SHOW=n` lists up to n misses and false alarms per
//! detector (default 6). Raise a floor when a change improves a detector; never lower one
//! to make a change pass.
//!
//! A last pass runs every detector together, as a profile with `*` does,
//! and fails if any labelled value is still readable in the masked prompt.

// The corpus is read from disk, which the wasm32 test runner (Node's WASI,
// no directories opened to it) cannot do; the detectors themselves run
// under wasm in the lib tests. The scorer runs natively.
#![cfg(not(target_os = "wasi"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use countersign_core::mask::{mask_request, MaskPolicy, MaskingConfig, BUILTIN_DETECTORS};
use countersign_core::wire::ApiKind;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
struct Item {
    id: String,
    role: String,
    text: String,
    /// `[detector, value]`: every occurrence of `value` must be masked by
    /// `detector`.
    find: Vec<(String, String)>,
    /// `[value, [detector, ...]]`: hard negatives and the detectors they
    /// tempt.
    not: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Deserialize)]
struct Floor {
    recall: f64,
    fpr: f64,
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load() -> Vec<Item> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut items = Vec::new();
    for f in files {
        for (n, line) in std::fs::read_to_string(&f).unwrap().lines().enumerate() {
            let item: Item = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", f.display(), n + 1));
            items.push(item);
        }
    }
    items
}

fn policy(detectors: Value) -> MaskPolicy {
    let config = json!({
        "salt": "corpus-salt-0123456789abcdef",
        "profiles": {"default": {"detectors": detectors, "restore": true}},
    });
    let config = MaskingConfig::from_json(config.to_string().as_bytes()).unwrap();
    config.default_profile().unwrap().clone()
}

/// Byte spans of every occurrence of `needle` in `hay`.
fn occurrences(hay: &str, needle: &str) -> Vec<(usize, usize)> {
    hay.match_indices(needle)
        .map(|(i, m)| (i, i + m.len()))
        .collect()
}

/// The masked prompt of `item` under `policy`, and the spans of the
/// original text its placeholders replaced, each with its placeholder's
/// label (`CREDIT_CARD`).
fn masked(policy: &MaskPolicy, item: &Item) -> (String, Vec<(usize, usize, String)>) {
    let body = json!({"model": "m", "messages": [{"role": item.role, "content": item.text}]});
    let out = mask_request(policy, ApiKind::OpenaiChat, body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e:?}", item.id));
    let Some(body) = out.body else {
        return (item.text.clone(), Vec::new());
    };
    let body: Value = serde_json::from_slice(&body).unwrap();
    let text = body["messages"][0]["content"].as_str().unwrap().to_string();
    // Walk the masked text; between placeholders it is the original.
    let mut spans = Vec::new();
    let mut rebuilt = String::new();
    let mut rest = text.as_str();
    while let Some(open) = rest.find('<') {
        let (before, from) = rest.split_at(open);
        rebuilt.push_str(before);
        let placeholder = from
            .find('>')
            .map(|close| &from[..=close])
            .and_then(|p| out.restore.get(p).map(|v| (p, v)));
        match placeholder {
            Some((p, value)) => {
                let label = p[1..p.rfind('_').unwrap_or(1)].to_string();
                spans.push((rebuilt.len(), rebuilt.len() + value.len(), label));
                rebuilt.push_str(value);
                rest = &from[p.len()..];
            }
            None => {
                rebuilt.push('<');
                rest = &from[1..];
            }
        }
    }
    rebuilt.push_str(rest);
    assert_eq!(
        rebuilt, item.text,
        "{}: placeholders do not restore",
        item.id
    );
    (text, spans)
}

#[derive(Debug, Default)]
struct Score {
    expected: usize,
    found: usize,
    negatives: usize,
    decoys_hit: usize,
    other_alarms: usize,
    examples: Vec<String>,
}

impl Score {
    fn recall(&self) -> f64 {
        if self.expected == 0 {
            return 1.0;
        }
        self.found as f64 / self.expected as f64
    }
    fn fpr(&self) -> f64 {
        let alarms = self.decoys_hit + self.other_alarms;
        let negatives = self.negatives + self.other_alarms;
        if negatives == 0 {
            return 0.0;
        }
        alarms as f64 / negatives as f64
    }
    fn note(&mut self, what: String) {
        let limit = std::env::var("CORPUS_SHOW")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(6);
        if self.examples.len() < limit {
            self.examples.push(what);
        }
    }
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Detectors scored beside another: the card detector takes a card inside
/// an IBAN for the IBAN's digits only where the `iban` detector masks that
/// IBAN with it, so it is scored as it runs in a profile with both (only
/// its own placeholders count), and alone, where such digits are a card,
/// as its own row (`credit_card without iban`).
const COMPANIONS: &[(&str, &str, &str)] = &[
    ("credit_card", "iban", "credit_card"),
    ("credit_card without iban", "", "credit_card"),
];

fn score(row: &str, items: &[Item]) -> Score {
    let mut s = Score::default();
    let (detector, companion) = COMPANIONS
        .iter()
        .find(|(r, ..)| *r == row)
        .map_or((row, ""), |(_, companion, detector)| {
            (*detector, *companion)
        });
    let label = detector.to_ascii_uppercase();
    let known = BUILTIN_DETECTORS.contains(&detector);
    let policy = known.then(|| {
        let mut detectors = json!({ detector: "pseudonymize" });
        if !companion.is_empty() {
            detectors[companion] = json!("pseudonymize");
        }
        policy(detectors)
    });
    for item in items {
        let mut expected: Vec<(usize, usize)> = item
            .find
            .iter()
            .filter(|(d, _)| d == detector)
            .flat_map(|(_, v)| occurrences(&item.text, v))
            .collect();
        expected.sort();
        expected.dedup();
        let mut decoys: Vec<(usize, usize)> = item
            .not
            .iter()
            .filter(|(_, tempts)| tempts.iter().any(|t| t == detector))
            .flat_map(|(v, _)| occurrences(&item.text, v))
            .collect();
        decoys.sort();
        decoys.dedup();
        s.expected += expected.len();
        s.negatives += decoys.len();
        let Some(policy) = &policy else {
            for &(a, b) in &expected {
                s.note(format!(
                    "{}: missed {:?} (no such detector)",
                    item.id,
                    &item.text[a..b]
                ));
            }
            continue;
        };
        let (_, spans) = masked(policy, item);
        let found: Vec<(usize, usize)> = spans
            .into_iter()
            .filter(|(.., l)| *l == label)
            .map(|(a, b, _)| (a, b))
            .collect();
        for &e in &expected {
            if found.contains(&e) {
                s.found += 1;
            } else {
                s.note(format!("{}: missed {:?}", item.id, &item.text[e.0..e.1]));
            }
        }
        let alarms: Vec<(usize, usize)> = found
            .iter()
            .copied()
            .filter(|f| !expected.contains(f))
            .collect();
        for &d in &decoys {
            if alarms.iter().any(|&a| overlaps(a, d)) {
                s.decoys_hit += 1;
                s.note(format!(
                    "{}: false alarm on {:?}",
                    item.id,
                    &item.text[d.0..d.1]
                ));
            }
        }
        for &a in &alarms {
            if !decoys.iter().any(|&d| overlaps(a, d)) {
                s.other_alarms += 1;
                s.note(format!(
                    "{}: false alarm {:?}",
                    item.id,
                    &item.text[a.0..a.1]
                ));
            }
        }
    }
    s
}

#[test]
fn detectors_meet_their_floors_on_the_corpus() {
    let items = load();
    assert!(items.len() >= 1000, "the corpus has {} items", items.len());
    let floors: BTreeMap<String, Floor> =
        serde_json::from_str(&std::fs::read_to_string(corpus_dir().join("floors.json")).unwrap())
            .unwrap();
    let mut detectors: Vec<&str> = BUILTIN_DETECTORS.to_vec();
    for (row, ..) in COMPANIONS {
        if !detectors.contains(row) {
            detectors.push(row);
        }
    }
    for item in &items {
        for (d, _) in &item.find {
            if !detectors.contains(&d.as_str()) {
                detectors.push(d);
            }
        }
    }
    let mut table = format!(
        "{} items\n{:<20} {:>8} {:>7} {:>8} {:>9} {:>7}\n",
        items.len(),
        "detector",
        "expected",
        "recall",
        "negatives",
        "alarms",
        "fpr"
    );
    let mut failures = Vec::new();
    for d in &detectors {
        let s = score(d, &items);
        table.push_str(&format!(
            "{:<20} {:>8} {:>7.3} {:>8} {:>9} {:>7.3}\n",
            d,
            s.expected,
            s.recall(),
            s.negatives,
            s.decoys_hit + s.other_alarms,
            s.fpr()
        ));
        for e in &s.examples {
            table.push_str(&format!("    {e}\n"));
        }
        match floors.get(*d) {
            None => failures.push(format!("{d}: no floor in floors.json")),
            Some(f) => {
                if s.recall() + 1e-9 < f.recall {
                    failures.push(format!(
                        "{d}: recall {:.3} < floor {}",
                        s.recall(),
                        f.recall
                    ));
                }
                if s.fpr() > f.fpr + 1e-9 {
                    failures.push(format!(
                        "{d}: false-positive rate {:.3} > ceiling {}",
                        s.fpr(),
                        f.fpr
                    ));
                }
            }
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{}\n{table}", failures.join("\n"));
}

/// With every detector on, no labelled value is left readable.
#[test]
fn every_detector_together_leaves_no_labelled_value() {
    let items = load();
    let all = policy(json!({"*": "pseudonymize"}));
    let mut leaks = Vec::new();
    let mut labelled = 0;
    for item in &items {
        let (text, _) = masked(&all, item);
        for (d, v) in &item.find {
            labelled += 1;
            if text.contains(v.as_str()) {
                leaks.push(format!("{}: {d} {v:?}", item.id));
            }
        }
    }
    let floor: f64 = serde_json::from_str::<Value>(
        &std::fs::read_to_string(corpus_dir().join("floors.json")).unwrap(),
    )
    .unwrap()["*"]["recall"]
        .as_f64()
        .unwrap();
    let masked_share = 1.0 - leaks.len() as f64 / labelled as f64;
    println!(
        "all detectors: {labelled} labelled values, {} readable after masking",
        leaks.len()
    );
    assert!(
        masked_share + 1e-9 >= floor,
        "{:.3} of labelled values masked, floor {floor}:\n{}",
        masked_share,
        leaks.join("\n")
    );
}
