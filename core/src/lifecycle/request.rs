//! One request through the pipeline, against the cache and the host: decide it (parking it when a
//! secret must be fetched), rewrite it or answer it, and look at the vendor's response.

use super::ledger::Need;
use super::state::{Parked, Pricing, Served, Stream, Wait};
use super::{limits, Lifecycle, PARK_GRACE_MS};
use crate::config::Config;
use crate::credential::jwt::HmacKey;
use crate::credential::verified::VerifiedCache;
use crate::engine::{self, Admitted, Decision, Entry, Holder, Lookup, Outcome, Request, Reservation, Secrets, Stage};
use crate::host::{Action, ContextId, Headers, Host, HostError};
use crate::inject::{scrub, Op};
use crate::ledger::{Account, Amounts, Caps, Ledger};
use crate::policy::limits::{Charge, Limits, Verdict};
use crate::record::{Audit, Family, Metric};
use crate::response::{Code, Denial};
use crate::secret::Secret;
use crate::secrets::slot_state::Use;
use crate::secrets::store::Fetched;
use crate::wire::{b64, pairs};
use std::rc::Rc;

/// The request as the engine sees it, read from the host once: the header map (`Err`: it could
/// not be read, so every question about it fails closed) and the route's keyward metadata.
pub(super) struct HostRequest {
    headers: Result<Headers, ()>,
    target: Option<String>,
    prefix: Option<String>,
    /// `{"endpoint": ...}`: a route the filter answers itself.
    endpoint: Option<String>,
}

impl HostRequest {
    pub(super) fn read(host: &mut impl Host) -> HostRequest {
        let headers = host.request_headers().map_err(|_| ());
        // Metadata that does not decode names no target (403 `unknown_target`).
        let meta = host.route_metadata().unwrap_or_default();
        let Some(p) = pairs::decode(&meta) else {
            return HostRequest { headers, target: None, prefix: None, endpoint: None };
        };
        let get = |k: &str| pairs::get(&p, k).map(str::to_string);
        HostRequest { headers, target: get("target"), prefix: get("prefix"), endpoint: get("endpoint") }
    }

    /// Does the request carry this header? Unknown (the map could not be read): yes.
    fn carries(&self, name: &str) -> bool {
        match &self.headers {
            Ok(all) => all.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)),
            Err(()) => true,
        }
    }
}

impl Request for HostRequest {
    fn method(&mut self) -> Option<String> {
        self.header(":method").and_then(|b| String::from_utf8(b).ok())
    }
    fn path(&mut self) -> Option<String> {
        self.header(":path").and_then(|b| String::from_utf8(b).ok())
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        let all = self.headers.as_ref().ok()?;
        all.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>> {
        match &self.headers {
            Ok(all) => all.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect(),
            // Fail closed: an unreadable header map counts as a duplicate.
            Err(()) => vec![Vec::new(), Vec::new()],
        }
    }
    fn headers(&mut self) -> &[(String, Vec<u8>)] {
        self.headers.as_deref().unwrap_or(&[])
    }
    fn route_target(&mut self) -> Option<String> {
        self.target.clone()
    }
    fn route_prefix(&mut self) -> Option<String> {
        self.prefix.clone()
    }
}

/// `engine::Secrets` over the shared cache, for one request.
pub(super) struct SharedSecrets<'a, H: Host> {
    pub(super) lc: &'a mut Lifecycle,
    pub(super) host: &'a mut H,
    pub(super) now_ms: u64,
    /// The entries this request was already counted in before it parked (asked again in the
    /// same order, they answer as they did).
    pub(super) prior: Vec<Admitted>,
    /// Every entry it is counted in so far, in this decision (the prior ones first).
    pub(super) made: Vec<Admitted>,
}

