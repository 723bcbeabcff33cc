use super::*;
use crate::config::{compile, KeySource};
use crate::policy::limits::Charge;
use crate::secret::Secret;
use std::collections::HashMap;

const EXAMPLE: &str = include_str!("../../../tests/fixtures/contract-config.json");
const K1: &[u8] = b"keyward-test-signing-key-32bytes";
const K2: &[u8] = b"store-held-signing-key-k2-32byte";
const NOW: i64 = 1_800_000_000;

fn env(name: &str) -> Option<String> {
    match name {
        "KEYWARD_KEY_K1" => Some(crate::wire::b64::std_encode(K1)),
        "VAULT_TOKEN" => Some("root".into()),
        _ => None,
    }
}

fn cfg() -> Config {
    match compile(EXAMPLE.as_bytes(), &env) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

#[derive(Default)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    /// `headers` as the host hands them over.
    map: crate::host::Headers,
    target: Option<String>,
    prefix: Option<String>,
}

impl Request for Req {
    fn method(&mut self) -> Option<String> {
        Some(self.method.clone())
    }
    fn path(&mut self) -> Option<String> {
        Some(self.path.clone())
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn header_values(&mut self, name: &str) -> Vec<Vec<u8>> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }
    fn headers(&mut self) -> &crate::host::Headers {
        self.map = crate::host::Headers::of(self.headers.iter().map(|(k, v)| (k, v)));
        &self.map
    }
    fn route_target(&mut self) -> Option<String> {
        self.target.clone()
    }
    fn route_prefix(&mut self) -> Option<String> {
        self.prefix.clone()
    }
}

#[derive(Default)]
struct Mem {
    slots: HashMap<usize, Rc<Fetched>>,
    failed: Vec<usize>,
    stale: Vec<usize>,
    revoked: Vec<String>,
    /// No revocation list is trusted yet.
    no_list: bool,
    limits: crate::policy::limits::Table,
    admitted: usize,
    /// The verified-token cache, when a test turns it on.
    cache: Option<crate::credential::verified::VerifiedCache>,
    /// Prepared store-held keys per value, as the filter keeps them (a stable identity).
    keys: HashMap<(usize, String), Prepared>,
}

type Prepared = (Rc<Fetched>, Option<Rc<HmacKey>>);

impl Secrets for Mem {
    fn secret(&mut self, slot: usize) -> Lookup<Rc<Fetched>> {
        if self.failed.contains(&slot) {
            return Lookup::Failed;
        }
        match self.slots.get(&slot) {
            Some(f) if self.stale.contains(&slot) => Lookup::Stale(f.clone()),
            Some(f) => Lookup::Ready(f.clone()),
            None => Lookup::Pending,
        }
    }
    fn signing_key(&mut self, slot: usize, field: &str) -> Lookup<Option<Rc<HmacKey>>> {
        match self.secret(slot) {
            Lookup::Ready(f) => {
                if let Some((src, k)) = self.keys.get(&(slot, field.to_string())) {
                    if Rc::ptr_eq(src, &f) {
                        return Lookup::Ready(k.clone());
                    }
                }
                let k = f.field(field).and_then(|s| crate::wire::b64::key_decode(s.expose_str()?)).and_then(|k| HmacKey::new(&k).ok()).map(Rc::new);
                self.keys.insert((slot, field.to_string()), (f, k.clone()));
                Lookup::Ready(k)
            }
            Lookup::Stale(_) | Lookup::Pending => Lookup::Pending,
            Lookup::Failed => Lookup::Failed,
        }
    }
    fn revoked(&mut self, jti: &str, sub: &str) -> Lookup<bool> {
        if self.no_list {
            return Lookup::Pending;
        }
        Lookup::Ready(self.revoked.iter().any(|r| *r == format!("jti:{jti}") || *r == format!("sub:{sub}")))
    }
    fn verified(&mut self) -> Option<&mut crate::credential::verified::VerifiedCache> {
        self.cache.as_mut()
    }
}

impl Counter for Mem {
    fn admit(&mut self, entry: &Entry, charge: Option<&Charge>) -> Admitted {
        let Entry::Credential { key_id, jti, lim, keep_until_s, stage: crate::engine::Stage::Rate } = *entry else { return Admitted::admit() };
        self.admitted += 1;
        let verdict = self.limits.admit_charged(jti, lim, keep_until_s, NOW as u64, charge);
        Admitted { verdict, holder: Some(Holder::Local { key_id, jti: jti.to_string() }) }
    }
    fn release(&mut self, holder: &Holder, charge: &Charge) {
        if let Holder::Local { jti, .. } = holder {
            self.limits.refund(jti, charge);
        }
    }
}

fn fetched(fields: &[(&str, &str)]) -> Rc<Fetched> {
    Rc::new(Fetched { fields: fields.iter().map(|(k, v)| (k.to_string(), Secret::text(v))).collect(), version: None, problems: vec![] })
}

