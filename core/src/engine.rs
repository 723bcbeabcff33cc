//! The per-request decision, as a pure function of the configuration, the request, the secret
//! cache and the clock. The wasm glue implements `Request` and `Secrets` with hostcalls; tests
//! implement them in memory. A request that needs a secret not yet cached gets `Outcome::Need`,
//! parks, and is decided again from scratch when the secret arrives.

use crate::config::{Config, KeySource, Target};
use crate::credential::extract::CredentialSource;
use crate::credential::extract::{self, CredError};
use crate::credential::jwt::{self, HmacKey};
use crate::credential::verified::VerifiedCache;
use crate::inject::{self, Op};
use crate::policy::cost::{BodyHeaders, Priced, Unreadable};
use crate::policy::limits::{Charge, Limits, Verdict};
use crate::policy::rules::{sanitize, strip_prefix};
use crate::record::Audit;
use crate::response::{Code, Denial};
use crate::secrets::store::Fetched;
use crate::wire::pct;
use std::rc::Rc;

pub mod admission;
pub use admission::{Reservation, Spend, Ticket};

/// What the engine may ask of the request.
pub trait Request {
    fn method(&mut self) -> Option<String>;
    fn path(&mut self) -> Option<String>;
    fn header(&mut self, name: &str) -> Option<Vec<u8>>;
    /// Every value of a header. Envoy joins repeated inline headers such as `authorization`
    /// with commas, but keeps repeats of other headers as separate fields; `header` returns
    /// only the first of those.
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>>;
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
    /// Count this request against the credential's `lim` (only called when it has one), unless
    /// this same request was already admitted before it parked. `keep_until_s`: when the
    /// credential stops being accepted, so its counters can go.
    /// `charge`: the request's cost, reserved against `lim.spend` in the same step.
    fn admit(&mut self, _key_id: u64, _jti: &str, _lim: &Limits, _keep_until_s: i64, _charge: Option<&Charge>) -> Verdict {
        Verdict::Admit
    }
    /// Release a reservation `admit` made (the request was refused after all).
    fn refund(&mut self, _key_id: u64, _jti: &str, _charge: &Charge) {}
    /// Where verified credentials are remembered (`credential::verified`); `None`: verify every time.
    fn verified(&mut self) -> Option<&mut VerifiedCache> {
        None
    }
}

/// The prepared key for a kid, and its identity (for the verified-token cache).
enum KeyFor<'a> {
    /// Held in a store.
    Key(Rc<HmacKey>),
    /// From the configuration (the environment).
    Static(&'a HmacKey),
    Unknown,
    Need(usize),
    Failed,
}

fn key_for<'a>(cfg: &'a Config, secrets: &mut impl Secrets, kid: &str) -> KeyFor<'a> {
    match (cfg.key(kid).map(|k| &k.source), cfg.keyset) {
        (Some(KeySource::Ready(k)), _) => KeyFor::Static(k),
        (Some(KeySource::Stored { slot, field }), _) => stored_key(secrets, *slot, field),
        // Kids not configured one by one are looked up in the key set.
        (None, Some(slot)) => stored_key(secrets, slot, kid),
        (None, None) => KeyFor::Unknown,
    }
}

/// A key held in a store: `slot`'s `field`.
fn stored_key<'a>(secrets: &mut impl Secrets, slot: usize, field: &str) -> KeyFor<'a> {
    match secrets.signing_key(slot, field) {
        Lookup::Ready(Some(k)) | Lookup::Stale(Some(k)) => KeyFor::Key(k),
        Lookup::Ready(None) | Lookup::Stale(None) => KeyFor::Unknown,
        Lookup::Pending => KeyFor::Need(slot),
        Lookup::Failed => KeyFor::Failed,
    }
}

