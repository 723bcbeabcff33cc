//! The request lifecycle across callouts and ticks, as a state machine that does no I/O of its
//! own: events go in through `Lifecycle::handle`, and every effect (a callout, a shared-data
//! write, a resume, a local reply, a metric) goes out through the `Host` trait.
//!
//! One `Lifecycle` lives in each root context (one per keyward configuration per Envoy worker).
//! Its state is made of plain values a test can print and compare:
//! - per secret slot, a `Fetch` (idle, following another worker's fetch, queued for the root,
//!   waiting for the store's Vault session, or in flight with a deadline), beside the slot's
//!   shared record (`secrets::slot_state::SlotState`: value, failure, lease, suspicion);
//! - per AppRole store, a `SessionCall` (login or renewal queued or in flight);
//! - the revocation list's `Refresh`;
//! - the requests parked on a slot, and what each allowed request was given.
//!
//! Callouts are dispatched only while handling a root event (`Tick`, `Woken`, `Answer`): a
//! stream that needs a fetch queues it and asks for a root callback (`Host::wake_root`), so the
//! answer belongs to the root in Envoy's and in the proxy-wasm SDK's bookkeeping, and a client
//! that leaves cancels nothing. Every callout has a deadline: past it, the call is given up and
//! its slot, session or list is free for the next attempt.

mod admission_view;
mod endpoint;
mod event;
mod fetch;
mod inspect;
mod issue;
mod ledger;
mod limits;
mod metering;
mod pricing;
mod request;
mod revocation;
mod session;
mod shared;
mod state;
#[cfg(test)]
mod tests;

pub use event::{Answer, Event};
pub use state::{Fetch, IssueStep, Parked, Pricing, Purpose, Refresh, SessionCall, Stream, Wait};
use state::{LedgerState, Names, RevocationNames, Revocations, SlotCache};

use crate::config::Config;
use crate::credential::verified::VerifiedCache;
use crate::host::{Action, CallId, ContextId, Host, HostError};
use crate::record::Metric;
use crate::secrets::keys;
use crate::secrets::slot_state::Timing;
use crate::secrets::store::HttpCall;
use std::collections::BTreeMap;
use std::rc::Rc;

/// What a request callback would let go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passing {
    /// The request headers (more of the request follows).
    Headers,
    /// Part of the body (more follows).
    Body,
    /// The end of the request: its last data frame, its trailers, or headers without a body.
    End,
}

/// The tick, normally and while this worker waits for work another worker or the root does.
pub const TICK_MS: u64 = 200;
pub const FAST_TICK_MS: u64 = 20;
/// A parked request may wait this much beyond its store's timeout before it gets 503.
const PARK_GRACE_MS: u64 = 1000;
/// A fetch lease outlives the callout's own timeout by this much.
const LEASE_GRACE_MS: u64 = 500;
/// A callout still unanswered this long after its own timeout is given up.
const CALL_GRACE_MS: u64 = 500;

pub struct Lifecycle {
    root: ContextId,
    cfg: Option<Rc<Config>>,
    timing: Timing,
    names: Names,
    calls: BTreeMap<CallId, Purpose>,
    slots: Vec<SlotCache>,
    sessions: Vec<SessionCall>,
    revocations: Revocations,
    /// Every stream this worker is deciding or has decided, until it ends: one state each.
    streams: crate::Map<ContextId, Stream>,
    /// Response-scrubbing needles per target, tagged with the value they came from.
    needles: crate::Map<usize, state::PreparedNeedles>,
    /// Credentials this worker verified, with the key that did (no HMAC or parse on a repeat).
    verified: VerifiedCache,
    tick_ms: u64,
    /// When the last tick ran (milliseconds; the configuration's time before the first).
    last_tick_ms: u64,
    /// The time of the event being handled (microseconds since the epoch), given with it: every
    /// decision of one event reads this one time.
    now_us: u64,
    /// The event being handled is a root callback: callouts may be dispatched.
    in_root: bool,
    /// A root callback was asked for during this event.
    woke: bool,
    /// The effective context this lifecycle last set (the root, or a parked stream it decides).
    current: ContextId,
    /// This worker's issuance sequence (part of each new jti).
    issue_seq: u64,
    /// This worker's part in the fleet ledger.
    ledger: LedgerState,
    /// Counts configurations taken: a request decided under an earlier one is not finished
    /// under this one.
    generation: u64,
    /// Allowed streams whose held body goes on at the next root callback.
    to_resume: Vec<ContextId>,
}

