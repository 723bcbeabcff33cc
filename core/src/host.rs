//! Everything Keyward asks of Envoy, as one trait. The filter crate implements it with proxy-wasm
//! hostcalls; `mem_host::MemHost` implements it in memory for the lifecycle's unit tests.
//!
//! Calls that act on "the current stream" (headers, reply, resume, filter state) act on the
//! effective context, which the lifecycle sets with `set_effective_context` before deciding a
//! parked request again from the root.

use crate::record::{Family, Metric};
use crate::secrets::store::HttpCall;

/// A proxy-wasm context: the root (one per configuration and worker) or a stream.
pub type ContextId = u32;
/// The id Envoy gives an HTTP callout; its answer arrives with the same id.
pub type CallId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// Shared data: another worker wrote the entry since it was read.
    CasMismatch,
    /// Anything else the host refused.
    Failed,
}

/// What a stream callback tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// A header map as Envoy hands it over: names in lower case, values as bytes.
pub use crate::wire::headers::Headers;

pub trait Host {
    /// Microseconds since the epoch, from the clock that gives each event its time. The
    /// lifecycle decides with the event's time only; this is read to measure what the filter
    /// itself adds within an event (the added-latency and cold-miss histograms).
    fn clock_us(&self) -> u64;

    /// A shared-data entry and its CAS (`None`, `None`: the entry does not exist).
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Write an entry if its CAS is still `cas` (`None`: unconditionally).
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;

    /// Start an HTTP callout. The lifecycle only calls this from a root callback, so that the
    /// answer belongs to the root in Envoy's and in the SDK's bookkeeping alike.
    fn dispatch(&mut self, call: &HttpCall) -> Result<CallId, HostError>;
    /// Ask for a root callback soon (the filter posts to its worker's shared queue). `false`:
    /// it cannot; the next tick serves instead.
    fn wake_root(&mut self) -> bool;
    fn set_effective_context(&mut self, ctx: ContextId) -> Result<(), HostError>;

    // The current stream.
    fn request_headers(&mut self) -> Result<Headers, HostError>;
    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError>;
    /// The first `size` bytes of the request body Envoy buffered for this stream.
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError>;
    /// Replace the first `size` bytes of the buffered request body with `body`.
    fn set_request_body(&mut self, size: usize, body: &[u8]) -> Result<(), HostError>;
    fn response_headers(&mut self) -> Result<Headers, HostError>;
    /// The response body part Envoy hands this callback (`size` bytes: the part, when the
    /// filter lets each part go on).
    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostError>;
    /// Did the response come from the upstream (Envoy's `response.code_details` is
    /// `via_upstream`), rather than from Envoy itself (a timeout, a reset, no healthy host)?
    fn response_from_upstream(&mut self) -> bool;
    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError>;
    fn response_trailers(&mut self) -> Result<Headers, HostError>;
    fn remove_response_trailer(&mut self, name: &str) -> Result<(), HostError>;
    /// The downstream client's address (`ip:port`), as Envoy saw the connection.
    fn downstream_address(&mut self) -> Option<String>;
    /// The string members of the route's `filter_metadata.keyward` (`target`, `prefix`,
    /// `endpoint`); `None`: the route has none, or they could not be read.
    fn route_metadata(&mut self) -> Option<Vec<(String, String)>>;
    fn set_filter_state(&mut self, key: &'static str, value: &str);
    fn reply(&mut self, status: u32, headers: &[(&str, String)], body: &str) -> Result<(), HostError>;
    fn resume(&mut self) -> Result<(), HostError>;
    fn reset(&mut self);

    fn metric(&mut self, m: Metric);
    /// Add `n` to a labelled counter (`values` in the order of `family.labels()`).
    fn count(&mut self, family: Family, values: &[&str], n: u64);
    /// Record a value in a labelled histogram.
    fn observe(&mut self, family: Family, values: &[&str], value: u64);
}
