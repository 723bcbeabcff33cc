//! Per-VM (per Envoy worker) state and the secret lifecycle's callout state machine.
//!
//! The lifecycle rules live in `keyward_core::secrets::slot_state` (pure, unit-tested); this is the glue. Each
//! slot's state (value, failure, fetch lease, vendor suspicion) is one record in Envoy shared data,
//! shared by every worker and updated with compare-and-swap. A request that needs a value that
//! must be fetched parks here, keyed by its context id. One worker of the process takes the
//! slot's fetch lease and dispatches the callout; the others follow, watching the shared record
//! on a fast tick. Callouts are always dispatched from the root context, so no stream owns them
//! and a client that leaves cancels nothing. When the answer arrives the record is updated and
//! every waiter is decided again under its own effective context: each ends in
//! `resume_http_request` or a local reply. The root's tick refreshes values in use before their
//! TTL ends (and retries while serving stale), and answers waiters past their deadline with 503.

use crate::host::{self, HostRequest};
use crate::metrics::{inc, Metrics};
use keyward_core::config::Config;
use keyward_core::credential::jwt::{HmacKey, Limits};
use keyward_core::credential::revocation::{self, RevocationList};
use keyward_core::credential::verified::VerifiedCache;
use keyward_core::engine::{self, Audit, Decision, Outcome, Secrets, Slot};
use keyward_core::inject::Op;
use keyward_core::policy::limits::{self, Table, Verdict};
use keyward_core::response::{Code, Denial};
use keyward_core::secrets::approle::{self, AuthState, Next};
use keyward_core::secrets::slot_state::{Failure, State, Timing, Use};
use keyward_core::secrets::store::{self, FetchError, Fetched};
use keyward_core::{inject::scrub, secret::Secret, wire::b64};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, MapType, Status};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

/// Extra time a parked request may wait beyond its store's timeout before the tick answers it.
const PARK_GRACE_MS: u64 = 1000;
/// A fetch lease outlives the callout's own timeout by this much.
const LEASE_GRACE_MS: u64 = 500;
/// Compare-and-swap attempts on a shared record before giving up (fail closed).
const LIMIT_CAS_TRIES: u32 = 64;
const STATE_CAS_TRIES: u32 = 16;
/// The tick: normally, and while requests wait for another worker's fetch.
pub const TICK: Duration = Duration::from_millis(200);
const FAST_TICK: Duration = Duration::from_millis(20);

pub struct Parked {
    slot: usize,
    deadline_ms: u64,
    audit: Audit,
    /// Already counted against its credential's limits: deciding again must not count it twice.
    admitted: bool,
}

/// What an allowed request was given.
struct Served {
    slot: usize,
    fetched_at_ms: u64,
    target: usize,
    data: Option<Rc<Fetched>>,
}

/// A slot's shared record as last decoded by this worker, keyed by the shared-data CAS.
struct Local {
    cas: u32,
    state: State,
    data: Option<Rc<Fetched>>,
    fetched_at_ms: u64,
    /// When this worker last compared it with shared data.
    checked_ms: u64,
}

/// A fresh value is compared with shared data at most this often on the request path: a
/// rotation or eviction by another worker is seen within this long (this worker's own writes at
/// once). Saves a hostcall and a copy of the record per request.
const RECHECK_MS: u64 = 100;

/// A store-held signing key, prepared once per fetched value (`None`: the value is unusable).
type PreparedKey = (Rc<Fetched>, Option<Rc<HmacKey>>);

/// What a callout token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callout {
    Slot(usize),
    Revocation,
    /// An AppRole login (false) or a token renewal (true) for a store.
    Auth {
        store: usize,
        renewal: bool,
    },
}

/// The token a store callout should carry.
enum Token {
    /// The store's own (`token_env`, or none needed).
    Configured,
    /// An AppRole session's token, and its generation.
    Session(Secret, u64),
    /// An AppRole store with no valid token yet: log in first.
    Missing,
}

/// A slot fetch waits with its fetch lease until a token is available.
const AWAITING_AUTH: u32 = 0;

