//! One SQL interface over the two databases the service runs on: an
//! embedded SQLite file (the default, one replica) and PostgreSQL (several
//! replicas sharing one database).
//!
//! Statements are written once, in the subset both dialects share, with
//! SQLite's numbered placeholders (`?1`). For PostgreSQL, [`Conn`] rewrites
//! them (`$1`; `LIKE` becomes `ILIKE`, since SQLite's `LIKE` ignores ASCII
//! case) and prepares them with the parameter types taken from the Rust
//! values, so no statement depends on the server inferring a type.
//! What differs beyond that (schema, triggers, JSON access, catalog
//! queries) is chosen with [`Conn::backend`] at the few places it matters.
//!
//! Booleans are stored as integers 0/1 on both, so one statement binds the
//! same values everywhere; reading accepts either an integer or a boolean.
//!
//! Transactions ([`Conn::transaction`]) serialise what must not interleave:
//! on SQLite with `BEGIN IMMEDIATE` (the file's one write lock), on
//! PostgreSQL with the lock a [`Lock`] names (the review's row, or an
//! advisory lock for the record chain and schema changes), under READ
//! COMMITTED, so every statement after the lock sees the latest commits.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{NoTls, Statement};

pub mod checkpoint;
pub(crate) mod group_commit;
pub mod schema;

pub use crate::config::database::{parse_postgres_url, Location, PostgresUrl};

/// Locks a connection shared behind a mutex and makes it usable: a panic
/// while it was held cannot leave a half-applied change, since each change
/// is one statement or one transaction, which `recover` rolls back if the
/// panic interrupted it.
pub(crate) fn lock(conn: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
    guard.recover();
    guard
}

/// Which database a [`Conn`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A database error. Its text may name tables and values, so it is logged,
/// never shown to clients (the HTTP layer answers 500 and logs it).
#[derive(Debug)]
pub enum DbError {
    /// SQLite refused.
    Sqlite(rusqlite::Error),
    /// PostgreSQL refused, or the connection failed.
    Postgres(postgres::Error),
    /// A stored value was not of the expected type, or a value could not be
    /// encoded.
    Conversion(String),
    /// A change queued for a group commit was not committed: the group's
    /// transaction failed, the change panicked, or its writer ended without
    /// writing it; the text says which.
    Group(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sqlite(e) => write!(f, "sqlite: {e}"),
            DbError::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "postgres: {}: {}", db.code().code(), db.message()),
                None => {
                    // The cause (a refused certificate, a refused connection)
                    // is in the source chain, not in the top message.
                    write!(f, "postgres: {e}")?;
                    let mut source = std::error::Error::source(e);
                    while let Some(cause) = source {
                        write!(f, ": {cause}")?;
                        source = cause.source();
                    }
                    Ok(())
                }
            },
            DbError::Conversion(m) => write!(f, "stored value: {m}"),
            DbError::Group(m) => write!(f, "not committed: {m}"),
        }
    }
}

impl std::error::Error for DbError {}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(e)
    }
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

impl From<serde_json::Error> for DbError {
    fn from(e: serde_json::Error) -> Self {
        DbError::Conversion(e.to_string())
    }
}

/// Result of a database call.
pub type DbResult<T> = Result<T, DbError>;

/// Why the database could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Creating the database's directory failed.
    Io(std::io::Error),
    /// The database refused (or PostgreSQL could not be reached).
    Db(DbError),
    /// The database was written by a newer version of this service.
    SchemaTooNew(i64),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io(e) => write!(f, "cannot create database directory: {e}"),
            OpenError::Db(e) => write!(f, "database: {e}"),
            OpenError::SchemaTooNew(v) => write!(
                f,
                "database schema version {v} is newer than this binary supports ({})",
                schema::SCHEMA_VERSION
            ),
        }
    }
}

impl std::error::Error for OpenError {}

impl From<DbError> for OpenError {
    fn from(e: DbError) -> Self {
        OpenError::Db(e)
    }
}