impl<'a, H: Host> SharedSecrets<'a, H> {
    pub(super) fn new(lc: &'a mut Lifecycle, host: &'a mut H, now_ms: u64) -> SharedSecrets<'a, H> {
        SharedSecrets { lc, host, now_ms, prior: Vec::new(), made: Vec::new() }
    }

    pub(super) fn resumed(lc: &'a mut Lifecycle, host: &'a mut H, now_ms: u64, prior: Vec<Admitted>) -> SharedSecrets<'a, H> {
        SharedSecrets { lc, host, now_ms, prior, made: Vec::new() }
    }

    /// One entry in this Envoy's limit shards (no ledger, or a credential's `rpm`).
    fn local(&mut self, key_id: u64, jti: &str, lim: &Limits, keep_until_s: i64, charge: Option<&Charge>) -> Admitted {
        let verdict = limits::admit_entry(self.host, key_id, jti, lim, keep_until_s, self.now_ms / 1000, charge);
        Admitted { verdict, holder: Some(Holder::Local { key_id, jti: jti.to_string() }) }
    }

    /// One entry in the fleet ledger (a credential's `rpm` in this Envoy's shards).
    fn fleet(&mut self, ledger: &Ledger, entry: &Entry, charge: Option<&Charge>) -> Admitted {
        let now_s = self.now_ms / 1000;
        let cost = charge.map_or(0, |c| c.cost);
        match *entry {
            Entry::Credential { key_id, jti, lim, keep_until_s, stage: Stage::Rate } => {
                if lim.rpm.is_none() {
                    return Admitted::admit();
                }
                // The rate counts in this Envoy only; what it counted stays (the request was made).
                let rpm = Limits { rpm: lim.rpm, total: None, spend: None };
                Admitted { holder: None, ..self.local(key_id, jti, &rpm, keep_until_s, None) }
            }
            Entry::Credential { key_id, jti, lim, keep_until_s, stage } => {
                let caps = Caps { spend: lim.spend, count: lim.total };
                let keep = u64::try_from(keep_until_s).unwrap_or(0);
                let account = Account::credential(key_id, jti, caps, keep);
                let (want, direct) = match stage {
                    Stage::Count => (Amounts { spend: 0, count: u64::from(caps.count.is_some()) }, None),
                    _ if caps.spend.is_none() => (Amounts::default(), None),
                    _ => {
                        // A charge with an Idempotency-Key is made directly with its retry mark, so
                        // that its retry on any gateway is recognised; while the account holds
                        // too many marks to read back, it is taken from the slice (a retry is
                        // then charged again: over-counted, never under-counted).
                        let marks_ok = self.lc.ledger_marks_room(&account);
                        let direct = charge
                            .and_then(|c| c.retry)
                            .filter(|_| cost > 0 && marks_ok)
                            .map(|k| (super::ledger::retry_mark(&k), keep.min(now_s + crate::policy::limits::RETRY_WINDOW_S)));
                        (Amounts { spend: cost, count: 0 }, direct)
                    }
                };
                if want.is_zero() {
                    // Nothing to count here (a free request on a spend-capped credential is still
                    // reserved: at nothing).
                    let reserved = stage == Stage::Spend && charge.is_some() && caps.spend.is_some();
                    return Admitted { verdict: if reserved { Verdict::Reserved } else { Verdict::Admit }, holder: None };
                }
                let need = Need { account, want, direct, budget: false, ledger };
                let ctx = self.lc.current;
                self.lc.ledger_admit(self.host, ctx, &need, self.now_ms)
            }
            Entry::Budget(i) => {
                let Some(b) = ledger.budgets.get(i) else { return Admitted::admit() };
                let want = Amounts { spend: if b.spend.is_some() { cost } else { 0 }, count: u64::from(b.requests.is_some()) };
                if want.is_zero() {
                    return Admitted::admit();
                }
                let (account, _) = Account::budget(b, now_s);
                let need = Need { account, want, direct: None, budget: true, ledger };
                let ctx = self.lc.current;
                let a = self.lc.ledger_admit(self.host, ctx, &need, self.now_ms);
                if a.ok() && want.spend > 0 {
                    self.host.count(Family::BudgetSpend, &[&b.name], want.spend);
                }
                a
            }
        }
    }

    fn lookup(&mut self, slot: usize) -> Lookup<Rc<Fetched>> {
        let t = self.lc.timing;
        let now = self.now_ms;
        let Some(l) = self.lc.local_for_request(self.host, slot, now) else { return Lookup::Pending };
        let (use_, data) = (l.state.classify(now, &t), l.data.clone());
        let found = match (use_, data) {
            (Use::Fresh, Some(d)) => Lookup::Ready(d),
            (Use::Stale, Some(d)) => Lookup::Stale(d),
            (Use::Failed, _) => return Lookup::Failed,
            _ => return Lookup::Pending,
        };
        if let Some(s) = self.lc.slots.get_mut(slot) {
            s.used_at_ms = Some(now);
        }
        found
    }
}

