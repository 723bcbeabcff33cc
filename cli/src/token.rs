//! `keyward mint` and `keyward inspect`: sign a credential, or say exactly why one fails.

use crate::args::{Args, Fail};
use crate::now;
use keyward_core::config;
use keyward_core::credential::jwt::{self, HmacKey, Policy, TokenError};
use keyward_core::policy::rules::TokenRule;
use keyward_core::wire::json;
use keyward_core::{secret::Secret, wire::b64};
use serde_json::{json, Value};
use std::io::Read;

fn load_key(a: &Args) -> Result<Option<HmacKey>, Fail> {
    let value = match (a.get("key-env"), a.get("key-file")) {
        (Some(_), Some(_)) => return Err(Fail::usage("give one of --key-env and --key-file")),
        (Some(var), None) => Secret::text(&std::env::var(var).map_err(|_| Fail::usage(format!("environment variable {var} is not set")))?),
        (None, Some(path)) => Secret::new(std::fs::read(path).map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?),
        (None, None) => return Ok(None),
    };
    let text = value.expose_str().ok_or_else(|| Fail::usage("the key is not text (base64 expected)"))?;
    let bytes = b64::key_decode(text).ok_or_else(|| Fail::usage("the key is not base64"))?;
    HmacKey::new(&bytes).map(Some).map_err(Fail::Usage)
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn positive(a: &Args, name: &str) -> Result<Option<u64>, Fail> {
    a.get(name).map(|v| v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| Fail::usage(format!("--{name} must be a positive integer")))).transpose()
}

pub fn mint(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &["kid", "key-env", "key-file", "sub", "allow", "ttl", "aud", "iss", "run", "rpm", "total", "spend", "jti"], 0)?;
    let kid = a.get("kid").ok_or_else(|| Fail::usage("--kid is required"))?;
    let key = load_key(&a)?.ok_or_else(|| Fail::usage("--key-env or --key-file is required"))?;
    let sub = a.get("sub").ok_or_else(|| Fail::usage("--sub is required"))?;
    let rules = a.all("allow");
    if rules.is_empty() {
        return Err(Fail::usage("at least one --allow rule is required"));
    }
    for r in &rules {
        TokenRule::parse(r).map_err(|e| Fail::usage(format!("--allow: {e}")))?;
    }
    let ttl = positive(&a, "ttl")?.unwrap_or(900) as i64;
    let iat = now();
    let exp = iat + ttl;
    let jti = a.get("jti").map_or_else(random_id, str::to_string);
    let mut c = String::from("{");
    let mut field = |name: &str, value: &str, raw: bool| {
        if c.len() > 1 {
            c.push(',');
        }
        json::write_str(&mut c, name);
        c.push(':');
        if raw {
            c.push_str(value);
        } else {
            json::write_str(&mut c, value);
        }
    };
    field("sub", sub, false);
    field("aud", a.get("aud").unwrap_or("keyward"), false);
    if let Some(iss) = a.get("iss") {
        field("iss", iss, false);
    }
    field("iat", &iat.to_string(), true);
    field("exp", &exp.to_string(), true);
    field("jti", &jti, false);
    let mut allow = String::from("[");
    for (i, r) in rules.iter().enumerate() {
        if i > 0 {
            allow.push(',');
        }
        json::write_str(&mut allow, r);
    }
    allow.push(']');
    field("allow", &allow, true);
    if let Some(run) = a.get("run") {
        field("run", run, false);
    }
    let (rpm, total) = (positive(&a, "rpm")?, positive(&a, "total")?);
    let spend = a
        .get("spend")
        .map(|v| v.parse::<u64>().map_err(|_| Fail::usage("--spend must be a whole number of the target's cost unit (e.g. cents)")))
        .transpose()?;
    if rpm.is_some() || total.is_some() || spend.is_some() {
        let l: Vec<String> = [("rpm", rpm), ("total", total), ("spend", spend)].iter().filter_map(|(k, v)| v.map(|n| format!("\"{k}\":{n}"))).collect();
        field("lim", &format!("{{{}}}", l.join(",")), true);
    }
    c.push('}');
    // Check what we mint with the same parser the filter uses.
    let t = jwt::mint(kid, &key, &c);
    let u = jwt::parse(&t).map_err(|e| Fail::usage(e.to_string()))?;
    jwt::parse_claims(u.verify(&key).map_err(|e| Fail::usage(e.to_string()))?).map_err(|e| Fail::usage(e.to_string()))?;
    if a.json() {
        println!("{}", json!({ "token": t, "kid": kid, "sub": sub, "jti": jti, "iat": iat, "exp": exp, "run": a.get("run") }));
    } else {
        println!("{t}");
    }
    Ok(())
}

