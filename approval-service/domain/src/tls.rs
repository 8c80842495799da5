//! TLS client configurations, for PostgreSQL connections and for outgoing
//! webhook calls (`https://` targets such as Slack; the client is in the
//! HTTP crate).
//!
//! rustls with the `ring` provider and Mozilla's root certificates
//! (webpki-roots), so it works the same in a minimal container without a
//! system certificate store. Certificates are always verified.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// A client configuration trusting Mozilla's roots plus `extra_roots`.
pub fn config_with_roots(extra_roots: &[CertificateDer<'static>]) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The CA certificates in the PEM file `path`; at least one.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The TLS configuration of PostgreSQL connections: Mozilla's roots, plus
/// the CA certificates in the PEM file `ca_file` (libpq's `sslrootcert`).
pub fn database_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let extra = match ca_file {
        None => Vec::new(),
        Some(path) => read_ca_file(path).map_err(|e| format!("sslrootcert {e}"))?,
    };
    config_with_roots(&extra)
}
