//! The secret cache across callouts: one slot's fetch, from the lease to the shared record.
//!
//! Each slot's record (value, failure, fetch lease, vendor suspicion) lives in shared data and is
//! shared by every worker. A request that needs a value parks; one worker of the process takes
//! the slot's lease and fetches it, the others follow (their tick watches the record). When the
//! answer is recorded, every request parked on the slot is decided again.

use super::session::StoreAuth;
use super::state::{Fetch, Local, Purpose, Wait};
use super::{shared, Answer, Lifecycle, CALL_GRACE_MS, LEASE_GRACE_MS};
use crate::host::{CallId, Host};
use crate::record::{Family, Metric};
use crate::secrets::slot_state::{Failure, SlotState, Use};
use crate::secrets::store::{self, FetchError, Fetched};
use std::rc::Rc;

/// A fresh value is compared with shared data at most this often on the request path: a rotation
/// or eviction by another worker is seen within this long (this worker's own writes at once).
const RECHECK_MS: u64 = 100;

impl Lifecycle {
    /// The slot's record, decoded once per shared-data CAS. A value that lacks a field the
    /// configuration needs (after a reload) counts as absent.
    pub(super) fn local(&mut self, host: &impl Host, slot: usize) -> Option<&Local> {
        let cfg = self.cfg.clone()?;
        let spec = cfg.slots.get(slot)?;
        let key = self.names.secrets.get(slot)?;
        let (bytes, cas) = host.shared_get(key);
        let cas = cas?;
        let cache = self.slots.get_mut(slot)?;
        if cache.local.as_ref().is_none_or(|l| l.cas != cas) {
            let mut state = bytes.as_deref().and_then(SlotState::decode).unwrap_or_default();
            if state.entry.as_ref().is_some_and(|e| !spec.fields.iter().all(|f| e.data.covers(f))) {
                state.entry = None;
            }
            let fetched_at_ms = state.entry.as_ref().map_or(0, |e| e.fetched_at_ms);
            let data = state.entry.as_mut().map(|e| Rc::new(std::mem::take(&mut e.data)));
            cache.local = Some(Local { cas, state, data, fetched_at_ms, checked_ms: 0 });
        }
        cache.local.as_ref()
    }

    /// The slot's record for a request: a fresh value checked less than `RECHECK_MS` ago is used
    /// without reading shared data again.
    pub(super) fn local_for_request(&mut self, host: &impl Host, slot: usize, now_ms: u64) -> Option<&Local> {
        let t = self.timing;
        let recent = self
            .slots
            .get(slot)
            .and_then(|s| s.local.as_ref())
            .is_some_and(|l| l.data.is_some() && now_ms < l.checked_ms.saturating_add(RECHECK_MS) && l.state.classify(now_ms, &t) == Use::Fresh);
        if !recent {
            self.local(host, slot)?;
            if let Some(l) = self.slots.get_mut(slot).and_then(|s| s.local.as_mut()) {
                l.checked_ms = now_ms;
            }
        }
        self.slots.get(slot).and_then(|s| s.local.as_ref())
    }

    /// This worker is about to write the slot's record: the next request reads it again.
    fn touch(&mut self, slot: usize) {
        if let Some(l) = self.slots.get_mut(slot).and_then(|s| s.local.as_mut()) {
            l.checked_ms = 0;
        }
    }

