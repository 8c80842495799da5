//! `countersign-approval`: the approval service binary and its tools.
//!
//! The command line is clap's: every command has `--help`, the binary has
//! `--version`, usage errors exit 2, and serve's options and the records
//! commands' database fall back to environment variables. Without a command
//! the options are serve's (`countersign-approval --config FILE`), as
//! scripts, manifests and container images call it.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use countersign_approval::{run_split, AppState, Config};

mod chain_export;
mod check_config;
mod hash_token;
mod records_cli;
mod replay;

/// countersign's approval service: holds inference requests for human review.
#[derive(Parser)]
#[command(
    name = "countersign-approval",
    version,
    after_help = "Without a command, `serve` is meant: \
                  `countersign-approval --config FILE` serves."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the filter's API, the reviewers' API and the web UI.
    Serve(ServeArgs),
    /// Print the SHA-256 of a token, as the configurations want it.
    HashToken(hash_token::Args),
    /// Check plugin, Envoy, Kubernetes and service configurations before deploying them.
    CheckConfig(check_config::Args),
    /// Verify the hash chain of the session records (read-only).
    VerifyRecords(records_cli::VerifyArgs),
    /// Write session records as JSON Lines to stdout (read-only).
    ExportRecords(records_cli::ExportArgs),
    /// Export the hash-chain entries to a SIEM (JSON Lines or syslog), resumable by seq (read-only).
    ExportChain(chain_export::Args),
    /// Try a draft plugin configuration on the recorded requests: what would change (read-only).
    Replay(replay::Args),
}

/// Options of `serve`. A flag wins over its environment variable, which
/// wins over the configuration file.
#[derive(Args)]
struct ServeArgs {
    /// The service's TOML configuration.
    #[arg(long, value_name = "FILE", env = "COUNTERSIGN_CONFIG")]
    config: PathBuf,
    /// Address to listen on (IP:port), instead of the configuration's `listen`.
    #[arg(long, value_name = "ADDR", env = "COUNTERSIGN_LISTEN")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    database: DatabaseArg,
}

/// `--database`, of `serve` and the records commands.
#[derive(Args)]
struct DatabaseArg {
    /// A SQLite file or a PostgreSQL URL, instead of the configuration's `database`.
    // The variable's value is never shown in --help: a URL may hold a password.
    #[arg(
        long,
        value_name = "PATH|URL",
        env = "COUNTERSIGN_DATABASE",
        hide_env_values = true
    )]
    database: Option<String>,
}

/// The arguments with `serve` inserted when they start with an option (or
/// there are none) rather than a command: the form scripts, manifests and
/// images used before there were commands. `--help` and `--version` stay
/// the binary's own.
fn with_default_command(mut args: Vec<OsString>) -> Vec<OsString> {
    let serve_meant = match args.get(1).map(|a| a.to_string_lossy()) {
        None => !args.is_empty(),
        Some(first) => {
            first.starts_with('-') && !matches!(&*first, "-h" | "--help" | "-V" | "--version")
        }
    };
    if serve_meant {
        args.insert(1, OsString::from("serve"));
    }
    args
}

