//! Per-credential limits from the token's `lim` claim, counted per `jti`.
//!
//! `rpm = N`: at most N admitted requests in any 60-second window. Time is kept in one-second
//! buckets, and a check counts the 61 buckets that can overlap the last 60 seconds. A request is
//! therefore forgotten only once it is strictly more than 60 s old, so the guarantee holds for
//! every window, at the price of a request counting for up to 61 s.
//!
//! `total = N`: at most N admitted requests over the credential's lifetime.
//!
//! `spend = N`: the costs of its admitted requests (`policy::cost`) add up to at most N over its
//! lifetime. A cost is reserved with the request, atomically with its counts, and released only
//! by a refund (the vendor said the charge did not happen). A reservation made with an
//! `Idempotency-Key` is remembered (`Held`, the most recent `MAX_HELD` per credential, for at most
//! `RETRY_WINDOW_S`): the same request again with the same key is a retry the vendor will
//! deduplicate, admitted without a second reservation.
//!
//! Counters live in Envoy shared data so that every worker sees them, and are updated with
//! compare-and-swap (the glue retries on a CAS mismatch). Records are spread over a fixed set of
//! shard keys and each record is dropped once its credential can no longer be accepted, so the
//! memory used is bounded by the credentials that are alive, never by the history.
//!
//! Shard layout: `"KWL2" | n u32 | n records`, a record being
//! `jti_len u16 | jti | keep_until_s u64 | used u64 | head_s u64 | nb u8 | nb * (age u8, count u32)
//!  | spent u64 | nh u8 | nh * (key [u8; 16], cost u64, until_s u64)`
//! where bucket `head_s - age` holds `count` requests. All integers are little-endian. A `"KWL1"`
//! shard (an earlier version's, without spend) is read as having spent nothing.

use crate::wire::Reader;

const MAGIC: &[u8; 4] = b"KWL2";
const MAGIC_V1: &[u8; 4] = b"KWL1";
/// Reservations remembered per credential for retries (the oldest is forgotten first: a retry
/// it would have matched is then charged again, never less).
pub const MAX_HELD: usize = 64;
/// How long a reservation is remembered for a retry, at most: Stripe keeps an idempotency key
/// for at least 24 hours.
pub const RETRY_WINDOW_S: u64 = 86_400;
/// Shared-data keys holding the counters (named by `secrets::keys`). A fixed number, created once
/// at configure time.
pub const SHARDS: u32 = 32;
/// Buckets that may overlap a 60 s window that ends now.
const WINDOW_BUCKETS: u64 = 61;
/// Live limited credentials per shard before new ones are refused (fail closed).
pub const MAX_RECORDS_PER_SHARD: usize = 4096;
/// A `jti` longer than this is not a valid claim (see `token`), so it never reaches here.
const MAX_JTI: usize = 1024;

/// A credential's own limits (its `lim` claim): requests per minute and in all, and the sum of
/// their costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub total: Option<u64>,
    pub spend: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.total.is_none() && self.spend.is_none()
    }
}

/// What identifies a retry: a digest of the `Idempotency-Key` and of what the request charges
/// (target, method, path, cost, currency), so a key reused for another charge is not a retry.
pub type RetryKey = [u8; 16];

/// A cost to reserve with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub cost: u64,
    pub retry: Option<RetryKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Admitted, and its cost reserved against `spend`.
    Reserved,
    /// Admitted as a retry of a request whose reservation is held: nothing reserved again.
    Retry,
    /// Its cost does not fit in what is left of `spend`; the credential expires in this many
    /// seconds (at least 1).
    SpendExhausted {
        retry_after_s: u32,
    },
    /// `rpm` reached: try again after this many seconds.
    RateLimited {
        retry_after_s: u32,
    },
    /// `total` reached: the credential will not be admitted again before it expires in this
    /// many seconds (at least 1).
    Exhausted {
        retry_after_s: u32,
    },
    /// The shard has no room for another live credential: refused, never admitted uncounted.
    Full,
    /// A budget that covers the request has no room for it (`spend`: for its cost; otherwise
    /// for one more request); room may come back in `retry_after_s` (the window's end, or a
    /// gateway giving back what it did not use).
    BudgetExhausted {
        retry_after_s: u32,
        spend: bool,
    },
    /// The fleet ledger must be asked first (the account, as the lifecycle numbers it).
    Pending(u64),
    /// The fleet ledger is unreachable, throttling or answering garbage: refused (503).
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    jti: String,
    keep_until_s: u64,
    used: u64,
    head_s: u64,
    /// (age in seconds behind `head_s`, count), ages strictly increasing, all < WINDOW_BUCKETS.
    buckets: Vec<(u8, u32)>,
    /// The costs reserved and not refunded.
    spent: u64,
    held: Vec<Held>,
}

