//! `export-chain`: the session records to a SIEM, one hash-chain entry at a
//! time, resumable by sequence number (read-only on the database).
//!
//! Each entry of the chain (`records::ChainEntry`: a request part, a
//! response part or a retention note, each with its own `seq`) is written
//! as one line, `{"seq":N,"hash":"…","prev_hash":"…","entry":ENTRY}`, with
//! `ENTRY` the hashed text byte for byte (so a SIEM can recompute
//! `hash = SHA-256(prev_hash "\n" seq "\n" ENTRY)`); as JSON Lines on
//! stdout, or as RFC 5424 syslog messages (on stdout one a line, over TCP
//! with RFC 6587 octet counting, or one UDP datagram each).
//!
//! `--cursor FILE` holds `SEQ HASH` of the last entry written: after each
//! entry is written and flushed, the file is replaced atomically (a
//! temporary file, synced, renamed over it). A restart resumes after it and
//! checks that the next entry links to that hash. A stop by SIGTERM/SIGINT
//! lets the entry being written finish (and its cursor), so nothing is lost
//! or repeated. A crash (SIGKILL, power loss) between an entry's write and
//! its cursor repeats that one entry on restart, identical, same `seq`: a
//! consumer that drops lines whose `seq` is not above the last it kept gets
//! every entry exactly once (docs/operations.md, "Records to a SIEM").
//!
//! Exit codes: 0 done (or stopped by a signal), 1 the chain does not go on
//! from the cursor (a gap, a changed entry or link; nothing more is
//! written), 2 usage, database, cursor file or output errors.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use clap::ArgMatches;
use countersign_approval::db::Conn;
use countersign_approval::records::{chain_entries, chain_hash, ChainEntry};

use crate::records_cli::Source;

/// Entries read per query.
const PAGE: i64 = 500;
/// How long a connection to the syslog collector, or one write to it, may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest syslog message sent as one UDP datagram.
const MAX_DATAGRAM: usize = 65_000;
/// PRI of every message: facility local0 (16), severity informational (6).
const SYSLOG_PRI: u8 = 16 * 8 + 6;
/// The SD-ID of the structured data: RFC 5612's enterprise number for
/// documentation (countersign has no number of its own).
const SD_ID: &str = "countersign@32473";

/// Line format.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Format {
    /// One JSON object a line.
    Jsonl,
    /// RFC 5424 messages whose MSG is that JSON object.
    Syslog,
}

/// Options of `export-chain`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    source: Source,
    /// Holds `SEQ HASH` of the last entry written; read at start (missing:
    /// from the first entry), replaced atomically after each entry.
    #[arg(long, value_name = "FILE")]
    cursor: Option<PathBuf>,
    /// Keep polling for new entries until SIGTERM or SIGINT.
    #[arg(long)]
    follow: bool,
    /// Pause between polls with --follow, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    poll_interval_ms: u64,
    /// `jsonl` (default on stdout) or `syslog` (RFC 5424; the only format
    /// with --syslog-url).
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<Format>,
    /// Send to a syslog collector instead of stdout: tcp://HOST:PORT
    /// (RFC 6587 octet counting) or udp://HOST:PORT.
    #[arg(long, value_name = "URL")]
    syslog_url: Option<String>,
}

/// Why the export stopped early.
#[derive(Debug)]
enum Stop {
    /// The chain does not go on from what was exported (exit 1).
    Chain(String),
    /// Database, cursor or output (exit 2).
    Io(String),
}

impl Stop {
    fn io(what: &str, e: impl std::fmt::Display) -> Stop {
        Stop::Io(format!("{what}: {e}"))
    }
}

/// `export-chain`.
pub fn run(args: &Args, matches: Option<&ArgMatches>) -> ExitCode {
    match export(args, matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Chain(msg)) => {
            eprintln!("countersign-approval: export-chain stopped: {msg}");
            ExitCode::FAILURE
        }
        Err(Stop::Io(msg)) => {
            eprintln!("countersign-approval: export-chain: {msg}");
            ExitCode::from(2)
        }
    }
}

