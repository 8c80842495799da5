//! Helpers shared by the integration tests (`use crate::common;`): tokens, a
//! service on a temporary database, in-process requests and the calls most
//! tests make (create a review, decide it, wait for it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use countersign_approval::{app, run, AppState, Config, TokenHash};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::Digest;
use tower::ServiceExt;

pub const ALICE: &str = "alice-secret-token";
pub const BOB: &str = "bob-secret-token";
pub const FILTER: &str = "filter-secret";
pub const CAROL: &str = "carol-secret-token";
pub const DANA: &str = "dana-secret-token";

/// alice, carol and dana in `security` (dana also sends as `ci-dana`), bob
/// in no group.
pub const REVIEWERS: [(&str, &str, &str); 4] = [
    ("alice", ALICE, "groups = [\"security\"]"),
    ("bob", BOB, ""),
    ("carol", CAROL, "groups = [\"security\"]"),
    (
        "dana",
        DANA,
        "groups = [\"security\"]\ncallers = [\"ci-dana\"]",
    ),
];

/// The filter-token header, for services that require one.
pub const FILTER_HEADER: (&str, &str) = ("x-countersign-filter-token", FILTER);

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `filter_token_sha256 = ...` for [`FILTER`].
pub fn filter_token_setting() -> String {
    format!(
        "filter_token_sha256 = \"{}\"",
        TokenHash::of_token(FILTER).to_hex()
    )
}

/// Set to a PostgreSQL server URL (`postgresql://user@host:port`), the
/// tests run on PostgreSQL: see [`database_setting`].
pub const POSTGRES_ENV: &str = "COUNTERSIGN_TEST_POSTGRES_URL";

/// Whether the tests run on PostgreSQL (tests that open the SQLite file
/// themselves then skip that part).
pub fn on_postgres() -> bool {
    std::env::var_os(POSTGRES_ENV).is_some()
}

/// Why a test that needs PostgreSQL is ignored in the SQLite pass. The
/// PostgreSQL pass (`./dev test`, under `tests/e2e/with_postgres.py`) runs
/// the ignored tests with `--include-ignored`, so a skip says so in the
/// output instead of passing. Each such test starts with
/// [`require_postgres`], so running it without a server fails.
pub const NEEDS_POSTGRES: &str =
    "needs PostgreSQL: run under tests/e2e/with_postgres.py with --include-ignored";

/// Fails the test unless it runs on PostgreSQL (see [`NEEDS_POSTGRES`]).
pub fn require_postgres() {
    assert!(
        on_postgres(),
        "this test needs PostgreSQL ({POSTGRES_ENV} unset): {NEEDS_POSTGRES}"
    );
}

/// Fails a test that opens SQLite files itself when it runs on PostgreSQL.
/// Such tests are named `sqlite_only_*`; the PostgreSQL pass leaves them
/// out with `--skip sqlite_only_`, so they show as filtered out there.
pub fn require_sqlite() {
    assert!(
        !on_postgres(),
        "this test reads SQLite files itself: the PostgreSQL pass skips sqlite_only_*"
    );
}

/// The `database` setting for a test database at `db`: the SQLite path, or
/// with [`POSTGRES_ENV`] set, a PostgreSQL database of its own, named after
/// the path (so reopening the same path reopens the same database) and
/// created on first use.
pub fn database_setting(db: &Path) -> String {
    let Ok(server) = std::env::var(POSTGRES_ENV) else {
        return db.display().to_string();
    };
    let digest = sha2::Sha256::digest(db.display().to_string().as_bytes());
    let name: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("cs_test_{name}");
    // `postgresql://user@host:port[?options]` → `.../NAME[?options]`.
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b.trim_end_matches('/').to_string(), format!("?{q}")),
        None => (server.trim_end_matches('/').to_string(), String::new()),
    };
    let admin = format!("{base}/postgres{query}");
    let create = format!("CREATE DATABASE {name}");
    // The blocking client may not run on a tokio thread: use a plain one.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        if let Err(e) = client.batch_execute(&create) {
            let exists = e
                .code()
                .is_some_and(|c| *c == postgres::error::SqlState::DUPLICATE_DATABASE);
            assert!(exists, "{create}: {e}");
        }
    })
    .join()
    .unwrap();
    format!("{base}/{name}{query}")
}

