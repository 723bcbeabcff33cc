//! Keyward as an Envoy dynamic module (`libkeyward.so`): the same `keyward_core` lifecycle as the
//! wasm filter, run natively in Envoy's process. An executor: Envoy's hooks become lifecycle
//! events, and the lifecycle's effects are carried out by `host::NativeHost`. Nothing here decides.
//!
//! Threads: a configuration is made on Envoy's main thread (`config`); each worker thread runs its
//! own lifecycle per configuration (`worker`), as the wasm executor runs one VM per worker; shared
//! data is process-wide (`shared`); callouts are made on the main thread and answered back to the
//! worker that asked (`link`); a ticker thread wakes workers whose tick is due.
//!
//! A panic in a hook fails its request closed (503), and the worker that panicked is replaced.

#![cfg_attr(feature = "bench-noop", allow(dead_code, unused_imports))]

mod abi;
mod config;
mod counts;
#[cfg(not(feature = "bench-noop"))]
mod hooks;
mod host;
mod link;
mod logger;
mod metrics;
#[cfg(feature = "bench-noop")]
mod noop_hooks;
mod shared;
mod slot;
mod stream;
mod unused_hooks;
mod worker;

pub use abi::CALLBACKS;

use config::Shared;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use stream::Stream;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_HASH: &str = match option_env!("KEYWARD_GIT_HASH") {
    Some(h) => h,
    None => "unknown",
};

/// The 503 a request gets when the module cannot decide it.
pub(crate) fn refusal() -> (u32, Vec<(String, String)>, String) {
    let d = keyward_core::response::Denial::new(keyward_core::response::Code::SecretUnavailable, "internal error").retry_after(5);
    (d.status(), d.headers().into_iter().map(|(k, v)| (k.to_string(), v)).collect(), d.body())
}

fn refuse(s: Stream) {
    let (status, headers, body) = refusal();
    let hs: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    s.send_response(status, &hs, body.as_bytes());
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    logger::install();
    abi::ABI_VERSION.as_ptr()
}

/// # Safety
/// Envoy's buffers, valid during the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: abi::ConfigEnvoy,
    _name: abi::EnvoyBuffer,
    config: abi::EnvoyBuffer,
) -> *const c_void {
    let made = catch_unwind(AssertUnwindSafe(|| {
        #[cfg(feature = "bench-noop")]
        log::error!("keyward {VERSION}: this is the bench's no-op build: every request passes unexamined, with no key; never deploy it");
        let json = config.bytes().to_vec();
        let env = |name: &str| std::env::var(name).ok();
        match keyward_core::config::compile(&json, &env) {
            Ok(cfg) => log::info!("keyward {VERSION} ({GIT_HASH}, native) configured: {}", cfg.summary()),
            Err(e) => {
                log::error!("keyward {VERSION} ({GIT_HASH}, native): configuration rejected: {e}");
                return std::ptr::null();
            }
        }
        match Shared::new(envoy, json) {
            Some(s) => {
                let shared = Arc::new(s);
                // The main thread's worker: its ticks refresh what is shared (the revocation list)
                // whether or not requests come.
                if worker::main_for_config(&shared).is_none() {
                    return std::ptr::null();
                }
                Box::into_raw(Box::new(shared)) as *const c_void
            }
            None => std::ptr::null(),
        }
    }));
    made.unwrap_or(std::ptr::null())
}

/// # Safety
/// A pointer `on_http_filter_config_new` returned, once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(cfg: *const c_void) {
    if !cfg.is_null() {
        let shared = Box::from_raw(cfg as *mut Arc<Shared>);
        shared.close();
        let _ = catch_unwind(AssertUnwindSafe(|| worker::drop_main(&shared)));
    }
}

/// # Safety
/// The configuration's pointers (main thread).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_envoy: abi::ConfigEnvoy, cfg: *const c_void, event: u64) {
    let shared = &*(cfg as *const Arc<Shared>);
    let ran = catch_unwind(AssertUnwindSafe(|| {
        if event == link::ROOT_EVENT {
            if let Some(w) = worker::main_for_config(shared) {
                if let Ok(mut w) = w.try_borrow_mut() {
                    w.main_turn();
                }
            }
        }
        shared.make_callouts();
    }));
    if ran.is_err() {
        log::error!("keyward panicked on the main thread; its worker is made again");
        let _ = catch_unwind(AssertUnwindSafe(|| worker::drop_main(shared)));
    }
}

/// # Safety
/// The configuration's pointers and Envoy's buffers, valid during the call (main thread).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _envoy: abi::ConfigEnvoy,
    cfg: *const c_void,
    id: u64,
    result: abi::CalloutResult,
    headers: *const abi::EnvoyHeader,
    headers_len: usize,
    chunks: *const abi::EnvoyBuffer,
    chunks_len: usize,
) {
    let shared = &*(cfg as *const Arc<Shared>);
    let hs = if headers.is_null() { &[][..] } else { std::slice::from_raw_parts(headers, headers_len) };
    let cs = if chunks.is_null() { &[][..] } else { std::slice::from_raw_parts(chunks, chunks_len) };
    if catch_unwind(AssertUnwindSafe(|| shared.answered(id, result == abi::CALLOUT_SUCCESS, hs, cs))).is_err() {
        log::error!("keyward panicked taking a callout's answer; the worker that asked gives it up at its deadline");
    }
}
