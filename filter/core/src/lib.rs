//! countersign's logic crate: everything the Envoy filter decides, with no
//! proxy-wasm dependency, so it is unit-tested natively and shared with the
//! approval service.
//!
//! Flow: [`request::classify`] on the request head, [`inspect::inspect_body`]
//! on the complete body, then a [`hold::Hold`] drives the calls to the
//! approval service. Every refusal is a [`refusal::Refusal`].

pub mod answer;
pub mod config;
pub mod delivery;
pub mod extract;
pub mod glob;
pub mod hold;
pub mod identity;
pub mod inspect;
pub mod json;
pub mod mask;
pub mod policy;
pub mod record;
pub mod refusal;
pub mod request;
pub mod response_head;
pub mod shape;
pub mod sse;
pub mod token;
pub mod wire;