/// A service configuration on `db`: `settings` (top-level keys, then any
/// tables), then one `[[reviewers]]` per `(name, token, more lines)`.
pub fn config_toml(db: &Path, settings: &str, reviewers: &[(&str, &str, &str)]) -> String {
    let mut out = format!("database = \"{}\"\n{settings}\n", database_setting(db));
    for (name, token, more) in reviewers {
        out.push_str(&format!(
            "[[reviewers]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n{more}\n",
            TokenHash::of_token(token).to_hex()
        ));
    }
    out
}

pub fn open_state(toml: &str) -> AppState {
    AppState::open(Config::from_toml_str(toml).unwrap()).unwrap()
}

/// A service on its own temporary database.
pub struct Fixture {
    /// Holds the database; dropped last.
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub state: AppState,
    pub app: Router,
}

/// A service on database `db_name` (a path inside a new temporary
/// directory) configured by `toml(db)`.
pub fn fixture(db_name: &str, toml: impl FnOnce(&Path) -> String) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(db_name);
    let state = open_state(&toml(&db));
    let app = app(state.clone());
    Fixture {
        dir,
        db,
        state,
        app,
    }
}

// ------------------------------------------------------------------ requests

/// An answer, read whole.
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON; `Null` when empty.
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header's value, "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// Sends one request to `app` in-process.
pub async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

/// [`send`] with an optional JSON body; answers status and JSON.
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map_or_else(Body::empty, |v| Body::from(v.to_string()));
    // As the filter and a JSON client send it (the filter API takes JSON only).
    let mut headers = headers.to_vec();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type", "application/json"));
    }
    let r = send(app, method, uri, &headers, body).await;
    (r.status, r.json())
}

/// `GET uri` as the reviewer with `token`.
pub async fn get_as(app: &Router, token: &str, uri: &str) -> (StatusCode, Value) {
    call(app, "GET", uri, &[("authorization", &bearer(token))], None).await
}

/// `POST /api/reviews/{id}/{action}` as the reviewer with `token`.
pub async fn decide(
    app: &Router,
    id: &str,
    token: &str,
    action: &str,
    body: Value,
) -> (StatusCode, Value) {
    let uri = format!("/api/reviews/{id}/{action}");
    call(
        app,
        "POST",
        &uri,
        &[("authorization", &bearer(token))],
        Some(body),
    )
    .await
}

/// [`decide`], which must succeed.
pub async fn decide_ok(app: &Router, id: &str, token: &str, action: &str, body: Value) {
    let (status, v) = decide(app, id, token, action, body).await;
    assert_eq!(status, StatusCode::OK, "{action}: {v}");
}

/// The filter's long poll `GET /v1/reviews/{id}/wait` (with `?timeout_ms=`
/// when given).
pub async fn wait(app: &Router, id: &str, timeout_ms: Option<u64>) -> (StatusCode, Value) {
    let uri = match timeout_ms {
        Some(ms) => format!("/v1/reviews/{id}/wait?timeout_ms={ms}"),
        None => format!("/v1/reviews/{id}/wait"),
    };
    call(app, "GET", &uri, &[], None).await
}

/// [`wait`] on a task of its own, to decide the review meanwhile.
pub fn spawn_wait(
    app: &Router,
    id: &str,
    timeout_ms: u64,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let (app, id) = (app.clone(), id.to_string());
    tokio::spawn(async move { wait(&app, &id, Some(timeout_ms)).await })
}

/// Asserts a `400 bad_request` whose message names `field` first.
pub fn assert_bad_request(status: StatusCode, v: &Value, field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_error(v, "bad_request");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("{field}: ")), "{v}");
}

