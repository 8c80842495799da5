//! Traces over OTLP/HTTP (`[otlp]`): the OpenTelemetry SDK's tracer
//! provider with its batch span processor, whose exporter posts protobuf to
//! the collector through the service's one outbound client ([`crate::outbound`]:
//! reqwest on rustls/ring, `outbound_ca_file`, proxies). The spans are made
//! by [`crate::http::spans`]; without `[otlp]` no provider is installed and
//! they cost a no-op.

use std::time::Duration;

use opentelemetry_http::{Bytes, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use crate::config::otlp::DEFAULT_SERVICE_NAME;
use crate::config::Config;

/// The instrumentation scope of the service's spans.
pub const SCOPE: &str = "countersign-approval";

/// The SDK's export timeout when neither `timeout_ms` nor the environment
/// sets one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest collector answer read (it says how many spans it refused).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The installed tracer provider; [`Telemetry::shutdown`] exports what is
/// left.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Installs the global tracer provider when `[otlp]` is configured. Call
/// from the runtime the exporter's calls run on.
pub fn init(config: &Config, client: reqwest::Client) -> Result<Option<Telemetry>, String> {
    let Some(otlp) = &config.otlp else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| format!("otlp: no async runtime for the exporter: {e}"))?;
    let timeout = otlp.timeout.or_else(env_timeout).unwrap_or(DEFAULT_TIMEOUT);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout)
        .with_http_client(OutboundExporter {
            client,
            runtime,
            timeout,
        });
    if let Some(url) = &otlp.traces_url {
        exporter = exporter.with_endpoint(url.clone());
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("otlp: cannot set up the span exporter: {e}"))?;
    // The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut resource = Resource::builder();
    match &otlp.service_name {
        Some(name) => resource = resource.with_service_name(name.clone()),
        None if std::env::var_os("OTEL_SERVICE_NAME").is_none() => {
            resource = resource.with_service_name(DEFAULT_SERVICE_NAME)
        }
        None => {}
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(Telemetry { provider }))
}

impl Telemetry {
    /// Exports the spans still queued and stops the processor. Blocking:
    /// the export itself runs on the runtime, so call this off it
    /// (`spawn_blocking`).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "otlp: spans left unexported at shutdown");
        }
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT`
/// (milliseconds), as the SDK reads them for its own clients.
fn env_timeout() -> Option<Duration> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse().ok())
    .map(Duration::from_millis)
}

/// The exporter's HTTP client: the outbound client, its calls run on the
/// service's runtime (the batch processor exports from a thread of its own,
/// where an async client has no reactor).
#[derive(Debug)]
struct OutboundExporter {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OutboundExporter {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let call = async move {
            let mut request = reqwest::Request::try_from(request)?;
            *request.timeout_mut() = Some(timeout);
            let mut answer = client.execute(request).await?;
            let mut body = Vec::new();
            while let Some(chunk) = answer.chunk().await? {
                let room = MAX_ANSWER_BYTES.saturating_sub(body.len());
                body.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
            }
            let mut response = Response::builder()
                .status(answer.status())
                .body(Bytes::from(body))?;
            *response.headers_mut() = std::mem::take(answer.headers_mut());
            Ok::<_, HttpError>(response)
        };
        self.runtime.spawn(call).await?
    }
}
