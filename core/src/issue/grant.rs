//! What a grant asks for, and what may be issued for it. The request names a grant and may
//! narrow `allow`, `ttl_s`, `run` (and, for `attenuate`, `lim`); whatever it asks must be
//! provably within the ceiling (a role's entry, or the parent credential), or it is refused:
//! nothing is silently widened. Only `exp` is shortened to fit, never lengthened.

use super::settings::{RawLim, RoleGrant};
use super::sts::IamRequest;
use crate::credential::jwt::{Claims, HmacKey, MAX_RUN_LEN};
use crate::policy::limits::Limits;
use crate::policy::rules::TokenRule;
use crate::wire::json;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The largest request body the endpoint reads.
pub const MAX_BODY: usize = 16 * 1024;
/// The most rules a request may ask for.
pub const MAX_RULES: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    grant: String,
    #[serde(default)]
    iam_request: Option<RawIam>,
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    ttl_s: Option<u32>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    lim: Option<RawLim>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIam {
    method: String,
    url: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// What the request asks for, whatever the grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    pub allow: Option<Vec<TokenRule>>,
    pub ttl_s: Option<u32>,
    pub run: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    AwsIam { proof: IamRequest, ask: Ask },
    Attenuate { ask: Ask, lim: Option<Limits> },
}

/// Parse a request body (strict JSON: duplicate keys and unknown fields are refused). The error
/// is the 400's message.
pub fn parse(body: &[u8]) -> Result<Grant, String> {
    if body.len() > MAX_BODY {
        return Err(format!("the request body is larger than {MAX_BODY} bytes"));
    }
    json::parse(body).map_err(|e| format!("the request body is not valid JSON: {e}"))?;
    let raw: RawGrant = serde_json::from_slice(body).map_err(|e| format!("the request body is not a grant: {e}"))?;
    let allow = match raw.allow {
        None => None,
        Some(rules) if rules.is_empty() => return Err("allow must not be empty when present".into()),
        Some(rules) if rules.len() > MAX_RULES => return Err(format!("allow has more than {MAX_RULES} rules")),
        Some(rules) => Some(rules.iter().map(|r| TokenRule::parse(r).map_err(|e| format!("allow: {e}"))).collect::<Result<Vec<_>, _>>()?),
    };
    if raw.ttl_s == Some(0) {
        return Err("ttl_s must be positive".into());
    }
    if let Some(r) = &raw.run {
        if r.is_empty() || r.len() > MAX_RUN_LEN || r.chars().any(char::is_control) {
            return Err(format!("run must be 1 to {MAX_RUN_LEN} bytes without control characters"));
        }
    }
    let ask = Ask { allow, ttl_s: raw.ttl_s, run: raw.run };
    match (raw.grant.as_str(), raw.iam_request, raw.lim) {
        ("aws_iam", Some(i), None) => {
            Ok(Grant::AwsIam { proof: IamRequest { method: i.method, url: i.url, headers: i.headers.into_iter().collect(), body: i.body }, ask })
        }
        ("aws_iam", None, _) => Err("the aws_iam grant needs iam_request".into()),
        ("aws_iam", Some(_), Some(_)) => Err("the aws_iam grant takes its limits from the role's entry, not from the request".into()),
        ("attenuate", None, lim) => {
            let lim = lim.map(|l| l.limits()).transpose().map_err(|name| format!("lim.{name} is out of range"))?;
            Ok(Grant::Attenuate { ask, lim })
        }
        ("attenuate", Some(_), _) => Err("the attenuate grant takes no iam_request".into()),
        (other, _, _) => Err(format!("unknown grant {other:?} (aws_iam or attenuate)")),
    }
}

/// What an issued credential carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub sub: String,
    pub allow: Vec<TokenRule>,
    pub exp: i64,
    pub lim: Limits,
    pub run: Option<String>,
    pub par: Option<String>,
    /// The parent's limits (for a derived credential): its requests count against the parent's
    /// entry under them, so siblings share the parent's budget.
    pub plim: Limits,
    /// The `kid` that signed the parent, and its `exp` (for a derived credential).
    pub pkid: Option<String>,
    pub pexp: Option<i64>,
}

/// Refused: 403 `forbidden` with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverAsked(pub String);

