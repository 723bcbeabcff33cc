//! The one small host interface: proxy-wasm hostcalls that can fail are called through
//! `proxy_wasm::hostcalls` and every failure is an `Err`, never a panic.

use keyward_core::engine::Request;
use keyward_core::wire::pairs;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};
use std::time::{Duration, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    hostcalls::get_current_time().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis() as u64)
}

pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// Set `key` (a full name, `keyward.<key>`) in filter state, read by the access log as
/// `%FILTER_STATE(wasm.keyward.<key>:PLAIN)%`.
pub fn set_filter_state(key: &'static str, value: &str) {
    if hostcalls::set_property(vec![key], Some(value.as_bytes())).is_err() {
        log::debug!("could not set filter state {key}");
    }
}

pub fn remove_request_header(name: &str) -> Result<(), Status> {
    hostcalls::remove_map_value(MapType::HttpRequestHeaders, name)
}

pub fn set_request_header(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value))
}

pub fn send_response(status: u32, headers: &[(&str, String)], body: &str) -> Result<(), Status> {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hostcalls::send_http_response(status, h, Some(body.as_bytes()))
}

pub fn resume_request() -> Result<(), Status> {
    hostcalls::resume_http_request()
}

pub fn set_effective_context(id: u32) -> Result<(), Status> {
    hostcalls::set_effective_context(id)
}

pub fn dispatch(cluster: &str, headers: &[(&str, &[u8])], body: Option<&[u8]>, timeout_ms: u32) -> Result<u32, Status> {
    // Header values are raw bytes (a store token is not necessarily UTF-8-safe to log, and never is).
    let mut hs: Vec<(&str, &str)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        hs.push((k, std::str::from_utf8(v).map_err(|_| Status::BadArgument)?));
    }
    hostcalls::dispatch_http_call(cluster, hs, body, vec![], Duration::from_millis(u64::from(timeout_ms)))
}

/// The current callout response: `:status` (None when nothing arrived) and the body, or
/// `None` for a body larger than `max` (not read at all).
pub fn callout_response(num_headers: usize, body_size: usize, max: usize) -> (Option<u32>, Option<Vec<u8>>) {
    if num_headers == 0 {
        return (None, Some(Vec::new()));
    }
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u32>().ok()));
    if body_size > max {
        return (status, None);
    }
    let body =
        if body_size == 0 { Vec::new() } else { hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default() };
    (status, Some(body))
}

/// The request as the engine sees it: the header map is read once, with one hostcall, the first
/// time the engine asks for a header, and every later question is answered from that copy.
#[derive(Default)]
pub struct HostRequest {
    /// `None`: not read yet. `Some(Err(()))`: the map could not be read (fail closed).
    headers: Option<Result<HeaderMap, ()>>,
    /// The route's keyward metadata (target, prefix), once read.
    route: Option<(Option<String>, Option<String>)>,
}

type HeaderMap = Vec<(String, Vec<u8>)>;

impl HostRequest {
    /// Does the request carry this header? Unknown (the map could not be read): yes.
    pub fn carries(&mut self, name: &str) -> bool {
        match self.headers() {
            Ok(all) => all.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)),
            Err(()) => true,
        }
    }

    fn headers(&mut self) -> Result<&[(String, Vec<u8>)], ()> {
        let h = self.headers.get_or_insert_with(|| hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(|_| ()));
        h.as_deref().map_err(|_| ())
    }
}

impl Request for HostRequest {
    fn method(&mut self) -> Option<String> {
        self.header(":method").and_then(|b| String::from_utf8(b).ok())
    }
    fn path(&mut self) -> Option<String> {
        self.header(":path").and_then(|b| String::from_utf8(b).ok())
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        let all = self.headers().ok()?;
        all.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>> {
        match self.headers() {
            Ok(all) => all.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect(),
            // Fail closed: an unreadable header map counts as a duplicate.
            Err(()) => vec![Vec::new(), Vec::new()],
        }
    }
    fn route_target(&mut self) -> Option<String> {
        self.route_meta().0.clone()
    }
    fn route_prefix(&mut self) -> Option<String> {
        self.route_meta().1.clone()
    }
}

impl HostRequest {
    /// The route's `filter_metadata.keyward` `target` and `prefix`, read with one hostcall: Envoy
    /// returns the struct in the proxy-wasm pairs encoding (decoded by `core::pairs`). Metadata
    /// that does not decode names no target (403 `unknown_target`).
    fn route_meta(&mut self) -> &(Option<String>, Option<String>) {
        self.route.get_or_insert_with(|| {
            let bytes = property(&["xds", "route_metadata", "filter_metadata", "keyward"]).unwrap_or_default();
            match pairs::decode(&bytes) {
                Some(p) => (pairs::get(&p, "target").map(str::to_string), pairs::get(&p, "prefix").map(str::to_string)),
                None => (None, None),
            }
        })
    }
}