/// A bound parameter: a (possibly null) integer or text. Typed even when
/// null, so PostgreSQL never has to guess.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    /// `BIGINT` / `INTEGER` (booleans are 0/1).
    Int(Option<i64>),
    /// `TEXT`.
    Text(Option<&'a str>),
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(Some(v))
    }
}
impl From<Option<i64>> for Param<'_> {
    fn from(v: Option<i64>) -> Self {
        Param::Int(v)
    }
}
/// Times and counts: SQL integers are signed 64-bit; times in ms fit with
/// room to spare, and saturation only guards against absurd inputs.
impl From<u64> for Param<'_> {
    fn from(v: u64) -> Self {
        Param::Int(Some(i64::try_from(v).unwrap_or(i64::MAX)))
    }
}
impl From<Option<u64>> for Param<'_> {
    fn from(v: Option<u64>) -> Self {
        Param::Int(v.map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
    }
}
impl From<bool> for Param<'_> {
    fn from(v: bool) -> Self {
        Param::Int(Some(i64::from(v)))
    }
}
impl From<Option<bool>> for Param<'_> {
    fn from(v: Option<bool>) -> Self {
        Param::Int(v.map(i64::from))
    }
}
impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(Some(v))
    }
}
impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(Some(v))
    }
}
impl<'a> From<Option<&'a str>> for Param<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Param::Text(v)
    }
}
impl<'a> From<&'a Option<String>> for Param<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Param::Text(v.as_deref())
    }
}

/// `params![a, b]`: a slice of [`Param`]s.
#[macro_export]
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$($crate::db::Param::from($p)),*][..]
    };
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Int(v) => rusqlite::ToSql::to_sql(v),
            Param::Text(v) => rusqlite::ToSql::to_sql(v),
        }
    }
}

/// A parameter as bound on PostgreSQL. Its `TEXT` cannot hold the NUL
/// character, which a caller can put in a prompt (`"\u0000"`) or a model
/// name: it is stored as U+FFFD instead, so such a request is reviewed and
/// recorded like any other rather than failing with a database error.
#[derive(Debug)]
enum PgValue<'a> {
    Int(Option<i64>),
    Text(Option<std::borrow::Cow<'a, str>>),
}

impl<'a> PgValue<'a> {
    fn of(p: &Param<'a>) -> PgValue<'a> {
        match *p {
            Param::Int(v) => PgValue::Int(v),
            Param::Text(None) => PgValue::Text(None),
            Param::Text(Some(t)) if t.contains('\0') => {
                PgValue::Text(Some(std::borrow::Cow::Owned(t.replace('\0', "\u{FFFD}"))))
            }
            Param::Text(Some(t)) => PgValue::Text(Some(std::borrow::Cow::Borrowed(t))),
        }
    }
}

impl ToSql for PgValue<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            PgValue::Int(v) => v.to_sql(ty, out),
            PgValue::Text(v) => v.as_deref().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl Param<'_> {
    fn pg_type(&self) -> Type {
        match self {
            Param::Int(_) => Type::INT8,
            Param::Text(_) => Type::TEXT,
        }
    }
}

/// A value read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A boolean (PostgreSQL expressions such as `EXISTS`).
    Bool(bool),
    /// Text.
    Text(String),
}

