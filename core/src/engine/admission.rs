//! Counting a request against its credential's limits, and reserving its cost against `spend`.
//!
//! A credential counts in its own entry under its `lim`; a derived one also in its parent's entry
//! under `plim`. An entry is named by the key that verifies the credential and its `jti`; a
//! parent's entry by the key that signed the parent (the child's `pkid`), so the parent's own
//! requests, its children's and its siblings' count in the same one. A priced request (its target has a `cost` for it) is admitted once its cost is
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
}

impl Ticket {
    /// The ticket of a verified credential, or `None` when it has no limits to count against
    /// (nothing is allocated then: the common warm path). `retry_seed` is asked for only if needed.
    pub fn for_claims(
        c: &Claims,
        (key_id, keep_until_s): (u64, i64),
        (par_key_id, par_keep_until_s): (u64, i64),
        retry_seed: impl FnOnce() -> Option<[u8; 32]>,
    ) -> Option<Ticket> {
        let counts = !c.lim.is_empty() || (c.par.is_some() && !c.plim.is_empty());
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
        })
    }

    fn own(&self) -> bool {
        !self.lim.is_empty()
    }

    fn parents(&self) -> Option<&str> {
        self.par.as_deref().filter(|_| !self.plim.is_empty())
    }
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
pub fn headers_digest(headers: &[(String, Vec<u8>)], credential_header: &str) -> [u8; 32] {
    let volatile = |n: &str| {
        NOT_THE_REQUEST.contains(&n)
            || n == credential_header
            || ["x-b3-", "x-datadog-", "x-forwarded-", "x-envoy-", "x-keyward-", "x-real-ip"].iter().any(|p| n.starts_with(p))
    };
    let mut kept: Vec<(String, &[u8])> = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_slice())).filter(|(k, _)| !volatile(k)).collect();
    kept.sort();
    let mut h = Sha256::new();
    for (k, v) in kept {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
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

/// A cost held against credentials' spend caps, to release if the vendor refunds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The entries that reserved it: the identity of the key that names each, and its `jti`.
    pub holders: Vec<(u64, String)>,
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

/// Count the request of `ticket` (and reserve `priced`'s cost where a spend cap applies). `body`:
/// the request's body, as read to price it (part of what names a retry).
pub fn admit(secrets: &mut impl Secrets, t: &Ticket, priced: Option<&Priced>, body: &[u8]) -> Result<Spend, Denial> {
    let charge = priced.map(|p| Charge { cost: p.cost, retry: t.retry_seed.as_ref().map(|s| retry_key(s, p, body)) });
    let mut spend = Spend::Uncapped;
    let mut holders: Vec<(u64, String)> = Vec::new();
    // A derived credential counts against its own limits, and against its parent's entry under
    // the parent's limits (`plim`): the parent and all its children share the parent's budget.
    let entries = [
        (t.own(), t.key_id, t.jti.as_str(), &t.lim, t.keep_until_s),
        (t.parents().is_some(), t.par_key_id, t.par.as_deref().unwrap_or(""), &t.plim, t.par_keep_until_s),
    ];
    for (applies, key_id, jti, lim, keep_until_s) in entries {
        if !applies {
            continue;
        }
        let verdict = secrets.admit(key_id, jti, lim, keep_until_s, charge.as_ref());
        match (verdict, charge) {
            (Verdict::Admit, _) | (Verdict::Reserved, None) => {}
            (Verdict::Reserved, Some(c)) => {
                holders.push((key_id, jti.to_string()));
                spend = Spend::Reserved(Reservation { holders: holders.clone(), charge: c });
            }
            (Verdict::Retry, _) => {
                if spend == Spend::Uncapped {
                    spend = Spend::Retry;
                }
            }
            (refusal, _) => {
                // What an earlier entry reserved for this request goes back.
                if let Some(c) = &charge {
                    for (key_id, jti) in &holders {
                        secrets.refund(*key_id, jti, c);
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