fn rules_within(asked: Option<&Vec<TokenRule>>, ceiling: &[TokenRule]) -> Result<Vec<TokenRule>, OverAsked> {
    match asked {
        None => Ok(ceiling.to_vec()),
        Some(rules) => {
            for r in rules {
                if !r.within_any(ceiling) {
                    return Err(OverAsked("a requested rule is not within what may be granted".into()));
                }
            }
            Ok(rules.clone())
        }
    }
}

/// The scope for an IAM principal mapped to `role`.
pub fn for_role(role: &RoleGrant, ask: &Ask, now_s: i64) -> Result<Scope, OverAsked> {
    let allow = rules_within(ask.allow.as_ref(), &role.allow)?;
    let ttl = match ask.ttl_s {
        Some(t) if t > role.ttl_s => return Err(OverAsked(format!("ttl_s may be at most {}", role.ttl_s))),
        Some(t) => t,
        None => role.ttl_s,
    };
    Ok(Scope {
        sub: role.sub.clone(),
        allow,
        exp: now_s + i64::from(ttl),
        lim: role.lim,
        run: ask.run.clone(),
        par: None,
        plim: Limits::default(),
        pkid: None,
        pexp: None,
    })
}

/// The scope of a credential derived from `parent` (signed with `parent_kid`): within it in every
/// dimension.
pub fn for_child(parent: &Claims, parent_kid: &str, ask: &Ask, lim: Option<&Limits>, max_ttl_s: u32, now_s: i64) -> Result<Scope, OverAsked> {
    if parent.par.is_some() {
        return Err(OverAsked("a derived credential cannot be attenuated again; derive from its parent".into()));
    }
    let allow = rules_within(ask.allow.as_ref(), &parent.allow)?;
    let ttl = match ask.ttl_s {
        Some(t) if t > max_ttl_s => return Err(OverAsked(format!("ttl_s may be at most {max_ttl_s}"))),
        Some(t) => t,
        None => max_ttl_s,
    };
    // Never later than the parent.
    let exp = (now_s + i64::from(ttl)).min(parent.exp);
    // Each limit no looser than the parent's; one the parent has and the request leaves out is
    // the parent's.
    let asked = lim.copied().unwrap_or_default();
    let narrow = |p: Option<u64>, c: Option<u64>, name: &str| match (p, c) {
        (Some(p), Some(c)) if c > p => Err(OverAsked(format!("lim.{name} may be at most {p}"))),
        (_, Some(c)) => Ok(Some(c)),
        (p, None) => Ok(p),
    };
    let lim = Limits {
        rpm: narrow(parent.lim.rpm, asked.rpm, "rpm")?,
        total: narrow(parent.lim.total, asked.total, "total")?,
        spend: narrow(parent.lim.spend, asked.spend, "spend")?,
    };
    let run = match (&ask.run, &parent.run) {
        (Some(r), _) => Some(r.clone()),
        (None, p) => p.clone(),
    };
    Ok(Scope {
        sub: parent.sub.clone(),
        allow,
        exp,
        lim,
        run,
        par: Some(parent.jti.clone()),
        plim: parent.lim,
        pkid: Some(parent_kid.to_string()),
        pexp: Some(parent.exp),
    })
}

/// A new `jti`: a MAC, under the issuing key, of what makes this issuance unique (the time in
/// microseconds, this worker and its sequence, the request). Unpredictable without the key.
pub fn new_jti(key: &HmacKey, now_us: u64, worker: u32, seq: u64, body: &[u8]) -> String {
    let mut input = Vec::with_capacity(body.len() + 40);
    input.extend_from_slice(b"keyward/v1/jti\0");
    input.extend_from_slice(&now_us.to_be_bytes());
    input.extend_from_slice(&worker.to_be_bytes());
    input.extend_from_slice(&seq.to_be_bytes());
    input.extend_from_slice(body);
    key.sign(&input).iter().take(16).fold(String::with_capacity(32), |mut s, b| {
        s.push_str(&format!("{b:02x}"));
        s
    })
}