fn warm(c: &Config) -> Mem {
    let mut m = Mem::default();
    let slot = |t: &str| c.target(t).map(|(_, t)| t.slot).unwrap_or(usize::MAX);
    m.slots.insert(slot("stripe"), fetched(&[("api_key", "sk_test_stripe")]));
    m.slots.insert(slot("twilio"), fetched(&[("account_sid", "AC1"), ("auth_token", "tw_tok")]));
    m.slots.insert(slot("anthropic"), fetched(&[("api_key", "sk-ant-test")]));
    m.slots.insert(slot("maps"), fetched(&[("key", "AIza-test")]));
    m
}

fn tok(kid: &str, key: &[u8], allow: &[&str], extra: &str) -> String {
    let k = match HmacKey::new(key) {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    let rules: Vec<String> = allow.iter().map(|r| format!("\"{r}\"")).collect();
    let claims = format!(
        r#"{{"sub":"lambda/pay","aud":"keyward","iss":"https://issuer.example","exp":{},"jti":"j-1","run":"sqs/1","allow":[{}]{extra}}}"#,
        NOW + 300,
        rules.join(",")
    );
    jwt::mint(kid, &k, &claims)
}

fn wrong_aud() -> String {
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let claims = format!(r#"{{"sub":"x","aud":"other","exp":{},"jti":"j","allow":["stripe * /**"]}}"#, NOW + 60);
    jwt::mint("k1", &k, &claims)
}

fn stripe_req(method: &str, path: &str, auth: Option<String>) -> Req {
    let mut headers = vec![];
    if let Some(a) = auth {
        headers.push(("authorization".to_string(), a.into_bytes()));
    }
    Req { method: method.into(), path: path.into(), headers, target: Some("stripe".into()), prefix: Some("/stripe".into()), ..Req::default() }
}

fn code(d: &Decision) -> &'static str {
    match &d.outcome {
        Outcome::Allow(_) => "allow",
        Outcome::Deny(d) => d.code.as_str(),
        Outcome::Need(_) => "need",
        Outcome::NeedRevocation => "need-revocation",
        Outcome::NeedLedger(_) => "need-ledger",
    }
}

fn set_value(d: &Decision, header: &str) -> Option<String> {
    let Outcome::Allow(ops) = &d.outcome else { return None };
    ops.iter().find_map(|o| match o {
        Op::Set(h, v) if h == header => v.expose_str().map(str::to_string),
        _ => None,
    })
}

#[test]
fn allows_and_injects() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe POST /v1/payment_intents"], "");
    let mut r = stripe_req("POST", "/stripe/v1/payment_intents?expand=x", Some(format!("Bearer {t}")));
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(code(&d), "allow");
    assert_eq!(set_value(&d, "authorization").as_deref(), Some("Bearer sk_test_stripe"));
    assert_eq!(
        d.audit,
        Audit {
            subject: Some("lambda/pay".into()),
            target: Some("stripe".into()),
            jti: Some("j-1".into()),
            run: Some("sqs/1".into()),
            decision: "allow",
            cache: Some("hit"),
            idempotency_key: None,
            secret_version: None,
            issued: None,
            cost: None,
            spend: None,
            budgets: None,
            model: None,
        }
    );
}

#[test]
fn token_and_ceiling_both_required() {
    let c = cfg();
    let mut s = warm(&c);
    // Token allows everything on stripe; the target's ceiling allows POST /v1/payment_intents and GET /v1/**.
    let t = tok("k1", K1, &["stripe * /**"], "");
    let a = Some(format!("Bearer {t}"));
    let mut run = |m: &str, p: &str| code(&decide_and_count(&c, &mut stripe_req(m, p, a.clone()), &mut s, NOW));
    assert_eq!(run("GET", "/stripe/v1/customers/cus_1"), "allow");
    assert_eq!(run("GET", "/stripe/v1"), "allow");
    assert_eq!(run("POST", "/stripe/v1/payment_intents"), "allow");
    assert_eq!(run("DELETE", "/stripe/v1/customers/cus_1"), "forbidden");
    assert_eq!(run("POST", "/stripe/v1/refunds"), "forbidden");
    assert_eq!(run("GET", "/stripe/v2/x"), "forbidden");
    // Token narrower than ceiling.
    let t = tok("k1", K1, &["stripe GET /v1/customers/*"], "");
    let a = Some(format!("Bearer {t}"));
    let mut run = |m: &str, p: &str| code(&decide_and_count(&c, &mut stripe_req(m, p, a.clone()), &mut s, NOW));
    assert_eq!(run("GET", "/stripe/v1/customers/cus_1"), "allow");
    assert_eq!(run("GET", "/stripe/v1/customers/cus_1/"), "forbidden");
    assert_eq!(run("GET", "/stripe/v1/customers"), "forbidden");
    assert_eq!(run("HEAD", "/stripe/v1/customers/cus_1"), "forbidden");
    // A rule for another target never matches.
    let t = tok("k1", K1, &["twilio * /**"], "");
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW)), "forbidden");
}

