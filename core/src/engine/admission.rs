//! Counting a request against its credential's limits, and reserving its cost against `spend`.
//!
//! A credential counts in its own entry under its `lim`; a derived one also in its parent's entry
//! under `plim`. A priced request (its target has a `cost` for it) is admitted once its cost is
//! known and nothing else can refuse it any more: after the upstream secret is ready, and for a
//! cost read from the body, at the end of the body. A reservation the parent's entry refuses is
//! released from the child's, so a refused request holds nothing.

use super::{Secrets, RETRY_AFTER_UNAVAILABLE_S};
use crate::credential::jwt::Claims;
use crate::policy::cost::Priced;
use crate::policy::limits::{Charge, Limits, RetryKey, Verdict};
use crate::response::{Code, Denial};
use sha2::{Digest, Sha256};

/// What a request is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The identity of the key that verified the credential (limit entries are per key).
    pub key_id: u64,
    pub jti: String,
    pub lim: Limits,
    pub par: Option<String>,
    pub plim: Limits,
    /// When the credential stops being accepted: its entries can go then.
    pub keep_until_s: i64,
    /// A digest of the request's `Idempotency-Key` and of what it asks for (target, method,
    /// path): with the cost, it names a retry.
    pub retry_seed: Option<[u8; 32]>,
}

impl Ticket {
    /// The ticket of a verified credential, or `None` when it has no limits to count against
    /// (nothing is allocated then: the common warm path). `retry_seed` is asked for only if needed.
    pub fn for_claims(c: &Claims, key_id: u64, keep_until_s: i64, retry_seed: impl FnOnce() -> Option<[u8; 32]>) -> Option<Ticket> {
        let counts = !c.lim.is_empty() || (c.par.is_some() && !c.plim.is_empty());
        counts.then(|| Ticket { key_id, jti: c.jti.clone(), lim: c.lim, par: c.par.clone(), plim: c.plim, keep_until_s, retry_seed: retry_seed() })
    }

    fn own(&self) -> bool {
        !self.lim.is_empty()
    }

    fn parents(&self) -> Option<&str> {
        self.par.as_deref().filter(|_| !self.plim.is_empty())
    }
}

/// The seed of a request's retry key.
pub fn retry_seed(idempotency_key: &str, target: &str, method: &str, path: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [b"keyward-retry-v1".as_slice(), idempotency_key.as_bytes(), target.as_bytes(), method.as_bytes(), path.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

fn retry_key(seed: &[u8; 32], p: &Priced) -> RetryKey {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(p.cost.to_le_bytes());
    h.update(p.currency.as_deref().unwrap_or("").as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(d.get(..16).unwrap_or(&[0u8; 16]));
    k
}

/// A cost held against credentials' spend caps, to release if the vendor refunds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub key_id: u64,
    /// The entries (`jti`s) that reserved it.
    pub holders: Vec<String>,
    pub charge: Charge,
}

/// How an admitted request stands against spend caps (the access log's `spend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spend {
    /// No cost, or no spend cap on the credential.
    Uncapped,
    Reserved(Reservation),
    /// A retry of a held reservation: nothing reserved again.
    Retry,
}

impl Spend {
    pub fn label(&self) -> &'static str {
        match self {
            Spend::Uncapped => "uncapped",
            Spend::Reserved(_) => "reserved",
            Spend::Retry => "retry",
        }
    }
}

/// Count the request of `ticket` (and reserve `priced`'s cost where a spend cap applies).
pub fn admit(secrets: &mut impl Secrets, t: &Ticket, priced: Option<&Priced>) -> Result<Spend, Denial> {
    let charge = priced.map(|p| Charge { cost: p.cost, retry: t.retry_seed.as_ref().map(|s| retry_key(s, p)) });
    let mut spend = Spend::Uncapped;
    let mut holders: Vec<String> = Vec::new();
    // A derived credential counts against its own limits, and against its parent's entry under
    // the parent's limits (`plim`): siblings share the parent's budget.
    let entries = [(t.own(), t.jti.as_str(), &t.lim), (t.parents().is_some(), t.par.as_deref().unwrap_or(""), &t.plim)];
    for (applies, jti, lim) in entries {
        if !applies {
            continue;
        }
        let verdict = secrets.admit(t.key_id, jti, lim, t.keep_until_s, charge.as_ref());
        match (verdict, charge) {
            (Verdict::Admit, _) | (Verdict::Reserved, None) => {}
            (Verdict::Reserved, Some(c)) => {
                holders.push(jti.to_string());
                spend = Spend::Reserved(Reservation { key_id: t.key_id, holders: holders.clone(), charge: c });
            }
            (Verdict::Retry, _) => {
                if spend == Spend::Uncapped {
                    spend = Spend::Retry;
                }
            }
            (refusal, _) => {
                // What an earlier entry reserved for this request goes back.
                if let Some(c) = &charge {
                    for h in &holders {
                        secrets.refund(t.key_id, h, c);
                    }
                }
                return Err(denial(refusal));
            }
        }
    }
    Ok(spend)
}

fn denial(v: Verdict) -> Denial {
    match v {
        Verdict::RateLimited { retry_after_s } => {
            Denial::new(Code::RateLimited, "this credential's requests-per-minute limit is reached").retry_after(retry_after_s)
        }
        Verdict::Exhausted { retry_after_s } => Denial::new(Code::QuotaExhausted, "this credential's request quota is used up").retry_after(retry_after_s),
        Verdict::SpendExhausted { retry_after_s } => {
            Denial::new(Code::SpendExhausted, "this request would take the credential past its spend cap").retry_after(retry_after_s)
        }
        _ => Denial::new(Code::RateLimited, "too many limited credentials are active; try again later").retry_after(RETRY_AFTER_UNAVAILABLE_S),
    }
}
