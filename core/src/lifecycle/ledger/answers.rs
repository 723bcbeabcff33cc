//! The fleet ledger's answers: what each call's outcome does to this gateway's slice, to the
//! requests waiting on it, and to a stream whose direct charge it was.

use super::super::state::{JobKind, ReadFor};
use super::super::{shared, Answer, Lifecycle};
use super::*;
use crate::engine::{Admitted, Holder};
use crate::host::{ContextId, Host};
use crate::ledger::dynamo::{self, Item, Lease};
use crate::ledger::slice::{Block, Leases, Slice};
use crate::ledger::{Account, Amounts, Ledger};
use crate::policy::limits::Verdict;
use crate::record::Family;
use crate::secrets::keys;

impl Lifecycle {
    /// A ledger call answered (or failed, or was given up at its deadline).
    pub(in crate::lifecycle) fn on_ledger_answer(&mut self, host: &mut impl Host, job: u64, answer: Answer) {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.clone()) else { return };
        self.job_done(host, &ledger, job, answer);
    }

    pub(in crate::lifecycle) fn job_done(&mut self, host: &mut impl Host, ledger: &Ledger, job: u64, answer: Answer) {
        let Some(j) = self.ledger.jobs.remove(&job) else { return };
        let Some(account) = self.ledger.accounts.get(&j.account).map(|a| a.account.clone()) else { return };
        let read = dynamo::answer(&account, answer.status, answer.body.as_deref());
        let op = match &j.kind {
            JobKind::Grant { .. } => "grant",
            JobKind::Return { .. } => "return",
            JobKind::Direct { .. } => "direct",
            JobKind::Pin { .. } => "pin",
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
        let now_ms = self.now_us / 1000;
        // A call given up at its deadline failed then, however late this worker saw it (a native
        // worker with no request to serve runs its tick when it is next woken).
        let failed_at = if j.deadline_ms != 0 { now_ms.min(j.deadline_ms) } else { now_ms };
        let key = keys::ledger_slice(ledger, &account.pk);
        let gateway = self.ledger.gateway.clone().unwrap_or_default();
        let worker = self.ledger.worker.unwrap_or(0);
        match j.kind {
            JobKind::Grant { want, resolved } => {
                let Some(lease) = resolved else { return };
                match read {
                    dynamo::Answer::Done(Some(item)) => match item.lease_of(&gateway) {
                        Some(l) if l.id == lease.id && l.seq == lease.seq => self.granted(host, ledger, j.account, &key, &item, &l.clone(), now_ms),
                        _ => self.ledger_failed(host, j.account, &key, failed_at),
                    },
                    dynamo::Answer::ConditionFailed => {
                        self.queue_job(host, j.account, JobKind::Read { then: ReadFor::Grant { want, lease } });
                    }
                    _ => self.ledger_failed(host, j.account, &key, failed_at),
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
                    if item.is_some_and(|i| i.has_mark(&mark.name)) && mark.name.starts_with("r_") {
                        // A retry of a charge made before: pin that charge first (it may then no
                        // longer be refunded), and admit the retry once the pin is made.
                        self.queue_job(host, j.account, JobKind::Pin { ctx, mark: mark.name });
                        return;
                    }
                    let verdict = {
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
                            s.release(worker);
                            true
                        });
                        self.wake_ledger(host, j.account);
                    }
                },
                (_, ReadFor::Grant { .. } | ReadFor::Return { .. } | ReadFor::Settle { .. }) => self.ledger_failed(host, j.account, &key, failed_at),
                (dynamo::Answer::Done(item), ReadFor::DirectLost { ctx, amounts, mark }) => {
                    // Made after all (the item has this charge's mark): admitted, late.
                    if item.as_ref().and_then(|i| i.mark_value(&mark.name)) == Some(mark.value) {
                        let verdict = super::charged(amounts, &account);
                        let holder = Holder::Ledger { account: account.clone(), mark: Some(mark), took: amounts, lease: 0 };
                        self.direct_result(host, ctx, j.account, Admitted { verdict, holder: Some(holder) });
                    } else {
                        self.direct_result(host, ctx, j.account, Admitted { verdict: Verdict::Unavailable, holder: None });
                    }
                }
                (_, ReadFor::Direct { ctx, .. }) => self.direct_result(host, ctx, j.account, Admitted { verdict: Verdict::Unavailable, holder: None }),
                // Not known whether the charge was made: refused, and held as if it were (over-
                // counted, never under: a retry on its mark must find the budgets counted).
                (_, ReadFor::DirectLost { ctx, amounts, mark }) => {
                    let holder = Holder::Ledger { account: account.clone(), mark: Some(mark), took: amounts, lease: 0 };
                    self.direct_result(host, ctx, j.account, Admitted { verdict: Verdict::Unavailable, holder: Some(holder) });
                }
            },
            JobKind::Direct { ctx, amounts, mark } => match read {
                // Made: the item carries this charge's mark (an answer without it is not this
                // change's).
                dynamo::Answer::Done(Some(item)) if item.mark_value(&mark.name) == Some(mark.value) => {
                    self.saw_marks(j.account, &item, now_ms / 1000);
                    let verdict = super::charged(amounts, &account);
                    let holder = Holder::Ledger { account: account.clone(), mark: Some(mark), took: amounts, lease: 0 };
                    self.direct_result(host, ctx, j.account, Admitted { verdict, holder: Some(holder) });
                }
                dynamo::Answer::ConditionFailed => self.queue_job(host, j.account, JobKind::Read { then: ReadFor::Direct { ctx, amounts, mark } }),
                // No answer, or not one this ledger can read: the charge may have been made. Read
                // back what the item holds.
                _ => self.queue_job(host, j.account, JobKind::Read { then: ReadFor::DirectLost { ctx, amounts, mark } }),
            },
            JobKind::Pin { ctx, .. } => {
                let verdict = match read {
                    dynamo::Answer::Done(_) => Verdict::Retry,
                    // The charge went (refunded) between the read and the pin: not a retry of
                    // anything; the client's next attempt is charged anew.
                    _ => Verdict::Unavailable,
                };
                self.direct_result(host, ctx, j.account, Admitted { verdict, holder: None });
            }
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
    pub(in crate::lifecycle) fn granted(&mut self, host: &mut impl Host, ledger: &Ledger, id: u64, key: &str, item: &Item, lease: &Lease, now_ms: u64) {
        let worker = self.ledger.worker.unwrap_or(0);
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
            s.release(worker);
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
    pub(in crate::lifecycle) fn no_room_or_smaller(
        &mut self,
        host: &mut impl Host,
        ledger: &Ledger,
        id: u64,
        key: &str,
        item: &Item,
        want: Amounts,
        now_ms: u64,
    ) {
        let worker = self.ledger.worker.unwrap_or(0);
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
            s.release(worker);
            s.block(Block::NoRoom, now_ms, retry_after_s);
            true
        });
        self.wake_ledger(host, id);
    }

    /// When room may come back in `account`: when another gateway's lease ends (it gives back
    /// what it did not use), else when the account itself ends.
    pub(in crate::lifecycle) fn room_back_in(&self, account: &Account, item: Option<&Item>, now_ms: u64) -> u32 {
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
    pub(in crate::lifecycle) fn lease_gone(&mut self, host: &mut impl Host, ledger: &Ledger, id: u64, key: &str, old: u64, credit: Amounts) {
        let worker = self.ledger.worker.unwrap_or(0);
        let _ = shared::update::<Slice>(host, key, |s| {
            if s.lease_id == old {
                s.ended();
                s.gave_back(credit);
            }
            s.release(worker);
            true
        });
        if let Some(pk) = self.ledger.accounts.get(&id).map(|a| a.account.pk.clone()) {
            let _ = shared::update::<Leases>(host, &keys::ledger_leases(ledger), |l| l.remove(&pk));
        }
        self.wake_ledger(host, id);
    }

    pub(in crate::lifecycle) fn ledger_failed(&mut self, host: &mut impl Host, id: u64, key: &str, now_ms: u64) {
        let worker = self.ledger.worker.unwrap_or(0);
        host.metric(crate::record::Metric::LedgerUnavailable);
        // Blocked by the worker whose call it was, unless another worker has asked since: its
        // outcome is newer than this failure.
        let _ = shared::update::<Slice>(host, key, |s| {
            if s.job_owner != worker {
                return false;
            }
            s.release(worker);
            s.block(Block::Failing, now_ms, 1);
            true
        });
        self.wake_ledger(host, id);
    }

    pub(in crate::lifecycle) fn release_job(&mut self, host: &mut impl Host, key: &str) {
        let worker = self.ledger.worker.unwrap_or(0);
        let _ = shared::update::<Slice>(host, key, |s| {
            s.release(worker);
            true
        });
    }

    pub(in crate::lifecycle) fn direct_result(&mut self, host: &mut impl Host, ctx: ContextId, id: u64, a: Admitted) {
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

    /// Decide the requests waiting on account `id` again.
    pub(in crate::lifecycle) fn wake_ledger(&mut self, host: &mut impl Host, id: u64) {
        if let Some(a) = self.ledger.accounts.get_mut(&id) {
            a.following = false;
        }
        for ctx in self.parked_on(super::super::Wait::Ledger(id)).into_iter().chain(self.parked_on(super::super::Wait::Drain(id))) {
            self.resume_one(host, ctx);
        }
        for ctx in self.pricing_on(id) {
            self.resume_pricing(host, ctx);
        }
    }

    pub(in crate::lifecycle) fn resume_one(&mut self, host: &mut impl Host, ctx: ContextId) {
        if matches!(self.streams.get(&ctx), Some(super::super::Stream::Pricing { .. })) {
            self.resume_pricing(host, ctx);
        } else {
            self.resume(host, ctx);
        }
    }
}
