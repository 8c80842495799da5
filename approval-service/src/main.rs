//! `countersign-approval`: the approval service binary.
//!
//! Arguments are parsed by hand: the CLI is tiny and a parser crate would
//! cost more build time than it saves.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use countersign_approval::{run, AppState, Config, TokenHash};

mod args;
mod check_config;
mod records_cli;

use args::Flags;

const USAGE: &str = "usage:
  countersign-approval serve --config FILE [--listen ADDR] [--database PATH|URL]
  countersign-approval --config FILE [--listen ADDR] [--database PATH|URL]
  countersign-approval hash-token TOKEN
  countersign-approval check-config [--plugin-config FILE.json]... [--envoy FILE.yaml]... [--service-config FILE.toml]... [--envoy-bin PATH | --no-envoy]
  countersign-approval verify-records (--database PATH|URL | --config FILE)
  countersign-approval export-records (--database PATH|URL | --config FILE) [--since-ms N] [--until-ms N] [--caller NAME] [--model NAME] [--decision D] [--review-id ID] [--after-seq N]";

/// Options of `serve`.
struct ServeArgs {
    config: PathBuf,
    listen: Option<SocketAddr>,
    database: Option<PathBuf>,
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("countersign-approval: {msg}\n{USAGE}");
    ExitCode::from(2)
}

fn parse_serve(args: &[String]) -> Result<ServeArgs, String> {
    let mut config = None;
    let mut listen = None;
    let mut database = None;
    let mut flags = Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        match flag {
            "--config" => config = Some(PathBuf::from(flags.value()?)),
            "--listen" => {
                let v = flags.value()?;
                listen = Some(
                    v.parse()
                        .map_err(|_| format!("--listen: {v:?} is not an IP:port address"))?,
                );
            }
            "--database" => database = Some(PathBuf::from(flags.value()?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(ServeArgs {
        config: config.ok_or("--config FILE is required")?,
        listen,
        database,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check-config") => check_config::run(&args[1..]),
        Some("verify-records") => records_cli::verify(&args[1..]),
        Some("export-records") => records_cli::export(&args[1..]),
        Some("hash-token") => match args.get(1..) {
            Some([token]) => {
                println!("{}", TokenHash::of_token(token).to_hex());
                ExitCode::SUCCESS
            }
            _ => usage_error("hash-token takes exactly one TOKEN"),
        },
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("serve") => match parse_serve(&args[1..]) {
            Ok(a) => serve(a),
            Err(e) => usage_error(&e),
        },
        Some(a) if a.starts_with("--") => match parse_serve(&args) {
            Ok(a) => serve(a),
            Err(e) => usage_error(&e),
        },
        _ => usage_error("missing command"),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .init();
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging();
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot load config");
            eprintln!("countersign-approval: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = args.database {
        config.database = countersign_approval::db::Location::parse(&d.to_string_lossy());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("countersign-approval: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_async(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "service failed");
            eprintln!("countersign-approval: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_async(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let listen = config.listen;
    let database = config.database.clone();
    let reviewers = config.reviewers.len();
    let filter_token = config.filter_token_sha256.is_some();
    let state = tokio::task::spawn_blocking(move || AppState::open(config))
        .await?
        .map_err(|e| format!("cannot open the database {}: {e}", database.redacted()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        database = %database.redacted(),
        reviewers,
        filter_token,
        "countersign-approval started"
    );
    if !filter_token {
        tracing::warn!(
            "no filter_token_sha256 configured: anyone who can reach this port can create, \
             cancel or expire reviews and write records; set it (and the filter's approval_token) \
             or keep the port reachable by Envoy only"
        );
    }
    // Scripts wait for this line to learn the (possibly ephemeral) port.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "countersign-approval listening on {local}")?;
    stdout.flush()?;
    drop(stdout);
    run(listener, state, shutdown_signal()).await?;
    tracing::info!("countersign-approval stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
