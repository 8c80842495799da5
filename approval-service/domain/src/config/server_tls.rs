//! The filter's channel: `filter_listen` (the filter API on an address of
//! its own) and the `[tls]` table (the service's certificate and, with
//! `client_ca_file`, mutual TLS: a client certificate signed by that CA is
//! required and verified). Read once at load: the files are read, the key
//! checked against the certificate and the rustls server configuration
//! built here, so a bad file stops the service at start with the field
//! named.
//!
//! `[tls]` applies to the listener the filter calls: `filter_listen` when
//! it is set (then `listen`, the reviewers' address, stays plain HTTP behind
//! the reviewers' ingress), else `listen`. `metrics_listen` is never TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;

use super::{invalid, ConfigError};

/// The validated `[tls]` table.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM file of the service's certificate (chain, leaf first).
    pub cert_file: PathBuf,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file of the CA certificates a client certificate must chain to;
    /// `None`: no client certificate is asked for (TLS, not mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// The rustls configuration built from them (ring, TLS 1.2 and 1.3,
    /// ALPN `http/1.1`).
    pub server_config: Arc<ServerConfig>,
}

impl ServerTls {
    /// Whether a client certificate is required.
    pub fn mutual(&self) -> bool {
        self.client_ca_file.is_some()
    }
}

impl PartialEq for ServerTls {
    /// The same files (the built configuration follows from them).
    fn eq(&self, other: &Self) -> bool {
        self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.client_ca_file == other.client_ca_file
    }
}

impl Eq for ServerTls {}

/// `[tls]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
}

/// Checks `filter_listen`: an IP:port that differs from `listen` and
/// `metrics_listen` (port 0, any free port, excepted).
pub(super) fn check_filter_listen(
    raw: Option<String>,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(text) = raw else {
        return Ok(None);
    };
    let addr: SocketAddr = text.parse().map_err(|_| {
        invalid(
            "filter_listen",
            format!("{text:?} is not an IP:port address"),
        )
    })?;
    if addr.port() != 0 && (addr == listen || Some(addr) == metrics_listen) {
        return Err(invalid(
            "filter_listen",
            "must differ from `listen` and `metrics_listen`: the filter API moves off them",
        ));
    }
    Ok(Some(addr))
}

/// Checks `[tls]`: reads the files and builds the server configuration.
pub(super) fn check_tls(raw: RawTls) -> Result<ServerTls, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain =
        crate::tls::read_ca_file(&raw.cert_file).map_err(|m| invalid("tls.cert_file", m))?;
    let key = PrivateKeyDer::from_pem_file(&raw.key_file).map_err(|e| {
        invalid(
            "tls.key_file",
            format!("{}: no usable private key: {e}", raw.key_file.display()),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls", format!("TLS setup: {e}")))?;
    let builder = match &raw.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in
                crate::tls::read_ca_file(path).map_err(|m| invalid("tls.client_ca_file", m))?
            {
                roots.add(cert).map_err(|e| {
                    invalid(
                        "tls.client_ca_file",
                        format!("{}: unusable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("tls.client_ca_file", format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            "tls.key_file",
            format!(
                "{} does not go with the certificate in tls.cert_file: {e}",
                raw.key_file.display()
            ),
        )
    })?;
    // HTTP/2 first: Envoy's approval cluster speaks it (its long polls and
    // records are streams of a few connections); HTTP/1.1 for the rest.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerTls {
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        client_ca_file: raw.client_ca_file,
        server_config: Arc::new(config),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::path::Path;
    use std::process::Command;

    use super::super::Config;

    /// A self-signed certificate `{name}.pem` with its key `{name}.key`,
    /// made by openssl in `dir`.
    fn self_signed(dir: &Path, name: &str) {
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(dir.join(format!("{name}.pem")))
            .output()
            .expect("openssl");
        assert!(status.status.success(), "{status:?}");
    }

    fn refused(text: &str) -> String {
        Config::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn tls_files_are_read_and_checked_at_load() {
        // Removed when dropped, also when an assertion fails.
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        self_signed(dir, "server");
        self_signed(dir, "ca");
        let d = dir.display();
        let table = |cert: &str, key: &str, ca: Option<&str>| {
            let ca = ca.map_or(String::new(), |c| format!("client_ca_file = \"{d}/{c}\"\n"));
            format!("filter_listen = \"127.0.0.1:9443\"\n[tls]\ncert_file = \"{d}/{cert}\"\nkey_file = \"{d}/{key}\"\n{ca}")
        };

        let c = Config::from_toml_str(&table("server.pem", "server.key", Some("ca.pem"))).unwrap();
        let tls = c.tls.unwrap();
        assert!(tls.mutual());
        assert_eq!(c.filter_listen, Some("127.0.0.1:9443".parse().unwrap()));
        assert_eq!(
            tls.server_config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let c = Config::from_toml_str(&table("server.pem", "server.key", None)).unwrap();
        assert!(!c.tls.unwrap().mutual());

        for (text, field) in [
            (table("missing.pem", "server.key", None), "tls.cert_file"),
            (table("server.key", "server.key", None), "tls.cert_file"),
            (table("server.pem", "missing.key", None), "tls.key_file"),
            (table("server.pem", "ca.key", None), "tls.key_file"),
            (
                table("server.pem", "server.key", Some("missing.pem")),
                "tls.client_ca_file",
            ),
            (
                table("server.pem", "server.key", Some("server.key")),
                "tls.client_ca_file",
            ),
            (
                format!(
                    "{}client_ca = \"x\"\n",
                    table("server.pem", "server.key", None)
                ),
                "client_ca",
            ),
            ("[tls]\ncert_file = \"x\"\n".to_string(), "key_file"),
        ] {
            let e = refused(&text);
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn filter_listen_is_an_address_of_its_own() {
        for text in [
            "filter_listen = \"8443\"",
            "listen = \"127.0.0.1:9000\"\nfilter_listen = \"127.0.0.1:9000\"",
            "metrics_listen = \"127.0.0.1:9090\"\nfilter_listen = \"127.0.0.1:9090\"",
        ] {
            assert!(refused(text).contains("filter_listen"), "{text}");
        }
        let c = Config::from_toml_str("filter_listen = \"0.0.0.0:8443\"").unwrap();
        assert_eq!(c.filter_listen.map(|a| a.port()), Some(8443));
        assert_eq!(c.tls, None);
    }
}
