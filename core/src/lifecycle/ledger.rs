//! The fleet ledger across events (`crate::ledger`): a request takes what it needs from this
//! gateway's slice of each account (a record in shared data that every worker spends from); a
//! slice that is missing, spent or over is renewed with one call, sent from the root, while the
//! requests that need it park; a charge with an `Idempotency-Key` is reserved directly, so that a
//! retry on another gateway is recognised; the tick gives back what a slice did not use when its
//! lease ends. Every call has the ledger's deadline. A ledger that does not answer, throttles or
//! answers garbage makes the requests that need more than the slice holds 503, for a moment, and
//! the calls resume after it.

use super::state::{Job, JobKind, ReadFor};
use super::{shared, Answer, Lifecycle, CALL_GRACE_MS};
use crate::engine::{Admitted, Holder};
use crate::host::{ContextId, Host};
use crate::ledger::dynamo::{self, Change, Item, Lease};
use crate::ledger::slice::{self, Block, Leases, Slice, Take};
use crate::ledger::{Account, Amounts, Ledger};
use crate::policy::limits::Verdict;
use crate::record::Family;
use crate::secrets::keys;

/// This gateway stops using a lease this long before the ledger's record of it ends.
const LEASE_MARGIN_MS: u64 = 500;
/// A lease no request renewed this long after it ended is given back by the tick.
const RETURN_AFTER_MS: u64 = 1000;
/// A lease is given back within this long after its end (the margin, the tick, the call).
const RETURNED_BY_S: u64 = 2;
/// Past this long after its end, a lease still held belongs to a gateway that died.
const COMES_BACK_S: u64 = 6;
/// Other gateways' end marks are kept this long (DynamoDB refuses a signature older than 15
/// minutes, so no replay of their calls lands after it).
const MARKS_KEPT_S: u64 = 3600;

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

fn plus(a: Amounts, b: Amounts) -> Amounts {
    Amounts { spend: a.spend.saturating_add(b.spend), count: a.count.saturating_add(b.count) }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        s.push_str(&format!("{b:02x}"));
        s
    })
}

/// A retry fingerprint's mark.
pub(super) fn retry_mark(key: &[u8; 16]) -> String {
    format!("r_{}", hex(key))
}

