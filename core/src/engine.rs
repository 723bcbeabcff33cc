//! The per-request decision, as a pure function of the configuration, the request, the secret
//! cache and the clock. The lifecycle implements `Request`, `Secrets` and `Counter` over its
//! host; tests implement them in memory. A request that needs a secret not yet cached gets
//! `Outcome::Need`, parks, and is decided again from scratch when the secret arrives.
//!
//! Counting a request against its limits and budgets changes state, so it is not part of the
//! decision: `decide` is given no `Counter` and ends with `Step::Count` where the request must be
//! counted; the caller counts it (`admission::admit`) and `Count::admitted` finishes the decision
//! from the answer. `decide_and_count` is the two steps in order.

use crate::config::{Config, Target};
use crate::credential::copies;
use crate::credential::extract::CredentialSource;
use crate::credential::jwt::{self, HmacKey};
use crate::credential::verified::VerifiedCache;
use crate::inject::{self, Op};
use crate::policy::cost::body::BodyKind;
use crate::policy::cost::{BodyHeaders, Priced, Unreadable};
use crate::policy::rules::{sanitize, strip_prefix};
use crate::record::Audit;
use crate::response::{Code, Denial};
use crate::secrets::store::Fetched;
use crate::wire::pct;
use std::rc::Rc;

pub mod admission;
mod body;
mod verify;
pub use admission::{Admitted, Counter, Entry, Halt, Holder, Reservation, Spend, Stage, Ticket};
pub use body::{body_counted, price_and_count, price_body, BodyDecision, Deferred};
pub use verify::verify_bearer;

/// What the engine may ask of the request.
pub trait Request {
    fn method(&mut self) -> Option<String>;
    fn path(&mut self) -> Option<String>;
    fn header(&mut self, name: &str) -> Option<Vec<u8>>;
    /// Every value of a header. Envoy joins repeated inline headers such as `authorization`
    /// with commas, but keeps repeats of other headers as separate fields; `header` returns
    /// only the first of those.
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>>;
    /// Every header, pseudo-headers included, as Envoy hands them over.
    fn headers(&mut self) -> &crate::host::Headers;
    /// `xds.route_metadata.filter_metadata.keyward.target`
    fn route_target(&mut self) -> Option<String>;
    /// `xds.route_metadata.filter_metadata.keyward.prefix`
    fn route_prefix(&mut self) -> Option<String>;
}

/// The state of a cached value.
pub enum Lookup<T> {
    Ready(T),
    /// Past its TTL, served because the store is failing transiently (`stale_if_error_s`).
    Stale(T),
    /// Not cached yet: the caller must fetch it and decide again.
    Pending,
    /// Fetching failed and nothing usable is cached.
    Failed,
}

/// What the engine may read: the secret cache, the revocation list, verified credentials.
pub trait Secrets {
    /// The secret document behind `slot`.
    fn secret(&mut self, slot: usize) -> Lookup<Rc<Fetched>>;
    /// A signing key held in a store (`slot`'s `field`), prepared for HMAC.
    fn signing_key(&mut self, slot: usize, field: &str) -> Lookup<Option<Rc<HmacKey>>>;
    /// Is this credential revoked (by `jti` or `sub`)? `Pending`: this process has no list it
    /// trusts yet (the request waits for one); `Failed`: the list is unusable (too old): 503.
    fn revoked(&mut self, _jti: &str, _sub: &str) -> Lookup<bool> {
        Lookup::Ready(false)
    }
    /// Where verified credentials are remembered (`credential::verified`); `None`: verify every time.
    fn verified(&mut self) -> Option<&mut VerifiedCache> {
        None
    }
}

#[derive(Debug)]
pub enum Outcome {
    Allow(Vec<Op>),
    Deny(Denial),
    /// Fetch this slot, then decide again.
    Need(usize),
    /// Wait for a revocation list this process trusts, then decide again.
    NeedRevocation,
    /// Wait for the fleet ledger's answer about this account, then decide again.
    NeedLedger(u64),
}

#[derive(Debug)]
pub struct Decision {
    pub outcome: Outcome,
    pub audit: Audit,
    /// A cost this request reserved (released if the vendor answers with a `refund_on` status).
    pub reservation: Option<Reservation>,
    /// Allowed so far, but its cost is in the body: `price_body` decides it at the body's end.
    pub deferred: Option<Deferred>,
}