fn export(args: &Args, matches: Option<&ArgMatches>) -> Result<(), Stop> {
    let format = match (args.format, &args.syslog_url) {
        (Some(Format::Jsonl), Some(_)) => {
            return Err(Stop::Io(
                "--syslog-url sends RFC 5424 messages: --format jsonl is for stdout".into(),
            ))
        }
        (_, Some(_)) => Format::Syslog,
        (f, None) => f.unwrap_or(Format::Jsonl),
    };
    // Before anything is read: a signal from here on stops cleanly.
    let stop = stop_signals().map_err(|e| Stop::io("cannot watch for signals", e))?;
    let cursor = args.cursor.as_deref().map(Cursor::new);
    let last = match &cursor {
        Some(c) => c.load()?,
        None => None,
    };
    let out = match &args.syslog_url {
        Some(url) => Output::connect(url)?,
        None => {
            end_a_cut_line().map_err(|e| Stop::io("cannot read back stdout", e))?;
            Output::Stdout(std::io::stdout())
        }
    };
    let mut conn = args.source.open(matches).map_err(Stop::Io)?;
    let mut exporter = Exporter {
        format,
        host: hostname(),
        out,
        cursor,
        last,
    };
    let result = exporter.run(&mut conn, args, &stop);
    let closed = exporter.out.close();
    result.and(closed)
}

/// The channel that says SIGTERM or SIGINT came (or that nothing can say so
/// any more).
fn stop_signals() -> std::io::Result<Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let _ = tx.send(());
    });
    Ok(rx)
}

fn stopped(stop: &Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(TryRecvError::Empty))
}

struct Exporter {
    format: Format,
    host: String,
    out: Output,
    cursor: Option<Cursor>,
    /// `(seq, hash)` of the last entry written (or the cursor's).
    last: Option<(i64, Option<String>)>,
}

impl Exporter {
    fn run(&mut self, conn: &mut Conn, args: &Args, stop: &Receiver<()>) -> Result<(), Stop> {
        let interval = Duration::from_millis(args.poll_interval_ms);
        loop {
            if stopped(stop) {
                return Ok(());
            }
            let after = self.last.as_ref().map_or(0, |(seq, _)| *seq);
            let page =
                chain_entries(conn, after, PAGE).map_err(|e| Stop::io("cannot read records", e))?;
            let read = page.len();
            for entry in page {
                if stopped(stop) {
                    return Ok(());
                }
                self.export_one(&entry)?;
            }
            if i64::try_from(read).unwrap_or(i64::MAX) < PAGE {
                if !args.follow {
                    return Ok(());
                }
                match stop.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return Ok(()),
                }
            }
        }
    }

    /// Checks that `e` goes on from the last entry, writes it, then moves
    /// the cursor to it.
    fn export_one(&mut self, e: &ChainEntry) -> Result<(), Stop> {
        check_link(self.last.as_ref(), e)?;
        let line = json_line(e);
        let message = match self.format {
            Format::Jsonl => line,
            Format::Syslog => syslog_message(e, &line, &self.host),
        };
        self.out
            .send(&message)
            .map_err(|err| Stop::io(&format!("cannot write seq {}", e.seq), err))?;
        if let Some(c) = &self.cursor {
            c.save(e.seq, &e.hash)?;
        }
        self.last = Some((e.seq, Some(e.hash.clone())));
        Ok(())
    }
}

