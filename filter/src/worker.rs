//! Per-VM (per Envoy worker) state and the callout state machine.
//!
//! A request that needs a secret that is not cached parks here, keyed by its context id. One
//! callout per slot is in flight per worker (later requests join its waiters); the callout is
//! keyed by its token. When the answer arrives, in whichever context receives it, the cache is
//! updated and every waiter is decided again under its own effective context: each ends in
//! `resume_http_request` or a local reply. The root's tick answers waiters past their deadline
//! with 503 and re-dispatches fetches whose owning stream went away (Envoy cancels a stream's
//! callouts when it ends).

use crate::host::{self, HostRequest};
use crate::metrics::{inc, Metrics};
use keyward_core::cache::Entry;
use keyward_core::config::Config;
use keyward_core::engine::{self, Audit, Decision, Outcome, Secrets, Slot};
use keyward_core::inject::Op;
use keyward_core::limits::{self, Table, Verdict};
use keyward_core::response::{Code, Denial};
use keyward_core::revocation::{self, RevocationList};
use keyward_core::store::{self, FetchError, Fetched};
use keyward_core::token::{HmacKey, Limits};
use keyward_core::{b64, secret::Secret};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Action;
use std::collections::HashMap;
use std::rc::Rc;

/// After a failed fetch, requests for that slot get 503 at once for this long (no vault storm).
const NEGATIVE_TTL_MS: u64 = 1000;
/// Extra time a parked request may wait beyond its store's timeout before the tick answers it.
const PARK_GRACE_MS: u64 = 1000;
/// Compare-and-swap attempts on a limit shard before the request is refused (fail closed).
const LIMIT_CAS_TRIES: u32 = 64;

struct Inflight {
    token: Option<u32>,
    /// The stream whose context owns the callout (0: the root).
    owner: u32,
    waiters: Vec<u32>,
}

struct Parked {
    deadline_ms: u64,
    audit: Audit,
    /// Already counted against its credential's limits: deciding again must not count it twice.
    admitted: bool,
}

/// A store-held signing key, prepared once per fetched entry (`None`: the value is unusable).
type PreparedKey = (Rc<Fetched>, Option<Rc<HmacKey>>);

/// What a callout token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callout {
    Slot(usize),
    Revocation,
}

#[derive(Default)]
pub struct Worker {
    pub cfg: Option<Rc<Config>>,
    pub metrics: Metrics,
    pub root_id: u32,
    inflight: HashMap<usize, Inflight>,
    tokens: HashMap<u32, Callout>,
    /// The revocation list as last read from shared data, and that entry's CAS.
    revoked: Option<Rc<RevocationList>>,
    revoked_cas: Option<u32>,
    /// When this worker's revocation refresh was dispatched (0: none in flight).
    revocation_since_ms: u64,
    parked: HashMap<u32, Parked>,
    /// Decoded shared-data entries, keyed by slot, tagged with the shared-data CAS.
    local: HashMap<usize, (u32, Rc<Fetched>, u64)>,
    /// Prepared store-held signing keys, tagged with the entry they came from.
    keys: HashMap<(usize, String), PreparedKey>,
    failed_until: HashMap<usize, u64>,
}

/// `Secrets` over shared data, with a per-worker decode cache.
struct Cache<'a> {
    w: &'a mut Worker,
    cfg: &'a Config,
    now_ms: u64,
    /// This request was counted against its credential's limits.
    admitted: bool,
}

impl Cache<'_> {
    fn lookup(&mut self, slot: usize) -> Slot<Rc<Fetched>> {
        let Some(spec) = self.cfg.slots.get(slot) else { return Slot::Failed };
        let (bytes, cas) = hostcalls::get_shared_data(&spec.cache_key).unwrap_or_default();
        let entry = match (bytes, cas) {
            (Some(b), Some(cas)) => match self.w.local.get(&slot) {
                Some((c, f, at)) if *c == cas => Some((f.clone(), *at)),
                _ => match Entry::decode(&b) {
                    Some(e) if spec.fields.iter().all(|f| e.data.covers(f)) => {
                        let f = Rc::new(e.data);
                        self.w.local.insert(slot, (cas, f.clone(), e.fetched_at_ms));
                        Some((f, e.fetched_at_ms))
                    }
                    _ => None,
                },
            },
            _ => None,
        };
        if let Some((f, at)) = entry {
            if self.now_ms < at.saturating_add(u64::from(self.cfg.cache.ttl_s) * 1000) {
                return Slot::Ready(f);
            }
        }
        if self.w.failed_until.get(&slot).is_some_and(|t| self.now_ms < *t) {
            return Slot::Failed;
        }
        Slot::Pending
    }
}

