//! The fleet ledger's calls going out: jobs queued by requests and the tick, sent from the root
//! with the ledger's deadline, each made from the slice as it is when it leaves.

use super::super::state::{Job, JobKind, ReadFor};
use super::super::{shared, Answer, Lifecycle, CALL_GRACE_MS};
use super::*;
use crate::host::Host;
use crate::ledger::dynamo::{self, Change, Lease};
use crate::ledger::slice::{self, Slice};
use crate::ledger::{Amounts, Ledger};
use crate::secrets::keys;

impl Lifecycle {
    /// Ask the ledger for a new lease on account `id` (this worker holds the slice's job).
    pub(in crate::lifecycle) fn queue_grant(&mut self, host: &mut impl Host, id: u64, want: Amounts, now_ms: u64) {
        self.queue_job(host, id, JobKind::Grant { want, resolved: None });
        let _ = now_ms;
    }

    pub(in crate::lifecycle) fn queue_job(&mut self, host: &mut impl Host, account: u64, kind: JobKind) {
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
    pub(in crate::lifecycle) fn pump_ledger(&mut self, host: &mut impl Host) {
        let Some(ledger) = self.cfg.as_ref().and_then(|c| c.ledger.clone()) else {
            self.ledger.jobs.clear();
            return;
        };
        let queued: Vec<u64> = self.ledger.jobs.iter().filter(|(_, j)| j.call.is_none()).map(|(i, _)| *i).collect();
        for job in queued {
            let now_ms = self.now_us / 1000;
            let Some(call) = self.job_call(host, &ledger, job, now_ms) else { continue };
            match self.send(host, &call) {
                Ok(call_id) => {
                    self.calls.insert(call_id, super::super::Purpose::Ledger(job));
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
    pub(in crate::lifecycle) fn hold_job(&mut self, host: &mut impl Host, ledger: &Ledger, job: u64, until_ms: u64) {
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
    pub(in crate::lifecycle) fn job_call(&mut self, host: &mut impl Host, ledger: &Ledger, job: u64, now_ms: u64) -> Option<crate::secrets::store::HttpCall> {
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
                        let id = (self.now_us & ((1 << 53) - 1)).max(s.last_id + 1);
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
            JobKind::Direct { amounts, mark, .. } => {
                let prune = self.ledger.accounts.get_mut(&account_id).map(|a| std::mem::take(&mut a.expired_marks)).unwrap_or_default();
                Change::Direct { amounts: *amounts, mark: mark.clone(), prune }
            }
            JobKind::Pin { mark, .. } => Change::Pin { mark: mark.clone() },
            JobKind::Refund { amounts, mark, .. } => Change::Refund { amounts: *amounts, mark: mark.clone() },
            JobKind::Read { .. } => return Some(dynamo::read(ledger, &account)),
        };
        Some(dynamo::update(ledger, &account, &change))
    }
}
