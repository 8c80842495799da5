//! `export-chain`: the hash-chain entries as JSON Lines, resumed from the
//! cursor file exactly after the last entry written; a chain that does not
//! go on from the cursor (changed link, entries removed before they were
//! exported) stops it; `--follow` until SIGTERM, cursor up to date. On
//! SQLite and, with the PostgreSQL pass, on PostgreSQL.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use countersign_approval::records::{chain_hash, GENESIS_HASH};
use serde_json::Value;

use crate::common;
use crate::records::{chain, new_record};

const BIN: &str = env!("CARGO_BIN_EXE_countersign-approval");

fn export(db: &Path, cursor: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["export-chain", "--database"])
        .arg(common::database_setting(db))
        .arg("--cursor")
        .arg(cursor)
        .args(extra)
        .output()
        .unwrap()
}

/// The lines of a successful export, parsed, with their raw text.
fn lines(out: &Output) -> Vec<(Value, String)> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| (serde_json::from_str(l).unwrap(), l.to_string()))
        .collect()
}

fn seqs(lines: &[(Value, String)]) -> Vec<i64> {
    lines
        .iter()
        .map(|(v, _)| v["seq"].as_i64().unwrap())
        .collect()
}

#[test]
fn entries_are_exported_once_and_resumed_from_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 3, "");
    let cursor = dir.path().join("cursor");
    let first = lines(&export(&db, &cursor, &[]));
    assert_eq!(seqs(&first), [1, 2, 3]);
    // Each line links to the one before and its hash is the chain's, over
    // the entry text as it stands in the line.
    let mut prev = GENESIS_HASH.to_string();
    for (v, raw) in &first {
        assert_eq!(v["prev_hash"], prev.as_str());
        let text = &raw[raw.find("\"entry\":").unwrap() + 8..raw.len() - 1];
        let seq = v["seq"].as_i64().unwrap();
        assert_eq!(v["hash"], chain_hash(&prev, seq, text).as_str());
        assert_eq!(v["entry"]["kind"], "request");
        prev = v["hash"].as_str().unwrap().to_string();
    }
    assert_eq!(
        std::fs::read_to_string(&cursor).unwrap(),
        format!("3 {prev}\n")
    );
    // Nothing new: nothing written, the cursor stays.
    assert!(lines(&export(&db, &cursor, &[])).is_empty());
    // New entries: only those.
    for k in 0..2 {
        state
            .records()
            .write_request(new_record(&format!("more-{k}")), 5_000)
            .unwrap();
    }
    let next = lines(&export(&db, &cursor, &["--format", "jsonl"]));
    assert_eq!(seqs(&next), [4, 5]);
    assert_eq!(next[0].0["prev_hash"], prev.as_str());

    // Syslog on stdout: one RFC 5424 message a line, the same JSON as MSG.
    std::fs::write(&cursor, "4\n").unwrap();
    let out = export(&db, &cursor, &["--format", "syslog"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, msg) = text.trim_end().split_once("] ").unwrap();
    assert!(
        head.starts_with("<134>1 1970-01-01T00:00:05.000Z "),
        "{head}"
    );
    assert!(head.ends_with(&format!(
        " countersign - request [countersign@32473 seq=\"5\" hash=\"{}\" prev_hash=\"{}\"",
        next[1].0["hash"].as_str().unwrap(),
        next[1].0["prev_hash"].as_str().unwrap()
    )));
    assert_eq!(msg, next[1].1);
}

#[test]
fn a_chain_that_does_not_go_on_from_the_cursor_stops_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 3, "");
    let cursor = dir.path().join("cursor");
    // A cursor whose hash is not the one seq 3 links to: exit 1, nothing
    // written, the cursor as it was.
    let forged = format!("2 {}\n", "a".repeat(64));
    std::fs::write(&cursor, &forged).unwrap();
    let out = export(&db, &cursor, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("seq 3 does not link"), "{err}");
    assert_eq!(std::fs::read_to_string(&cursor).unwrap(), forged);

    // Entries removed by retention before they were exported: a gap,
    // named, exit 1.
    std::fs::write(&cursor, "1\n").unwrap();
    state.records().apply_retention(10_000, 10_000).unwrap();
    let out = export(&db, &cursor, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("entries 2 to 3 are not in the database"),
        "{err}"
    );
    // A first export (no cursor yet) starts where the chain starts now.
    std::fs::remove_file(&cursor).unwrap();
    let out = lines(&export(&db, &cursor, &[]));
    assert_eq!(seqs(&out), [4]);
    assert_eq!(out[0].0["entry"]["kind"], "retention");
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (_state, db) = chain(dir.path(), 1, "");
    let cursor = dir.path().join("cursor");
    for (args, says) in [
        (
            &["--format", "jsonl", "--syslog-url", "tcp://127.0.0.1:9"][..],
            "--format jsonl",
        ),
        (
            &["--syslog-url", "http://127.0.0.1:9"][..],
            "tcp://HOST:PORT",
        ),
        (&["--poll-interval-ms", "0"][..], "--poll-interval-ms"),
    ] {
        let out = export(&db, &cursor, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(says), "{args:?}: {err}");
    }
    std::fs::write(&cursor, "garbage").unwrap();
    let out = export(&db, &cursor, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("--cursor"));
    assert!(!cursor.with_extension("tmp").exists());
}

#[test]
fn follow_picks_up_new_entries_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 2, "");
    let cursor = dir.path().join("cursor");
    let mut child = Command::new(BIN)
        .args([
            "export-chain",
            "--follow",
            "--poll-interval-ms",
            "20",
            "--database",
        ])
        .arg(common::database_setting(&db))
        .arg("--cursor")
        .arg(&cursor)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let next_seq = |out: &mut std::io::Lines<_>| -> i64 {
        let line: String = out.next().unwrap().unwrap();
        serde_json::from_str::<Value>(&line).unwrap()["seq"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(next_seq(&mut out), 1);
    assert_eq!(next_seq(&mut out), 2);
    state
        .records()
        .write_request(new_record("later"), 9_000)
        .unwrap();
    assert_eq!(next_seq(&mut out), 3);
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(child.wait().unwrap().success());
    assert!(out.next().is_none());
    assert!(std::fs::read_to_string(&cursor).unwrap().starts_with("3 "));
}

#[test]
fn a_line_cut_by_a_crash_is_ended_before_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_state, db) = chain(dir.path(), 1, "");
    // What a SIGKILL in the middle of a write leaves in an appended file.
    let file = dir.path().join("out.jsonl");
    std::fs::write(&file, "{\"seq\":1,\"hash\":\"ab").unwrap();
    // Write-only and appending, as `>> out.jsonl` opens it.
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    let status = Command::new(BIN)
        .args(["export-chain", "--database"])
        .arg(common::database_setting(&db))
        .arg("--cursor")
        .arg(dir.path().join("cursor"))
        .stdout(out)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "{\"seq\":1,\"hash\":\"ab");
    let whole: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(whole["seq"], 1);
}