/// A reservation made with an `Idempotency-Key`, remembered for a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    key: RetryKey,
    cost: u64,
    until_s: u64,
    /// A retry was admitted on it: the vendor may have done that one, so a refund status of the
    /// first no longer takes the reservation back. (Encoded as the top bit of `until_s`.)
    pinned: bool,
}

const PINNED: u64 = 1 << 63;

impl Record {
    /// Requests admitted in buckets `[now_s - 60 + shift, now_s]`.
    fn in_window(&self, now_s: u64, shift: u64) -> u64 {
        let oldest = (now_s + shift).saturating_sub(WINDOW_BUCKETS - 1);
        self.buckets.iter().filter(|(age, _)| self.head_s.saturating_sub(u64::from(*age)) >= oldest).map(|(_, c)| u64::from(*c)).sum()
    }

    /// Count one request at second `now_s`, dropping buckets that left the window.
    fn count(&mut self, now_s: u64) {
        let advance = now_s.saturating_sub(self.head_s);
        self.head_s = self.head_s.max(now_s);
        let mut kept: Vec<(u8, u32)> = Vec::with_capacity(self.buckets.len() + 1);
        let mut added = false;
        for (age, c) in &self.buckets {
            let age = u64::from(*age) + advance;
            if age >= WINDOW_BUCKETS {
                continue;
            }
            // `age < 61` fits in a u8.
            let age = age as u8;
            if age == 0 {
                kept.push((0, c.saturating_add(1)));
                added = true;
            } else {
                kept.push((age, *c));
            }
        }
        if !added {
            kept.insert(0, (0, 1));
        }
        self.buckets = kept;
        self.used = self.used.saturating_add(1);
    }
}