impl Decision {
    fn new(outcome: Outcome, audit: Audit) -> Decision {
        Decision { outcome, audit, reservation: None, deferred: None }
    }
}

/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_UNAVAILABLE_S: u32 = 5;

fn deny(mut audit: Audit, d: Denial) -> Decision {
    audit.decision = d.code.as_str();
    Decision::new(Outcome::Deny(d), audit)
}

pub(crate) fn unreadable(u: Unreadable) -> Denial {
    match u {
        Unreadable::Bad(m) => Denial::new(Code::BadRequest, m),
        Unreadable::TooLarge => Denial::new(Code::BodyTooLarge, "the request body is larger than this target reads to price it"),
    }
}

pub(crate) fn unavailable() -> Denial {
    Denial::new(Code::SecretUnavailable, "the upstream credential is unavailable; try again later").retry_after(RETRY_AFTER_UNAVAILABLE_S)
}

/// Headers some vendors (Google APIs among them) honour to run another method than `:method`.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// Every method the request asks the vendor to run instead of `:method`: the override headers'
/// values and the query's `_method` parameters, upper-cased. `Err`: one is not a method token.
fn method_overrides(req: &mut impl Request, raw_path: &str) -> Result<Vec<String>, ()> {
    let mut out = Vec::new();
    for h in METHOD_OVERRIDE_HEADERS {
        for v in req.header_values(h) {
            out.push(String::from_utf8(v).map_err(|_| ())?);
        }
    }
    if let Some((_, query)) = raw_path.split_once('?') {
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if pct::decode_query_text(k).eq_ignore_ascii_case("_method") {
                out.push(pct::decode_query_text(v));
            }
        }
    }
    out.into_iter()
        .map(|m| {
            let m = m.trim().to_ascii_uppercase();
            let ok = !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
            if ok {
                Ok(m)
            } else {
                Err(())
            }
        })
        .collect()
}

