#![no_main]
//! `token::verify` (and `decode_secret`) on arbitrary input never panics.
//! Beyond that:
//! 1. arbitrary text never verifies unless it carries a genuine MAC;
//! 2. an arbitrary payload signed with a real key (so the claim parsing
//!    behind the MAC is reached) verifies only as exactly what its JSON says;
//! 3. a token minted from arbitrary claims verifies for exactly its caller,
//!    body and lifetime, and any changed byte is refused.
//! Input: first byte picks the key and the change, the rest is the text.
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use countersign_core::token::{body_hash, decode_secret, mint, verify, Destination, TokenClaims, TokenError, TokenKey};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const NOW: u64 = 1_700_000_000_000;
/// The path every verified token here must name.
const PATH: &str = "/v1/chat/completions";
/// The route and host every verified token here must name.
const ROUTE: &str = "model";
const HOST: &str = "gw.example";
const TO: Destination<'static> = Destination { path: PATH, route: ROUTE, authority: HOST };

fn keys() -> [TokenKey; 2] {
    [TokenKey { id: "k1".into(), secret: vec![7; 32] }, TokenKey { id: "k-2_x".into(), secret: vec![9; 48] }]
}

fn sign(key: &TokenKey, payload: &[u8]) -> String {
    let signed = format!("cs1.{}.{}", key.id, URL_SAFE_NO_PAD.encode(payload));
    let mut m = Hmac::<Sha256>::new_from_slice(&key.secret).expect("hmac key");
    m.update(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let keys = keys();
    let body = b"{\"model\":\"m\"}";
    let caller = "ci-batch";

    // 1. The input itself as a token (and as a key secret): no panic, and
    // nothing verifies that the key did not sign.
    let text = String::from_utf8_lossy(rest);
    let _ = decode_secret(&text);
    if let Ok(claims) = verify(&text, &keys, caller, &TO, body, NOW) {
        let t = text.trim();
        let mut parts = t.split('.');
        let (_, kid, payload) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let key = keys.iter().find(|k| k.id == kid).expect("verified under a configured key");
        let raw = URL_SAFE_NO_PAD.decode(payload).expect("verified payload decodes");
        assert_eq!(sign(key, &raw), t, "a token verified that the key did not sign: {claims:?}");
    }

    // 2. An arbitrary payload behind a valid MAC.
    let key = &keys[usize::from(sel) % keys.len()];
    let token = sign(key, rest);
    match verify(&token, &keys, caller, &TO, body, NOW) {
        Ok(claims) => {
            let parsed: TokenClaims = serde_json::from_slice(rest).expect("verified claims are JSON");
            assert_eq!(parsed, claims);
            assert!(claims.exp > NOW && claims.sub == caller && claims.pth == PATH && claims.rte == ROUTE && claims.aut.eq_ignore_ascii_case(HOST) && claims.bh == body_hash(body));
        }
        Err(e) => assert!(e != TokenError::BadSignature && e != TokenError::UnknownKey, "{e:?}"),
    }

    // 3. Arbitrary claims, minted and verified.
    let half = rest.len() / 2;
    let claims = TokenClaims {
        rid: String::from_utf8_lossy(&rest[..half]).into_owned(),
        sub: String::from_utf8_lossy(&rest[half..]).into_owned(),
        pth: PATH.to_string(),
        rte: ROUTE.to_string(),
        aut: HOST.to_string(),
        rul: String::new(),
        bh: body_hash(rest),
        exp: NOW + 1 + u64::from(sel),
    };
    let Some(token) = mint(key, &claims) else { return };
    if token.len() > countersign_core::token::MAX_TOKEN_LEN {
        assert_eq!(verify(&token, &keys, &claims.sub, &TO, rest, NOW), Err(TokenError::Malformed));
        return;
    }
    assert_eq!(verify(&token, &keys, &claims.sub, &TO, rest, NOW).as_ref(), Ok(&claims));
    assert_eq!(verify(&token, &keys, &claims.sub, &TO, rest, claims.exp), Err(TokenError::Expired));
    assert_eq!(verify(&token, &keys, &format!("{}x", claims.sub), &TO, rest, NOW), Err(TokenError::WrongCaller));
    assert_eq!(verify(&token, &keys, &claims.sub, &Destination { path: "/v1/completions", ..TO }, rest, NOW), Err(TokenError::WrongPath));
    assert_eq!(verify(&token, &keys, &claims.sub, &Destination { route: "prod", ..TO }, rest, NOW), Err(TokenError::WrongRoute));
    assert_eq!(verify(&token, &keys, &claims.sub, &Destination { authority: "prod.example", ..TO }, rest, NOW), Err(TokenError::WrongRoute));
    let mut other_body = rest.to_vec();
    other_body.push(b' ');
    assert_eq!(verify(&token, &keys, &claims.sub, &TO, &other_body, NOW), Err(TokenError::WrongBody));
    // One byte changed (to a few fixed bytes and to one from the input) is refused,
    // unless the change is only whitespace around the token (trimmed).
    let bytes = token.as_bytes();
    let at = usize::from(sel) * 7919 % bytes.len();
    let from_input = rest.first().copied().unwrap_or(b'!');
    for replacement in [b'A', b'_', b'.', b'-', from_input] {
        if bytes[at] == replacement {
            continue;
        }
        let mut changed = bytes.to_vec();
        changed[at] = replacement;
        let Ok(changed) = String::from_utf8(changed) else { continue };
        if changed.trim() == token {
            continue;
        }
        assert!(verify(&changed, &keys, &claims.sub, &TO, rest, NOW).is_err(), "{token} -> {changed} verified");
    }
});
