//! Approval service configurations (TOML), parsed by the service's own code.

use std::path::Path;

use countersign_approval::config::{is_loopback_url, url_origin};
use countersign_approval::{Config as ServiceConfig, ConfigError as ServiceConfigError};

use super::{in_place, place_prefix, Checker};

impl Checker {
    /// Validates a service configuration; `place` says where it was found.
    pub(super) fn service_config(&mut self, file: &Path, text: &str, place: &str) {
        match ServiceConfig::from_toml_str(text) {
            Ok(config) => {
                self.report.ok(
                    file,
                    format!(
                        "{}service configuration valid: listen {}, database {}, {} reviewer(s), filter token {}",
                        place_prefix(place),
                        config.listen,
                        config.database.redacted(),
                        config.reviewers.len(),
                        if config.filter_token_sha256.is_some() { "required" } else { "not required" }
                    ),
                );
                let at = in_place(place);
                self.sign_in_settings(file, &config, &at);
                self.reviewer_sign_in_names(file, &config, &at);
                if config.reviewers.is_empty() && config.oidc.is_none() {
                    self.report.warning(
                        file,
                        format!(
                            "no [[reviewers]] and no [oidc]: nobody can decide a held request{at}"
                        ),
                    );
                }
                if config.filter_token_sha256.is_none() {
                    self.report.warning(
                        file,
                        format!("no filter_token_sha256: anyone who can reach the service can create and expire reviews{at}"),
                    );
                }
                if config.listen.ip().is_loopback() {
                    self.report.note(
                        file,
                        format!("listen {} is loopback only: fine next to Envoy, not in a container (use 0.0.0.0){at}", config.listen),
                    );
                }
                self.notification_warnings(file, &config, &at);
                self.filter_channel(file, &config, &at);
                self.services.push((file.to_path_buf(), config));
            }
            Err(e) => {
                let msg = match e {
                    ServiceConfigError::Invalid { field, message } => {
                        format!("field `{field}`: {message}")
                    }
                    ServiceConfigError::Parse(m) => {
                        format!("invalid TOML: {}", m.replace('\n', " "))
                    }
                    other => other.to_string(),
                };
                self.report.error(file, format!("{msg}{}", in_place(place)));
            }
        }
    }
}

impl Checker {
    /// How the filter's channel is served (`filter_listen`, `[tls]`).
    fn filter_channel(&mut self, file: &Path, config: &ServiceConfig, at: &str) {
        let on = match config.filter_listen {
            Some(addr) => format!("filter_listen {addr}"),
            None => format!("listen {}", config.listen),
        };
        match &config.tls {
            Some(tls) if tls.mutual() => {
                let ca = tls.client_ca_file.as_deref().unwrap_or(Path::new("")).display();
                if tls.client_names.is_empty() {
                    self.report.ok(file, format!("the filter API on {on} requires a client certificate signed by {ca}{at}"));
                    self.report.note(
                        file,
                        format!("any certificate {ca} signed is taken for the filter's: where that CA signs certificates for other workloads too (a mesh's or a company's CA), list the filter's names in [tls] client_names{at}"),
                    );
                } else {
                    let names: Vec<String> = tls.client_names.iter().map(ToString::to_string).collect();
                    self.report.ok(file, format!("the filter API on {on} requires a client certificate signed by {ca} that names {}{at}", names.join(" or ")));
                }
                if config.filter_listen.is_none() {
                    self.report.warning(
                        file,
                        format!("[tls] client_ca_file without filter_listen: every client of listen needs a client certificate, reviewers' browsers, Slack and the OpenID provider's redirects included; set filter_listen to give the filter an address of its own{at}"),
                    );
                }
            }
            Some(_) => self.report.ok(file, format!("the filter API on {on} is served over TLS (no client certificate asked for){at}")),
            None => {}
        }
    }