/// Whether `e` is the entry after `last` (any first entry when nothing was
/// exported yet) and its hash is right.
fn check_link(last: Option<&(i64, Option<String>)>, e: &ChainEntry) -> Result<(), Stop> {
    if let Some((seq, hash)) = last {
        if e.seq != seq + 1 {
            return Err(Stop::Chain(format!(
                "the next entry after seq {seq} is seq {}: entries {} to {} are not in the \
                 database (removed by retention before they were exported, or deleted; \
                 see verify-records)",
                e.seq,
                seq + 1,
                e.seq - 1
            )));
        }
        if hash.as_ref().is_some_and(|h| *h != e.prev_hash) {
            return Err(Stop::Chain(format!(
                "seq {} does not link to the hash exported for seq {seq} \
                 (the chain was changed; see verify-records)",
                e.seq
            )));
        }
    }
    if chain_hash(&e.prev_hash, e.seq, &e.entry) != e.hash {
        return Err(Stop::Chain(format!(
            "seq {} ({}) does not match its hash (altered; see verify-records)",
            e.seq, e.record_id
        )));
    }
    Ok(())
}

/// `{"seq":N,"hash":"…","prev_hash":"…","entry":ENTRY}` with the stored
/// entry text verbatim, last, so `line[line.find("\"entry\":") + 8 .. len - 1]`
/// is exactly the hashed text.
fn json_line(e: &ChainEntry) -> String {
    // The hashes are hex and the entry is JSON already (compact: no line
    // breaks), as the chain's hash proves.
    format!(
        "{{\"seq\":{},\"hash\":\"{}\",\"prev_hash\":\"{}\",\"entry\":{}}}",
        e.seq, e.hash, e.prev_hash, e.entry
    )
}

/// An RFC 5424 message: `<134>1 TIME HOST countersign - KIND [SD] LINE`,
/// TIME the entry's append time (UTC, milliseconds).
fn syslog_message(e: &ChainEntry, line: &str, host: &str) -> String {
    let time = chrono::DateTime::from_timestamp_millis(e.created_at_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into());
    let kind = if e.kind.bytes().all(|b| b.is_ascii_graphic()) && !e.kind.is_empty() {
        e.kind.as_str()
    } else {
        "-"
    };
    format!(
        "<{SYSLOG_PRI}>1 {time} {host} countersign - {kind} [{SD_ID} seq=\"{}\" hash=\"{}\" prev_hash=\"{}\"] {line}",
        e.seq, e.hash, e.prev_hash
    )
}

/// The host's name for the syslog HOSTNAME field, `-` when unknown.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    if !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic()) {
        name.to_string()
    } else {
        "-".into()
    }
}

/// When stdout is a file whose last line a crash cut (no line break at its
/// end), ends that line, so the entry written again stands on its own line
/// (a consumer drops the cut one: it does not parse).
fn end_a_cut_line() -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let Ok(meta) = std::fs::metadata("/proc/self/fd/1") else {
        return Ok(());
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(());
    }
    // Opened again for reading: stdout may be write-only (`>>`).
    let mut last = [0u8; 1];
    File::open("/proc/self/fd/1")?.read_exact_at(&mut last, meta.len() - 1)?;
    if last[0] != b'\n' {
        let mut out = std::io::stdout().lock();
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(())
}

