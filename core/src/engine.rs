//! The per-request decision, as a pure function of the configuration, the request, the secret
//! cache and the clock. The wasm glue implements `Request` and `Secrets` with hostcalls; tests
//! implement them in memory. A request that needs a secret not yet cached gets `Outcome::Need`,
//! parks, and is decided again from scratch when the secret arrives.

use crate::config::{Config, Target};
use crate::credential::copies;
use crate::credential::extract::CredentialSource;
use crate::credential::jwt::{self, HmacKey};
use crate::credential::verified::VerifiedCache;
use crate::inject::{self, Op};
use crate::policy::cost::body::BodyKind;
use crate::policy::cost::{BodyHeaders, Priced, Unreadable};
use crate::policy::limits::Charge;
use crate::policy::rules::{sanitize, strip_prefix};
use crate::record::Audit;
use crate::response::{Code, Denial};
use crate::secrets::store::Fetched;
use crate::wire::pct;
use std::rc::Rc;

pub mod admission;
mod body;
mod verify;
pub use admission::{Admitted, Entry, Halt, Holder, Reservation, Spend, Stage, Ticket};
pub use body::{price_body, BodyDecision, Deferred};
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
    fn headers(&mut self) -> &[(String, Vec<u8>)];
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

/// What the engine may ask of the cache and the controls.
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
    /// Count this request in `entry` (a credential's `lim`, a parent's `plim`, or a budget),
    /// unless this same request was already admitted there before it parked, and reserve `charge`
    /// (its cost) against `spend` in the same step. The answer says where it counted.
    fn admit(&mut self, _entry: &Entry, _charge: Option<&Charge>) -> Admitted {
        Admitted::admit()
    }
    /// Release what `admit` took in `holder` (the request was refused after all).
    fn release(&mut self, _holder: &Holder, _charge: &Charge) {}
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
pub fn decide(cfg: &Config, req: &mut impl Request, secrets: &mut impl Secrets, now_s: i64) -> Decision {
    let mut audit = Audit::default();

    // 1. Which target is this route?
    let Some(target_name) = req.route_target() else {
        return deny(audit, Denial::new(Code::UnknownTarget, "this route is not a keyward target"));
    };
    let Some((_, target)) = cfg.target(&target_name) else {
        return deny(audit, Denial::new(Code::UnknownTarget, "this route names an unknown target"));
    };
    audit.target = Some(target.name.clone());
    let idempotency = idempotency_key(req);
    if let Idempotency::Valid(k) = &idempotency {
        audit.idempotency_key = Some(k.clone());
    }

    // 2. Path sanity, before any matching.
    let (Some(method), Some(raw_path)) = (req.method(), req.path()) else {
        return deny(audit, Denial::new(Code::BadRequest, "missing :method or :path"));
    };
    let path = match sanitize(&raw_path) {
        Ok(p) => p,
        Err(e) => return deny(audit, Denial::new(Code::BadRequest, e.message())),
    };
    let prefix = req.route_prefix().unwrap_or_default();
    let Some(vendor_path) = strip_prefix(path, &prefix) else {
        return deny(audit, Denial::new(Code::Forbidden, "the path is outside this route's prefix"));
    };
    // Methods the vendor may run instead of `:method` (checked against the rules below).
    let overrides = match method_overrides(req, &raw_path) {
        Ok(m) => m,
        Err(()) => return deny(audit, Denial::new(Code::BadRequest, "a method-override header or _method parameter is not a method")),
    };

    // 3. The workload credential, and no copy of it anywhere else in the request.
    let src = target.credential.header();
    let value = match &target.credential {
        // `authorization` is an inline header: repeats arrive comma-joined in one value.
        CredentialSource::Bearer | CredentialSource::BasicPassword => req.header(src),
        CredentialSource::Header(_) => {
            let mut all = req.header_values(src);
            if all.len() > 1 {
                return deny(audit, Denial::new(Code::BadRequest, "the credential header is duplicated"));
            }
            all.pop()
        }
    };
    let v = match verify::verify(cfg, secrets, &target.credential, value.as_deref(), &mut audit, now_s) {
        Ok(v) => v,
        Err(Outcome::Deny(d)) => return deny(audit, d),
        Err(outcome) => return Decision::new(outcome, audit),
    };
    if let Some(d) = copied(req, &target.credential, &v.copies, &raw_path) {
        return deny(audit, d);
    }
    let claims = v.claims;

    // 4. Rules: a token rule for this target AND the target's own ceiling, for `:method` and for
    // every method the vendor may run instead.
    if !rules_allow(&claims, target, &method, vendor_path) {
        return deny(audit, Denial::new(Code::Forbidden, "no rule allows this method and path for this target"));
    }
    if !overrides.iter().all(|m| rules_allow(&claims, target, m, vendor_path)) {
        return deny(audit, Denial::new(Code::Forbidden, "a method override names a method no rule allows for this path"));
    }

    // 5. The idempotency guard, then the credential's limits: both before any vault call.
    if target.require_idempotency_key.iter().any(|m| m == &method) && !matches!(idempotency, Idempotency::Valid(_)) {
        let msg = match idempotency {
            Idempotency::Duplicate => "the Idempotency-Key header is duplicated",
            _ => "this method needs an Idempotency-Key header of 1 to 255 visible ASCII characters",
        };
        return deny(audit, Denial::new(Code::BadRequest, msg));
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
            Err(u) => return deny(audit, unreadable(u)),
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
            return deny(audit, unreadable(u));
        }
    }
    // Whether this parent's budget can be found: its entry is named by the key that signed it.
    let par_key_id = match (claims.par.as_ref(), claims.pkid.as_deref()) {
        (Some(_), Some(pkid)) if !claims.plim.is_empty() => match verify::key_identity(cfg, secrets, pkid) {
            Ok(id) => id,
            Err(Outcome::Deny(d)) => return deny(audit, d),
            Err(outcome) => return Decision::new(outcome, audit),
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
    if let (None, Some(t)) = (body_kind, &ticket) {
        if priced.is_none() {
            match admission::admit(secrets, t, None, &[]) {
                Ok(spend) => audit.budgets = admission::budget_names(cfg, t, &spend),
                Err(Halt::Deny(d)) => return deny(audit, d),
                Err(Halt::Pending(account)) => return Decision::new(Outcome::NeedLedger(account), audit),
            }
        }
    }

    // 6. The upstream secret.
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
    let mut d = allow(audit, target, &fetched, &raw_path);
    if !matches!(d.outcome, Outcome::Allow(_)) {
        return d;
    }
    // 7. The cost: fixed, reserved now; read from the body, at its end.
    if let Some(kind) = body_kind {
        let index = cfg.target(&target.name).map_or(0, |(i, _)| i);
        let path = vendor_path.to_string();
        let copies = copies::Shared(v.copies.clone());
        d.deferred = Some(Deferred { target: index, ticket, kind, priced: priced.is_some(), claims, method, vendor_path: path, copies });
    } else if let Some(n) = priced.and_then(|c| c.fixed()) {
        let priced = Priced::fixed(n);
        d.audit.cost = Some(n);
        match ticket.as_ref().map(|t| admission::admit(secrets, t, Some(&priced), &[])).transpose() {
            Ok(spend) => {
                let spend = spend.unwrap_or(Spend::Uncapped);
                d.audit.spend = Some(spend.label());
                d.audit.budgets = ticket.as_ref().and_then(|t| admission::budget_names(cfg, t, &spend));
                if let Spend::Reserved(r) = spend {
                    d.reservation = Some(r);
                }
            }
            Err(Halt::Deny(denial)) => return deny(d.audit, denial),
            Err(Halt::Pending(account)) => return Decision::new(Outcome::NeedLedger(account), d.audit),
        }
    }
    if let (true, Outcome::Allow(ops)) = (cfg.decision_headers, &mut d.outcome) {
        let a = &d.audit;
        ops.extend(inject::decision_ops(a.subject.as_deref().unwrap_or(""), a.jti.as_deref().unwrap_or(""), &target.name, a.run.as_deref()));
    }
    d
}

/// Does a rule of the credential for this target, and one of the target's own (if it declares
/// any), allow `method` on `vendor_path`?
pub(crate) fn rules_allow(claims: &jwt::Claims, target: &Target, method: &str, vendor_path: &str) -> bool {
    let by_token = claims.allow.iter().any(|r| r.target == target.name && r.rule.matches(method, vendor_path));
    by_token && target.allow.as_ref().is_none_or(|rules| rules.iter().any(|r| r.matches(method, vendor_path)))
}

/// A copy of the credential elsewhere in the request (`credential::copies`): 400, never forwarded.
fn copied(req: &mut impl Request, source: &CredentialSource, needles: &copies::Needles, raw_path: &str) -> Option<Denial> {
    let found = needles.find(req.headers(), source.header()).map(str::to_string);
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

fn allow(mut audit: Audit, target: &Target, fetched: &Fetched, raw_path: &str) -> Decision {
    match inject::plan(target, fetched, raw_path) {
        Ok(ops) => {
            audit.decision = "allow";
            Decision::new(Outcome::Allow(ops), audit)
        }
        Err(_) => deny(audit, unavailable()),
    }
}

#[cfg(test)]
mod tests;