    /// Settings of the reviewer sign-in that contradict each other.
    fn sign_in_settings(&mut self, file: &Path, config: &ServiceConfig, at: &str) {
        let public = config.public_url.as_deref();
        if let Some(url) = public.filter(|u| u.starts_with("http://") && !is_loopback_url(u)) {
            if config.ui_secure_cookies {
                self.report.warning(
                    file,
                    format!("ui_secure_cookies = true but public_url {url} is http: browsers will not send the Secure session cookie back, so sign-in cannot work{at}"),
                );
            } else {
                self.report.warning(
                    file,
                    format!("public_url {url} is plain http: session cookies and reviewer tokens cross the network unencrypted (use https; the cookie is then Secure){at}"),
                );
            }
        }
        if public.is_some_and(|u| u.starts_with("https://")) && config.ui_secure_cookies {
            self.report.note(
                file,
                format!(
                    "ui_secure_cookies is implied by the https public_url and can be left out{at}"
                ),
            );
        }
        if let Some(proxy) = &config.trusted_proxy {
            if proxy.addresses.iter().any(|c| c.prefix() == 0) {
                self.report.warning(
                    file,
                    format!("trusted_proxy.addresses trusts every address: anyone who reaches the service can name themselves a reviewer in `{}`{at}", proxy.user_header),
                );
            }
        }
        if let Some(oidc) = &config.oidc {
            self.report.ok(
                file,
                format!(
                    "OpenID Connect sign-in: issuer {}, client {}, reviewer name from `{}`, groups from `{}`{}; register the redirect URI {} at the provider{at}",
                    oidc.issuer_url,
                    oidc.client_id,
                    oidc.name_claim,
                    oidc.groups_claim,
                    oidc.required_group
                        .as_deref()
                        .map(|g| format!(", only members of {g:?}"))
                        .unwrap_or_default(),
                    oidc.redirect_url,
                ),
            );
            if let Some(url) = public.filter(|u| url_origin(u) != url_origin(&oidc.redirect_url)) {
                self.report.warning(
                    file,
                    format!("oidc.redirect_url {} is not on public_url {url}: the session cookie set by the callback would belong to another site{at}", oidc.redirect_url),
                );
            }
        }
    }
}

