//! The `[otlp]` table: OpenTelemetry traces exported over OTLP/HTTP
//! (protobuf). Without the table nothing is exported. The table may be
//! empty: the standard `OTEL_EXPORTER_OTLP_*` variables (endpoint,
//! headers, timeout) and `OTEL_SERVICE_NAME` then apply, as the
//! OpenTelemetry SDK reads them; a value set here wins over them.

use std::time::Duration;

use serde::Deserialize;

use super::{check_url, invalid, ConfigError};

/// The service name spans carry when neither `service_name` nor
/// `OTEL_SERVICE_NAME` names one.
pub const DEFAULT_SERVICE_NAME: &str = "countersign-approval";

/// Longest `timeout_ms`.
pub const MAX_OTLP_TIMEOUT_MS: u64 = 60_000;

/// The path of the traces endpoint under the collector's base URL.
pub const TRACES_PATH: &str = "/v1/traces";

/// The validated `[otlp]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The full URL spans are posted to (`endpoint` with `/v1/traces`);
    /// `None`: the `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable, else the SDK's default
    /// (`http://localhost:4318/v1/traces`).
    pub traces_url: Option<String>,
    /// `service.name` of the spans; `None`: `OTEL_SERVICE_NAME`, else
    /// [`DEFAULT_SERVICE_NAME`].
    pub service_name: Option<String>,
    /// How long one export may take; `None`: `OTEL_EXPORTER_OTLP_TIMEOUT`,
    /// else the SDK's 10 s.
    pub timeout: Option<Duration>,
}

/// `[otlp]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOtlp {
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    service_name: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Checks `[otlp]`.
pub(super) fn check_otlp(raw: RawOtlp) -> Result<OtlpConfig, ConfigError> {
    let traces_url = raw
        .endpoint
        .map(|e| {
            let url = check_url("otlp.endpoint", &e)?;
            if url.contains(['?', '#']) {
                return Err(invalid(
                    "otlp.endpoint",
                    format!("{url:?}: the collector's base URL takes no query or fragment"),
                ));
            }
            Ok(format!("{}{TRACES_PATH}", url.trim_end_matches('/')))
        })
        .transpose()?;
    let service_name = raw
        .service_name
        .map(|n| {
            let n = n.trim().to_string();
            if n.is_empty() || n.chars().any(char::is_control) {
                return Err(invalid(
                    "otlp.service_name",
                    "must be a non-empty name without control characters",
                ));
            }
            Ok(n)
        })
        .transpose()?;
    let timeout = raw
        .timeout_ms
        .map(|ms| match ms {
            1..=MAX_OTLP_TIMEOUT_MS => Ok(Duration::from_millis(ms)),
            _ => Err(invalid(
                "otlp.timeout_ms",
                format!("must be 1..={MAX_OTLP_TIMEOUT_MS}"),
            )),
        })
        .transpose()?;
    Ok(OtlpConfig {
        traces_url,
        service_name,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::super::Config;
    use super::*;

    fn err(toml: &str) -> String {
        Config::from_toml_str(toml).unwrap_err().to_string()
    }

    #[test]
    fn otlp_is_off_unless_the_table_is_there() {
        assert_eq!(Config::from_toml_str("").unwrap().otlp, None);
        let empty = Config::from_toml_str("[otlp]\n").unwrap().otlp.unwrap();
        assert_eq!(empty.traces_url, None);
        assert_eq!(empty.service_name, None);
        let c = Config::from_toml_str(
            "[otlp]\nendpoint = \"http://collector:4318/\"\nservice_name = \"approvals-eu\"\ntimeout_ms = 2000\n",
        )
        .unwrap()
        .otlp
        .unwrap();
        assert_eq!(
            c.traces_url.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(c.service_name.as_deref(), Some("approvals-eu"));
        assert_eq!(c.timeout, Some(Duration::from_millis(2000)));
    }

    #[test]
    fn bad_otlp_fields_are_named() {
        for (toml, field) in [
            ("[otlp]\nendpoint = \"collector:4318\"", "otlp.endpoint"),
            ("[otlp]\nendpoint = \"http://c:4318/?a=b\"", "otlp.endpoint"),
            ("[otlp]\nservice_name = \" \"", "otlp.service_name"),
            ("[otlp]\ntimeout_ms = 0", "otlp.timeout_ms"),
            ("[otlp]\ntimeout_ms = 600000", "otlp.timeout_ms"),
        ] {
            let e = err(toml);
            assert!(e.contains(field), "{toml}: {e}");
        }
        assert!(err("[otlp]\nendpont = \"http://c\"").contains("endpont"));
    }
}