/// Decide one request. `now_s` is seconds since the epoch.
pub fn decide(cfg: &Config, req: &mut impl Request, secrets: &mut impl Secrets, now_s: i64) -> Step {
    let mut audit = Audit::default();

    // 1. Which target is this route?
    let Some(target_name) = req.route_target() else {
        return deny(audit, Denial::new(Code::UnknownTarget, "this route is not a keyward target")).into();
    };
    let Some((_, target)) = cfg.target(&target_name) else {
        return deny(audit, Denial::new(Code::UnknownTarget, "this route names an unknown target")).into();
    };
    audit.target = Some(target.name.clone());
    let idempotency = idempotency_key(req);
    if let Idempotency::Valid(k) = &idempotency {
        audit.idempotency_key = Some(k.clone());
    }

    // 2. Path sanity, before any matching.
    let (Some(method), Some(raw_path)) = (req.method(), req.path()) else {
        return deny(audit, Denial::new(Code::BadRequest, "missing :method or :path")).into();
    };
    let path = match sanitize(&raw_path) {
        Ok(p) => p,
        Err(e) => return deny(audit, Denial::new(Code::BadRequest, e.message())).into(),
    };
    let prefix = req.route_prefix().unwrap_or_default();
    let Some(vendor_path) = strip_prefix(path, &prefix) else {
        return deny(audit, Denial::new(Code::Forbidden, "the path is outside this route's prefix")).into();
    };
    // Methods the vendor may run instead of `:method` (checked against the rules below).
    let overrides = match method_overrides(req, &raw_path) {
        Ok(m) => m,
        Err(()) => return deny(audit, Denial::new(Code::BadRequest, "a method-override header or _method parameter is not a method")).into(),
    };

    // 3. The workload credential, and no copy of it anywhere else in the request.
    let src = target.credential.header();
    let value = match &target.credential {
        // `authorization` is an inline header: repeats arrive comma-joined in one value.
        CredentialSource::Bearer | CredentialSource::BasicPassword => req.header(src),
        CredentialSource::Header(_) => {
            let mut all = req.header_values(src);
            if all.len() > 1 {
                return deny(audit, Denial::new(Code::BadRequest, "the credential header is duplicated")).into();
            }
            all.pop()
        }
    };
    let v = match verify::verify(cfg, secrets, &target.credential, value.as_deref(), &mut audit, now_s) {
        Ok(v) => v,
        Err(Outcome::Deny(d)) => return deny(audit, d).into(),
        Err(outcome) => return Decision::new(outcome, audit).into(),
    };
    if let Some(d) = copied(req, &target.credential, &v.copies, &raw_path) {
        return deny(audit, d).into();
    }
    let claims = v.claims;

    // 4. Rules: a token rule for this target AND the target's own ceiling, for `:method` and for
    // every method the vendor may run instead.
    if !rules_allow(&claims, target, &method, vendor_path) {
        return deny(audit, Denial::new(Code::Forbidden, "no rule allows this method and path for this target")).into();
    }
    if !overrides.iter().all(|m| rules_allow(&claims, target, m, vendor_path)) {
        return deny(audit, Denial::new(Code::Forbidden, "a method override names a method no rule allows for this path")).into();
    }

    // 5. The idempotency guard, then the credential's limits: both before any vault call.
    if target.require_idempotency_key.iter().any(|m| m == &method) && !matches!(idempotency, Idempotency::Valid(_)) {
        let msg = match idempotency {
            Idempotency::Duplicate => "the Idempotency-Key header is duplicated",
            _ => "this method needs an Idempotency-Key header of 1 to 255 visible ASCII characters",
        };
        return deny(audit, Denial::new(Code::BadRequest, msg)).into();
    }
    // Priced when any method the vendor may run (an override included) is. A request whose body
    // is read (priced from it, or free but with a body that could name another method) is counted
    // at the body's end, once nothing else can refuse it; any other now, before any vault call.
    let cost = target.cost.as_ref();
    let priced = cost.filter(|c| c.applies(&method, vendor_path) || overrides.iter().any(|m| c.applies(m, vendor_path)));
    let content_type = req.header("content-type");
    let body_kind = match (cost, priced) {
        (Some(c), Some(_)) => c.body_kind(),
        // A free request's body is read for a `_method` field where the vendor may honour one,
        // in whatever form a framework would parse it (Rack reads a POST without a type as a form).
        (Some(c), None) if c.body_kind().is_some() && c.body_method_override => match BodyKind::of(content_type.as_deref()) {
            Ok(Some(k)) => Some(k),
            Ok(None) if content_type.is_none() && method == "POST" => Some(BodyKind::Form),
            Ok(None) => None,
            Err(u) => return deny(audit, unreadable(u)).into(),
        },
        _ => None,
    };
    if let (Some(c), true) = (priced, body_kind.is_some()) {
        let h = BodyHeaders {
            content_type,
            content_encoding: req.header("content-encoding"),
            content_length: req.header("content-length"),
            query: raw_path.split_once('?').map(|(_, q)| q.to_string()),
        };
        if let Err(u) = c.check_headers(&h) {
            return deny(audit, unreadable(u)).into();
        }
    }
    // Whether this parent's budget can be found: its entry is named by the key that signed it.
    let par_key_id = match (claims.par.as_ref(), claims.pkid.as_deref()) {
        (Some(_), Some(pkid)) if !claims.plim.is_empty() => match verify::key_identity(cfg, secrets, pkid) {
            Ok(id) => id,
            Err(Outcome::Deny(d)) => return deny(audit, d).into(),
            Err(outcome) => return Decision::new(outcome, audit).into(),
        },
        _ => v.key_id,
    };
    // What it counts under, built only when the credential has limits (the retry seed only when
    // its body is read and it carries an Idempotency-Key).
    // A parent's entry lives as long as the parent may be used (its `exp`, carried by its
    // children), so children issued one after another never find it gone and start afresh.
    let skew = cfg.policy.clock_skew_s;
    let longest = now_s.saturating_add(cfg.policy.max_token_lifetime_s);
    let par_until = claims.pexp.unwrap_or(longest).min(longest).max(claims.exp).saturating_add(skew);
    let budgets: Vec<usize> = cfg
        .ledger
        .as_ref()
        .map_or_else(Vec::new, |l| l.budgets.iter().enumerate().filter(|(_, b)| b.covers(&claims.sub, &target.name)).map(|(i, _)| i).collect());
    let ticket = Ticket::for_claims(&claims, (v.key_id, claims.exp.saturating_add(skew)), (par_key_id, par_until), budgets, || {
        // A model call is billed every time it is made: it is never a retry of another.
        let key = audit.idempotency_key.as_deref().filter(|_| priced.is_some_and(|c| !c.metered()) && body_kind.is_some())?;
        let query = raw_path.split_once('?').map_or("", |(_, q)| q);
        let headers = admission::headers_digest(req.headers(), target.credential.header());
        Some(admission::retry_seed(key, &target.name, &method, &overrides, vendor_path, query, &headers))
    });
    let index = cfg.target(&target.name).map_or(0, |(i, _)| i);
    if let (None, None, Some(ticket)) = (body_kind, priced, ticket.as_ref()) {
        // Counted now, before the vault is asked (a request over its limits never costs a fetch).
        let then = Then::Secret { raw_path };
        return Step::Count(Box::new(Count { ticket: ticket.clone(), priced: None, audit, target: index, then }));
    }

    // 6. The upstream secret.
    let (ops, mut audit) = match serve(secrets, audit, target, &raw_path) {
        Decision { outcome: Outcome::Allow(ops), audit, .. } => (ops, audit),
        stopped => return stopped.into(),
    };
    // 7. The cost: fixed, counted now; read from the body, at its end.
    let mut deferred = None;
    if let Some(kind) = body_kind {
        let path = vendor_path.to_string();
        let copies = copies::Shared(v.copies.clone());
        deferred = Some(Deferred { target: index, ticket, kind, priced: priced.is_some(), claims, method, vendor_path: path, copies });
    } else if let Some(n) = priced.and_then(|c| c.fixed()) {
        audit.cost = Some(n);
        let priced = Priced::fixed(n);
        let Some(ticket) = ticket else {
            audit.spend = Some(Spend::Uncapped.label());
            return allowed(cfg, target, ops, audit, None).into();
        };
        return Step::Count(Box::new(Count { ticket, priced: Some(priced), audit, target: index, then: Then::Spend { ops } }));
    }
    let mut d = allowed(cfg, target, ops, audit, None);
    d.deferred = deferred;
    d.into()
}

