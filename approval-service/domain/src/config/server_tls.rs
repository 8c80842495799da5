//! The filter's channel: `filter_listen` (the filter API on an address of
//! its own) and the `[tls]` table (the service's certificate and, with
//! `client_ca_file`, mutual TLS: a client certificate signed by that CA is
//! required and verified, and with `client_names` it must also name one of
//! them). Read once at load: the files are read, the key
//! checked against the certificate and the rustls server configuration
//! built here, so a bad file stops the service at start with the field
//! named.
//!
//! `[tls]` applies to the listener the filter calls: `filter_listen` when
//! it is set (then `listen`, the reviewers' address, stays plain HTTP behind
//! the reviewers' ingress), else `listen`. `metrics_listen` is never TLS.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use serde::Deserialize;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

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
    /// The names a client certificate must carry one of (`client_names`);
    /// empty: any certificate the CA signed.
    pub client_names: Vec<ClientName>,
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
            && self.client_names == other.client_names
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
    #[serde(default)]
    client_names: Option<Vec<String>>,
}

/// A name a filter's client certificate may carry (`[tls] client_names`),
/// compared with the certificate's subject alternative names of its kind:
/// what Envoy's `match_typed_subject_alt_names` and Istio's principals do
/// on their side. A certificate's subject (CN) is never read: only SANs
/// name a certificate's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientName {
    /// A DNS name, compared without regard to ASCII case.
    Dns(String),
    /// A URI (a SPIFFE ID such as `spiffe://cluster.local/ns/gw/sa/envoy`),
    /// compared exactly.
    Uri(String),
    /// An IP address.
    Ip(IpAddr),
}

