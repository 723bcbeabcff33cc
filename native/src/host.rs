//! `keyward_core::host::Host` for one worker's lifecycle, carried out with Envoy's dynamic-module
//! callbacks. The lifecycle acts on "the current stream" (`set_effective_context`): here, the
//! stream whose pointer this worker registered under that id. Reads and header changes act on it at
//! once (same worker thread, the stream held); what would re-enter Envoy's filter chain for another
//! stream (a reply, a resume, a reset) is deferred to that stream's own scheduler event, so Envoy
//! only ever continues or answers a stream from that stream's own callbacks.

use crate::abi;
use crate::config::Shared;
use crate::link::{Link, Sched, EFFECTS_EVENT};
pub use crate::slot::{After, Deferred, Slot};
use crate::stream::Stream;
use keyward_core::host::{CallId, ContextId, Headers, Host, HostError};
use keyward_core::record::{Family, Metric};
use keyward_core::secrets::store::HttpCall;
use std::sync::Arc;

/// Which hook is running, for the stream it runs for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hook {
    /// No stream hook (never the case while the lifecycle runs).
    None,
    /// A request or response hook: its own reply and reset act at once; a resume waits.
    Stream { ctx: ContextId, request_body: bool },
    /// The stream's scheduler event: its own reply, resume and reset act at once.
    Scheduled(ContextId),
}

pub struct NativeHost {
    pub root: ContextId,
    current: ContextId,
    pub hook: Hook,
    pub streams: keyward_core::Map<ContextId, Slot>,
    pub shared: Arc<Shared>,
    pub link: Arc<Link>,
    /// The lifecycle asked for a root callback during this event.
    pub woke: bool,
    /// What runs when the hook has let go of the worker.
    pub after: Vec<After>,
    /// Streams Envoy destroyed while this worker was busy (their pointers are dangling): never
    /// touched again, forgotten at the worker's next entry.
    pub gone: std::rc::Rc<std::cell::RefCell<Vec<ContextId>>>,
}

/// Microseconds since the epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl NativeHost {
    pub fn new(root: ContextId, shared: Arc<Shared>, link: Arc<Link>) -> NativeHost {
        NativeHost {
            root,
            current: root,
            hook: Hook::None,
            streams: keyward_core::Map::default(),
            shared,
            link,
            woke: false,
            after: Vec::new(),
            gone: Default::default(),
        }
    }

    /// A hook of `ctx` runs: its stream is the current one (as a proxy-wasm stream callback's
    /// own context is), until the lifecycle sets another.
    pub fn focus(&mut self, ctx: ContextId) {
        self.current = ctx;
    }

    fn stream(&self) -> Result<Stream, HostError> {
        if self.is_gone(self.current) {
            return Err(HostError::Failed);
        }
        self.streams.get(&self.current).map(|s| s.stream).ok_or(HostError::Failed)
    }

    fn is_gone(&self, ctx: ContextId) -> bool {
        self.gone.try_borrow().map_or(true, |g| g.contains(&ctx))
    }

    /// Is the current stream the one whose own hook runs, and may it act at once?
    fn acts_now(&self, resume: bool) -> bool {
        match self.hook {
            Hook::Stream { ctx, .. } => ctx == self.current && !resume,
            Hook::Scheduled(ctx) => ctx == self.current,
            Hook::None => false,
        }
    }

    /// Queue `d` for the current stream's scheduler event.
    fn defer(&mut self, d: Deferred) -> Result<(), HostError> {
        if self.is_gone(self.current) {
            return Err(HostError::Failed);
        }
        let slot = self.streams.get_mut(&self.current).ok_or(HostError::Failed)?;
        let sched = match slot.scheduler {
            Some(s) => s,
            None => {
                let s = Sched(slot.stream.new_scheduler());
                if s.0.is_null() {
                    return Err(HostError::Failed);
                }
                slot.scheduler = Some(s);
                s
            }
        };
        slot.deferred.push(d);
        sched.commit(EFFECTS_EVENT);
        Ok(())
    }

    /// Carry out what was deferred for `ctx` (from its own scheduler event or hook).
    pub fn run_deferred(&mut self, ctx: ContextId) {
        let Some(slot) = self.streams.get_mut(&ctx) else { return };
        for d in std::mem::take(&mut slot.deferred) {
            match d {
                Deferred::Reply { status, headers, body } => {
                    slot.paused = false;
                    let hs: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    slot.stream.send_response(status, &hs, body.as_bytes());
                    // Answered: nothing else is done to it (the reply may have ended the stream).
                    break;
                }
                Deferred::Resume { stops } => {
                    if slot.resume_due(stops) {
                        self.after.push(After::Continue(slot.stream));
                    } else {
                        log::debug!("a stale resume of stream {ctx} is dropped: the stream was stopped again since");
                    }
                }
                Deferred::Reset => self.after.push(After::Reset(slot.stream)),
            }
        }
    }

    /// The request-body hook of the current stream runs (its received part exists).
    fn in_body_hook(&self) -> bool {
        matches!(self.hook, Hook::Stream { ctx, request_body: true } if ctx == self.current)
    }

    fn request_body_now(&self, s: Stream) -> Vec<u8> {
        let mut body = s.body(abi::BUFFERED_REQUEST_BODY);
        if self.in_body_hook() && !s.received_is_buffered() {
            body.extend(s.body(abi::RECEIVED_REQUEST_BODY));
        }
        body
    }
}

