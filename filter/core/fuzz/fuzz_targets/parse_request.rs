#![no_main]
//! `extract::parse_request` for every API shape: never panics.
use libfuzzer_sys::fuzz_target;

include!("common.rs");

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let _ = countersign_core::extract::parse_request(api(sel), body);
    let _ = countersign_core::json::parse_strict(body);
});
