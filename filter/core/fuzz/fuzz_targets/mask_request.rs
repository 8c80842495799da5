#![no_main]
//! `mask::mask_request`: never panics; a rewritten body is strict JSON again
//! and still walks as the same API shape.
use libfuzzer_sys::fuzz_target;

include!("common.rs");

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let api = api(sel);
    if let Ok(out) = countersign_core::mask::mask_request(policy(), api, body) {
        if let Some(new) = &out.body {
            countersign_core::json::parse_strict(new).expect("masked body must parse");
            countersign_core::mask::mask_request(policy(), api, new).expect("masked body must walk as the same shape");
        }
        for (placeholder, _) in out.restore.iter() {
            assert!(placeholder.starts_with('<') && placeholder.ends_with('>'));
        }
    }
});
