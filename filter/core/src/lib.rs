//! countersign's logic crate: everything the Envoy filter decides, with no
//! proxy-wasm dependency, so it is unit-tested natively and shared with the
//! approval service.

pub mod wire;