/// What `decide` ends with.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "most requests end decided: boxing that would allocate on the warm path")]
pub enum Step {
    Decided(Decision),
    /// The request must be counted (`admission::admit`) before it is decided: `Count::admitted`.
    Count(Box<Count>),
}

impl From<Decision> for Step {
    fn from(d: Decision) -> Step {
        Step::Decided(d)
    }
}

/// A decision waiting for its request to be counted.
#[derive(Debug)]
pub struct Count {
    pub ticket: Ticket,
    /// Its cost, reserved against spend caps as it is counted (`None`: a free request).
    pub priced: Option<Priced>,
    audit: Audit,
    target: usize,
    then: Then,
}

/// What is left of a decision once its request is counted.
#[derive(Debug)]
enum Then {
    /// A free request, counted before the vault: the upstream secret and the injection.
    Secret { raw_path: String },
    /// A request of fixed cost, counted last: allowed with these operations.
    Spend { ops: Vec<Op> },
}

impl Count {
    /// Finish the decision from how counting went (`admission::admit`'s answer), with the
    /// configuration `decide` was given (a target that is not the one decided is a 503).
    pub fn admitted(self, cfg: &Config, secrets: &mut impl Secrets, counted: Result<Spend, Halt>) -> Decision {
        let Count { ticket, mut audit, target, then, .. } = self;
        let spend = match counted {
            Ok(spend) => spend,
            Err(Halt::Deny(d)) => return deny(audit, d),
            Err(Halt::Pending(account)) => return Decision::new(Outcome::NeedLedger(account), audit),
        };
        let Some(target) = cfg.targets.get(target).filter(|t| audit.target.as_deref() == Some(t.name.as_str())) else {
            return deny(audit, unavailable());
        };
        audit.budgets = admission::budget_names(cfg, &ticket, &spend);
        match then {
            Then::Secret { raw_path } => match serve(secrets, audit, target, &raw_path) {
                Decision { outcome: Outcome::Allow(ops), audit, .. } => allowed(cfg, target, ops, audit, None),
                stopped => stopped,
            },
            Then::Spend { ops } => {
                audit.spend = Some(spend.label());
                let reservation = match spend {
                    Spend::Reserved(r) => Some(r),
                    _ => None,
                };
                allowed(cfg, target, ops, audit, reservation)
            }
        }
    }
}

