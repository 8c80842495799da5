//! W3C Trace Context (`traceparent`, `tracestate`): the caller's trace,
//! carried on every call the filter makes to the approval service for its
//! request (review creation, expiry, cancellation, token use, records), so
//! the service's spans join the caller's trace. The worker's watch serves
//! many requests and carries none.
//!
//! The request to the model keeps the caller's headers as they came (the
//! filter neither removes nor rewrites them). A request without a valid
//! `traceparent` gets none: the filter cannot see Envoy's own span (Envoy's
//! tracer injects it in the router, after this filter), and a parent span
//! made up here would be one nobody ever reports. The service's spans for
//! such a request start traces of their own.

use crate::host::Headers;

/// The `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` passed on (W3C: 32 members, and a vendor may cut
/// at 512 characters); a longer one is dropped, the `traceparent` kept.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// A caller's valid trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`, as the caller sent it (validated).
    pub traceparent: String,
    /// `tracestate` (its header lines joined with `,`), when valid.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The trace context of a request head; `None` when `traceparent` is
    /// absent, repeated or malformed (W3C: then there is no parent).
    pub fn from_headers(headers: &Headers) -> Option<TraceContext> {
        let mut parents = headers.values(TRACEPARENT);
        let traceparent = parents.next()?.trim();
        if parents.next().is_some() || !valid_traceparent(traceparent) {
            return None;
        }
        let states: Vec<&str> = headers.values(TRACESTATE).map(str::trim).collect();
        let tracestate = Some(states.join(","))
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN && valid_tracestate(s));
        Some(TraceContext {
            traceparent: traceparent.to_string(),
            tracestate,
        })
    }

    /// The headers a call to the approval service carries.
    pub fn headers(&self) -> impl Iterator<Item = (String, String)> + '_ {
        std::iter::once((TRACEPARENT.to_string(), self.traceparent.clone())).chain(
            self.tracestate
                .iter()
                .map(|s| (TRACESTATE.to_string(), s.clone())),
        )
    }
}

/// `version-traceid-parentid-flags` at W3C's fixed places, lower-case hex,
/// ids not all zero, version `ff` invalid; a version above `00` may carry
/// more fields after a `-` (W3C's forward compatibility), version `00`
/// may not.
fn valid_traceparent(value: &str) -> bool {
    let field = |at: usize, len: usize| {
        value
            .get(at..at + len)
            .filter(|s| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    };
    let dash = |at: usize| value.as_bytes().get(at) == Some(&b'-');
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let (Some(version), Some(trace_id), Some(parent_id), Some(_flags)) =
        (field(0, 2), field(3, 32), field(36, 16), field(53, 2))
    else {
        return false;
    };
    let rest = value.get(55..).unwrap_or_default();
    dash(2)
        && dash(35)
        && dash(52)
        && version != "ff"
        && nonzero(trace_id)
        && nonzero(parent_id)
        && (rest.is_empty() || (version != "00" && rest.starts_with('-')))
}

/// Comma-separated `key=value` members of printable ASCII (W3C's grammar,
/// loosely: what could break the header or a log line is refused).
fn valid_tracestate(value: &str) -> bool {
    value.split(',').map(str::trim).all(|member| {
        member.is_empty()
            || member.split_once('=').is_some_and(|(k, v)| {
                !k.is_empty() && !v.is_empty() && member.bytes().all(|b| (0x21..=0x7e).contains(&b))
            })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::testing::headers as head;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_and_tracestate_are_kept() {
        let t = TraceContext::from_headers(&head(&[
            ("traceparent", PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]))
        .unwrap();
        assert_eq!(t.traceparent, PARENT);
        assert_eq!(
            t.tracestate.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let sent: Vec<_> = t.headers().collect();
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn malformed_or_repeated_traceparents_are_no_parent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                TraceContext::from_headers(&head(&[("traceparent", bad)])),
                None,
                "{bad:?}"
            );
        }
        let twice = head(&[("traceparent", PARENT), ("traceparent", PARENT)]);
        assert_eq!(TraceContext::from_headers(&twice), None);
        // A later version may add fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(TraceContext::from_headers(&head(&[("traceparent", later)])).is_some());
    }

    #[test]
    fn a_bad_tracestate_is_dropped_and_the_parent_kept() {
        let long = format!("a={}", "x".repeat(MAX_TRACESTATE_LEN));
        for bad in ["no-equals", "a=b\nc=d", "a=b c", long.as_str()] {
            let t =
                TraceContext::from_headers(&head(&[("traceparent", PARENT), ("tracestate", bad)]))
                    .unwrap();
            assert_eq!(t.tracestate, None, "{bad:?}");
        }
    }
}