impl Host for NativeHost {
    fn clock_us(&self) -> u64 {
        now_us()
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        crate::shared::get(key)
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        crate::shared::set(key, value, cas)
    }

    fn dispatch(&mut self, call: &HttpCall) -> Result<CallId, HostError> {
        Ok(self.shared.send(call.clone(), Arc::downgrade(&self.link)))
    }

    fn wake_root(&mut self) -> bool {
        self.woke = true;
        true
    }

    fn set_effective_context(&mut self, ctx: ContextId) -> Result<(), HostError> {
        if ctx != self.root && (!self.streams.contains_key(&ctx) || self.is_gone(ctx)) {
            return Err(HostError::Failed);
        }
        self.current = ctx;
        Ok(())
    }

    fn request_headers(&mut self) -> Result<Headers, HostError> {
        self.stream()?.headers(abi::REQUEST_HEADER).ok_or(HostError::Failed)
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.stream()?.set_header(abi::REQUEST_HEADER, name, Some(value)).then_some(()).ok_or(HostError::Failed)
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        let s = self.stream()?;
        s.set_header(abi::REQUEST_HEADER, name, None);
        Ok(())
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        let s = self.stream()?;
        let mut body = self.request_body_now(s);
        body.truncate(size);
        Ok(body)
    }

    fn set_request_body(&mut self, size: usize, body: &[u8]) -> Result<(), HostError> {
        let s = self.stream()?;
        let old = self.request_body_now(s);
        let mut new = body.to_vec();
        new.extend_from_slice(old.get(size..).unwrap_or_default());
        // The whole body is written into one buffer: the received part's, in the body hook
        // (the buffered part is emptied), the buffered one otherwise.
        let in_hook = self.in_body_hook();
        let ok = if in_hook && !s.received_is_buffered() {
            s.drain_body(abi::BUFFERED_REQUEST_BODY) && s.replace_body(abi::RECEIVED_REQUEST_BODY, &new)
        } else if in_hook {
            s.replace_body(abi::RECEIVED_REQUEST_BODY, &new)
        } else {
            s.replace_body(abi::BUFFERED_REQUEST_BODY, &new)
        };
        ok.then_some(()).ok_or(HostError::Failed)
    }

    fn response_headers(&mut self) -> Result<Headers, HostError> {
        self.stream()?.headers(abi::RESPONSE_HEADER).ok_or(HostError::Failed)
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        let mut b = self.stream()?.body(abi::RECEIVED_RESPONSE_BODY);
        b.truncate(size);
        Ok(b)
    }

    fn response_from_upstream(&mut self) -> bool {
        self.stream().ok().and_then(|s| s.attribute(abi::ATTR_RESPONSE_CODE_DETAILS)).as_deref() == Some(b"via_upstream".as_slice())
    }

    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError> {
        self.stream()?.set_header(abi::RESPONSE_HEADER, name, None);
        Ok(())
    }

    fn response_trailers(&mut self) -> Result<Headers, HostError> {
        self.stream()?.headers(abi::RESPONSE_TRAILER).ok_or(HostError::Failed)
    }

    fn remove_response_trailer(&mut self, name: &str) -> Result<(), HostError> {
        self.stream()?.set_header(abi::RESPONSE_TRAILER, name, None);
        Ok(())
    }

