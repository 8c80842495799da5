//! Reviewer browser sessions and CSRF tokens.
//!
//! Signing in (`POST /ui/login` with a reviewer token, or through the
//! OpenID Connect provider) creates a session: a
//! random 256-bit id sent to the browser in a cookie (see the HTTP layer's
//! `cookies`), stored in the database only as its SHA-256 so a copy of the
//! database does not hold live credentials. Each
//! session also has a random CSRF token, handed to the page by `GET /api/me`
//! and required in the `x-csrf-token` header of every state-changing call
//! made with the cookie. Sessions survive restarts and end at their expiry,
//! on sign-out, or when the reviewer's configured token changes (token
//! sessions) or sign-in with the provider is no longer configured or the
//! person lacks its required group (OIDC sessions, whose groups are those
//! the provider gave at sign-in).
//!
//! An OpenID Connect sign-in in progress is an [`OidcLogin`]: its state,
//! nonce and PKCE verifier, kept in the database (so any replica can finish
//! it) under the hash of the state, and taken exactly once.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::db::DbResult;
use crate::params;
use crate::store::Store;
use crate::token::{hex, TokenHash};

/// How a session was signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedInWith {
    /// A configured reviewer token, by its hash: a session whose reviewer
    /// no longer has this token configured is void.
    Token(TokenHash),
    /// The OpenID Connect provider, which named these groups.
    Oidc {
        /// The groups from the provider's groups claim, as it last
        /// confirmed them (at sign-in or a re-check).
        groups: Vec<String>,
        /// The provider's refresh token, [`seal`]ed with the session id:
        /// `None` when the provider gave none (the session then ends at
        /// its first re-check).
        refresh_sealed: Option<String>,
        /// When the provider last confirmed the groups, Unix ms.
        checked_at_ms: u64,
    },
}

/// A live session, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Reviewer name at sign-in.
    pub reviewer: String,
    /// How the reviewer signed in.
    pub with: SignedInWith,
    /// The CSRF token of this session.
    pub csrf_token: String,
    /// Expiry, Unix ms.
    pub expires_at_ms: u64,
}

/// 32 random bytes from the OS, as 64 lowercase hex digits.
pub fn random_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex(&bytes))
}

/// Why a secret could not be sealed.
#[derive(Debug)]
pub struct SealError;

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot seal a secret (no randomness or bad key)")
    }
}

/// The key that seals a session's secrets: derived from the session id
/// (the cookie value), which the database never holds (it keeps only its
/// hash). So a refresh token at rest opens only on a request that carries
/// that session's cookie: a copy of the database, an export or a log
/// holds nothing usable. The id is 256 random bits: one SHA-256 with a
/// purpose label is a sound derivation.
fn sealing_key(session_id: &str) -> Result<ring::aead::LessSafeKey, SealError> {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("countersign session sealing key\0{session_id}").as_bytes(),
    );
    let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, digest.as_ref())
        .map_err(|_| SealError)?;
    Ok(ring::aead::LessSafeKey::new(key))
}

/// `secret` encrypted and authenticated (ChaCha20-Poly1305, random nonce)
/// under the key of session `session_id`, as hex (nonce, then ciphertext
/// and tag).
pub fn seal(session_id: &str, secret: &str) -> Result<String, SealError> {
    let key = sealing_key(session_id)?;
    let mut nonce = [0u8; ring::aead::NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| SealError)?;
    let mut data = secret.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::empty(),
        &mut data,
    )
    .map_err(|_| SealError)?;
    Ok(format!("{}{}", hex(&nonce), hex(&data)))
}

