//! Keyward's logic, free of proxy-wasm so that it is tested natively.
//!
//! The tree follows a request through the gateway:
//! `credential` (extract, verify, revocation) → `policy` (rules, limits) → `secrets` (stores,
//! cache records, vault sessions) → `inject` (swap the credential, scrub the answer) → `record`
//! (the audit fields). `engine` runs those steps for one request; `lifecycle` is the state machine
//! for everything that crosses callouts and ticks; `host` is the one interface to Envoy.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod credential;
pub mod engine;
pub mod host;
pub mod inject;
pub mod issue;
pub mod ledger;
pub mod lifecycle;
pub mod mem_host;
pub mod policy;
pub mod record;
pub mod response;
pub mod secret;
pub mod secrets;
pub mod wire;

/// The maps a request touches (streams, verified credentials, metric names): hashed with
/// foldhash, several times faster than std's SipHash on short keys. Their keys are ids this
/// gateway made or values it verified or configured; a lookup with a caller's bytes costs one
/// hash, whatever they are.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
