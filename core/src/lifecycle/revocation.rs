//! The revocation list's refresh: one worker at a time (a lease in shared data) reads the list
//! from its store every `refresh_s`; every worker picks up the shared copy.

use super::session::StoreAuth;
use super::state::{Purpose, Refresh};
use super::{Answer, Lifecycle, CALL_GRACE_MS};
use crate::credential::revocation::{self, RevocationList};
use crate::host::{CallId, Host};
use crate::record::Metric;
use crate::secrets::store::{self, FetchError};
use std::rc::Rc;

impl Lifecycle {
    /// Take the shared list if another worker refreshed it.
    pub(super) fn reload_revocation(&mut self, host: &impl Host) {
        let Some((list_key, _)) = &self.names.revocation else { return };
        let (bytes, cas) = host.shared_get(list_key);
        if cas.is_some() && cas == self.revocations.cas {
            return;
        }
        if let Some(l) = bytes.as_deref().and_then(RevocationList::decode) {
            self.revocations.list = Some(Rc::new(l));
            self.revocations.cas = cas;
        }
    }

    pub(super) fn is_revoked(&self, jti: &str, sub: &str) -> bool {
        self.revocations.list.as_ref().is_some_and(|l| l.is_revoked(jti, sub))
    }

    /// The tick's part: refresh the list when due (a root event).
    pub(super) fn tick_revocation(&mut self, host: &mut impl Host, now_ms: u64) {
        let Some(cfg) = self.cfg.clone() else { return };
        let Some(rev) = &cfg.revocation else { return };
        let (Some(st), Some((_, lease_key))) = (cfg.stores.get(rev.store), self.names.revocation.clone()) else { return };
        self.reload_revocation(host);
        if matches!(self.revocations.refresh, Refresh::InFlight { .. }) {
            return;
        }
        if !revocation::refresh_due(self.revocations.list.as_deref(), now_ms, rev.refresh_s) {
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
        match self.send(host, &store::read_call(st, &rev.path, session.as_ref().map(|(t, _)| t))) {
            Ok(call) => {
                let deadline_ms = now_ms + u64::from(st.timeout_ms) + CALL_GRACE_MS;
                self.calls.insert(call, Purpose::Revocation);
                self.revocations.refresh = Refresh::InFlight { call, deadline_ms, session: session.map(|(_, g)| g) };
            }
            Err(e) => {
                self.revocations.refresh = Refresh::Idle;
                host.metric(Metric::RevocationError);
                log::warn!("revocation list refresh could not start: {e:?}");
            }
        }
    }

    pub(super) fn on_revocation_answer(&mut self, host: &mut impl Host, call: CallId, answer: Answer) {
        let Refresh::InFlight { call: c, session, .. } = self.revocations.refresh.clone() else { return };
        if c != call {
            return;
        }
        self.revocations.refresh = Refresh::Idle;
        let Some(cfg) = self.cfg.clone() else { return };
        let Some(rev) = &cfg.revocation else { return };
        let (Some(st), Some((list_key, lease_key))) = (cfg.stores.get(rev.store), self.names.revocation.clone()) else { return };
        let now_ms = host.now_ms();
        let doc = match answer.body {
            None => Err(FetchError::Garbage(format!("answer is larger than {} bytes", store::MAX_BODY))),
            Some(b) => store::read_document(st, answer.status, &b),
        };
        let list = match doc {
            Ok((doc, _)) => {
                let (l, ignored) = RevocationList::from_document(&doc, now_ms);
                if ignored > 0 {
                    log::warn!("revocation list {}:{}: {ignored} key(s) are neither jti:<id> nor sub:<id>; ignored", st.name, rev.path);
                }
                l
            }
            Err(FetchError::NotFound) => {
                log::warn!("revocation list {}:{} not found; treating it as empty", st.name, rev.path);
                RevocationList::empty(now_ms)
            }
            Err(e) => {
                if let (FetchError::Denied(_), Some(g)) = (&e, session) {
                    self.invalidate_session(host, rev.store, g);
                }
                // Keep the last good list; the lease expires and another refresh follows.
                host.metric(Metric::RevocationError);
                log::warn!("revocation list {}:{} refresh failed (keeping the last good list): {e}", st.name, rev.path);
                return;
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
        host.metric(Metric::RevocationOk);
    }
}
