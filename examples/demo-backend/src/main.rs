//! `demo-backend [--listen ADDR]`: serve the echo model until SIGTERM/SIGINT.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// After a shutdown signal, in-flight requests get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const USAGE: &str =
    "usage: demo-backend [--listen ADDR]   (default 127.0.0.1:8000; port 0 picks a free port)";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<String, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" | "-l" => {
                listen = args
                    .next()
                    .ok_or_else(|| "--listen needs an address".to_owned())?;
            }
            "--help" | "-h" => return Err(String::new()),
            other => match other.strip_prefix("--listen=") {
                Some(addr) => listen = addr.to_owned(),
                None => return Err(format!("unknown argument: {other}")),
            },
        }
    }
    Ok(listen)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let listen = match parse_args(std::env::args().skip(1)) {
        Ok(l) => l,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("demo-backend: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-backend: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo-backend: {e}");
            return ExitCode::from(1);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        // Nothing useful to do if stdout is gone; keep serving.
        let _ = writeln!(out, "demo-backend listening on {local}");
        let _ = out.flush();
    }

    let (signalled_tx, mut signalled_rx) = tokio::sync::watch::channel(false);
    let listener = listener.tap_io(|tcp| {
        // Small SSE events must leave at once.
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, demo_backend::app()).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(true);
    });
    // Graceful shutdown waits for open connections; a client that never sends
    // its body must not keep us alive forever.
    let drain_deadline = async move {
        if signalled_rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        res = async move { server.await } => match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo-backend: server error: {e}");
                ExitCode::from(1)
            }
        },
        () = drain_deadline => {
            eprintln!("demo-backend: connections still open after {DRAIN_TIMEOUT:?}; exiting");
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_args;

    fn args(a: &[&str]) -> impl Iterator<Item = String> {
        a.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn cli() {
        assert_eq!(parse_args(args(&[])), Ok("127.0.0.1:8000".to_owned()));
        assert_eq!(
            parse_args(args(&["--listen", "0.0.0.0:0"])),
            Ok("0.0.0.0:0".to_owned())
        );
        assert_eq!(
            parse_args(args(&["--listen=127.0.0.1:9"])),
            Ok("127.0.0.1:9".to_owned())
        );
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--bogus"])).is_err());
    }
}
