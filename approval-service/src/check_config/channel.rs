//! The filter ↔ service channel: the approval cluster's transport socket
//! (an `UpstreamTlsContext`: a client certificate, the service's CA and
//! name checked) against the service's `[tls]` (mutual when it has a
//! `client_ca_file`).
//!
//! Alone, a TLS cluster that does not check the service's certificate (no
//! trusted CA, or no name to match) is warned about: anyone on the path
//! could answer in the service's name. Together with a service
//! configuration, a cluster that cannot talk to that service (plain HTTP to
//! a TLS port, TLS to a plain one, no client certificate where one is
//! required) is an error: every call to the service would fail.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Checker, Level};

const TLS_SOCKET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// How a cluster speaks to the approval service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ClusterTls {
    /// No transport socket: plain HTTP.
    Plain,
    /// An `UpstreamTlsContext`.
    Tls {
        /// It presents a client certificate (inline or from SDS).
        client_certificate: bool,
        /// It checks the service's certificate against a CA (inline or SDS).
        verifies_ca: bool,
        /// It matches the certificate's subject alternative names.
        verifies_name: bool,
    },
    /// Another transport socket: not read here.
    Other(String),
}

impl ClusterTls {
    /// Reads a cluster's `transport_socket`.
    pub(super) fn of(transport_socket: Option<&Value>) -> ClusterTls {
        let Some(socket) = transport_socket.filter(|v| !v.is_null()) else {
            return ClusterTls::Plain;
        };
        let typed = socket.get("typed_config");
        let ty = typed
            .and_then(|t| t.get("@type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if ty != TLS_SOCKET_TYPE {
            return ClusterTls::Other(ty.to_string());
        }
        let common = typed.and_then(|t| t.get("common_tls_context"));
        let has = |v: Option<&Value>, key: &str| {
            v.and_then(|v| v.get(key)).is_some_and(|x| match x {
                Value::Array(items) => !items.is_empty(),
                Value::Null => false,
                _ => true,
            })
        };
        let client_certificate = has(common, "tls_certificates")
            || has(common, "tls_certificate_sds_secret_configs")
            || has(common, "tls_certificate_provider_instance");
        let combined = common.and_then(|c| c.get("combined_validation_context"));
        let validation = common
            .and_then(|c| c.get("validation_context"))
            .or_else(|| combined.and_then(|c| c.get("default_validation_context")));
        let sds_validation = has(common, "validation_context_sds_secret_config")
            || has(combined, "validation_context_sds_secret_config");
        let verifies_ca = has(validation, "trusted_ca")
            || has(validation, "ca_certificate_provider_instance")
            || sds_validation;
        let verifies_name = has(validation, "match_typed_subject_alt_names")
            || has(validation, "match_subject_alt_names");
        ClusterTls::Tls {
            client_certificate,
            verifies_ca,
            verifies_name,
        }
    }
}

/// An approval cluster found in a bootstrap, for the cross-check with
/// service configurations.
pub(super) struct ApprovalChannel {
    pub(super) file: PathBuf,
    pub(super) cluster: String,
    pub(super) tls: ClusterTls,
}

impl Checker {
    /// Checks the approval cluster `cluster` of `file` alone and keeps it
    /// for [`Checker::channel_cross_checks`].
    pub(super) fn approval_channel(&mut self, file: &Path, cluster: &str, tls: ClusterTls) {
        match &tls {
            ClusterTls::Tls {
                verifies_ca: false, ..
            } => self.report.warning(
                file,
                format!(
                    "cluster `{cluster}`: TLS without a validation_context trusted_ca: the service's certificate is not \
                     checked, so anyone on the path can answer for the approval service"
                ),
            ),
            ClusterTls::Tls {
                verifies_name: false,
                ..
            } => self.report.warning(
                file,
                format!(
                    "cluster `{cluster}`: the service's certificate is checked against the CA but not its name: set \
                     validation_context.match_typed_subject_alt_names, or any certificate of that CA can answer for \
                     the approval service"
                ),
            ),
            ClusterTls::Tls { .. } => self.report.ok(
                file,
                format!("cluster `{cluster}`: TLS to the approval service, its certificate checked (CA and name)"),
            ),
            ClusterTls::Other(ty) => self.report.note(
                file,
                format!("cluster `{cluster}`: transport socket `{ty}` not checked"),
            ),
            ClusterTls::Plain => {}
        }
        self.channels.push(ApprovalChannel {
            file: file.to_path_buf(),
            cluster: cluster.to_string(),
            tls,
        });
    }

    /// Each approval cluster against each service configuration's `[tls]`.
    pub(super) fn channel_cross_checks(&mut self) {
        let mut lines = Vec::new();
        for ch in &self.channels {
            for (sfile, s) in &self.services {
                let service = sfile.display();
                let on = if s.filter_listen.is_some() {
                    "filter_listen"
                } else {
                    "listen"
                };
                let cluster = &ch.cluster;
                let line = match (&s.tls, &ch.tls) {
                    (_, ClusterTls::Other(_)) => continue,
                    (None, ClusterTls::Plain) => continue,
                    (None, ClusterTls::Tls { .. }) => (
                        Level::Error,
                        format!("cluster `{cluster}` speaks TLS, but {service} has no [tls]: its {on} is plain HTTP and every call would fail"),
                    ),
                    (Some(t), ClusterTls::Plain) => (
                        Level::Error,
                        format!(
                            "cluster `{cluster}` has no transport_socket, but {service} serves {on} over {}: every call \
                             to the service would fail (add an UpstreamTlsContext; see docs/security.md)",
                            if t.mutual() { "mutual TLS" } else { "TLS" }
                        ),
                    ),
                    (
                        Some(t),
                        ClusterTls::Tls {
                            client_certificate: false,
                            ..
                        },
                    ) if t.mutual() => (
                        Level::Error,
                        format!(
                            "cluster `{cluster}` presents no client certificate, but {service} requires one signed by \
                             tls.client_ca_file: every call would be refused"
                        ),
                    ),
                    (Some(t), ClusterTls::Tls { .. }) => (
                        Level::Ok,
                        format!(
                            "cluster `{cluster}` speaks {} with {service}",
                            if t.mutual() { "mutual TLS" } else { "TLS" }
                        ),
                    ),
                };
                lines.push((line.0, ch.file.clone(), line.1));
            }
        }
        for (level, file, message) in lines {
            self.report.push(level, &file, message);
        }
    }
}