/// Where the lines go.
enum Output {
    Stdout(std::io::Stdout),
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Output {
    /// `tcp://HOST:PORT` or `udp://HOST:PORT`.
    fn connect(url: &str) -> Result<Output, Stop> {
        let bad = || {
            Stop::Io(format!(
                "--syslog-url {url:?}: expected tcp://HOST:PORT or udp://HOST:PORT"
            ))
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let addr = rest
            .to_socket_addrs()
            .map_err(|e| Stop::Io(format!("--syslog-url {url:?}: {e}")))?
            .next()
            .ok_or_else(bad)?;
        let cannot = |e| Stop::io(&format!("cannot reach the syslog collector at {url}"), e);
        match scheme {
            "tcp" => {
                let s = TcpStream::connect_timeout(&addr, NETWORK_TIMEOUT).map_err(cannot)?;
                s.set_write_timeout(Some(NETWORK_TIMEOUT)).map_err(cannot)?;
                s.set_nodelay(true).map_err(cannot)?;
                Ok(Output::Tcp(s))
            }
            "udp" => {
                let bind = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(bind).map_err(cannot)?;
                s.connect(addr).map_err(cannot)?;
                Ok(Output::Udp(s))
            }
            _ => Err(bad()),
        }
    }

    /// Writes one message and flushes it (newline-delimited on stdout,
    /// octet-counted over TCP, a datagram over UDP).
    fn send(&mut self, message: &str) -> std::io::Result<()> {
        match self {
            Output::Stdout(out) => {
                // One write of the whole line.
                let mut out = out.lock();
                out.write_all(format!("{message}\n").as_bytes())?;
                out.flush()
            }
            Output::Tcp(s) => {
                let framed = format!("{} {message}", message.len());
                s.write_all(framed.as_bytes())?;
                s.flush()
            }
            Output::Udp(s) => {
                if message.len() > MAX_DATAGRAM {
                    return Err(std::io::Error::other(format!(
                        "{} bytes is too large for a UDP datagram (use tcp://)",
                        message.len()
                    )));
                }
                s.send(message.as_bytes()).map(|_| ())
            }
        }
    }

    /// Ends the output: over TCP, says so and waits (at most
    /// [`NETWORK_TIMEOUT`]) for the collector to close, so what was sent
    /// is read before the process exits.
    fn close(&mut self) -> Result<(), Stop> {
        if let Output::Tcp(s) = self {
            let closing = |e| Stop::io("closing the syslog connection", e);
            s.shutdown(Shutdown::Write).map_err(closing)?;
            s.set_read_timeout(Some(NETWORK_TIMEOUT)).map_err(closing)?;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        }
        Ok(())
    }
}

/// The cursor file: `SEQ HASH` of the last entry written, or `SEQ` alone
/// (written by hand: resume after SEQ without checking the link).
struct Cursor {
    path: PathBuf,
    temp: PathBuf,
}

impl Cursor {
    fn new(path: &Path) -> Cursor {
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        Cursor {
            path: path.to_path_buf(),
            temp: PathBuf::from(temp),
        }
    }

    fn load(&self) -> Result<Option<(i64, Option<String>)>, Stop> {
        let name = self.path.display();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Stop::io(&format!("cannot read --cursor {name}"), e)),
        };
        parse_cursor(&text).map(Some).ok_or_else(|| {
            Stop::Io(format!(
                "--cursor {name}: expected `SEQ HASH` or `SEQ`, found {text:?}"
            ))
        })
    }

    /// Replaces the file with `seq hash` atomically: written to a
    /// temporary file, synced, renamed over it.
    fn save(&self, seq: i64, hash: &str) -> Result<(), Stop> {
        let failed = |e| Stop::io(&format!("cannot write --cursor {}", self.path.display()), e);
        let mut f = File::create(&self.temp).map_err(failed)?;
        f.write_all(format!("{seq} {hash}\n").as_bytes())
            .map_err(failed)?;
        f.sync_all().map_err(failed)?;
        std::fs::rename(&self.temp, &self.path).map_err(failed)
    }
}

