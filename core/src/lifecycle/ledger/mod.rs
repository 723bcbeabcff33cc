//! The fleet ledger across events (`crate::ledger`): a request takes what it needs from this
//! gateway's slice of each account (a record in shared data that every worker spends from); a
//! slice that is missing, spent or over is renewed with one call, sent from the root, while the
//! requests that need it park; a charge with an `Idempotency-Key` is reserved directly, so that a
//! retry on another gateway is recognised; the tick gives back what a slice did not use when its
//! lease ends. Every call has the ledger's deadline. A ledger that does not answer, throttles or
//! answers garbage makes the requests that need more than the slice holds 503, for a moment, and
//! the calls resume after it.

mod answers;
mod calls;
mod tick;

use super::state::{JobKind, ReadFor};
use super::{shared, Lifecycle, CALL_GRACE_MS};
use crate::engine::{Admitted, Holder};
use crate::host::{ContextId, Host};
use crate::ledger::dynamo::{self, Item};
use crate::ledger::slice::{Leases, Slice, Take};
use crate::ledger::{Account, Amounts, Ledger};
use crate::policy::limits::Verdict;
use crate::secrets::keys;

/// This gateway stops using a lease this long before the ledger's record of it ends.
pub(in crate::lifecycle) const LEASE_MARGIN_MS: u64 = 500;
/// A lease no request renewed this long after it ended is given back by the tick.
pub(in crate::lifecycle) const RETURN_AFTER_MS: u64 = 1000;
/// A lease is given back within this long after its end (the margin, the tick, the call).
pub(in crate::lifecycle) const RETURNED_BY_S: u64 = 2;
/// Past this long after its end, a lease still held belongs to a gateway that died.
pub(in crate::lifecycle) const COMES_BACK_S: u64 = 6;
/// Other gateways' end marks are kept this long (DynamoDB refuses a signature older than 15
/// minutes, so no replay of their calls lands after it).
pub(in crate::lifecycle) const MARKS_KEPT_S: u64 = 3600;

impl shared::Record for Slice {
    fn decode_record(b: &[u8]) -> Option<Self> {
        Slice::decode(b)
    }
    fn encode_record(&self) -> Vec<u8> {
        self.encode()
    }
}

impl shared::Record for Leases {
    fn decode_record(b: &[u8]) -> Option<Self> {
        Leases::decode(b)
    }
    fn encode_record(&self) -> Vec<u8> {
        self.encode()
    }
}

/// What a request needs from one account.
pub(super) struct Need<'a> {
    pub account: Account,
    pub want: Amounts,
    /// A direct charge's mark (`r_<fingerprint>` for a charge with an `Idempotency-Key`), and
    /// until when it is kept.
    pub direct: Option<(String, u64)>,
    /// What a refusal is: a budget's (`true`), or the credential's own.
    pub budget: bool,
    pub ledger: &'a Ledger,
}

pub(in crate::lifecycle) fn plus(a: Amounts, b: Amounts) -> Amounts {
    Amounts { spend: a.spend.saturating_add(b.spend), count: a.count.saturating_add(b.count) }
}

pub(in crate::lifecycle) fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        s.push_str(&format!("{b:02x}"));
        s
    })
}

/// What taking `amounts` in `account` made of a request: a reservation against a spend cap, or a
/// plain admission.
pub(in crate::lifecycle) fn charged(amounts: Amounts, account: &Account) -> Verdict {
    if amounts.spend > 0 && account.caps.spend.is_some() {
        Verdict::Reserved
    } else {
        Verdict::Admit
    }
}

/// A retry fingerprint's mark.
pub(super) fn retry_mark(key: &[u8; 16]) -> String {
    format!("r_{}", hex(key))
}

