//! Safe calls on one Envoy HTTP stream (`abi::FilterEnvoy`), copying what they return. Each is
//! valid while the stream's filter lives (the executor keeps the pointer only until
//! `on_http_filter_destroy`), on the stream's worker thread.

use crate::abi::{self, EnvoyBuffer, EnvoyHeader, FilterEnvoy, ModuleBuffer, ModuleHeader};
use keyward_core::host::Headers;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Stream(pub FilterEnvoy);

impl Stream {
    pub fn headers(self, kind: abi::HeaderType) -> Option<Headers> {
        // SAFETY: a live stream pointer; Envoy writes `n` headers into a buffer of `n`.
        unsafe {
            let n = abi::envoy_dynamic_module_callback_http_get_headers_size(self.0, kind);
            let mut out = vec![EnvoyHeader::EMPTY; n];
            if n > 0 && !abi::envoy_dynamic_module_callback_http_get_headers(self.0, kind, out.as_mut_ptr()) {
                return None;
            }
            // Copied into one buffer: Envoy's header names are lower case already (HTTP/2
            // requires it; HTTP/1 names are lowered by the codec).
            let bytes = out.iter().map(|h| h.key_length.saturating_add(h.value_length)).sum();
            let mut headers = Headers::with_capacity(n, bytes);
            for h in &out {
                let k = EnvoyBuffer { ptr: h.key_ptr, length: h.key_length }.bytes();
                let v = EnvoyBuffer { ptr: h.value_ptr, length: h.value_length }.bytes();
                if !headers.push(k, v) {
                    return None;
                }
            }
            Some(headers)
        }
    }

    /// Set `name` to one value (`None`: remove every value).
    pub fn set_header(self, kind: abi::HeaderType, name: &str, value: Option<&[u8]>) -> bool {
        let v = value.map_or(ModuleBuffer::NONE, ModuleBuffer::of);
        // SAFETY: a live stream pointer and buffers that outlive the call.
        unsafe { abi::envoy_dynamic_module_callback_http_set_header(self.0, kind, ModuleBuffer::of(name.as_bytes()), v) }
    }

    /// Every byte of a body buffer, in order.
    pub fn body(self, kind: abi::BodyType) -> Vec<u8> {
        // SAFETY: a live stream pointer; Envoy writes `n` slices into a buffer of `n`, each valid
        // until this hook returns or the body changes (copied at once).
        unsafe {
            let n = abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, kind);
            if n == 0 {
                return Vec::new();
            }
            let mut chunks = vec![EnvoyBuffer::EMPTY; n];
            if !abi::envoy_dynamic_module_callback_http_get_body_chunks(self.0, kind, chunks.as_mut_ptr()) {
                return Vec::new();
            }
            let mut out = Vec::with_capacity(chunks.iter().map(|c| c.length).sum());
            for c in &chunks {
                out.extend_from_slice(c.bytes());
            }
            out
        }
    }

    pub fn body_size(self, kind: abi::BodyType) -> usize {
        // SAFETY: a live stream pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_get_body_size(self.0, kind) }
    }

    /// The data of this request-body hook is the buffer an earlier filter held and let go (the
    /// received and the buffered body are then the same bytes).
    pub fn received_is_buffered(self) -> bool {
        // SAFETY: a live stream pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_received_buffered_request_body(self.0) }
    }

    /// Replace a body buffer's bytes with `data`.
    pub fn replace_body(self, kind: abi::BodyType, data: &[u8]) -> bool {
        // SAFETY: a live stream pointer and a buffer that outlives the call.
        unsafe {
            let size = abi::envoy_dynamic_module_callback_http_get_body_size(self.0, kind);
            (size == 0 || abi::envoy_dynamic_module_callback_http_drain_body(self.0, kind, size))
                && (data.is_empty() || abi::envoy_dynamic_module_callback_http_append_body(self.0, kind, ModuleBuffer::of(data)))
        }
    }

    pub fn drain_body(self, kind: abi::BodyType) -> bool {
        // SAFETY: a live stream pointer.
        unsafe {
            let size = abi::envoy_dynamic_module_callback_http_get_body_size(self.0, kind);
            size == 0 || abi::envoy_dynamic_module_callback_http_drain_body(self.0, kind, size)
        }
    }

    pub fn attribute(self, id: abi::AttributeId) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: a live stream pointer; the result is copied before the hook returns.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(self.0, id, &mut out).then(|| out.bytes().to_vec()) }
    }

    /// A string under the route's `filter_metadata.<ns>`.
    pub fn route_metadata(self, ns: &str, key: &str) -> Option<String> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: as `attribute`.
        unsafe {
            abi::envoy_dynamic_module_callback_http_get_metadata_string(
                self.0,
                abi::METADATA_ROUTE,
                ModuleBuffer::of(ns.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                &mut out,
            )
            .then(|| String::from_utf8(out.bytes().to_vec()).ok())
            .flatten()
        }
    }

    pub fn set_filter_state(self, key: &str, value: &[u8]) -> bool {
        // SAFETY: a live stream pointer; Envoy copies both buffers.
        unsafe { abi::envoy_dynamic_module_callback_http_set_filter_state_bytes(self.0, ModuleBuffer::of(key.as_bytes()), ModuleBuffer::of(value)) }
    }

    pub fn send_response(self, status: u32, headers: &[(&str, String)], body: &[u8]) {
        let mut hs: Vec<ModuleHeader> = headers.iter().map(|(k, v)| ModuleHeader::of(k.as_bytes(), v.as_bytes())).collect();
        // SAFETY: a live stream pointer; headers and body outlive the call (Envoy copies them).
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.0,
                status,
                hs.as_mut_ptr(),
                hs.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(b"keyward"),
            )
        }
    }

    pub fn continue_decoding(self) {
        // SAFETY: a live stream pointer, on its worker, outside its own request hooks.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.0) }
    }

    pub fn reset(self) {
        // SAFETY: a live stream pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_reset_stream(self.0, abi::RESET_LOCAL, ModuleBuffer::NONE) }
    }

    pub fn new_scheduler(self) -> abi::Scheduler {
        // SAFETY: a live stream pointer, on its worker thread.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.0) }
    }
}
