//! Vault AppRole sessions across callouts: log in, renew ahead of expiry, log in again after a
//! refusal. The session (token, lease, generation) is one shared record per store identity; one
//! worker at a time holds its lease and makes the call, and fetches waiting for a token go out as
//! soon as any worker has shared one.

use super::state::{Fetch, Purpose, Refresh, SessionCall};
use super::{shared, Answer, Lifecycle, CALL_GRACE_MS, LEASE_GRACE_MS};
use crate::host::{CallId, Host};
use crate::record::Metric;
use crate::secret::Secret;
use crate::secrets::approle::{self, Grant, Next, SessionState};
use crate::secrets::store::{self, FetchError};

/// How a store callout authenticates.
pub(super) enum StoreAuth {
    /// The store's own (`token_env`, or none needed).
    Configured,
    /// The AppRole session's token, and its generation.
    Session(Secret, u64),
    /// An AppRole store with no valid token yet: log in first.
    Missing,
}

impl Lifecycle {
    pub(super) fn auth_for(&self, host: &impl Host, store: usize) -> StoreAuth {
        let Some(Some(key)) = self.names.sessions.get(store) else { return StoreAuth::Configured };
        let st: SessionState = shared::read(host, key);
        match st.session_token(self.now_us / 1000) {
            Some((t, generation)) => StoreAuth::Session(t.clone(), generation),
            None => StoreAuth::Missing,
        }
    }

