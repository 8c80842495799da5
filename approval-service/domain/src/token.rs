//! Hashed bearer tokens.
//!
//! Only SHA-256 hashes of tokens are configured, so a leaked config file does
//! not leak credentials. Comparisons run in constant time so response timing
//! does not reveal how much of a guessed hash matched.

use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 digest of a token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a presented token.
    pub fn of_token(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses 64 hex characters (either case).
    pub fn from_hex(hex: &str) -> Option<TokenHash> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(TokenHash(out))
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Constant-time equality: always looks at all 32 bytes.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        // black_box keeps the optimiser from turning the fold into an early exit.
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for TokenHash {
    /// Hashes are not secrets, but printing them in full is never useful;
    /// a prefix is enough to tell two apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}..)", &self.to_hex()[..8])
    }
}

/// `bytes` as lowercase hex digits (hashes, record ids, session ids).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn known_digest() {
        let h = TokenHash::of_token("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(TokenHash::from_hex(&h.to_hex().to_uppercase()), Some(h));
        assert!(h.ct_eq(&TokenHash::of_token("abc")));
        assert!(!h.ct_eq(&TokenHash::of_token("abd")));
    }

    #[test]
    fn bad_hex() {
        assert_eq!(TokenHash::from_hex("ab"), None);
        assert_eq!(TokenHash::from_hex(&"g".repeat(64)), None);
        assert_eq!(TokenHash::from_hex(&"é".repeat(32)), None);
    }
}
