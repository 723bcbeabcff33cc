//! The lifecycle on the in-memory host: what each event does in each state. Every test names the
//! state it starts from, the event, and the effects and next state it expects.

mod cache;
mod fleet;
mod framing;
mod issue;
mod keys;
mod ledger;
mod metered;
mod revocation;
mod session;
mod spend;
mod table;

use super::*;
use crate::config::compile;
use crate::credential::jwt::{self, HmacKey};
use crate::mem_host::{Effect, MemHost};
use crate::record::Metric;
use crate::wire::b64;

pub(super) const ROOT: ContextId = 1;
/// Root contexts in these tests are below this; streams from it up.
pub(super) const FIRST_STREAM: ContextId = 10;
pub(super) const K1: &[u8] = b"keyward-test-signing-key-32bytes";
/// A second key (an issuing key, say): credentials it signs are counted under its identity.
pub(super) const K2: &[u8] = b"keyward-second-signing-key-32byt";
pub(super) const STRIPE_KEY: &str = "sk_test_lifecycle_0001";

pub(super) fn env(name: &str) -> Option<String> {
    match name {
        "KEYWARD_KEY_K1" => Some(b64::std_encode(K1)),
        "KEYWARD_KEY_K2" => Some(b64::std_encode(K2)),
        "VAULT_TOKEN" => Some("root-token".into()),
        "ROLE_ID" => Some("role-1".into()),
        "SECRET_ID" => Some("secret-1".into()),
        _ => None,
    }
}

/// A configuration with one target (`stripe`) in a token-authenticated KV v2 store; `extra`
/// is spliced in at the top level, `store` replaces the store's settings.
pub(super) fn config_with(store: &str, extra: &str) -> Config {
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}}}},
        "stores":{{"bao":{store}}},
        "cache":{{"ttl_s":300,"stale_if_error_s":900}},
        "targets":{{"stripe":{{"credential":"bearer","secret":{{"store":"bao","path":"stripe","field":"api_key"}},"inject":{{"type":"bearer"}}}}}}
        {extra}}}"#
    );
    match compile(json.as_bytes(), &env) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

pub(super) const BAO: &str =
    r#"{"type":"vault_kv2","cluster":"vault","authority":"vault.internal","mount":"secret","token_env":"VAULT_TOKEN","timeout_ms":1000}"#;

pub(super) fn config() -> Config {
    config_with(BAO, "")
}

pub(super) fn token_with(key: &[u8], kid: &str, jti: &str, now_ms: u64) -> String {
    let k = HmacKey::new(key).unwrap_or_else(|e| panic!("{e}"));
    let claims = format!(r#"{{"sub":"lambda/pay","aud":"keyward","exp":{},"jti":"{jti}","allow":["stripe * /**"]}}"#, now_ms / 1000 + 300);
    jwt::mint(kid, &k, &claims)
}

pub(super) fn token(now_ms: u64) -> String {
    token_with(K1, "k1", "j-1", now_ms)
}

/// A worker: a lifecycle configured on its host.
pub(super) fn worker(host: &mut MemHost, cfg: Config) -> Lifecycle {
    let mut lc = Lifecycle::new(host.root);
    lc.configure(host.now_us(), host, cfg);
    host.take();
    lc
}

/// A stream `ctx` calling stripe with `tok`, and the lifecycle's answer to its headers.
pub(super) fn request(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, tok: &str) -> Action {
    host.open(ctx, "stripe", &[(":method", "GET"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {tok}"))]);
    lc.handle(host.now_us(), host, Event::Request(ctx))
}

/// A stream `ctx` calling stripe with a valid credential.
pub(super) fn send_request(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId) -> Action {
    let tok = token(host.now_ms());
    request(lc, host, ctx, &tok)
}

pub(super) fn kv(fields: &str, version: u32) -> Answer {
    Answer { status: Some(200), body: Some(format!(r#"{{"data":{{"data":{fields},"metadata":{{"version":{version}}}}}}}"#).into_bytes()) }
}

pub(super) fn stripe_answer() -> Answer {
    kv(&format!(r#"{{"api_key":"{STRIPE_KEY}"}}"#), 1)
}

/// The id of the only callout dispatched among `effects`.
pub(super) fn only_call(effects: &[Effect]) -> CallId {
    let calls: Vec<CallId> = effects.iter().filter_map(|e| if let Effect::Dispatch { call, .. } = e { Some(*call) } else { None }).collect();
    assert_eq!(calls.len(), 1, "{effects:?}");
    assert!(
        effects.iter().all(|e| !matches!(e, Effect::Dispatch { from, .. } if *from >= FIRST_STREAM)),
        "every callout goes out with the root as the effective context: {effects:?}"
    );
    calls[0]
}

pub(super) fn replies(effects: &[Effect]) -> Vec<(ContextId, u32, String)> {
    effects.iter().filter_map(|e| if let Effect::Reply { ctx, status, code } = e { Some((*ctx, *status, code.clone())) } else { None }).collect()
}

pub(super) fn injected(host: &MemHost, ctx: ContextId) -> Option<String> {
    let s = host.streams.get(&ctx)?;
    s.request.iter().find(|(k, _)| k == "authorization").map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// A cold request: parks, queues its fetch and asks for the root; the root's callback sends it.
/// Returns the callout's id.
pub(super) fn cold_fetch(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId) -> CallId {
    assert_eq!(send_request(lc, host, ctx), Action::Pause);
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Queued { retried: false }));
    assert_eq!(host.take(), vec![Effect::WakeRoot], "a stream never dispatches: it asks for the root");
    lc.handle(host.now_us(), host, Event::Woken);
    let effects = host.take();
    let call = only_call(&effects);
    assert!(effects.contains(&Effect::Dispatch { call, cluster: "vault".into(), path: "/v1/secret/data/stripe".into(), from: ROOT }), "{effects:?}");
    call
}

/// A tiny deterministic generator (xorshift64*), so a failing interleaving can be replayed.
pub(super) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
