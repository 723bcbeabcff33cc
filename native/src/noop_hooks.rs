//! Bench only (`bench-noop`): the stream hooks doing nothing, so that `make icount` can measure
//! what any dynamic module costs Envoy per request (its per-stream plumbing and hook calls), the
//! floor under Keyward's native executor. Never shipped.

use crate::abi;
use std::ffi::c_void;

/// Every stream shares one filter pointer: there is nothing per stream.
static FILTER: u8 = 0;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(_cfg: *const c_void, _envoy: abi::FilterEnvoy) -> *const c_void {
    std::ptr::from_ref(&FILTER).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(_envoy: abi::FilterEnvoy, _fm: *const c_void, _end: bool) -> abi::HeadersStatus {
    abi::HEADERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(_envoy: abi::FilterEnvoy, _fm: *const c_void, _end: bool) -> abi::BodyStatus {
    abi::BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_envoy: abi::FilterEnvoy, _fm: *const c_void) -> abi::TrailersStatus {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(_envoy: abi::FilterEnvoy, _fm: *const c_void, _end: bool) -> abi::HeadersStatus {
    abi::HEADERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_envoy: abi::FilterEnvoy, _fm: *const c_void, _end: bool) -> abi::BodyStatus {
    abi::BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_envoy: abi::FilterEnvoy, _fm: *const c_void) -> abi::TrailersStatus {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_envoy: abi::FilterEnvoy, _fm: *const c_void, _event: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_fm: *const c_void) {}