impl<H: Host> Secrets for SharedSecrets<'_, H> {
    fn secret(&mut self, slot: usize) -> Lookup<Rc<Fetched>> {
        self.lookup(slot)
    }

    fn revoked(&mut self, jti: &str, sub: &str) -> Lookup<bool> {
        self.lc.revocation_lookup(self.host, jti, sub, self.now_ms)
    }

    /// Count the request (and reserve its charge) in one entry, unless this same request was
    /// counted there before it parked.
    fn admit(&mut self, entry: &Entry, charge: Option<&Charge>) -> Admitted {
        if let Some(a) = self.prior.get(self.made.len()).cloned() {
            self.made.push(a.clone());
            return a;
        }
        let a = match (self.lc.cfg.as_ref().and_then(|c| c.ledger.clone()), entry) {
            (Some(ledger), _) => self.fleet(&ledger, entry, charge),
            (None, Entry::Credential { key_id, jti, lim, keep_until_s, stage: Stage::Rate }) => self.local(*key_id, jti, lim, *keep_until_s, charge),
            (None, _) => Admitted::admit(),
        };
        if a.ok() {
            self.made.push(a.clone());
        }
        a
    }

    fn release(&mut self, holder: &Holder, charge: &Charge) {
        match holder {
            Holder::Local { key_id, jti } => {
                limits::refund_entry(self.host, *key_id, jti, charge);
            }
            Holder::Ledger { .. } => {
                if let Some(ledger) = self.lc.cfg.as_ref().and_then(|c| c.ledger.clone()) {
                    self.lc.ledger_release(self.host, &ledger, holder);
                }
            }
        }
    }

    fn verified(&mut self) -> Option<&mut VerifiedCache> {
        Some(&mut self.lc.verified)
    }

    fn signing_key(&mut self, slot: usize, field: &str) -> Lookup<Option<Rc<HmacKey>>> {
        let (f, stale) = match self.lookup(slot) {
            Lookup::Ready(f) => (f, false),
            Lookup::Stale(f) => (f, true),
            Lookup::Pending => return Lookup::Pending,
            Lookup::Failed => return Lookup::Failed,
        };
        if f.field(field).is_none() {
            // Not in the value (an unknown kid): nothing is cached per attacker-chosen kid.
            return if stale { Lookup::Stale(None) } else { Lookup::Ready(None) };
        }
        let Some(cache) = self.lc.slots.get_mut(slot) else { return Lookup::Failed };
        let key = match cache.keys.get(field) {
            Some((src, key)) if Rc::ptr_eq(src, &f) => key.clone(),
            _ => {
                let key = f.field(field).and_then(Secret::expose_str).and_then(b64::key_decode).and_then(|bytes| HmacKey::new(&bytes).ok()).map(Rc::new);
                if key.is_none() {
                    log::warn!("store-held signing key {field:?} is not base64 of at least 32 bytes");
                }
                cache.keys.insert(field.to_string(), (f, key.clone()));
                key
            }
        };
        if stale {
            Lookup::Stale(key)
        } else {
            Lookup::Ready(key)
        }
    }
}