impl Secrets for Cache<'_> {
    fn secret(&mut self, slot: usize) -> Slot<Rc<Fetched>> {
        self.lookup(slot)
    }

    fn is_revoked(&mut self, jti: &str, sub: &str) -> bool {
        self.w.revoked.as_ref().is_some_and(|l| l.is_revoked(jti, sub))
    }

    /// Count the request in its shard with compare-and-swap: read, decide, write back only if
    /// no other worker wrote in between; otherwise read again. Refusals write nothing.
    fn admit(&mut self, jti: &str, lim: &Limits, keep_until_s: i64) -> Verdict {
        if self.admitted {
            return Verdict::Admit;
        }
        let key = limits::shard_key(jti);
        for _ in 0..LIMIT_CAS_TRIES {
            let (bytes, cas) = hostcalls::get_shared_data(&key).unwrap_or_default();
            let mut table = match bytes.as_deref() {
                None | Some([]) => Table::default(),
                Some(b) => Table::decode(b).unwrap_or_else(|| {
                    log::warn!("limit shard {key} is unreadable; starting it afresh");
                    Table::default()
                }),
            };
            let verdict = table.admit(jti, lim, keep_until_s, self.now_ms / 1000);
            match verdict {
                Verdict::Admit => {}
                Verdict::Full => {
                    inc(self.w.metrics.limit_full);
                    log::warn!("limit shard {key} holds {} live credentials; refusing new ones", table.len());
                    return verdict;
                }
                _ => return verdict,
            }
            match hostcalls::set_shared_data(&key, Some(&table.encode()), cas) {
                Ok(()) => {
                    self.admitted = true;
                    return Verdict::Admit;
                }
                Err(proxy_wasm::types::Status::CasMismatch) => inc(self.w.metrics.limit_cas_retry),
                Err(e) => {
                    log::warn!("limit shard {key} could not be written ({e:?}); refusing");
                    return Verdict::Full;
                }
            }
        }
        log::warn!("limit shard {key}: still contended after {LIMIT_CAS_TRIES} tries; refusing");
        Verdict::RateLimited { retry_after_s: 1 }
    }

    fn signing_key(&mut self, slot: usize, field: &str) -> Slot<Option<Rc<HmacKey>>> {
        let f = match self.lookup(slot) {
            Slot::Ready(f) => f,
            Slot::Pending => return Slot::Pending,
            Slot::Failed => return Slot::Failed,
        };
        let k = (slot, field.to_string());
        if let Some((src, key)) = self.w.keys.get(&k) {
            if Rc::ptr_eq(src, &f) {
                return Slot::Ready(key.clone());
            }
        }
        let key = f
            .field(field)
            .and_then(Secret::expose_str)
            .and_then(b64::key_decode)
            .and_then(|bytes| HmacKey::new(&bytes).ok())
            .map(Rc::new);
        if key.is_none() {
            log::warn!("store-held signing key {field:?} is not base64 of at least 32 bytes");
        }
        self.w.keys.insert(k, (f, key.clone()));
        Slot::Ready(key)
    }
}

fn record_audit(a: &Audit) {
    if let Some(v) = &a.subject {
        host::set_filter_state("subject", v);
    }
    if let Some(v) = &a.target {
        host::set_filter_state("target", v);
    }
    if let Some(v) = &a.jti {
        host::set_filter_state("jti", v);
    }
    if let Some(v) = &a.run {
        host::set_filter_state("run", v);
    }
    if !a.decision.is_empty() {
        host::set_filter_state("decision", a.decision);
    }
    if let Some(v) = a.cache {
        host::set_filter_state("cache", v);
    }
    if let Some(v) = &a.idempotency_key {
        host::set_filter_state("idempotency_key", v);
    }
}

