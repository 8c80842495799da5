#![no_main]
//! `Config::from_plugin_configuration` on arbitrary bytes (JSON text, or a
//! `google.protobuf.Struct`'s protobuf encoding, as Envoy hands them over)
//! never panics; a JSON object read as a YAML map (`struct_json_text`, what
//! `check-config` does) gives JSON text that parses and holds the same keys.
use countersign_core::config::{struct_json_text, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Config::from_plugin_configuration(data);
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(text) = struct_json_text(&map) {
            let back: serde_json::Value = serde_json::from_str(&text).expect("struct_json_text writes JSON");
            let keys: Vec<&String> = back.as_object().expect("an object").keys().collect();
            assert_eq!(keys, map.keys().collect::<Vec<_>>());
        }
    }
});
