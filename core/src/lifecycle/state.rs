//! The lifecycle's state, as values: what a test constructs, prints and compares. Every state
//! this worker keeps across callouts and ticks is one of these; the transitions are in the sibling
//! modules (`fetch`, `session`, `revocation`, `request`).

use crate::config::Config;
use crate::credential::jwt::HmacKey;
use crate::credential::revocation::RevocationList;
use crate::engine::{Admitted, Deferred, Reservation};
use crate::host::{CallId, ContextId};
use crate::record::Audit;
use crate::secrets::slot_state::SlotState;
use crate::secrets::store::Fetched;
use std::rc::Rc;

/// This worker's part in fetching one slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fetch {
    /// Nothing in progress here.
    #[default]
    Idle,
    /// Another worker holds the lease: the tick watches the shared record.
    Following,
    /// This worker holds the lease; the callout goes out at the next root callback.
    Queued { retried: bool },
    /// This worker holds the lease and waits for its store's Vault session.
    AwaitingSession { retried: bool },
    /// The callout is out. `session`: the Vault session generation it carries; `retried`: this is
    /// the one retry after the store refused a session token.
    /// `sent_us`: when it went out, for the store's answer-time histogram.
    InFlight { call: CallId, deadline_ms: u64, session: Option<u64>, retried: bool, sent_us: u64 },
}

/// This worker's login or renewal for one store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SessionCall {
    #[default]
    Idle,
    /// This worker holds the session's lease; the call goes out at the next root callback.
    Queued {
        renewal: bool,
    },
    InFlight {
        call: CallId,
        deadline_ms: u64,
        renewal: bool,
    },
}

/// This worker's refresh of the revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Refresh {
    #[default]
    Idle,
    /// Due, but the store's Vault session is not there yet.
    AwaitingSession,
    /// `session`: the Vault session generation the call carries; `metadata`: this call reads only
    /// the list's current version (a full read follows if it changed).
    InFlight { call: CallId, deadline_ms: u64, session: Option<u64>, metadata: bool },
}

/// What a callout in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Secret(usize),
    Session(usize),
    Revocation,
    /// An `aws_iam` proof forwarded to STS for the issuance of this stream.
    Sts(ContextId),
    /// A fleet-ledger call (the job's id).
    Ledger(u64),
}

/// Where an issuance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueStep {
    /// Waiting for the request body.
    Body,
    /// The proof is with STS.
    StsInFlight { call: CallId, deadline_ms: u64 },
    /// Waiting for STS's callout to go out, a store-held key or the revocation list: tried again
    /// at each root event.
    Waiting,
}

/// An issuance in progress (the issuing endpoint's stream).
#[derive(Debug, Clone)]
pub struct Issuing {
    pub step: IssueStep,
    pub deadline_ms: u64,
    pub started_us: u64,
    /// The request body: it holds the caller's signed proof (redacted in Debug).
    pub body: crate::secret::Secret,
    pub grant: Option<crate::issue::grant::Grant>,
    /// STS's callout, queued for the root.
    pub call: Option<crate::secrets::store::HttpCall>,
    /// The IAM principal STS named, once it answered.
    pub principal: Option<String>,
    /// The `Authorization` header, taken with the headers (Envoy gives a wasm filter the request
    /// headers only until it lets them go on): an `attenuate` grant's parent credential.
    pub authorization: Option<crate::secret::Secret>,
    pub audit: Audit,
}

/// What a parked request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A secret slot's value.
    Secret(usize),
    /// A revocation list this process trusts.
    Revocation,
    /// The fleet ledger's answer about an account (the lifecycle's number for it).
    Ledger(u64),
    /// The drain endpoint, for a return it asked for in that account: answered with what is
    /// still held when the return is answered, or at its deadline (never refused).
    Drain(u64),
}

/// A request waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub wait: Wait,
    pub deadline_ms: u64,
    pub audit: Audit,
    /// The limit entries it was already counted in, in order (its credential's, its parent's,
    /// budgets'): deciding again must not count it twice.
    pub admitted: Vec<Admitted>,
    /// When its headers reached the filter (microseconds), for the added-latency histogram.
    pub started_us: u64,
    /// Its body ended while it was parked (its size; `None`: its trailers ended it, and what is
    /// held is all of it): Envoy will not announce the end again after the resume. A wasm filter
    /// hears of it only for a request whose headers ended the stream; a native one, whose paused
    /// stream's body and trailers still reach it, for every framing.
    pub body_end: Option<Option<usize>>,
}

