#![no_main]
//! `mask::mask_response_body`: never panics; a rewritten body parses.
use libfuzzer_sys::fuzz_target;

include!("common.rs");

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let guard = countersign_core::mask::ResponseGuard::new(Some(policy()), Default::default(), rules());
    if let Ok(out) = countersign_core::mask::mask_response_body(&guard, api(sel), body) {
        if let Some(new) = &out.body {
            serde_json::from_slice::<serde_json::Value>(new).expect("masked response must parse");
        }
        if let Some(b) = &out.blocked {
            serde_json::from_slice::<serde_json::Value>(&b.error_body(api(sel))).expect("error body parses");
        }
    }
});
