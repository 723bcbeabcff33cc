//! Counting a request against its credential's limits, its parent's and the budgets that cover
//! it, and reserving its cost against `spend`.
//!
//! A credential counts in its own entry under its `lim`; a derived one also in its parent's entry
//! under `plim`. An entry is named by the key that verifies the credential and its `jti`; a
//! parent's entry by the key that signed the parent (the child's `pkid`), so the parent's own
//! requests, its children's and its siblings' count in the same one. With a fleet ledger, the
//! budgets whose match covers the request count it too. Where an entry lives (this Envoy's shared
//! data, or the ledger through this gateway's slice) is the `Counter` implementation's business;
//! it says where it counted in the `Holder` it returns.
//!
//! Counting is the one step of a decision with effects, so it is its own step: `engine::decide`
//! cannot count (it is given no `Counter`); it ends with `Step::Count` where a request must be
//! counted, the executor's side runs `admit` here, and `Count::admitted` finishes the decision.
//!
//! A priced request (its target has a `cost` for it) is admitted once its cost is known and
//! nothing else can refuse it any more: after the upstream secret is ready, and for a cost read
//! from the body, at the end of the body. Entries are asked in order; one that refuses releases
//! what the earlier ones took, so a refused request holds nothing.

use super::RETRY_AFTER_UNAVAILABLE_S;
use crate::credential::jwt::Claims;
use crate::ledger::Account;
use crate::policy::cost::Priced;
use crate::policy::limits::{Charge, Limits, RetryKey, Verdict};
use crate::response::{Code, Denial};
use sha2::{Digest, Sha256};

/// Where requests are counted: this Envoy's limit shards, or the fleet ledger.
pub trait Counter {
    /// Count this request in `entry` (a credential's `lim`, a parent's `plim`, or a budget),
    /// unless this same request was already admitted there before it parked, and reserve `charge`
    /// (its cost) against `spend` in the same step. The answer says where it counted.
    fn admit(&mut self, entry: &Entry, charge: Option<&Charge>) -> Admitted;
    /// Release what `admit` took in `holder` (the request was refused after all).
    fn release(&mut self, holder: &Holder, charge: &Charge);
}

/// What a request is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The identity of the key that verified the credential (limit entries are per key).
    pub key_id: u64,
    pub jti: String,
    pub lim: Limits,
    pub par: Option<String>,
    /// The identity of the key that signed the parent (its entry is named by it).
    pub par_key_id: u64,
    pub plim: Limits,
    /// When the credential stops being accepted: its entries can go then.
    pub keep_until_s: i64,
    /// When the parent stops being accepted: its entry is kept until then, whatever child asks.
    pub par_keep_until_s: i64,
    /// A digest of the request's `Idempotency-Key` and of what it asks for (target, method and
    /// overrides, path, query): with the body and the cost, it names a retry.
    pub retry_seed: Option<[u8; 32]>,
    /// The ledger's budgets that cover it (indices into `Ledger::budgets`).
    pub budgets: Vec<usize>,
}

impl Ticket {
    /// The ticket of a verified credential, or `None` when it has no limits to count against and
    /// no budget covers it (nothing is allocated then: the common warm path). `retry_seed` is
    /// asked for only if needed.
    pub fn for_claims(
        c: &Claims,
        (key_id, keep_until_s): (u64, i64),
        (par_key_id, par_keep_until_s): (u64, i64),
        budgets: Vec<usize>,
        retry_seed: impl FnOnce() -> Option<[u8; 32]>,
    ) -> Option<Ticket> {
        let counts = !c.lim.is_empty() || (c.par.is_some() && !c.plim.is_empty()) || !budgets.is_empty();
        counts.then(|| Ticket {
            key_id,
            jti: c.jti.clone(),
            lim: c.lim,
            par: c.par.clone(),
            par_key_id,
            plim: c.plim,
            keep_until_s,
            par_keep_until_s,
            retry_seed: retry_seed(),
            budgets,
        })
    }

    fn own(&self) -> bool {
        !self.lim.is_empty()
    }

    fn parents(&self) -> Option<&str> {
        self.par.as_deref().filter(|_| !self.plim.is_empty())
    }
}

/// One entry a request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A credential's (or a parent's, under `plim`), at one stage.
    Credential { key_id: u64, jti: &'a str, lim: &'a Limits, keep_until_s: i64, stage: Stage },
    /// A ledger budget (an index into `Ledger::budgets`).
    Budget(usize),
}