/// Conversion of a [`Value`] to a Rust type.
pub trait FromValue: Sized {
    /// `None` when the value has another type.
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}
/// A time or count written from a `u64` (a negative value reads as 0).
impl FromValue for u64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(u64::try_from(*i).unwrap_or(0)),
            _ => None,
        }
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i != 0),
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `idx` as `T`; an error names the column and what was found.
    pub fn get<T: FromValue>(&self, idx: usize) -> DbResult<T> {
        let v = self.0.get(idx).unwrap_or(&Value::Null);
        T::from_value(v).ok_or_else(|| {
            DbError::Conversion(format!(
                "column {idx}: unexpected {v:?} for {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// What a transaction locks before it reads (PostgreSQL; SQLite takes its
/// one write lock for all of them).
#[derive(Debug, Clone, Copy)]
pub enum Lock<'a> {
    /// The review row with this id (`SELECT ... FOR UPDATE`): decisions and
    /// token consumption of one review serialise, others run in parallel.
    Review(&'a str),
    /// The session-record hash chain: appends serialise across replicas.
    RecordChain,
    /// Schema creation: replicas starting together create it once.
    Schema,
    /// Changes to several reviews written in one transaction (the review
    /// store's group commit, on SQLite only): SQLite's write lock, like
    /// every writing transaction there; nothing more on PostgreSQL.
    Group,
    /// Nothing: a read-only transaction that sees one snapshot throughout
    /// (a long read in pages must not see another replica's retention
    /// half-way).
    ReadSnapshot,
}

/// PostgreSQL advisory lock key of the record chain (any constant unique to
/// countersign).
pub const ADVISORY_RECORD_CHAIN: i64 = 0x6373_0001;
/// PostgreSQL advisory lock key of schema creation.
pub const ADVISORY_SCHEMA: i64 = 0x6373_0002;

/// Statements, rewritten for PostgreSQL and prepared, by their SQLite text
/// and parameter types.
struct Pg {
    client: postgres::Client,
    lock_wait: Duration,
    /// `SET ...` statements of [`Conn::set_session`], replayed on reconnect.
    extra_settings: String,
    url: String,
    statements: HashMap<(String, Vec<Type>), Statement>,
}

enum Inner {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
    /// Handed to another thread to be closed (see `Drop for Conn`).
    Closed,
}

/// One connection to the database.
pub struct Conn {
    inner: Inner,
    /// A transaction is open (set across [`Conn::transaction`]); if a panic
    /// interrupted it, [`Conn::recover`] rolls it back.
    in_transaction: bool,
}

/// SQLite's `?N` placeholders as PostgreSQL's `$N`, outside string
/// literals, and `LIKE` as `ILIKE`.
pub fn to_postgres_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut in_literal = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_literal = !in_literal;
                out.push(c);
            }
            '?' if !in_literal && chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            _ => out.push(c),
        }
    }
    out.replace(" LIKE ", " ILIKE ")
}

/// How long a PostgreSQL connection attempt may take.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn pg_connect(url: &str) -> DbResult<postgres::Client> {
    let PostgresUrl {
        mut config,
        ca_file,
    } = parse_postgres_url(url).map_err(DbError::Conversion)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(PG_CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("countersign-approval");
    }
    // A server that vanished without closing the connection (failover
    // behind a virtual IP, a NAT that forgot the flow) is noticed in
    // seconds, not after the system's two-hour keepalive.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    if config.get_ssl_mode() == postgres::config::SslMode::Disable {
        return Ok(config.connect(NoTls)?);
    }
    // Anything else is `require` (see `parse_postgres_url`): TLS, verified.
    let tls = crate::tls::database_config(ca_file.as_deref()).map_err(DbError::Conversion)?;
    Ok(config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))?)
}

/// Settings of every PostgreSQL session: how long to wait for a lock, a
/// bound on any statement (a hung one would hold the connection's mutex,
/// stalling the replica), and on a transaction left idle (a hung replica
/// must not hold the record chain's lock for long).
fn session_settings(lock_wait: Duration) -> String {
    format!(
        "SET lock_timeout = {}; SET statement_timeout = 30000; \
         SET idle_in_transaction_session_timeout = 30000",
        lock_wait.as_millis().max(1)
    )
}

fn pg_value(row: &postgres::Row, idx: usize) -> DbResult<Value> {
    let ty = row.columns()[idx].type_().clone();
    let v = if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(idx)?.map(Value::Int)
    } else if ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(idx)?
            .map(|v| Value::Int(i64::from(v)))
    } else if ty == Type::INT2 {
        row.try_get::<_, Option<i16>>(idx)?
            .map(|v| Value::Int(i64::from(v)))
    } else if ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(idx)?.map(Value::Bool)
    } else if ty == Type::TEXT || ty == Type::VARCHAR || ty == Type::NAME || ty == Type::BPCHAR {
        row.try_get::<_, Option<String>>(idx)?.map(Value::Text)
    } else if ty == Type::VOID {
        None
    } else {
        return Err(DbError::Conversion(format!(
            "column {idx} has unsupported type {ty}"
        )));
    };
    Ok(v.unwrap_or(Value::Null))
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> DbResult<Value> {
    use rusqlite::types::ValueRef;
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(
            String::from_utf8(t.to_vec()).map_err(|e| DbError::Conversion(e.to_string()))?,
        ),
        ValueRef::Real(f) => return Err(DbError::Conversion(format!("unexpected real {f}"))),
        ValueRef::Blob(_) => return Err(DbError::Conversion("unexpected blob".into())),
    })
}

