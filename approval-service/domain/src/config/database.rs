//! The `database` setting: a SQLite file or a PostgreSQL URL, parsed and
//! checked at load (the database layer connects to what this names).

use std::fmt;
use std::path::PathBuf;

use super::{invalid, ConfigError};

/// Where the database is: the `database` setting, parsed.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgresql://user:pass@host:port/db`).
    Postgres(String),
}

impl Location {
    /// `postgres://` and `postgresql://` URLs select PostgreSQL; anything
    /// else is a SQLite file path.
    pub fn parse(setting: &str) -> Location {
        let lower = setting.trim_start().to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Location::Postgres(setting.trim().to_string())
        } else {
            Location::Sqlite(PathBuf::from(setting))
        }
    }

    /// The location for logs and errors, without a password: a PostgreSQL
    /// URL is rebuilt from its parsed user, hosts, ports and database only.
    pub fn redacted(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(url) => match parse_postgres_url(url) {
                Ok(parsed) => describe_postgres(&parsed.config),
                Err(_) => "postgresql://(a URL that does not parse)".to_string(),
            },
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `postgresql://user@host:port/db`, from a parsed configuration (never
/// the password, nor any other option).
fn describe_postgres(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or("");
    format!("postgresql://{user}{}/{db}", hosts.join(","))
}

/// A PostgreSQL URL, parsed: the client configuration and the CA file
/// named by `sslrootcert`.
pub struct PostgresUrl {
    /// Everything the client understands.
    pub config: postgres::Config,
    /// `sslrootcert=PATH`: CA certificates (PEM) trusted besides Mozilla's.
    pub ca_file: Option<PathBuf>,
}

/// Parses a PostgreSQL URL. Beyond what the client parses itself, it takes
/// libpq's `sslrootcert=PATH` and `sslmode=verify-ca|verify-full`. TLS is
/// required unless the URL says `sslmode=disable`: libpq's default
/// `prefer` would continue in plain text when the server (or someone in
/// between) declines TLS, so here `prefer`, `require`, `verify-ca`,
/// `verify-full` and no `sslmode` at all mean the same: TLS, with the
/// certificate verified, host name included.
pub fn parse_postgres_url(url: &str) -> Result<PostgresUrl, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut ca_file = None;
    let mut disable = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslrootcert", path)) => ca_file = Some(PathBuf::from(path)),
            Some(("sslmode", "disable")) => disable = true,
            Some(("sslmode", "prefer" | "require" | "verify-ca" | "verify-full")) => {}
            Some(("sslmode", other)) => return Err(format!("unknown sslmode {other:?}")),
            _ => kept.push(pair),
        }
    }
    kept.push(if disable {
        "sslmode=disable"
    } else {
        "sslmode=require"
    });
    let rest = format!("{base}?{}", kept.join("&"));
    let config = rest
        .parse::<postgres::Config>()
        .map_err(|e| e.to_string())?;
    Ok(PostgresUrl { config, ca_file })
}

/// Validates `database` / `database_env` (at most one; `env` reads the
/// variable): a non-empty SQLite path, or a PostgreSQL URL that parses.
pub(super) fn check_database(
    database: Option<String>,
    database_env: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Location>, ConfigError> {
    let (field, value) = match (database, database_env) {
        (None, None) => return Ok(None),
        (Some(v), None) => ("database", v),
        (None, Some(name)) => (
            "database_env",
            env(&name).ok_or_else(|| {
                invalid(
                    "database_env",
                    format!("environment variable {name:?} is not set"),
                )
            })?,
        ),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "database",
                "set at most one of `database` and `database_env`",
            ))
        }
    };
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    let location = Location::parse(&value);
    if let Location::Postgres(url) = &location {
        // The `sslrootcert` file is read when connecting (it may exist only
        // where the service runs, not where `check-config` does).
        if let Err(e) = parse_postgres_url(url) {
            return Err(invalid(field, format!("not a valid PostgreSQL URL: {e}")));
        }
    }
    Ok(Some(location))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("postgresql://u:pw@h:5432/db"),
            Location::Postgres("postgresql://u:pw@h:5432/db".into())
        );
        assert_eq!(
            Location::parse("data/x.db"),
            Location::Sqlite(PathBuf::from("data/x.db"))
        );
        for (url, shown) in [
            ("postgresql://u:pw@h:5432/db", "postgresql://u@h:5432/db"),
            ("postgres://u@h/db", "postgresql://u@h:5432/db"),
            // A password with '/' and '@', and one given as an option.
            ("postgresql://u:a%2Fb@h/db", "postgresql://u@h:5432/db"),
            ("postgresql://u:ab/cd@h/db", "postgresql://u@h:5432/db"),
            (
                "postgresql://h/db?user=u&password=s3cret",
                "postgresql://u@h:5432/db",
            ),
        ] {
            let r = Location::parse(url).redacted();
            assert!(
                !r.contains("pw") && !r.contains("s3cret") && !r.contains("cd"),
                "{url}: {r}"
            );
            if !url.contains("ab/cd") {
                assert_eq!(r, shown, "{url}");
            }
        }
    }

    #[test]
    fn tls_is_required_unless_disabled() {
        use postgres::config::SslMode;
        for (url, mode) in [
            ("postgresql://h/db", SslMode::Require),
            ("postgresql://h/db?sslmode=prefer", SslMode::Require),
            (
                "postgresql://h/db?sslmode=verify-full&sslrootcert=/ca.pem",
                SslMode::Require,
            ),
            ("postgresql://h/db?sslmode=disable", SslMode::Disable),
        ] {
            assert_eq!(
                parse_postgres_url(url).unwrap().config.get_ssl_mode(),
                mode,
                "{url}"
            );
        }
        let p = parse_postgres_url("postgresql://h/db?sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(p.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert!(parse_postgres_url("postgresql://h/db?sslmode=allow").is_err());
    }
}