impl Checker {
    /// `[[reviewers]]` entries that a configured sign-in by name cannot
    /// reach: the OpenID provider or the proxy names people by e-mail
    /// address, and the entry has none (its `name` nor a `sign_in_names`
    /// entry), so such a sign-in is someone else to the service (no
    /// `callers` lent, and with the token two approvers); or
    /// `sign_in_names` where nothing signs anyone in by name.
    fn reviewer_sign_in_names(&mut self, file: &Path, config: &ServiceConfig, at: &str) {
        let mut by_address = Vec::new();
        if let Some(oidc) = config.oidc.as_ref().filter(|o| o.name_claim == "email") {
            by_address.push(format!("[oidc] (name_claim = {:?})", oidc.name_claim));
        }
        if let Some(proxy) = config.trusted_proxy.as_ref() {
            if proxy.user_header.contains("email") {
                by_address.push(format!("[trusted_proxy] ({})", proxy.user_header));
            }
        }
        let by_name = config.oidc.is_some() || config.trusted_proxy.is_some();
        for (i, r) in config.reviewers.iter().enumerate() {
            if !by_name && !r.sign_in_names.is_empty() {
                self.report.warning(
                    file,
                    format!("reviewers[{i}].sign_in_names ({}): neither [oidc] nor [trusted_proxy] is configured, so nobody signs in under these names{at}", r.name),
                );
                continue;
            }
            let has_address = std::iter::once(&r.name)
                .chain(&r.sign_in_names)
                .any(|n| n.contains('@'));
            if !by_address.is_empty() && !has_address {
                self.report.warning(
                    file,
                    format!(
                        "reviewers[{i}] {:?}: {} names people by e-mail address, and neither this name nor a sign_in_names entry is one: signed in that way this person is someone else (no callers lent, and with the token two approvers); add sign_in_names = [\"their address\"]{at}",
                        r.name,
                        by_address.join(" and "),
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::{check_texts, messages};
    use super::super::Level;

    #[test]
    fn service_config_errors_name_the_field() {
        let r = check_texts(&[(
            "s.toml",
            "[[reviewers]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n",
        )]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors[0].contains("field `reviewers[0].token_sha256`"),
            "{errors:?}"
        );
        let r = check_texts(&[("s.toml", "lisen = 1\n")]);
        assert!(
            messages(&r, Level::Error)[0].contains("lisen"),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[(
            "s.toml",
            "[[assessors]]\nname = \"pii\"\nkind = \"presidio\"\nurl = \"http://x/analyze\"\n\
             [rule_assessors]\nci = [\"guard\"]\n",
        )]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors[0].contains("field `rule_assessors.ci[0]`")
                && errors[0].contains("\"guard\" is not an assessor"),
            "{errors:?}"
        );
        let r = check_texts(&[("s.toml", "")]);
        assert!(!r.has_errors());
        assert_eq!(r.count(Level::Warning), 2, "{:?}", r.lines);
    }

    #[test]
    fn a_mutual_tls_channel_says_whose_certificates_it_takes() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes", "-days", "1", "-subj", "/CN=s", "-keyout", "s.key", "-out", "s.pem",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let d = dir.display();
        let tls = format!(
            "filter_listen = \"127.0.0.1:9443\"\n[tls]\ncert_file = \"{d}/s.pem\"\nkey_file = \"{d}/s.key\"\nclient_ca_file = \"{d}/s.pem\"\n"
        );
        let r = check_texts(&[("s.toml", tls.as_str())]);
        let notes = messages(&r, Level::Note);
        assert!(
            notes
                .iter()
                .any(|m| m.contains("list the filter's names in [tls] client_names")),
            "{:?}",
            r.lines
        );
        let named = format!("{tls}client_names = [\"spiffe://c.test/sa/gw\", \"gw.internal\"]\n");
        let r = check_texts(&[("s.toml", named.as_str())]);
        assert!(!messages(&r, Level::Note)
            .iter()
            .any(|m| m.contains("client_names")));
        assert!(
            messages(&r, Level::Ok)
                .iter()
                .any(|m| m.contains("that names URI:spiffe://c.test/sa/gw or DNS:gw.internal")),
            "{:?}",
            r.lines
        );
    }

    #[test]
    fn inconsistent_sign_in_settings_are_warned_about() {
        let warnings = |text: &str| messages(&check_texts(&[("s.toml", text)]), Level::Warning);
        let base = "filter_token_sha256 = \"2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\"\n";
        let oidc = "[oidc]\nissuer_url = \"https://idp.example.com\"\nclient_id = \"c\"\n";

        let w = warnings(&format!(
            "{base}public_url = \"http://review.example.com\"\nui_secure_cookies = true\n"
        ));
        assert!(
            w.iter()
                .any(|m| m.contains("will not send the Secure session cookie")),
            "{w:?}"
        );
        let w = warnings(&format!(
            "{base}public_url = \"http://review.example.com\"\n"
        ));
        assert!(w.iter().any(|m| m.contains("plain http")), "{w:?}");
        let w = warnings(&format!(
            "{base}public_url = \"https://review.example.com\"\n{oidc}redirect_url = \"https://other.example.com/ui/oidc/callback\"\n"
        ));
        assert!(w.iter().any(|m| m.contains("oidc.redirect_url")), "{w:?}");
        let w = warnings(&format!(
            "{base}[trusted_proxy]\naddresses = [\"10.0.0.0/8\", \"::/0\"]\n"
        ));
        assert!(
            w.iter().any(|m| m.contains("trusts every address")),
            "{w:?}"
        );
        // A reviewer entry the provider's or the proxy's e-mail names
        // never reach, and sign-in names nothing gives.
        let dana = "[[reviewers]]\nname = \"dana\"\ntoken_sha256 = \"2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\"\n";
        let https = "public_url = \"https://review.example.com\"\n";
        let proxy = "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]\n";
        for methods in [oidc, proxy] {
            let w = warnings(&format!("{base}{https}{methods}{dana}"));
            assert!(
                w.iter().any(|m| m.contains("reviewers[0] \"dana\"")
                    && m.contains("by e-mail address")),
                "{w:?}"
            );
            let w = warnings(&format!(
                "{base}{https}{methods}{dana}sign_in_names = [\"dana@example.com\"]\n"
            ));
            assert!(w.is_empty(), "{w:?}");
        }
        let other_claim = format!("{oidc}name_claim = \"preferred_username\"\n");
        assert!(warnings(&format!("{base}{https}{other_claim}{dana}")).is_empty());
        let w = warnings(&format!(
            "{base}{https}{dana}sign_in_names = [\"dana@example.com\"]\n"
        ));
        assert!(
            w.iter().any(|m| m.contains("reviewers[0].sign_in_names")),
            "{w:?}"
        );

        // Consistent: https, redirect under public_url, OIDC instead of tokens.
        let r = check_texts(&[(
            "s.toml",
            &format!("{base}public_url = \"https://review.example.com\"\n{oidc}"),
        )]);
        assert_eq!(r.count(Level::Warning), 0, "{:?}", r.lines);
        assert!(
            messages(&r, Level::Ok).iter().any(|m| m
                .contains("register the redirect URI https://review.example.com/ui/oidc/callback")),
            "{:?}",
            r.lines
        );
    }
}