impl Pg {
    fn statement(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<Statement> {
        let types: Vec<Type> = params.iter().map(Param::pg_type).collect();
        let key = (sql.to_string(), types);
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let s = self.client.prepare_typed(&to_postgres_sql(sql), &key.1)?;
        self.statements.insert(key, s.clone());
        Ok(s)
    }

    /// Replaces a closed connection with a new one, with the same session
    /// settings.
    fn reconnect(&mut self) -> DbResult<()> {
        let mut client = pg_connect(&self.url)?;
        client.batch_execute(&session_settings(self.lock_wait))?;
        if !self.extra_settings.is_empty() {
            client.batch_execute(&self.extra_settings)?;
        }
        self.client = client;
        self.statements.clear();
        tracing::info!("reconnected to PostgreSQL");
        Ok(())
    }

    /// Runs `f`; when it failed because the connection is gone (server
    /// restart, failover, a terminated session) and no transaction was
    /// open, reconnects and runs it once more.
    fn run<T>(&mut self, in_transaction: bool, f: impl Fn(&mut Pg) -> DbResult<T>) -> DbResult<T> {
        match f(self) {
            Err(e) if !in_transaction && self.client.is_closed() => {
                tracing::warn!(error = %e, "PostgreSQL connection lost; reconnecting");
                self.reconnect()?;
                f(self)
            }
            other => other,
        }
    }

    fn values<'p>(params: &[Param<'p>]) -> Vec<PgValue<'p>> {
        params.iter().map(PgValue::of).collect()
    }

    fn bind<'v>(values: &'v [PgValue<'_>]) -> Vec<&'v (dyn ToSql + Sync)> {
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
    }
}