/// The issued credential's claims, as JSON.
pub fn claims_json(scope: &Scope, jti: &str, now_s: i64, audience: &str, iss: Option<&str>) -> String {
    let mut c = String::from("{\"sub\":");
    json::write_str(&mut c, &scope.sub);
    c.push_str(",\"aud\":");
    json::write_str(&mut c, audience);
    if let Some(i) = iss {
        c.push_str(",\"iss\":");
        json::write_str(&mut c, i);
    }
    c.push_str(&format!(",\"iat\":{now_s},\"exp\":{},\"jti\":", scope.exp));
    json::write_str(&mut c, jti);
    c.push_str(",\"allow\":[");
    for (i, r) in scope.allow.iter().enumerate() {
        if i > 0 {
            c.push(',');
        }
        json::write_str(&mut c, &r.to_string());
    }
    c.push(']');
    if let Some(r) = &scope.run {
        c.push_str(",\"run\":");
        json::write_str(&mut c, r);
    }
    for (name, lim) in [("lim", &scope.lim), ("plim", &scope.plim)] {
        let mut l = Vec::new();
        if let Some(n) = lim.rpm {
            l.push(format!("\"rpm\":{n}"));
        }
        if let Some(n) = lim.total {
            l.push(format!("\"total\":{n}"));
        }
        if let Some(n) = lim.spend {
            l.push(format!("\"spend\":{n}"));
        }
        if !l.is_empty() {
            c.push_str(&format!(",\"{name}\":{{{}}}", l.join(",")));
        }
    }
    if let Some(p) = &scope.par {
        c.push_str(",\"par\":");
        json::write_str(&mut c, p);
    }
    if let Some(k) = &scope.pkid {
        c.push_str(",\"pkid\":");
        json::write_str(&mut c, k);
    }
    if let Some(e) = scope.pexp {
        c.push_str(&format!(",\"pexp\":{e}"));
    }
    c.push('}');
    c
}