/// Asserts the service's error shape with `code`.
pub fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

// ------------------------------------------------------------------ reviews

/// `base` with every field of `fields` set (both JSON objects).
pub fn merged(mut base: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// The inference request body of [`review_request`].
pub const REVIEW_BODY: &str = "{\"model\":\"gpt-x\",\"messages\":[]}";

/// A `POST /v1/reviews` body: a one-message chat request; `fields`
/// override the defaults.
pub fn review_request(fields: Value) -> Value {
    let defaults = json!({
        "request_id": "req-1",
        "api": "openai_chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "caller": "svc-a",
        "model": "gpt-x",
        "prompt": [{"role": "user", "text": "hello"}],
        "body": REVIEW_BODY,
        "hold_timeout_ms": 60_000
    });
    merged(defaults, fields)
}

/// Creates a review (`body`: see [`review_request`]), sending `headers`
/// (the filter token, where required); returns its id.
pub async fn create_review(app: &Router, headers: &[(&str, &str)], body: Value) -> String {
    let (status, v) = call(app, "POST", "/v1/reviews", headers, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "pending");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("rev_") && id.len() == 36, "{id}");
    id
}

// ------------------------------------------------------------------ sockets

/// [`run`] on a real socket (port 0) until [`Server::shut_down`].
pub struct Server {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn serve(state: AppState) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(listener, state, async {
        let _ = stopped.await;
    }));
    Server { addr, stop, task }
}

impl Server {
    /// Signals shutdown; `run` must return within 5 s.
    pub async fn shut_down(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

/// A connection of the test's own to a test database (SQLite file or
/// PostgreSQL database, as [`database_setting`] chose), for changing it
/// behind the service's back.
pub enum RawDb {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
    /// Being closed on another thread (see `Drop`).
    Gone,
}

impl Drop for RawDb {
    fn drop(&mut self) {
        // The blocking client may not even be dropped on a tokio thread.
        if matches!(self, RawDb::Postgres(_)) && tokio::runtime::Handle::try_current().is_ok() {
            let me = std::mem::replace(self, RawDb::Gone);
            std::thread::spawn(move || drop(me)).join().unwrap();
        }
    }
}

impl RawDb {
    /// Opens the database the service at `db` uses.
    pub fn open(db: &Path) -> RawDb {
        let setting = database_setting(db);
        if on_postgres() {
            // The blocking client may not run on a tokio thread.
            let client = std::thread::spawn(move || {
                postgres::Client::connect(&setting, postgres::NoTls).unwrap()
            })
            .join()
            .unwrap();
            RawDb::Postgres(client)
        } else {
            RawDb::Sqlite(rusqlite::Connection::open(setting).unwrap())
        }
    }

    /// Runs `sql` (one or more statements); the database's error as text.
    pub fn exec(&mut self, sql: &str) -> Result<(), String> {
        match self {
            RawDb::Gone => unreachable!(),
            RawDb::Sqlite(c) => c.execute_batch(sql).map_err(|e| e.to_string()),
            RawDb::Postgres(c) => std::thread::scope(|s| {
                s.spawn(|| {
                    c.batch_execute(sql).map_err(|e| match e.as_db_error() {
                        Some(db) => db.message().to_string(),
                        None => e.to_string(),
                    })
                })
                .join()
                .unwrap()
            }),
        }
    }
}

impl RawDb {
    /// The single text value `sql` selects (cast numbers in the SQL).
    pub fn text(&mut self, sql: &str) -> String {
        match self {
            RawDb::Gone => unreachable!(),
            RawDb::Sqlite(c) => c.query_row(sql, [], |r| r.get(0)).unwrap(),
            RawDb::Postgres(c) => std::thread::scope(|s| {
                s.spawn(|| c.query_one(sql, &[]).unwrap().get::<_, String>(0))
                    .join()
                    .unwrap()
            }),
        }
    }
}
