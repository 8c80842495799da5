//! The `[trusted_proxy]` table: reviewers authenticated by a proxy in
//! front of the service (oauth2-proxy, Envoy's `oauth2` or `jwt_authn`
//! filters, ...), which names them in request headers. The headers are
//! believed only from the configured proxy addresses.

use std::net::IpAddr;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// An address block, `192.0.2.0/24` or `2001:db8::/32` (one address
/// without `/n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or one address.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr {
            network: addr,
            prefix,
        })
    }

    /// The prefix length (0: every address).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (net, ip, bits) = match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                (u128::from(u32::from(n)), u128::from(u32::from(a)), 32u32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128u32),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
        (net & mask) == (ip & mask)
    }
}

/// The validated `[trusted_proxy]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxyConfig {
    /// Where the proxy connects from; headers from elsewhere are ignored.
    pub addresses: Vec<Cidr>,
    /// The header naming the reviewer (lower case).
    pub user_header: String,
    /// The header listing the reviewer's groups, comma-separated (lower
    /// case); `None`: no groups.
    pub groups_header: Option<String>,
    /// Only people the proxy puts in this group (in `groups_header`) may
    /// review; with it, also people no `[[reviewers]]` entry names.
    pub required_group: Option<String>,
    /// How long the proxy's word lasts on a call that stays open (the UI's
    /// live feed), in seconds: the proxy vouches for each request, not for
    /// what an open call keeps receiving, so after this the call ends and
    /// the page's next request carries the proxy's headers again.
    pub session_seconds: u64,
}

/// `[trusted_proxy]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrustedProxy {
    addresses: Vec<String>,
    #[serde(default)]
    user_header: Option<String>,
    #[serde(default)]
    groups_header: Option<String>,
    #[serde(default)]
    session_seconds: Option<u64>,
    #[serde(default)]
    required_group: Option<String>,
}

/// oauth2-proxy's headers (`--set-xauthrequest`).
pub const DEFAULT_USER_HEADER: &str = "x-auth-request-email";
/// oauth2-proxy's groups header.
pub const DEFAULT_GROUPS_HEADER: &str = "x-auth-request-groups";

/// `session_seconds` when not set: ten minutes, after which a live feed
/// opened under the proxy's word ends (the page reconnects through the
/// proxy at once if it still vouches).
pub const DEFAULT_SESSION_SECONDS: u64 = 600;
/// The longest `session_seconds`: the longest browser session
/// (`ui_session_hours` at most 720).
pub const MAX_SESSION_SECONDS: u64 = super::MAX_UI_SESSION_HOURS * 3600;

fn header_name(field: &str, value: &str) -> Result<String, ConfigError> {
    let name = value.trim().to_ascii_lowercase();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid(field, format!("{value:?} is not a header name")));
    }
    Ok(name)
}

/// Checks `[trusted_proxy]`.
pub(super) fn check_trusted_proxy(raw: RawTrustedProxy) -> Result<TrustedProxyConfig, ConfigError> {
    if raw.addresses.is_empty() {
        return Err(invalid(
            "trusted_proxy.addresses",
            "list the proxy's addresses (CIDR blocks); headers from anywhere else are ignored",
        ));
    }
    let addresses = raw
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Cidr::parse(a).ok_or_else(|| {
                invalid(
                    format!("trusted_proxy.addresses[{i}]"),
                    format!("{a:?} is not an address or CIDR block"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let user_header = header_name(
        "trusted_proxy.user_header",
        raw.user_header.as_deref().unwrap_or(DEFAULT_USER_HEADER),
    )?;
    let groups_header = match raw.groups_header.as_deref() {
        Some("") => None,
        other => Some(header_name(
            "trusted_proxy.groups_header",
            other.unwrap_or(DEFAULT_GROUPS_HEADER),
        )?),
    };
    let session_seconds = raw.session_seconds.unwrap_or(DEFAULT_SESSION_SECONDS);
    if !(1..=MAX_SESSION_SECONDS).contains(&session_seconds) {
        return Err(invalid(
            "trusted_proxy.session_seconds",
            format!("must be 1..={MAX_SESSION_SECONDS}"),
        ));
    }
    let required_group = match raw.required_group {
        Some(g) if g.trim().is_empty() => {
            return Err(invalid("trusted_proxy.required_group", "must not be empty"))
        }
        Some(_) if groups_header.is_none() => {
            return Err(invalid(
                "trusted_proxy.required_group",
                "needs `groups_header`: the group is read from the proxy's groups header",
            ))
        }
        other => other,
    };
    Ok(TrustedProxyConfig {
        addresses,
        user_header,
        groups_header,
        required_group,
        session_seconds,
    })
}

impl TrustedProxyConfig {
    /// Whether `peer` is one of the proxy's addresses.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.addresses.iter().any(|c| c.contains(peer))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn cidr_blocks() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/-1"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_and_errors() {
        let parse = |t: &str| check_trusted_proxy(toml::from_str(t).unwrap());
        let c = parse("addresses = [\"10.0.0.0/8\"]").unwrap();
        assert_eq!(c.user_header, "x-auth-request-email");
        assert_eq!(c.groups_header.as_deref(), Some("x-auth-request-groups"));
        assert_eq!(c.session_seconds, DEFAULT_SESSION_SECONDS);
        assert_eq!(c.required_group, None);
        let c = parse("addresses = [\"10.0.0.1\"]\nrequired_group = \"reviewers\"").unwrap();
        assert_eq!(c.required_group.as_deref(), Some("reviewers"));
        let c = parse("addresses = [\"10.0.0.1\"]\nsession_seconds = 30").unwrap();
        assert_eq!(c.session_seconds, 30);
        let c = parse(
            "addresses = [\"10.0.0.1\"]\nuser_header = \"X-Forwarded-User\"\ngroups_header = \"\"",
        )
        .unwrap();
        assert_eq!(
            (c.user_header.as_str(), c.groups_header),
            ("x-forwarded-user", None)
        );
        for (text, field) in [
            ("addresses = []", "trusted_proxy.addresses"),
            (
                "addresses = [\"10.0.0.0/8\", \"nope\"]",
                "trusted_proxy.addresses[1]",
            ),
            (
                "addresses = [\"10.0.0.1\"]\nuser_header = \"a b\"",
                "trusted_proxy.user_header",
            ),
            (
                "addresses = [\"10.0.0.1\"]\nsession_seconds = 0",
                "trusted_proxy.session_seconds",
            ),
            (
                "addresses = [\"10.0.0.1\"]\nsession_seconds = 2600000",
                "trusted_proxy.session_seconds",
            ),
            // The group is read from the groups header.
            (
                "addresses = [\"10.0.0.1\"]\ngroups_header = \"\"\nrequired_group = \"r\"",
                "trusted_proxy.required_group",
            ),
            (
                "addresses = [\"10.0.0.1\"]\nrequired_group = \" \"",
                "trusted_proxy.required_group",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
