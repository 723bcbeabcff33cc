//! Keyward's logic, free of proxy-wasm so that it is tested natively.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod b64;
pub mod cache;
pub mod config;
pub mod credential;
pub mod engine;
pub mod inject;
pub mod json;
pub mod pairs;
pub mod limits;
pub mod rules;
pub mod scrub;
pub mod response;
pub mod revocation;
pub mod secret;
pub mod store;
pub mod token;
pub mod token_cache;
pub mod vault_auth;
pub mod wire;
