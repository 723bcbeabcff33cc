//! Keyward's logic, free of proxy-wasm so that it is tested natively.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod b64;
pub mod config;
pub mod json;
pub mod rules;
pub mod secret;
pub mod token;