impl Lifecycle {
    /// This Envoy's id in the ledger and this worker's number, made once per process (and ledger
    /// configuration: two configurations in one VM are two gateways, each with its own leases)
    /// and worker.
    fn identities(&mut self, host: &mut impl Host, ledger: &Ledger) -> Option<(String, u64)> {
        if let (Some(g), Some(w)) = (self.ledger.gateway.clone(), self.ledger.worker) {
            return Some((g, w));
        }
        // The clock and the process's hash seed (which std draws from WASI `random_get` or the
        // OS): two Envoys started in the same microsecond still get different ids.
        let seed = host.now_us() ^ (u64::from(self.root) << 48) ^ std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), self.root);
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

    fn account_id(&mut self, account: &Account) -> u64 {
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
            if let Some(done) = self.ledger.results.remove(&(ctx, id)) {
                return done;
            }
            if self.direct_in_flight(ctx) {
                return Admitted { verdict: Verdict::Pending(id), holder: None };
            }
            let kind = JobKind::Direct { ctx, amounts: need.want, mark: mark.clone(), until_s: *until_s };
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
                let verdict = if need.want.spend > 0 && caps.spend.is_some() { Verdict::Reserved } else { Verdict::Admit };
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
    fn saw_marks(&mut self, id: u64, item: &Item, now_s: u64) {
        if let Some(a) = self.ledger.accounts.get_mut(&id) {
            a.marks = item.marks.len();
            a.expired_marks = item.marks.iter().filter(|(_, until)| *until < now_s).map(|(m, _)| m.clone()).take(16).collect();
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

    fn refund_direct(&mut self, host: &mut impl Host, account: &Account, amounts: Amounts, mark: &str) {
        let id = self.account_id(account);
        self.queue_job(host, id, JobKind::Refund { amounts, mark: mark.to_string(), tries: 0 });
    }

    /// Ask the ledger for a new lease on account `id` (this worker holds the slice's job).
    fn queue_grant(&mut self, host: &mut impl Host, id: u64, want: Amounts, now_ms: u64) {
        self.queue_job(host, id, JobKind::Grant { want, resolved: None });
        let _ = now_ms;
    }

    fn queue_job(&mut self, host: &mut impl Host, account: u64, kind: JobKind) {
        let st = &mut self.ledger;
        st.next_job += 1;
        let id = st.next_job;
        st.jobs.insert(id, Job { account, kind, call: None, deadline_ms: 0 });
        if self.in_root {
            self.pump_ledger(host);
        } else {
            self.want_root(host);
        }
    }

    /// Send the queued ledger calls (root events only).
    pub(super) fn pump_ledger(&mut self, host: &mut impl Host) {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.clone()) else {
            self.ledger.jobs.clear();
            return;
        };
        let queued: Vec<u64> = self.ledger.jobs.iter().filter(|(_, j)| j.call.is_none()).map(|(i, _)| *i).collect();
        for job in queued {
            let now_ms = host.now_ms();
            let Some(call) = self.job_call(host, &ledger, job, now_ms) else { continue };
            match self.send(host, &call) {
                Ok(call_id) => {
                    self.calls.insert(call_id, super::Purpose::Ledger(job));
                    let deadline_ms = now_ms + u64::from(ledger.timeout_ms) + CALL_GRACE_MS;
                    if let Some(j) = self.ledger.jobs.get_mut(&job) {
                        j.call = Some(call_id);
                        j.deadline_ms = deadline_ms;
                    }
                    self.hold_job(host, &ledger, job, deadline_ms);
                }
                Err(_) => self.job_done(host, &ledger, job, Answer::failed()),
            }
        }
    }

    /// A call on this gateway's slice is under way until `until_ms`: the slice's job says so
    /// (a follow-up call, a read after a refusal say, keeps the job past the first call's deadline).
    fn hold_job(&mut self, host: &mut impl Host, ledger: &Ledger, job: u64, until_ms: u64) {
        let Some(j) = self.ledger.jobs.get(&job) else { return };
        if matches!(j.kind, JobKind::Direct { .. } | JobKind::Refund { .. } | JobKind::Read { then: ReadFor::Direct { .. } }) {
            return;
        }
        let (Some(worker), Some(a)) = (self.ledger.worker, self.ledger.accounts.get(&j.account)) else { return };
        let key = keys::ledger_slice(ledger, &a.account.pk);
        let _ = shared::update::<Slice>(host, &key, |s| {
            s.job_owner = worker;
            s.job_until_ms = s.job_until_ms.max(until_ms);
            true
        });
    }

    /// The call a job makes now (a grant is sized from the slice as it is).
    fn job_call(&mut self, host: &mut impl Host, ledger: &Ledger, job: u64, now_ms: u64) -> Option<crate::secrets::store::HttpCall> {
        let (gateway, _) = self.identities(host, ledger)?;
        let (account_id, kind) = self.ledger.jobs.get(&job).map(|j| (j.account, j.kind.clone()))?;
        let a = self.ledger.accounts.get(&account_id)?;
        let account = a.account.clone();
        let left = a.left;
        let prune = if matches!(kind, JobKind::Grant { .. }) {
            self.ledger.accounts.get_mut(&account_id).map(|a| std::mem::take(&mut a.prune)).unwrap_or_default()
        } else {
            Vec::new()
        };
        let change = match &kind {
            JobKind::Grant { want, .. } => {
                let key = keys::ledger_slice(ledger, &account.pk);
                let s: Slice = shared::read(host, &key);
                let expires_s = now_ms / 1000 + u64::from(ledger.lease_s);
                let (lease, old, add) = if s.pending_seq != 0 {
                    // Asked before with no answer: asked again exactly as it was (made at most once).
                    let old = (s.pending_seq > 1).then_some((s.pending_id, s.pending_seq - 1));
                    let total = if old.is_some() { plus(s.granted, s.pending) } else { s.pending };
                    (Lease { id: s.pending_id, seq: s.pending_seq, granted: total, expires_s }, old, s.pending)
                } else {
                    let add = slice::next_grant(&s, *want, account.caps, left, u64::from(ledger.lease_s) * 1000, now_ms);
                    if s.lease_id != 0 {
                        // A top-up of the lease this gateway holds: what it did not use stays in it.
                        (Lease { id: s.lease_id, seq: s.seq + 1, granted: plus(s.granted, add), expires_s }, Some((s.lease_id, s.seq)), add)
                    } else {
                        // Ids grow with time (microseconds: 53 bits, an exact number wherever the
                        // item is read), so that a replayed first grant never lands again.
                        let id = (host.now_us() & ((1 << 53) - 1)).max(s.last_id + 1);
                        (Lease { id, seq: 1, granted: add, expires_s }, None, add)
                    }
                };
                let _ = shared::update::<Slice>(host, &key, |s| {
                    s.pending_id = lease.id;
                    s.pending_seq = lease.seq;
                    s.pending = add;
                    s.last_id = s.last_id.max(lease.id);
                    true
                });
                if let Some(j) = self.ledger.jobs.get_mut(&job) {
                    j.kind = JobKind::Grant { want: *want, resolved: Some(lease) };
                }
                Change::Grant { gateway, old, add, new: lease, prune }
            }
            JobKind::Return { old, back, .. } => Change::Return { gateway, old: *old, back: *back, at_s: now_ms / 1000 },
            JobKind::Direct { amounts, mark, until_s, .. } => {
                let prune = self.ledger.accounts.get_mut(&account_id).map(|a| std::mem::take(&mut a.expired_marks)).unwrap_or_default();
                Change::Direct { amounts: *amounts, mark: mark.clone(), until_s: *until_s, prune }
            }
            JobKind::Refund { amounts, mark, .. } => Change::Refund { amounts: *amounts, mark: mark.clone() },
            JobKind::Read { .. } => return Some(dynamo::read(ledger, &account)),
        };
        Some(dynamo::update(ledger, &account, &change))
    }

    /// A ledger call answered (or failed, or was given up at its deadline).
    pub(super) fn on_ledger_answer(&mut self, host: &mut impl Host, job: u64, answer: Answer) {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.clone()) else { return };
        self.job_done(host, &ledger, job, answer);
    }

    fn job_done(&mut self, host: &mut impl Host, ledger: &Ledger, job: u64, answer: Answer) {
        let Some(j) = self.ledger.jobs.remove(&job) else { return };
        let Some(account) = self.ledger.accounts.get(&j.account).map(|a| a.account.clone()) else { return };
        let read = dynamo::answer(&account, answer.status, answer.body.as_deref());
        let op = match &j.kind {
            JobKind::Grant { .. } => "grant",
            JobKind::Return { .. } => "return",
            JobKind::Direct { .. } => "direct",
            JobKind::Refund { .. } => "refund",
            JobKind::Read { .. } => "read",
        };
        let result = match &read {
            dynamo::Answer::Done(_) => "ok",
            dynamo::Answer::ConditionFailed => "condition",
            dynamo::Answer::Throttled => "throttled",
            dynamo::Answer::Failed(_) => "error",
        };
        host.count(Family::LedgerCalls, &[op, result], 1);
        if let dynamo::Answer::Failed(why) = &read {
            log::warn!("ledger {} ({op} on {}): {why}", ledger.table, account.pk);
        }
        let now_ms = host.now_ms();
        let key = keys::ledger_slice(ledger, &account.pk);
        let gateway = self.ledger.gateway.clone().unwrap_or_default();
        match j.kind {
            JobKind::Grant { want, resolved } => {
                let Some(lease) = resolved else { return };
                match read {
                    dynamo::Answer::Done(Some(item)) => match item.lease_of(&gateway) {
                        Some(l) if l.id == lease.id && l.seq == lease.seq => self.granted(host, ledger, j.account, &key, &item, &l.clone(), now_ms),
                        _ => self.ledger_failed(host, j.account, &key, now_ms),
                    },
                    dynamo::Answer::ConditionFailed => {
                        self.queue_job(host, j.account, JobKind::Read { then: ReadFor::Grant { want, lease } });
                    }
                    _ => self.ledger_failed(host, j.account, &key, now_ms),
                }
            }
            JobKind::Read { then } => match (read, then) {
                (dynamo::Answer::Done(item), ReadFor::Grant { want, lease }) => {
                    let item = item.unwrap_or_default();
                    match item.lease_of(&gateway).copied() {
                        // The grant asked for before was made after all.
                        Some(l) if l.id == lease.id && l.seq == lease.seq => self.granted(host, ledger, j.account, &key, &item, &l, now_ms),
                        _ => self.no_room_or_smaller(host, ledger, j.account, &key, &item, want, now_ms),
                    }
                }
                (dynamo::Answer::Done(item), ReadFor::Direct { ctx, amounts, mark }) => {
                    if let Some(i) = &item {
                        self.saw_marks(j.account, i, now_ms / 1000);
                    }
                    let verdict = if item.is_some_and(|i| i.has_mark(&mark)) && mark.starts_with("r_") {
                        Verdict::Retry
                    } else {
                        let retry_after_s = self.room_back_in(&account, None, now_ms);
                        if amounts.spend > 0 && account.caps.spend.is_some() {
                            Verdict::SpendExhausted { retry_after_s }
                        } else {
                            Verdict::Exhausted { retry_after_s }
                        }
                    };
                    self.direct_result(host, ctx, j.account, Admitted { verdict, holder: None });
                }
                (dynamo::Answer::Done(item), ReadFor::Return { old, credit }) => {
                    match item.as_ref().and_then(|i| i.lease_of(&gateway).copied().map(|l| (i, l))) {
                        // Still ours, grown by a top-up whose answer was lost: take it as it is; the
                        // tick gives it back again, counted from that.
                        Some((i, l)) if l.id == old => self.granted(host, ledger, j.account, &key, i, &l, now_ms),
                        // Gone: this return was made before, its answer lost.
                        _ => self.lease_gone(host, ledger, j.account, &key, old, credit),
                    }
                }
                (dynamo::Answer::Done(item), ReadFor::Settle { id, seq }) => match item.as_ref().and_then(|i| i.lease_of(&gateway).copied().map(|l| (i, l))) {
                    Some((i, l)) if l.id == id && l.seq == seq => self.granted(host, ledger, j.account, &key, i, &l, now_ms),
                    // Not made: nothing is held for it.
                    ours => {
                        let _ = shared::update::<Slice>(host, &key, |s| {
                            if s.pending_id == id && s.pending_seq == seq {
                                s.pending_id = 0;
                                s.pending_seq = 0;
                                s.pending = Amounts::default();
                            }
                            if ours.is_none_or(|(_, l)| l.id != s.lease_id) && s.lease_id != 0 && s.pending_seq == 0 {
                                s.lost(); // the ledger holds no lease of ours by that id
                            }
                            s.job_until_ms = 0;
                            true
                        });
                        self.wake_ledger(host, j.account);
                    }
                },
                (_, ReadFor::Grant { .. } | ReadFor::Return { .. } | ReadFor::Settle { .. }) => self.ledger_failed(host, j.account, &key, now_ms),
                (_, ReadFor::Direct { ctx, .. }) => self.direct_result(host, ctx, j.account, Admitted { verdict: Verdict::Unavailable, holder: None }),
            },
            JobKind::Direct { ctx, amounts, mark, .. } => match read {
                // Made: the item carries the mark (an answer without it is not this change's).
                dynamo::Answer::Done(Some(item)) if item.has_mark(&mark) => {
                    self.saw_marks(j.account, &item, now_ms / 1000);
                    let verdict = if amounts.spend > 0 && account.caps.spend.is_some() { Verdict::Reserved } else { Verdict::Admit };
                    let holder = Holder::Ledger { account: account.clone(), mark: Some(mark), took: amounts, lease: 0 };
                    self.direct_result(host, ctx, j.account, Admitted { verdict, holder: Some(holder) });
                }
                dynamo::Answer::ConditionFailed => self.queue_job(host, j.account, JobKind::Read { then: ReadFor::Direct { ctx, amounts, mark } }),
                _ => self.direct_result(host, ctx, j.account, Admitted { verdict: Verdict::Unavailable, holder: None }),
            },
            JobKind::Return { old, credit, .. } => match read {
                dynamo::Answer::Done(_) => self.lease_gone(host, ledger, j.account, &key, old.0, credit),
                // The lease is not what this return was counted from: read what it is.
                dynamo::Answer::ConditionFailed => self.queue_job(host, j.account, JobKind::Read { then: ReadFor::Return { old: old.0, credit } }),
                _ => {
                    self.release_job(host, &key);
                    self.wake_ledger(host, j.account);
                }
            },
            JobKind::Refund { amounts, mark, tries } => {
                if !matches!(read, dynamo::Answer::Done(_) | dynamo::Answer::ConditionFailed) && tries < 3 {
                    self.queue_job(host, j.account, JobKind::Refund { amounts, mark, tries: tries + 1 });
                }
            }
        }
    }

    /// The ledger granted `lease` (a first grant or a top-up, as its item now records it): the
    /// slice takes it, the requests waiting decide again.
    #[allow(clippy::too_many_arguments)]
    fn granted(&mut self, host: &mut impl Host, ledger: &Ledger, id: u64, key: &str, item: &Item, lease: &Lease, now_ms: u64) {
        let caps = self.ledger.accounts.get(&id).map(|a| a.account.caps).unwrap_or_default();
        let left = Amounts { spend: caps.spend.unwrap_or(0).saturating_sub(item.held.spend), count: caps.count.unwrap_or(0).saturating_sub(item.held.count) };
        let gateway = self.ledger.gateway.clone().unwrap_or_default();
        if let Some(a) = self.ledger.accounts.get_mut(&id) {
            a.left = Some(left);
            a.prune = item.stale_marks(&gateway, (now_ms / 1000).saturating_sub(MARKS_KEPT_S));
        }
        self.saw_marks(id, item, now_ms / 1000);
        let _ = shared::update::<Slice>(host, key, |s| {
            s.granted(lease, now_ms, LEASE_MARGIN_MS);
            s.job_until_ms = 0;
            true
        });
        if let Some(account) = self.ledger.accounts.get(&id).map(|a| a.account.clone()) {
            let _ = shared::update::<Leases>(host, &keys::ledger_leases(ledger), |l| l.add(&account));
        }
        self.wake_ledger(host, id);
    }

    /// A grant was refused: ask for what is left, if it covers what the request lacks, else refuse
    /// for now.
    #[allow(clippy::too_many_arguments)]
    fn no_room_or_smaller(&mut self, host: &mut impl Host, ledger: &Ledger, id: u64, key: &str, item: &Item, want: Amounts, now_ms: u64) {
        let Some(account) = self.ledger.accounts.get(&id).map(|a| a.account.clone()) else { return };
        let gateway = self.ledger.gateway.clone().unwrap_or_default();
        let s: Slice = shared::read(host, key);
        let ours = item.lease_of(&gateway).copied();
        let clear = |s: &mut Slice| {
            s.pending_id = 0;
            s.pending_seq = 0;
            s.pending = Amounts::default();
        };
        match ours {
            // Our lease as we know it: the top-up was refused for room.
            Some(l) if l.id == s.lease_id && l.seq == s.seq => {}
            // No lease of ours: a first grant was refused for room, or for an end mark of a later
            // lease (the clock went back), or the lease this slice had is gone (a return whose
            // answer was lost, or the item went with its TTL).
            None => {
                let ended = item.ended_of(&gateway).unwrap_or(0);
                let _ = shared::update::<Slice>(host, key, |s| {
                    s.lost();
                    s.last_id = s.last_id.max(ended);
                    true
                });
            }
            // A lease of ours the slice does not know as it is: a top-up, or a first grant, made
            // after its answer was given up. It is ours: the slice takes it as the ledger has it.
            Some(l) => {
                self.granted(host, ledger, id, key, item, &l, now_ms);
                return;
            }
        }
        let s: Slice = shared::read(host, key);
        let left = Amounts {
            spend: account.caps.spend.map_or(0, |c| c.saturating_sub(item.held.spend)),
            count: account.caps.count.map_or(0, |c| c.saturating_sub(item.held.count)),
        };
        let lacks = s.lacks(want, account.caps);
        let fits = left.spend >= lacks.spend && left.count >= lacks.count;
        if let Some(a) = self.ledger.accounts.get_mut(&id) {
            a.left = Some(left);
            a.prune = item.stale_marks(&gateway, (now_ms / 1000).saturating_sub(MARKS_KEPT_S));
        }
        if fits {
            let _ = shared::update::<Slice>(host, key, |s| {
                clear(s);
                true
            });
            self.queue_job(host, id, JobKind::Grant { want, resolved: None });
            return;
        }
        let retry_after_s = self.room_back_in(&account, Some(item), now_ms);
        let _ = shared::update::<Slice>(host, key, |s| {
            clear(s);
            s.job_until_ms = 0;
            s.block(Block::NoRoom, now_ms, retry_after_s);
            true
        });
        self.wake_ledger(host, id);
    }

    /// When room may come back in `account`: when another gateway's lease ends (it gives back
    /// what it did not use), else when the account itself ends.
    fn room_back_in(&self, account: &Account, item: Option<&Item>, now_ms: u64) -> u32 {
        let now_s = now_ms / 1000;
        let own = self.ledger.gateway.as_deref().unwrap_or("");
        // A lease comes back a moment after its end (its gateway's tick gives it back); one long
        // past its end whose gateway never gave it back (it died) stays counted as spent.
        let others = item
            .into_iter()
            .flat_map(|i| i.leases.iter())
            .filter(|(g, l)| g != own && l.expires_s + COMES_BACK_S > now_s)
            .map(|(_, l)| l.expires_s + RETURNED_BY_S)
            .min();
        let until = others.unwrap_or(account.ends_s);
        u32::try_from(until.saturating_sub(now_s).clamp(1, u64::from(u32::MAX))).unwrap_or(u32::MAX)
    }

    /// The ledger no longer holds lease `old` for this gateway: given back, with `credit`.
    fn lease_gone(&mut self, host: &mut impl Host, ledger: &Ledger, id: u64, key: &str, old: u64, credit: Amounts) {
        let _ = shared::update::<Slice>(host, key, |s| {
            if s.lease_id == old {
                s.ended();
                s.gave_back(credit);
            }
            s.job_until_ms = 0;
            true
        });
        if let Some(pk) = self.ledger.accounts.get(&id).map(|a| a.account.pk.clone()) {
            let _ = shared::update::<Leases>(host, &keys::ledger_leases(ledger), |l| l.remove(&pk));
        }
        self.wake_ledger(host, id);
    }

    fn ledger_failed(&mut self, host: &mut impl Host, id: u64, key: &str, now_ms: u64) {
        host.metric(crate::record::Metric::LedgerUnavailable);
        let _ = shared::update::<Slice>(host, key, |s| {
            s.job_until_ms = 0;
            s.block(Block::Failing, now_ms, 1);
            true
        });
        self.wake_ledger(host, id);
    }

    fn release_job(&mut self, host: &mut impl Host, key: &str) {
        let _ = shared::update::<Slice>(host, key, |s| {
            s.job_until_ms = 0;
            true
        });
    }

    fn direct_result(&mut self, host: &mut impl Host, ctx: ContextId, id: u64, a: Admitted) {
        if matches!(a.verdict, Verdict::Unavailable) {
            host.metric(crate::record::Metric::LedgerUnavailable);
        }
        if let Some(before) = self.ledger.orphans.remove(&ctx) {
            // Its stream left while the charge was in flight. Made: the charge stands, and what
            // the stream took before stands with it (a retry admitted on its mark counts on
            // them). Not made: all of it goes back.
            if !matches!(a.verdict, Verdict::Reserved | Verdict::Admit) {
                self.release_all(host, &before);
            }
            return;
        }
        if !self.streams.contains_key(&ctx) {
            return;
        }
        self.ledger.results.insert((ctx, id), a);
        self.resume_one(host, ctx);
    }

    /// Does stream `ctx` wait on a direct charge in flight?
    pub(super) fn direct_in_flight(&self, ctx: ContextId) -> bool {
        self.ledger
            .jobs
            .values()
            .any(|j| matches!(&j.kind, JobKind::Direct { ctx: c, .. } | JobKind::Read { then: ReadFor::Direct { ctx: c, .. } } if *c == ctx))
    }

    /// Decide the requests waiting on account `id` again.
    fn wake_ledger(&mut self, host: &mut impl Host, id: u64) {
        if let Some(a) = self.ledger.accounts.get_mut(&id) {
            a.following = false;
        }
        for ctx in self.parked_on(super::Wait::Ledger(id)) {
            self.resume_one(host, ctx);
        }
        for ctx in self.pricing_on(id) {
            self.resume_pricing(host, ctx);
        }
    }

    fn resume_one(&mut self, host: &mut impl Host, ctx: ContextId) {
        if matches!(self.streams.get(&ctx), Some(super::Stream::Pricing { .. })) {
            self.resume_pricing(host, ctx);
        } else {
            self.resume(host, ctx);
        }
    }

    /// The tick's part: follow other workers' calls, give back slices whose lease ended, and
    /// forget what no request needs any more.
    pub(super) fn tick_ledger(&mut self, host: &mut impl Host, now_ms: u64) {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.clone()) else { return };
        let Some((_, worker)) = self.identities(host, &ledger) else { return };
        let ids: Vec<u64> = self.ledger.accounts.keys().copied().collect();
        for id in ids {
            let Some(a) = self.ledger.accounts.get(&id) else { continue };
            let (account, following) = (a.account.clone(), a.following);
            let key = keys::ledger_slice(&ledger, &account.pk);
            let s: Slice = shared::read(host, &key);
            if following && (s.job_until_ms <= now_ms || s.live(now_ms) || s.blocked_until_ms > now_ms) {
                self.wake_ledger(host, id);
            }
            // A lease a busy gateway uses is renewed by its next request (one call: what it did not
            // use goes back with the new grant); one nobody renewed a moment after its end, or whose
            // account ended, is given back here.
            let ended = s.lease_id != 0 && (now_ms >= s.expires_ms + RETURN_AFTER_MS || now_ms / 1000 >= account.ends_s);
            let busy = self.ledger.jobs.values().any(|j| j.account == id);
            if ended && !busy {
                if let Some(ret) = self.claim_return(host, &ledger, &key, worker, now_ms, false) {
                    self.queue_job(host, id, ret);
                }
            }
            // A grant asked for whose answer was lost (made or not): read until its outcome is
            // known, so that what it holds in the ledger is used and given back rather than held
            // until the item expires.
            let unresolved = s.pending_seq != 0 && s.job_until_ms <= now_ms && now_ms >= s.blocked_until_ms;
            if unresolved && !busy && !ended {
                let until = now_ms + u64::from(ledger.timeout_ms) + CALL_GRACE_MS;
                let mut asked = None;
                let _ = shared::update::<Slice>(host, &key, |s| {
                    asked = (s.pending_seq != 0 && s.claim_job(worker, until, now_ms)).then_some((s.pending_id, s.pending_seq));
                    asked.is_some()
                });
                if let Some((pid, seq)) = asked {
                    self.queue_job(host, id, JobKind::Read { then: ReadFor::Settle { id: pid, seq } });
                }
            }
            let idle = s.lease_id == 0
                && s.pending_seq == 0
                && !busy
                && !following
                && self.parked_on(super::Wait::Ledger(id)).is_empty()
                && self.pricing_on(id).is_empty();
            if idle && !self.ledger.results.keys().any(|(_, a)| *a == id) {
                self.ledger.accounts.remove(&id);
                self.ledger.ids.remove(&account.pk);
            }
        }
        // Calls past their deadline are given up by `expire_calls`; queued jobs go out now.
        self.pump_ledger(host);
    }

    /// The drain endpoint: give back every lease this gateway holds (the entrypoint calls it on
    /// SIGTERM). Answers how many it asked to give back.
    pub(super) fn drain_ledger(&mut self, host: &mut impl Host, now_ms: u64) -> usize {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.clone()) else { return 0 };
        let Some((_, worker)) = self.identities(host, &ledger) else { return 0 };
        let listed: Leases = shared::read(host, &keys::ledger_leases(&ledger));
        let mut n = 0;
        for account in listed.accounts {
            let key = keys::ledger_slice(&ledger, &account.pk);
            let s: Slice = shared::read(host, &key);
            if s.lease_id == 0 {
                let _ = shared::update::<Leases>(host, &keys::ledger_leases(&ledger), |l| l.remove(&account.pk));
                continue;
            }
            if let Some(ret) = self.claim_return(host, &ledger, &key, worker, now_ms, true) {
                let id = self.account_id(&account);
                self.queue_job(host, id, ret);
                n += 1;
            }
        }
        n
    }

    /// Claim the return of the slice's lease, counted from the slice as this write finds it (a
    /// worker may take from it until then): `None` when there is none, or a call for it is under
    /// way. `now`: nothing more is taken from it from here (the drain).
    fn claim_return(&mut self, host: &mut impl Host, ledger: &Ledger, key: &str, worker: u64, now_ms: u64, now: bool) -> Option<JobKind> {
        let until = now_ms + u64::from(ledger.timeout_ms) + CALL_GRACE_MS;
        let mut ret = None;
        let _ = shared::update::<Slice>(host, key, |s| {
            ret = None;
            if s.lease_id == 0 || !s.claim_job(worker, until, now_ms) {
                return false;
            }
            if now {
                s.expires_ms = s.expires_ms.min(now_ms);
            }
            s.returning = s.lease_id;
            ret = Some(JobKind::Return { old: (s.lease_id, s.seq), back: s.unused(), credit: s.credit });
            true
        });
        ret
    }

    /// The leases this gateway still holds (listed for the drain).
    pub(super) fn ledger_leases_held(&self, host: &impl Host) -> usize {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.as_ref()) else { return 0 };
        shared::read::<Leases>(host, &keys::ledger_leases(ledger)).accounts.len()
    }

    pub(super) fn ledger_deadline(&self, job: u64, call: crate::host::CallId) -> Option<u64> {
        match self.ledger.jobs.get(&job) {
            Some(j) if j.call == Some(call) => Some(j.deadline_ms),
            _ => Some(0),
        }
    }

    /// Is anything of the ledger waiting for a root callback or a tick?
    pub(super) fn ledger_waiting(&self) -> bool {
        self.ledger.jobs.values().any(|j| j.call.is_none()) || self.ledger.accounts.values().any(|a| a.following)
    }

    /// Forget a stream's direct-charge outcomes (it ended).
    pub(super) fn forget_ledger(&mut self, ctx: ContextId) {
        self.ledger.results.retain(|(c, _), _| *c != ctx);
    }
}
