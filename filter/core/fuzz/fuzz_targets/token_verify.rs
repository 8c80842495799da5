#![no_main]
//! `token::verify` on arbitrary text never panics and never accepts a
//! token that was changed after minting.
use countersign_core::token::{body_hash, decode_secret, mint, verify, TokenClaims, TokenKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = [TokenKey { id: "k1".into(), secret: vec![7u8; 32] }, TokenKey { id: "k2".into(), secret: vec![9u8; 32] }];
    let text = String::from_utf8_lossy(data);
    let _ = verify(&text, &keys, "caller", data, 0);
    let _ = decode_secret(&text);
    let claims = TokenClaims { rid: "rev_1".into(), sub: "caller".into(), bh: body_hash(b"body"), exp: u64::MAX };
    let Some(token) = mint(&keys[0], &claims) else { return };
    assert!(verify(&token, &keys, "caller", b"body", 0).is_ok());
    if let [at, byte, ..] = data {
        let mut bytes = token.clone().into_bytes();
        let i = usize::from(*at) % bytes.len();
        if bytes[i] != *byte {
            bytes[i] = *byte;
            if let Ok(changed) = String::from_utf8(bytes) {
                if changed.trim() != token {
                    assert!(verify(&changed, &keys, "caller", b"body", 0).is_err(), "tampered token accepted");
                }
            }
        }
    }
});
