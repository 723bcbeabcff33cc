//! Run the warm path (`engine::decide` for an allowed request whose key is cached) N times over
//! 100 rotating credentials, with the request and cache in memory: what the filter computes per
//! request, without Envoy's hostcalls. `make profile` runs it under callgrind, which counts
//! instructions per function (repeatable, unlike timings on a shared machine).
//! Usage: keyward-hotpath [ITERATIONS]   (KEYWARD_HOTPATH_NO_CACHE=1: no verified-token cache)
//!        keyward-hotpath lifecycle [ITERATIONS]: every event of a warm request (headers, response
//!        headers, stream gone) through `Lifecycle` on the in-memory host, as the filter runs it
//!        (the in-memory host's own bookkeeping is in the profile too; subtract `mem_host::*`).

use keyward_core::config::{self, Config};
use keyward_core::credential::jwt::{self, HmacKey};
use keyward_core::credential::verified::VerifiedCache;
use keyward_core::engine::{self, Lookup, Outcome, Request, Secrets, Step};
use keyward_core::host::Headers;
use keyward_core::secret::Secret;
use keyward_core::secrets::store::Fetched;
use keyward_core::{wire::b64, wire::json};
use std::rc::Rc;

const KEY: &[u8] = b"keyward-hotpath-signing-key-32by";
const NOW: i64 = 1_800_000_000;

/// A request as Envoy hands it over: pseudo-headers, a few usual headers, the credential.
struct Req {
    auth: Vec<u8>,
    headers: Headers,
}

impl Req {
    fn new(auth: Vec<u8>) -> Req {
        let mut headers = Headers::of([
            (":authority", "gateway.internal:10000"),
            (":path", "/v/v1/items"),
            (":method", "GET"),
            (":scheme", "http"),
            ("user-agent", "python-requests/2.32.5"),
            ("accept", "*/*"),
            ("x-request-id", "5f0c2a1e-4d7b-4c55-9a4e-0d3f1b2c6e7a"),
        ]);
        let _ = headers.push(b"authorization", &auth);
        Req { auth, headers }
    }
}

impl Request for Req {
    fn method(&mut self) -> Option<String> {
        Some("GET".into())
    }
    fn path(&mut self) -> Option<String> {
        Some("/v/v1/items".into())
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        (name == "authorization").then(|| self.auth.clone())
    }
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>> {
        self.header(name).into_iter().collect()
    }
    fn headers(&mut self) -> &Headers {
        &self.headers
    }
    fn route_target(&mut self) -> Option<String> {
        Some("vendor".into())
    }
    fn route_prefix(&mut self) -> Option<String> {
        Some("/v".into())
    }
}

struct Cache(Rc<Fetched>, Option<VerifiedCache>);

impl Secrets for Cache {
    fn verified(&mut self) -> Option<&mut VerifiedCache> {
        self.1.as_mut()
    }
    fn secret(&mut self, _slot: usize) -> Lookup<Rc<Fetched>> {
        Lookup::Ready(self.0.clone())
    }
    fn signing_key(&mut self, _slot: usize, _field: &str) -> Lookup<Option<Rc<HmacKey>>> {
        Lookup::Ready(None)
    }
}