/// The endpoint's 200 body.
pub fn response_json(token: &str, jti: &str, scope: &Scope) -> String {
    let mut b = String::from("{\"token\":");
    json::write_str(&mut b, token);
    b.push_str(",\"jti\":");
    json::write_str(&mut b, jti);
    b.push_str(",\"sub\":");
    json::write_str(&mut b, &scope.sub);
    b.push_str(&format!(",\"expires_at\":{},\"allow\":[", scope.exp));
    for (i, r) in scope.allow.iter().enumerate() {
        if i > 0 {
            b.push(',');
        }
        json::write_str(&mut b, &r.to_string());
    }
    b.push_str("]}");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(rs: &[&str]) -> Vec<TokenRule> {
        rs.iter().map(|r| TokenRule::parse(r).unwrap_or_else(|e| panic!("{e}"))).collect()
    }

    fn parent() -> Claims {
        Claims {
            pkid: None,
            pexp: None,
            sub: "lambda/batch".into(),
            aud: vec!["keyward".into()],
            iss: None,
            exp: 10_000,
            nbf: None,
            iat: None,
            jti: "parent-1".into(),
            allow: rules(&["stripe POST /v1/payment_intents", "stripe GET /v1/**"]),
            run: None,
            lim: Limits { rpm: Some(600), total: None, spend: None },
            par: None,
            plim: Limits::default(),
        }
    }

    fn ask(allow: Option<&[&str]>, ttl_s: Option<u32>) -> Ask {
        Ask { allow: allow.map(rules), ttl_s, run: Some("sqs/m-1".into()) }
    }

    #[test]
    fn parses_the_two_grants_strictly() {
        let g = parse(br#"{"grant":"attenuate","allow":["stripe POST /v1/payment_intents"],"ttl_s":300,"lim":{"total":1},"run":"sqs/1"}"#);
        assert!(matches!(g, Ok(Grant::Attenuate { lim: Some(Limits { rpm: None, total: Some(1), spend: None }), .. })), "{g:?}");
        let g = parse(br#"{"grant":"aws_iam","iam_request":{"method":"POST","url":"https://sts.amazonaws.com/","headers":{"A":"b"},"body":"x"}}"#);
        assert!(matches!(g, Ok(Grant::AwsIam { .. })));
        for bad in [
            &br#"{"grant":"password"}"#[..],
            br#"{"grant":"attenuate","grant":"aws_iam"}"#,
            br#"{"grant":"attenuate","extra":1}"#,
            br#"{"grant":"aws_iam"}"#,
            br#"{"grant":"aws_iam","iam_request":{"method":"POST","url":"u","headers":{},"body":""},"lim":{"rpm":1}}"#,
            br#"{"grant":"attenuate","allow":[]}"#,
            br#"{"grant":"attenuate","allow":["stripe GET v1"]}"#,
            br#"{"grant":"attenuate","ttl_s":0}"#,
            br#"{"grant":"attenuate","run":"a\nb"}"#,
            br#"{"grant":"attenuate","lim":{"rpm":0}}"#,
            br#"not json"#,
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&vec![b' '; MAX_BODY + 1]).is_err());
    }

    #[test]
    fn a_child_is_within_its_parent_in_every_dimension() {
        let p = parent();
        let c = for_child(
            &p,
            "k1",
            &ask(Some(&["stripe POST /v1/payment_intents"]), Some(300)),
            Some(&Limits { rpm: None, total: Some(1), spend: None }),
            900,
            9_000,
        );
        let c = c.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.sub, "lambda/batch");
        assert_eq!(c.exp, 9_300);
        assert_eq!(c.lim, Limits { rpm: Some(600), total: Some(1), spend: None }, "the parent's rpm is kept, total added");
        assert_eq!(c.par.as_deref(), Some("parent-1"));
        assert_eq!(c.run.as_deref(), Some("sqs/m-1"));
        // exp never later than the parent's.
        let late = for_child(&p, "k1", &ask(None, Some(900)), None, 900, 9_500).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(late.exp, 10_000);
        assert_eq!(late.allow, p.allow, "no allow asked: the parent's");
        // Over-asking in any dimension is refused.
        assert!(for_child(&p, "k1", &ask(Some(&["stripe DELETE /v1/customers/x"]), None), None, 900, 9_000).is_err());
        assert!(for_child(&p, "k1", &ask(Some(&["stripe * /v1/payment_intents"]), None), None, 900, 9_000).is_err());
        assert!(for_child(&p, "k1", &ask(Some(&["openai POST /v1/responses"]), None), None, 900, 9_000).is_err());
        assert!(for_child(&p, "k1", &ask(None, Some(901)), None, 900, 9_000).is_err());
        assert!(for_child(&p, "k1", &ask(None, None), Some(&Limits { rpm: Some(601), total: None, spend: None }), 900, 9_000).is_err());
        let mut child = p.clone();
        child.par = Some("grandparent".into());
        assert!(for_child(&child, "k1", &ask(None, None), None, 900, 9_000).is_err(), "one level only");
    }

    #[test]
    fn a_role_is_a_ceiling() {
        let role = RoleGrant {
            sub: "lambda/checkout".into(),
            allow: rules(&["stripe POST /v1/payment_intents", "stripe GET /v1/customers/*"]),
            allow_text: vec![],
            lim: Limits { rpm: Some(60), total: None, spend: None },
            ttl_s: 600,
        };
        let s = for_role(&role, &ask(None, None), 1_000).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((s.sub.as_str(), s.exp, s.lim, s.par.clone()), ("lambda/checkout", 1_600, role.lim, None));
        let s = for_role(&role, &ask(Some(&["stripe GET /v1/customers/cus_1"]), Some(60)), 1_000).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((s.allow.len(), s.exp), (1, 1_060));
        assert!(for_role(&role, &ask(Some(&["stripe GET /v1/**"]), None), 1_000).is_err());
        assert!(for_role(&role, &ask(None, Some(601)), 1_000).is_err());
    }

    #[test]
    fn issued_claims_parse_back_as_the_scope() {
        let key = HmacKey::new(b"issuing-key-of-at-least-32-bytes").unwrap_or_else(|e| panic!("{e}"));
        let scope =
            for_child(&parent(), "k1", &ask(Some(&["stripe POST /v1/payment_intents"]), Some(60)), None, 900, 9_000).unwrap_or_else(|e| panic!("{e:?}"));
        let jti = new_jti(&key, 1, 2, 3, b"body");
        assert_eq!(jti.len(), 32);
        assert_ne!(jti, new_jti(&key, 1, 2, 4, b"body"));
        let token = crate::credential::jwt::mint("i1", &key, &claims_json(&scope, &jti, 9_000, "keyward", Some("https://gw")));
        let u = crate::credential::jwt::parse(&token).unwrap_or_else(|e| panic!("{e}"));
        let c = crate::credential::jwt::parse_claims(u.verify(&key).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.sub, c.exp, c.jti, c.allow, c.lim, c.run, c.par, c.plim),
            (scope.sub, scope.exp, jti, scope.allow, scope.lim, scope.run, scope.par, scope.plim)
        );
    }
}