/// The stages a credential's entry is asked at, in this order across all of a request's entries:
/// every `Rate` first, then the budgets, then every `Count`, then every `Spend`. Without a ledger,
/// `Rate` counts the whole entry (rpm, total and spend, in this Envoy) and the other stages are
/// nothing. With a ledger, `Rate` is the per-instance rpm, `Count` takes one from `total` and
/// `Spend` the cost from `spend` in the ledger, a charge with an `Idempotency-Key` directly with
/// its retry mark. Nothing can refuse a request after its `Spend` stages, so a retry mark stands
/// only for a charge that stays (until the vendor refunds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Rate,
    Count,
    Spend,
}

/// Where an admitted request was counted, so that a refusal or a refund can release it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This Envoy's limit entry of a credential.
    Local { key_id: u64, jti: String },
    /// A ledger account: charged to this gateway's slice (`mark` `None`: to lease `lease`), or
    /// directly with a mark; `took`: what it counted there.
    Ledger { account: Account, mark: Option<crate::ledger::Mark>, took: crate::ledger::Amounts, lease: u64 },
}

impl Holder {
    /// A direct ledger charge with a retry mark: once made (or maybe made), it stands, and so does
    /// everything its request was counted in with it.
    pub fn stands(&self) -> bool {
        matches!(self, Holder::Ledger { mark: Some(_), .. })
    }
}

/// What an entry said of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub verdict: Verdict,
    pub holder: Option<Holder>,
}

impl Admitted {
    pub fn admit() -> Admitted {
        Admitted { verdict: Verdict::Admit, holder: None }
    }

    /// Did it let the request through (counted, reserved, or a retry)?
    pub fn ok(&self) -> bool {
        matches!(self.verdict, Verdict::Admit | Verdict::Reserved | Verdict::Retry)
    }
}

/// Why admission stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    Deny(Denial),
    /// The ledger must be asked first (this account, as the `Secrets` implementation numbers it).
    Pending(u64),
}

/// Headers that differ between a request and its retry without changing what it asks the
/// vendor to do: tracing, an SDK's retry count and telemetry, the hop's own, the credential.
/// Every other header is part of the request (a vendor scopes keys by account, API version...).
const NOT_THE_REQUEST: [&str; 28] = [
    ":authority",
    ":scheme",
    ":method",
    ":path",
    "host",
    "authorization",
    "proxy-authorization",
    "idempotency-key",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "expect",
    "date",
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "sentry-trace",
    "x-request-id",
    "x-amzn-trace-id",
    "x-cloud-trace-context",
    "x-stainless-retry-count",
    "x-stainless-timeout",
    "x-stripe-client-telemetry",
    "forwarded",
    "via",
];

/// A digest of the headers that are part of the request (sorted: their order does not matter).
pub fn headers_digest(headers: &crate::host::Headers, credential_header: &str) -> [u8; 32] {
    let volatile = |n: &[u8]| {
        NOT_THE_REQUEST.iter().any(|v| v.as_bytes() == n)
            || n == credential_header.as_bytes()
            || ["x-b3-", "x-datadog-", "x-forwarded-", "x-envoy-", "x-keyward-", "x-real-ip"].iter().any(|p| n.starts_with(p.as_bytes()))
    };
    let mut kept: Vec<(Vec<u8>, &[u8])> = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).filter(|(k, _)| !volatile(k)).collect();
    kept.sort();
    let mut h = Sha256::new();
    for (k, v) in kept {
        h.update((k.len() as u64).to_le_bytes());
        h.update(&k);
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.finalize().into()
}