/// `SEQ HASH` or `SEQ` (non-negative; the hash 64 hex digits).
fn parse_cursor(text: &str) -> Option<(i64, Option<String>)> {
    let mut parts = text.split_whitespace();
    let seq: i64 = parts.next()?.parse().ok().filter(|s| *s >= 0)?;
    let hash = match parts.next() {
        None => None,
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Some(h.to_string()),
        Some(_) => return None,
    };
    parts.next().is_none().then_some((seq, hash))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use countersign_approval::records::GENESIS_HASH;

    fn entry(seq: i64, prev_hash: &str, text: &str) -> ChainEntry {
        ChainEntry {
            seq,
            record_id: format!("rec_{seq}"),
            kind: "request".into(),
            ref_record_id: None,
            created_at_ms: 1_765_000_000_123,
            entry: text.into(),
            prev_hash: prev_hash.into(),
            hash: chain_hash(prev_hash, seq, text),
        }
    }

    #[test]
    fn the_line_carries_the_hashed_text_verbatim_last() {
        let e = entry(1, GENESIS_HASH, r#"{"b":1,"a":"x\u0001"}"#);
        let line = json_line(&e);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["hash"], e.hash.as_str());
        assert_eq!(v["prev_hash"], GENESIS_HASH);
        assert_eq!(v["entry"]["a"], "x\u{1}");
        let start = line.find("\"entry\":").unwrap() + 8;
        assert_eq!(&line[start..line.len() - 1], e.entry);
    }

    #[test]
    fn syslog_messages_are_rfc_5424() {
        let e = entry(7, GENESIS_HASH, "{}");
        let line = json_line(&e);
        let m = syslog_message(&e, &line, "host-1");
        assert_eq!(
            m,
            format!(
                "<134>1 2025-12-06T05:46:40.123Z host-1 countersign - request \
                 [countersign@32473 seq=\"7\" hash=\"{}\" prev_hash=\"{GENESIS_HASH}\"] {line}",
                e.hash
            )
        );
    }

    #[test]
    fn an_entry_must_go_on_from_the_last_one() {
        let first = entry(1, GENESIS_HASH, "{}");
        let second = entry(2, &first.hash, r#"{"n":2}"#);
        assert!(check_link(None, &second).is_ok());
        let last = (1, Some(first.hash.clone()));
        assert!(check_link(Some(&last), &second).is_ok());
        // Hand-set cursor: the seq only.
        assert!(check_link(Some(&(1, None)), &second).is_ok());
        // A gap.
        let third = entry(3, &second.hash, "{}");
        let Err(Stop::Chain(msg)) = check_link(Some(&last), &third) else {
            panic!("a gap went through");
        };
        assert!(msg.contains("entries 2 to 2"), "{msg}");
        // Another link.
        let forged = entry(2, GENESIS_HASH, r#"{"n":2}"#);
        let Err(Stop::Chain(msg)) = check_link(Some(&last), &forged) else {
            panic!("a changed link went through");
        };
        assert!(msg.contains("does not link"), "{msg}");
        // Altered text.
        let mut altered = second.clone();
        altered.entry = r#"{"n":3}"#.into();
        let Err(Stop::Chain(msg)) = check_link(Some(&last), &altered) else {
            panic!("an altered entry went through");
        };
        assert!(msg.contains("does not match its hash"), "{msg}");
    }

    #[test]
    fn the_cursor_is_replaced_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cursor::new(&dir.path().join("cursor"));
        assert!(c.load().unwrap().is_none());
        c.save(41, GENESIS_HASH).unwrap();
        c.save(42, &"a".repeat(64)).unwrap();
        assert_eq!(c.load().unwrap(), Some((42, Some("a".repeat(64)))));
        assert!(!dir.path().join("cursor.tmp").exists());
        std::fs::write(dir.path().join("cursor"), "17\n").unwrap();
        assert_eq!(c.load().unwrap(), Some((17, None)));
        for bad in [
            "",
            "x",
            "-1",
            "5 abc",
            "5 zz",
            &format!("5 {GENESIS_HASH} more"),
        ] {
            std::fs::write(dir.path().join("cursor"), bad).unwrap();
            assert!(
                matches!(c.load(), Err(Stop::Io(m)) if m.contains("--cursor")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tcp_frames_are_octet_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("tcp://{}", listener.local_addr().unwrap());
        let mut out = Output::connect(&url).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        // The collector reads until the exporter says it is done, then closes.
        let collector = std::thread::spawn(move || {
            let mut got = String::new();
            peer.read_to_string(&mut got).unwrap();
            got
        });
        out.send("héllo").unwrap();
        out.send("x y").unwrap();
        assert!(out.close().is_ok());
        assert_eq!(collector.join().unwrap(), "6 héllo3 x y");
        assert!(matches!(Output::connect("http://x:1"), Err(Stop::Io(_))));
        assert!(matches!(
            Output::connect("tcp://nohostport"),
            Err(Stop::Io(_))
        ));
    }
}