fn main() -> ExitCode {
    let args = with_default_command(std::env::args_os().collect());
    let matches = Cli::command().get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The records commands ask where a value came from (flag or environment).
    let sub = |name: &str| matches.subcommand_matches(name);
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::HashToken(args) => hash_token::run(&args),
        Command::CheckConfig(args) => check_config::run(&args.into()),
        Command::VerifyRecords(args) => records_cli::verify(&args, sub("verify-records")),
        Command::ExportRecords(args) => records_cli::export(&args, sub("export-records")),
        Command::ExportChain(args) => chain_export::run(&args, sub("export-chain")),
        Command::Replay(args) => replay::run(&args, sub("replay")),
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

/// The configuration `serve` runs with: the file, then the command line's
/// `--listen` and `--database` over it.
fn load_config(args: &ServeArgs) -> Result<Config, countersign_approval::ConfigError> {
    let mut config = Config::load(&args.config)?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = &args.database.database {
        config.database = countersign_approval::db::Location::parse(d);
    }
    Ok(config)
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot load config");
            eprintln!("countersign-approval: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    match runtime.block_on(serve_async(config, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "service failed");
            eprintln!("countersign-approval: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_async(config: Config, args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
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
    let metrics_listener = match state.config().metrics_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (metrics_listen): {e}"))?,
        ),
    };
    let filter_listener = bind_filter_listen(&state).await?;
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
    let shutdown =
        shutdown_signal().map_err(|e| format!("cannot listen for SIGINT and SIGTERM: {e}"))?;
    let reload = reload_on_change(state.clone(), args)
        .map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    // Scripts wait for this line to learn the (possibly ephemeral) port.
    let mut stdout = std::io::stdout().lock();
    // One write: a script that reads the first line and closes the pipe
    // cannot make the second fail.
    let mut lines = format!("countersign-approval listening on {local}\n");
    // /metrics on its own address: served until the service stops.
    let metrics = match metrics_listener {
        None => None,
        Some(l) => {
            lines.push_str(&format!(
                "countersign-approval metrics on {}\n",
                l.local_addr()?
            ));
            let app = countersign_approval::http::metrics_app(state.clone());
            Some(tokio::spawn(async move { axum::serve(l, app).await }))
        }
    };
    if let Some(l) = &filter_listener {
        lines.push_str(&format!(
            "countersign-approval filter API on {}\n",
            l.local_addr()?
        ));
    }
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    drop(stdout);
    let served = run_split(listener, filter_listener, state, shutdown).await;
    reload.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    served?;
    tracing::info!("countersign-approval stopped");
    Ok(())
}

/// Binds `filter_listen`, if set, and says how the filter's channel is
/// protected (`[tls]`).
async fn bind_filter_listen(
    state: &AppState,
) -> Result<Option<tokio::net::TcpListener>, Box<dyn std::error::Error>> {
    let config = state.config();
    let tls = match &config.tls {
        None => "plain HTTP",
        Some(t) if t.mutual() => "mutual TLS",
        Some(_) => "TLS without client certificates",
    };
    let Some(addr) = config.filter_listen else {
        if config.tls.as_ref().is_some_and(|t| t.mutual()) {
            tracing::warn!(
                "[tls] client_ca_file without filter_listen: every client of `listen` (reviewers' \
                 browsers, Slack, the OpenID provider's redirects) needs a client certificate"
            );
        }
        tracing::info!(channel = tls, "filter API on `listen`");
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (filter_listen): {e}"))?;
    tracing::info!(filter_listen = %listener.local_addr()?, channel = tls, "filter API on its own address");
    Ok(Some(listener))
}

/// How often the configuration file is looked at for a change.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads the reviewers on each SIGHUP and whenever the configuration
/// file's content changes (looked at every [`CONFIG_POLL`]). Both call
/// [`reload_reviewers`]. The file is read by its path each time, through
/// any symlink, and compared by content hash, not by modification time: a
/// Kubernetes ConfigMap or Secret volume swaps a symlink to a new directory
/// (the file's own mtime may not move), an editor renames a new file over
/// the old one, and either is seen the same way. A half-written file is
/// invalid (logged, nothing changes) and is read again once it changes
/// again. SIGHUP is listened for from this call on.
fn reload_on_change(
    state: AppState,
    args: ServeArgs,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup())?;
    let mut seen = config_fingerprint(&args.config);
    Ok(tokio::spawn(async move {
        let mut poll = tokio::time::interval(CONFIG_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                signalled = hangup.recv() => match signalled {
                    Some(()) => "SIGHUP",
                    None => return,
                },
                _ = poll.tick() => {
                    let now = config_fingerprint(&args.config);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "file changed"
                }
            };
            reload_reviewers(&state, &args, trigger);
        }
    }))
}

/// The SHA-256 of the configuration file's content, `None` while it cannot
/// be read (a swap in progress, a removed file: nothing is reloaded then).
fn config_fingerprint(path: &std::path::Path) -> Option<Vec<u8>> {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    Some(sha2::Sha256::digest(&bytes).to_vec())
}

/// Reads the configuration again and puts its `[[reviewers]]` in force; an
/// invalid file changes nothing (the reviewers in force stay) and is
/// logged. `trigger` says why, for the log.
fn reload_reviewers(state: &AppState, args: &ServeArgs, trigger: &str) {
    match load_config(args) {
        Ok(config) => {
            let reloaded = state.reload_reviewers(config);
            tracing::info!(
                reviewers = reloaded.reviewers,
                trigger,
                "reviewers reloaded"
            );
            if reloaded.others_changed {
                tracing::warn!(
                    "settings other than [[reviewers]] changed in the configuration; \
                     only the reviewers were reloaded: restart to apply the rest"
                );
            }
        }
        Err(e) => tracing::error!(
            error = %e,
            trigger,
            "reviewers not reloaded: the configuration is invalid; the reviewers in force stay"
        ),
    }
}

/// Resolves on SIGINT or SIGTERM, listened for from this call on: before
/// the address is printed, since a script may stop the service as soon as
/// it has read it.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown signal received; finishing in-flight requests");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn without_a_command_serve_is_meant() {
        let bin = "countersign-approval";
        for (given, meant) in [
            (&[bin][..], &[bin, "serve"][..]),
            (
                &[bin, "--config", "c.toml"],
                &[bin, "serve", "--config", "c.toml"],
            ),
            (
                &[bin, "--config=c.toml"],
                &[bin, "serve", "--config=c.toml"],
            ),
            (
                &[bin, "serve", "--config", "c"],
                &[bin, "serve", "--config", "c"],
            ),
            (&[bin, "hash-token"], &[bin, "hash-token"]),
            (&[bin, "--help"], &[bin, "--help"]),
            (&[bin, "-V"], &[bin, "-V"]),
            (&[], &[]),
        ] {
            assert_eq!(with_default_command(argv(given)), argv(meant), "{given:?}");
        }
    }
}
