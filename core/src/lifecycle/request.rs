//! One request through the pipeline, against the cache and the host: decide it (parking it when a
//! secret must be fetched), rewrite it or answer it, and look at the vendor's response.

use super::admission_view::SharedSecrets;
use super::state::{Parked, Pricing, Served, Stream, Wait};
use super::{Lifecycle, PARK_GRACE_MS};
use crate::config::Config;
use crate::engine::{self, Admitted, Decision, Outcome, Request, Reservation};
use crate::host::{Action, ContextId, Headers, Host, HostError};
use crate::inject::{scrub, Op};
use crate::record::{Audit, Family, Metric};
use crate::response::{Code, Denial};
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
        let Some(meta) = host.route_metadata() else {
            return HostRequest { headers, target: None, prefix: None, endpoint: None };
        };
        let get = |k: &str| meta.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        HostRequest { headers, target: get("target"), prefix: get("prefix"), endpoint: get("endpoint") }
    }

    /// Does the request carry this header? Unknown (the map could not be read): yes.
    fn carries(&self, name: &str) -> bool {
        match &self.headers {
            Ok(all) => all.get(name).is_some(),
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
        all.get(name).map(<[u8]>::to_vec)
    }
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>> {
        match &self.headers {
            Ok(all) => all.values(name).map(<[u8]>::to_vec).collect(),
            // Fail closed: an unreadable header map counts as a duplicate.
            Err(()) => vec![Vec::new(), Vec::new()],
        }
    }
    fn headers(&mut self) -> &Headers {
        static NONE: Headers = Headers::new();
        self.headers.as_ref().unwrap_or(&NONE)
    }
    fn route_target(&mut self) -> Option<String> {
        self.target.clone()
    }
    fn route_prefix(&mut self) -> Option<String> {
        self.prefix.clone()
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
            let started_us = parked.map_or_else(|| self.now_us, |p| p.started_us);
            return self.deny(host, ctx, &Audit { decision: d.code.as_str(), ..Audit::default() }, &d, started_us);
        };
        let resumed = parked.is_some();
        // One clock read: the decision's time and, for a new request, when it started.
        let now_us = self.now_us;
        let started_us = parked.as_ref().map_or(now_us, |p| p.started_us);
        let now_ms = now_us / 1000;
        let mut req = HostRequest::read(host);
        if let Some(name) = req.endpoint.take() {
            return self.answer_endpoint(host, &name, now_ms, resumed);
        }
        let prior = parked.as_ref().map_or_else(Vec::new, |p| p.admitted.clone());
        let body_end = parked.as_ref().and_then(|p| p.body_end);
        let (decision, admitted): (Decision, Vec<Admitted>) = {
            let mut secrets = SharedSecrets::resumed(self, host, now_ms, prior);
            let d = engine::decide_and_count(&cfg, &mut req, &mut secrets, (now_ms / 1000) as i64);
            (d, secrets.made)
        };
        let mut audit = decision.audit;
        let reservation = decision.reservation;
        match decision.outcome {
            Outcome::Need(slot) => {
                if !resumed {
                    host.observe(Family::ColdUs, &["park"], self.now_us.saturating_sub(started_us));
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
                    let header_us = host.clock_us().saturating_sub(started_us);
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
                        // Its body ended while it was parked: price it now.
                        if self.price_body(host, ctx, size, true) == Action::Pause {
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
        Served {
            cfg: cfg.clone(),
            slot,
            fetched_at_ms: local.map_or(0, |l| l.fetched_at_ms),
            target,
            data: local.and_then(|l| l.data.clone()),
            reservation,
            meter: None,
        }
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
            if matches!(self.streams.get(&ctx), Some(Stream::Parked(p)) if matches!(p.wait, Wait::Drain(_))) {
                // The drain is answered with what is still held (the entrypoint asks again).
                self.resume(host, ctx);
                continue;
            }
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
            Some(Stream::Allowed(s)) => super::metering::gone_unsettled(host, &s),
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
        let status = headers.get(":status");
        let refunded = served.reservation.is_some() && self.refund_if_due(host, ctx, status);
        if served.meter.is_some() {
            self.begin_reading(host, ctx, &headers, refunded);
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
        let now_ms = self.now_us / 1000;
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
        let what = match part {
            Part::Headers => "header",
            Part::Trailers => "trailer",
        };
        let Some(remove) = scrub::headers_to_remove(&needles, headers) else {
            log::warn!("target {}: the vendor reflected the upstream secret in a response {what} whose name is not text; resetting the stream", t.name);
            host.reset();
            return false;
        };
        if remove.is_empty() {
            return true;
        }
        host.metric(Metric::ResponseScrubbed);
        let names: Vec<&str> = remove.iter().map(|n| scrub::shown(&needles, n)).collect();
        log::warn!("target {}: the vendor reflected the upstream secret in response {what}(s) {}; removed", t.name, names.join(", "));
        for name in &remove {
            let removed = match part {
                Part::Headers => host.remove_response_header(name),
                Part::Trailers => host.remove_response_trailer(name),
            };
            if removed.is_err() {
                log::warn!("could not remove response {what} {}; resetting the stream", scrub::shown(&needles, name));
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
    let added = host.clock_us().saturating_sub(started_us);
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
    let fields: [(&'static str, Option<&str>); 14] = [
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
        ("keyward.model", a.model.as_deref()),
        // A model call's cost is its bound until its usage is read (then `cost` is the usage's).
        ("keyward.reserved", cost.as_deref().filter(|_| a.model.is_some())),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            host.set_filter_state(key, v);
        }
    }
}