/// What an allowed request was given (for vendor 401/403 and response scrubbing), and the cost
/// it holds against spend caps (released if the vendor answers with a `refund_on` status). It
/// keeps the configuration it was decided under: its response is scrubbed by that target's
/// rules even if the configuration changes meanwhile.
#[derive(Clone)]
pub struct Served {
    pub(super) cfg: Rc<Config>,
    pub(super) slot: usize,
    pub(super) fetched_at_ms: u64,
    pub(super) target: usize,
    pub(super) data: Option<Rc<Fetched>>,
    pub(super) reservation: Option<Reservation>,
    /// A model call: settled from the usage in its answer.
    pub(super) meter: Option<Box<super::metering::Metering>>,
}

/// A request whose cost is in its body: its headers went on (rewritten; Envoy's buffer filter
/// holds them back from the router), and it is decided when the whole body has arrived (the last
/// data frame, or the trailers).
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    pub deferred: Deferred,
    pub audit: Audit,
    /// The configuration it was decided under (`Lifecycle::generation`): under another, refused.
    pub generation: u64,
    /// Microseconds the filter spent on its headers (for the added-latency histogram).
    pub header_us: u64,
    /// Its body's end came, and it waits for the fleet ledger (this account): the body, read once,
    /// and the entries it was already counted in.
    pub waiting: Option<u64>,
    pub body: Option<crate::secret::Secret>,
    pub admitted: Vec<Admitted>,
    /// When its wait for the ledger ends in 503.
    pub deadline_ms: u64,
}

/// One stream as the filter knows it, from its request headers until it ends: exactly one of
/// these per stream, in one map. Which callbacks may let the request go on follows from it
/// (`Lifecycle::guard`): only an `Allowed` request reaches the vendor with its body's end.
pub enum Stream {
    /// Its headers are held, nothing injected, until a secret or the revocation list is there.
    Parked(Box<Parked>),
    /// Allowed so far and rewritten; the body is held here until its end decides it.
    Pricing { pricing: Box<Pricing>, served: Served },
    /// The issuing endpoint: answered by the filter, never forwarded.
    Issuing(Box<Issuing>),
    /// Decided and allowed.
    Allowed(Served),
    /// Answered by the filter (refused, or an endpoint's answer).
    Answered,
}

impl Stream {
    pub fn name(&self) -> &'static str {
        match self {
            Stream::Parked(_) => "parked",
            Stream::Pricing { .. } => "pricing",
            Stream::Issuing(_) => "issuing",
            Stream::Allowed(_) => "allowed",
            Stream::Answered => "answered",
        }
    }
}

/// This worker's part in the fleet ledger: the accounts it asked for, its calls, and the outcomes
/// of direct charges waiting for their stream to decide again.
#[derive(Default)]
pub struct LedgerState {
    /// This Envoy's id in the ledger (shared data: one per process).
    pub(super) gateway: Option<String>,
    /// This worker's number (it holds a slice's job under it).
    pub(super) worker: Option<u64>,
    pub(super) accounts: std::collections::BTreeMap<u64, AccountLocal>,
    pub(super) ids: crate::Map<String, u64>,
    pub(super) next_id: u64,
    pub(super) jobs: std::collections::BTreeMap<u64, Job>,
    pub(super) next_job: u64,
    pub(super) results: crate::Map<(ContextId, u64), Admitted>,
    /// What streams that left while their direct charge was in flight had taken before it: kept
    /// if the charge is made (it stands, so they stand with it), given back if not.
    pub(super) orphans: crate::Map<ContextId, Vec<Admitted>>,
    /// When this worker last looked for other workers' ended leases.
    pub(super) swept_ms: u64,
}

/// An account this worker asked for.
pub struct AccountLocal {
    pub(super) account: crate::ledger::Account,
    /// Another worker is calling the ledger for it: the tick watches the shared slice.
    pub(super) following: bool,
    /// What the ledger last said is left (sizes the next grant).
    pub(super) left: Option<crate::ledger::Amounts>,
    /// Other gateways' old end marks seen in the item, removed by the next grant.
    pub(super) prune: Vec<String>,
    /// Retry marks seen in the item (how many, and those past their time, removed by the next
    /// direct charge).
    pub(super) marks: usize,
    pub(super) expired_marks: Vec<String>,
}

/// A call to the ledger, queued for the root or in flight.
pub struct Job {
    pub(super) account: u64,
    pub(super) kind: JobKind,
    pub(super) call: Option<CallId>,
    pub(super) deadline_ms: u64,
}

