//! Requests priced from their body, across its events: the headers went on (rewritten, held back
//! from the router by Envoy's buffer filter), the body is buffered here up to the target's bound,
//! and at its end (its last data frame or its trailers) the cost is read and reserved, or the
//! request is answered with a refusal before the router ever sees it. Later, a vendor's
//! `refund_on` answer releases the reservation.

use super::limits::release;
use super::request::{record_allowed, SharedSecrets};
use super::state::{Served, Stream};
use super::Lifecycle;
use crate::engine;
use crate::host::{Action, ContextId, Host};
use crate::record::{Audit, Family};
use crate::response::{Code, Denial};

impl Lifecycle {
    /// Part of the body of a request waiting to be priced (`size`: all of it buffered so far;
    /// `None`: the trailers ended it, and what is buffered is read).
    pub(super) fn price_body(&mut self, host: &mut impl Host, ctx: ContextId, size: Option<usize>, end: bool) -> Action {
        let Some(Stream::Pricing { pricing: p, .. }) = self.streams.get(&ctx) else { return Action::Continue };
        let started_us = host.now_us().saturating_sub(p.header_us);
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
        let Some(Stream::Pricing { pricing, served }) = self.streams.remove(&ctx) else { return Action::Pause };
        let mut audit = pricing.audit;
        let (Some(cfg), Some(max)) = (cfg, max) else {
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
        let now_ms = host.now_ms();
        let priced = {
            let mut secrets = SharedSecrets { lc: self, host, now_ms, admitted: 0, calls: 0 };
            engine::price_body(&cfg, &pricing.deferred, &body, &mut secrets, &mut audit)
        };
        let reservation = match priced {
            Ok(r) => r,
            Err(d) => return self.refuse_priced(host, ctx, audit, Some(d), started_us),
        };
        record_allowed(host, &audit, reservation.as_ref(), started_us);
        self.streams.insert(ctx, Stream::Allowed(Served { reservation, ..served }));
        Action::Continue
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
    pub(super) fn refund_if_due(&mut self, host: &mut impl Host, ctx: ContextId, status: Option<&[u8]>) {
        let Some(served) = self.allowed(ctx) else { return };
        let (Some(r), Some(t)) = (served.reservation.as_ref(), served.cfg.targets.get(served.target)) else { return };
        let status = status.and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| s.parse::<u16>().ok());
        if !status.is_some_and(|s| t.refund_on.contains(&s)) || !host.response_from_upstream() {
            return;
        }
        let (r, name) = (r.clone(), t.name.clone());
        release(host, &r);
        host.count(Family::SpendRefunded, &[&name], r.charge.cost);
        host.set_filter_state("keyward.spend", "refunded");
        if let Some(Stream::Allowed(s)) = self.streams.get_mut(&ctx) {
            s.reservation = None;
        }
    }
}
