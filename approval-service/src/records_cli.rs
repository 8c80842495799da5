//! `verify-records` and `export-records`: offline access to the session
//! record log (read-only; safe while the service runs).
//!
//! Exit codes: 0 success (chain intact), 1 the chain has a problem (the
//! first one is printed), 2 usage error or the database cannot be read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::ArgMatches;
use countersign_approval::db::{Conn, Location};
use countersign_approval::records::{self, RecordQuery};
use countersign_approval::Config;

use crate::DatabaseArg;

/// Which database to read: `--database`, else `--config`'s `database`. A
/// flag on the command line wins over either environment variable.
#[derive(clap::Args)]
pub struct Source {
    #[command(flatten)]
    database: DatabaseArg,
    /// The service's TOML configuration, whose `database` is read.
    #[arg(long, value_name = "FILE", env = "COUNTERSIGN_CONFIG")]
    config: Option<PathBuf>,
}

/// Options of `verify-records`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    source: Source,
}

/// Options of `export-records`: the source and the filters of the reviewer
/// API's export.
#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    source: Source,
    /// Records at or after this time (Unix milliseconds).
    #[arg(long, value_name = "N")]
    since_ms: Option<u64>,
    /// Records before this time (Unix milliseconds).
    #[arg(long, value_name = "N")]
    until_ms: Option<u64>,
    /// Only this caller's records.
    #[arg(long, value_name = "NAME")]
    caller: Option<String>,
    /// Only records for this model.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// Only records with this decision (allowed, approved, rejected, ...).
    #[arg(long, value_name = "D")]
    decision: Option<String>,
    /// Only the record of this review.
    #[arg(long, value_name = "ID")]
    review_id: Option<String>,
    /// Records after this sequence number (to resume an export).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
    after_seq: Option<i64>,
}

impl ExportArgs {
    fn query(&self) -> RecordQuery {
        RecordQuery {
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            caller: self.caller.clone(),
            model: self.model.clone(),
            decision: self.decision.clone(),
            review_id: self.review_id.clone(),
            after_seq: self.after_seq,
            ..RecordQuery::default()
        }
    }
}

/// The `database` of a service configuration.
fn load_database(config: &Path) -> Result<Location, String> {
    Ok(Config::load(config).map_err(|e| e.to_string())?.database)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("countersign-approval: {msg}");
    ExitCode::from(2)
}

impl Source {
    /// The database location; `matches` (this command's) tell whether a
    /// value came from the command line or the environment.
    fn location(&self, matches: Option<&ArgMatches>) -> Result<Location, String> {
        let on_command_line = |id: &str| {
            matches.is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
        };
        let config_first = on_command_line("config") && !on_command_line("database");
        match (&self.database.database, &self.config) {
            (Some(_), Some(c)) if config_first => load_database(c),
            (Some(d), _) => Ok(Location::parse(d)),
            (None, Some(c)) => load_database(c),
            (None, None) => Err("--database PATH|URL or --config FILE is required \
                                 (or COUNTERSIGN_DATABASE / COUNTERSIGN_CONFIG)"
                .into()),
        }
    }

    /// Opens the database read-only, after checking it has records.
    pub(crate) fn open(&self, matches: Option<&ArgMatches>) -> Result<Conn, String> {
        let location = self.location(matches)?;
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
}

/// `verify-records`.
pub fn verify(args: &VerifyArgs, matches: Option<&ArgMatches>) -> ExitCode {
    let mut conn = match args.source.open(matches) {
        Ok(c) => c,
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
pub fn export(args: &ExportArgs, matches: Option<&ArgMatches>) -> ExitCode {
    let mut conn = match args.source.open(matches) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = records::export_jsonl(&mut conn, &args.query(), &mut out);
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
