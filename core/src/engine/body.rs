//! The second half of a decision, at the end of a request's body: for a request whose cost is in
//! its body, or whose body may name another method to run (`_method`), the body is read the
//! strictest way a vendor could, method overrides are checked against the rules like the override
//! headers, and the request is counted and its cost reserved. Until then its body is held, so
//! nothing of it reaches the vendor undecided.

use super::admission::{self, Counter, Halt, Spend};
use super::{rules_allow, unreadable, Reservation, Ticket, RETRY_AFTER_UNAVAILABLE_S};
use crate::config::Config;
use crate::credential::jwt::Claims;
use crate::policy::cost::body::{self, BodyKind};
use crate::policy::cost::Priced;
use crate::policy::tokens::Meter;
use crate::record::Audit;
use crate::response::{Code, Denial};
use std::rc::Rc;

/// A request decided at its body's end: what it asks for, and what it counts under.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferred {
    pub target: usize,
    pub ticket: Option<Ticket>,
    /// How its body is read: the target's cost encoding if it is priced, else its content type.
    pub kind: BodyKind,
    /// Its method (or a header override) is priced; otherwise it is free unless its body names a
    /// priced method.
    pub priced: bool,
    pub claims: Rc<Claims>,
    pub method: String,
    pub vendor_path: String,
    /// What a copy of its credential looks like (a model call's body may not carry one: the
    /// vendor would get it, and its model name would be logged).
    pub copies: crate::credential::copies::Shared,
}

/// What a request decided at its body's end holds: its reservation (a spend cap), and for a model
/// call the meter its answer is settled with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BodyDecision {
    pub reservation: Option<Reservation>,
    pub meter: Option<Meter>,
    /// The body to forward instead of the one received.
    pub body: Option<Vec<u8>>,
}

/// Price a deferred request from its whole body: `Ok(None)` when it is free after all,
/// `Ok(Some)` with its cost (`audit` gets the cost and the model), or why it is refused. It is
/// counted next (`admission::admit`), then finished by `body_counted`.
pub fn price_body(cfg: &Config, d: &Deferred, body: &[u8], audit: &mut Audit) -> Result<Option<Priced>, Denial> {
    let Some((target, cost)) = cfg.targets.get(d.target).and_then(|t| t.cost.as_ref().map(|c| (t, c))) else {
        return Err(Denial::new(Code::SecretUnavailable, "the gateway's configuration changed; try again").retry_after(RETRY_AFTER_UNAVAILABLE_S));
    };
    if body.len() > cost.max_body {
        return Err(unreadable(crate::policy::cost::Unreadable::TooLarge));
    }
    let check = |overrides: &[String]| {
        if overrides.iter().all(|m| rules_allow(&d.claims, target, m, &d.vendor_path)) {
            Ok(())
        } else {
            Err(Denial::new(Code::Forbidden, "a method override names a method no rule allows for this path"))
        }
    };
    if !d.priced {
        let overrides = body::overrides(d.kind, body).map_err(unreadable)?;
        check(&overrides)?;
        if !overrides.iter().any(|m| cost.applies(m, &d.vendor_path)) {
            return Ok(None); // free, as its headers said
        }
        if cost.body_kind() != Some(d.kind) {
            return Err(Denial::new(Code::BadRequest, "a priced method override needs the body in the form this target reads its cost from"));
        }
    }
    // A model call's body is searched for a copy of its credential in every decoded string (the
    // tariff's reading), however the JSON escapes it.
    let (priced, overrides) = cost.price_call(body, &d.vendor_path, &|s: &str| d.copies.0.holds(s.as_bytes())).map_err(unreadable)?;
    check(&overrides)?;
    audit.cost = Some(priced.cost);
    audit.model = priced.meter.as_ref().map(|m| m.model.clone());
    Ok(Some(priced))
}

/// Finish a deferred request from how counting it went: the reservation it holds, if any
/// (`audit` gets how it stands against spend caps), or why it stopped (a refusal, or the ledger
/// to ask first).
pub fn body_counted(cfg: &Config, d: &Deferred, priced: Option<Priced>, counted: Result<Spend, Halt>, audit: &mut Audit) -> Result<BodyDecision, Halt> {
    let spend = counted?;
    let Some(priced) = priced else { return Ok(BodyDecision::default()) };
    audit.spend = Some(spend.label());
    audit.budgets = d.ticket.as_ref().and_then(|t| admission::budget_names(cfg, t, &spend));
    let reservation = match spend {
        Spend::Reserved(r) => Some(r),
        _ => None,
    };
    Ok(BodyDecision { reservation, meter: priced.meter, body: priced.body })
}

/// Price, count and finish a deferred request at its body's end (`price_body`, then
/// `admission::admit`, then `body_counted`).
pub fn price_and_count(cfg: &Config, d: &Deferred, body: &[u8], counter: &mut impl Counter, audit: &mut Audit) -> Result<BodyDecision, Halt> {
    let priced = price_body(cfg, d, body, audit).map_err(Halt::Deny)?;
    let counted = match d.ticket.as_ref() {
        Some(t) => admission::admit(counter, t, priced.as_ref(), body),
        None => Ok(Spend::Uncapped),
    };
    body_counted(cfg, d, priced, counted, audit)
}