/// The secret [`seal`] sealed for `session_id`; `None` when `sealed` was
/// sealed for another session, altered, or is not hex.
pub fn open_sealed(session_id: &str, sealed: &str) -> Option<String> {
    let bytes = unhex(sealed)?;
    if bytes.len() < ring::aead::NONCE_LEN {
        return None;
    }
    let (nonce, data) = bytes.split_at(ring::aead::NONCE_LEN);
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut data = data.to_vec();
    let key = sealing_key(session_id).ok()?;
    let plain = key
        .open_in_place(nonce, ring::aead::Aad::empty(), &mut data)
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Constant-time comparison of a presented CSRF token with the session's.
pub fn csrf_matches(presented: &str, expected: &str) -> bool {
    // Hashing first gives equal-length inputs to the constant-time compare.
    TokenHash::of_token(presented).ct_eq(&TokenHash::of_token(expected))
}

impl Store {
    /// Stores a new session under the hash of its id.
    pub fn create_session(
        &self,
        id_sha256: &TokenHash,
        session: &Session,
        now_ms: u64,
    ) -> DbResult<()> {
        let id_hex = id_sha256.to_hex();
        // An OIDC session has no token: its hash column holds "", which no
        // token hash equals.
        let (kind, token_hex, groups, refresh_sealed, checked_at_ms) = match &session.with {
            SignedInWith::Token(hash) => ("token", hash.to_hex(), Vec::new(), String::new(), 0),
            SignedInWith::Oidc {
                groups,
                refresh_sealed,
                checked_at_ms,
            } => (
                "oidc",
                String::new(),
                groups.clone(),
                refresh_sealed.clone().unwrap_or_default(),
                *checked_at_ms,
            ),
        };
        let groups_json = serde_json::to_string(&groups)?;
        self.conn().execute(
            "INSERT INTO sessions (id_sha256, reviewer, token_sha256, csrf_token, created_at_ms,
                 expires_at_ms, kind, groups_json, refresh_sealed, checked_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (id_sha256) DO NOTHING",
            params![
                &id_hex,
                &session.reviewer,
                &token_hex,
                &session.csrf_token,
                now_ms,
                session.expires_at_ms,
                kind,
                &groups_json,
                &refresh_sealed,
                checked_at_ms,
            ],
        )?;
        Ok(())
    }

    /// Stores what the provider said at a re-check of OIDC session
    /// `id_sha256`: the groups, the (new, sealed) refresh token, and when.
    pub fn record_oidc_check(
        &self,
        id_sha256: &TokenHash,
        groups: &[String],
        refresh_sealed: &str,
        checked_at_ms: u64,
    ) -> DbResult<()> {
        let groups_json = serde_json::to_string(groups)?;
        self.conn().execute(
            "UPDATE sessions SET groups_json = ?2, refresh_sealed = ?3, checked_at_ms = ?4
             WHERE id_sha256 = ?1 AND kind = 'oidc'",
            params![
                &id_sha256.to_hex(),
                &groups_json,
                refresh_sealed,
                checked_at_ms
            ],
        )?;
        Ok(())
    }

    /// Ends every OpenID Connect session of `reviewer` (sign-out
    /// everywhere: the provider no longer vouches for them); returns how
    /// many there were.
    pub fn end_oidc_sessions_of(&self, reviewer: &str) -> DbResult<usize> {
        self.conn().execute(
            "DELETE FROM sessions WHERE reviewer = ?1 AND kind = 'oidc'",
            params![reviewer],
        )
    }

    /// The unexpired session whose id hashes to `id_sha256`.
    pub fn session(&self, id_sha256: &TokenHash, now_ms: u64) -> DbResult<Option<Session>> {
        let id_hex = id_sha256.to_hex();
        let row = self.conn().query_opt(
            "SELECT reviewer, token_sha256, csrf_token, expires_at_ms, kind, groups_json,
                 refresh_sealed, checked_at_ms
             FROM sessions WHERE id_sha256 = ?1 AND expires_at_ms > ?2",
            params![&id_hex, now_ms],
        )?;
        row.map(|row| {
            let kind: String = row.get(4)?;
            let with = if kind == "oidc" {
                let groups: String = row.get(5)?;
                let refresh_sealed: String = row.get(6)?;
                SignedInWith::Oidc {
                    groups: serde_json::from_str(&groups)?,
                    refresh_sealed: Some(refresh_sealed).filter(|r| !r.is_empty()),
                    checked_at_ms: row.get(7)?,
                }
            } else {
                let token: String = row.get(1)?;
                // A malformed stored hash matches no reviewer.
                SignedInWith::Token(
                    TokenHash::from_hex(&token).unwrap_or_else(|| TokenHash::of_token("")),
                )
            };
            Ok(Session {
                reviewer: row.get(0)?,
                with,
                csrf_token: row.get(2)?,
                expires_at_ms: row.get(3)?,
            })
        })
        .transpose()
    }

    /// Deletes a session (sign-out); returns whether it existed.
    pub fn delete_session(&self, id_sha256: &TokenHash) -> DbResult<bool> {
        let id_hex = id_sha256.to_hex();
        let n = self.conn().execute(
            "DELETE FROM sessions WHERE id_sha256 = ?1",
            params![&id_hex],
        )?;
        Ok(n > 0)
    }

    /// Deletes expired sessions and OIDC sign-ins; returns how many.
    pub fn purge_sessions(&self, now_ms: u64) -> DbResult<usize> {
        let sessions = self.conn().execute(
            "DELETE FROM sessions WHERE expires_at_ms <= ?1",
            params![now_ms],
        )?;
        let logins = self.conn().execute(
            "DELETE FROM oidc_logins WHERE expires_at_ms <= ?1",
            params![now_ms],
        )?;
        Ok(sessions + logins)
    }

    /// Stores an OIDC sign-in in progress under the hash of its state.
    pub fn create_oidc_login(&self, state_sha256: &TokenHash, login: &OidcLogin) -> DbResult<()> {
        self.conn().execute(
            "INSERT INTO oidc_logins (state_sha256, browser_sha256, nonce, pkce_verifier, next,
                 expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                &state_sha256.to_hex(),
                &login.browser_sha256.to_hex(),
                &login.nonce,
                &login.pkce_verifier,
                &login.next,
                login.expires_at_ms,
            ],
        )?;
        Ok(())
    }

    /// Takes (reads and deletes, in one transaction) the unexpired OIDC
    /// sign-in whose state hashes to `state_sha256`: a state is good for one
    /// callback only, so a replayed one finds nothing.
    pub fn take_oidc_login(
        &self,
        state_sha256: &TokenHash,
        now_ms: u64,
    ) -> DbResult<Option<OidcLogin>> {
        // One statement: of two callbacks with the same state, only one
        // gets the row back.
        let row = self.conn().query_opt(
            "DELETE FROM oidc_logins WHERE state_sha256 = ?1
             RETURNING browser_sha256, nonce, pkce_verifier, next, expires_at_ms",
            params![&state_sha256.to_hex()],
        )?;
        let Some(row) = row else { return Ok(None) };
        let expires_at_ms: u64 = row.get(4)?;
        if expires_at_ms <= now_ms {
            return Ok(None);
        }
        let browser: String = row.get(0)?;
        Ok(Some(OidcLogin {
            browser_sha256: TokenHash::from_hex(&browser)
                .unwrap_or_else(|| TokenHash::of_token("")),
            nonce: row.get(1)?,
            pkce_verifier: row.get(2)?,
            next: row.get(3)?,
            expires_at_ms,
        }))
    }
}

