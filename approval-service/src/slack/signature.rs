//! Slack's request signatures (v0): `X-Slack-Signature: v0=<hex HMAC-SHA256
//! of "v0:{timestamp}:{body}" under the signing secret>`, with
//! `X-Slack-Request-Timestamp` within five minutes of our clock. Replays
//! inside that window are refused by the caller (the signatures taken are
//! kept in the database).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::token::{hex, TokenHash};

/// How far a request's timestamp may be from our clock, in seconds.
pub const MAX_SKEW_S: u64 = 300;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No timestamp or signature header, or not a number.
    Missing,
    /// The timestamp is more than [`MAX_SKEW_S`] away.
    Stale,
    /// The signature does not match.
    Forged,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Missing => "missing or malformed Slack signature headers",
            Refused::Stale => "the request's timestamp is more than 5 minutes away",
            Refused::Forged => "the Slack signature does not match",
        })
    }
}

/// The `v0=` signature of `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    format!("v0={}", hex(&mac.finalize().into_bytes()))
}

/// Checks a request's `timestamp` and `signature` headers against `body`.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_s: u64,
) -> Result<(), Refused> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(Refused::Missing);
    };
    let sent: u64 = timestamp.trim().parse().map_err(|_| Refused::Missing)?;
    if sent.abs_diff(now_s) > MAX_SKEW_S {
        return Err(Refused::Stale);
    }
    let expected = sign(secret, timestamp.trim(), body);
    // Hashing first gives equal-length inputs to the constant-time compare.
    if TokenHash::of_token(signature.trim()).ct_eq(&TokenHash::of_token(&expected)) {
        Ok(())
    } else {
        Err(Refused::Forged)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    // Slack's documented example ("Verifying requests from Slack").
    const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const BODY: &[u8] = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIGNATURE: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slacks_example_verifies() {
        assert_eq!(sign(SECRET, "1531420618", BODY), SIGNATURE);
        let now = 1531420618 + 10;
        assert_eq!(
            verify(SECRET, Some("1531420618"), Some(SIGNATURE), BODY, now),
            Ok(())
        );
    }

    #[test]
    fn forged_stale_and_missing_are_refused() {
        let now = 1531420618;
        let mut tampered = BODY.to_vec();
        tampered[0] = b'T';
        assert_eq!(
            verify(SECRET, Some("1531420618"), Some(SIGNATURE), &tampered, now),
            Err(Refused::Forged)
        );
        assert_eq!(
            verify(b"other", Some("1531420618"), Some(SIGNATURE), BODY, now),
            Err(Refused::Forged)
        );
        assert_eq!(
            verify(SECRET, Some("1531420618"), Some(SIGNATURE), BODY, now + 301),
            Err(Refused::Stale)
        );
        assert_eq!(
            verify(SECRET, Some("1531420618"), Some(SIGNATURE), BODY, now - 301),
            Err(Refused::Stale)
        );
        assert_eq!(
            verify(SECRET, None, Some(SIGNATURE), BODY, now),
            Err(Refused::Missing)
        );
        assert_eq!(
            verify(SECRET, Some("soon"), Some(SIGNATURE), BODY, now),
            Err(Refused::Missing)
        );
    }
}