/// The identity of a resolved key (`HmacKey::id`: derived from its bytes), if it resolved.
fn key_id(k: &KeyFor) -> Option<u64> {
    match k {
        KeyFor::Key(k) => Some(k.id()),
        KeyFor::Static(k) => Some(k.id()),
        _ => None,
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

/// A request whose cost is read from its body: its target, and what it counts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferred {
    pub target: usize,
    pub ticket: Option<Ticket>,
}

/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_UNAVAILABLE_S: u32 = 5;

fn deny(mut audit: Audit, d: Denial) -> Decision {
    audit.decision = d.code.as_str();
    Decision::new(Outcome::Deny(d), audit)
}

fn unreadable(u: Unreadable) -> Denial {
    match u {
        Unreadable::Bad(m) => Denial::new(Code::BadRequest, m),
        Unreadable::TooLarge => Denial::new(Code::BodyTooLarge, "the request body is larger than this target reads to price it"),
    }
}

fn unavailable() -> Denial {
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

    // 3. The workload credential.
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
    let (claims, key_id) = match verify(cfg, secrets, &target.credential, value.as_deref(), &mut audit, now_s) {
        Ok(v) => v,
        Err(Outcome::Deny(d)) => return deny(audit, d),
        Err(outcome) => return Decision::new(outcome, audit),
    };

    // 4. Rules: a token rule for this target AND the target's own ceiling.
    let by_token = claims.allow.iter().any(|r| r.target == target.name && r.rule.matches(&method, vendor_path));
    let by_target = target.allow.as_ref().is_none_or(|rules| rules.iter().any(|r| r.matches(&method, vendor_path)));
    if !by_token || !by_target {
        return deny(audit, Denial::new(Code::Forbidden, "no rule allows this method and path for this target"));
    }
    // A vendor that honours a method override runs that method: it must be allowed too.
    for m in &overrides {
        let by_token = claims.allow.iter().any(|r| r.target == target.name && r.rule.matches(m, vendor_path));
        let by_target = target.allow.as_ref().is_none_or(|rules| rules.iter().any(|r| r.matches(m, vendor_path)));
        if !by_token || !by_target {
            return deny(audit, Denial::new(Code::Forbidden, "a method override names a method no rule allows for this path"));
        }
    }

    // 5. The idempotency guard, then the credential's limits: both before any vault call.
    if target.require_idempotency_key.iter().any(|m| m == &method) && !matches!(idempotency, Idempotency::Valid(_)) {
        let msg = match idempotency {
            Idempotency::Duplicate => "the Idempotency-Key header is duplicated",
            _ => "this method needs an Idempotency-Key header of 1 to 255 visible ASCII characters",
        };
        return deny(audit, Denial::new(Code::BadRequest, msg));
    }
    // Priced when any method the vendor may run (an override included) is. A priced request is
    // counted once its cost is known and nothing else can refuse it; an unpriced one now, before
    // any vault call.
    let cost = target.cost.as_ref().filter(|c| c.applies(&method, vendor_path) || overrides.iter().any(|m| c.applies(m, vendor_path)));
    // What it counts under, built only when the credential has limits (the retry seed only
    // when the request is priced and carries an Idempotency-Key).
    let ticket = Ticket::for_claims(&claims, key_id, claims.exp.saturating_add(cfg.policy.clock_skew_s), || {
        audit.idempotency_key.as_deref().filter(|_| cost.is_some()).map(|k| admission::retry_seed(k, &target.name, &method, vendor_path))
    });
    if let Some(c) = cost.filter(|c| c.reads_body()) {
        let h = BodyHeaders {
            content_type: req.header("content-type"),
            content_encoding: req.header("content-encoding"),
            content_length: req.header("content-length"),
            query: raw_path.split_once('?').map(|(_, q)| q.to_string()),
        };
        if let Err(u) = c.check_headers(&h) {
            return deny(audit, unreadable(u));
        }
    }
    if let (None, Some(t)) = (cost, &ticket) {
        if let Err(d) = admission::admit(secrets, t, None) {
            return deny(audit, d);
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
    // 7. The cost: fixed, reserved now; in the body, reserved at its end.
    match cost.map(|c| c.fixed()) {
        None => {}
        Some(None) => {
            let target = cfg.target(&target.name).map_or(0, |(i, _)| i);
            d.deferred = Some(Deferred { target, ticket });
        }
        Some(Some(n)) => {
            let priced = Priced { cost: n, currency: None };
            d.audit.cost = Some(n);
            match ticket.as_ref().map(|t| admission::admit(secrets, t, Some(&priced))).transpose() {
                Ok(spend) => {
                    let spend = spend.unwrap_or(Spend::Uncapped);
                    d.audit.spend = Some(spend.label());
                    if let Spend::Reserved(r) = spend {
                        d.reservation = Some(r);
                    }
                }
                Err(denial) => return deny(d.audit, denial),
            }
        }
    }
    if let (true, Outcome::Allow(ops)) = (cfg.decision_headers, &mut d.outcome) {
        let a = &d.audit;
        ops.extend(inject::decision_ops(a.subject.as_deref().unwrap_or(""), a.jti.as_deref().unwrap_or(""), &target.name, a.run.as_deref()));
    }
    d
}

/// Verify a presented credential: extract it from `value` (the header `source` names), check its
/// signature with the configuration's keys, its claims against the policy, and the revocation
/// list. The audit gets the subject, jti and run once the signature holds. `Err`: the outcome to
/// answer with (a denial, or what to wait for).
fn verify(
    cfg: &Config,
    secrets: &mut impl Secrets,
    source: &CredentialSource,
    value: Option<&[u8]>,
    audit: &mut Audit,
    now_s: i64,
) -> Result<(Rc<jwt::Claims>, u64), Outcome> {
    let token = match extract::extract(source, value) {
        Ok(t) => t,
        Err(CredError::Missing) => return Err(Outcome::Deny(Denial::new(Code::MissingCredential, "no credential was presented"))),
        Err(CredError::Duplicate) => return Err(Outcome::Deny(Denial::new(Code::BadRequest, "the credential header is duplicated"))),
        Err(CredError::Malformed) => return Err(Outcome::Deny(Denial::new(Code::InvalidCredential, "the credential is malformed"))),
    };
    // A credential this worker verified before, with the same key: no HMAC, no parse.
    let cached = secrets.verified().and_then(|c| c.get(&token)).map(|e| (e.kid.clone(), e.key, e.claims.clone()));
    let hit = match cached {
        Some((kid, id, claims)) => match key_for(cfg, secrets, &kid) {
            k if key_id(&k) == Some(id) => Some((claims, id)),
            KeyFor::Need(slot) => return Err(Outcome::Need(slot)),
            _ => None,
        },
        None => None,
    };
    let (claims, key_id) = match hit {
        Some(c) => c,
        None => {
            let unverified = match jwt::parse(&token) {
                Ok(u) => u,
                Err(e) => return Err(Outcome::Deny(Denial::new(Code::InvalidCredential, e.public_message()))),
            };
            let key = key_for(cfg, secrets, &unverified.kid);
            let payload = match &key {
                KeyFor::Static(k) => unverified.verify(k),
                KeyFor::Key(k) => unverified.verify(k),
                KeyFor::Unknown => Err(jwt::TokenError::UnknownKid(String::new())),
                KeyFor::Need(slot) => return Err(Outcome::Need(*slot)),
                KeyFor::Failed => return Err(Outcome::Deny(unavailable())),
            };
            let claims = match payload.and_then(jwt::parse_claims) {
                Ok(c) => Rc::new(c),
                Err(e) => return Err(Outcome::Deny(Denial::new(Code::InvalidCredential, e.public_message()))),
            };
            let id = key_id(&key).unwrap_or_default();
            if let Some(cache) = secrets.verified() {
                cache.insert(&token, &unverified.kid, id, claims.clone());
            }
            (claims, id)
        }
    };
    audit.subject = Some(claims.sub.clone());
    audit.jti = Some(claims.jti.clone());
    audit.run.clone_from(&claims.run);
    if let Err(e) = cfg.policy.check(&claims, now_s) {
        let code = if e.code() == "expired_credential" { Code::ExpiredCredential } else { Code::InvalidCredential };
        return Err(Outcome::Deny(Denial::new(code, e.public_message())));
    }
    // A derived credential is revoked with its parent.
    let revoked = match (secrets.revoked(&claims.jti, &claims.sub), claims.par.as_deref()) {
        (Lookup::Ready(false), Some(par)) => secrets.revoked(par, &claims.sub),
        (Lookup::Stale(false), Some(par)) => match secrets.revoked(par, &claims.sub) {
            Lookup::Ready(r) => Lookup::Stale(r),
            other => other,
        },
        (l, _) => l,
    };
    match revoked {
        Lookup::Ready(false) | Lookup::Stale(false) => {}
        Lookup::Ready(true) | Lookup::Stale(true) => {
            return Err(Outcome::Deny(Denial::new(Code::RevokedCredential, "the credential has been revoked")));
        }
        // Never an unchecked request: wait for the list, or refuse.
        Lookup::Pending => return Err(Outcome::NeedRevocation),
        Lookup::Failed => {
            let d = Denial::new(Code::SecretUnavailable, "the revocation list is unavailable; try again later");
            return Err(Outcome::Deny(d.retry_after(RETRY_AFTER_UNAVAILABLE_S)));
        }
    }
    Ok((claims, key_id))
}

/// The credential presented to the issuing endpoint (the `Authorization` value, `Bearer …`),
/// verified as for a request (signature, policy, revocation): the parent of an `attenuate` grant.
pub fn verify_bearer(
    cfg: &Config,
    authorization: Option<&[u8]>,
    secrets: &mut impl Secrets,
    audit: &mut Audit,
    now_s: i64,
) -> Result<Rc<jwt::Claims>, Outcome> {
    verify(cfg, secrets, &CredentialSource::Bearer, authorization, audit, now_s).map(|(c, _)| c)
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

/// The end of a deferred request's body: read its cost and admit it (`audit` gets the cost and
/// how it stands against spend caps). `Ok`: the reservation it holds, if any.
pub fn price_body(cfg: &Config, d: &Deferred, body: &[u8], secrets: &mut impl Secrets, audit: &mut Audit) -> Result<Option<Reservation>, Denial> {
    let Some(cost) = cfg.targets.get(d.target).and_then(|t| t.cost.as_ref()) else {
        return Err(Denial::new(Code::SecretUnavailable, "the gateway's configuration changed; try again").retry_after(RETRY_AFTER_UNAVAILABLE_S));
    };
    let priced = cost.read(body).map_err(unreadable)?;
    audit.cost = Some(priced.cost);
    let spend = match &d.ticket {
        Some(t) => admission::admit(secrets, t, Some(&priced))?,
        None => Spend::Uncapped,
    };
    audit.spend = Some(spend.label());
    Ok(match spend {
        Spend::Reserved(r) => Some(r),
        _ => None,
    })
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
