//! Requests priced from their body, across its events: the headers went on (rewritten, held back
//! from the router by Envoy's buffer filter), the body is buffered here up to the target's bound,
//! and at its end (its last data frame or its trailers) the cost is read and reserved, or the
//! request is answered with a refusal before the router ever sees it. Later, a vendor's
//! `refund_on` answer releases the reservation.

use super::admission_view::SharedSecrets;
use super::request::record_allowed;
use super::state::{Pricing, Served, Stream};
use super::{Lifecycle, PARK_GRACE_MS};
use crate::engine::{self, Halt};
use crate::host::{Action, ContextId, Host};
use crate::record::{Audit, Family};
use crate::response::{Code, Denial};

impl Lifecycle {
    /// Part of the body of a request waiting to be priced (`size`: all of it buffered so far;
    /// `None`: the trailers ended it, and what is buffered is read).
    pub(super) fn price_body(&mut self, host: &mut impl Host, ctx: ContextId, size: Option<usize>, end: bool) -> Action {
        let Some(Stream::Pricing { pricing: p, .. }) = self.streams.get(&ctx) else { return Action::Continue };
        let started_us = host.clock_us().saturating_sub(p.header_us);
        let cfg = self.cfg.clone().filter(|_| p.generation == self.generation);
        let max = cfg.as_ref().and_then(|c| c.targets.get(p.deferred.target)).and_then(|t| t.cost.as_ref()).map(|c| c.max_body);
        let refusal = match (max, size) {
            (None, _) => Some(Denial::new(Code::SecretUnavailable, "the gateway's configuration changed; try again").retry_after(5)),
            (Some(m), Some(n)) if n > m => Some(Denial::new(Code::BodyTooLarge, "the request body is larger than this target reads to price it")),
            _ => None,
        };
        if refusal.is_none() && !end {
            // Buffered here until the end (proxy-wasm's StopIterationAndBuffer).
            return Action::Pause;
        }
        if matches!(self.streams.get(&ctx), Some(Stream::Pricing { pricing, .. }) if pricing.waiting.is_some()) {
            // Its end came already; it waits for the ledger (more trailers change nothing).
            return Action::Pause;
        }
        let Some(Stream::Pricing { pricing, served }) = self.streams.remove(&ctx) else { return Action::Pause };
        let audit = pricing.audit.clone();
        let (Some(_), Some(max)) = (cfg, max) else {
            return self.refuse_priced(host, ctx, audit, refusal, started_us);
        };
        if refusal.is_some() {
            return self.refuse_priced(host, ctx, audit, refusal, started_us);
        }
        // Read one byte more than the bound when the size was not told: a longer body is refused.
        let body = match size {
            Some(0) => Ok(Vec::new()),
            Some(n) => host.request_body(n),
            None => host.request_body(max + 1),
        };
        let body = match body {
            Ok(b) if b.len() > max => {
                return self.refuse_priced(
                    host,
                    ctx,
                    audit,
                    Some(Denial::new(Code::BodyTooLarge, "the request body is larger than this target reads to price it")),
                    started_us,
                )
            }
            Ok(b) => b,
            Err(_) => return self.refuse_priced(host, ctx, audit, Some(Denial::new(Code::BadRequest, "the request body could not be read")), started_us),
        };
        self.decide_priced(host, ctx, pricing, served, body, false)
    }

    /// Price and admit a request whose body has ended (`resumed`: it waited for the fleet ledger,
    /// and is answered by resuming it, from a root event).
    fn decide_priced(&mut self, host: &mut impl Host, ctx: ContextId, mut pricing: Box<Pricing>, served: Served, body: Vec<u8>, resumed: bool) -> Action {
        let started_us = host.clock_us().saturating_sub(pricing.header_us);
        let Some(cfg) = self.cfg.clone().filter(|_| pricing.generation == self.generation) else {
            self.abandon(host, ctx, &pricing.admitted);
            return self.refuse_priced(host, ctx, pricing.audit, None, started_us);
        };
        let now_ms = self.now_us / 1000;
        let mut audit = pricing.audit.clone();
        let (priced, made) = {
            let prior = std::mem::take(&mut pricing.admitted);
            let mut secrets = SharedSecrets::resumed(self, host, now_ms, prior);
            let r = engine::price_and_count(&cfg, &pricing.deferred, &body, &mut secrets, &mut audit);
            (r, secrets.made)
        };
        let decided = match priced {
            Ok(d) => d,
            Err(Halt::Deny(d)) => return self.refuse_priced(host, ctx, audit, Some(d), started_us),
            Err(Halt::Pending(account)) => {
                // The fleet ledger is asked first: the body stays buffered (and held here).
                let timeout = cfg.ledger.as_ref().map_or(1000, |l| u64::from(l.timeout_ms));
                if pricing.waiting.is_none() {
                    pricing.deadline_ms = now_ms + timeout + PARK_GRACE_MS;
                }
                pricing.waiting = Some(account);
                pricing.admitted = made;
                pricing.body = Some(crate::secret::Secret::new(body));
                self.streams.insert(ctx, Stream::Pricing { pricing, served });
                return Action::Pause;
            }
        };
        if let Some(forwarded) = decided.body.as_deref() {
            // The gateway added to the body (an output limit, the request for usage): the buffer
            // filter behind sets its length (the headers went on without one).
            if host.set_request_body(body.len(), forwarded).is_err() {
                if let Some(r) = decided.reservation.as_ref() {
                    self.release_reservation(host, r);
                }
                let d = Denial::new(Code::SecretUnavailable, "the request body could not be rewritten").retry_after(5);
                return self.refuse_priced(host, ctx, audit, Some(d), started_us);
            }
        }
        record_allowed(host, &audit, decided.reservation.as_ref(), started_us);
        let meter = decided.meter.map(|m| Box::new(super::metering::Metering::new(m)));
        self.streams.insert(ctx, Stream::Allowed(Served { reservation: decided.reservation, meter, ..served }));
        self.go_on(host, resumed)
    }

