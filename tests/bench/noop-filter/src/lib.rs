//! The floor of any wasm filter on this machine: a proxy-wasm filter that
//! waits for the whole request body, reads it into the VM once, and lets the
//! request continue. It decides nothing; the benchmarks run it in the same
//! Envoy (V8, listener, buffer filter, router) as countersign, so the
//! distance between this row and plain Envoy is what any wasm filter costs,
//! and the distance between it and countersign is countersign's own.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ReadBody))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ReadBody;

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
        Action::Continue
    }
}