#[derive(Default)]
pub struct Worker {
    pub cfg: Option<Rc<Config>>,
    pub metrics: Metrics,
    pub root_id: u32,
    timing: Option<Timing>,
    tokens: HashMap<u32, Callout>,
    /// Slots this worker is fetching (it holds their lease), with the callout token.
    fetching: HashMap<usize, u32>,
    /// Parked contexts per slot, and each parked context's details.
    waiters: HashMap<usize, Vec<u32>>,
    parked: HashMap<u32, Parked>,
    local: HashMap<usize, Local>,
    /// Prepared store-held signing keys, tagged with the value they came from.
    keys: HashMap<(usize, String), PreparedKey>,
    /// Response-scrubbing needles per target, tagged with the value they came from.
    needles: HashMap<usize, (Rc<Fetched>, Rc<Vec<Secret>>)>,
    /// Credentials this worker verified, with the key that did (no HMAC or parse on a repeat).
    verified: VerifiedCache,
    /// When this worker last served each slot (values in use are refreshed ahead of their TTL).
    used_at: HashMap<usize, u64>,
    /// Allowed requests: what they were given, for vendor 401/403 and response scrubbing.
    served: HashMap<u32, Served>,
    fast_tick: bool,
    /// The revocation list as last read from shared data, and that entry's CAS.
    revoked: Option<Rc<RevocationList>>,
    revoked_cas: Option<u32>,
    /// When this worker's revocation refresh was dispatched (0: none in flight).
    revocation_since_ms: u64,
    /// The AppRole session generation the revocation refresh used.
    revocation_gen: Option<u64>,
    /// Slots (fetch lease held) waiting for their store's login, per store.
    awaiting_auth: HashMap<usize, Vec<usize>>,
    /// Slot fetches in flight with an AppRole token: the session generation they used.
    fetch_gen: HashMap<usize, u64>,
    /// Slot fetches already retried once after a 403 and a fresh login.
    relogged: HashSet<usize>,
    /// Stores this worker is logging in to or renewing (it holds the lease).
    authing: HashSet<usize>,
}

/// A record kept in shared data and updated with compare-and-swap.
trait Record: Default {
    fn decode_record(b: &[u8]) -> Option<Self>;
    fn encode_record(&self) -> Vec<u8>;
}

impl Record for State {
    fn decode_record(b: &[u8]) -> Option<Self> {
        State::decode(b)
    }
    fn encode_record(&self) -> Vec<u8> {
        self.encode()
    }
}

impl Record for AuthState {
    fn decode_record(b: &[u8]) -> Option<Self> {
        AuthState::decode(b)
    }
    fn encode_record(&self) -> Vec<u8> {
        self.encode()
    }
}

/// Read-modify-write a shared record with compare-and-swap. `f` returns whether it changed
/// anything (nothing is written otherwise). `None`: the record could not be written.
fn update<R: Record>(key: &str, mut f: impl FnMut(&mut R) -> bool) -> Option<bool> {
    for _ in 0..STATE_CAS_TRIES {
        let (bytes, cas) = hostcalls::get_shared_data(key).unwrap_or_default();
        let mut st = bytes.as_deref().and_then(R::decode_record).unwrap_or_default();
        if !f(&mut st) {
            return Some(false);
        }
        match hostcalls::set_shared_data(key, Some(&st.encode_record()), cas) {
            Ok(()) => return Some(true),
            Err(Status::CasMismatch) => continue,
            Err(_) => return None,
        }
    }
    None
}

fn update_state(key: &str, f: impl FnMut(&mut State) -> bool) -> Option<bool> {
    update::<State>(key, f)
}

fn read_auth(key: &str) -> AuthState {
    let (bytes, _) = hostcalls::get_shared_data(key).unwrap_or_default();
    bytes.as_deref().and_then(AuthState::decode).unwrap_or_default()
}

/// Create every shared record (slots and limit shards) before any request can be served.
/// Envoy's shared data accepts any CAS for a key that does not exist yet, so two workers
/// creating the same record could both win; created here (the configuration canary on the main
/// thread runs first), a record exists before any worker competes for it.
pub fn create_shared_records(cfg: &Config) {
    let empty = Table::default().encode();
    for key in limits::shard_keys() {
        if let Ok((None, _)) = hostcalls::get_shared_data(&key) {
            let _ = hostcalls::set_shared_data(&key, Some(&empty), None);
        }
    }
    let empty = AuthState::default().encode();
    for key in cfg.stores.iter().filter_map(approle::shared_key) {
        if let Ok((None, _)) = hostcalls::get_shared_data(&key) {
            let _ = hostcalls::set_shared_data(&key, Some(&empty), None);
        }
    }
    let empty = State::default().encode();
    for slot in &cfg.slots {
        if let Ok((None, _)) = hostcalls::get_shared_data(&slot.cache_key) {
            let _ = hostcalls::set_shared_data(&slot.cache_key, Some(&empty), None);
        }
    }
}

/// `Secrets` over shared data, with a per-worker decode cache.
struct Cache<'a> {
    w: &'a mut Worker,
    cfg: &'a Config,
    now_ms: u64,
    /// This request was counted against its credential's limits.
    admitted: bool,
}

