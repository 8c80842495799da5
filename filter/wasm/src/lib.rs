//! countersign's Envoy filter: the proxy-wasm glue, nothing else.
//!
//! [`Envoy`] implements `countersign_core::host::Host` with proxy-wasm host
//! calls; the contexts forward Envoy's callbacks to the core's
//! [`StreamFilter`] (one HTTP stream) and [`Worker`] (one VM's holds,
//! callouts, retries and outbox), which decide everything and are unit-tested
//! with a mock host in the core.
//!
//! The root context and the HTTP contexts of a VM share one [`Worker`]:
//! retries and deliveries are dispatched from the root context's timer, so
//! their answers come back to the root context, which finds the hold or the
//! delivery by its callout token.

// A panic aborts the VM and every stream it serves (see the core's lib.rs).
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use countersign_core::config::Config;
use countersign_core::hold::{Callout, CalloutResult};
use countersign_core::host::{Action, Headers, Host, Level};
use countersign_core::stream_filter::StreamFilter;
use countersign_core::vm_memory::VmShare;
use countersign_core::worker::Worker;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action as WasmAction, BufferType, ContextType, LogLevel, MapType, MetricType,
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        let worker = VM_SHARE.with(Worker::in_vm);
        Box::new(Root { config: None, worker })
    });
}}

thread_local! {
    /// This VM's share of the memory gauge, common to its root contexts
    /// (plugins sharing the VM). A VM is one instance on one thread.
    static VM_SHARE: VmShare = VmShare::default();
}

/// How often the root context looks for due retries and deliveries.
const TICK: Duration = Duration::from_millis(countersign_core::worker::TICK_MS);

thread_local! {
    /// Metric ids by name (per VM).
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

/// The host: proxy-wasm host calls on the current (or effective) context.
struct Envoy;

impl Host for Envoy {
    fn memory_bytes(&self) -> u64 {
        // One instruction, not a host call. Memory 0 is the module's only
        // memory; its pages are 64 KiB.
        #[cfg(target_arch = "wasm32")]
        {
            (core::arch::wasm32::memory_size(0) as u64) << 16
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            0
        }
    }

    fn request_headers(&self) -> Headers {
        header_map(MapType::HttpRequestHeaders)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn request_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_request_body(&mut self, replaced: usize, body: &[u8]) -> Result<(), String> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, replaced, body)
            .map_err(|s| format!("{s:?}"))
    }

    fn response_headers(&self) -> Headers {
        header_map(MapType::HttpResponseHeaders)
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_response_body(&mut self, replaced: usize, body: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, replaced, body);
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_property(&mut self, name: &str, value: &[u8]) {
        let _ = hostcalls::set_property(vec![name], Some(value));
    }

    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// `RandomState` keys come from the host's randomness (WASI
    /// `random_get`, once per VM) and each new one differs (std steps its
    /// key), so a hash under a new one is a fresh random number without a
    /// host call per request or an extra crate.
    fn nonce(&mut self) -> u64 {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new()
            .hash_one(0u8)
            .max(1)
    }

    fn dispatch(&mut self, cluster: &str, call: &Callout) -> Result<u32, String> {
        let headers: Vec<(&str, &str)> = call
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let timeout = Duration::from_millis(call.timeout_ms);
        hostcalls::dispatch_http_call(cluster, headers, call.body.as_deref(), vec![], timeout)
            .map_err(|s| format!("{s:?}"))
    }

    fn callout_result(&self, body_size: usize) -> CalloutResult {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u16>().ok());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        CalloutResult { status, body }
    }

    fn set_tick_period(&mut self, ms: u64) {
        if hostcalls::set_tick_period(Duration::from_millis(ms)).is_err() {
            log::warn!("countersign: cannot set the timer's period");
        }
    }

    fn set_effective_context(&mut self, context_id: u32) -> Result<(), String> {
        hostcalls::set_effective_context(context_id).map_err(|s| format!("{s:?}"))
    }

    fn send_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body));
    }

    fn resume_request(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn resume_response(&mut self) {
        let _ = hostcalls::resume_http_response();
    }

    /// Envoy stats (`/stats` as `wasmcustom.NAME`, `/stats/prometheus` as
    /// `NAME`: Envoy drops its custom namespace there).
    /// Every worker VM defines the same names, so Envoy sums them.
    fn count(&mut self, name: &str, delta: i64) {
        let id = METRICS.with(|m| {
            let mut m = m.borrow_mut();
            if let Some(id) = m.get(name) {
                return Some(*id);
            }
            let kind = match name.ends_with("_total") {
                true => MetricType::Counter,
                false => MetricType::Gauge,
            };
            let id = hostcalls::define_metric(kind, name).ok()?;
            m.insert(name.to_string(), id);
            Some(id)
        });
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    fn log(&mut self, level: Level, message: &str) {
        match level {
            Level::Info => log::info!("{message}"),
            Level::Warn => log::warn!("{message}"),
            Level::Error => log::error!("{message}"),
        }
    }
}

/// A header map in one host call. Values are read as bytes: the SDK's
/// string reads panic (abort the VM) on a value that is not UTF-8, which
/// HTTP/1.1 allows; such a value is read with replacement characters, so it
/// matches nothing it should not. Names are tokens, ASCII by Envoy's codecs.
fn header_map(map: MapType) -> Headers {
    let pairs = hostcalls::get_map_bytes(map).unwrap_or_default();
    Headers::new(
        pairs
            .into_iter()
            .map(|(name, value)| {
                let value = String::from_utf8(value)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                (name, value)
            })
            .collect(),
    )
}

fn wasm(action: Action) -> WasmAction {
    match action {
        Action::Continue => WasmAction::Continue,
        Action::Pause => WasmAction::Pause,
    }
}

struct Root {
    config: Option<Rc<Config>>,
    worker: Worker,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        self.worker
            .on_callout_response(&mut Envoy, token, body_size);
    }

    fn on_done(&mut self) -> bool {
        self.worker.on_done(&mut Envoy);
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::from_plugin_configuration(&raw) {
            Ok(config) => {
                for warning in config.warnings() {
                    log::warn!("countersign: {warning}");
                }
                self.config = Some(Rc::new(config));
                if hostcalls::set_tick_period(TICK).is_err() {
                    log::error!("countersign: cannot set the retry timer");
                    return false;
                }
                true
            }
            Err(e) => {
                // Returning false makes Envoy refuse the plugin, and a stream
                // without configuration is refused as well: fail closed.
                self.config = None;
                log::error!("countersign: invalid plugin configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.worker.on_tick(&mut Envoy);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let filter = StreamFilter::new(context_id, self.config.clone(), self.worker.clone());
        Some(Box::new(Stream(filter)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
struct Stream(StreamFilter);

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        self.0.on_callout_response(&mut Envoy, token, body_size);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> WasmAction {
        wasm(self.0.on_request_headers(&mut Envoy, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        wasm(self.0.on_request_body(&mut Envoy, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _: usize) -> WasmAction {
        wasm(self.0.on_request_trailers(&mut Envoy))
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> WasmAction {
        wasm(self.0.on_response_headers(&mut Envoy, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        wasm(
            self.0
                .on_response_body(&mut Envoy, body_size, end_of_stream),
        )
    }

    fn on_http_response_trailers(&mut self, _: usize) -> WasmAction {
        wasm(self.0.on_response_trailers(&mut Envoy))
    }

    fn on_log(&mut self) {
        self.0.on_log(&mut Envoy);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.on_drop(&mut Envoy);
    }
}