#[derive(Clone)]
pub enum JobKind {
    /// A first lease or a top-up for this gateway's slice (`resolved` once the call is made: the
    /// lease as it will be if the ledger makes it).
    Grant { want: crate::ledger::Amounts, resolved: Option<crate::ledger::dynamo::Lease> },
    /// The item as it is, to tell why a conditional change failed.
    Read { then: ReadFor },
    /// A direct charge of one stream's request.
    Direct { ctx: ContextId, amounts: crate::ledger::Amounts, mark: crate::ledger::Mark },
    /// Pin the charge a retry of stream `ctx` is admitted on (it may no longer be refunded).
    Pin { ctx: ContextId, mark: String },
    /// Give back what a lease did not use (`old`: its id and sequence as the slice knew them;
    /// `credit`: the slice's credit `back` includes).
    Return { old: (u64, u64), back: crate::ledger::Amounts, credit: crate::ledger::Amounts },
    /// Release a direct charge the vendor refunded (or that was refused after all).
    Refund { amounts: crate::ledger::Amounts, mark: crate::ledger::Mark, tries: u8 },
}

#[derive(Clone)]
pub enum ReadFor {
    Grant {
        want: crate::ledger::Amounts,
        lease: crate::ledger::dynamo::Lease,
    },
    /// A direct charge refused by its condition: a retry (the mark is there), or no room.
    Direct {
        ctx: ContextId,
        amounts: crate::ledger::Amounts,
        mark: crate::ledger::Mark,
    },
    /// A direct charge whose answer was lost: was it made?
    DirectLost {
        ctx: ContextId,
        amounts: crate::ledger::Amounts,
        mark: crate::ledger::Mark,
    },
    /// A return was refused: the lease changed since (a top-up made whose answer was lost).
    Return {
        old: u64,
        credit: crate::ledger::Amounts,
    },
    /// A grant asked for whose answer was lost: was it made?
    Settle {
        id: u64,
        seq: u64,
    },
}

/// A slot's shared record as last decoded by this worker, keyed by the shared-data CAS.
pub struct Local {
    pub(super) cas: u32,
    pub(super) state: SlotState,
    pub(super) data: Option<Rc<Fetched>>,
    pub(super) fetched_at_ms: u64,
    /// When this worker last compared it with shared data.
    pub(super) checked_ms: u64,
}

/// A target's scrubbing needles, for the configuration and value they were computed from.
pub type PreparedNeedles = (Rc<Config>, Rc<Fetched>, Rc<crate::inject::scrub::Needles>);

/// A store-held signing key, prepared once per fetched value (`None`: the value is unusable).
pub type PreparedKey = (Rc<Fetched>, Option<Rc<HmacKey>>);

/// Per slot: this worker's fetch, its decoded copy of the shared record, and its prepared keys.
#[derive(Default)]
pub struct SlotCache {
    pub(super) fetch: Fetch,
    pub(super) local: Option<Local>,
    /// When this worker last served it (values in use are refreshed ahead of their TTL).
    pub(super) used_at_ms: Option<u64>,
    pub(super) keys: crate::Map<String, PreparedKey>,
    /// When this worker queued its fetch for the root, and when the store's answer arrived
    /// (microseconds; 0: none), for the cold-miss breakdown (`Family::ColdUs`).
    pub(super) queued_us: u64,
    pub(super) answered_us: u64,
}

/// The shared-data names of one configuration (`secrets::keys`), computed once.
#[derive(Default)]
pub struct Names {
    pub(super) secrets: Vec<String>,
    pub(super) sessions: Vec<Option<String>>,
    /// The revocation list, its refresh lease, and its last confirmation.
    pub(super) revocation: Option<RevocationNames>,
}

/// The shared-data names of the revocation list.
#[derive(Clone)]
pub struct RevocationNames {
    pub(super) list: String,
    pub(super) lease: String,
    /// `version u64 | at_ms u64`: the list's version was confirmed current at that time.
    pub(super) checked: String,
}

/// The revocation list as last read from shared data, and its refresh.
#[derive(Default)]
pub struct Revocations {
    /// The list in force is older than `max_stale_s` (logged once per episode).
    pub(super) too_old: bool,
    pub(super) refresh: Refresh,
    pub(super) list: Option<Rc<RevocationList>>,
    pub(super) cas: Option<u32>,
    /// When the list's version was last confirmed current (by any worker), without a full read.
    pub(super) checked_at_ms: u64,
    /// The store refused the metadata read: full reads only.
    pub(super) metadata_denied: bool,
}