/// The seed of a request's retry key: everything its headers say it asks for.
pub fn retry_seed(idempotency_key: &str, target: &str, method: &str, overrides: &[String], path: &str, query: &str, headers: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(headers);
    let parts = [b"keyward-retry-v2".as_slice(), idempotency_key.as_bytes(), target.as_bytes(), method.as_bytes(), path.as_bytes(), query.as_bytes()];
    for part in parts.into_iter().chain(overrides.iter().map(String::as_bytes)) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// A retry is the same request: the same seed, the same body byte for byte, the same cost.
fn retry_key(seed: &[u8; 32], p: &Priced, body: &[u8]) -> RetryKey {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(Sha256::digest(body));
    h.update(p.cost.to_le_bytes());
    h.update(p.currency.as_deref().unwrap_or("").as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(d.get(..16).unwrap_or(&[0u8; 16]));
    k
}

/// A cost held against spend caps, to release if the vendor refunds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Where it was reserved.
    pub holders: Vec<Holder>,
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

/// The names of the budgets an admitted request was counted in (none for a retry: it was counted
/// the first time), for the access log.
pub fn budget_names(cfg: &crate::config::Config, t: &Ticket, spend: &Spend) -> Option<String> {
    let ledger = cfg.ledger.as_ref()?;
    if *spend == Spend::Retry || t.budgets.is_empty() {
        return None;
    }
    let names: Vec<&str> = t.budgets.iter().filter_map(|i| ledger.budgets.get(*i)).map(|b| b.name.as_str()).collect();
    Some(names.join(","))
}

/// Count the request of `ticket` (and reserve `priced`'s cost where a spend cap applies). `body`:
/// the request's body, as read to price it (part of what names a retry).
pub fn admit(counter: &mut impl Counter, t: &Ticket, priced: Option<&Priced>, body: &[u8]) -> Result<Spend, Halt> {
    let charge = priced.map(|p| Charge { cost: p.cost, retry: t.retry_seed.as_ref().map(|s| retry_key(s, p, body)) });
    let mut holders: Vec<Holder> = Vec::new();
    // What the budgets took (indices into `holders`): a retry gives back their spend.
    let mut budget_holders: Vec<usize> = Vec::new();
    let (mut reserved, mut fresh, mut retry) = (false, false, false);
    // A derived credential counts against its own limits, and against its parent's entry under
    // the parent's limits (`plim`): the parent and all its children share the parent's budget.
    let mut credentials: Vec<(u64, &str, &Limits, i64)> = Vec::with_capacity(2);
    if t.own() {
        credentials.push((t.key_id, &t.jti, &t.lim, t.keep_until_s));
    }
    if let Some(par) = t.parents() {
        credentials.push((t.par_key_id, par, &t.plim, t.par_keep_until_s));
    }
    let at = |stage: Stage| credentials.iter().map(move |&(key_id, jti, lim, keep_until_s)| Entry::Credential { key_id, jti, lim, keep_until_s, stage });
    let entries: Vec<Entry> = at(Stage::Rate).chain(t.budgets.iter().map(|b| Entry::Budget(*b))).chain(at(Stage::Count)).chain(at(Stage::Spend)).collect();
    for entry in &entries {
        let a = counter.admit(entry, charge.as_ref());
        let budget = matches!(entry, Entry::Budget(_));
        match (&a.verdict, charge) {
            (Verdict::Admit, _) | (Verdict::Reserved, None) => {}
            (Verdict::Reserved, Some(_)) => {
                reserved = true;
                fresh |= !budget;
            }
            (Verdict::Retry, _) => retry = true,
            (refusal, _) => {
                if let Verdict::Pending(account) = refusal {
                    // Asked again once the ledger answered: the entries before are remembered
                    // as admitted by the caller, so nothing is released.
                    return Err(Halt::Pending(*account));
                }
                // What an earlier entry took for this request goes back, unless a direct charge
                // with a retry mark was (or may have been) made for it: that charge stands, and
                // so does everything counted with it (a retry admitted on the mark counts on them).
                if !holders.iter().chain(a.holder.iter()).any(Holder::stands) {
                    let c = charge.unwrap_or(Charge { cost: 0, retry: None });
                    for h in &holders {
                        counter.release(h, &c);
                    }
                }
                return Err(Halt::Deny(denial(*refusal)));
            }
        }
        if let Some(h) = a.holder {
            if budget {
                budget_holders.push(holders.len());
            }
            holders.push(h);
        }
    }
    let Some(c) = charge else { return Ok(Spend::Uncapped) };
    if retry && !fresh {
        // A retry of a charge its credential still holds: it was counted in the budgets the first
        // time, so their share of its spend goes back (what they counted as a request stays).
        for i in budget_holders.iter().rev() {
            if let Some(Holder::Ledger { account, mark, took, lease }) = holders.get(*i).cloned() {
                let spend_only = crate::ledger::Amounts { spend: took.spend, count: 0 };
                if spend_only.spend > 0 {
                    counter.release(&Holder::Ledger { account, mark, took: spend_only, lease }, &c);
                }
                holders.remove(*i);
            }
        }
        return Ok(Spend::Retry);
    }
    Ok(if reserved { Spend::Reserved(Reservation { holders, charge: c }) } else { Spend::Uncapped })
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
        Verdict::BudgetExhausted { retry_after_s, spend: true } => {
            Denial::new(Code::SpendExhausted, "a budget that covers this credential has no room for this request's cost").retry_after(retry_after_s)
        }
        Verdict::BudgetExhausted { retry_after_s, spend: false } => {
            Denial::new(Code::QuotaExhausted, "a budget that covers this credential has no room for another request").retry_after(retry_after_s)
        }
        Verdict::Unavailable => Denial::new(Code::SecretUnavailable, "the spend ledger is unavailable; try again later").retry_after(RETRY_AFTER_UNAVAILABLE_S),
        _ => Denial::new(Code::RateLimited, "too many limited credentials are active; try again later").retry_after(RETRY_AFTER_UNAVAILABLE_S),
    }
}
