//! Requests priced from their body, across its events: the headers went on (rewritten, held back
//! from the router by Envoy's buffer filter), the body is buffered here up to the target's bound,
//! and at its end the cost is read and reserved, or the request is answered with a refusal before
//! the router ever sees it. Later, a vendor's `refund_on` answer releases the reservation.

use super::limits::release;
use super::request::{finish_deny, record_allowed, SharedSecrets};
use super::Lifecycle;
use crate::config::Config;
use crate::engine;
use crate::host::{Action, ContextId, Host};
use crate::record::Family;
use crate::response::{Code, Denial};

impl Lifecycle {
    /// Part of the body of a request waiting to be priced (`size`: all of it buffered so far).
    pub(super) fn price_body(&mut self, host: &mut impl Host, ctx: ContextId, size: usize, end: bool) -> Action {
        let Some(p) = self.pricing.get(&ctx) else { return Action::Continue };
        let started_us = host.now_us().saturating_sub(p.header_us);
        let cfg = self.cfg.clone().filter(|_| p.generation == self.generation);
        let max = cfg.as_ref().and_then(|c| c.targets.get(p.deferred.target)).and_then(|t| t.cost.as_ref()).map(|c| c.max_body);
        let refusal = match max {
            None => Some(Denial::new(Code::SecretUnavailable, "the gateway's configuration changed; try again").retry_after(5)),
            Some(m) if size > m => Some(Denial::new(Code::BodyTooLarge, "the request body is larger than this target reads to price it")),
            Some(_) => None,
        };
        if refusal.is_none() && !end {
            // Buffered here until the end (proxy-wasm's StopIterationAndBuffer).
            return Action::Pause;
        }
        let (Some(p), Some(cfg)) = (self.pricing.remove(&ctx), cfg) else {
            return self.refuse_priced(host, ctx, None, refusal, started_us);
        };
        let mut audit = p.audit;
        if let Some(d) = refusal {
            return self.refuse_priced(host, ctx, Some(audit), Some(d), started_us);
        }
        let body = if size == 0 { Ok(Vec::new()) } else { host.request_body(size) };
        let Ok(body) = body else {
            let d = Denial::new(Code::BadRequest, "the request body could not be read");
            return self.refuse_priced(host, ctx, Some(audit), Some(d), started_us);
        };
        let now_ms = host.now_ms();
        let priced = {
            let mut secrets = SharedSecrets { lc: self, host, now_ms, admitted: 0, calls: 0 };
            engine::price_body(&cfg, &p.deferred, &body, &mut secrets, &mut audit)
        };
        let reservation = match priced {
            Ok(r) => r,
            Err(d) => return self.refuse_priced(host, ctx, Some(audit), Some(d), started_us),
        };
        record_allowed(host, &audit, reservation.as_ref(), started_us);
        if let Some(s) = self.served.get_mut(&ctx) {
            s.reservation = reservation;
        } else if let Some(r) = &reservation {
            // Nowhere to remember it for a refund: it stays held (as for a vendor that never
            // answers), which errs on the side of the cap.
            log::debug!("a reservation of {} is held without a record of its stream", r.charge.cost);
        }
        Action::Continue
    }

    /// Answer a priced request with a refusal (its headers went on, but the router has not seen
    /// them: the buffer filter holds them until the body ends, which it never does now).
    fn refuse_priced(&mut self, host: &mut impl Host, ctx: ContextId, audit: Option<crate::record::Audit>, d: Option<Denial>, started_us: u64) -> Action {
        self.served.remove(&ctx);
        let d = d.unwrap_or_else(|| Denial::new(Code::SecretUnavailable, "the gateway's configuration changed; try again").retry_after(5));
        let mut audit = audit.unwrap_or_default();
        audit.decision = d.code.as_str();
        finish_deny(host, &audit, &d, started_us)
    }

    /// The vendor answered a request that holds a reservation: a `refund_on` status from the
    /// vendor itself releases it (never one Envoy made up: after a timeout or a reset the charge
    /// may have happened).
    pub(super) fn refund_if_due(&mut self, host: &mut impl Host, cfg: &Config, ctx: ContextId, status: Option<&[u8]>) {
        let Some(served) = self.served.get(&ctx) else { return };
        let (Some(r), Some(t)) = (served.reservation.as_ref(), cfg.targets.get(served.target)) else { return };
        let status = status.and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| s.parse::<u16>().ok());
        if !status.is_some_and(|s| t.refund_on.contains(&s)) || !host.response_from_upstream() {
            return;
        }
        let r = r.clone();
        release(host, &r);
        host.count(Family::SpendRefunded, &[&t.name], r.charge.cost);
        host.set_filter_state("keyward.spend", "refunded");
        if let Some(s) = self.served.get_mut(&ctx) {
            s.reservation = None;
        }
    }
}