/// Create every limit shard before any request can be served. Envoy's shared data accepts any
/// CAS for a key that does not exist yet, so two workers creating the same shard could lose a
/// count; created here (the configuration canary on the main thread runs first), a shard exists
/// before any worker counts in it.
pub fn create_limit_shards() {
    let empty = Table::default().encode();
    for key in limits::shard_keys() {
        if let Ok((None, _)) = hostcalls::get_shared_data(&key) {
            let _ = hostcalls::set_shared_data(&key, Some(&empty), None);
        }
    }
}

impl Worker {
    pub fn new(root_id: u32) -> Worker {
        Worker { root_id, ..Worker::default() }
    }

    /// Decide the request of context `ctx` (the effective context must already be `ctx`).
    /// `resumed`: the request was parked, so the answer is given by resuming or replying now.
    /// `admitted`: it was already counted against its credential's limits before it parked.
    pub fn run(&mut self, ctx: u32, resumed: bool, admitted: bool) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            // No valid configuration: fail closed.
            let d = Denial::new(Code::SecretUnavailable, "the gateway is not configured").retry_after(5);
            return self.finish_deny(&Audit { decision: d.code.as_str(), ..Audit::default() }, &d);
        };
        let now_ms = host::now_ms();
        let (decision, admitted): (Decision, bool) = {
            let mut cache = Cache { w: self, cfg: &cfg, now_ms, admitted };
            let d = engine::decide(&cfg, &mut HostRequest, &mut cache, (now_ms / 1000) as i64);
            (d, cache.admitted)
        };
        let mut audit = decision.audit;
        match decision.outcome {
            Outcome::Need(slot) => {
                self.park(&cfg, ctx, slot, now_ms, audit, admitted);
                Action::Pause
            }
            Outcome::Deny(d) => self.finish_deny(&audit, &d),
            Outcome::Allow(ops) => {
                if resumed && audit.cache == Some("hit") {
                    audit.cache = Some("miss");
                }
                if apply(&ops).is_err() {
                    // The request could not be rewritten safely: never forward it.
                    let d = Denial::new(Code::SecretUnavailable, "the upstream credential could not be applied").retry_after(5);
                    audit.decision = d.code.as_str();
                    return self.finish_deny(&audit, &d);
                }
                record_audit(&audit);
                inc(self.metrics.allowed);
                inc(if audit.cache == Some("miss") { self.metrics.cache_miss } else { self.metrics.cache_hit });
                if resumed {
                    if host::resume_request().is_err() {
                        log::warn!("could not resume a request");
                    }
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    fn finish_deny(&mut self, audit: &Audit, d: &Denial) -> Action {
        record_audit(audit);
        self.metrics.denied(d.code);
        if host::send_response(d.status(), &d.headers(), &d.body()).is_err() {
            log::warn!("could not send a local reply; resetting the stream");
            let _ = hostcalls::reset_http_request();
        }
        Action::Pause
    }

    fn park(&mut self, cfg: &Config, ctx: u32, slot: usize, now_ms: u64, audit: Audit, admitted: bool) {
        let timeout = cfg.store_of(slot).map_or(2000, |s| u64::from(s.timeout_ms));
        self.parked.insert(ctx, Parked { deadline_ms: now_ms + timeout + PARK_GRACE_MS, audit, admitted });
        if let Some(f) = self.inflight.get_mut(&slot) {
            if !f.waiters.contains(&ctx) {
                f.waiters.push(ctx);
            }
            return;
        }
        self.inflight.insert(slot, Inflight { token: None, owner: ctx, waiters: vec![ctx] });
        self.dispatch(cfg, slot, ctx);
    }

    /// Send the callout for `slot` from the current context `owner`.
    fn dispatch(&mut self, cfg: &Config, slot: usize, owner: u32) {
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        match send(st, &spec.path) {
            Ok(token) => {
                self.tokens.insert(token, Callout::Slot(slot));
                if let Some(f) = self.inflight.get_mut(&slot) {
                    f.token = Some(token);
                    f.owner = owner;
                }
            }
            Err(e) => {
                log::warn!("store {} callout to cluster {:?} failed to start: {e:?}", st.name, st.cluster);
                self.complete(cfg, slot, Err(FetchError::Transient("callout not started".into())));
            }
        }
    }

    /// A callout answered (in any context).
    pub fn on_callout(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let Some(kind) = self.tokens.remove(&token) else { return };
        let Some(cfg) = self.cfg.clone() else { return };
        let slot = match kind {
            Callout::Slot(slot) => slot,
            Callout::Revocation => return self.on_revocation(&cfg, num_headers, body_size),
        };
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let (status, body) = host::callout_response(num_headers, body_size, store::MAX_BODY);
        let result = match body {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
            Some(b) => store::parse_response(st, status, &b, &spec.fields),
        };
        self.complete(&cfg, slot, result);
    }

    fn complete(&mut self, cfg: &Config, slot: usize, result: Result<Fetched, FetchError>) {
        let now_ms = host::now_ms();
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        match result {
            Ok(fetched) => {
                inc(self.metrics.fetch_ok);
                self.failed_until.remove(&slot);
                let entry = Entry { fetched_at_ms: now_ms, data: fetched };
                if hostcalls::set_shared_data(&spec.cache_key, Some(&entry.encode()), None).is_err() {
                    // Without the shared cache the waiters would fetch again in a loop: fail them.
                    log::warn!("could not write the shared cache for {}:{}", st.name, spec.path);
                    self.failed_until.insert(slot, now_ms + NEGATIVE_TTL_MS);
                }
                self.local.remove(&slot);
                log::info!("fetched {}:{} (version {})", st.name, spec.path, entry.data.version.as_deref().unwrap_or("-"));
                for p in &entry.data.problems {
                    log::warn!("{}:{}: {p}; targets needing it answer 503", st.name, spec.path);
                }
            }
            Err(e) => {
                inc(self.metrics.fetch_error);
                self.failed_until.insert(slot, now_ms + NEGATIVE_TTL_MS);
                log::warn!("fetching {}:{} failed: {e}", st.name, spec.path);
            }
        }
        let waiters = self.inflight.remove(&slot).map(|f| f.waiters).unwrap_or_default();
        for ctx in waiters {
            self.resume(ctx);
        }
    }

    /// Decide a parked request again, under its own context.
    fn resume(&mut self, ctx: u32) {
        let Some(p) = self.parked.remove(&ctx) else {
            return; // the stream has gone
        };
        if host::set_effective_context(ctx).is_err() {
            return;
        }
        let _ = self.run(ctx, true, p.admitted);
    }

    /// The stream of `ctx` ended.
    pub fn forget(&mut self, ctx: u32) {
        self.parked.remove(&ctx);
        for f in self.inflight.values_mut() {
            f.waiters.retain(|w| *w != ctx);
            if f.owner == ctx {
                // Envoy cancels the callouts of a finished stream: the tick re-dispatches.
                if let Some(t) = f.token.take() {
                    self.tokens.remove(&t);
                }
            }
        }
        self.inflight.retain(|_, f| !f.waiters.is_empty() || f.token.is_some());
    }

    /// Take the shared revocation list if another worker refreshed it.
    fn reload_revocation(&mut self) {
        let (bytes, cas) = hostcalls::get_shared_data(revocation::SHARED_KEY).unwrap_or_default();
        if cas.is_some() && cas == self.revoked_cas {
            return;
        }
        if let Some(l) = bytes.as_deref().and_then(RevocationList::decode) {
            self.revoked = Some(Rc::new(l));
            self.revoked_cas = cas;
        }
    }

    /// Refresh the revocation list when due. One worker at a time holds the lease (CAS in shared
    /// data); the callout is dispatched from the root context, so no stream owns it.
    fn refresh_revocation(&mut self, cfg: &Config, now_ms: u64) {
        let Some(rev) = &cfg.revocation else { return };
        let Some(st) = cfg.stores.get(rev.store) else { return };
        self.reload_revocation();
        if self.revocation_since_ms != 0 {
            if now_ms < self.revocation_since_ms + u64::from(st.timeout_ms) + 5000 {
                return;
            }
            self.revocation_since_ms = 0; // never answered: allow another try
        }
        if !revocation::refresh_due(self.revoked.as_deref(), now_ms, rev.refresh_s) {
            return;
        }
        let (lease, cas) = hostcalls::get_shared_data(revocation::LEASE_KEY).unwrap_or_default();
        if !revocation::lease_free(lease.as_deref(), now_ms) {
            return;
        }
        let until = now_ms + u64::from(st.timeout_ms) + 1000;
        if hostcalls::set_shared_data(revocation::LEASE_KEY, Some(&until.to_le_bytes()), cas).is_err() {
            return; // another worker took it
        }
        match send(st, &rev.path) {
            Ok(token) => {
                self.tokens.insert(token, Callout::Revocation);
                self.revocation_since_ms = now_ms;
            }
            Err(e) => {
                inc(self.metrics.revocation_error);
                log::warn!("revocation list refresh could not start: {e:?}");
            }
        }
    }

    fn on_revocation(&mut self, cfg: &Config, num_headers: usize, body_size: usize) {
        self.revocation_since_ms = 0;
        let Some(rev) = &cfg.revocation else { return };
        let Some(st) = cfg.stores.get(rev.store) else { return };
        let now_ms = host::now_ms();
        let (status, body) = host::callout_response(num_headers, body_size, store::MAX_BODY);
        let doc = match body {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
            Some(b) => store::read_document(st, status, &b),
        };
        let list = match doc {
            Ok((doc, _)) => {
                let (l, ignored) = RevocationList::from_document(&doc, now_ms);
                if ignored > 0 {
                    log::warn!("revocation list {}:{}: {ignored} key(s) are neither jti:<id> nor sub:<id>; ignored", st.name, rev.path);
                }
                l
            }
            Err(FetchError::NotFound) => {
                log::warn!("revocation list {}:{} not found; treating it as empty", st.name, rev.path);
                RevocationList::empty(now_ms)
            }
            Err(e) => {
                // Keep the last good list; the lease expires and another refresh follows.
                inc(self.metrics.revocation_error);
                log::warn!("revocation list {}:{} refresh failed (keeping the last good list): {e}", st.name, rev.path);
                return;
            }
        };
        let n = list.len();
        if hostcalls::set_shared_data(revocation::SHARED_KEY, Some(&list.encode()), None).is_err() {
            log::warn!("could not share the revocation list");
        }
        let _ = hostcalls::set_shared_data(revocation::LEASE_KEY, Some(&0u64.to_le_bytes()), None);
        if self.revoked.as_ref().map(|l| l.len()) != Some(n) {
            log::info!("revocation list {}:{}: {n} entr{}", st.name, rev.path, if n == 1 { "y" } else { "ies" });
        }
        self.revoked = Some(Rc::new(list));
        self.revoked_cas = None;
        inc(self.metrics.revocation_ok);
    }

    /// Periodic work on the root context.
    pub fn tick(&mut self) {
        let Some(cfg) = self.cfg.clone() else { return };
        let now_ms = host::now_ms();
        self.refresh_revocation(&cfg, now_ms);
        // Orphaned fetches: dispatch again, owned by the root this time.
        let orphans: Vec<usize> = self.inflight.iter().filter(|(_, f)| f.token.is_none()).map(|(s, _)| *s).collect();
        for slot in orphans {
            self.dispatch(&cfg, slot, 0);
        }
        // Waiters past their deadline get 503.
        let late: Vec<u32> = self.parked.iter().filter(|(_, p)| now_ms >= p.deadline_ms).map(|(c, _)| *c).collect();
        for ctx in late {
            let Some(p) = self.parked.remove(&ctx) else { continue };
            for f in self.inflight.values_mut() {
                f.waiters.retain(|w| *w != ctx);
            }
            if host::set_effective_context(ctx).is_ok() {
                let d = Denial::new(Code::SecretUnavailable, "the secret store did not answer in time").retry_after(5);
                let audit = Audit { decision: d.code.as_str(), ..p.audit };
                self.finish_deny(&audit, &d);
            }
        }
        let _ = host::set_effective_context(self.root_id);
    }
}

/// Dispatch the callout that reads `path` from store `st`, from the current context.
fn send(st: &keyward_core::config::Store, path: &str) -> Result<u32, proxy_wasm::types::Status> {
    let c = store::callout(st, path);
    let headers: Vec<(&str, &[u8])> = c.headers.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
    host::dispatch(&c.cluster, &headers, c.body.as_deref(), c.timeout_ms)
}

fn apply(ops: &[Op]) -> Result<(), proxy_wasm::types::Status> {
    for op in ops {
        match op {
            Op::Remove(h) => host::remove_request_header(h)?,
            Op::Set(h, v) => host::set_request_header(h, v.expose())?,
            Op::SetPath(p) => host::set_request_header(":path", p.expose())?,
        }
    }
    Ok(())
}
