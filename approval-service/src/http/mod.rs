//! The HTTP layer, the top of the service: the router ([`app`]), the server
//! ([`run`]), request extraction ([`extract`], [`auth`]), the one mapping of
//! domain errors to HTTP answers ([`error`]), and the handlers by area:
//! [`reviews`], [`watch`] (the filter workers' watches of their held
//! requests), [`standing`] (standing approvals: their automatic
//! decisions, list, revocation), [`approval_tokens`], [`records`], [`metrics`],
//! [`stats`] (the reviewer load over a period, for the UI's *Load* page),
//! [`follow_ups`] (flagged audits), the
//! reviewer web UI ([`ui`], with its session cookie in [`cookies`], and
//! sign-in through the OpenID Connect provider in [`oidc`]), and the Slack
//! app's interactivity endpoint ([`crate::slack::interact`]).
//!
//! Handlers parse and check what the client sent, call the domain through
//! [`AppState`], and turn its answer into a response; the decisions are
//! made below (see the domain crate's layers).

pub mod approval_tokens;
pub mod auth;
pub mod cookies;
pub mod error;
pub mod every_request;
pub mod extract;
pub mod follow_ups;
pub mod metrics;
pub mod oidc;
pub mod records;
pub mod reviews;
pub mod spans;
pub mod standing;
pub mod stats;
pub mod tls;
pub mod ui;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Extension, Json, Router};

use crate::slack::interact as slack;
use crate::state::{AppState, RETENTION_PERIOD, SWEEP_PERIOD};
use error::ApiError;
use every_request::EveryRequestLayer;

/// Largest accepted request body. The filter forwards whole inference
/// bodies (several MiB with images or long contexts) inside its JSON.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The HTTP API.
pub fn app(state: AppState) -> Router {
    let client = crate::outbound::client(state.config())
        .inspect_err(|e| tracing::error!(error = %e, "no outbound HTTP client"))
        .ok();
    router(state, client)
}

/// The router of `metrics_listen`: `GET /metrics` and nothing else.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::metrics_only))
        .fallback(fallback)
        .with_state(state)
}

/// The filter API: every route the filter calls (with its token), on
/// `listen`, or alone on `filter_listen` ([`filter_app`]).
fn filter_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/reviews", post(reviews::create_review))
        .route("/v1/reviews/{id}/expire", post(reviews::expire_review))
        .route("/v1/reviews/{id}/cancel", post(reviews::cancel_review))
        .route("/v1/reviews/{id}/consume", post(approval_tokens::consume))
        .route("/v1/records", post(records::create_record))
        .route("/v1/records/batch", post(records::create_records))
        .route("/v1/records/responses", post(records::create_responses))
        .route("/v1/records/{id}/response", post(records::create_response))
        // Behind the guard although it is a long poll: there is one per
        // filter worker, not one per held request.
        .route("/v1/watch", post(watch::watch))
        .route_layer(axum::middleware::from_fn(json_only))
        // Added after the guard, which checks POSTs only: a layer costs
        // every request an allocation for as long as it lasts, and a long
        // poll lasts as long as its request is held (issue #17).
        .route("/v1/reviews/{id}/wait", get(reviews::wait_review))
        .route(
            "/v1/reviews/{id}/status",
            get(approval_tokens::caller_status),
        )
}

/// The filter API takes JSON only (the filter sends every call as
/// `application/json`). A browser sends a cross-site POST without asking
/// the server first (no CORS preflight) only with a form or text content
/// type, so without this a web page a reviewer opens could write records
/// into the chain, file reviews or cancel them on a service that has no
/// filter token configured (the shipped example on loopback).
async fn json_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let json = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if request.method() == axum::http::Method::POST && !json {
        return Err(ApiError::Coded {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: "the filter API takes `content-type: application/json`".into(),
        });
    }
    Ok(next.run(request).await)
}

/// The router of `filter_listen`: the filter API, `/healthz` and `/readyz`.
fn filter_app(state: AppState, client: Option<reqwest::Client>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(filter_routes())
        .fallback(fallback)
        // One layer (outermost first), for the reason of `router`'s.
        .layer((
            EveryRequestLayer::timed(state.clone()),
            DefaultBodyLimit::max(MAX_BODY_BYTES),
            Extension(slack::OutboundClient(client)),
        ))
        .with_state(state)
}

