//! `verify-records` and `export-records`: offline access to the session
//! record log (read-only; safe while the service runs).
//!
//! Exit codes: 0 success (chain intact), 1 the chain has a problem (the
//! first one is printed), 2 usage error or the database cannot be read.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use countersign_approval::db::{Conn, Location};
use countersign_approval::records::{self, RecordQuery};
use countersign_approval::Config;

use crate::args::Flags;

pub const USAGE: &str = "  countersign-approval verify-records (--database PATH | --config FILE)
  countersign-approval export-records (--database PATH | --config FILE) [--since-ms N] [--until-ms N] [--caller NAME] [--model NAME] [--decision D] [--review-id ID] [--after-seq N]";

fn fail(msg: &str) -> ExitCode {
    eprintln!("countersign-approval: {msg}\nusage:\n{USAGE}");
    ExitCode::from(2)
}

struct Args {
    database: Option<PathBuf>,
    config: Option<PathBuf>,
    query: RecordQuery,
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a non-negative integer"))
}

fn parse(args: &[String], filters: bool) -> Result<Args, String> {
    let mut out = Args {
        database: None,
        config: None,
        query: RecordQuery::default(),
    };
    let mut flags = Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        let q = &mut out.query;
        match flag {
            "--database" => out.database = Some(PathBuf::from(flags.value()?)),
            "--config" => out.config = Some(PathBuf::from(flags.value()?)),
            "--since-ms" if filters => q.since_ms = Some(number(flag, &flags.value()?)?),
            "--until-ms" if filters => q.until_ms = Some(number(flag, &flags.value()?)?),
            "--after-seq" if filters => q.after_seq = Some(number(flag, &flags.value()?)?),
            "--caller" if filters => q.caller = Some(flags.value()?),
            "--model" if filters => q.model = Some(flags.value()?),
            "--decision" if filters => q.decision = Some(flags.value()?),
            "--review-id" if filters => q.review_id = Some(flags.value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(out)
}

/// Opens the database named by `--database` (a SQLite path or a
/// PostgreSQL URL) or by `--config`'s `database`.
fn open(args: &Args) -> Result<Conn, String> {
    let location = match (&args.database, &args.config) {
        (Some(d), _) => Location::parse(&d.to_string_lossy()),
        (None, Some(c)) => Config::load(c).map_err(|e| e.to_string())?.database,
        (None, None) => return Err("--database PATH|URL or --config FILE is required".into()),
    };
    let name = location.redacted();
    if let Location::Sqlite(path) = &location {
        if !path.exists() {
            return Err(format!("no database at {name}"));
        }
    }
    let mut conn =
        records::open_read_only(&location).map_err(|e| format!("cannot open {name}: {e}"))?;
    match records::has_records_table(&mut conn) {
        Ok(true) => Ok(conn),
        Ok(false) => Err(format!("{name} has no records table")),
        Err(e) => Err(format!("cannot read {name}: {e}")),
    }
}

/// Parses the arguments and opens the database they name.
fn parse_and_open(args: &[String], filters: bool) -> Result<(Args, Conn), String> {
    let args = parse(args, filters)?;
    let conn = open(&args)?;
    Ok((args, conn))
}

/// `verify-records`.
pub fn verify(args: &[String]) -> ExitCode {
    let mut conn = match parse_and_open(args, false) {
        Ok((_, c)) => c,
        Err(e) => return fail(&e),
    };
    match records::verify_chain(&mut conn) {
        Ok(Ok(ok)) => {
            println!("{ok}");
            ExitCode::SUCCESS
        }
        Ok(Err(problem)) => {
            println!("{problem}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("countersign-approval: cannot read records: {e}");
            ExitCode::from(2)
        }
    }
}

/// `export-records`: merged records as JSON Lines on stdout.
pub fn export(args: &[String]) -> ExitCode {
    let (args, mut conn) = match parse_and_open(args, true) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = records::export_jsonl(&mut conn, &args.query, &mut out);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(_), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) => {
            eprintln!("countersign-approval: export failed: {e}");
            ExitCode::from(2)
        }
        (_, Err(e)) => {
            eprintln!("countersign-approval: export failed: {e}");
            ExitCode::from(2)
        }
    }
}