    /// A priced request that waited for the fleet ledger: decide it again (a root event).
    pub(super) fn resume_pricing(&mut self, host: &mut impl Host, ctx: ContextId) {
        if !matches!(self.streams.get(&ctx), Some(Stream::Pricing { pricing, .. }) if pricing.waiting.is_some()) {
            return;
        }
        let Some(Stream::Pricing { mut pricing, served }) = self.streams.remove(&ctx) else { return };
        if self.enter(host, ctx).is_err() {
            self.abandon(host, ctx, &pricing.admitted);
            return; // the stream has gone
        }
        let body = pricing.body.take().map(|b| b.expose().to_vec()).unwrap_or_default();
        self.decide_priced(host, ctx, pricing, served, body, true);
    }

    /// The priced requests waiting for the ledger's answer about account `id`.
    pub(super) fn pricing_on(&self, id: u64) -> Vec<ContextId> {
        let mut out: Vec<ContextId> =
            self.streams.iter().filter(|(_, s)| matches!(s, Stream::Pricing { pricing, .. } if pricing.waiting == Some(id))).map(|(c, _)| *c).collect();
        out.sort_unstable();
        out
    }

    /// Priced requests that waited for the ledger past their deadline get 503.
    pub(super) fn expire_pricing(&mut self, host: &mut impl Host, now_ms: u64) {
        let mut late: Vec<ContextId> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s, Stream::Pricing { pricing, .. } if pricing.waiting.is_some() && now_ms >= pricing.deadline_ms))
            .map(|(c, _)| *c)
            .collect();
        late.sort_unstable();
        for ctx in late {
            let Some(Stream::Pricing { pricing, .. }) = self.streams.remove(&ctx) else { continue };
            self.abandon(host, ctx, &pricing.admitted);
            if self.enter(host, ctx).is_ok() {
                let started_us = host.clock_us().saturating_sub(pricing.header_us);
                let d = Denial::new(Code::SecretUnavailable, "the spend ledger did not answer in time").retry_after(5);
                self.refuse_priced(host, ctx, pricing.audit, Some(d), started_us);
            }
        }
    }

    /// Answer a priced request with a refusal (its headers went on, but the router has not seen
    /// them: the buffer filter holds them until the body ends, which it never does now).
    fn refuse_priced(&mut self, host: &mut impl Host, ctx: ContextId, mut audit: Audit, d: Option<Denial>, started_us: u64) -> Action {
        let d = d.unwrap_or_else(|| Denial::new(Code::SecretUnavailable, "the gateway's configuration changed; try again").retry_after(5));
        audit.decision = d.code.as_str();
        self.deny(host, ctx, &audit, &d, started_us)
    }

    /// The vendor answered a request that holds a reservation: a `refund_on` status from the
    /// vendor itself releases it (never one Envoy made up: after a timeout or a reset the charge
    /// may have happened).
    pub(super) fn refund_if_due(&mut self, host: &mut impl Host, ctx: ContextId, status: Option<&[u8]>) -> bool {
        let Some(served) = self.allowed(ctx) else { return false };
        let (Some(r), Some(t)) = (served.reservation.as_ref(), served.cfg.targets.get(served.target)) else { return false };
        let status = status.and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| s.parse::<u16>().ok());
        if !status.is_some_and(|s| t.refund_on.contains(&s)) || !host.response_from_upstream() {
            return false;
        }
        let (r, name) = (r.clone(), t.name.clone());
        self.refund_reservation(host, &r);
        host.count(Family::SpendRefunded, &[&name], r.charge.cost);
        host.set_filter_state("keyward.spend", "refunded");
        if let Some(Stream::Allowed(s)) = self.streams.get_mut(&ctx) {
            s.reservation = None;
        }
        true
    }
}