    /// Log in to, or renew the token of, an AppRole store when due, unless a call is already in
    /// progress here or another worker holds the session's lease.
    pub(super) fn ensure_session(&mut self, host: &mut impl Host, store: usize) {
        if self.sessions.get(store) != Some(&SessionCall::Idle) {
            return;
        }
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(st), Some(Some(key))) = (cfg.stores.get(store), self.names.sessions.get(store).cloned()) else { return };
        let now_ms = self.now_us / 1000;
        let lease_ms = u64::from(st.timeout_ms) + LEASE_GRACE_MS;
        let mut next = Next::Nothing;
        let mut has_token = false;
        let took = shared::update::<SessionState>(host, &key, |a| {
            next = a.due(now_ms);
            has_token = a.session_token(now_ms).is_some();
            next != Next::Nothing && a.take_lease(now_ms, lease_ms)
        });
        if took != Some(true) {
            return;
        }
        if let Some(s) = self.sessions.get_mut(store) {
            *s = SessionCall::Queued { renewal: next == Next::Renew && has_token };
        }
        if self.in_root {
            self.dispatch_session(host, store, next == Next::Renew && has_token);
        } else {
            self.want_root(host);
        }
    }

    /// Send the login or renewal (root events only).
    pub(super) fn dispatch_session(&mut self, host: &mut impl Host, store: usize, renewal: bool) {
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(st), Some(Some(key))) = (cfg.stores.get(store), self.names.sessions.get(store)) else { return };
        let current: SessionState = shared::read(host, key);
        let token = current.session_token(self.now_us / 1000).map(|(t, _)| t.clone());
        let (call, renewal) = match (&token, renewal) {
            (Some(t), true) => (Some(approle::renew_call(st, t)), true),
            _ => (approle::login_call(st), false),
        };
        let Some(call) = call else { return };
        match self.send(host, &call) {
            Ok(id) => {
                let deadline_ms = (self.now_us / 1000) + u64::from(st.timeout_ms) + CALL_GRACE_MS;
                self.calls.insert(id, Purpose::Session(store));
                if let Some(s) = self.sessions.get_mut(store) {
                    *s = SessionCall::InFlight { call: id, deadline_ms, renewal };
                }
            }
            Err(e) => {
                log::warn!("store {}: {} could not start: {e:?}", st.name, if renewal { "token renewal" } else { "AppRole login" });
                self.session_done(host, store, renewal, Err(FetchError::Transient("callout not started".into())));
            }
        }
    }

    pub(super) fn on_session_answer(&mut self, host: &mut impl Host, store: usize, call: CallId, answer: Answer) {
        let Some(SessionCall::InFlight { call: c, renewal, .. }) = self.sessions.get(store).cloned() else { return };
        if c != call {
            return;
        }
        let result = match answer.body.filter(|b| b.len() <= store::MAX_BODY) {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
            Some(b) => approle::parse_grant(answer.status, &b),
        };
        self.session_done(host, store, renewal, result);
    }

    /// A login or renewal answered (or could not start, or was given up): share it, then send
    /// the fetches that waited for a token, or fail them.
    fn session_done(&mut self, host: &mut impl Host, store: usize, renewal: bool, result: Result<Grant, FetchError>) {
        if let Some(s) = self.sessions.get_mut(store) {
            *s = SessionCall::Idle;
        }
        let Some(cfg) = self.cfg.clone() else { return };
        let (Some(st), Some(Some(key))) = (cfg.stores.get(store), self.names.sessions.get(store).cloned()) else { return };
        let now_ms = self.now_us / 1000;
        let what = if renewal { "token renewal" } else { "AppRole login" };
        match &result {
            Ok(g) => {
                host.metric(if renewal { Metric::VaultRenew } else { Metric::VaultLogin });
                log::info!("store {}: {what} ok (lease {} s{})", st.name, g.lease_s, if g.renewable { ", renewable" } else { "" });
            }
            Err(e) => {
                host.metric(Metric::VaultAuthError);
                log::warn!("store {}: {what} failed: {e}", st.name);
            }
        }
        let failure = result.as_ref().err().map(ToString::to_string);
        let mut result = Some(result);
        let recorded = shared::update::<SessionState>(host, &key, |a| {
            if let Some(r) = result.take() {
                a.record(r, renewal, now_ms);
            }
            true
        });
        if recorded != Some(true) {
            log::warn!("store {}: could not share the vault session", st.name);
        }
        self.drain_session(host, store, failure);
    }

    /// Work waiting for `store`'s token: send it if there is one now; fail it if the login just
    /// failed (`failure`); otherwise keep waiting. Root events only.
    pub(super) fn drain_session(&mut self, host: &mut impl Host, store: usize, failure: Option<String>) {
        let has_token = matches!(self.auth_for(host, store), StoreAuth::Session(..));
        if !has_token && failure.is_none() {
            return;
        }
        let Some(cfg) = self.cfg.clone() else { return };
        for slot in 0..self.slots.len() {
            let Some(Fetch::AwaitingSession { retried }) = self.fetch_state(slot).cloned() else { continue };
            if cfg.slots.get(slot).map(|s| s.store) != Some(store) {
                continue;
            }
            match &failure {
                // Keyward's own login failed: that says nothing about the secret.
                Some(why) if !has_token => self.complete(host, slot, Err(FetchError::Transient(format!("vault login failed: {why}")))),
                _ => self.dispatch_slot(host, slot, retried),
            }
        }
        if self.revocations.refresh == Refresh::AwaitingSession && cfg.revocation.as_ref().is_some_and(|r| r.store == store) {
            // The next tick tries again, with the token if there is one now.
            self.revocations.refresh = Refresh::Idle;
        }
    }

    /// Drop the session of `generation` after the store refused its token.
    pub(super) fn invalidate_session(&mut self, host: &mut impl Host, store: usize, generation: u64) {
        let Some(Some(key)) = self.names.sessions.get(store).cloned() else { return };
        let _ = shared::update::<SessionState>(host, &key, |a| a.invalidate(generation));
    }

    /// The tick's part: renew (or log in again) ahead of expiry; send fetches waiting for a token
    /// another worker has shared since.
    pub(super) fn tick_sessions(&mut self, host: &mut impl Host, _now_ms: u64) {
        for store in 0..self.sessions.len() {
            let Some(Some(key)) = self.names.sessions.get(store).cloned() else { continue };
            let waiting = self.waits_for_session(store);
            let st: SessionState = shared::read(host, &key);
            if waiting || st.session.is_some() {
                self.ensure_session(host, store);
            }
            if waiting {
                self.drain_session(host, store, None);
            }
        }
    }

    fn waits_for_session(&self, store: usize) -> bool {
        let Some(cfg) = &self.cfg else { return false };
        let slots =
            self.slots.iter().enumerate().any(|(i, s)| matches!(s.fetch, Fetch::AwaitingSession { .. }) && cfg.slots.get(i).is_some_and(|c| c.store == store));
        slots || (self.revocations.refresh == Refresh::AwaitingSession && cfg.revocation.as_ref().is_some_and(|r| r.store == store))
    }
}