impl Conn {
    /// Opens (creating when missing) a SQLite file with WAL journaling.
    pub fn open_sqlite(path: &Path, busy_timeout: Duration, synchronous: &str) -> DbResult<Conn> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", synchronous)?;
        Ok(Conn::from_sqlite(conn))
    }

    /// Opens a SQLite file read-only (the record tools).
    pub fn open_sqlite_read_only(path: &Path) -> DbResult<Conn> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Conn::from_sqlite(conn))
    }

    /// Wraps an open SQLite connection.
    pub fn from_sqlite(conn: rusqlite::Connection) -> Conn {
        Conn {
            inner: Inner::Sqlite(conn),
            in_transaction: false,
        }
    }

    /// Connects to PostgreSQL. Blocking: call it off the async runtime.
    /// A statement waits at most `lock_wait` for a lock another session
    /// holds (like SQLite's busy timeout), so a stuck replica turns into a
    /// quick error, not a hang.
    pub fn connect_postgres(url: &str, lock_wait: Duration) -> DbResult<Conn> {
        let mut client = pg_connect(url)?;
        client.batch_execute(&session_settings(lock_wait))?;
        Ok(Conn {
            inner: Inner::Postgres(Box::new(Pg {
                client,
                lock_wait,
                extra_settings: String::new(),
                url: url.to_string(),
                statements: HashMap::new(),
            })),
            in_transaction: false,
        })
    }

    /// Opens the database at `location` (SQLite with `busy_timeout` and
    /// `synchronous`).
    pub fn open(location: &Location, busy_timeout: Duration, synchronous: &str) -> DbResult<Conn> {
        match location {
            Location::Sqlite(path) => Conn::open_sqlite(path, busy_timeout, synchronous),
            Location::Postgres(url) => Conn::connect_postgres(url, busy_timeout),
        }
    }

    /// Leaves this connection's WAL checkpoints to `checkpointer` (a SQLite
    /// connection to the checkpointer's file); nothing on PostgreSQL.
    pub fn checkpoint_with(&mut self, checkpointer: &checkpoint::Checkpointer) -> DbResult<()> {
        match &mut self.inner {
            Inner::Sqlite(conn) => Ok(checkpointer.take_over(conn)?),
            Inner::Postgres(_) | Inner::Closed => Ok(()),
        }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) | Inner::Closed => Backend::Postgres,
        }
    }

    /// Makes the connection usable after a panic or a lost server: rolls
    /// back a transaction a panic left open, and reconnects a PostgreSQL
    /// connection that was closed (server restart, network).
    pub fn recover(&mut self) {
        if self.in_transaction {
            self.in_transaction = false;
            if let Err(e) = self.batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback of an interrupted transaction failed");
            }
        }
        if let Inner::Postgres(pg) = &mut self.inner {
            if pg.client.is_closed() {
                if let Err(e) = pg.reconnect() {
                    tracing::warn!(error = %e, "cannot reconnect to PostgreSQL");
                }
            }
        }
    }

    /// Runs statements without parameters (schema, transaction control).
    pub fn batch(&mut self, sql: &str) -> DbResult<()> {
        match &mut self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(pg) => pg.run(self.in_transaction, |pg| {
                Ok(pg.client.batch_execute(sql)?)
            }),
            Inner::Closed => Err(closed()),
        }
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<usize> {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))?)
            }
            Inner::Postgres(pg) => pg.run(self.in_transaction, |pg| {
                let stmt = pg.statement(sql, params)?;
                let n = pg.client.execute(&stmt, &Pg::bind(&Pg::values(params)))?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }),
            Inner::Closed => Err(closed()),
        }
    }

    /// Every row of a query.
    pub fn query(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<Vec<Row>> {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let width = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut values = Vec::with_capacity(width);
                    for idx in 0..width {
                        values.push(sqlite_value(row.get_ref(idx)?)?);
                    }
                    out.push(Row(values));
                }
                Ok(out)
            }
            Inner::Postgres(pg) => pg.run(self.in_transaction, |pg| {
                let stmt = pg.statement(sql, params)?;
                let rows = pg.client.query(&stmt, &Pg::bind(&Pg::values(params)))?;
                rows.iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|idx| pg_value(row, idx))
                            .collect::<DbResult<Vec<Value>>>()
                            .map(Row)
                    })
                    .collect()
            }),
            Inner::Closed => Err(closed()),
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of a query that always returns one (aggregates).
    pub fn query_one(&mut self, sql: &str, params: &[Param<'_>]) -> DbResult<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| DbError::Conversion("query returned no row".into()))
    }

    /// Runs `f` in a transaction that first takes `lock`; commits when `f`
    /// returns `Ok`, rolls back otherwise.
    pub fn transaction<T, E: From<DbError>>(
        &mut self,
        lock: Lock<'_>,
        f: impl FnOnce(&mut Conn) -> Result<T, E>,
    ) -> Result<T, E> {
        self.recover();
        match (self.backend(), lock) {
            (Backend::Sqlite, Lock::ReadSnapshot) => self.batch("BEGIN")?,
            (Backend::Sqlite, _) => self.batch("BEGIN IMMEDIATE")?,
            (Backend::Postgres, Lock::ReadSnapshot) => {
                self.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?
            }
            // The chain's lock is taken with `BEGIN`, in one round trip
            // (appends are serial, so each round trip under the lock counts).
            (Backend::Postgres, Lock::RecordChain) => {
                if let Err(e) = self.batch(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({ADVISORY_RECORD_CHAIN})"
                )) {
                    // `BEGIN` may have run: end its transaction.
                    self.in_transaction = true;
                    self.recover();
                    return Err(E::from(e));
                }
            }
            (Backend::Postgres, _) => self.batch("BEGIN")?,
        }
        self.in_transaction = true;
        let locked = match (self.backend(), lock) {
            (Backend::Sqlite, _)
            | (Backend::Postgres, Lock::ReadSnapshot | Lock::RecordChain | Lock::Group) => Ok(()),
            (Backend::Postgres, Lock::Review(id)) => self
                .query(
                    "SELECT 1 FROM reviews WHERE id = ?1 FOR UPDATE",
                    params![id],
                )
                .map(drop),
            (Backend::Postgres, Lock::Schema) => self
                .query("SELECT pg_advisory_xact_lock(?1)", params![ADVISORY_SCHEMA])
                .map(drop),
        };
        let result = match locked {
            Ok(()) => f(self),
            Err(e) => Err(E::from(e)),
        };
        let end = match &result {
            Ok(_) => self.batch("COMMIT"),
            Err(_) => self.batch("ROLLBACK"),
        };
        self.in_transaction = false;
        match (result, end) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => {
                // A failed COMMIT may leave SQLite's transaction open.
                let _ = self.batch("ROLLBACK");
                Err(E::from(e))
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Runs `SET` statements that must hold for the whole session, also
    /// after a reconnect (PostgreSQL; SQLite has no such settings here).
    pub fn set_session(&mut self, settings: &str) -> DbResult<()> {
        if let Inner::Postgres(pg) = &mut self.inner {
            pg.client.batch_execute(settings)?;
            pg.extra_settings.push_str(settings);
            pg.extra_settings.push(';');
        }
        Ok(())
    }

    /// Whether a table exists.
    pub fn table_exists(&mut self, name: &str) -> DbResult<bool> {
        let sql = match self.backend() {
            Backend::Sqlite => {
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1"
            }
            Backend::Postgres => {
                "SELECT count(*) FROM pg_catalog.pg_tables
                 WHERE tablename = ?1 AND schemaname = current_schema()"
            }
        };
        Ok(self.query_one(sql, params![name])?.get::<i64>(0)? > 0)
    }

    /// Tells other replicas listening on `channel` (PostgreSQL `NOTIFY`);
    /// nothing on SQLite, where there is one replica.
    pub fn notify(&mut self, channel: &str, payload: &str) -> DbResult<()> {
        if self.backend() == Backend::Postgres {
            self.query("SELECT pg_notify(?1, ?2)", params![channel, payload])?;
        }
        Ok(())
    }

    /// The PostgreSQL client, for `LISTEN` (see [`crate::replicas`]).
    pub(crate) fn postgres_client(&mut self) -> Option<&mut postgres::Client> {
        match &mut self.inner {
            Inner::Postgres(pg) => Some(&mut pg.client),
            Inner::Sqlite(_) | Inner::Closed => None,
        }
    }
}

fn closed() -> DbError {
    DbError::Conversion("connection closed".into())
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The blocking PostgreSQL client closes its connection with a
        // `block_on`, which tokio forbids on a runtime thread (a service
        // dropped inside async code, as in tests): close it on a thread of
        // its own there.
        if matches!(self.inner, Inner::Postgres(_)) && tokio::runtime::Handle::try_current().is_ok()
        {
            let inner = std::mem::replace(&mut self.inner, Inner::Closed);
            let (tx, rx) = std::sync::mpsc::channel::<Inner>();
            let spawned = std::thread::Builder::new()
                .name("countersign-close".into())
                .spawn(move || drop(rx.recv()));
            match spawned {
                Ok(_) => drop(tx.send(inner)),
                // No thread to close it on: leave the socket to the OS
                // rather than panic on this thread.
                Err(_) => std::mem::forget(inner),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn placeholders_and_like_are_rewritten_outside_literals() {
        assert_eq!(
            to_postgres_sql("SELECT a FROM t WHERE b = ?1 AND c LIKE ?12 ESCAPE '\\' AND d = '?3'"),
            "SELECT a FROM t WHERE b = $1 AND c ILIKE $12 ESCAPE '\\' AND d = '?3'"
        );
    }

    #[test]
    fn sqlite_round_trip_and_transactions() {
        let mut c = Conn::from_sqlite(rusqlite::Connection::open_in_memory().unwrap());
        c.batch("CREATE TABLE t (a INTEGER, b TEXT)").unwrap();
        c.execute("INSERT INTO t VALUES (?1, ?2)", params![5i64, "x"])
            .unwrap();
        c.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            params![Some(true), None::<&str>],
        )
        .unwrap();
        let rows = c.query("SELECT a, b FROM t ORDER BY a", params![]).unwrap();
        assert_eq!(rows[0].get::<i64>(0).unwrap(), 1);
        assert!(rows[0].get::<bool>(0).unwrap());
        assert_eq!(rows[0].get::<Option<String>>(1).unwrap(), None);
        assert_eq!(rows[1].get::<String>(1).unwrap(), "x");
        assert!(rows[1].get::<String>(0).is_err());
        let r: Result<(), DbError> = c.transaction(Lock::Schema, |c| {
            c.execute("INSERT INTO t VALUES (9, 'gone')", params![])?;
            Err(DbError::Conversion("abort".into()))
        });
        assert!(r.is_err());
        let n = c.query_one("SELECT count(*) FROM t", params![]).unwrap();
        assert_eq!(n.get::<i64>(0).unwrap(), 2);
        assert!(c.table_exists("t").unwrap());
        assert!(!c.table_exists("nope").unwrap());
    }
}
