#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TLS to PostgreSQL: with `sslmode=require` the service verifies the
//! server's certificate (against Mozilla's roots and libpq's `sslrootcert`)
//! and refuses one it cannot verify, with an error that says why.
//!
//! Runs in the PostgreSQL pass of the tests, whose server speaks TLS
//! (`COUNTERSIGN_TEST_POSTGRES_CA` names its CA certificate); ignored in
//! the SQLite pass, and fails without the CA.

use crate::common;

use countersign_approval::{AppState, Config};

/// The server's CA certificate (PEM), set by the test runner.
const CA_ENV: &str = "COUNTERSIGN_TEST_POSTGRES_CA";

/// The database URL of `db` with `options` instead of the runner's.
fn url_with(db: &std::path::Path, options: &str) -> String {
    let plain = common::database_setting(db);
    let base = plain.split_once('?').map_or(plain.as_str(), |(b, _)| b);
    format!("{base}?{options}")
}

fn open(url: &str) -> Result<AppState, String> {
    let toml = format!("database = \"{url}\"\n");
    AppState::open(Config::from_toml_str(&toml).unwrap()).map_err(|e| e.to_string())
}

#[test]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
fn tls_connections_verify_the_server_certificate() {
    common::require_postgres();
    let ca = std::env::var(CA_ENV).unwrap_or_else(|_| panic!("{CA_ENV} is not set"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tls.db");

    // Trusting the server's CA: the service connects over TLS.
    let state = open(&url_with(&db, &format!("sslmode=require&sslrootcert={ca}"))).unwrap();
    let mut raw = common::RawDb::open(&db);
    // This test's database only: other tests' services, in the same test
    // binary and cluster, connect in plain text.
    let encrypted = raw.text(
        "SELECT CAST(bool_and(s.ssl) AS TEXT) FROM pg_stat_ssl s
         JOIN pg_stat_activity a ON a.pid = s.pid
         WHERE a.application_name = 'countersign-approval'
           AND a.datname = current_database()",
    );
    assert_eq!(encrypted, "true", "every service connection uses TLS");
    drop(state);

    // Without that CA the certificate is refused, by `require` and by the
    // default `prefer` alike (never a silent fall back to plain text).
    for options in ["sslmode=require", "sslmode=prefer", "sslmode=verify-full"] {
        let e = open(&url_with(&db, options)).err().unwrap();
        assert!(e.contains("UnknownIssuer"), "{options}: {e}");
    }
    // A CA file that is not there is named.
    let e = open(&url_with(
        &db,
        "sslmode=require&sslrootcert=/nonexistent/ca.pem",
    ))
    .err()
    .unwrap();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    // Plain text only when asked for.
    drop(open(&url_with(&db, "sslmode=disable")).unwrap());
}