impl Lifecycle {
    /// This Envoy's id in the ledger and this worker's number, made once per process (and ledger
    /// configuration: two configurations in one VM are two gateways, each with its own leases)
    /// and worker.
    pub(in crate::lifecycle) fn identities(&mut self, host: &mut impl Host, ledger: &Ledger) -> Option<(String, u64)> {
        if let (Some(g), Some(w)) = (self.ledger.gateway.clone(), self.ledger.worker) {
            return Some((g, w));
        }
        // The clock and the process's hash seed (which std draws from WASI `random_get` or the
        // OS): two Envoys started in the same microsecond still get different ids.
        let seed = self.now_us ^ (u64::from(self.root) << 48) ^ std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), self.root);
        let mut gateway = None;
        for _ in 0..16 {
            let (bytes, cas) = host.shared_get(&keys::gateway_id(ledger));
            if let Some(id) = bytes.and_then(|b| String::from_utf8(b).ok()).filter(|s| s.len() == 16) {
                gateway = Some(id);
                break;
            }
            let id = format!("{:016x}", crate::wire::fnv1a(seed.to_le_bytes()) ^ seed);
            if host.shared_set(&keys::gateway_id(ledger), id.as_bytes(), cas).is_ok() {
                gateway = None; // read it back: another worker may have written at the same time
            }
        }
        let mut worker = None;
        for _ in 0..16 {
            let (bytes, cas) = host.shared_get(keys::LEDGER_WORKERS);
            let n = bytes.as_deref().and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes) + 1;
            if host.shared_set(keys::LEDGER_WORKERS, &n.to_le_bytes(), cas).is_ok() {
                worker = Some(n ^ (seed << 20));
                break;
            }
        }
        self.ledger.gateway = gateway;
        self.ledger.worker = worker;
        Some((self.ledger.gateway.clone()?, self.ledger.worker?))
    }

    pub(in crate::lifecycle) fn account_id(&mut self, account: &Account) -> u64 {
        let st = &mut self.ledger;
        if let Some(id) = st.ids.get(&account.pk) {
            return *id;
        }
        st.next_id += 1;
        let id = st.next_id;
        st.ids.insert(account.pk.clone(), id);
        st.accounts.insert(
            id,
            super::state::AccountLocal { account: account.clone(), following: false, left: None, prune: Vec::new(), marks: 0, expired_marks: Vec::new() },
        );
        id
    }

    /// Count a request in one ledger account: from this gateway's slice, or directly. `Pending`:
    /// the ledger is being asked; the request parks and decides again when it answers.
    pub(super) fn ledger_admit(&mut self, host: &mut impl Host, ctx: ContextId, need: &Need, now_ms: u64) -> Admitted {
        let id = self.account_id(&need.account);
        let caps = need.account.caps;
        let refused = |retry_after_s: u32| {
            let spend = need.want.spend > 0 && caps.spend.is_some();
            let verdict = match (need.budget, spend) {
                (true, spend) => Verdict::BudgetExhausted { retry_after_s, spend },
                (false, true) => Verdict::SpendExhausted { retry_after_s },
                (false, false) => Verdict::Exhausted { retry_after_s },
            };
            Admitted { verdict, holder: None }
        };
        // More than the cap itself never fits, whatever the ledger holds: refused at once, until
        // the account ends (a new month for a budget).
        if caps.spend.is_some_and(|c| need.want.spend > c) || caps.count.is_some_and(|c| need.want.count > c) {
            let ends_in = need.account.ends_s.saturating_sub(now_ms / 1000);
            return refused(u32::try_from(ends_in.max(1)).unwrap_or(u32::MAX));
        }
        if let Some((mark, until_s)) = &need.direct {
            // The value names this charge: the clock and this worker, so that no two charges of
            // the same fingerprint share one (a refund removes its own charge only).
            let nonce = self.now_us ^ self.ledger.worker.unwrap_or(0).rotate_left(7);
            let mark = crate::ledger::Mark::new(mark.clone(), *until_s, nonce);
            if let Some(done) = self.ledger.results.remove(&(ctx, id)) {
                return done;
            }
            if self.direct_in_flight(ctx) {
                return Admitted { verdict: Verdict::Pending(id), holder: None };
            }
            let kind = JobKind::Direct { ctx, amounts: need.want, mark };
            self.queue_job(host, id, kind);
            return Admitted { verdict: Verdict::Pending(id), holder: None };
        }
        let key = keys::ledger_slice(need.ledger, &need.account.pk);
        let Some((_, worker)) = self.identities(host, need.ledger) else { return Admitted { verdict: Verdict::Unavailable, holder: None } };
        let job_until = now_ms + u64::from(need.ledger.timeout_ms) + CALL_GRACE_MS;
        let mut outcome = Take::Failing;
        let mut claimed = false;
        let mut lease = 0;
        let wrote = shared::update::<Slice>(host, &key, |s| {
            outcome = s.take(need.want, caps, now_ms);
            lease = s.lease_id;
            claimed = outcome == Take::Renew && s.claim_job(worker, job_until, now_ms);
            outcome == Take::Taken || claimed
        });
        if wrote.is_none() {
            return Admitted { verdict: Verdict::Unavailable, holder: None };
        }
        match outcome {
            Take::Taken => {
                let verdict = charged(need.want, &need.account);
                Admitted { verdict, holder: Some(Holder::Ledger { account: need.account.clone(), mark: None, took: need.want, lease }) }
            }
            Take::NoRoom { retry_after_s } => refused(retry_after_s),
            Take::Failing => Admitted { verdict: Verdict::Unavailable, holder: None },
            Take::Renew => {
                if claimed {
                    self.queue_grant(host, id, need.want, now_ms);
                } else if let Some(a) = self.ledger.accounts.get_mut(&id) {
                    a.following = true; // another worker is asking; the tick watches its answer
                }
                Admitted { verdict: Verdict::Pending(id), holder: None }
            }
        }
    }

    /// Give back what `holder` took for a request that was refused after all.
    pub(super) fn ledger_release(&mut self, host: &mut impl Host, ledger: &Ledger, holder: &Holder) {
        let Holder::Ledger { account, mark, took, lease } = holder else { return };
        let (took, lease) = (*took, *lease);
        let _ = &self.ledger;
        match mark {
            None => {
                let key = keys::ledger_slice(ledger, &account.pk);
                let caps = account.caps;
                let _ = shared::update::<Slice>(host, &key, |s| {
                    s.untake(took, caps, lease);
                    true
                });
            }
            // A charge made with a retry mark stands once made, even for a request refused or
            // abandoned after it: a retry on another gateway may already have been let through
            // on that mark. Only the vendor's refund takes it back. (Over-counted, never under.)
            Some(_) => log::debug!("a direct charge on {} stays: its mark may already have admitted a retry", account.pk),
        }
    }

    /// The account holds few enough retry marks for another (its item stays small to read back).
    pub(super) fn ledger_marks_room(&self, account: &Account) -> bool {
        self.ledger.ids.get(&account.pk).and_then(|id| self.ledger.accounts.get(id)).is_none_or(|a| a.marks < dynamo::MAX_MARKS)
    }

    /// Remember what the item says of the account's marks.
    pub(in crate::lifecycle) fn saw_marks(&mut self, id: u64, item: &Item, now_s: u64) {
        if let Some(a) = self.ledger.accounts.get_mut(&id) {
            a.marks = item.marks.len();
            let expired: Vec<&String> = item.marks.iter().filter(|(_, v)| crate::ledger::Mark::until_s(*v) < now_s).map(|(m, _)| m).take(16).collect();
            let pins = expired.iter().map(|m| crate::ledger::Mark::pin_of(m)).filter(|p| item.pins.contains(p)).collect::<Vec<_>>();
            a.expired_marks = expired.into_iter().cloned().chain(pins).collect();
        }
    }

    /// The vendor refunded a charge: its spend goes back where it was reserved.
    pub(super) fn ledger_refund(&mut self, host: &mut impl Host, ledger: &Ledger, holder: &Holder, cost: u64) {
        let Holder::Ledger { account, mark, took, .. } = holder else { return };
        let cost = cost.min(took.spend);
        if account.caps.spend.is_none() || cost == 0 {
            return;
        }
        match mark {
            None => {
                let key = keys::ledger_slice(ledger, &account.pk);
                let _ = shared::update::<Slice>(host, &key, |s| {
                    s.refund(cost);
                    true
                });
            }
            Some(m) => self.refund_direct(host, account, Amounts { spend: cost, count: 0 }, m),
        }
    }

    pub(in crate::lifecycle) fn refund_direct(&mut self, host: &mut impl Host, account: &Account, amounts: Amounts, mark: &crate::ledger::Mark) {
        let id = self.account_id(account);
        self.queue_job(host, id, JobKind::Refund { amounts, mark: mark.clone(), tries: 0 });
    }

    /// Does stream `ctx` wait on a direct charge in flight?
    pub(super) fn direct_in_flight(&self, ctx: ContextId) -> bool {
        self.ledger
            .jobs
            .values()
            .any(|j| {
                matches!(&j.kind, JobKind::Direct { ctx: c, .. } | JobKind::Pin { ctx: c, .. } | JobKind::Read { then: ReadFor::Direct { ctx: c, .. } | ReadFor::DirectLost { ctx: c, .. } } if *c == ctx)
            })
    }
}