fn config() -> Result<Config, String> {
    let doc = r#"{"audience":"keyward","signing_keys":{"k1":{"env":"K1"}},
      "stores":{"bao":{"type":"vault_kv2","cluster":"vault","authority":"vault.bench","token_env":"T"}},
      "targets":{"vendor":{"credential":"bearer","secret":{"store":"bao","path":"bench/vendor","field":"api_key"},
                           "inject":{"type":"bearer"},"allow":["GET /v1/**"]}}}"#;
    let env = |n: &str| match n {
        "K1" => Some(b64::std_encode(KEY)),
        "T" => Some("hotpath-token".to_string()),
        _ => None,
    };
    config::compile(doc.as_bytes(), &env).map_err(|e| e.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("lifecycle") {
        let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
        std::process::exit(lifecycle(n));
    }
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let cfg = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let Ok(key) = HmacKey::new(KEY) else { return };
    let tokens: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            let mut claims = String::from("{\"sub\":");
            json::write_str(&mut claims, &format!("lambda/bench-{i}"));
            claims.push_str(&format!(",\"aud\":\"keyward\",\"iat\":{NOW},\"exp\":{},\"jti\":\"{i:016x}\",\"allow\":[\"vendor GET /v1/**\"]}}", NOW + 3600));
            format!("Bearer {}", jwt::mint("k1", &key, &claims)).into_bytes()
        })
        .collect();
    let fetched = Fetched { fields: vec![("api_key".into(), Secret::text("sk_hotpath_0123456789abcdef"))], version: Some("3".into()), problems: vec![] };
    // KEYWARD_HOTPATH_NO_CACHE=1: verify every credential (the path before the cache existed).
    let remember = std::env::var_os("KEYWARD_HOTPATH_NO_CACHE").is_none();
    let mut cache = Cache(Rc::new(fetched), remember.then(VerifiedCache::default));
    let mut allowed = 0usize;
    for i in 0..n {
        let mut req = Req::new(tokens.get(i % tokens.len()).cloned().unwrap_or_default());
        // The credential has no limits: decided in one step, never counted.
        if let Step::Decided(engine::Decision { outcome: Outcome::Allow(_), .. }) = engine::decide(&cfg, &mut req, &mut cache, NOW) {
            allowed += 1;
        }
    }
    if allowed != n {
        eprintln!("only {allowed} of {n} allowed");
        std::process::exit(1);
    }
    println!("{n} warm decisions");
}

/// The filter's warm request, event by event, on the in-memory host. Returns the exit code.
fn lifecycle(n: usize) -> i32 {
    use keyward_core::host::Action;
    use keyward_core::lifecycle::{Answer, Event, Lifecycle};
    use keyward_core::mem_host::{Effect, MemHost};
    let cfg = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let Ok(key) = HmacKey::new(KEY) else { return 2 };
    let mut host = MemHost::new(1);
    let now = host.now_ms() as i64 / 1000;
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            let claims = format!(
                "{{\"sub\":\"lambda/bench-{i}\",\"aud\":\"keyward\",\"iat\":{now},\"exp\":{},\"jti\":\"{i:016x}\",\"allow\":[\"vendor GET /v1/**\"]}}",
                now + 3600
            );
            format!("Bearer {}", jwt::mint("k1", &key, &claims))
        })
        .collect();
    let mut lc = Lifecycle::new(1);
    lc.configure(host.now_us(), &mut host, cfg);
    let response: Vec<(String, Vec<u8>)> = [
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "11"),
        ("date", "Sat, 05 Dec 2026 20:00:00 GMT"),
        ("server", "envoy"),
        ("x-envoy-upstream-service-time", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    let mut served = 0usize;
    for i in 0..n + 1 {
        let ctx = 10 + i as u32;
        let auth = tokens.get(i % tokens.len()).map_or("", String::as_str);
        let headers = [
            (":method", "GET"),
            (":path", "/v/v1/items"),
            (":authority", "127.0.0.1"),
            (":scheme", "http"),
            ("authorization", auth),
            ("user-agent", "loadgen"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"),
        ];
        host.open(ctx, "vendor", &headers);
        if let Some(s) = host.streams.get_mut(&ctx) {
            s.route = vec![("target".into(), "vendor".into()), ("prefix".into(), "/v".into())];
        }
        let action = lc.handle(host.now_us(), &mut host, Event::Request(ctx));
        if i == 0 {
            // The cold miss that warms the cache: the root sends the callout, the vault answers.
            host.current = 1;
            lc.handle(host.now_us(), &mut host, Event::Woken);
            let call = host.effects.iter().find_map(|e| if let Effect::Dispatch { call, .. } = e { Some(*call) } else { None });
            let body = br#"{"data":{"data":{"api_key":"sk_hotpath_0123456789abcdef"},"metadata":{"version":3}}}"#.to_vec();
            let Some(call) = call else { return 1 };
            lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(200), body: Some(body) } });
            host.current = ctx;
        } else if action == Action::Continue {
            served += 1;
        }
        lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx, size: 0, end: true });
        if let Some(s) = host.streams.get_mut(&ctx) {
            s.response = response.clone();
        }
        lc.handle(host.now_us(), &mut host, Event::Response(ctx));
        lc.handle(host.now_us(), &mut host, Event::StreamGone(ctx));
        host.streams.remove(&ctx);
        host.effects.clear();
    }
    if served != n {
        eprintln!("only {served} of {n} warm requests went on");
        return 1;
    }
    println!("{n} warm requests through the lifecycle");
    0
}
