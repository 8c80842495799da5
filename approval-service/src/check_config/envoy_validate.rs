//! Envoy's own validation of a bootstrap: `envoy --mode validate -c FILE`,
//! with the binary given, found on `PATH`, or in `.venv/bin`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Checker, EnvoyBin};

/// How long `envoy --mode validate` may take.
const ENVOY_VALIDATE_TIMEOUT: Duration = Duration::from_secs(60);

impl Checker {
    /// Runs Envoy on a bootstrap that passed every other check.
    pub(super) fn envoy_validate(&mut self, file: &Path, envoy: &Result<PathBuf, String>) {
        let bin = match envoy {
            Ok(b) => b,
            Err(why) => {
                if why.is_empty() {
                    self.report
                        .note(file, "envoy --mode validate skipped (--no-envoy)");
                } else {
                    self.report
                        .warning(file, format!("envoy --mode validate skipped: {why}"));
                }
                return;
            }
        };
        match run_envoy_validate(bin, file) {
            Ok(()) => self.report.ok(
                file,
                format!("`{} --mode validate` accepts it", bin.display()),
            ),
            Err(e) => self.report.error(
                file,
                format!("`{} --mode validate` rejects it: {e}", bin.display()),
            ),
        }
    }
}

/// Finds the Envoy binary; `Err("")` when skipped on purpose, `Err(why)`
/// when none was found.
pub(super) fn resolve_envoy(choice: &EnvoyBin) -> Result<PathBuf, String> {
    match choice {
        EnvoyBin::Skip => Err(String::new()),
        EnvoyBin::Path(p) => {
            if is_executable(p) {
                Ok(p.clone())
            } else {
                Err(format!(
                    "--envoy-bin {} is not an executable file",
                    p.display()
                ))
            }
        }
        EnvoyBin::Auto => {
            let mut candidates = Vec::new();
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path).map(|d| d.join("envoy")));
            }
            candidates.push(PathBuf::from(".venv/bin/envoy"));
            if let Ok(exe) = std::env::current_exe() {
                candidates.extend(
                    exe.ancestors()
                        .skip(1)
                        .take(4)
                        .map(|d| d.join(".venv/bin/envoy")),
                );
            }
            candidates
                .into_iter()
                .find(|c| is_executable(c))
                .ok_or_else(|| {
                    "no `envoy` on PATH nor in .venv/bin (pass --envoy-bin PATH, or --no-envoy)"
                        .to_string()
                })
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `envoy --mode validate -c FILE`; on failure returns Envoy's error lines.
fn run_envoy_validate(bin: &Path, file: &Path) -> Result<(), String> {
    let mut child = Command::new(bin)
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > ENVOY_VALIDATE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer within {}s",
                    ENVOY_VALIDATE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    };
    let output: String = readers
        .into_iter()
        .filter_map(|h| h.join().ok())
        .collect::<Vec<_>>()
        .join("\n");
    if status.success() {
        return Ok(());
    }
    let mut lines: Vec<String> = output
        .lines()
        .filter(|l| l.contains("[critical]") || l.contains("[error]"))
        .map(|l| shorten(envoy_log_message(l)))
        .collect();
    if lines.is_empty() {
        lines = output
            .lines()
            .rev()
            .take(5)
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
    }
    Err(format!("{status}: {}", lines.join(" | ")))
}

/// The message of an Envoy log line `[time][pid][level][component] [source/file.cc:N] message`.
fn envoy_log_message(line: &str) -> &str {
    line.find("] [source/")
        .and_then(|i| line[i + 2..].find("] ").map(|j| &line[i + 2 + j + 2..]))
        .unwrap_or(line)
        .trim()
}

/// Envoy quotes the whole configuration in some errors: keep the start.
fn shorten(line: &str) -> String {
    const MAX: usize = 400;
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_log_lines() {
        let l = "[2026-11-27 21:08:31.571][21586][critical][main] [source/server/config_validation/server.cc:76] error initializing configuration 'x': [bad]";
        assert_eq!(
            envoy_log_message(l),
            "error initializing configuration 'x': [bad]"
        );
        assert_eq!(envoy_log_message("plain"), "plain");
        assert_eq!(shorten(&"x".repeat(500)).len(), 403);
    }
}
