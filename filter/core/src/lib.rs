//! countersign's logic crate: everything the Envoy filter decides, with no
//! proxy-wasm dependency, so it is unit-tested natively and shared with the
//! approval service.
//!
//! Flow: [`request::classify`] on the request head, [`inspect::inspect_body`]
//! on the complete body, then a [`hold::Hold`] drives the calls to the
//! approval service. Every refusal is a [`refusal::Refusal`].
//! [`stream_filter::StreamFilter`] (one HTTP stream) and [`worker::Worker`] (one
//! VM's holds and outbox) tie these together and talk to Envoy only through
//! the [`host::Host`] trait, so the Envoy adapter is glue only.

// Every request and answer passes through this code inside Envoy: an index
// out of range would abort the VM (panic = abort) and with it every stream
// it serves. Tests may index.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

pub mod answer;
pub mod answer_review;
pub mod config;
pub mod delivery;
pub mod edit;
pub mod extract;
pub mod framing;
pub mod glob;
pub mod hold;
pub mod host;
pub mod identity;
pub mod inspect;
pub mod json;
pub mod json_stream;
pub mod mask;
pub mod model_name;
mod normalize;
pub mod policy;
pub mod record;
pub mod refusal;
pub mod request;
pub mod response_filter;
pub mod response_head;
pub mod shape;
pub mod sse;
pub mod stream_filter;
pub mod token;
pub mod tool_stream;
pub mod trace_context;
pub mod vm_memory;
pub mod watch;
pub mod wire;
pub mod worker;

pub use normalize::renders_as_nothing;

#[cfg(test)]
mod held_memory;
#[cfg(test)]
mod host_budget;
#[cfg(test)]
mod testing;