/// One shard's records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    records: Vec<Record>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Requests admitted so far for `jti` (for tests and diagnostics).
    pub fn used(&self, jti: &str) -> u64 {
        self.records.iter().find(|r| r.jti == jti).map_or(0, |r| r.used)
    }

    /// The costs reserved for `jti` and not refunded (for tests and diagnostics).
    pub fn spent(&self, jti: &str) -> u64 {
        self.records.iter().find(|r| r.jti == jti).map_or(0, |r| r.spent)
    }

    /// Decide one request of credential `jti` at `now_s`, and count it if admitted.
    /// `keep_until_s` is when the credential stops being accepted (exp plus clock skew); the
    /// record is dropped after that. Records of other credentials that expired are dropped too.
    pub fn admit(&mut self, jti: &str, lim: &Limits, keep_until_s: i64, now_s: u64) -> Verdict {
        self.admit_charged(jti, lim, keep_until_s, now_s, None)
    }

    /// `admit`, reserving `charge`'s cost against `lim.spend` (when the credential has one) in the
    /// same step: a request refused for its counts reserves nothing, a request refused for its
    /// cost is not counted.
    pub fn admit_charged(&mut self, jti: &str, lim: &Limits, keep_until_s: i64, now_s: u64, charge: Option<&Charge>) -> Verdict {
        self.records.retain(|r| r.keep_until_s > now_s);
        let keep_until_s = u64::try_from(keep_until_s).unwrap_or(0).max(now_s + 1);
        let i = match self.records.iter().position(|r| r.jti == jti) {
            Some(i) => i,
            None => {
                if self.records.len() >= MAX_RECORDS_PER_SHARD || jti.len() > MAX_JTI {
                    return Verdict::Full;
                }
                self.records.push(Record { jti: jti.to_string(), keep_until_s, used: 0, head_s: now_s, buckets: Vec::new(), spent: 0, held: Vec::new() });
                self.records.len() - 1
            }
        };
        let Some(r) = self.records.get_mut(i) else { return Verdict::Full };
        r.keep_until_s = r.keep_until_s.max(keep_until_s);
        if let Some(total) = lim.total {
            if r.used >= total {
                let left = r.keep_until_s.saturating_sub(now_s).clamp(1, u64::from(u32::MAX));
                return Verdict::Exhausted { retry_after_s: left as u32 };
            }
        }
        if let Some(rpm) = lim.rpm {
            if r.in_window(now_s, 0) >= rpm {
                // The first second from which the window holds fewer than `rpm` requests.
                let wait = (1..=WINDOW_BUCKETS).find(|k| r.in_window(now_s, *k) < rpm).unwrap_or(WINDOW_BUCKETS);
                return Verdict::RateLimited { retry_after_s: wait as u32 };
            }
        }
        let (Some(cap), Some(charge)) = (lim.spend, charge) else {
            r.count(now_s);
            return Verdict::Admit;
        };
        r.held.retain(|h| h.until_s > now_s);
        if let Some(key) = charge.retry {
            if let Some(h) = r.held.iter_mut().find(|h| h.key == key && h.cost == charge.cost) {
                h.pinned = true;
                r.count(now_s);
                return Verdict::Retry;
            }
        }
        match r.spent.checked_add(charge.cost) {
            Some(after) if after <= cap => r.spent = after,
            _ => {
                let left = r.keep_until_s.saturating_sub(now_s).clamp(1, u64::from(u32::MAX));
                return Verdict::SpendExhausted { retry_after_s: left as u32 };
            }
        }
        if let Some(key) = charge.retry {
            if r.held.len() >= MAX_HELD {
                r.held.remove(0);
            }
            r.held.push(Held { key, cost: charge.cost, until_s: r.keep_until_s.min(now_s + RETRY_WINDOW_S), pinned: false });
        }
        r.count(now_s);
        Verdict::Reserved
    }

    /// Release a reservation of `jti` (the vendor said the charge did not happen): its cost is
    /// spendable again and a retry with its key is charged anew. `false`: nothing to release (the
    /// record is gone with its credential).
    pub fn refund(&mut self, jti: &str, charge: &Charge) -> bool {
        let Some(r) = self.records.iter_mut().find(|r| r.jti == jti) else { return false };
        if let Some(key) = charge.retry {
            if let Some(i) = r.held.iter().position(|h| h.key == key && h.cost == charge.cost) {
                if r.held.get(i).is_some_and(|h| h.pinned) {
                    // A retry went to the vendor on this reservation: it stays (over-counted,
                    // never under).
                    return true;
                }
                r.held.remove(i);
            }
        }
        r.spent = r.spent.saturating_sub(charge.cost);
        true
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.records.len() * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for r in &self.records {
            out.extend_from_slice(&(r.jti.len() as u16).to_le_bytes());
            out.extend_from_slice(r.jti.as_bytes());
            out.extend_from_slice(&r.keep_until_s.to_le_bytes());
            out.extend_from_slice(&r.used.to_le_bytes());
            out.extend_from_slice(&r.head_s.to_le_bytes());
            out.push(r.buckets.len() as u8);
            for (age, c) in &r.buckets {
                out.push(*age);
                out.extend_from_slice(&c.to_le_bytes());
            }
            out.extend_from_slice(&r.spent.to_le_bytes());
            out.push(r.held.len() as u8);
            for h in &r.held {
                out.extend_from_slice(&h.key);
                out.extend_from_slice(&h.cost.to_le_bytes());
                out.extend_from_slice(&(h.until_s | if h.pinned { PINNED } else { 0 }).to_le_bytes());
            }
        }
        out
    }

    /// `None` when the bytes are not a table this version wrote.
    pub fn decode(b: &[u8]) -> Option<Table> {
        let mut rd = Reader::new(b);
        let v2 = match rd.take(4)? {
            m if m == MAGIC => true,
            m if m == MAGIC_V1 => false,
            _ => return None,
        };
        let n = rd.u32()? as usize;
        if n > MAX_RECORDS_PER_SHARD {
            return None;
        }
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            let jl = usize::from(rd.u16()?);
            let jti = String::from_utf8(rd.take(jl)?.to_vec()).ok()?;
            let keep_until_s = rd.u64()?;
            let used = rd.u64()?;
            let head_s = rd.u64()?;
            let nb = usize::from(rd.u8()?);
            let mut buckets = Vec::with_capacity(nb);
            for _ in 0..nb {
                let age = rd.u8()?;
                if u64::from(age) >= WINDOW_BUCKETS {
                    return None;
                }
                buckets.push((age, rd.u32()?));
            }
            let (mut spent, mut held) = (0, Vec::new());
            if v2 {
                spent = rd.u64()?;
                let nh = usize::from(rd.u8()?);
                if nh > MAX_HELD {
                    return None;
                }
                for _ in 0..nh {
                    let key: RetryKey = rd.take(16)?.try_into().ok()?;
                    let (cost, until) = (rd.u64()?, rd.u64()?);
                    held.push(Held { key, cost, until_s: until & !PINNED, pinned: until & PINNED != 0 });
                }
            }
            records.push(Record { jti, keep_until_s, used, head_s, buckets, spent, held });
        }
        if !rd.done() {
            return None;
        }
        Some(Table { records })
    }
}

#[cfg(test)]
mod tests;