/// An OpenID Connect sign-in between the redirect to the provider and its
/// callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcLogin {
    /// Hash of the random value in the browser's sign-in cookie: the
    /// callback must come from the browser that started the sign-in (so
    /// nobody can sign a victim in as themselves with their own code).
    pub browser_sha256: TokenHash,
    /// The nonce the ID token must carry.
    pub nonce: String,
    /// The PKCE code verifier.
    pub pkce_verifier: String,
    /// Local path to return to.
    pub next: String,
    /// Unix ms after which the callback is refused.
    pub expires_at_ms: u64,
}

/// Token buckets for failed sign-ins, one per client address: at most
/// `capacity` failures in a burst, refilled at `per_second`. A correct token
/// never spends from a bucket, and one client's failures never empty
/// another's, so guessing from one address slows to a crawl without
/// locking out anyone else (one global bucket let a dozen bad tokens lock
/// every reviewer out). An IPv6 client counts by its /64, which one
/// machine usually has whole. Behind a proxy every client has the proxy's
/// address, and shares its bucket.
pub struct LoginLimiter {
    buckets: Mutex<Buckets>,
    capacity: f64,
    per_second: f64,
}

#[derive(Default)]
struct Buckets {
    by_client: HashMap<IpAddr, Bucket>,
    /// Counts failures, to find the bucket touched longest ago.
    failures: u64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    last_failure: u64,
}

/// Most client addresses tracked at once; beyond it, the bucket touched
/// longest ago is forgotten (a forgotten bucket is a full one).
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// The key of `client`'s bucket.
fn client_key(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                for s in &mut segments[4..] {
                    *s = 0;
                }
                IpAddr::V6(Ipv6Addr::from(segments))
            }
        },
    }
}

impl LoginLimiter {
    /// No client has failed yet.
    pub fn new(capacity: u32, per_second: f64) -> LoginLimiter {
        LoginLimiter {
            buckets: Mutex::new(Buckets::default()),
            capacity: f64::from(capacity),
            per_second,
        }
    }

