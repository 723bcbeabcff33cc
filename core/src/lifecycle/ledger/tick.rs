//! The fleet ledger on the tick and the drain: leases given back when they end or when the
//! gateway stops, and the bookkeeping the lifecycle asks about.

use super::super::state::{JobKind, ReadFor};
use super::super::{shared, Lifecycle, CALL_GRACE_MS};
use super::*;
use crate::host::{ContextId, Host};
use crate::ledger::slice::{Leases, Slice};
use crate::ledger::Ledger;
use crate::secrets::keys;

impl Lifecycle {
    /// The tick's part: follow other workers' calls, give back slices whose lease ended, and
    /// forget what no request needs any more.
    pub(in crate::lifecycle) fn tick_ledger(&mut self, host: &mut impl Host, now_ms: u64) {
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
                && self.parked_on(super::super::Wait::Ledger(id)).is_empty()
                && self.parked_on(super::super::Wait::Drain(id)).is_empty()
                && self.pricing_on(id).is_empty();
            if idle && !self.ledger.results.keys().any(|(_, a)| *a == id) {
                self.ledger.accounts.remove(&id);
                self.ledger.ids.remove(&account.pk);
            }
        }
        self.return_others(host, &ledger, worker, now_ms);
        // Calls past their deadline are given up by `expire_calls`; queued jobs go out now.
        self.pump_ledger(host);
    }

    /// Leases of this gateway that ended while the worker that used them has no event to tick on
    /// (a native worker ticks only when woken; the main thread's lifecycle ticks always): any
    /// worker that ticks gives them back, a moment after their end, as their own worker would.
    fn return_others(&mut self, host: &mut impl Host, ledger: &Ledger, worker: u64, now_ms: u64) {
        if now_ms < self.ledger.swept_ms + RETURN_AFTER_MS {
            return;
        }
        self.ledger.swept_ms = now_ms;
        let listed: Leases = shared::read(host, &keys::ledger_leases(ledger));
        for account in listed.accounts {
            if self.ledger.ids.contains_key(&account.pk) {
                continue; // this worker's own, above
            }
            let key = keys::ledger_slice(ledger, &account.pk);
            let s: Slice = shared::read(host, &key);
            let ended = s.lease_id != 0 && (now_ms >= s.expires_ms + RETURN_AFTER_MS || now_ms / 1000 >= account.ends_s);
            if ended && s.job_until_ms <= now_ms {
                if let Some(ret) = self.claim_return(host, ledger, &key, worker, now_ms, false) {
                    let id = self.account_id(&account);
                    self.queue_job(host, id, ret);
                }
            }
        }
    }

    /// The drain endpoint: give back every lease this gateway holds (the entrypoint calls it on
    /// SIGTERM). Answers how many it asked to give back.
    pub(in crate::lifecycle) fn drain_ledger(&mut self, host: &mut impl Host, now_ms: u64) -> usize {
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
    pub(in crate::lifecycle) fn claim_return(
        &mut self,
        host: &mut impl Host,
        ledger: &Ledger,
        key: &str,
        worker: u64,
        now_ms: u64,
        now: bool,
    ) -> Option<JobKind> {
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

    /// The returns under way on this worker: a return, or the read that follows a refused one
    /// (the drain waits for them).
    pub(in crate::lifecycle) fn ledger_returns(&self) -> impl Iterator<Item = &super::super::state::Job> {
        self.ledger.jobs.values().filter(|j| matches!(j.kind, JobKind::Return { .. } | JobKind::Read { then: ReadFor::Return { .. } }))
    }

    /// The leases this gateway still holds (listed for the drain).
    pub(in crate::lifecycle) fn ledger_leases_held(&self, host: &impl Host) -> usize {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.as_ref()) else { return 0 };
        shared::read::<Leases>(host, &keys::ledger_leases(ledger)).accounts.len()
    }

    pub(in crate::lifecycle) fn ledger_deadline(&self, job: u64, call: crate::host::CallId) -> Option<u64> {
        match self.ledger.jobs.get(&job) {
            Some(j) if j.call == Some(call) => Some(j.deadline_ms),
            _ => Some(0),
        }
    }

    /// Is anything of the ledger waiting for a root callback or a tick?
    pub(in crate::lifecycle) fn ledger_waiting(&self) -> bool {
        self.ledger.jobs.values().any(|j| j.call.is_none()) || self.ledger.accounts.values().any(|a| a.following)
    }

    /// Forget a stream's direct-charge outcomes (it ended).
    pub(in crate::lifecycle) fn forget_ledger(&mut self, ctx: ContextId) {
        self.ledger.results.retain(|(c, _), _| *c != ctx);
    }
}