fn router(state: AppState, client: Option<reqwest::Client>) -> Router {
    // With `metrics_listen`, /metrics lives there only; with
    // `filter_listen`, the filter API.
    let metrics_here = state.config().metrics_listen.is_none();
    let filter_here = state.config().filter_listen.is_none();
    let relying_party = oidc::relying_party(&state);
    let session_checks = oidc::SessionChecks::new(relying_party.clone());
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/me", get(reviews::me))
        .route("/api/reviews", get(reviews::list_reviews))
        .route("/api/reviews/{id}", get(reviews::get_review))
        .route("/api/reviews/{id}/approve", post(reviews::approve))
        .route("/api/reviews/{id}/reject", post(reviews::reject))
        .route("/api/reviews/{id}/edit", post(reviews::edit))
        .route("/api/events", get(reviews::events))
        .route("/api/standing-approvals", get(standing::list))
        .route("/api/standing-approvals/{id}", get(standing::get))
        .route(
            "/api/standing-approvals/{id}/revoke",
            post(standing::revoke),
        )
        .route("/api/stats/load", get(stats::load))
        .route("/api/follow-ups", get(follow_ups::list))
        .route(
            "/api/follow-ups/{review_id}/resolve",
            post(follow_ups::resolve),
        )
        .route("/api/records", get(records::list_records))
        .route("/api/records/export", get(records::export_records))
        .route("/api/records/{id}", get(records::get_record))
        .route("/", get(ui::app_page))
        .route("/reviews/{id}", get(ui::app_page))
        .route("/history", get(ui::app_page))
        .route("/load", get(ui::app_page))
        .route("/standing", get(ui::app_page))
        .route("/standing/{id}", get(ui::app_page))
        .route("/login", get(ui::login_page))
        .route("/ui/login", post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .route("/ui/{asset}", get(ui::ui_asset))
        .route(
            "/slack/interactivity",
            post(slack::interactivity).layer(DefaultBodyLimit::max(slack::MAX_BODY_BYTES)),
        )
        .merge(oidc::routes(&state, relying_party));
    let routes = match metrics_here {
        true => routes.route("/metrics", get(metrics::metrics)),
        false => routes,
    };
    let routes = match filter_here {
        true => routes.merge(filter_routes()),
        false => routes,
    };
    // The layers as one tuple (outermost first): axum boxes each layer
    // given to `Router::layer` on its own, per request, for as long as the
    // request lasts (a held request's long poll: its whole hold).
    routes
        .fallback(fallback)
        .layer((
            EveryRequestLayer::traced(state.clone()),
            DefaultBodyLimit::max(MAX_BODY_BYTES),
            Extension(session_checks),
            Extension(slack::OutboundClient(client)),
        ))
        .with_state(state)
}

/// Serves [`app`] on `listener` with the expiry sweeper, record retention,
/// the decision metrics and notifications (webhooks, Slack: [`crate::notify`]) running, until
/// `shutdown` resolves; then pending long polls answer at once and
/// in-flight requests finish before this returns. A configuration with
/// `filter_listen` is served by [`run_split`].
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_split(listener, None, state, shutdown).await
}

/// [`run`], with the filter API on `filter_listener` (bound to
/// `filter_listen`, which it must be given exactly when that is set).
/// `[tls]` is served on the filter's listener: `filter_listener`, or
/// `listener` without one.
pub async fn run_split(
    listener: tokio::net::TcpListener,
    filter_listener: Option<tokio::net::TcpListener>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if state.config().filter_listen.is_some() != filter_listener.is_some() {
        return Err(std::io::Error::other(
            "filter_listen and the filter API's listener go together",
        ));
    }
    let client = crate::outbound::client(state.config()).map_err(std::io::Error::other)?;
    let telemetry =
        crate::telemetry::init(state.config(), client.clone()).map_err(std::io::Error::other)?;
    let notifier = crate::notify::spawn(&state, client.clone());
    let sweeper = state.spawn_sweeper(SWEEP_PERIOD);
    let retention = state.spawn_retention(RETENTION_PERIOD);
    let decision_metrics = state.spawn_decision_metrics();
    let tls = state.config().tls.as_ref().map(|t| t.server_config.clone());
    // Both servers stop together: on `shutdown`, long polls are answered
    // (`begin_shutdown`) and each finishes its in-flight requests.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_shutdown = state.clone();
    let signal = tokio::spawn(async move {
        shutdown.await;
        on_shutdown.begin_shutdown();
        let _ = stop.send(true);
    });
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let result = match filter_listener {
        None => serve_on(listener, tls, router(state, Some(client)), until_stopped()).await,
        Some(filter_listener) => {
            let filter = filter_app(state.clone(), Some(client.clone()));
            let main = router(state, Some(client));
            tokio::try_join!(
                serve_on(listener, None, main, until_stopped()),
                serve_on(filter_listener, tls, filter, until_stopped()),
            )
            .map(|_| ())
        }
    };
    signal.abort();
    sweeper.abort();
    retention.abort();
    decision_metrics.abort();
    if let Some(notifier) = notifier {
        notifier.abort();
    }
    if let Some(telemetry) = telemetry {
        // Blocks until the last spans are out, through this runtime.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    result
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown`
/// resolves. The peer address limits failed sign-ins per client
/// (`ui::login`) and places an authenticating proxy (`auth`).
async fn serve_on(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    // No Nagle: an HTTP/2 answer is written as several frames (HEADERS,
    // DATA), and with Nagle the later ones waited for the peer's delayed
    // ACK, about 40 ms per call from Envoy.
    match tls {
        None => {
            let listener = listener.tap_io(|tcp| no_delay(tcp));
            axum::serve(listener, service)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config)?.tap_io(|tls| {
                no_delay(tls.get_ref().0);
            });
            axum::serve(listener, service)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

fn no_delay(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "could not turn off Nagle's algorithm on a connection");
    }
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.db(|s| s.ping()).await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}

/// Any unknown path.
pub async fn fallback() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}