impl ClientName {
    /// Reads one entry of `client_names`: an IP address, a URI (it has
    /// `://`) or a DNS name. No wildcards: a pattern would let names in
    /// that nobody listed.
    fn parse(text: &str) -> Result<ClientName, String> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(ClientName::Ip(ip));
        }
        if text.is_empty()
            || !text.is_ascii()
            || text
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(format!(
                "{text:?} is not a name a certificate can carry (printable ASCII, no spaces)"
            ));
        }
        if text.contains('*') {
            return Err(format!("{text:?}: wildcards are not taken, list each name"));
        }
        if let Some((scheme, rest)) = text.split_once("://") {
            if scheme.is_empty() || rest.is_empty() {
                return Err(format!("{text:?} is not a URI"));
            }
            return Ok(ClientName::Uri(text.to_string()));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if text.len() > 253 || !text.split('.').all(label_ok) {
            return Err(format!(
                "{text:?} is neither an IP address, a URI nor a DNS name"
            ));
        }
        Ok(ClientName::Dns(text.to_ascii_lowercase()))
    }

    /// Whether the certificate's SAN `san` is this name.
    fn is(&self, san: &GeneralName) -> bool {
        match (self, san) {
            (ClientName::Dns(want), GeneralName::DnsName(got)) => {
                got.as_str().eq_ignore_ascii_case(want)
            }
            (ClientName::Uri(want), GeneralName::UniformResourceIdentifier(got)) => {
                got.as_str() == want
            }
            (ClientName::Ip(want), GeneralName::IpAddress(got)) => {
                ip_of(got.as_bytes()) == Some(*want)
            }
            _ => false,
        }
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientName::Dns(n) => write!(f, "DNS:{n}"),
            ClientName::Uri(u) => write!(f, "URI:{u}"),
            ClientName::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// An IP address SAN's 4 or 16 bytes.
fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The subject alternative names of the DER certificate `der`; `Err` when
/// the certificate or its SAN extension does not parse.
fn names_of(der: &[u8]) -> Result<Vec<GeneralName>, String> {
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
    match cert.tbs_certificate.get::<SubjectAltName>() {
        Ok(Some((_, SubjectAltName(names)))) => Ok(names),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// A DNS, URI or IP address SAN as text (`DNS:`, `URI:`, `IP:`), for the
/// refusal's log line; other kinds are left out.
fn shown(san: &GeneralName) -> Option<String> {
    match san {
        GeneralName::DnsName(n) => Some(format!("DNS:{}", n.as_str())),
        GeneralName::UniformResourceIdentifier(u) => Some(format!("URI:{}", u.as_str())),
        GeneralName::IpAddress(ip) => ip_of(ip.as_bytes()).map(|ip| format!("IP:{ip}")),
        _ => None,
    }
}

/// Why a verified client certificate was refused (the handshake's error,
/// logged by the TLS listener).
#[derive(Debug)]
struct NotAllowed(String);

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotAllowed {}

/// rustls' WebPKI client verifier, then `client_names`: a certificate the
/// CA signed that names none of them is refused in the handshake, before
/// any request is read, as one from another CA is.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ClientName>,
}

impl NamedClientVerifier {
    /// `Ok` when the certificate `der` carries one of the allowed names.
    fn allowed(&self, der: &[u8]) -> Result<(), String> {
        let sans = names_of(der).map_err(|e| format!("its names could not be read: {e}"))?;
        if sans.iter().any(|san| self.names.iter().any(|n| n.is(san))) {
            return Ok(());
        }
        let carried: Vec<String> = sans.iter().filter_map(shown).collect();
        Err(format!(
            "it names {} and tls.client_names lists none of them",
            if carried.is_empty() {
                "nothing".to_string()
            } else {
                carried.join(", ")
            }
        ))
    }
}

impl ClientCertVerifier for NamedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The chain first: names are only worth reading in a certificate
        // the CA signed.
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.allowed(end_entity.as_ref()).map_err(|why| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                NotAllowed(format!("client certificate refused: {why}")),
            ))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks `client_names`: given only with `client_ca_file`, at least one,
/// each a name a certificate can carry.
fn check_client_names(
    raw: Option<Vec<String>>,
    mutual: bool,
) -> Result<Vec<ClientName>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if !mutual {
        return Err(invalid(
            "tls.client_names",
            "needs client_ca_file: names are checked in client certificates, which only mutual TLS asks for",
        ));
    }
    if raw.is_empty() {
        return Err(invalid(
            "tls.client_names",
            "is empty: list the names of the filter's certificates, or leave it out to take any certificate the CA signed",
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, text)| {
            ClientName::parse(text).map_err(|m| invalid(format!("tls.client_names[{i}]"), m))
        })
        .collect()
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
    let client_names = check_client_names(raw.client_names, raw.client_ca_file.is_some())?;
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
            if client_names.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(NamedClientVerifier {
                    inner: verifier,
                    names: client_names.clone(),
                }))
            }
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
        client_names,
        server_config: Arc::new(config),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::path::Path;
    use std::process::Command;

    use super::super::Config;
    use super::*;

    /// A self-signed certificate `{name}.pem` with its key `{name}.key`,
    /// made by openssl in `dir`.
    fn self_signed(dir: &Path, name: &str) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "subjectAltName=DNS:localhost",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
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

    /// Runs openssl with `args` in `dir`; it must succeed.
    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    /// A certificate `{name}.pem` / `{name}.key` signed by `{ca}` in `dir`,
    /// for `usage`, with the subject alternative names `sans` (openssl's
    /// `subjectAltName` syntax; empty: none) and the subject CN `cn`.
    fn signed(dir: &Path, ca: &str, name: &str, usage: &str, cn: &str, sans: &str) {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        let mut ext = format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n");
        if !sans.is_empty() {
            ext.push_str(&format!("subjectAltName={sans}\n"));
        }
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// A handshake in memory between `server` and a client that trusts
    /// `dir/ca.pem` and presents `dir/{client}.pem`; the server's error, if
    /// it refused.
    fn handshake(server: Arc<ServerConfig>, dir: &Path, client: &str) -> Result<(), rustls::Error> {
        use rustls::pki_types::ServerName;
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::read_ca_file(&dir.join("ca.pem")).unwrap() {
            roots.add(cert).unwrap();
        }
        let chain = crate::tls::read_ca_file(&dir.join(format!("{client}.pem"))).unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{client}.key"))).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..20 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut slice = &wire[..];
            while !slice.is_empty() {
                s.read_tls(&mut slice).unwrap();
            }
            s.process_new_packets()?;
            let mut back = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut back).unwrap();
            }
            let mut slice = &back[..];
            while !slice.is_empty() {
                c.read_tls(&mut slice).unwrap();
            }
            let _ = c.process_new_packets();
            if !s.is_handshaking() && !c.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn client_names_admit_only_certificates_that_carry_one() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        self_signed(dir, "ca");
        signed(dir, "ca", "server", "serverAuth", "server", "DNS:localhost");
        let gateway = "spiffe://cluster.local/ns/gateways/sa/inference-gateway";
        signed(
            dir,
            "ca",
            "gateway",
            "clientAuth",
            "gw",
            &format!("URI:{gateway}"),
        );
        signed(
            dir,
            "ca",
            "envoy",
            "clientAuth",
            "envoy",
            "DNS:Envoy.Countersign.Internal,IP:10.1.2.3",
        );
        // Signed by the same CA for another workload; its CN says the
        // allowed name, which is never read.
        signed(
            dir,
            "ca",
            "other",
            "clientAuth",
            "envoy.countersign.internal",
            &format!("URI:{gateway}-canary,DNS:other.internal"),
        );
        signed(
            dir,
            "ca",
            "bare",
            "clientAuth",
            "envoy.countersign.internal",
            "",
        );
        let d = dir.display();
        let service = |names: &str| {
            let c = Config::from_toml_str(&format!(
                "filter_listen = \"127.0.0.1:9443\"\n[tls]\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\nclient_ca_file = \"{d}/ca.pem\"\n{names}"
            ))
            .unwrap();
            c.tls.unwrap()
        };

        let any = service("");
        assert!(any.client_names.is_empty());
        for client in ["gateway", "envoy", "other", "bare"] {
            assert!(
                handshake(any.server_config.clone(), dir, client).is_ok(),
                "{client}"
            );
        }

        let named = service(&format!(
            "client_names = [\"{gateway}\", \"envoy.countersign.internal\"]"
        ));
        assert_eq!(
            named.client_names,
            [
                ClientName::Uri(gateway.into()),
                ClientName::Dns("envoy.countersign.internal".into())
            ]
        );
        handshake(named.server_config.clone(), dir, "gateway").unwrap();
        // DNS names compare without regard to case.
        handshake(named.server_config.clone(), dir, "envoy").unwrap();
        let e = handshake(named.server_config.clone(), dir, "other")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("URI:{gateway}-canary, DNS:other.internal")),
            "{e}"
        );
        assert!(e.contains("tls.client_names lists none of them"), "{e}");
        let e = handshake(named.server_config.clone(), dir, "bare")
            .unwrap_err()
            .to_string();
        assert!(e.contains("it names nothing"), "{e}");

        let by_ip = service("client_names = [\"10.1.2.3\"]");
        assert_eq!(
            by_ip.client_names,
            [ClientName::Ip("10.1.2.3".parse().unwrap())]
        );
        handshake(by_ip.server_config.clone(), dir, "envoy").unwrap();
        assert!(handshake(by_ip.server_config, dir, "gateway").is_err());
    }

    #[test]
    fn client_names_are_checked_at_load() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        self_signed(dir, "server");
        let d = dir.display();
        let table = |ca: bool, names: &str| {
            let ca = if ca {
                format!("client_ca_file = \"{d}/server.pem\"\n")
            } else {
                String::new()
            };
            format!("[tls]\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n{ca}client_names = {names}\n")
        };
        for (text, field, why) in [
            (
                table(false, "[\"gw.internal\"]"),
                "tls.client_names",
                "needs client_ca_file",
            ),
            (table(true, "[]"), "tls.client_names", "is empty"),
            (
                table(true, "[\"gw.internal\", \"*.internal\"]"),
                "tls.client_names[1]",
                "wildcards",
            ),
            (
                table(true, "[\"two words\"]"),
                "tls.client_names[0]",
                "no spaces",
            ),
            (
                table(true, "[\"bad..name\"]"),
                "tls.client_names[0]",
                "neither",
            ),
            (
                table(true, "[\"spiffe://\"]"),
                "tls.client_names[0]",
                "not a URI",
            ),
        ] {
            let e = refused(&text);
            assert!(e.contains(field) && e.contains(why), "{text}: {e}");
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
