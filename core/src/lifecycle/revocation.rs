//! The revocation list's refresh: one worker at a time (a lease in shared data) reads the list
//! from its store every `refresh_s`; every worker picks up the shared copy.

use super::session::StoreAuth;
use super::state::{Purpose, Refresh, Wait};
use super::{Answer, Lifecycle, CALL_GRACE_MS};
use crate::credential::revocation::{self, RevocationList};
use crate::engine::Lookup;
use crate::host::{CallId, Host};
use crate::record::Metric;
use crate::secrets::store::{self, FetchError};
use std::rc::Rc;

/// After a failed refresh, the next one waits this long.
const RETRY_MS: u64 = 1000;

impl Lifecycle {
    /// Take the shared list if another worker refreshed it.
    pub(super) fn reload_revocation(&mut self, host: &impl Host) {
        let Some(names) = &self.names.revocation else { return };
        let (bytes, cas) = host.shared_get(&names.list);
        if cas.is_none() || cas != self.revocations.cas {
            if let Some(l) = bytes.as_deref().and_then(RevocationList::decode) {
                if self.revocations.list.as_ref().is_none_or(|old| old.version != l.version) {
                    self.revocations.checked_at_ms = 0;
                }
                self.revocations.list = Some(Rc::new(l));
                self.revocations.cas = cas;
            }
        }
        // A confirmation of the version in force, from any worker.
        let checked = host.shared_get(&names.checked).0.and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok());
        if let (Some(b), Some(l)) = (checked, &self.revocations.list) {
            let (version, at) = b.split_at(8);
            let version = u64::from_le_bytes(version.try_into().unwrap_or_default());
            let at = u64::from_le_bytes(at.try_into().unwrap_or_default());
            if version == l.version && version > 0 {
                self.revocations.checked_at_ms = self.revocations.checked_at_ms.max(at);
            }
        }
    }

    /// When the list in force was last known current: read, or its version confirmed.
    fn current_as_of(&self) -> Option<u64> {
        self.revocations.list.as_ref().map(|l| l.fetched_at_ms.max(self.revocations.checked_at_ms))
    }

    /// Is this credential revoked? `Pending` until this process has a list it trusts (loaded, or
    /// confirmed missing); `Failed` while the list in force is older than `max_stale_s`.
    pub(super) fn revocation_lookup(&mut self, host: &mut impl Host, jti: &str, sub: &str, now_ms: u64) -> Lookup<bool> {
        let Some(max_stale_s) = self.cfg.as_ref().and_then(|c| c.revocation.as_ref()).map(|r| r.max_stale_s) else {
            return Lookup::Ready(false);
        };
        if self.revocations.list.is_none() {
            self.reload_revocation(host);
        }
        let Some(as_of) = self.current_as_of() else { return Lookup::Pending };
        if now_ms > as_of.saturating_add(u64::from(max_stale_s) * 1000) {
            // Another worker may have refreshed it since this one last looked.
            self.reload_revocation(host);
            let fresh = self.current_as_of().is_some_and(|t| now_ms <= t.saturating_add(u64::from(max_stale_s) * 1000));
            if !fresh {
                host.metric(Metric::RevocationStale);
                if !self.revocations.too_old {
                    self.revocations.too_old = true;
                    log::error!("the revocation list is older than max_stale_s ({max_stale_s} s): refusing requests until a refresh succeeds");
                }
                return Lookup::Failed;
            }
        }
        self.revocations.too_old = false;
        let list = self.revocations.list.clone();
        Lookup::Ready(list.is_some_and(|l| l.is_revoked(jti, sub)))
    }

    /// Decide the requests that waited for a list again, now that there is one.
    pub(super) fn wake_revocation_waiters(&mut self, host: &mut impl Host) {
        if self.revocations.list.is_none() {
            return;
        }
        let waiting = self.parked_on(Wait::Revocation);
        for ctx in waiting {
            self.resume(host, ctx);
        }
    }

    /// The tick's part: refresh the list when due (a root event).
    pub(super) fn tick_revocation(&mut self, host: &mut impl Host, now_ms: u64) {
        let Some(cfg) = self.cfg.clone() else { return };
        let Some(rev) = &cfg.revocation else { return };
        let (Some(st), Some(names)) = (cfg.stores.get(rev.store), self.names.revocation.clone()) else { return };
        let lease_key = names.lease;
        self.reload_revocation(host);
        self.wake_revocation_waiters(host);
        if matches!(self.revocations.refresh, Refresh::InFlight { .. }) {
            return;
        }
        if self.current_as_of().is_some_and(|t| now_ms < t.saturating_add(u64::from(rev.refresh_s) * 1000)) {
            self.revocations.refresh = Refresh::Idle;
            return;
        }
        let session = match self.auth_for(host, rev.store) {
            StoreAuth::Configured => None,
            StoreAuth::Session(t, generation) => Some((t, generation)),
            StoreAuth::Missing => {
                self.revocations.refresh = Refresh::AwaitingSession;
                return self.ensure_session(host, rev.store);
            }
        };
        let (lease, cas) = host.shared_get(&lease_key);
        if !revocation::lease_free(lease.as_deref(), now_ms) {
            self.revocations.refresh = Refresh::Idle;
            return;
        }
        let until = now_ms + u64::from(st.timeout_ms) + 1000;
        if host.shared_set(&lease_key, &until.to_le_bytes(), cas).is_err() {
            self.revocations.refresh = Refresh::Idle;
            return; // another worker took it
        }
        // A list in force with a version: ask only whether it is still the current one.
        let version = self.revocations.list.as_ref().map_or(0, |l| l.version);
        let metadata = version > 0 && !self.revocations.metadata_denied;
        self.send_refresh(host, metadata, session);
    }

    /// Send the refresh's callout: the metadata (the current version) or the whole list.
    fn send_refresh(&mut self, host: &mut impl Host, metadata: bool, session: Option<(crate::secret::Secret, u64)>) {
        let Some(cfg) = self.cfg.clone() else { return };
        let Some(rev) = &cfg.revocation else { return };
        let Some(st) = cfg.stores.get(rev.store) else { return };
        let token = session.as_ref().map(|(t, _)| t);
        let call = match metadata.then(|| store::metadata_call(st, &rev.path, token)).flatten() {
            Some(c) => c,
            None => store::read_call(st, &rev.path, token),
        };
        let metadata = metadata && matches!(st.kind, crate::config::StoreKind::VaultKv2 { .. });
        match self.send(host, &call) {
            Ok(call) => {
                let deadline_ms = (self.now_us / 1000) + u64::from(st.timeout_ms) + CALL_GRACE_MS;
                self.calls.insert(call, Purpose::Revocation);
                self.revocations.refresh = Refresh::InFlight { call, deadline_ms, session: session.map(|(_, g)| g), metadata };
            }
            Err(e) => {
                self.revocations.refresh = Refresh::Idle;
                self.refresh_failed(host, &format!("the callout could not start: {e:?}"));
            }
        }
    }

    /// The answer to a metadata read: the list is unchanged (confirmed), or a full read follows.
    fn on_revocation_metadata(&mut self, host: &mut impl Host, answer: Answer, session: Option<u64>) {
        let Some(names) = self.names.revocation.clone() else { return };
        let in_force = self.revocations.list.as_ref().map_or(0, |l| l.version);
        match store::current_version(answer.status, answer.body.as_deref().unwrap_or_default()) {
            Ok(v) if v == in_force => {
                let now_ms = self.now_us / 1000;
                let mut record = in_force.to_le_bytes().to_vec();
                record.extend_from_slice(&now_ms.to_le_bytes());
                if host.shared_set(&names.checked, &record, None).is_err() {
                    log::warn!("could not share the revocation list's confirmation");
                }
                let _ = host.shared_set(&names.lease, &0u64.to_le_bytes(), None);
                self.revocations.checked_at_ms = now_ms;
                host.metric(Metric::RevocationOk);
                self.wake_revocation_waiters(host);
                return;
            }
            Ok(v) if v < in_force => {
                return self.refresh_failed(host, &format!("the store's metadata names version {v}, older than version {in_force} in force"));
            }
            Err(FetchError::Denied(s)) => {
                log::warn!("the store refused the revocation list's metadata (HTTP {s}); reading the whole list at every refresh from now on");
                self.revocations.metadata_denied = true;
            }
            // Changed, gone, or unreadable: the full read decides.
            _ => {}
        }
        let token = session.and_then(|g| match self.auth_for(host, self.cfg.as_ref().and_then(|c| c.revocation.as_ref()).map_or(0, |r| r.store)) {
            StoreAuth::Session(t, generation) if generation == g => Some((t, g)),
            _ => None,
        });
        self.send_refresh(host, false, token);
    }

    pub(super) fn on_revocation_answer(&mut self, host: &mut impl Host, call: CallId, answer: Answer) {
        let Refresh::InFlight { call: c, session, metadata, .. } = self.revocations.refresh.clone() else { return };
        if c != call {
            return;
        }
        self.revocations.refresh = Refresh::Idle;
        if metadata {
            return self.on_revocation_metadata(host, answer, session);
        }
        let Some(cfg) = self.cfg.clone() else { return };
        let Some(rev) = &cfg.revocation else { return };
        let (Some(st), Some(names)) = (cfg.stores.get(rev.store), self.names.revocation.clone()) else { return };
        let (list_key, lease_key) = (names.list, names.lease);
        let now_ms = self.now_us / 1000;
        let doc = match answer.body {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_LIST_BODY))),
            Some(b) => store::read_document_up_to(st, answer.status, &b, store::MAX_LIST_BODY),
        };
        let in_force = self.revocations.list.clone();
        let list = match doc {
            Ok((doc, version)) => {
                let version = version.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let known = in_force.as_ref().map_or(0, |l| l.version);
                if version < known {
                    // A lagging replica or a restored backup: never go backwards silently.
                    return self.refresh_failed(host, &format!("the store answered version {version}, older than version {known} in force"));
                }
                let (mut l, ignored) = RevocationList::from_document(&doc, now_ms, (now_ms / 1000) as i64 - cfg.policy.clock_skew_s);
                l.version = version;
                if ignored > 0 {
                    log::warn!("revocation list {}:{}: {ignored} key(s) are neither jti:<id> nor sub:<id>; ignored", st.name, rev.path);
                }
                l
            }
            Err(FetchError::NotFound) if in_force.as_ref().is_some_and(|l| l.version > 0 || !l.is_empty()) => {
                // The list existed: its disappearance is not a way to lift every revocation.
                return self.refresh_failed(host, "the store says the list does not exist, but one was in force");
            }
            Err(FetchError::NotFound) => {
                log::warn!("revocation list {}:{} not found; treating it as empty", st.name, rev.path);
                RevocationList::empty(now_ms)
            }
            Err(e) => {
                if let (FetchError::Denied(_), Some(g)) = (&e, session) {
                    self.invalidate_session(host, rev.store, g);
                }
                return self.refresh_failed(host, &e.to_string());
            }
        };
        let n = list.len();
        if host.shared_set(&list_key, &list.encode(), None).is_err() {
            log::warn!("could not share the revocation list");
        }
        let _ = host.shared_set(&lease_key, &0u64.to_le_bytes(), None);
        if self.revocations.list.as_ref().map(|l| l.len()) != Some(n) {
            log::info!("revocation list {}:{}: {n} entr{}", st.name, rev.path, if n == 1 { "y" } else { "ies" });
        }
        self.revocations.list = Some(Rc::new(list));
        self.revocations.cas = None;
        self.revocations.checked_at_ms = 0;
        host.metric(Metric::RevocationOk);
        self.wake_revocation_waiters(host);
    }

    /// A refresh that did not give a list to trust: the list in force stays (up to `max_stale_s`),
    /// and another refresh follows in a second. Requests that wait keep waiting, up to their
    /// deadline.
    fn refresh_failed(&mut self, host: &mut impl Host, why: &str) {
        host.metric(Metric::RevocationError);
        // The next attempt (by any worker) in a second: soon, without hammering a failing store.
        if let Some(names) = self.names.revocation.clone() {
            let retry_at = (self.now_us / 1000).saturating_add(RETRY_MS);
            let _ = host.shared_set(&names.lease, &retry_at.to_le_bytes(), None);
        }
        let (name, path) = self
            .cfg
            .as_ref()
            .and_then(|c| c.revocation.as_ref().and_then(|r| c.stores.get(r.store).map(|s| (s.name.clone(), r.path.clone()))))
            .unwrap_or_default();
        log::warn!("revocation list {name}:{path} refresh failed (keeping the last good list): {why}");
    }
}
