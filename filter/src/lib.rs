//! Keyward's proxy-wasm filter: an executor. Envoy's callbacks become `keyward_core::lifecycle`
//! events, and the lifecycle's effects are carried out by `host::WasmHost`. Nothing here decides.

mod host;
mod metrics;

use host::WasmHost;
use keyward_core::config;
use keyward_core::host::Action as CoreAction;
use keyward_core::lifecycle::{Event, Lifecycle};
use keyward_core::secrets::store;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_HASH: &str = match option_env!("KEYWARD_GIT_HASH") {
    Some(h) => h,
    None => "unknown",
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|root_id| -> Box<dyn RootContext> {
        Box::new(Root { id: root_id, served: Cell::new(false), shared: Rc::new(RefCell::new(Worker { lc: Lifecycle::new(root_id), host: WasmHost::default(), tick_ms: 0, now_us: 0 })) })
    });
}}

/// One configuration on one worker: its lifecycle and the host that carries out its effects.
struct Worker {
    lc: Lifecycle,
    host: WasmHost,
    /// The tick period last asked of Envoy (proxy-wasm's timer is periodic).
    tick_ms: u64,
    /// Envoy's clock as last read (a hostcall: read only for the events that look at it).
    now_us: u64,
}

impl Worker {
    /// One event, at Envoy's time; then the tick period the lifecycle's state asks for.
    fn handle(&mut self, ev: Event) -> CoreAction {
        if self.now_us == 0 || self.lc.reads_clock(&ev) {
            self.now_us = host::now_us();
        }
        let a = self.lc.handle(self.now_us, &mut self.host, ev);
        self.set_tick();
        a
    }

    fn set_tick(&mut self) {
        let want = self.lc.tick_period_ms();
        if want != self.tick_ms && proxy_wasm::hostcalls::set_tick_period(std::time::Duration::from_millis(want)).is_ok() {
            self.tick_ms = want;
        }
    }
}

fn action(a: CoreAction) -> Action {
    match a {
        CoreAction::Continue => Action::Continue,
        CoreAction::Pause => Action::Pause,
    }
}

struct Root {
    id: u32,
    /// Whether this VM has had a stream: only such VMs (workers, not the main thread's) report
    /// their linear memory on the tick, so the gauge shows a VM that holds caches.
    served: Cell<bool>,
    shared: Rc<RefCell<Worker>>,
}

impl Root {
    fn event(&self, ev: Event) {
        if let Ok(mut w) = self.shared.try_borrow_mut() {
            w.handle(ev);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, call_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        // The largest answer any callout may have (a revocation list); the lifecycle holds every
        // other answer to `store::MAX_BODY`.
        let answer = host::callout_answer(num_headers, body_size, store::MAX_LIST_BODY);
        self.event(Event::Answer { call: call_id, answer });
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        };
        let env = |name: &str| std::env::var(name).ok();
        let cfg = match config::compile(&bytes, &env) {
            Ok(cfg) => cfg,
            Err(e) => {
                log::error!("keyward {VERSION} ({GIT_HASH}): configuration rejected: {e}");
                return false;
            }
        };
        log::info!("keyward {VERSION} ({GIT_HASH}) configured: {}", cfg.summary());
        let Ok(mut w) = self.shared.try_borrow_mut() else { return false };
        let w = &mut *w;
        w.host.metrics.flush();
        w.host.metrics = metrics::Metrics::define();
        if w.host.queue.is_none() {
            w.host.queue = host::queue_name(&mut w.host, self.id).and_then(|name| proxy_wasm::hostcalls::register_shared_queue(&name).ok());
            if w.host.queue.is_none() {
                log::warn!("could not register a wake-up queue; callouts wait for the tick");
            }
        }
        w.lc.configure(host::now_us(), &mut w.host, cfg);
        w.set_tick();
        w.host.metrics.report_memory();
        true
    }

    fn on_tick(&mut self) {
        self.event(Event::Tick);
        if let Ok(mut w) = self.shared.try_borrow_mut() {
            w.host.metrics.flush();
            if self.served.get() {
                w.host.metrics.report_memory();
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // Empty the queue (one item per wake-up asked for), then dispatch what is queued.
        while let Ok(Some(_)) = proxy_wasm::hostcalls::dequeue_shared_queue(queue_id) {}
        self.event(Event::Woken);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        self.served.set(true);
        Some(Box::new(Stream { id: context_id, shared: self.shared.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Never reached in a single-threaded VM (the lifecycle is already borrowed); if it were, fail
/// closed: the request is answered here, never let go on undecided.
fn refuse() -> Action {
    let d = keyward_core::response::Denial::new(keyward_core::response::Code::SecretUnavailable, "internal error");
    let headers = d.headers();
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _ = proxy_wasm::hostcalls::send_http_response(d.status(), h, Some(d.body().as_bytes()));
    Action::Pause
}

struct Stream {
    id: u32,
    shared: Rc<RefCell<Worker>>,
}

impl Context for Stream {}

/// The SDK drops a stream's context in `proxy_on_delete`, which Envoy calls once for every
/// stream that had one (answered, reset or left). The module does not export `proxy_on_done`
/// (see the Makefile's export list), so Envoy makes no other call into the VM at a stream's end.
impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(mut w) = self.shared.try_borrow_mut() {
            w.handle(Event::StreamGone(self.id));
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "panic-test")]
        #[allow(clippy::panic)]
        if proxy_wasm::hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpRequestHeaders, "x-keyward-test-panic").ok().flatten().is_some() {
            panic!("x-keyward-test-panic");
        }
        let Ok(mut w) = self.shared.try_borrow_mut() else { return refuse() };
        let a = w.handle(Event::Request(self.id));
        w.host.flush_filter_state();
        // A request without a body: whatever waits for the body's end (the issuing endpoint, a
        // priced request) learns now, and answers before the router sees the end of the request.
        if end_of_stream && w.handle(Event::RequestBody { ctx: self.id, size: 0, end: true }) == CoreAction::Pause {
            return Action::Pause;
        }
        action(a)
    }

    /// `Pause` here buffers the body (proxy-wasm's StopIterationAndBuffer) until its end.
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Ok(mut w) = self.shared.try_borrow_mut() else { return refuse() };
        action(w.handle(Event::RequestBody { ctx: self.id, size: body_size, end: end_of_stream }))
    }

    /// Trailers end the request: a body that ends with them is decided here (the last data frame
    /// did not say it was the last).
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Ok(mut w) = self.shared.try_borrow_mut() else { return refuse() };
        action(w.handle(Event::RequestTrailers(self.id)))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Ok(mut w) = self.shared.try_borrow_mut() {
            let a = action(w.handle(Event::Response(self.id)));
            if end_of_stream {
                // An answer without a body: a model call's usage is not in it.
                w.handle(Event::ResponseBody { ctx: self.id, size: 0, end: true });
                w.host.flush_filter_state();
            }
            return a;
        }
        Action::Continue
    }

    /// Each part of the answer goes on as it comes (a stream is never held back); a model call's
    /// usage is read from the parts as they pass.
    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Ok(mut w) = self.shared.try_borrow_mut() {
            w.handle(Event::ResponseBody { ctx: self.id, size: body_size, end: end_of_stream });
            w.host.flush_filter_state();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Ok(mut w) = self.shared.try_borrow_mut() {
            return action(w.handle(Event::ResponseTrailers(self.id)));
        }
        Action::Continue
    }
}