#[test]
fn path_sanity_runs_first() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], "");
    for p in ["/stripe/v1/../admin", "/stripe/v1//x", "/stripe/v1/%2e%2e/x", "/stripe/v1%2fx", "/stripe\\v1", "/stripe/v1/%00"] {
        let d = decide_and_count(&c, &mut stripe_req("GET", p, Some(format!("Bearer {t}"))), &mut s, NOW);
        assert_eq!(code(&d), "bad_request", "{p}");
    }
    let d = decide_and_count(&c, &mut stripe_req("GET", "/other/v1", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "forbidden");
}

#[test]
fn targets_from_route_metadata() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], "");
    let mut r = stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}")));
    r.target = None;
    assert_eq!(code(&decide_and_count(&c, &mut r, &mut s, NOW)), "unknown_target");
    r.target = Some("paypal".into());
    assert_eq!(code(&decide_and_count(&c, &mut r, &mut s, NOW)), "unknown_target");
}

#[test]
fn credential_errors() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], "");
    // (credential, expected code, whether the MAC verified so the subject is known)
    let cases = [
        (None, "missing_credential", false),
        (Some(format!("Bearer {t},Bearer {t}")), "bad_request", false),
        (Some(format!("Basic {t}")), "invalid_credential", false),
        (Some("Bearer not-a-jwt".to_string()), "invalid_credential", false),
        (Some(format!("Bearer {}", tok("k9", K1, &["stripe * /**"], ""))), "invalid_credential", false),
        (Some(format!("Bearer {}", tok("k1", K2, &["stripe * /**"], ""))), "invalid_credential", false),
        (Some(format!("Bearer {}", wrong_aud())), "invalid_credential", true),
    ];
    for (auth, want, verified) in cases {
        let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", auth), &mut s, NOW);
        assert_eq!(code(&d), want);
        assert_eq!(d.audit.subject.is_some(), verified, "the subject is recorded only after the MAC verifies");
        assert_eq!(d.audit.decision, want);
    }
    // Expired: the subject is known (signature verified) and recorded.
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW + 400);
    assert_eq!(code(&d), "expired_credential");
    assert_eq!(d.audit.subject.as_deref(), Some("lambda/pay"));
    assert_eq!(d.audit.decision, "expired_credential");
}

#[test]
fn other_sources() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["twilio POST /2010-04-01/Accounts/*/Messages.json", "anthropic POST /v1/messages", "maps GET /geo"], "");
    let basic = format!("Basic {}", crate::wire::b64::std_encode(format!("AC1:{t}").as_bytes()));
    let mut r = Req {
        method: "POST".into(),
        path: "/twilio/2010-04-01/Accounts/AC1/Messages.json".into(),
        headers: vec![("authorization".into(), basic.into_bytes())],
        target: Some("twilio".into()),
        prefix: Some("/twilio".into()),
        ..Req::default()
    };
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(set_value(&d, "authorization").as_deref(), Some("Basic QUMxOnR3X3Rvaw=="));

    let mut r = Req {
        method: "POST".into(),
        path: "/anthropic/v1/messages".into(),
        headers: vec![("x-api-key".into(), t.clone().into_bytes())],
        target: Some("anthropic".into()),
        prefix: Some("/anthropic".into()),
        ..Req::default()
    };
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(set_value(&d, "x-api-key").as_deref(), Some("sk-ant-test"));

    // Two x-api-key fields (Envoy keeps them separate): refused, never guessed.
    let mut r = Req {
        method: "POST".into(),
        path: "/anthropic/v1/messages".into(),
        headers: vec![("x-api-key".into(), t.clone().into_bytes()), ("x-api-key".into(), b"other".to_vec())],
        target: Some("anthropic".into()),
        prefix: Some("/anthropic".into()),
        ..Req::default()
    };
    assert_eq!(code(&decide_and_count(&c, &mut r, &mut s, NOW)), "bad_request");

    let mut r = Req {
        method: "GET".into(),
        path: "/maps/geo?q=1&key=mine".into(),
        headers: vec![("authorization".into(), format!("Bearer {t}").into_bytes())],
        target: Some("maps".into()),
        prefix: Some("/maps".into()),
        ..Req::default()
    };
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    let Outcome::Allow(ops) = &d.outcome else { panic!("{:?}", d.outcome) };
    let path = ops.iter().find_map(|o| match o {
        Op::SetPath(p) => p.expose_str().map(str::to_string),
        _ => None,
    });
    assert_eq!(path.as_deref(), Some("/maps/geo?q=1&key=AIza-test"));
}

#[test]
fn cold_cache_and_failures() {
    let c = cfg();
    let stripe_slot = c.target("stripe").map(|(_, t)| t.slot).unwrap_or_default();
    let t = tok("k1", K1, &["stripe * /**"], "");
    let mut s = Mem::default();
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert!(matches!(d.outcome, Outcome::Need(x) if x == stripe_slot));
    s.failed.push(stripe_slot);
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    let Outcome::Deny(den) = &d.outcome else { panic!() };
    assert_eq!(den.code, Code::SecretUnavailable);
    assert_eq!(den.retry_after_s, Some(RETRY_AFTER_UNAVAILABLE_S));
    // A cached secret lacking the field never injects anything.
    let mut s = Mem::default();
    s.slots.insert(stripe_slot, fetched(&[("other", "x")]));
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "secret_unavailable");
}