impl Lifecycle {
    /// Decide the request of `ctx` (the effective context is `ctx`). `parked`: it had parked, so
    /// it is answered by resuming or replying now; it keeps its deadline and whether it was
    /// already counted against its limits. Every outcome leaves the stream in one state.
    pub(super) fn decide(&mut self, host: &mut impl Host, ctx: ContextId, parked: Option<Parked>) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            // No valid configuration: fail closed.
            let d = Denial::new(Code::SecretUnavailable, "the gateway is not configured").retry_after(5);
            let started_us = parked.map_or_else(|| host.now_us(), |p| p.started_us);
            return self.deny(host, ctx, &Audit { decision: d.code.as_str(), ..Audit::default() }, &d, started_us);
        };
        let resumed = parked.is_some();
        // One clock read: the decision's time and, for a new request, when it started.
        let now_us = host.now_us();
        let started_us = parked.as_ref().map_or(now_us, |p| p.started_us);
        let now_ms = now_us / 1000;
        let mut req = HostRequest::read(host);
        if let Some(name) = req.endpoint.take() {
            return self.answer_endpoint(host, &name, now_ms);
        }
        let prior = parked.as_ref().map_or_else(Vec::new, |p| p.admitted.clone());
        let body_end = parked.as_ref().and_then(|p| p.body_end);
        let (decision, admitted): (Decision, Vec<Admitted>) = {
            let mut secrets = SharedSecrets::resumed(self, host, now_ms, prior);
            let d = engine::decide(&cfg, &mut req, &mut secrets, (now_ms / 1000) as i64);
            (d, secrets.made)
        };
        let mut audit = decision.audit;
        let reservation = decision.reservation;
        match decision.outcome {
            Outcome::Need(slot) => {
                if !resumed {
                    host.observe(Family::ColdUs, &["park"], host.now_us().saturating_sub(started_us));
                }
                let timeout = cfg.store_of(slot).map_or(2000, |s| u64::from(s.timeout_ms));
                let deadline_ms = parked.map_or(now_ms + timeout + PARK_GRACE_MS, |p| p.deadline_ms);
                self.streams.insert(ctx, Stream::Parked(Box::new(Parked { wait: Wait::Secret(slot), deadline_ms, audit, admitted, started_us, body_end })));
                self.start_fetch(host, slot);
                Action::Pause
            }
            Outcome::NeedRevocation => {
                let timeout = cfg.revocation.as_ref().and_then(|r| cfg.stores.get(r.store)).map_or(2000, |s| u64::from(s.timeout_ms));
                let deadline_ms = parked.map_or(now_ms + timeout + PARK_GRACE_MS, |p| p.deadline_ms);
                self.streams.insert(ctx, Stream::Parked(Box::new(Parked { wait: Wait::Revocation, deadline_ms, audit, admitted, started_us, body_end })));
                if self.in_root {
                    self.tick_revocation(host, now_ms);
                } else {
                    self.want_root(host);
                }
                Action::Pause
            }
            Outcome::NeedLedger(account) => {
                let timeout = cfg.ledger.as_ref().map_or(1000, |l| u64::from(l.timeout_ms));
                let deadline_ms = parked.map_or(now_ms + timeout + PARK_GRACE_MS, |p| p.deadline_ms);
                self.streams.insert(ctx, Stream::Parked(Box::new(Parked { wait: Wait::Ledger(account), deadline_ms, audit, admitted, started_us, body_end })));
                Action::Pause
            }
            Outcome::Deny(d) => self.deny(host, ctx, &audit, &d, started_us),
            Outcome::Allow(ops) => {
                if resumed && audit.cache == Some("hit") {
                    audit.cache = Some("miss");
                }
                if apply(&ops, &req, host).is_err() {
                    // The request could not be rewritten safely: never forward it.
                    if let Some(r) = &reservation {
                        self.release_reservation(host, r);
                    }
                    let d = Denial::new(Code::SecretUnavailable, "the upstream credential could not be applied").retry_after(5);
                    audit.decision = d.code.as_str();
                    return self.deny(host, ctx, &audit, &d, started_us);
                }
                let served = self.served(&cfg, &audit, reservation);
                if let Some(deferred) = decision.deferred {
                    // Its cost is in the body: decided (and recorded) at the body's end. Who asked
                    // is recorded now, so a request that never ends is in the access log too.
                    write_who(host, &audit);
                    let header_us = host.now_us().saturating_sub(started_us);
                    let pricing = Box::new(Pricing {
                        deferred,
                        audit,
                        generation: self.generation,
                        header_us,
                        waiting: None,
                        body: None,
                        admitted: Vec::new(),
                        deadline_ms: 0,
                    });
                    self.streams.insert(ctx, Stream::Pricing { pricing, served });
                    if let Some(size) = body_end {
                        // Its (empty) body ended while it was parked: price it now.
                        if self.price_body(host, ctx, Some(size), true) == Action::Pause {
                            return Action::Pause; // answered
                        }
                    }
                    return self.go_on(host, resumed);
                }
                record_allowed(host, &audit, served.reservation.as_ref(), started_us);
                self.streams.insert(ctx, Stream::Allowed(served));
                self.go_on(host, resumed)
            }
        }
    }

    /// Let an allowed request go on: a parked one is resumed, one being decided continues.
    pub(super) fn go_on(&mut self, host: &mut impl Host, resumed: bool) -> Action {
        if resumed {
            if host.resume().is_err() {
                log::warn!("could not resume a request");
            }
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// Refuse the request of `ctx` (the current stream) and remember that it was answered.
    pub(super) fn deny(&mut self, host: &mut impl Host, ctx: ContextId, audit: &Audit, d: &Denial, started_us: u64) -> Action {
        self.streams.insert(ctx, Stream::Answered);
        finish_deny(host, audit, d, started_us)
    }

    /// What an allowed request of `audit.target` is given, from this worker's copy of its slot.
    fn served(&self, cfg: &Rc<Config>, audit: &Audit, reservation: Option<Reservation>) -> Served {
        let (target, slot) = audit.target.as_deref().and_then(|t| cfg.target(t)).map_or((usize::MAX, usize::MAX), |(i, t)| (i, t.slot));
        let local = self.slots.get(slot).and_then(|s| s.local.as_ref());
        Served { cfg: cfg.clone(), slot, fetched_at_ms: local.map_or(0, |l| l.fetched_at_ms), target, data: local.and_then(|l| l.data.clone()), reservation }
    }

    /// Decide a parked request again, under its own context (root events only).
    pub(super) fn resume(&mut self, host: &mut impl Host, ctx: ContextId) {
        let Some(Stream::Parked(p)) = self.streams.remove(&ctx) else { return };
        if self.enter(host, ctx).is_err() {
            self.abandon(host, ctx, &p.admitted);
            return; // the stream has gone
        }
        let _ = self.decide(host, ctx, Some(*p));
    }

    /// Requests parked past their deadline get 503.
    pub(super) fn expire_parked(&mut self, host: &mut impl Host, now_ms: u64) {
        let mut late: Vec<ContextId> =
            self.streams.iter().filter(|(_, s)| matches!(s, Stream::Parked(p) if now_ms >= p.deadline_ms)).map(|(c, _)| *c).collect();
        late.sort_unstable();
        for ctx in late {
            let Some(Stream::Parked(p)) = self.streams.remove(&ctx) else { continue };
            self.abandon(host, ctx, &p.admitted);
            if self.enter(host, ctx).is_ok() {
                let why = match p.wait {
                    Wait::Ledger(_) => "the spend ledger did not answer in time",
                    _ => "the secret store did not answer in time",
                };
                let d = Denial::new(Code::SecretUnavailable, why).retry_after(5);
                let audit = Audit { decision: d.code.as_str(), ..p.audit };
                self.deny(host, ctx, &audit, &d, p.started_us);
            }
        }
    }

    /// The stream of `ctx` ended. A fetch it started goes on: the root owns it. What it was
    /// counted in while it waited goes back.
    pub(super) fn forget(&mut self, host: &mut impl Host, ctx: ContextId) {
        match self.streams.remove(&ctx) {
            Some(Stream::Parked(p)) => self.abandon(host, ctx, &p.admitted),
            Some(Stream::Pricing { pricing, .. }) => self.abandon(host, ctx, &pricing.admitted),
            _ => {}
        }
    }

    /// What an allowed request of `ctx` was given.
    pub(super) fn allowed(&self, ctx: ContextId) -> Option<&Served> {
        match self.streams.get(&ctx) {
            Some(Stream::Allowed(s)) => Some(s),
            _ => None,
        }
    }

    /// The vendor answered a request this worker allowed: scrub the secret from its headers. A
    /// 401 or 403 marks the value it was given as suspect (at most once per few seconds per
    /// value): the next request fetches it again, so a key rotated in the store is used at once.
    /// The request itself is not retried.
    pub(super) fn on_response(&mut self, host: &mut impl Host, ctx: ContextId) {
        // Kept until the stream ends: its trailers are scrubbed too.
        let Some(served) = self.allowed(ctx).cloned() else { return };
        let Ok(headers) = host.response_headers() else {
            // Unreadable, so unscrubbable: fail closed rather than risk handing over a secret.
            log::warn!("could not read the vendor's response headers; resetting the stream");
            host.reset();
            return;
        };
        if !self.scrub(host, &served, &headers, Part::Headers) {
            return;
        }
        let status = headers.iter().find(|(k, _)| k == ":status").map(|(_, v)| v.as_slice());
        if served.reservation.is_some() {
            self.refund_if_due(host, ctx, status);
        }
        if !matches!(status, Some(b"401") | Some(b"403")) {
            return;
        }
        // The configuration may have changed since: its slots are this configuration's.
        if !self.cfg.as_ref().is_some_and(|c| Rc::ptr_eq(c, &served.cfg)) {
            return;
        }
        let cfg = served.cfg.clone();
        let (Some(spec), Some(key)) = (cfg.slots.get(served.slot), self.names.secrets.get(served.slot).cloned()) else { return };
        let t = self.timing;
        let now_ms = host.now_ms();
        if let Some(l) = self.slots.get_mut(served.slot).and_then(|s| s.local.as_mut()) {
            l.checked_ms = 0;
        }
        if super::shared::update::<crate::secrets::slot_state::SlotState>(host, &key, |s| s.mark_suspect(served.fetched_at_ms, now_ms, &t)) == Some(true) {
            host.metric(Metric::VendorRejected);
            let store = cfg.store_of(served.slot).map_or("?", |s| s.name.as_str());
            log::warn!(
                "the vendor rejected the key from {store}:{} (HTTP {}); fetching it again",
                spec.path,
                String::from_utf8_lossy(status.unwrap_or_default())
            );
        }
    }

    /// The vendor's response trailers: scrubbed like its headers.
    pub(super) fn on_trailers(&mut self, host: &mut impl Host, ctx: ContextId) {
        let Some(served) = self.allowed(ctx).cloned() else { return };
        let Ok(trailers) = host.response_trailers() else {
            log::warn!("could not read the vendor's response trailers; resetting the stream");
            host.reset();
            return;
        };
        self.scrub(host, &served, &trailers, Part::Trailers);
    }

    /// Remove every response header (or trailer) that reflects the secret this request was given.
    /// If one cannot be removed, the stream is reset: the secret never reaches the workload.
    /// `false`: the stream was reset.
    fn scrub(&mut self, host: &mut impl Host, served: &Served, headers: &Headers, part: Part) -> bool {
        let (Some(t), Some(data)) = (served.cfg.targets.get(served.target), served.data.as_ref()) else { return true };
        // The forms of the secret to look for, computed once per target and value.
        let needles = match self.needles.get(&served.target) {
            Some((cfg, src, n)) if Rc::ptr_eq(src, data) && Rc::ptr_eq(cfg, &served.cfg) => n.clone(),
            _ => {
                let n = Rc::new(scrub::needles(t, data));
                self.needles.insert(served.target, (served.cfg.clone(), data.clone(), n.clone()));
                n
            }
        };
        let remove = scrub::headers_to_remove(&needles, headers);
        if remove.is_empty() {
            return true;
        }
        host.metric(Metric::ResponseScrubbed);
        let what = match part {
            Part::Headers => "header",
            Part::Trailers => "trailer",
        };
        log::warn!("target {}: the vendor reflected the upstream secret in response {what}(s) {}; removed", t.name, remove.join(", "));
        for name in &remove {
            let removed = match part {
                Part::Headers => host.remove_response_header(name),
                Part::Trailers => host.remove_response_trailer(name),
            };
            if removed.is_err() {
                log::warn!("could not remove response {what} {name}; resetting the stream");
                host.reset();
                return false;
            }
        }
        true
    }
}

/// Which part of a response is scrubbed.
#[derive(Clone, Copy)]
enum Part {
    Headers,
    Trailers,
}

/// The labelled metrics of a decided request: its target and code, and what the filter added to
/// it (a denial's reply is sent right after).
pub(super) fn record_decision(host: &mut impl Host, audit: &Audit, started_us: u64) {
    host.count(Family::TargetRequests, &[audit.target.as_deref().unwrap_or("none"), audit.decision], 1);
    let outcome = if audit.decision == "allow" { audit.cache.unwrap_or("hit") } else { "denied" };
    let added = host.now_us().saturating_sub(started_us);
    host.observe(Family::AddedUs, &[outcome], added);
}

/// What is recorded of an allowed request: its access-log fields, its metrics, and the cost it
/// reserved.
pub(super) fn record_allowed(host: &mut impl Host, audit: &Audit, reservation: Option<&Reservation>, started_us: u64) {
    if let (Some(r), Some(t)) = (reservation, audit.target.as_deref()) {
        host.count(Family::SpendReserved, &[t], r.charge.cost);
    }
    write_audit(host, audit);
    record_decision(host, audit, started_us);
    host.metric(Metric::Allowed);
    host.metric(match audit.cache {
        Some("miss") => Metric::CacheMiss,
        Some("stale") => Metric::CacheStale,
        _ => Metric::CacheHit,
    });
}

/// Answer the current stream with a denial (reset it if even that fails).
pub(super) fn finish_deny(host: &mut impl Host, audit: &Audit, d: &Denial, started_us: u64) -> Action {
    write_audit(host, audit);
    record_decision(host, audit, started_us);
    host.metric(Metric::Denied(d.code));
    if host.reply(d.status(), &d.headers(), &d.body()).is_err() {
        log::warn!("could not send a local reply; resetting the stream");
        host.reset();
    }
    Action::Pause
}

/// Rewrite the request. A header the request does not carry needs no removal.
fn apply(ops: &[Op], req: &HostRequest, host: &mut impl Host) -> Result<(), HostError> {
    for op in ops {
        match op {
            Op::Remove(h) => {
                if req.carries(h) {
                    host.remove_request_header(h)?;
                }
            }
            Op::Set(h, v) => host.set_request_header(h, v.expose())?,
            Op::SetPath(p) => host.set_request_header(":path", p.expose())?,
        }
    }
    Ok(())
}

/// Who asked for what, before the decision: the audit fields a request has from its headers.
fn write_who(host: &mut impl Host, a: &Audit) {
    let fields: [(&'static str, Option<&str>); 4] = [
        ("keyward.subject", a.subject.as_deref()),
        ("keyward.target", a.target.as_deref()),
        ("keyward.jti", a.jti.as_deref()),
        ("keyward.run", a.run.as_deref()),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            host.set_filter_state(key, v);
        }
    }
}

/// Set the audit fields as filter state, read by the access log as
/// `%FILTER_STATE(wasm.keyward.<field>:PLAIN)%`.
pub(super) fn write_audit(host: &mut impl Host, a: &Audit) {
    let cost = a.cost.map(|c| c.to_string());
    let fields: [(&'static str, Option<&str>); 12] = [
        ("keyward.subject", a.subject.as_deref()),
        ("keyward.target", a.target.as_deref()),
        ("keyward.jti", a.jti.as_deref()),
        ("keyward.run", a.run.as_deref()),
        ("keyward.decision", Some(a.decision).filter(|d| !d.is_empty())),
        ("keyward.cache", a.cache),
        ("keyward.idempotency_key", a.idempotency_key.as_deref()),
        ("keyward.secret_version", a.secret_version.as_deref()),
        ("keyward.issued", a.issued.as_deref()),
        ("keyward.cost", cost.as_deref()),
        ("keyward.spend", a.spend),
        ("keyward.budgets", a.budgets.as_deref()),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            host.set_filter_state(key, v);
        }
    }
}