    fn downstream_address(&mut self) -> Option<String> {
        self.stream().ok()?.attribute(abi::ATTR_SOURCE_ADDRESS).and_then(|b| String::from_utf8(b).ok())
    }

    fn route_metadata(&mut self) -> Option<Vec<(String, String)>> {
        let s = self.stream().ok()?;
        let found: Vec<(String, String)> =
            ["target", "prefix", "endpoint"].iter().filter_map(|k| s.route_metadata("keyward", k).map(|v| (k.to_string(), v))).collect();
        (!found.is_empty()).then_some(found)
    }

    /// The access-log keys are the wasm executor's (`wasm.keyward.*`), so one access-log format
    /// serves both executors.
    fn set_filter_state(&mut self, key: &'static str, value: &str) {
        if let Ok(s) = self.stream() {
            let named = access_log_key(key);
            if !s.set_filter_state(&named, value.as_bytes()) {
                log::debug!("could not set filter state {key}");
            }
        }
    }

    fn reply(&mut self, status: u32, headers: &[(&str, String)], body: &str) -> Result<(), HostError> {
        if self.acts_now(false) {
            let s = self.stream()?;
            if let Some(slot) = self.streams.get_mut(&self.current) {
                slot.paused = false;
            }
            s.send_response(status, headers, body.as_bytes());
            return Ok(());
        }
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        self.defer(Deferred::Reply { status, headers, body: body.to_string() })
    }

    fn resume(&mut self) -> Result<(), HostError> {
        if self.acts_now(true) {
            if let Some(slot) = self.streams.get_mut(&self.current) {
                if std::mem::take(&mut slot.paused) {
                    self.after.push(After::Continue(slot.stream));
                }
            }
            return Ok(());
        }
        let stops = self.streams.get(&self.current).map_or(0, |s| s.stops);
        self.defer(Deferred::Resume { stops })
    }

    fn reset(&mut self) {
        if self.acts_now(false) {
            if let Ok(s) = self.stream() {
                self.after.push(After::Reset(s));
            }
            return;
        }
        let _ = self.defer(Deferred::Reset);
    }

    fn metric(&mut self, m: Metric) {
        crate::link::lock(&self.link.counts).metric(m);
    }

    fn count(&mut self, family: Family, values: &[&str], n: u64) {
        crate::link::lock(&self.link.counts).count(family, values, n);
    }

    fn observe(&mut self, family: Family, values: &[&str], value: u64) {
        self.shared.metrics.family(self.shared.envoy.0, family, values, value);
    }
}

/// A filter-state key as the access log names it: the wasm filter's `wasm.` prefix (Envoy adds it
/// to every key a wasm module sets). The keys the lifecycle writes are known: no allocation.
fn access_log_key(key: &'static str) -> std::borrow::Cow<'static, str> {
    const KEYS: [&str; 18] = [
        "wasm.keyward.subject",
        "wasm.keyward.target",
        "wasm.keyward.jti",
        "wasm.keyward.run",
        "wasm.keyward.decision",
        "wasm.keyward.cache",
        "wasm.keyward.secret_version",
        "wasm.keyward.cost",
        "wasm.keyward.spend",
        "wasm.keyward.budgets",
        "wasm.keyward.idempotency_key",
        "wasm.keyward.issued",
        "wasm.keyward.model",
        "wasm.keyward.reserved",
        "wasm.keyward.usage",
        "wasm.keyward.tokens_in",
        "wasm.keyward.tokens_out",
        "wasm.keyward.error",
    ];
    match KEYS.iter().find(|k| k.len() == key.len() + 5 && k.ends_with(key)) {
        Some(k) => std::borrow::Cow::Borrowed(k),
        None => std::borrow::Cow::Owned(format!("wasm.{key}")),
    }
}

#[cfg(test)]
mod tests {
    use super::access_log_key;

    #[test]
    fn access_log_keys_carry_the_wasm_prefix() {
        assert_eq!(access_log_key("keyward.subject"), "wasm.keyward.subject");
        assert_eq!(access_log_key("keyward.tokens_out"), "wasm.keyward.tokens_out");
        assert_eq!(access_log_key("keyward.new_one"), "wasm.keyward.new_one");
        assert_eq!(access_log_key("subject"), "wasm.subject", "a suffix alone is not a known key");
    }
}
