//! Hooks Envoy 1.40 requires of an HTTP filter module that this module has no use for (streamed
//! callouts, callouts from a stream, watermarks, the stream's completion).

use crate::abi;
use std::ffi::c_void;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_envoy: abi::FilterEnvoy, _fm: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: abi::FilterEnvoy,
    _fm: *const c_void,
    _id: u64,
    _result: abi::CalloutResult,
    _headers: *const abi::EnvoyHeader,
    _headers_len: usize,
    _chunks: *const abi::EnvoyBuffer,
    _chunks_len: usize,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: abi::FilterEnvoy,
    _fm: *const c_void,
    _id: u64,
    _headers: *const abi::EnvoyHeader,
    _len: usize,
    _end: bool,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: abi::FilterEnvoy,
    _fm: *const c_void,
    _id: u64,
    _data: *const abi::EnvoyBuffer,
    _len: usize,
    _end: bool,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: abi::FilterEnvoy,
    _fm: *const c_void,
    _id: u64,
    _t: *const abi::EnvoyHeader,
    _len: usize,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_envoy: abi::FilterEnvoy, _fm: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(_envoy: abi::FilterEnvoy, _fm: *const c_void, _id: u64, _reason: u32) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(_envoy: abi::FilterEnvoy, _fm: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(_envoy: abi::FilterEnvoy, _fm: *const c_void) {}
