//! The floor of any wasm filter on this machine: a proxy-wasm filter that
//! waits for the whole request body, reads it into the VM once, and lets the
//! request continue. It decides nothing; the benchmarks run it in the same
//! Envoy (V8, listener, buffer filter, router) as countersign, so the
//! distance between this row and plain Envoy is what any wasm filter costs,
//! and the distance between it and countersign is countersign's own.
//!
//! With `"noop_pause": true` in its plugin configuration it never lets the
//! request continue (until the caller goes away): the held-capacity
//! benchmark measures what Envoy keeps for a request paused in a wasm filter
//! with nothing else going on, beside what countersign's hold keeps.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { pause: false }) });
}}

struct Root {
    pause: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        // Any configuration works (the benchmarks hand it countersign's);
        // only this one setting is read.
        let config = self.get_plugin_configuration().unwrap_or_default();
        let compact: Vec<u8> = config
            .into_iter()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        const PAUSE: &[u8] = b"\"noop_pause\":true";
        self.pause = compact.windows(PAUSE.len()).any(|w| w == PAUSE);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ReadBody { pause: self.pause }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ReadBody {
    pause: bool,
}

impl Context for ReadBody {}

impl HttpContext for ReadBody {
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            // Buffered by Envoy until the end, as countersign has it.
            return Action::Pause;
        }
        // The read is the point: countersign reads every inspected body once.
        let body = self.get_http_request_body(0, body_size);
        std::hint::black_box(body);
        if self.pause {
            return Action::Pause;
        }
        Action::Continue
    }
}