#[test]
fn store_held_signing_key() {
    let c = cfg();
    let Some(KeySource::Stored { slot, .. }) = c.key("k2").map(|k| &k.source) else { panic!() };
    let slot = *slot;
    let t = tok("k2", K2, &["stripe * /**"], "");
    let mut s = warm(&c);
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert!(matches!(d.outcome, Outcome::Need(x) if x == slot));
    s.slots.insert(slot, fetched(&[("k2", &crate::wire::b64::std_encode(K2))]));
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "allow");
    // A k2 token signed with k1's key fails.
    let t = tok("k2", K1, &["stripe * /**"], "");
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "invalid_credential");
}

#[test]
fn revocation_hook() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], "");
    s.revoked.push("sub:lambda/pay".into());
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "revoked_credential");
    assert_eq!(d.audit.jti.as_deref(), Some("j-1"));
}

fn retry_after(d: &Decision) -> Option<u32> {
    match &d.outcome {
        Outcome::Deny(den) => den.retry_after_s,
        _ => None,
    }
}

#[test]
fn total_limit_then_quota_exhausted() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe GET /v1/**"], r#","lim":{"total":2}"#);
    let go = |s: &mut Mem, path: &str| decide_and_count(&c, &mut stripe_req("GET", path, Some(format!("Bearer {t}"))), s, NOW);
    assert_eq!(code(&go(&mut s, "/stripe/v1/a")), "allow");
    // A request no rule allows is refused before it is counted.
    assert_eq!(code(&go(&mut s, "/stripe/v2/a")), "forbidden");
    assert_eq!(code(&go(&mut s, "/stripe/v1/b")), "allow");
    let d = go(&mut s, "/stripe/v1/c");
    assert_eq!(code(&d), "quota_exhausted");
    assert_eq!(d.audit.decision, "quota_exhausted");
    assert_eq!(d.audit.jti.as_deref(), Some("j-1"));
    // Until the credential is no longer accepted: exp (NOW+300) plus the 30 s skew.
    assert_eq!(retry_after(&d), Some(330));
    let Outcome::Deny(den) = &d.outcome else { panic!() };
    assert_eq!(den.status(), 429);
    assert_eq!(s.limits.used("j-1"), 2);
}

#[test]
fn rpm_limit_then_rate_limited() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe GET /v1/**"], r#","lim":{"rpm":1}"#);
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "allow");
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "rate_limited");
    assert_eq!(retry_after(&d), Some(61));
}

#[test]
fn limits_are_checked_before_the_vault_and_only_for_limited_credentials() {
    let c = cfg();
    let mut s = Mem::default();
    let t = tok("k1", K1, &["stripe GET /v1/**"], r#","lim":{"total":1}"#);
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert!(matches!(d.outcome, Outcome::Need(_)));
    assert_eq!(s.admitted, 1, "counted before the secret is fetched");
    // Over the limit: refused without ever asking for the secret.
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "quota_exhausted");
    // No lim: never counted. Revoked or invalid: never counted.
    let plain = tok("k1", K1, &["stripe GET /v1/**"], "");
    let mut s = warm(&c);
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {plain}"))), &mut s, NOW)), "allow");
    s.revoked.push("jti:j-1".into());
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "revoked_credential");
    assert_eq!(s.admitted, 0);
}

#[test]
fn deciding_never_counts_the_request_is_counted_in_its_own_step() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe GET /v1/**"], r#","lim":{"total":1}"#);
    // Deciding alone, however often, counts nothing: it ends asking for the request to be counted.
    for _ in 0..3 {
        let step = decide(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW);
        let Step::Count(count) = step else { panic!("{step:?}") };
        assert!(count.priced.is_none());
        assert_eq!(count.ticket.lim.total, Some(1));
    }
    assert_eq!((s.admitted, s.limits.used("j-1")), (0, 0));
    // The count step's refusal is the decision, and the vault is never asked (a cold cache
    // would say `Need`).
    let mut cold = Mem::default();
    let Step::Count(count) = decide(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut cold, NOW) else { panic!() };
    let refused = Err(Halt::Deny(Denial::new(Code::QuotaExhausted, "used up")));
    assert_eq!(code(&count.admitted(&c, &mut cold, refused)), "quota_exhausted");
    let Step::Count(count) = decide(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut cold, NOW) else { panic!() };
    assert!(matches!(count.admitted(&c, &mut cold, Err(Halt::Pending(7))).outcome, Outcome::NeedLedger(7)));
    // Counted and admitted: the rest of the decision (the secret, the injection) follows.
    let Step::Count(count) = decide(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW) else { panic!() };
    let d = count.admitted(&c, &mut s, Ok(Spend::Uncapped));
    assert_eq!(code(&d), "allow");
    assert!(matches!(decide_unlimited(&c, &mut s), Step::Decided(_)), "a credential without limits is decided in one step");
}

#[test]
fn a_count_finished_with_another_configuration_is_refused_not_served_another_target() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe GET /v1/**"], r#","lim":{"total":5}"#);
    let Step::Count(count) = decide(&c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {t}"))), &mut s, NOW) else { panic!() };
    // The same index names another target once the targets are renamed.
    let other = compile(EXAMPLE.replace("\"stripe\"", "\"stripe2\"").as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
    let d = count.admitted(&other, &mut s, Ok(Spend::Uncapped));
    assert_eq!(code(&d), "secret_unavailable");
}

fn decide_unlimited(c: &Config, s: &mut Mem) -> Step {
    let plain = tok("k1", K1, &["stripe GET /v1/**"], "");
    decide(c, &mut stripe_req("GET", "/stripe/v1/a", Some(format!("Bearer {plain}"))), s, NOW)
}

fn idem_cfg() -> Config {
    let doc = EXAMPLE.replace(
        r#""allow": ["POST /v1/payment_intents", "GET /v1/**"]"#,
        r#""allow": ["POST /v1/payment_intents", "GET /v1/**"], "require_idempotency_key": ["POST"]"#,
    );
    assert_ne!(doc, EXAMPLE);
    compile(doc.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn idempotency_key_required_for_listed_methods() {
    let c = idem_cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], r#","lim":{"total":100}"#);
    let post = |key: &[&[u8]]| {
        let mut r = stripe_req("POST", "/stripe/v1/payment_intents", Some(format!("Bearer {t}")));
        for k in key {
            r.headers.push(("idempotency-key".into(), k.to_vec()));
        }
        r
    };
    let d = decide_and_count(&c, &mut post(&[]), &mut s, NOW);
    assert_eq!(code(&d), "bad_request");
    assert_eq!(d.audit.idempotency_key, None);
    assert_eq!(s.admitted, 0, "a refused request does not spend the quota");
    let long = vec![b'a'; MAX_IDEMPOTENCY_KEY + 1];
    let max = vec![b'a'; MAX_IDEMPOTENCY_KEY];
    for bad in [&b""[..], b"has space", b"tab\t", "caf\u{e9}".as_bytes(), &long, b"eyJhbGciOi.eyJzdWIi.c2ln"] {
        let d = decide_and_count(&c, &mut post(&[bad]), &mut s, NOW);
        assert_eq!(code(&d), "bad_request", "{:?}", String::from_utf8_lossy(bad));
        assert_eq!(d.audit.idempotency_key, None);
    }
    let d = decide_and_count(&c, &mut post(&[b"order-1", b"order-2"]), &mut s, NOW);
    assert_eq!(code(&d), "bad_request");
    let Outcome::Deny(den) = &d.outcome else { panic!() };
    assert!(den.message.contains("duplicated"));
    for good in [&b"order-7f3a"[..], b"!", &max] {
        let d = decide_and_count(&c, &mut post(&[good]), &mut s, NOW);
        assert_eq!(code(&d), "allow");
        assert_eq!(d.audit.idempotency_key.as_deref().map(str::as_bytes), Some(good));
    }
    // GET is not listed; a key sent anyway is still recorded.
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "allow");
    let mut r = stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}")));
    r.headers.push(("idempotency-key".into(), b"get-1".to_vec()));
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(d.audit.idempotency_key.as_deref(), Some("get-1"));
    // Recorded on denials too, so a refused retry can be traced.
    let mut r = stripe_req("POST", "/stripe/v1/payment_intents", None);
    r.headers.push(("idempotency-key".into(), b"order-9".to_vec()));
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(code(&d), "missing_credential");
    assert_eq!(d.audit.idempotency_key.as_deref(), Some("order-9"));
}

#[test]
fn stale_secrets_are_served_and_audited_as_stale() {
    let c = cfg();
    let mut s = warm(&c);
    let slot = c.target("stripe").map(|(_, t)| t.slot).unwrap_or_default();
    let mut f = (*s.slots[&slot]).clone();
    f.version = Some("7".into());
    s.slots.insert(slot, Rc::new(f));
    s.stale.push(slot);
    let t = tok("k1", K1, &["stripe * /**"], "");
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "allow");
    assert_eq!(set_value(&d, "authorization").as_deref(), Some("Bearer sk_test_stripe"));
    assert_eq!(d.audit.cache, Some("stale"));
    assert_eq!(d.audit.secret_version.as_deref(), Some("7"));
}

#[test]
fn signing_keyset_from_the_store() {
    let doc = EXAMPLE.replace(r#""cache": {"#, r#""signing_keyset": {"store": "bao", "path": "keyward/keyset"}, "cache": {"#);
    let c = compile(doc.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
    let slot = c.keyset.unwrap_or_else(|| panic!("no keyset"));
    assert!(c.slots[slot].whole);
    assert!(c.summary().contains("*(keyset bao:keyward/keyset)"));
    let k3 = b"a-third-signing-key-of-32-bytes!";
    let t = tok("k3", k3, &["stripe * /**"], "");
    let mut s = warm(&c);
    // Cold set: fetch it.
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert!(matches!(d.outcome, Outcome::Need(x) if x == slot));
    s.slots.insert(slot, fetched(&[("k3", &crate::wire::b64::std_encode(k3))]));
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "allow");
    // A kid removed from the set stops working once the set is refreshed.
    s.slots.insert(slot, fetched(&[("k4", &crate::wire::b64::std_encode(k3))]));
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "invalid_credential");
    // Static keys still win; a wrong key under a set kid fails.
    let t1 = tok("k1", K1, &["stripe * /**"], "");
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t1}"))), &mut s, NOW)), "allow");
    let forged = tok("k4", K1, &["stripe * /**"], "");
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {forged}"))), &mut s, NOW)), "invalid_credential");
    // A key set may not share a vendor secret.
    let bad = EXAMPLE.replace(r#""cache": {"#, r#""signing_keyset": {"store": "bao", "path": "stripe"}, "cache": {"#);
    let e = compile(bad.as_bytes(), &env).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("signing_keyset.path"), "{e}");
}

#[test]
fn cached_credentials_are_still_checked_on_every_request() {
    let c = cfg();
    let mut s = warm(&c);
    s.cache = Some(Default::default());
    let t = tok("k1", K1, &["stripe * /**"], "");
    let auth = || Some(format!("Bearer {t}"));
    for _ in 0..3 {
        assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", auth()), &mut s, NOW)), "allow");
    }
    assert_eq!(s.cache.as_ref().map(|c| c.len()), Some(1), "verified once, remembered");
    // Rules, time bounds and revocation apply to a remembered credential as to a new one.
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("DELETE", "/stripe/v1/x", auth()), &mut s, NOW)), "forbidden");
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", auth()), &mut s, NOW + 400)), "expired_credential");
    s.revoked.push("jti:j-1".into());
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", auth()), &mut s, NOW)), "revoked_credential");
    // Only verified credentials are remembered: a forged one is refused every time and never cached.
    let forged = tok("k1", b"another-key-of-thirty-two-bytes!", &["stripe * /**"], "");
    for _ in 0..2 {
        let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {forged}"))), &mut s, NOW);
        assert_eq!(code(&d), "invalid_credential");
    }
    assert_eq!(s.cache.as_ref().map(|c| c.len()), Some(1));
}

#[test]
fn a_remembered_credential_misses_when_its_store_held_key_changes() {
    let doc = EXAMPLE.replace(r#""cache": {"#, r#""signing_keyset": {"store": "bao", "path": "keyward/keyset"}, "cache": {"#);
    let c = compile(doc.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
    let slot = c.keyset.unwrap_or_else(|| panic!("no keyset"));
    let k3 = b"a-third-signing-key-of-32-bytes!";
    let t = tok("k3", k3, &["stripe * /**"], "");
    let mut s = warm(&c);
    s.cache = Some(Default::default());
    s.slots.insert(slot, fetched(&[("k3", &crate::wire::b64::std_encode(k3))]));
    let req = || stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}")));
    assert_eq!(code(&decide_and_count(&c, &mut req(), &mut s, NOW)), "allow");
    assert_eq!(code(&decide_and_count(&c, &mut req(), &mut s, NOW)), "allow");
    assert_eq!(s.cache.as_ref().map(|c| c.len()), Some(1));
    // k3 now names another key: the remembered verification no longer counts.
    s.slots.insert(slot, fetched(&[("k3", &crate::wire::b64::std_encode(b"k3-rotated-to-another-32-byte-k!"))]));
    assert_eq!(code(&decide_and_count(&c, &mut req(), &mut s, NOW)), "invalid_credential");
    // And k3 removed from the set.
    s.slots.insert(slot, fetched(&[("k4", &crate::wire::b64::std_encode(k3))]));
    assert_eq!(code(&decide_and_count(&c, &mut req(), &mut s, NOW)), "invalid_credential");
}

#[test]
fn without_a_trusted_revocation_list_a_valid_credential_waits_and_an_invalid_one_does_not() {
    let c = cfg();
    let mut s = warm(&c);
    s.no_list = true;
    let t = tok("k1", K1, &["stripe * /**"], "");
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert!(matches!(d.outcome, Outcome::NeedRevocation), "{:?}", d.outcome);
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some("Bearer nope".into())), &mut s, NOW);
    assert_eq!(code(&d), "invalid_credential", "a bad credential is refused without waiting");
}

#[test]
fn method_overrides_must_name_an_allowed_method() {
    let c = cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe POST /v1/payment_intents"], "");
    let with = |h: &str, v: &str, path: &str| {
        let mut r = stripe_req("POST", path, Some(format!("Bearer {t}")));
        r.headers.push((h.to_string(), v.as_bytes().to_vec()));
        r
    };
    for h in METHOD_OVERRIDE_HEADERS {
        let d = decide_and_count(&c, &mut with(h, "DELETE", "/stripe/v1/payment_intents"), &mut s, NOW);
        assert_eq!(code(&d), "forbidden", "{h}: DELETE is not allowed");
        let d = decide_and_count(&c, &mut with(h, "post", "/stripe/v1/payment_intents"), &mut s, NOW);
        assert_eq!(code(&d), "allow", "{h}: overriding to an allowed method is harmless");
        let d = decide_and_count(&c, &mut with(h, "DE LETE", "/stripe/v1/payment_intents"), &mut s, NOW);
        assert_eq!(code(&d), "bad_request", "{h}: not a method");
    }
    for q in ["_method=DELETE", "a=1&_method=delete", "_METHOD=PUT", "%5Fmethod=PATCH", "_method=%44ELETE"] {
        let d = decide_and_count(&c, &mut stripe_req("POST", &format!("/stripe/v1/payment_intents?{q}"), Some(format!("Bearer {t}"))), &mut s, NOW);
        assert_eq!(code(&d), "forbidden", "{q}");
    }
    let d = decide_and_count(&c, &mut stripe_req("POST", "/stripe/v1/payment_intents?method=DELETE", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert_eq!(code(&d), "allow", "only _method overrides");
}

#[test]
fn dot_segments_with_matrix_parameters_are_refused() {
    for p in ["/stripe/v1/..;x/admin", "/stripe/v1/.;/x", "/stripe/..;/..;/admin"] {
        assert_eq!(sanitize(p), Err(crate::policy::rules::PathError::DotSegment), "{p}");
    }
    assert!(sanitize("/stripe/v1/a;b/c").is_ok(), "a matrix parameter on an ordinary segment is just text");
}

fn derived(jti: &str, par: &str, lim: &str) -> String {
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let claims = format!(
        r#"{{"sub":"lambda/pay","aud":"keyward","iss":"https://issuer.example","exp":{},"jti":"{jti}","par":"{par}","allow":["stripe GET /v1/**"]{lim}}}"#,
        NOW + 300
    );
    jwt::mint("k1", &k, &claims)
}

#[test]
fn revoking_a_parent_revokes_its_derived_credentials() {
    let c = cfg();
    let mut s = warm(&c);
    let child = derived("child-1", "parent-1", "");
    let go = |s: &mut Mem| decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {child}"))), s, NOW);
    assert_eq!(code(&go(&mut s)), "allow");
    s.revoked.push("jti:parent-1".into());
    assert_eq!(code(&go(&mut s)), "revoked_credential");
    s.revoked = vec!["jti:child-1".into()];
    assert_eq!(code(&go(&mut s)), "revoked_credential");
    // A list not trusted yet: the request waits, whichever of the two is unknown.
    s.revoked.clear();
    s.no_list = true;
    assert_eq!(code(&go(&mut s)), "need-revocation");
}

#[test]
fn derived_credentials_share_their_parent_s_budget() {
    let c = cfg();
    let mut s = warm(&c);
    // A parent allowed 2 in total; three children, each allowed 1: the children count against
    // the parent's entry under the parent's limits (`plim`), so together they get 2, not 3.
    let lim = r#","lim":{"total":1},"plim":{"total":2}"#;
    let kids: Vec<String> = (0..3).map(|i| derived(&format!("child-{i}"), "parent-9", lim)).collect();
    let mut codes = vec![];
    for k in &kids {
        codes.push(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {k}"))), &mut s, NOW)));
    }
    assert_eq!(codes, vec!["allow", "allow", "quota_exhausted"]);
    assert_eq!(s.limits.used("parent-9"), 2);
    // Each child's own cap holds too; and a parent without limits adds none.
    let k0 = &kids[0];
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {k0}"))), &mut s, NOW)), "quota_exhausted");
    let free = derived("child-free", "parent-free", r#","lim":{"total":1}"#);
    assert_eq!(code(&decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/x", Some(format!("Bearer {free}"))), &mut s, NOW)), "allow");
    assert_eq!(s.limits.used("parent-free"), 0);
}

fn cost_cfg() -> Config {
    let doc = EXAMPLE.replace(
        r#""allow": ["POST /v1/payment_intents", "GET /v1/**"]"#,
        r#""allow": ["POST /v1/payment_intents", "GET /v1/**"],
           "cost": {"form_field": "amount", "currency_field": "currency", "currencies": ["usd"], "free": ["GET /v1/**"]},
           "refund_on": [402]"#,
    );
    assert_ne!(doc, EXAMPLE);
    compile(doc.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_priced_request_is_counted_at_its_body_not_at_its_headers() {
    let c = cost_cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], r#","lim":{"spend":100,"total":5}"#);
    let mut r = stripe_req("POST", "/stripe/v1/payment_intents", Some(format!("Bearer {t}")));
    r.headers.push(("content-type".into(), b"application/x-www-form-urlencoded".to_vec()));
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(code(&d), "allow");
    assert_eq!(s.admitted, 0, "not counted before its cost is known");
    let deferred = d.deferred.unwrap_or_else(|| panic!("deferred"));
    assert!(deferred.ticket.as_ref().is_some_and(|t| t.lim.spend == Some(100)));
    let mut audit = d.audit;
    let held = price_and_count(&c, &deferred, b"amount=60&currency=usd", &mut s, &mut audit);
    assert!(
        matches!(&held, Ok(BodyDecision { reservation: Some(r), .. }) if r.charge.cost == 60 && r.holders.iter().filter_map(|h| if let Holder::Local { jti, .. } = h { Some(jti.as_str()) } else { None }).collect::<Vec<_>>() == ["j-1"]),
        "{held:?}"
    );
    assert_eq!((audit.cost, audit.spend), (Some(60), Some("reserved")));
    assert_eq!(s.admitted, 1);
    let again = price_and_count(&c, &deferred, b"amount=41&currency=usd", &mut s, &mut audit);
    assert_eq!(
        again.map_err(|h| match h {
            Halt::Deny(d) => Some(d.code),
            Halt::Pending(_) => None,
        }),
        Err(Some(Code::SpendExhausted))
    );
    // A free read is decided at once, counted then.
    let d = decide_and_count(&c, &mut stripe_req("GET", "/stripe/v1/charges", Some(format!("Bearer {t}"))), &mut s, NOW);
    assert!(d.deferred.is_none());
    assert_eq!(s.admitted, 3);
}

#[test]
fn a_method_override_to_a_priced_method_is_priced() {
    let c = cost_cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], r#","lim":{"spend":100}"#);
    let mut r = stripe_req("GET", "/stripe/v1/payment_intents", Some(format!("Bearer {t}")));
    r.headers.push(("x-http-method-override".into(), b"POST".to_vec()));
    let d = decide_and_count(&c, &mut r, &mut s, NOW);
    assert_eq!(code(&d), "bad_request", "priced, so it needs a form body");
    r.headers.push(("content-type".into(), b"application/x-www-form-urlencoded".to_vec()));
    assert!(decide_and_count(&c, &mut r, &mut s, NOW).deferred.is_some());
}

#[test]
fn a_priced_request_is_refused_from_its_headers_when_its_cost_cannot_be_read() {
    let c = cost_cfg();
    let mut s = warm(&c);
    let t = tok("k1", K1, &["stripe * /**"], r#","lim":{"spend":100}"#);
    for (path, ct, want) in [
        ("/stripe/v1/payment_intents?amount=1", "application/x-www-form-urlencoded", "bad_request"),
        ("/stripe/v1/payment_intents", "application/json", "bad_request"),
        ("/stripe/v1/payment_intents/", "text/plain", "forbidden"),
    ] {
        let mut r = stripe_req("POST", path, Some(format!("Bearer {t}")));
        r.headers.push(("content-type".into(), ct.as_bytes().to_vec()));
        assert_eq!(code(&decide_and_count(&c, &mut r, &mut s, NOW)), want, "{path} {ct}");
    }
    let mut r = stripe_req("POST", "/stripe/v1/payment_intents", Some(format!("Bearer {t}")));
    r.headers.push(("content-type".into(), b"application/x-www-form-urlencoded".to_vec()));
    r.headers.push(("content-length".into(), b"70000".to_vec()));
    assert_eq!(code(&decide_and_count(&c, &mut r, &mut s, NOW)), "body_too_large");
    assert_eq!(s.admitted, 0);
}

#[test]
fn retry_seeds_name_the_key_and_everything_the_headers_ask_for() {
    let seed = |k: &str, t: &str, m: &str, o: &[&str], p: &str, q: &str| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        admission::retry_seed(k, t, m, &o, p, q, &[0; 32])
    };
    let a = seed("k-1", "stripe", "POST", &[], "/v1/payment_intents", "");
    assert_eq!(a, seed("k-1", "stripe", "POST", &[], "/v1/payment_intents", ""));
    for b in [
        seed("k-2", "stripe", "POST", &[], "/v1/payment_intents", ""),
        seed("k-1", "stripe2", "POST", &[], "/v1/payment_intents", ""),
        seed("k-1", "stripe", "PUT", &[], "/v1/payment_intents", ""),
        seed("k-1", "stripe", "POST", &[], "/v1/charges", ""),
        seed("k-1s", "tripe", "POST", &[], "/v1/payment_intents", ""),
        seed("k-1", "stripe", "POST", &["DELETE"], "/v1/payment_intents", ""),
        seed("k-1", "stripe", "POST", &[], "/v1/payment_intents", "expand=customer"),
        seed("k-1", "stripe", "POST", &[], "/v1/payment_intents?", ""),
    ] {
        assert_ne!(a, b);
    }
    // Headers: another account or API version is another request; tracing and an SDK's retry
    // count are not.
    let h = |pairs: &[(&str, &str)]| crate::host::Headers::of(pairs.iter().copied());
    let base = admission::headers_digest(&h(&[("stripe-account", "acct_1"), ("stripe-version", "2024-06-20"), ("traceparent", "00-a-b-01")]), "authorization");
    assert_eq!(
        base,
        admission::headers_digest(
            &h(&[
                ("Stripe-Version", "2024-06-20"),
                ("stripe-account", "acct_1"),
                ("traceparent", "00-c-d-01"),
                ("x-stainless-retry-count", "2"),
                ("authorization", "Bearer x")
            ]),
            "authorization"
        ),
        "the same request, retried"
    );
    for other in [&[("stripe-account", "acct_2"), ("stripe-version", "2024-06-20")][..], &[("stripe-account", "acct_1"), ("stripe-version", "2025-01-01")][..]]
    {
        assert_ne!(base, admission::headers_digest(&h(other), "authorization"));
    }
}
