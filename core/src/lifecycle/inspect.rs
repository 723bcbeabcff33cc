//! What a test (or an operator's debug log) can look at in a worker's lifecycle, and the
//! questions the lifecycle asks of its own streams.

use super::*;

impl Lifecycle {
    /// This worker's fetch state of `slot`.
    pub fn fetch_state(&self, slot: usize) -> Option<&Fetch> {
        self.slots.get(slot).map(|s| &s.fetch)
    }

    /// This worker's login/renewal state of `store`.
    pub fn session_state(&self, store: usize) -> Option<&SessionCall> {
        self.sessions.get(store)
    }

    pub fn refresh_state(&self) -> &Refresh {
        &self.revocations.refresh
    }

    /// The state of the stream `ctx`, if this worker knows it.
    pub fn stream(&self, ctx: ContextId) -> Option<&Stream> {
        self.streams.get(&ctx)
    }

    /// The requests parked on this worker.
    pub fn parked(&self) -> BTreeMap<ContextId, &Parked> {
        self.streams.iter().filter_map(|(c, s)| if let Stream::Parked(p) = s { Some((*c, &**p)) } else { None }).collect()
    }

    /// The streams parked on `wait`.
    pub(super) fn parked_on(&self, wait: Wait) -> Vec<ContextId> {
        let mut out: Vec<ContextId> = self.streams.iter().filter(|(_, s)| matches!(s, Stream::Parked(p) if p.wait == wait)).map(|(c, _)| *c).collect();
        out.sort_unstable();
        out
    }

    /// Issuances in progress on this worker.
    pub(super) fn issuances(&self) -> usize {
        self.streams.values().filter(|s| matches!(s, Stream::Issuing(_))).count()
    }

    /// The requests waiting for the end of their body to be priced.
    pub fn pricing(&self) -> BTreeMap<ContextId, &Pricing> {
        self.streams.iter().filter_map(|(c, s)| if let Stream::Pricing { pricing, .. } = s { Some((*c, pricing.as_ref())) } else { None }).collect()
    }

    /// The callouts this worker has in flight.
    pub fn calls(&self) -> &BTreeMap<CallId, Purpose> {
        &self.calls
    }

    /// The shared-data name of `slot`'s record.
    pub fn secret_name(&self, slot: usize) -> Option<&str> {
        self.names.secrets.get(slot).map(String::as_str)
    }
}