impl Lifecycle {
    pub fn new(root: ContextId) -> Lifecycle {
        Lifecycle {
            root,
            cfg: None,
            timing: Timing::new(300, 0),
            names: Names::default(),
            calls: BTreeMap::new(),
            slots: Vec::new(),
            sessions: Vec::new(),
            revocations: Revocations::default(),
            streams: crate::Map::default(),
            needles: crate::Map::default(),
            verified: VerifiedCache::default(),
            tick_ms: 0,
            last_tick_ms: 0,
            now_us: 0,
            in_root: false,
            woke: false,
            current: root,
            issue_seq: 0,
            ledger: LedgerState::default(),
            generation: 0,
            to_resume: Vec::new(),
        }
    }

    /// Take a (new) configuration: name its shared records, create those that do not exist yet,
    /// and start the tick. Everything this worker knew of the previous configuration goes:
    /// callouts still in flight for it are ignored when they answer, and requests parked under it
    /// are answered by the next tick (they hold slots of the old configuration).
    pub fn configure(&mut self, now_us: u64, host: &mut impl Host, cfg: Config) {
        self.now_us = now_us;
        let names = Names {
            secrets: cfg.slots.iter().map(|s| cfg.stores.get(s.store).map_or_else(String::new, |st| keys::secret(st, &s.path))).collect(),
            sessions: cfg.stores.iter().map(keys::session).collect(),
            revocation: cfg.revocation.as_ref().and_then(|r| {
                cfg.stores.get(r.store).map(|st| RevocationNames {
                    list: keys::revocation(st, &r.path),
                    lease: keys::revocation_lease(st, &r.path),
                    checked: keys::revocation_checked(st, &r.path),
                })
            }),
        };
        shared::create_records(host, &names);
        self.timing = Timing::new(cfg.cache.ttl_s, cfg.cache.stale_if_error_s);
        self.slots = cfg.slots.iter().map(|_| SlotCache::default()).collect();
        self.sessions = vec![SessionCall::Idle; cfg.stores.len()];
        self.revocations = Revocations::default();
        self.calls.clear();
        self.verified.clear();
        self.needles.clear();
        for s in self.streams.values_mut() {
            if let Stream::Parked(p) = s {
                p.deadline_ms = 0;
            }
        }
        self.names = names;
        self.generation += 1;
        self.cfg = Some(Rc::new(cfg));
        self.tick_ms = TICK_MS;
        self.last_tick_ms = now_us / 1000;
        host.metric(Metric::VmConfigured);
        // Spend series exist from the start for every priced target (dashboards see a zero).
        if let Some(cfg) = self.cfg.clone() {
            for t in cfg.targets.iter().filter(|t| t.cost.is_some()) {
                host.count(crate::record::Family::SpendReserved, &[&t.name], 0);
                if !t.refund_on.is_empty() {
                    host.count(crate::record::Family::SpendRefunded, &[&t.name], 0);
                }
                if t.cost.as_ref().is_some_and(crate::policy::cost::Cost::metered) {
                    host.count(crate::record::Family::SpendReleased, &[&t.name], 0);
                    host.count(crate::record::Family::UsageUnread, &[&t.name], 0);
                }
            }
        }
    }

    pub fn configured(&self) -> bool {
        self.cfg.is_some()
    }

