//! Keyward's proxy-wasm filter. Everything that decides lives in `keyward-core`; this crate is
//! the glue: contexts, hostcalls, callouts.

mod host;
mod metrics;
mod worker;

use keyward_core::config;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use worker::Worker;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_HASH: &str = match option_env!("KEYWARD_GIT_HASH") {
    Some(h) => h,
    None => "unknown",
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|root_id| -> Box<dyn RootContext> {
        Box::new(Root { w: Rc::new(RefCell::new(Worker::new(root_id))) })
    });
}}

struct Root {
    w: Rc<RefCell<Worker>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Ok(mut w) = self.w.try_borrow_mut() {
            w.on_callout(token, num_headers, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        };
        let env = |name: &str| std::env::var(name).ok();
        match config::compile(&bytes, &env) {
            Ok(cfg) => {
                log::info!("keyward {VERSION} ({GIT_HASH}) configured: {}", cfg.summary());
                let Ok(mut w) = self.w.try_borrow_mut() else { return false };
                w.metrics = metrics::Metrics::define();
                worker::create_shared_records(&cfg);
                w.configure(cfg);
                drop(w);
                self.set_tick_period(worker::TICK);
                true
            }
            Err(e) => {
                log::error!("keyward {VERSION} ({GIT_HASH}): configuration rejected: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Ok(mut w) = self.w.try_borrow_mut() {
            w.tick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { id: context_id, w: self.w.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    w: Rc<RefCell<Worker>>,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Ok(mut w) = self.w.try_borrow_mut() {
            w.on_callout(token, num_headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Ok(mut w) = self.w.try_borrow_mut() {
            w.forget(self.id);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Ok(mut w) = self.w.try_borrow_mut() {
            w.on_response(self.id);
        }
        Action::Continue
    }

    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "panic-test")]
        #[allow(clippy::panic)]
        if proxy_wasm::hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpRequestHeaders, "x-keyward-test-panic").ok().flatten().is_some() {
            panic!("x-keyward-test-panic");
        }
        match self.w.try_borrow_mut() {
            Ok(mut w) => w.run(self.id, None),
            // Never reached in a single-threaded VM; if it were, fail closed.
            Err(_) => {
                let d = keyward_core::response::Denial::new(keyward_core::response::Code::SecretUnavailable, "internal error");
                let _ = host::send_response(d.status(), &d.headers(), &d.body());
                Action::Pause
            }
        }
    }
}
