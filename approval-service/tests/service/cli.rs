#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `countersign-approval` binary: the command line (help, version,
//! environment fallbacks), hash-token, serve, SIGTERM, bad config.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_countersign-approval");

/// The environment variables the binary reads for its options.
const ENV_OPTIONS: [&str; 3] = [
    "COUNTERSIGN_CONFIG",
    "COUNTERSIGN_LISTEN",
    "COUNTERSIGN_DATABASE",
];

/// The binary, without any option from the test's own environment.
fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    for name in ENV_OPTIONS {
        cmd.env_remove(name);
    }
    cmd
}

/// Runs the binary with `input` on stdin.
fn run_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A configuration whose own address (port 1) the tests replace with
/// 127.0.0.1:0, so that a served port shows where the address came from.
fn config_in(dir: &Path) -> PathBuf {
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\n").unwrap();
    cfg
}

/// Starts `serve` (told to listen on 127.0.0.1:0) and returns it with the
/// address it printed.
fn start_serving(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line
        .trim()
        .strip_prefix("countersign-approval listening on ")
        .map(str::to_string)
    else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("unexpected line {line:?}");
    };
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    (child, addr)
}

/// Sends SIGTERM and waits for a clean exit; returns the logs.
fn stop(mut child: Child) -> String {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    logs
}

#[test]
fn version_and_help_of_every_command() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("countersign-approval {}\n", env!("CARGO_PKG_VERSION"))
    );
    let commands = [
        "serve",
        "hash-token",
        "check-config",
        "verify-records",
        "export-records",
        "export-chain",
    ];
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for command in commands {
        assert!(help.contains(&format!("  {command} ")), "{command}: {help}");
    }
    // Each command's own options, and the environment variables they read.
    let expected: [(&str, &[&str]); 6] = [
        (
            "serve",
            &["--config", "--listen", "--database", "COUNTERSIGN_LISTEN"],
        ),
        ("hash-token", &["[TOKEN]", "standard input"]),
        (
            "check-config",
            &["--plugin-config", "--envoy-bin", "--no-envoy"],
        ),
        ("verify-records", &["--database", "COUNTERSIGN_CONFIG"]),
        (
            "export-records",
            &["--since-ms", "--after-seq", "COUNTERSIGN_DATABASE"],
        ),
        (
            "export-chain",
            &["--cursor", "--follow", "--syslog-url", "COUNTERSIGN_CONFIG"],
        ),
    ];
    for (command, words) in expected {
        let out = bin().args([command, "--help"]).output().unwrap();
        assert!(out.status.success(), "{command}");
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains(&format!("Usage: countersign-approval {command}")),
            "{help}"
        );
        for word in words {
            assert!(help.contains(word), "{command} --help lacks {word}: {help}");
        }
    }
    // A database URL in the environment may hold a password: never shown.
    let out = bin()
        .args(["serve", "--help"])
        .env("COUNTERSIGN_DATABASE", "postgresql://u:hunter2@db/x")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(!help.contains("hunter2"), "{help}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["no-such-command"],
        &["serve", "--listen", "not-an-address"],
        &["--config", "c.toml", "hash-token"],
        &["hash-token", "a", "b"],
        &["export-records", "--database", "x.db", "--since-ms", "soon"],
    ] {
        let out = bin().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}

