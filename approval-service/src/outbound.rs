//! The one HTTP client for calls the service makes (webhooks, Slack's Web
//! API): reqwest on rustls with the domain crate's `ring` configuration,
//! trusting Mozilla's roots plus `outbound_ca_file`; `HTTPS_PROXY`,
//! `HTTP_PROXY` and `NO_PROXY` are honoured (reqwest reads them).

use std::time::Duration;

use crate::config::Config;

/// Longest a single call (connect, send, answer) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the client for `config`.
pub fn client(config: &Config) -> Result<reqwest::Client, String> {
    builder(config)?
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {}", describe(&e)))
}

/// The client's settings, for a caller that needs one more (the OpenID
/// relying party follows no redirects).
pub fn builder(config: &Config) -> Result<reqwest::ClientBuilder, String> {
    let tls = countersign_approval_domain::tls::config_with_roots(&config.outbound_ca)?;
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("countersign-approval/", env!("CARGO_PKG_VERSION"))))
}

/// An error with its causes (reqwest's own text leaves them out: a refused
/// certificate, a refused connection).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
