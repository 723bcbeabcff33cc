//! `keyward_core::host::Host` over proxy-wasm hostcalls: through `proxy_wasm::hostcalls`, but for
//! the few of every request whose SDK form panics on an error status and allocates on the way
//! (a body write, a header-map read, a property write), declared here. Every failure is an `Err`
//! or a log line, never a panic.

use crate::metrics::Metrics;
use keyward_core::host::{CallId, ContextId, Headers, Host, HostError};
use keyward_core::record::{Family, Metric};
use keyward_core::secrets::store::HttpCall;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};
use std::time::{Duration, UNIX_EPOCH};

/// One root context's host: its metrics and its wake-up queue.
#[derive(Default)]
pub struct WasmHost {
    pub metrics: Metrics,
    /// This root's shared queue: an item posted to it makes Envoy call the root's
    /// `on_queue_ready` on this worker.
    pub queue: Option<u32>,
    /// Bench only (`ablate-onekey`): the access-log fields of the event being handled, as one
    /// JSON object, written by `flush_filter_state`.
    #[cfg(feature = "ablate-onekey")]
    pub one_key: String,
}

impl WasmHost {
    /// Bench only (`ablate-onekey`): write the fields gathered during this event as one key.
    pub fn flush_filter_state(&mut self) {
        #[cfg(feature = "ablate-onekey")]
        if !self.one_key.is_empty() {
            self.one_key.push('}');
            let _ = hostcalls::set_property(vec!["keyward"], Some(self.one_key.as_bytes()));
            self.one_key.clear();
        }
    }
}

// The proxy-wasm ABI's buffer write and header-map read (the SDK declares them too, panics on
// their errors, and copies every field of a map into its own allocations).
extern "C" {
    fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, buffer_data: *const u8, buffer_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_property(path_data: *const u8, path_size: usize, return_value_data: *mut *mut u8, return_value_size: *mut usize) -> u32;
}

/// Bytes Envoy writes into memory it asks of this module's `proxy_on_memory_allocate` (the SDK's:
/// a boxed slice of exactly `size` bytes from the global allocator), owned from here on. `call`
/// makes the hostcall with the two out-parameters. `Err`: its status; `Ok(None)`: nothing written.
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, u32> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let status = call(&mut data, &mut size);
    if status != 0 {
        return Err(status);
    }
    if data.is_null() {
        return Ok(None);
    }
    // SAFETY: on success Envoy wrote `size` bytes into an allocation of exactly `size` bytes it
    // asked of this module, and hands it over.
    Ok(Some(unsafe { Vec::from_raw_parts(data, size, size) }))
}

/// A property's value (`path`: its parts, NUL-separated). `None`: absent or unreadable.
fn property(path: &[u8]) -> Option<Vec<u8>> {
    // SAFETY: the path is a slice valid for the call; the out-parameters are `returned`'s.
    returned(|data, size| unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) }).ok().flatten()
}

/// A header map, read in place from the serialized form Envoy writes into the VM's memory.
fn header_map(map: MapType) -> Result<Headers, HostError> {
    // SAFETY: the out-parameters are `returned`'s.
    match returned(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) }) {
        Err(_) => Err(HostError::Failed),
        Ok(None) => Ok(Headers::new()),
        Ok(Some(buf)) => Headers::from_proxy_wasm(buf).ok_or(HostError::Failed),
    }
}

/// Envoy's clock (microseconds since the epoch): each event's time, and the measuring clock.
pub fn now_us() -> u64 {
    hostcalls::get_current_time().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_micros() as u64)
}

fn failed(s: Status) -> HostError {
    match s {
        Status::CasMismatch => HostError::CasMismatch,
        _ => HostError::Failed,
    }
}

impl Host for WasmHost {
    fn clock_us(&self) -> u64 {
        now_us()
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or_default()
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(failed)
    }

    fn dispatch(&mut self, call: &HttpCall) -> Result<CallId, HostError> {
        // Header values are raw bytes (a store token is never logged, and need not be UTF-8-safe).
        let mut hs: Vec<(&str, &str)> = Vec::with_capacity(call.headers.len());
        for (k, v) in &call.headers {
            hs.push((k, std::str::from_utf8(v.expose()).map_err(|_| HostError::Failed)?));
        }
        let timeout = Duration::from_millis(u64::from(call.timeout_ms));
        hostcalls::dispatch_http_call(&call.cluster, hs, call.body.as_deref(), vec![], timeout).map_err(failed)
    }