    /// Runs `check` (which says whether the sign-in succeeded) if
    /// `client`'s bucket is not empty, spending one unit when it fails.
    /// Returns `None` when the bucket is empty (the attempt was not
    /// evaluated at all).
    pub fn attempt<T>(
        &self,
        client: IpAddr,
        check: impl FnOnce() -> Option<T>,
    ) -> Option<Option<T>> {
        // The lock spans the check, so parallel guesses cannot all pass the
        // "not empty" test before any of them is counted.
        let mut guard = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Buckets {
            by_client: buckets,
            failures,
        } = &mut *guard;
        let key = client_key(client);
        let now = Instant::now();
        if let Some(bucket) = buckets.get_mut(&key) {
            bucket.tokens = (bucket.tokens
                + now.duration_since(bucket.last).as_secs_f64() * self.per_second)
                .min(self.capacity);
            bucket.last = now;
            if bucket.tokens < 1.0 {
                return None;
            }
        }
        let result = check();
        if result.is_none() {
            if !buckets.contains_key(&key) && buckets.len() >= MAX_TRACKED_CLIENTS {
                let oldest = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.last_failure)
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    buckets.remove(&oldest);
                }
            }
            *failures += 1;
            let bucket = buckets.entry(key).or_insert(Bucket {
                tokens: self.capacity,
                last: now,
                last_failure: 0,
            });
            bucket.tokens -= 1.0;
            bucket.last_failure = *failures;
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn random_tokens_are_hex_and_distinct() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_sealed_secret_opens_only_with_its_session_id() {
        let sealed = seal("session-a", "refresh-token-1").unwrap();
        assert!(!sealed.contains("refresh"));
        assert_eq!(
            open_sealed("session-a", &sealed).as_deref(),
            Some("refresh-token-1")
        );
        assert_eq!(open_sealed("session-b", &sealed), None);
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            open_sealed("session-a", &String::from_utf8(altered).unwrap()),
            None
        );
        assert_eq!(open_sealed("session-a", "zz"), None);
        assert_ne!(
            seal("session-a", "refresh-token-1").unwrap(),
            sealed,
            "fresh nonce"
        );
    }

    #[test]
    fn csrf_compare() {
        assert!(csrf_matches("abc", "abc"));
        assert!(!csrf_matches("abd", "abc"));
        assert!(!csrf_matches("", "abc"));
    }

    #[test]
    fn limiter_counts_failures_only() {
        let l = LoginLimiter::new(2, 0.0);
        let client = IpAddr::from([192, 0, 2, 1]);
        for _ in 0..5 {
            assert_eq!(l.attempt(client, || Some(1)), Some(Some(1)));
        }
        assert_eq!(l.attempt(client, || None::<u8>), Some(None));
        assert_eq!(l.attempt(client, || None::<u8>), Some(None));
        // Empty: not even a correct token is evaluated.
        assert_eq!(l.attempt(client, || Some(1)), None);
    }

    #[test]
    fn one_clients_failures_do_not_lock_out_another() {
        let l = LoginLimiter::new(2, 0.0);
        let attacker: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(l.attempt(attacker, || None::<u8>), Some(None));
        }
        assert_eq!(l.attempt(attacker, || Some(1)), None);
        // The rest of the attacker's /64 is the same client ...
        let same_net: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(l.attempt(same_net, || Some(1)), None);
        // ... anyone else is not.
        for other in ["2001:db8:1:3::1", "192.0.2.7", "::ffff:192.0.2.8"] {
            let other: IpAddr = other.parse().unwrap();
            assert_eq!(l.attempt(other, || Some(1)), Some(Some(1)), "{other}");
        }
    }

    #[test]
    fn limiter_forgets_the_oldest_client_when_full() {
        let l = LoginLimiter::new(1, 0.0);
        for i in 0..MAX_TRACKED_CLIENTS + 1 {
            let ip = IpAddr::from(u32::try_from(i).unwrap().to_be_bytes());
            assert_eq!(l.attempt(ip, || None::<u8>), Some(None));
        }
        let tracked = l.buckets.lock().unwrap().by_client.len();
        assert_eq!(tracked, MAX_TRACKED_CLIENTS);
        // The first client was forgotten: its bucket is full again.
        assert_eq!(
            l.attempt(IpAddr::from([0, 0, 0, 0]), || Some(1)),
            Some(Some(1))
        );
        assert_eq!(l.attempt(IpAddr::from([0, 0, 0, 1]), || Some(1)), None);
    }
}
