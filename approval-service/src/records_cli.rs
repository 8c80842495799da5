//! `verify-records` and `export-records`: offline access to the session
//! record log (read-only; safe while the service runs).
//!
//! Exit codes: 0 success (chain intact), 1 the chain has a problem (the
//! first one is printed), 2 usage error or the database cannot be read.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use countersign_approval::records::{self, RecordQuery};
use countersign_approval::Config;

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
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let q = &mut out.query;
        match flag {
            "--database" => out.database = Some(PathBuf::from(value()?)),
            "--config" => out.config = Some(PathBuf::from(value()?)),
            "--since-ms" if filters => q.since_ms = Some(number(flag, &value()?)?),
            "--until-ms" if filters => q.until_ms = Some(number(flag, &value()?)?),
            "--after-seq" if filters => q.after_seq = Some(number(flag, &value()?)?),
            "--caller" if filters => q.caller = Some(value()?),
            "--model" if filters => q.model = Some(value()?),
            "--decision" if filters => q.decision = Some(value()?),
            "--review-id" if filters => q.review_id = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(out)
}

/// Opens the database named by `--database` or by `--config`'s `database`.
fn open(args: &Args) -> Result<rusqlite::Connection, String> {
    let path = match (&args.database, &args.config) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => Config::load(c).map_err(|e| e.to_string())?.database,
        (None, None) => return Err("--database PATH or --config FILE is required".into()),
    };
    if !path.exists() {
        return Err(format!("no database at {}", path.display()));
    }
    let conn = records::open_read_only(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match records::has_records_table(&conn) {
        Ok(true) => Ok(conn),
        Ok(false) => Err(format!("{} has no records table", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// `verify-records`.
pub fn verify(args: &[String]) -> ExitCode {
    let args = match parse(args, false) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let conn = match open(&args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    match records::verify_chain(&conn) {
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
    let args = match parse(args, true) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let conn = match open(&args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = records::export_jsonl(&conn, &args.query, &mut out);
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