    fn wake_root(&mut self) -> bool {
        self.queue.is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(b"w")).is_ok())
    }

    fn set_effective_context(&mut self, ctx: ContextId) -> Result<(), HostError> {
        hostcalls::set_effective_context(ctx).map_err(failed)
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        Ok(hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).map_err(failed)?.unwrap_or_default())
    }

    fn set_request_body(&mut self, size: usize, body: &[u8]) -> Result<(), HostError> {
        // The SDK's `hostcalls::set_buffer` panics on any status but Ok (a panic would cost the
        // VM); the hostcall itself answers an error the lifecycle turns into a 503.
        // SAFETY: the pointer and length are the slice's, valid for the call; the host copies.
        let status = unsafe { proxy_set_buffer_bytes(BufferType::HttpRequestBody as u32, 0, size, body.as_ptr(), body.len()) };
        if status == 0 {
            Ok(())
        } else {
            Err(HostError::Failed)
        }
    }

    fn request_headers(&mut self) -> Result<Headers, HostError> {
        header_map(MapType::HttpRequestHeaders)
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value)).map_err(failed)
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        hostcalls::remove_map_value(MapType::HttpRequestHeaders, name).map_err(failed)
    }

    fn response_headers(&mut self) -> Result<Headers, HostError> {
        if cfg!(feature = "ablate-scrub") {
            return Ok(Headers::new());
        }
        header_map(MapType::HttpResponseHeaders)
    }

    fn response_from_upstream(&mut self) -> bool {
        let details = property(b"response\0code_details");
        details.as_deref() == Some(b"via_upstream".as_slice())
    }

    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, None).map_err(failed)
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        Ok(hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size).map_err(failed)?.unwrap_or_default())
    }

    fn response_trailers(&mut self) -> Result<Headers, HostError> {
        header_map(MapType::HttpResponseTrailers)
    }

    fn remove_response_trailer(&mut self, name: &str) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpResponseTrailers, name, None).map_err(failed)
    }

    fn downstream_address(&mut self) -> Option<String> {
        property(b"source\0address").and_then(|b| String::from_utf8(b).ok())
    }

    fn route_metadata(&mut self) -> Option<Vec<(String, String)>> {
        let raw = property(b"xds\0route_metadata\0filter_metadata\0keyward")?;
        let pairs = keyward_core::wire::pairs::decode(&raw)?;
        Some(pairs.into_iter().filter_map(|(k, v)| String::from_utf8(v).ok().map(|v| (k, v))).collect())
    }

    fn set_filter_state(&mut self, key: &'static str, value: &str) {
        if cfg!(feature = "ablate-audit") {
            return;
        }
        #[cfg(feature = "ablate-onekey")]
        {
            self.one_key.push(if self.one_key.is_empty() { '{' } else { ',' });
            keyward_core::wire::json::write_str(&mut self.one_key, key.trim_start_matches("keyward."));
            self.one_key.push(':');
            keyward_core::wire::json::write_str(&mut self.one_key, value);
            return;
        }
        // A path of one part is that part's bytes (parts are NUL-separated).
        // SAFETY: both pointers and lengths are of slices valid for the call; the host copies.
        #[allow(unreachable_code)]
        let status = unsafe { proxy_set_property(key.as_ptr(), key.len(), value.as_ptr(), value.len()) };
        if status != 0 {
            log::debug!("could not set filter state {key}");
        }
    }

    fn reply(&mut self, status: u32, headers: &[(&str, String)], body: &str) -> Result<(), HostError> {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        hostcalls::send_http_response(status, h, Some(body.as_bytes())).map_err(failed)
    }

    fn resume(&mut self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(failed)
    }

    fn reset(&mut self) {
        let _ = hostcalls::reset_http_request();
    }

    fn metric(&mut self, m: Metric) {
        if !cfg!(feature = "ablate-metrics") {
            self.metrics.inc(m);
        }
    }

    fn count(&mut self, family: Family, values: &[&str], n: u64) {
        if !cfg!(feature = "ablate-metrics") {
            self.metrics.count(family, values, n);
        }
    }

    fn observe(&mut self, family: Family, values: &[&str], value: u64) {
        if !cfg!(feature = "ablate-metrics") {
            self.metrics.observe(family, values, value);
        }
    }
}

/// The current callout's answer: `:status` (`None` when nothing arrived) and the body (`None`:
/// larger than `max`, not read at all).
pub fn callout_answer(num_headers: usize, body_size: usize, max: usize) -> keyward_core::lifecycle::Answer {
    use keyward_core::lifecycle::Answer;
    if num_headers == 0 {
        return Answer::failed();
    }
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u32>().ok()));
    if body_size > max {
        return Answer { status, body: None };
    }
    let body =
        if body_size == 0 { Vec::new() } else { hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default() };
    Answer { status, body: Some(body) }
}

/// A name for this root's wake-up queue, unique in the process: shared queues are per `vm_id`
/// and name, and registering a name again takes the queue away from the worker that had it.
/// The number comes from a counter in shared data, bumped with compare-and-swap; the root's
/// context id and the clock make it unique even if two workers created the counter at once.
pub fn queue_name(host: &mut WasmHost, root: u32) -> Option<String> {
    let nanos = hostcalls::get_current_time().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.subsec_nanos());
    for _ in 0..64 {
        let (bytes, cas) = host.shared_get(keyward_core::secrets::keys::WORKER_SEQUENCE);
        let n = bytes.as_deref().and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes) + 1;
        if host.shared_set(keyward_core::secrets::keys::WORKER_SEQUENCE, &n.to_le_bytes(), cas).is_ok() {
            return Some(format!("keyward.wake.{n}.{root}.{nanos}"));
        }
    }
    None
}