    /// When this lifecycle next wants a `Tick` (milliseconds since the epoch); `None` before a
    /// configuration. A tick may come later (a host's timer is coarse) or earlier: the tick does
    /// what is due at the time it is given.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.cfg.as_ref().map(|_| self.last_tick_ms.saturating_add(self.tick_ms))
    }

    /// The tick period this state asks for (shorter while this worker waits for another worker,
    /// a callout or the fleet ledger), for hosts whose timer is periodic.
    pub fn tick_period_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Handle one event at `now_us` (microseconds since the epoch: the host's clock, read once for
    /// the event). The returned action matters for `Request` (continue or pause the stream) and
    /// `Response`; root events return `Continue`.
    pub fn handle(&mut self, now_us: u64, host: &mut impl Host, ev: Event) -> Action {
        // Tests poison the time of the events said not to read it.
        #[cfg(test)]
        let now_us = if self.reads_clock(&ev) { now_us } else { 0 };
        self.now_us = now_us;
        self.woke = false;
        match ev {
            Event::Request(ctx) => {
                self.enter_stream(ctx);
                let a = self.decide(host, ctx, None);
                self.guard(host, ctx, Passing::Headers, a)
            }
            Event::RequestBody { ctx, size, end } => {
                self.enter_stream(ctx);
                let a = self.on_body(host, ctx, Some(size), end);
                self.guard(host, ctx, if end { Passing::End } else { Passing::Body }, a)
            }
            Event::RequestTrailers(ctx) => {
                // Trailers end a body too: the last data frame did not say so.
                self.enter_stream(ctx);
                let held = matches!(self.streams.get(&ctx), Some(Stream::Pricing { .. }));
                let a = self.on_body(host, ctx, None, true);
                let a = self.guard(host, ctx, Passing::End, a);
                if a == Action::Continue && held {
                    // A body held here (priced at its trailers) is let go by resuming the stream
                    // from a root callback, never by continuing the trailers: after a parked
                    // request's replay, Envoy would pass the trailers on before the held body, and
                    // the buffer filter behind would send the headers upstream with
                    // `content-length: 0` and the body after them, as a second request.
                    self.to_resume.push(ctx);
                    self.want_root(host);
                    return Action::Pause;
                }
                a
            }
            Event::Response(ctx) => {
                self.enter_stream(ctx);
                self.on_response(host, ctx);
                Action::Continue
            }
            Event::ResponseBody { ctx, size, end } => {
                if matches!(self.streams.get(&ctx), Some(Stream::Allowed(s)) if s.meter.is_some()) {
                    self.enter_stream(ctx);
                    self.read_answer(host, ctx, size, end);
                }
                Action::Continue
            }
            Event::ResponseTrailers(ctx) => {
                self.enter_stream(ctx);
                // Settled first: the answer's copy is consumed before the trailers are scrubbed.
                self.settle_call(host, ctx);
                self.on_trailers(host, ctx);
                Action::Continue
            }
            Event::StreamGone(ctx) => {
                self.forget(host, ctx);
                self.forget_ledger(ctx);
                Action::Continue
            }
            // Calls past their deadline are given up first: an answer seen after it (a worker
            // that was not woken in time) is not acted on, as if it came after the tick.
            Event::Answer { call, answer } => self.root_turn(host, |lc, host| {
                lc.expire_calls(host, lc.now_us / 1000);
                lc.on_answer(host, call, answer);
            }),
            Event::Tick => self.root_turn(host, Self::tick),
            Event::Woken => self.root_turn(host, |_, _| {}),
        }
    }

    /// A stream callback: the effective context is the stream's own.
    fn enter_stream(&mut self, ctx: ContextId) {
        self.in_root = false;
        self.current = ctx;
    }

    /// Part of a request body, or its end (`size`: all of it buffered so far; `None`: not told,
    /// the trailers ended it).
    fn on_body(&mut self, host: &mut impl Host, ctx: ContextId, size: Option<usize>, end: bool) -> Action {
        match self.streams.get_mut(&ctx) {
            Some(Stream::Pricing { .. }) => self.price_body(host, ctx, size, end),
            Some(Stream::Issuing(_)) => self.issue_body(host, ctx, size, end),
            Some(Stream::Parked(p)) => {
                // Its body ended while it waits: remember how, for the decision.
                if end {
                    p.body_end = Some(size);
                }
                Action::Pause
            }
            Some(Stream::Allowed(_)) => Action::Continue,
            Some(Stream::Answered) => Action::Pause,
            // A stream never decided: the guard refuses it.
            None => Action::Continue,
        }
    }

    /// "No decision, no key", whatever the framing: a request callback may let the request go on
    /// only if the stream was decided and allowed. Headers of a request still to be priced (or of
    /// the issuing endpoint) may go on to the buffer filter that holds them from the router while
    /// its body is held here; nothing else that is undecided ever passes. A request that would is
    /// refused and counted (`keyward_undecided_requests_total`): a path this lifecycle did not foresee fails closed.
    fn guard(&mut self, host: &mut impl Host, ctx: ContextId, passing: Passing, a: Action) -> Action {
        if a == Action::Pause {
            return a;
        }
        let decided = match self.streams.get(&ctx) {
            Some(Stream::Allowed(_)) => true,
            Some(Stream::Pricing { .. } | Stream::Issuing(_)) => passing == Passing::Headers,
            _ => false,
        };
        if decided {
            return a;
        }
        let state = self.streams.get(&ctx).map_or("unknown", Stream::name);
        log::warn!("a request would have gone on undecided (state {state}, {passing:?}); refused");
        host.metric(Metric::Undecided);
        self.streams.insert(ctx, Stream::Answered);
        let d = crate::response::Denial::new(crate::response::Code::SecretUnavailable, "the gateway could not decide this request").retry_after(5);
        request::finish_deny(host, &crate::record::Audit { decision: d.code.as_str(), ..Default::default() }, &d, self.now_us)
    }

    /// A root event: as the root, do `work`, then send what is queued and set the tick.
    fn root_turn<H: Host>(&mut self, host: &mut H, work: impl FnOnce(&mut Self, &mut H)) -> Action {
        self.in_root = true;
        let _ = self.enter(host, self.root);
        work(self, host);
        self.pump(host);
        self.settle(host);
        Action::Continue
    }

    /// A callout answered. An id this worker does not know (given up after its deadline, or
    /// dispatched under a previous configuration) is ignored.
    fn on_answer(&mut self, host: &mut impl Host, call: CallId, answer: Answer) {
        let Some(purpose) = self.calls.remove(&call) else {
            log::debug!("ignoring the answer to callout {call}: not in flight here");
            return;
        };
        match purpose {
            Purpose::Secret(slot) => self.on_secret_answer(host, slot, call, answer),
            Purpose::Session(store) => self.on_session_answer(host, store, call, answer),
            Purpose::Revocation => self.on_revocation_answer(host, call, answer),
            Purpose::Sts(ctx) => self.on_sts_answer(host, ctx, call, answer),
            Purpose::Ledger(job) => self.on_ledger_answer(host, job, answer),
        }
    }

    /// Make `ctx` the effective context.
    fn enter(&mut self, host: &mut impl Host, ctx: ContextId) -> Result<(), HostError> {
        host.set_effective_context(ctx)?;
        self.current = ctx;
        Ok(())
    }

    /// Send a callout as the root: only in a root event (the SDK files the answer under the
    /// context it is running), and with the root as Envoy's effective context (Envoy cancels a
    /// context's callouts when it goes), then back to the context being decided, if any.
    fn send(&mut self, host: &mut impl Host, call: &HttpCall) -> Result<CallId, HostError> {
        if !self.in_root {
            return Err(HostError::Failed);
        }
        let back = self.current;
        if back != self.root {
            self.enter(host, self.root)?;
        }
        let sent = host.dispatch(call);
        if back != self.root && self.enter(host, back).is_err() {
            log::debug!("context {back} went away during a dispatch");
        }
        sent
    }

    /// A stream asked for a callout: get a root callback to dispatch it (once per event).
    fn want_root(&mut self, host: &mut impl Host) {
        if self.in_root || self.woke {
            return;
        }
        self.woke = true;
        if !host.wake_root() {
            log::warn!("could not wake the root context; the callout waits for the next tick");
        }
    }

    /// Dispatch what is queued (root events only).
    fn pump(&mut self, host: &mut impl Host) {
        for ctx in std::mem::take(&mut self.to_resume) {
            if matches!(self.streams.get(&ctx), Some(Stream::Allowed(_))) && self.enter(host, ctx).is_ok() && host.resume().is_err() {
                log::warn!("could not resume a request");
            }
        }
        for store in 0..self.sessions.len() {
            if let Some(SessionCall::Queued { renewal }) = self.sessions.get(store).cloned() {
                self.dispatch_session(host, store, renewal);
            }
        }
        for slot in 0..self.slots.len() {
            if let Some(Fetch::Queued { retried }) = self.slots.get(slot).map(|s| s.fetch.clone()) {
                self.dispatch_slot(host, slot, retried);
            }
        }
        self.pump_issuing(host);
        self.pump_ledger(host);
        if self.issuances() > 0 {
            let now_ms = self.now_us / 1000;
            self.tick_issuing(host, now_ms);
        }
        if self.waits_for_revocation() && self.revocations.refresh == Refresh::Idle {
            let now_ms = self.now_us / 1000;
            self.tick_revocation(host, now_ms);
        }
    }

    fn waits_for_revocation(&self) -> bool {
        self.streams.values().any(|s| matches!(s, Stream::Parked(p) if p.wait == Wait::Revocation))
    }

    /// The end of a root event: back to the root context, and the tick this state needs.
    fn settle(&mut self, host: &mut impl Host) {
        let _ = self.enter(host, self.root);
        let waiting = self.slots.iter().any(|s| matches!(s.fetch, Fetch::Following | Fetch::Queued { .. } | Fetch::AwaitingSession { .. }))
            || self.sessions.iter().any(|s| matches!(s, SessionCall::Queued { .. }))
            || self.revocations.refresh == Refresh::AwaitingSession
            || self.waits_for_revocation()
            || self.issuances() > 0
            || !self.to_resume.is_empty()
            || self.ledger_waiting();
        self.tick_ms = if waiting { FAST_TICK_MS } else { TICK_MS };
    }

    /// Periodic work (a root event).
    fn tick(&mut self, host: &mut impl Host) {
        if self.cfg.is_none() {
            return;
        }
        let now_ms = self.now_us / 1000;
        self.last_tick_ms = now_ms;
        self.expire_calls(host, now_ms);
        self.tick_sessions(host, now_ms);
        self.tick_revocation(host, now_ms);
        self.follow(host, now_ms);
        self.refresh_ahead(host, now_ms);
        self.expire_parked(host, now_ms);
        self.expire_pricing(host, now_ms);
        self.tick_issuing(host, now_ms);
        self.tick_ledger(host, now_ms);
    }

    /// Callouts past their deadline: given up, as if they had failed. Their answer, should it
    /// still come, is ignored.
    fn expire_calls(&mut self, host: &mut impl Host, now_ms: u64) {
        let late: Vec<(CallId, Purpose)> =
            self.calls.iter().filter(|(c, p)| self.deadline(**c, **p).is_some_and(|d| now_ms >= d)).map(|(c, p)| (*c, *p)).collect();
        for (call, purpose) in late {
            self.calls.remove(&call);
            log::warn!("callout {call} ({purpose:?}) had no answer in time; giving it up");
            match purpose {
                Purpose::Secret(slot) => self.on_secret_answer(host, slot, call, Answer::failed()),
                Purpose::Session(store) => self.on_session_answer(host, store, call, Answer::failed()),
                Purpose::Revocation => self.on_revocation_answer(host, call, Answer::failed()),
                Purpose::Sts(ctx) => self.on_sts_answer(host, ctx, call, Answer::failed()),
                Purpose::Ledger(job) => self.on_ledger_answer(host, job, Answer::failed()),
            }
        }
    }

    fn deadline(&self, call: CallId, purpose: Purpose) -> Option<u64> {
        match purpose {
            Purpose::Secret(slot) => match self.slots.get(slot).map(|s| &s.fetch) {
                Some(Fetch::InFlight { call: c, deadline_ms, .. }) if *c == call => Some(*deadline_ms),
                _ => Some(0),
            },
            Purpose::Session(store) => match self.sessions.get(store) {
                Some(SessionCall::InFlight { call: c, deadline_ms, .. }) if *c == call => Some(*deadline_ms),
                _ => Some(0),
            },
            Purpose::Revocation => match &self.revocations.refresh {
                Refresh::InFlight { call: c, deadline_ms, .. } if *c == call => Some(*deadline_ms),
                _ => Some(0),
            },
            Purpose::Sts(ctx) => self.issue_deadline(ctx, call),
            Purpose::Ledger(job) => self.ledger_deadline(job, call),
        }
    }
}
