//! The part of Envoy's dynamic-module C ABI (Envoy 1.40, ABI "v0.2.0") this module uses: the
//! callbacks Envoy exports, declared from Envoy's ABI documentation, and the types they take.
//! `tests/symbols.rs` checks every name in `CALLBACKS` against the Envoy binary.
//!
//! Every pointer Envoy hands over is valid for the duration of the hook it came with (filters: until
//! `on_http_filter_destroy`); every buffer Envoy returns is valid until the hook returns or the
//! object it came from changes. The safe wrappers in `filter.rs` copy what they keep.

#![allow(non_camel_case_types)]

use std::ffi::c_void;

pub type ConfigEnvoy = *mut c_void;
pub type FilterEnvoy = *mut c_void;
pub type Scheduler = *mut c_void;
pub type ConfigScheduler = *mut c_void;

/// The ABI version this module was written against (Envoy 1.40.0). Envoy logs a warning, and
/// still loads the module, if its own differs.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// Bytes owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };

    /// # Safety
    /// `ptr` must point at `length` readable bytes (or be null), for the lifetime the caller picks.
    pub unsafe fn bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(self.ptr, self.length)
        }
    }
}

/// Bytes owned by the module, lent to Envoy for one call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(b: &[u8]) -> ModuleBuffer {
        ModuleBuffer { ptr: b.as_ptr(), length: b.len() }
    }
    pub const NONE: ModuleBuffer = ModuleBuffer { ptr: std::ptr::null(), length: 0 };
}

/// A header owned by the module.
#[repr(C)]
pub struct ModuleHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl ModuleHeader {
    pub fn of(k: &[u8], v: &[u8]) -> ModuleHeader {
        ModuleHeader { key_ptr: k.as_ptr(), key_length: k.len(), value_ptr: v.as_ptr(), value_length: v.len() }
    }
}

/// A header owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl EnvoyHeader {
    pub const EMPTY: EnvoyHeader = EnvoyHeader { key_ptr: std::ptr::null(), key_length: 0, value_ptr: std::ptr::null(), value_length: 0 };
}

// C enums (4 bytes on the platforms Envoy supports), as their numeric values.
pub type HeaderType = u32;
pub const REQUEST_HEADER: HeaderType = 0;
pub const RESPONSE_HEADER: HeaderType = 2;
pub const RESPONSE_TRAILER: HeaderType = 3;

pub type BodyType = u32;
pub const RECEIVED_REQUEST_BODY: BodyType = 0;
pub const BUFFERED_REQUEST_BODY: BodyType = 1;
pub const RECEIVED_RESPONSE_BODY: BodyType = 2;

pub type LogLevel = u32;
pub const LOG_TRACE: LogLevel = 0;
pub const LOG_DEBUG: LogLevel = 1;
pub const LOG_INFO: LogLevel = 2;
pub const LOG_WARN: LogLevel = 3;
pub const LOG_ERROR: LogLevel = 4;

pub type CalloutInit = u32;
pub const CALLOUT_INIT_SUCCESS: CalloutInit = 0;
pub type CalloutResult = u32;
pub const CALLOUT_SUCCESS: CalloutResult = 0;

pub type MetricsResult = u32;
pub const METRICS_SUCCESS: MetricsResult = 0;

pub type MetadataSource = u32;
pub const METADATA_ROUTE: MetadataSource = 1;

pub type AttributeId = u32;
pub const ATTR_RESPONSE_CODE_DETAILS: AttributeId = 16;
pub const ATTR_SOURCE_ADDRESS: AttributeId = 24;

pub type StreamResetReason = u32;
pub const RESET_LOCAL: StreamResetReason = 0;

// What the stream hooks return.
pub type HeadersStatus = u32;
pub const HEADERS_CONTINUE: HeadersStatus = 0;
pub const HEADERS_STOP_ITERATION: HeadersStatus = 1;
pub type BodyStatus = u32;
pub const BODY_CONTINUE: BodyStatus = 0;
pub const BODY_STOP_AND_BUFFER: BodyStatus = 1;
pub type TrailersStatus = u32;
pub const TRAILERS_CONTINUE: TrailersStatus = 0;
pub const TRAILERS_STOP_ITERATION: TrailersStatus = 1;

extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);

    pub fn envoy_dynamic_module_callback_http_get_headers_size(f: FilterEnvoy, kind: HeaderType) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(f: FilterEnvoy, kind: HeaderType, out: *mut EnvoyHeader) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_header(f: FilterEnvoy, kind: HeaderType, key: ModuleBuffer, value: ModuleBuffer) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_body_size(f: FilterEnvoy, kind: BodyType) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(f: FilterEnvoy, kind: BodyType) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(f: FilterEnvoy, kind: BodyType, out: *mut EnvoyBuffer) -> bool;
    pub fn envoy_dynamic_module_callback_http_append_body(f: FilterEnvoy, kind: BodyType, data: ModuleBuffer) -> bool;
    pub fn envoy_dynamic_module_callback_http_drain_body(f: FilterEnvoy, kind: BodyType, n: usize) -> bool;
    pub fn envoy_dynamic_module_callback_http_received_buffered_request_body(f: FilterEnvoy) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        f: FilterEnvoy,
        status: u32,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(f: FilterEnvoy);
    pub fn envoy_dynamic_module_callback_http_filter_reset_stream(f: FilterEnvoy, reason: StreamResetReason, details: ModuleBuffer);

    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(f: FilterEnvoy, id: AttributeId, out: *mut EnvoyBuffer) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_metadata_string(
        f: FilterEnvoy,
        source: MetadataSource,
        ns: ModuleBuffer,
        key: ModuleBuffer,
        out: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(f: FilterEnvoy, key: ModuleBuffer, value: ModuleBuffer) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(f: FilterEnvoy) -> Scheduler;
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(s: Scheduler, event: u64);
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(s: Scheduler);
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(c: ConfigEnvoy) -> ConfigScheduler;
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(s: ConfigScheduler, event: u64);
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(s: ConfigScheduler);

    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        c: ConfigEnvoy,
        id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> CalloutInit;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        c: ConfigEnvoy,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        id_out: *mut usize,
    ) -> MetricsResult;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        c: ConfigEnvoy,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_len: usize,
        id_out: *mut usize,
    ) -> MetricsResult;
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        c: ConfigEnvoy,
        id: usize,
        values: *mut ModuleBuffer,
        values_len: usize,
        n: u64,
    ) -> MetricsResult;
    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        c: ConfigEnvoy,
        id: usize,
        values: *mut ModuleBuffer,
        values_len: usize,
        v: u64,
    ) -> MetricsResult;
}

/// Every callback declared above, for the test that finds each in the Envoy binary.
pub const CALLBACKS: &[&str] = &[
    "envoy_dynamic_module_callback_log",
    "envoy_dynamic_module_callback_http_get_headers_size",
    "envoy_dynamic_module_callback_http_get_headers",
    "envoy_dynamic_module_callback_http_set_header",
    "envoy_dynamic_module_callback_http_get_body_size",
    "envoy_dynamic_module_callback_http_get_body_chunks_size",
    "envoy_dynamic_module_callback_http_get_body_chunks",
    "envoy_dynamic_module_callback_http_append_body",
    "envoy_dynamic_module_callback_http_drain_body",
    "envoy_dynamic_module_callback_http_received_buffered_request_body",
    "envoy_dynamic_module_callback_http_send_response",
    "envoy_dynamic_module_callback_http_filter_continue_decoding",
    "envoy_dynamic_module_callback_http_filter_reset_stream",
    "envoy_dynamic_module_callback_http_filter_get_attribute_string",
    "envoy_dynamic_module_callback_http_get_metadata_string",
    "envoy_dynamic_module_callback_http_set_filter_state_bytes",
    "envoy_dynamic_module_callback_http_filter_scheduler_new",
    "envoy_dynamic_module_callback_http_filter_scheduler_commit",
    "envoy_dynamic_module_callback_http_filter_scheduler_delete",
    "envoy_dynamic_module_callback_http_filter_config_scheduler_new",
    "envoy_dynamic_module_callback_http_filter_config_scheduler_commit",
    "envoy_dynamic_module_callback_http_filter_config_scheduler_delete",
    "envoy_dynamic_module_callback_http_filter_config_http_callout",
    "envoy_dynamic_module_callback_http_filter_config_define_counter",
    "envoy_dynamic_module_callback_http_filter_config_define_histogram",
    "envoy_dynamic_module_callback_http_filter_config_increment_counter",
    "envoy_dynamic_module_callback_http_filter_config_record_histogram_value",
];