/// Decide one request, counting it where the decision asks: `decide`, then `admission::admit`,
/// then `Count::admitted`.
pub fn decide_and_count<S: Secrets + Counter>(cfg: &Config, req: &mut impl Request, s: &mut S, now_s: i64) -> Decision {
    match decide(cfg, req, s, now_s) {
        Step::Decided(d) => d,
        Step::Count(c) => {
            let counted = admission::admit(s, &c.ticket, c.priced.as_ref(), &[]);
            c.admitted(cfg, s, counted)
        }
    }
}

/// The upstream secret, and how it is put into the request: `Allow` with the operations that put
/// it there (the decision headers not yet added), or the decision that stops it (wait for the
/// secret, or 503).
fn serve(secrets: &mut impl Secrets, mut audit: Audit, target: &Target, raw_path: &str) -> Decision {
    let fetched = match secrets.secret(target.slot) {
        Lookup::Ready(f) => {
            audit.cache = Some("hit");
            f
        }
        Lookup::Stale(f) => {
            audit.cache = Some("stale");
            f
        }
        Lookup::Pending => return Decision::new(Outcome::Need(target.slot), audit),
        Lookup::Failed => return deny(audit, unavailable()),
    };
    audit.secret_version.clone_from(&fetched.version);
    match inject::plan(target, &fetched, raw_path) {
        Ok(ops) => Decision::new(Outcome::Allow(ops), audit),
        Err(_) => deny(audit, unavailable()),
    }
}

/// An allowed request: its operations, with the decision headers when the gateway adds them.
fn allowed(cfg: &Config, target: &Target, mut ops: Vec<Op>, mut audit: Audit, reservation: Option<Reservation>) -> Decision {
    audit.decision = "allow";
    if cfg.decision_headers {
        let a = &audit;
        ops.extend(inject::decision_ops(a.subject.as_deref().unwrap_or(""), a.jti.as_deref().unwrap_or(""), &target.name, a.run.as_deref()));
    }
    Decision { outcome: Outcome::Allow(ops), audit, reservation, deferred: None }
}

/// Does a rule of the credential for this target, and one of the target's own (if it declares
/// any), allow `method` on `vendor_path`?
pub(crate) fn rules_allow(claims: &jwt::Claims, target: &Target, method: &str, vendor_path: &str) -> bool {
    let by_token = claims.allow.iter().any(|r| r.target == target.name && r.rule.matches(method, vendor_path));
    by_token && target.allow.as_ref().is_none_or(|rules| rules.iter().any(|r| r.matches(method, vendor_path)))
}

/// A copy of the credential elsewhere in the request (`credential::copies`): 400, never forwarded.
fn copied(req: &mut impl Request, source: &CredentialSource, needles: &copies::Needles, raw_path: &str) -> Option<Denial> {
    let found = needles.find(req.headers(), source.header());
    let found = found.or_else(|| needles.holds(raw_path.as_bytes()).then(|| ":path".to_string()));
    found.map(|name| {
        log::info!("refused a request that carries a copy of its credential in {}", name.chars().take(64).collect::<String>());
        Denial::new(Code::BadRequest, "a copy of the credential is in another header, a cookie, the path or the query; send it only where the target reads it")
    })
}

/// The longest `Idempotency-Key` accepted (Stripe's limit).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

enum Idempotency {
    Absent,
    Duplicate,
    Invalid,
    Valid(String),
}

/// Read `Idempotency-Key`: 1 to 255 visible ASCII characters. A value shaped like a JWS is never
/// kept for the access log (a workload could put its credential there by mistake).
fn idempotency_key(req: &mut impl Request) -> Idempotency {
    let mut all = req.header_values("idempotency-key");
    if all.len() > 1 {
        return Idempotency::Duplicate;
    }
    let Some(v) = all.pop() else { return Idempotency::Absent };
    if v.is_empty() || v.len() > MAX_IDEMPOTENCY_KEY || !v.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Idempotency::Invalid;
    }
    if v.starts_with(b"eyJ") && v.iter().filter(|b| **b == b'.').count() == 2 {
        return Idempotency::Invalid;
    }
    String::from_utf8(v).map_or(Idempotency::Invalid, Idempotency::Valid)
}

#[cfg(test)]
mod tests;