    fn set_fetch(&mut self, slot: usize, f: Fetch) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.fetch = f;
        }
    }

    /// Make sure `slot` is being fetched: by this worker if it can take the lease (the callout
    /// goes out from the root), else by the worker that holds it (this one follows).
    pub(super) fn start_fetch(&mut self, host: &mut impl Host, slot: usize) {
        if !matches!(self.fetch_state(slot), Some(Fetch::Idle | Fetch::Following)) {
            return;
        }
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(st), Some(key)) = (cfg.store_of(slot), self.names.secrets.get(slot).cloned()) else { return };
        let now_ms = self.now_us / 1000;
        let lease_ms = u64::from(st.timeout_ms) + LEASE_GRACE_MS;
        self.touch(slot);
        match shared::update::<SlotState>(host, &key, |s| s.take_lease(now_ms, lease_ms)) {
            Some(true) => {
                self.set_fetch(slot, Fetch::Queued { retried: false });
                if let Some(c) = self.slots.get_mut(slot) {
                    c.queued_us = self.now_us;
                }
                if self.in_root {
                    self.dispatch_slot(host, slot, false);
                } else {
                    self.want_root(host);
                }
            }
            Some(false) => self.set_fetch(slot, Fetch::Following),
            None => {
                log::warn!("could not take the fetch lease for {}:{}", st.name, cfg.slots.get(slot).map_or("?", |s| s.path.as_str()));
                self.set_fetch(slot, Fetch::Following);
            }
        }
    }

    /// Send the fetch of `slot` (its lease is held), or wait for its store's session first.
    /// Root events only.
    pub(super) fn dispatch_slot(&mut self, host: &mut impl Host, slot: usize, retried: bool) {
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let (session, generation) = match self.auth_for(host, spec.store) {
            StoreAuth::Configured => (None, None),
            StoreAuth::Session(t, g) => (Some(t), Some(g)),
            StoreAuth::Missing => {
                self.set_fetch(slot, Fetch::AwaitingSession { retried });
                self.ensure_session(host, spec.store);
                return;
            }
        };
        let started_us = self.now_us;
        match self.send(host, &store::read_call(st, &spec.path, session.as_ref())) {
            Ok(call) => {
                let sent_us = self.now_us;
                // The cold breakdown: the root's wake-up after the stream queued the fetch, then
                // Envoy's dispatch itself (it starts the request on the vault's connection).
                let queued_us = self.slots.get_mut(slot).map_or(0, |c| std::mem::take(&mut c.queued_us));
                if queued_us != 0 {
                    host.observe(Family::ColdUs, &["wake"], started_us.saturating_sub(queued_us));
                    host.observe(Family::ColdUs, &["dispatch"], sent_us.saturating_sub(started_us));
                }
                let deadline_ms = (self.now_us / 1000) + u64::from(st.timeout_ms) + CALL_GRACE_MS;
                self.calls.insert(call, Purpose::Secret(slot));
                self.set_fetch(slot, Fetch::InFlight { call, deadline_ms, session: generation, retried, sent_us });
            }
            Err(e) => {
                log::warn!("store {} callout to cluster {:?} failed to start: {e:?}", st.name, st.cluster);
                self.complete(host, slot, Err(FetchError::Transient("callout not started".into())));
            }
        }
    }

    /// The store answered the fetch of `slot` (or it failed or was given up).
    pub(super) fn on_secret_answer(&mut self, host: &mut impl Host, slot: usize, call: CallId, answer: Answer) {
        let Some(Fetch::InFlight { call: c, session, retried, sent_us, .. }) = self.fetch_state(slot).cloned() else { return };
        if c != call {
            return;
        }
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(spec), Some(st)) = (cfg.slots.get(slot), cfg.store_of(slot)) else { return };
        let answered_us = self.now_us;
        if answer.status.is_some() {
            host.observe(Family::StoreFetchUs, &[&st.name], answered_us.saturating_sub(sent_us));
        }
        if let Some(c) = self.slots.get_mut(slot) {
            c.answered_us = answered_us;
        }
        let result = match answer.body.filter(|b| b.len() <= store::MAX_BODY) {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
            Some(b) if spec.whole => store::parse_keyset(st, answer.status, &b),
            Some(b) => store::parse_response(st, answer.status, &b, &spec.fields),
        };
        if let (Err(FetchError::Denied(_)), Some(generation), false) = (&result, session, retried) {
            // The store refused the session token (expired or revoked): log in again and fetch
            // once more; a second refusal is the store's word on the secret.
            log::warn!("store {} refused its token reading {}; logging in again", st.name, spec.path);
            self.invalidate_session(host, spec.store, generation);
            self.set_fetch(slot, Fetch::Queued { retried: true });
            self.dispatch_slot(host, slot, true);
            return;
        }
        self.complete(host, slot, result);
    }

    /// Record a fetch's outcome in the shared record, then decide this worker's waiters again.
    pub(super) fn complete(&mut self, host: &mut impl Host, slot: usize, result: Result<Fetched, FetchError>) {
        self.set_fetch(slot, Fetch::Idle);
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(spec), Some(st), Some(key)) = (cfg.slots.get(slot), cfg.store_of(slot), self.names.secrets.get(slot).cloned()) else { return };
        let now_ms = self.now_us / 1000;
        let outcome = match result {
            Ok(fetched) => {
                host.metric(Metric::FetchOk);
                host.count(Family::StoreFetches, &[&st.name, "ok"], 1);
                log::info!("fetched {}:{} (version {})", st.name, spec.path, fetched.version.as_deref().unwrap_or("-"));
                for p in &fetched.problems {
                    log::warn!("{}:{}: {p}; targets needing it answer 503", st.name, spec.path);
                }
                Ok(fetched)
            }
            Err(e) => {
                host.metric(Metric::FetchError);
                host.count(Family::StoreFetches, &[&st.name, "error"], 1);
                let transient = e.may_serve_stale();
                let what = if transient { "serving stale within stale_if_error_s if cached" } else { "evicted" };
                log::warn!("fetching {}:{} failed: {e}; {what}", st.name, spec.path);
                Err(Failure { at_ms: now_ms, transient })
            }
        };
        self.touch(slot);
        if shared::update::<SlotState>(host, &key, |s| {
            s.record(outcome.clone(), now_ms);
            true
        }) != Some(true)
        {
            log::warn!("could not write the shared cache for {}:{}", st.name, spec.path);
        }
        self.wake(host, slot);
    }

    /// Decide every request parked on `slot` again.
    pub(super) fn wake(&mut self, host: &mut impl Host, slot: usize) {
        let waiting = self.parked_on(Wait::Secret(slot));
        let answered_us = self.slots.get_mut(slot).map_or(0, |c| std::mem::take(&mut c.answered_us));
        if answered_us != 0 && !waiting.is_empty() {
            host.observe(Family::ColdUs, &["decode"], host.clock_us().saturating_sub(answered_us));
        }
        for ctx in waiting {
            let t0 = host.clock_us();
            self.resume(host, ctx);
            host.observe(Family::ColdUs, &["resume"], host.clock_us().saturating_sub(t0));
        }
    }

    /// Followers: when another worker's fetch lands (or its lease lapses), decide again.
    pub(super) fn follow(&mut self, host: &mut impl Host, now_ms: u64) {
        for slot in 0..self.slots.len() {
            if self.fetch_state(slot) != Some(&Fetch::Following) {
                continue;
            }
            let before = self.slots.get(slot).and_then(|s| s.local.as_ref()).map(|l| l.cas);
            let lapsed = self.local(host, slot).is_none_or(|l| !l.state.lease_held(now_ms));
            let after = self.slots.get(slot).and_then(|s| s.local.as_ref()).map(|l| l.cas);
            if before != after || lapsed {
                self.set_fetch(slot, Fetch::Idle);
                self.wake(host, slot);
            }
        }
    }

    /// Values in use: refresh ahead of the TTL, after a vendor rejection, and while stale.
    pub(super) fn refresh_ahead(&mut self, host: &mut impl Host, now_ms: u64) {
        let t = self.timing;
        for slot in 0..self.slots.len() {
            let Some(cache) = self.slots.get_mut(slot) else { continue };
            let in_use = cache.used_at_ms.is_some_and(|at| now_ms < at.saturating_add(t.ttl_ms));
            if !in_use {
                cache.used_at_ms = None;
                continue;
            }
            if cache.fetch != Fetch::Idle {
                continue;
            }
            if self.local(host, slot).is_some_and(|l| l.state.refresh_due(now_ms, &t)) {
                self.start_fetch(host, slot);
            }
        }
    }
}
