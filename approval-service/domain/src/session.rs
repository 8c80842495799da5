//! Reviewer browser sessions and CSRF tokens.
//!
//! Signing in (`POST /ui/login` with a reviewer token) creates a session: a
//! random 256-bit id sent to the browser in a cookie (see the HTTP layer's
//! `cookies`), stored in the database only as its SHA-256 so a copy of the
//! database does not hold live credentials. Each
//! session also has a random CSRF token, handed to the page by `GET /api/me`
//! and required in the `x-csrf-token` header of every state-changing call
//! made with the cookie. Sessions survive restarts and end at their expiry,
//! on sign-out, or when the reviewer's configured token changes.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::db::DbResult;
use crate::params;
use crate::store::Store;
use crate::token::{hex, TokenHash};

/// A live session, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Reviewer name at sign-in.
    pub reviewer: String,
    /// Hash of the reviewer token used to sign in; a session whose reviewer
    /// no longer has this token configured is void.
    pub token_sha256: TokenHash,
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
        let (id_hex, token_hex) = (id_sha256.to_hex(), session.token_sha256.to_hex());
        self.conn().execute(
            "INSERT INTO sessions (id_sha256, reviewer, token_sha256, csrf_token, created_at_ms,
                 expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id_sha256) DO NOTHING",
            params![
                &id_hex,
                &session.reviewer,
                &token_hex,
                &session.csrf_token,
                now_ms,
                session.expires_at_ms,
            ],
        )?;
        Ok(())
    }

    /// The unexpired session whose id hashes to `id_sha256`.
    pub fn session(&self, id_sha256: &TokenHash, now_ms: u64) -> DbResult<Option<Session>> {
        let id_hex = id_sha256.to_hex();
        let row = self.conn().query_opt(
            "SELECT reviewer, token_sha256, csrf_token, expires_at_ms FROM sessions
             WHERE id_sha256 = ?1 AND expires_at_ms > ?2",
            params![&id_hex, now_ms],
        )?;
        row.map(|row| {
            let token: String = row.get(1)?;
            Ok(Session {
                reviewer: row.get(0)?,
                // A malformed stored hash matches no reviewer.
                token_sha256: TokenHash::from_hex(&token)
                    .unwrap_or_else(|| TokenHash::of_token("")),
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

    /// Deletes expired sessions; returns how many.
    pub fn purge_sessions(&self, now_ms: u64) -> DbResult<usize> {
        self.conn().execute(
            "DELETE FROM sessions WHERE expires_at_ms <= ?1",
            params![now_ms],
        )
    }
}

/// A token bucket for failed sign-ins, shared by all clients: at most
/// `capacity` failures in a burst, refilled at `per_second`. A correct token
/// never spends from it, so an attack slows guessing to a crawl without
/// locking anyone out who knows their token (while the bucket has tokens).
pub struct LoginLimiter {
    state: Mutex<(f64, Instant)>,
    capacity: f64,
    per_second: f64,
}

impl LoginLimiter {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: f64) -> LoginLimiter {
        LoginLimiter {
            state: Mutex::new((f64::from(capacity), Instant::now())),
            capacity: f64::from(capacity),
            per_second,
        }
    }

    /// Runs `check` (which says whether the sign-in succeeded) if the bucket
    /// is not empty, spending one unit when it fails. Returns `None` when the
    /// bucket is empty (the attempt was not evaluated at all).
    pub fn attempt<T>(&self, check: impl FnOnce() -> Option<T>) -> Option<Option<T>> {
        // The lock spans the check, so parallel guesses cannot all pass the
        // "not empty" test before any of them is counted.
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *guard;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second)
            .min(self.capacity);
        *last = now;
        if *tokens < 1.0 {
            return None;
        }
        let result = check();
        if result.is_none() {
            *tokens -= 1.0;
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
    fn csrf_compare() {
        assert!(csrf_matches("abc", "abc"));
        assert!(!csrf_matches("abd", "abc"));
        assert!(!csrf_matches("", "abc"));
    }

    #[test]
    fn limiter_counts_failures_only() {
        let l = LoginLimiter::new(2, 0.0);
        for _ in 0..5 {
            assert_eq!(l.attempt(|| Some(1)), Some(Some(1)));
        }
        assert_eq!(l.attempt(|| None::<u8>), Some(None));
        assert_eq!(l.attempt(|| None::<u8>), Some(None));
        // Empty: not even a correct token is evaluated.
        assert_eq!(l.attempt(|| Some(1)), None);
    }
}