impl Worker {
    /// The slot's record, decoded once per shared-data CAS. A value that lacks a field the
    /// configuration needs (after a reload) counts as absent.
    fn local(&mut self, cfg: &Config, slot: usize) -> Option<&Local> {
        let spec = cfg.slots.get(slot)?;
        let (bytes, cas) = hostcalls::get_shared_data(&spec.cache_key).unwrap_or_default();
        let cas = cas?;
        if self.local.get(&slot).is_none_or(|l| l.cas != cas) {
            let mut state = bytes.as_deref().and_then(State::decode).unwrap_or_default();
            if state.entry.as_ref().is_some_and(|e| !spec.fields.iter().all(|f| e.data.covers(f))) {
                state.entry = None;
            }
            let fetched_at_ms = state.entry.as_ref().map_or(0, |e| e.fetched_at_ms);
            let data = state.entry.as_mut().map(|e| Rc::new(std::mem::take(&mut e.data)));
            self.local.insert(slot, Local { cas, state, data, fetched_at_ms, checked_ms: 0 });
        }
        self.local.get(&slot)
    }

    /// The slot's record for a request: a fresh value checked less than `RECHECK_MS` ago is
    /// used without reading shared data again.
    fn local_for_request(&mut self, cfg: &Config, slot: usize, now_ms: u64) -> Option<&Local> {
        let t = self.timing();
        let recent = self
            .local
            .get(&slot)
            .is_some_and(|l| l.data.is_some() && now_ms < l.checked_ms.saturating_add(RECHECK_MS) && l.state.classify(now_ms, &t) == Use::Fresh);
        if !recent {
            self.local(cfg, slot)?;
            if let Some(l) = self.local.get_mut(&slot) {
                l.checked_ms = now_ms;
            }
        }
        self.local.get(&slot)
    }

    /// This worker wrote the slot's shared record: the next request reads it again.
    fn touch(&mut self, slot: usize) {
        if let Some(l) = self.local.get_mut(&slot) {
            l.checked_ms = 0;
        }
    }

    fn timing(&self) -> Timing {
        self.timing.unwrap_or_else(|| Timing::new(300, 0))
    }
}

impl Cache<'_> {
    fn lookup(&mut self, slot: usize) -> Slot<Rc<Fetched>> {
        let t = self.w.timing();
        let now = self.now_ms;
        let Some(l) = self.w.local_for_request(self.cfg, slot, now) else { return Slot::Pending };
        let (use_, data) = (l.state.classify(now, &t), l.data.clone());
        match (use_, data) {
            (Use::Fresh, Some(d)) => {
                self.w.used_at.insert(slot, now);
                Slot::Ready(d)
            }
            (Use::Stale, Some(d)) => {
                self.w.used_at.insert(slot, now);
                Slot::Stale(d)
            }
            (Use::Failed, _) => Slot::Failed,
            _ => Slot::Pending,
        }
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

    fn verified(&mut self) -> Option<&mut VerifiedCache> {
        Some(&mut self.w.verified)
    }

    fn signing_key(&mut self, slot: usize, field: &str) -> Slot<Option<Rc<HmacKey>>> {
        let (f, stale) = match self.lookup(slot) {
            Slot::Ready(f) => (f, false),
            Slot::Stale(f) => (f, true),
            Slot::Pending => return Slot::Pending,
            Slot::Failed => return Slot::Failed,
        };
        if f.field(field).is_none() {
            // Not in the value (an unknown kid): nothing is cached per attacker-chosen kid.
            return if stale { Slot::Stale(None) } else { Slot::Ready(None) };
        }
        let k = (slot, field.to_string());
        let key = match self.w.keys.get(&k) {
            Some((src, key)) if Rc::ptr_eq(src, &f) => key.clone(),
            _ => {
                let key = f.field(field).and_then(Secret::expose_str).and_then(b64::key_decode).and_then(|bytes| HmacKey::new(&bytes).ok()).map(Rc::new);
                if key.is_none() && f.field(field).is_some() {
                    log::warn!("store-held signing key {field:?} is not base64 of at least 32 bytes");
                }
                self.w.keys.insert(k, (f, key.clone()));
                key
            }
        };
        if stale {
            Slot::Stale(key)
        } else {
            Slot::Ready(key)
        }
    }
}

