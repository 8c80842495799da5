//! `hash-token`: the SHA-256 of a token, as the configurations want it
//! (`filter_token_sha256`, a reviewer's `token_sha256`, a caller's `sha256`).
//!
//! The token is read from standard input when no TOKEN (or `-`) is given,
//! so it stays out of shell history and process listings.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use countersign_approval::TokenHash;

/// Options of `hash-token`.
#[derive(clap::Args)]
pub struct Args {
    /// The token. Without it, or with `-`, it is read from standard input
    /// (one trailing line break removed), which keeps it out of shell history.
    #[arg(value_name = "TOKEN")]
    token: Option<String>,
}

/// Prints the hash; exits 2 when there is no usable token.
pub fn run(args: &Args) -> ExitCode {
    let token = match args.token.as_deref() {
        None | Some("-") => read_stdin().map(|input| strip_line_end(&input).to_string()),
        Some(token) => Ok(token.to_string()),
    };
    match token.and_then(|t| usable(&t).map(|()| t)) {
        Ok(token) => {
            println!("{}", TokenHash::of_token(&token).to_hex());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("countersign-approval: hash-token: {e}");
            ExitCode::from(2)
        }
    }
}

/// Standard input: one line from a terminal, everything from a pipe or file.
fn read_stdin() -> Result<String, String> {
    let stdin = std::io::stdin();
    let mut input = String::new();
    let read = if stdin.is_terminal() {
        eprintln!("countersign-approval: type the token, then Enter");
        stdin.read_line(&mut input)
    } else {
        stdin.lock().read_to_string(&mut input)
    };
    read.map_err(|e| format!("cannot read the token from standard input: {e}"))?;
    Ok(input)
}

/// The input without one trailing line break (`\n` or `\r\n`), as `echo`
/// and editors add.
fn strip_line_end(input: &str) -> &str {
    input
        .strip_suffix('\n')
        .map_or(input, |s| s.strip_suffix('\r').unwrap_or(s))
}

/// A token is sent in an HTTP header: empty or multi-line tokens could never
/// match, so they are refused rather than hashed.
fn usable(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty (give TOKEN, or write it to standard input)".into());
    }
    if token.contains(['\n', '\r']) {
        return Err("the token has a line break inside: give one token on one line".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn one_trailing_line_break_is_removed() {
        assert_eq!(strip_line_end("abc\n"), "abc");
        assert_eq!(strip_line_end("abc\r\n"), "abc");
        assert_eq!(strip_line_end("abc"), "abc");
        assert_eq!(strip_line_end("abc\n\n"), "abc\n");
        assert_eq!(strip_line_end(" abc \n"), " abc ");
    }

    #[test]
    fn empty_and_multi_line_tokens_are_refused() {
        assert!(usable("abc").is_ok());
        assert!(usable("").unwrap_err().contains("empty"));
        assert!(usable("abc\n").unwrap_err().contains("line break"));
        assert!(usable("a\rb").unwrap_err().contains("line break"));
    }
}
