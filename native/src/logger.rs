//! `log` records to Envoy's log (the `dynamic_modules` component), at info and above as the
//! wasm executor logs.

use crate::abi::{self, ModuleBuffer};

struct EnvoyLog;

impl log::Log for EnvoyLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            log::Level::Error => abi::LOG_ERROR,
            log::Level::Warn => abi::LOG_WARN,
            log::Level::Info => abi::LOG_INFO,
            log::Level::Debug => abi::LOG_DEBUG,
            log::Level::Trace => abi::LOG_TRACE,
        };
        let msg = format!("keyward: {}", r.args());
        // SAFETY: a buffer that outlives the call (Envoy copies it).
        unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(msg.as_bytes())) }
    }

    fn flush(&self) {}
}

pub fn install() {
    static LOGGER: EnvoyLog = EnvoyLog;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