fn record_audit(a: &Audit) {
    if let Some(v) = &a.subject {
        host::set_filter_state("keyward.subject", v);
    }
    if let Some(v) = &a.target {
        host::set_filter_state("keyward.target", v);
    }
    if let Some(v) = &a.jti {
        host::set_filter_state("keyward.jti", v);
    }
    if let Some(v) = &a.run {
        host::set_filter_state("keyward.run", v);
    }
    if !a.decision.is_empty() {
        host::set_filter_state("keyward.decision", a.decision);
    }
    if let Some(v) = a.cache {
        host::set_filter_state("keyward.cache", v);
    }
    if let Some(v) = &a.idempotency_key {
        host::set_filter_state("keyward.idempotency_key", v);
    }
    if let Some(v) = &a.secret_version {
        host::set_filter_state("keyward.secret_version", v);
    }
}

impl Worker {
    pub fn new(root_id: u32) -> Worker {
        Worker { root_id, ..Worker::default() }
    }

    pub fn configure(&mut self, cfg: Config) {
        // Remembered verifications name keys of the old configuration; target indices change.
        self.verified.clear();
        self.needles.clear();
        self.timing = Some(Timing::new(cfg.cache.ttl_s, cfg.cache.stale_if_error_s));
        self.cfg = Some(Rc::new(cfg));
    }