#[test]
fn hash_token_prints_sha256() {
    let out = Command::new(BIN)
        .args(["hash-token", "abc"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
    let out = Command::new(BIN).arg("hash-token").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn hash_token_reads_the_token_from_stdin() {
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n";
    // No TOKEN or `-`: standard input, one trailing line break removed.
    for (args, input) in [
        (&["hash-token"][..], "abc\n"),
        (&["hash-token", "-"], "abc"),
        (&["hash-token"], "abc\r\n"),
    ] {
        let out = run_with_stdin(args, input);
        assert!(out.status.success(), "{args:?} {input:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), abc, "{input:?}");
    }
    // Only one line break is removed: "abc\n" is another token, refused.
    for (input, why) in [
        ("", "empty"),
        ("\n", "empty"),
        ("abc\n\n", "line break"),
        ("ab\nc", "line break"),
    ] {
        let out = run_with_stdin(&["hash-token"], input);
        assert_eq!(out.status.code(), Some(2), "{input:?}");
        assert!(out.stdout.is_empty(), "{input:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with("countersign-approval: hash-token: ") && err.contains(why),
            "{input:?}: {err}"
        );
    }
    let out = bin().args(["hash-token", ""]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nfilter_token = \"x\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("filter_token"), "{err}");

    let out = Command::new(BIN)
        .args(["serve", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_prints_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in(dir.path());
    let db = dir.path().join("nested/db.sqlite");
    // Without the `serve` command, as scripts and manifests call it.
    let (child, addr) = start_serving(
        bin()
            .arg("--config")
            .arg(&cfg)
            .args(["--listen", "127.0.0.1:0", "--database"])
            .arg(&db),
    );

    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("{\"status\":\"ok\"}"), "{resp}");
    assert!(db.exists());

    let logs = stop(child);
    let first = logs.lines().next().unwrap();
    let v: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(v["level"], "INFO", "{first}");
}

/// `GET path` on `addr`, the whole answer.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
fn metrics_listen_moves_metrics_to_an_address_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "metrics_listen = \"127.0.0.1:0\"\n").unwrap();
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--database")
        .arg(dir.path().join("db.sqlite"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    for _ in 0..2 {
        out.read_line(&mut printed).unwrap();
    }
    let address = |prefix: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_string)
    };
    let (Some(service), Some(metrics)) = (
        address("countersign-approval listening on "),
        address("countersign-approval metrics on "),
    ) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("unexpected output {printed:?}");
    };
    let scraped = http_get(&metrics, "/metrics");
    let on_service = http_get(&service, "/metrics");
    let elsewhere = http_get(&metrics, "/healthz");
    stop(child);
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
    assert!(
        scraped.contains("countersign_reviews_pending{kind=\"prompt\",mode=\"hold\"} 0"),
        "{scraped}"
    );
    assert!(on_service.starts_with("HTTP/1.1 404"), "{on_service}");
    assert!(elsewhere.starts_with("HTTP/1.1 404"), "{elsewhere}");
}

/// Exit code of `verify-records` with these arguments and environment.
fn verify_records(args: &[&str], env: &[(&str, &Path)]) -> i32 {
    let out = bin()
        .arg("verify-records")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    out.status.code().unwrap()
}

#[test]
fn options_fall_back_to_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in(dir.path());
    let env_db = dir.path().join("env.db");
    // No arguments at all: configuration, address and database from the environment.
    let (child, _) = start_serving(
        bin()
            .env("COUNTERSIGN_CONFIG", &cfg)
            .env("COUNTERSIGN_LISTEN", "127.0.0.1:0")
            .env("COUNTERSIGN_DATABASE", &env_db),
    );
    stop(child);
    assert!(env_db.exists());

    // A flag wins over its variable, whose value is then not even read.
    let flag_db = dir.path().join("flag.db");
    let (child, _) = start_serving(
        bin()
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .args(["--listen", "127.0.0.1:0", "--database"])
            .arg(&flag_db)
            .env("COUNTERSIGN_LISTEN", "not an address")
            .env("COUNTERSIGN_DATABASE", dir.path().join("unused.db")),
    );
    stop(child);
    assert!(flag_db.exists());
    assert!(!dir.path().join("unused.db").exists());

    // The records commands: the database from the environment, or the
    // configuration's; a flag on the command line wins over both variables.
    let missing = dir.path().join("missing.db");
    let cfg_env_db = dir.path().join("env.toml");
    std::fs::write(
        &cfg_env_db,
        format!("database = {:?}\n", env_db.display().to_string()),
    )
    .unwrap();
    assert_eq!(verify_records(&[], &[("COUNTERSIGN_DATABASE", &env_db)]), 0);
    assert_eq!(
        verify_records(&[], &[("COUNTERSIGN_CONFIG", &cfg_env_db)]),
        0
    );
    assert_eq!(
        verify_records(&[], &[("COUNTERSIGN_DATABASE", &missing)]),
        2
    );
    let cfg_arg = cfg_env_db.to_str().unwrap();
    assert_eq!(
        verify_records(
            &["--config", cfg_arg],
            &[("COUNTERSIGN_DATABASE", &missing)]
        ),
        0
    );
    let db_arg = env_db.to_str().unwrap();
    let missing_cfg = dir.path().join("missing.toml");
    assert_eq!(
        verify_records(
            &["--database", db_arg],
            &[("COUNTERSIGN_CONFIG", &missing_cfg)]
        ),
        0
    );
    assert_eq!(verify_records(&[], &[]), 2);
    assert!(!missing.exists());
}

/// The status of `GET /api/me` with `token` as a bearer token.
fn me_status(addr: &str, token: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /api/me HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split(' ').nth(1).unwrap_or("").to_string()
}

/// A configuration with one reviewer, `name`, whose token is `token`.
fn one_reviewer(name: &str, token: &str) -> String {
    let hash = countersign_approval::TokenHash::of_token(token).to_hex();
    format!(
        "listen = \"127.0.0.1:1\"\n[[reviewers]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\n"
    )
}

/// Sends `signal` to `child`.
fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Serves `cfg` (whose one reviewer is alice) on a database in `dir`;
/// alice's token works, bob's not yet.
fn serve_alice(cfg: &Path, dir: &Path) -> (Child, String) {
    let (child, addr) = start_serving(
        bin()
            .arg("--config")
            .arg(cfg)
            .args(["--listen", "127.0.0.1:0", "--database"])
            .arg(dir.join("db.sqlite")),
    );
    assert_eq!(me_status(&addr, "alice-token"), "200");
    assert_eq!(me_status(&addr, "bob-token"), "401");
    (child, addr)
}

#[test]
fn sighup_reloads_the_reviewers_and_keeps_them_when_the_file_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, one_reviewer("alice", "alice-token")).unwrap();
    let (child, addr) = serve_alice(&cfg, dir.path());

    // Bob replaces alice: no restart.
    std::fs::write(&cfg, one_reviewer("bob", "bob-token")).unwrap();
    signal(&child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while me_status(&addr, "bob-token") != "200" {
        assert!(Instant::now() < deadline, "bob was never added");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(me_status(&addr, "alice-token"), "401");

    // An invalid file changes nothing.
    std::fs::write(
        &cfg,
        "[[reviewers]]\nname = \"carol\"\ntoken_sha256 = \"nope\"\n",
    )
    .unwrap();
    signal(&child, "-HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(me_status(&addr, "bob-token"), "200");

    let logs = stop(child);
    assert!(logs.contains("reviewers reloaded"), "{logs}");
    assert!(
        logs.contains("reviewers not reloaded") && logs.contains("reviewers[0].token_sha256"),
        "{logs}"
    );
}

/// Points `link` at `target` atomically: a new symlink renamed over the
/// old one, as Kubernetes swaps a ConfigMap volume's `..data`.
fn swap_symlink(target: &std::path::Path, link: &std::path::Path) {
    let tmp = link.with_file_name("..data_tmp");
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[test]
fn a_changed_file_reloads_the_reviewers_without_a_signal() {
    // A ConfigMap volume: c.toml -> ..data/c.toml, ..data -> v1.
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    for (version, reviewer) in [("v1", "alice"), ("v2", "bob")] {
        std::fs::create_dir_all(volume.join(version)).unwrap();
        std::fs::write(
            volume.join(version).join("c.toml"),
            one_reviewer(reviewer, &format!("{reviewer}-token")),
        )
        .unwrap();
    }
    swap_symlink(std::path::Path::new("v1"), &volume.join("..data"));
    let cfg = volume.join("c.toml");
    std::os::unix::fs::symlink("..data/c.toml", &cfg).unwrap();
    let (child, addr) = serve_alice(&cfg, dir.path());

    // The volume is swapped to v2: bob replaces alice, no signal sent.
    swap_symlink(std::path::Path::new("v2"), &volume.join("..data"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while me_status(&addr, "bob-token") != "200" {
        assert!(Instant::now() < deadline, "bob was never added");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(me_status(&addr, "alice-token"), "401");

    // An invalid file written in place changes nothing, and is logged.
    std::fs::write(
        volume.join("v2").join("c.toml"),
        "[[reviewers]]\nname = \"carol\"\ntoken_sha256 = \"nope\"\n",
    )
    .unwrap();
    // Two and a half looks at the file (every 2 s) later, bob still works.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(me_status(&addr, "bob-token"), "200");
    let logs = stop(child);
    assert!(
        logs.contains("reviewers reloaded") && logs.contains("file changed"),
        "{logs}"
    );
    assert!(
        logs.contains("reviewers not reloaded") && logs.contains("reviewers[0].token_sha256"),
        "{logs}"
    );
}