fn decode_part(p: &str) -> Result<Value, String> {
    let b = b64::jws_decode(p.as_bytes()).ok_or("not base64url")?;
    serde_json::from_slice::<Value>(&b).map_err(|_| format!("not JSON: {} bytes", b.len()))
}

fn shown(v: &Result<Value, String>) -> String {
    match v {
        Ok(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
        Err(e) => format!("({e})"),
    }
}

/// What `inspect` found: the decoded parts (unverified) and the verdict.
struct Inspection {
    header: Option<Result<Value, String>>,
    claims: Option<Result<Value, String>>,
    kid: Option<String>,
    verdict: Result<jwt::Claims, Fail>,
}

pub fn inspect(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &["key-env", "key-file", "config", "aud", "iss", "max-lifetime", "skew"], 1)?;
    let mut t = match a.positional.first().map(String::as_str) {
        Some("-") | None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| Fail::unavailable(e.to_string()))?;
            s
        }
        Some(t) => t.to_string(),
    };
    t = t.trim().to_string();
    if let Some(rest) = t.strip_prefix("Bearer ") {
        t = rest.trim().to_string();
    }
    let mut parts = t.split('.');
    let (h, p) = (parts.next(), parts.next());
    let mut kid = None;
    let verdict = verify(&a, &t, &mut kid);
    let ins = Inspection { header: h.filter(|_| p.is_some()).map(decode_part), claims: p.map(decode_part), kid, verdict };
    let now = now();
    if a.json() {
        let mut out = serde_json::Map::new();
        out.insert("valid".into(), json!(ins.verdict.is_ok()));
        out.insert("kid".into(), json!(ins.kid));
        out.insert("header".into(), json!(ins.header.as_ref().and_then(|h| h.as_ref().ok())));
        out.insert("claims".into(), json!(ins.claims.as_ref().and_then(|c| c.as_ref().ok())));
        match &ins.verdict {
            Ok(c) => out.insert("expires_in".into(), json!(c.exp - now)),
            Err(e) => out.insert("error".into(), json!({ "kind": e.kind(), "message": e.message() })),
        };
        let out = Value::Object(out);
        println!("{out}");
        return ins.verdict.map(|_| ()).map_err(Fail::quiet);
    }
    if let (Some(h), Some(c)) = (&ins.header, &ins.claims) {
        println!("header:\n{}", shown(h));
        println!("claims (UNVERIFIED until the signature checks out):\n{}", shown(c));
    }
    if let Some(kid) = &ins.kid {
        println!("kid: {kid}");
    }
    let claims = ins.verdict?;
    println!("valid: sub={} jti={} expires in {}s; {} rule(s)", claims.sub, claims.jti, claims.exp - now, claims.allow.len());
    Ok(())
}

fn verify(a: &Args, t: &str, kid_out: &mut Option<String>) -> Result<jwt::Claims, Fail> {
    let (key, policy) = match a.get("config") {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?;
            let env = |n: &str| std::env::var(n).ok();
            let cfg = config::compile(&bytes, &env).map_err(|e| Fail::usage(format!("{path}: {e}")))?;
            let u = jwt::parse(t).map_err(|e| explain(&e))?;
            let key = match cfg.key(&u.kid).map(|k| &k.source) {
                Some(config::KeySource::Ready(k)) => Some(k.clone()),
                Some(config::KeySource::Stored { .. }) => {
                    return Err(Fail::usage(format!("kid {:?} is held in a store; pass it with --key-env or --key-file", u.kid)))
                }
                None => return Err(explain(&TokenError::UnknownKid(u.kid.clone()))),
            };
            (load_key(a)?.or(key), cfg.policy.clone())
        }
        None => (
            load_key(a)?,
            Policy {
                audience: a.get("aud").unwrap_or("keyward").to_string(),
                issuer: a.get("iss").map(str::to_string),
                clock_skew_s: a.get("skew").and_then(|s| s.parse().ok()).unwrap_or(30),
                max_token_lifetime_s: a.get("max-lifetime").and_then(|s| s.parse().ok()).unwrap_or(86_400),
            },
        ),
    };
    let u = jwt::parse(t).map_err(|e| explain(&e))?;
    *kid_out = Some(u.kid.clone());
    let Some(key) = key else {
        return Err(Fail::usage("structure is valid; pass --key-env, --key-file or --config to verify the signature"));
    };
    let payload = u.verify(&key).map_err(|e| explain(&e))?;
    let claims = jwt::parse_claims(payload).map_err(|e| explain(&e))?;
    policy.check(&claims, now()).map_err(|e| explain(&e))?;
    Ok(claims)
}

fn explain(e: &TokenError) -> Fail {
    Fail::Failed(format!("invalid ({}): {e}", e.code()))
}