    /// Decide the request of context `ctx` (the effective context must already be `ctx`).
    /// `parked`: it had parked, so the answer is given by resuming or replying now; it keeps its
    /// deadline and whether it was already counted against its limits.
    pub fn run(&mut self, ctx: u32, parked: Option<&Parked>) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            // No valid configuration: fail closed.
            let d = Denial::new(Code::SecretUnavailable, "the gateway is not configured").retry_after(5);
            return self.finish_deny(&Audit { decision: d.code.as_str(), ..Audit::default() }, &d);
        };
        let resumed = parked.is_some();
        let now_ms = host::now_ms();
        let mut req = HostRequest::default();
        let (decision, admitted): (Decision, bool) = {
            let admitted = parked.is_some_and(|p| p.admitted);
            let mut cache = Cache { w: self, cfg: &cfg, now_ms, admitted };
            let d = engine::decide(&cfg, &mut req, &mut cache, (now_ms / 1000) as i64);
            (d, cache.admitted)
        };
        let mut audit = decision.audit;
        match decision.outcome {
            Outcome::Need(slot) => {
                let timeout = cfg.store_of(slot).map_or(2000, |s| u64::from(s.timeout_ms));
                let deadline_ms = parked.map_or(now_ms + timeout + PARK_GRACE_MS, |p| p.deadline_ms);
                self.parked.insert(ctx, Parked { slot, deadline_ms, audit, admitted });
                let w = self.waiters.entry(slot).or_default();
                if !w.contains(&ctx) {
                    w.push(ctx);
                }
                self.start_fetch(&cfg, slot, now_ms, Some(ctx));
                Action::Pause
            }
            Outcome::Deny(d) => self.finish_deny(&audit, &d),
            Outcome::Allow(ops) => {
                if resumed && audit.cache == Some("hit") {
                    audit.cache = Some("miss");
                }
                if apply(&ops, &mut req).is_err() {
                    // The request could not be rewritten safely: never forward it.
                    let d = Denial::new(Code::SecretUnavailable, "the upstream credential could not be applied").retry_after(5);
                    audit.decision = d.code.as_str();
                    return self.finish_deny(&audit, &d);
                }
                record_audit(&audit);
                inc(self.metrics.allowed);
                inc(match audit.cache {
                    Some("miss") => self.metrics.cache_miss,
                    Some("stale") => self.metrics.cache_stale,
                    _ => self.metrics.cache_hit,
                });
                if let Some((target, t)) = audit.target.as_deref().and_then(|t| cfg.target(t)) {
                    if let Some(l) = self.local.get(&t.slot) {
                        self.served.insert(ctx, Served { slot: t.slot, fetched_at_ms: l.fetched_at_ms, target, data: l.data.clone() });
                    }
                }
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

    /// Make sure `slot` is being fetched: by this worker if it can take the lease, else by the
    /// worker that holds it (this one then follows on the fast tick). `from` is the current
    /// stream context, if any: the callout is dispatched from the root context either way.
    fn start_fetch(&mut self, cfg: &Config, slot: usize, now_ms: u64, from: Option<u32>) {
        if self.fetching.contains_key(&slot) {
            return;
        }
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let lease_ms = u64::from(st.timeout_ms) + LEASE_GRACE_MS;
        self.touch(slot);
        match update_state(&spec.cache_key, |s| s.take_lease(now_ms, lease_ms)) {
            Some(true) => {}
            Some(false) => {
                // Another worker is fetching it: follow.
                self.set_fast_tick(from, true);
                return;
            }
            None => {
                log::warn!("could not take the fetch lease for {}:{}", st.name, spec.path);
                self.set_fast_tick(from, true);
                return;
            }
        }
        self.dispatch_slot(cfg, slot, now_ms, from);
    }

    /// Dispatch the fetch of `slot` (its lease is held), or queue it behind its store's login.
    fn dispatch_slot(&mut self, cfg: &Config, slot: usize, now_ms: u64, from: Option<u32>) {
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let store = spec.store;
        let session = match self.token_for(cfg, store, now_ms) {
            Token::Configured => None,
            Token::Session(t, generation) => {
                self.fetch_gen.insert(slot, generation);
                Some(t)
            }
            Token::Missing => {
                self.fetching.insert(slot, AWAITING_AUTH);
                let w = self.awaiting_auth.entry(store).or_default();
                if !w.contains(&slot) {
                    w.push(slot);
                }
                self.ensure_auth(cfg, store, now_ms, from);
                return;
            }
        };
        let sent = self.in_root(from, || send(st, &spec.path, session.as_ref()));
        match sent {
            Ok(token) => {
                self.tokens.insert(token, Callout::Slot(slot));
                self.fetching.insert(slot, token);
            }
            Err(e) => {
                log::warn!("store {} callout to cluster {:?} failed to start: {e:?}", st.name, st.cluster);
                self.complete(cfg, slot, Err(FetchError::Transient("callout not started".into())));
            }
        }
    }

    /// Run `f` (a dispatch) in the root context, so no stream owns the callout; then return to
    /// the stream context `from`, if any.
    fn in_root<R>(&self, from: Option<u32>, f: impl FnOnce() -> R) -> R {
        if from.is_some() && host::set_effective_context(self.root_id).is_err() {
            log::warn!("could not switch to the root context for a callout");
        }
        let r = f();
        if let Some(ctx) = from {
            let _ = host::set_effective_context(ctx);
        }
        r
    }

    /// The token for a callout to `store` now.
    fn token_for(&self, cfg: &Config, store: usize, now_ms: u64) -> Token {
        let Some(key) = cfg.stores.get(store).and_then(approle::shared_key) else { return Token::Configured };
        let st = read_auth(&key);
        match st.token(now_ms) {
            Some((t, generation)) => Token::Session(t.clone(), generation),
            None => Token::Missing,
        }
    }

    /// Log in to, or renew the token of, an AppRole store when due, unless another worker is
    /// already doing it (its lease is in the shared record).
    fn ensure_auth(&mut self, cfg: &Config, store: usize, now_ms: u64, from: Option<u32>) {
        if self.authing.contains(&store) {
            return;
        }
        let Some(st) = cfg.stores.get(store) else { return };
        let Some(key) = approle::shared_key(st) else { return };
        let lease_ms = u64::from(st.timeout_ms) + LEASE_GRACE_MS;
        let mut next = Next::Nothing;
        let mut token = None;
        let took = update::<AuthState>(&key, |a| {
            next = a.due(now_ms);
            token = a.token(now_ms).map(|(t, _)| t.clone());
            next != Next::Nothing && a.take_lease(now_ms, lease_ms)
        });
        if took != Some(true) {
            if !self.awaiting_auth.is_empty() {
                self.set_fast_tick(from, true);
            }
            return;
        }
        let renewal = next == Next::Renew;
        let callout = match (&token, renewal) {
            (Some(t), true) => Some(approle::renew_callout(st, t)),
            _ => approle::login_callout(st),
        };
        let Some(c) = callout else { return };
        let sent = self.in_root(from, || dispatch(&c));
        match sent {
            Ok(t) => {
                self.tokens.insert(t, Callout::Auth { store, renewal: renewal && token.is_some() });
                self.authing.insert(store);
            }
            Err(e) => {
                log::warn!("store {}: {} could not start: {e:?}", st.name, if renewal { "token renewal" } else { "AppRole login" });
                self.auth_done(cfg, store, renewal, Err(FetchError::Transient("callout not started".into())));
            }
        }
    }

    /// A login or renewal answered (or could not start): record it, then dispatch the fetches
    /// that waited for a token, or fail them.
    fn auth_done(&mut self, cfg: &Config, store: usize, renewal: bool, result: Result<approle::Grant, FetchError>) {
        self.authing.remove(&store);
        let Some(st) = cfg.stores.get(store) else { return };
        let Some(key) = approle::shared_key(st) else { return };
        let now_ms = host::now_ms();
        let what = if renewal { "token renewal" } else { "AppRole login" };
        match &result {
            Ok(g) => {
                inc(if renewal { self.metrics.vault_renew } else { self.metrics.vault_login });
                log::info!("store {}: {what} ok (lease {} s{})", st.name, g.lease_s, if g.renewable { ", renewable" } else { "" });
            }
            Err(e) => {
                inc(self.metrics.vault_auth_error);
                log::warn!("store {}: {what} failed: {e}", st.name);
            }
        }
        let failure = result.as_ref().err().map(ToString::to_string);
        let mut result = Some(result);
        if update::<AuthState>(&key, |a| {
            if let Some(r) = result.take() {
                a.record(r, renewal, now_ms);
            }
            true
        }) != Some(true)
        {
            log::warn!("store {}: could not share the vault session", st.name);
        }
        self.drain_auth(cfg, store, now_ms, failure);
    }

    /// Fetches waiting for `store`'s token: dispatch them if there is one now; fail them if the
    /// login just failed (`failure`); otherwise keep waiting.
    fn drain_auth(&mut self, cfg: &Config, store: usize, now_ms: u64, failure: Option<String>) {
        let has_token = matches!(self.token_for(cfg, store, now_ms), Token::Session(..));
        if !has_token && failure.is_none() {
            return;
        }
        for slot in self.awaiting_auth.remove(&store).unwrap_or_default() {
            self.fetching.remove(&slot);
            match &failure {
                Some(why) if !has_token => {
                    // Keyward's own login failed: that says nothing about the secret.
                    self.complete(cfg, slot, Err(FetchError::Transient(format!("vault login failed: {why}"))));
                }
                _ => self.dispatch_slot(cfg, slot, now_ms, None),
            }
        }
    }

    fn set_fast_tick(&mut self, from: Option<u32>, fast: bool) {
        if self.fast_tick == fast {
            return;
        }
        self.fast_tick = fast;
        if from.is_some() {
            let _ = host::set_effective_context(self.root_id);
        }
        let _ = hostcalls::set_tick_period(if fast { FAST_TICK } else { TICK });
        if let Some(ctx) = from {
            let _ = host::set_effective_context(ctx);
        }
    }

    /// A callout answered (always in the root context).
    pub fn on_callout(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let Some(kind) = self.tokens.remove(&token) else { return };
        let Some(cfg) = self.cfg.clone() else { return };
        let slot = match kind {
            Callout::Slot(slot) => slot,
            Callout::Revocation => return self.on_revocation(&cfg, num_headers, body_size),
            Callout::Auth { store, renewal } => {
                let (status, body) = host::callout_response(num_headers, body_size, store::MAX_BODY);
                let result = match body {
                    None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
                    Some(b) => approle::parse_grant(status, &b),
                };
                self.auth_done(&cfg, store, renewal, result);
                let _ = host::set_effective_context(self.root_id);
                return;
            }
        };
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let (status, body) = host::callout_response(num_headers, body_size, store::MAX_BODY);
        let result = match body {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
            Some(b) if spec.whole => store::parse_keyset(st, status, &b),
            Some(b) => store::parse_response(st, status, &b, &spec.fields),
        };
        let generation = self.fetch_gen.remove(&slot);
        if let (Err(FetchError::Denied(_)), Some(g)) = (&result, generation) {
            // The store refused the AppRole token (expired or revoked): log in again and fetch
            // once more; a second refusal is the store's word on the secret.
            if self.relogged.insert(slot) {
                log::warn!("store {} refused its token reading {}; logging in again", st.name, spec.path);
                self.invalidate_session(&cfg, spec.store, g);
                let now_ms = host::now_ms();
                self.fetching.remove(&slot);
                self.dispatch_slot(&cfg, slot, now_ms, None);
                let _ = host::set_effective_context(self.root_id);
                return;
            }
        }
        self.complete(&cfg, slot, result);
        let _ = host::set_effective_context(self.root_id);
    }

    /// Record a fetch's outcome in the shared record, then decide this worker's waiters again.
    fn complete(&mut self, cfg: &Config, slot: usize, result: Result<Fetched, FetchError>) {
        self.fetching.remove(&slot);
        self.relogged.remove(&slot);
        self.fetch_gen.remove(&slot);
        let now_ms = host::now_ms();
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let outcome = match result {
            Ok(fetched) => {
                inc(self.metrics.fetch_ok);
                log::info!("fetched {}:{} (version {})", st.name, spec.path, fetched.version.as_deref().unwrap_or("-"));
                for p in &fetched.problems {
                    log::warn!("{}:{}: {p}; targets needing it answer 503", st.name, spec.path);
                }
                Ok(fetched)
            }
            Err(e) => {
                inc(self.metrics.fetch_error);
                let transient = e.may_serve_stale();
                let what = if transient { "serving stale within stale_if_error_s if cached" } else { "evicted" };
                log::warn!("fetching {}:{} failed: {e}; {what}", st.name, spec.path);
                Err(Failure { at_ms: now_ms, transient })
            }
        };
        self.touch(slot);
        if update_state(&spec.cache_key, |s| {
            s.record(outcome.clone(), now_ms);
            true
        }) != Some(true)
        {
            log::warn!("could not write the shared cache for {}:{}", st.name, spec.path);
        }
        self.wake(slot);
    }

    /// Drop the AppRole session of `generation` after the store refused it.
    fn invalidate_session(&mut self, cfg: &Config, store: usize, generation: u64) {
        let Some(key) = cfg.stores.get(store).and_then(approle::shared_key) else { return };
        let _ = update::<AuthState>(&key, |a| a.invalidate(generation));
    }

    /// Decide every request parked on `slot` again.
    fn wake(&mut self, slot: usize) {
        for ctx in self.waiters.remove(&slot).unwrap_or_default() {
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
        let _ = self.run(ctx, Some(&p));
    }

    /// The vendor answered a request this worker allowed. A 401 or 403 marks the value it was
    /// given as suspect (at most once per few seconds per value): the next request fetches it
    /// again, so a key rotated in the store is used at once. The request itself is not retried.
    pub fn on_response(&mut self, ctx: u32) {
        let Some(served) = self.served.remove(&ctx) else { return };
        let Some(cfg) = self.cfg.clone() else { return };
        let Ok(headers) = hostcalls::get_map_bytes(MapType::HttpResponseHeaders) else {
            // Unreadable, so unscrubbable: fail closed rather than risk handing over a secret.
            log::warn!("could not read the vendor's response headers; resetting the stream");
            let _ = hostcalls::reset_http_request();
            return;
        };
        self.scrub(&cfg, &served, &headers);
        let (slot, fetched_at_ms) = (served.slot, served.fetched_at_ms);
        let status = headers.iter().find(|(k, _)| k == ":status").map(|(_, v)| v.as_slice());
        if !matches!(status, Some(b"401") | Some(b"403")) {
            return;
        }
        let Some(spec) = cfg.slots.get(slot) else { return };
        let t = self.timing();
        let now_ms = host::now_ms();
        self.touch(slot);
        if update_state(&spec.cache_key, |s| s.mark_suspect(fetched_at_ms, now_ms, &t)) == Some(true) {
            inc(self.metrics.vendor_rejected);
            let store = cfg.store_of(slot).map_or("?", |s| s.name.as_str());
            log::warn!(
                "the vendor rejected the key from {store}:{} (HTTP {}); fetching it again",
                spec.path,
                String::from_utf8_lossy(status.unwrap_or_default())
            );
        }
    }

    /// Remove every response header that reflects the secret this request was given. If one
    /// cannot be removed, the stream is reset: the secret never reaches the workload.
    fn scrub(&mut self, cfg: &Config, served: &Served, headers: &[(String, Vec<u8>)]) {
        let (Some(t), Some(data)) = (cfg.targets.get(served.target), served.data.as_ref()) else { return };
        // The forms of the secret to look for, computed once per target and value.
        let needles = match self.needles.get(&served.target) {
            Some((src, n)) if Rc::ptr_eq(src, data) => n.clone(),
            _ => {
                let n = Rc::new(scrub::needles(t, data));
                self.needles.insert(served.target, (data.clone(), n.clone()));
                n
            }
        };
        let remove = scrub::headers_to_remove(&needles, headers);
        if remove.is_empty() {
            return;
        }
        inc(self.metrics.response_scrubbed);
        log::warn!("target {}: the vendor reflected the upstream secret in response header(s) {}; removed", t.name, remove.join(", "));
        for name in &remove {
            if hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, None).is_err() {
                log::warn!("could not remove response header {name}; resetting the stream");
                let _ = hostcalls::reset_http_request();
                return;
            }
        }
    }

    /// The stream of `ctx` ended.
    pub fn forget(&mut self, ctx: u32) {
        self.served.remove(&ctx);
        if let Some(p) = self.parked.remove(&ctx) {
            if let Some(w) = self.waiters.get_mut(&p.slot) {
                w.retain(|c| *c != ctx);
            }
        }
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
        let session = match self.token_for(cfg, rev.store, now_ms) {
            Token::Configured => None,
            Token::Session(t, generation) => Some((t, generation)),
            Token::Missing => return self.ensure_auth(cfg, rev.store, now_ms, None),
        };
        let (lease, cas) = hostcalls::get_shared_data(revocation::LEASE_KEY).unwrap_or_default();
        if !revocation::lease_free(lease.as_deref(), now_ms) {
            return;
        }
        let until = now_ms + u64::from(st.timeout_ms) + 1000;
        if hostcalls::set_shared_data(revocation::LEASE_KEY, Some(&until.to_le_bytes()), cas).is_err() {
            return; // another worker took it
        }
        self.revocation_gen = session.as_ref().map(|(_, g)| *g);
        match send(st, &rev.path, session.as_ref().map(|(t, _)| t)) {
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
                if let (FetchError::Denied(_), Some(g)) = (&e, self.revocation_gen) {
                    self.invalidate_session(cfg, rev.store, g);
                }
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
        // AppRole sessions: renew (or log in again) ahead of expiry; fetches waiting for a
        // token another worker is getting go out as soon as it is shared.
        for (store, st) in cfg.stores.iter().enumerate() {
            let Some(key) = approle::shared_key(st) else { continue };
            let waiting = self.awaiting_auth.contains_key(&store);
            if waiting || read_auth(&key).session.is_some() {
                self.ensure_auth(&cfg, store, now_ms, None);
            }
            if waiting {
                self.drain_auth(&cfg, store, now_ms, None);
            }
        }
        self.refresh_revocation(&cfg, now_ms);
        // Followers: when another worker's fetch lands (or its lease lapses), decide again.
        let following: Vec<usize> = self.waiters.keys().filter(|s| !self.fetching.contains_key(s)).copied().collect();
        for slot in following {
            let Some(spec) = cfg.slots.get(slot) else { continue };
            let cas = hostcalls::get_shared_data(&spec.cache_key).ok().and_then(|(_, c)| c);
            let changed = cas.is_none() || self.local.get(&slot).is_none_or(|l| Some(l.cas) != cas);
            let lapsed = self.local(&cfg, slot).is_none_or(|l| !l.state.lease_held(now_ms));
            if changed || lapsed {
                self.wake(slot);
            }
        }
        // Values in use: refresh ahead of the TTL, after a vendor rejection, and while stale.
        let t = self.timing();
        let in_use: Vec<usize> =
            self.used_at.iter().filter(|(s, at)| now_ms < at.saturating_add(t.ttl_ms) && !self.fetching.contains_key(s)).map(|(s, _)| *s).collect();
        for slot in in_use {
            if self.local(&cfg, slot).is_some_and(|l| l.state.refresh_due(now_ms, &t)) {
                self.start_fetch(&cfg, slot, now_ms, None);
            }
        }
        self.used_at.retain(|_, at| now_ms < at.saturating_add(t.ttl_ms));
        // Waiters past their deadline get 503.
        let late: Vec<u32> = self.parked.iter().filter(|(_, p)| now_ms >= p.deadline_ms).map(|(c, _)| *c).collect();
        for ctx in late {
            let Some(p) = self.parked.remove(&ctx) else { continue };
            if let Some(w) = self.waiters.get_mut(&p.slot) {
                w.retain(|c| *c != ctx);
            }
            if host::set_effective_context(ctx).is_ok() {
                let d = Denial::new(Code::SecretUnavailable, "the secret store did not answer in time").retry_after(5);
                let audit = Audit { decision: d.code.as_str(), ..p.audit };
                self.finish_deny(&audit, &d);
            }
        }
        self.waiters.retain(|_, w| !w.is_empty());
        let _ = host::set_effective_context(self.root_id);
        let following = self.waiters.keys().any(|s| !self.fetching.contains_key(s)) || !self.awaiting_auth.is_empty();
        self.set_fast_tick(None, following);
    }
}

/// Dispatch the callout that reads `path` from store `st`, from the current context.
fn send(st: &keyward_core::config::Store, path: &str, session: Option<&Secret>) -> Result<u32, proxy_wasm::types::Status> {
    dispatch(&store::callout(st, path, session))
}

fn dispatch(c: &store::Callout) -> Result<u32, proxy_wasm::types::Status> {
    let headers: Vec<(&str, &[u8])> = c.headers.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
    host::dispatch(&c.cluster, &headers, c.body.as_deref(), c.timeout_ms)
}

/// Rewrite the request. A header the request does not carry (as read for the decision) needs
/// no removal hostcall.
fn apply(ops: &[Op], req: &mut HostRequest) -> Result<(), proxy_wasm::types::Status> {
    for op in ops {
        match op {
            Op::Remove(h) => {
                if req.carries(h) {
                    host::remove_request_header(h)?;
                }
            }
            Op::Set(h, v) => host::set_request_header(h, v.expose())?,
            Op::SetPath(p) => host::set_request_header(":path", p.expose())?,
        }
    }
    Ok(())
}
