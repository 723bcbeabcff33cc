//! `keyward`: mint and inspect workload credentials, validate configurations.

mod envoy_lint;
mod report;
mod revoke;

use keyward_core::config;
use keyward_core::credential::jwt::{self, HmacKey, Policy, TokenError};
use keyward_core::policy::rules::TokenRule;
use keyward_core::wire::json;
use keyward_core::{secret::Secret, wire::b64};
use std::io::Read;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

const USAGE: &str = "keyward: scoped workload credentials for Keyward

USAGE:
  keyward mint --kid KID (--key-env VAR | --key-file PATH) --sub SUB --allow RULE [--allow RULE ...]
               [--ttl SECONDS] [--aud AUD] [--iss ISS] [--run LABEL] [--rpm N] [--total N] [--jti ID]
      Print a signed HS256 credential. RULE is \"<target> <METHOD> <path-pattern>\".
      Defaults: --ttl 900, --aud keyward, a random --jti.
  keyward inspect [TOKEN|-] [--key-env VAR | --key-file PATH] [--config FILE]
               [--aud AUD] [--iss ISS] [--max-lifetime S] [--skew S]
      Decode a credential, verify it and say exactly why it fails. Exit 0 when valid.
      With --config, the key (by kid, from the environment) and the policy come from a filter config.
  keyward check-config FILE [--no-env]
      Validate a filter configuration (JSON). --no-env checks structure without the environment.
  keyward check-envoy FILE.yaml [--no-env]
      Lint an Envoy bootstrap that runs Keyward: route metadata vs. prefixes, failure_policy, path
      normalisation, and the embedded filter configuration.
  keyward revoke (--jti ID | --sub SUBJECT) [--reason TEXT] [--expires-at EXP] [--prune] [LIST]
      Add the credential (or every credential of a workload) to the revocation list in Vault or
      OpenBao. Gateways deny it within their revocation refresh_s plus one second. EXP is the
      credential's exp (Unix seconds, as `keyward inspect` shows it): once it has passed, the
      entry no longer matters, gateways drop it, and --prune deletes it (alone, or with a
      revocation).
  keyward unrevoke (--jti ID | --sub SUBJECT) [LIST]
      Remove an entry from the revocation list.
  keyward revoked [LIST] [--json]
      List the revocation list's entries and reasons.
      LIST is --config FILE (the filter configuration's revocation store and path), or
      [--mount MOUNT] [--path PATH] (default: secret, keyward/revoked).
      Environment: VAULT_ADDR, VAULT_TOKEN (or ~/.vault-token), VAULT_NAMESPACE, VAULT_CACERT.
  keyward report ACCESS_LOG|- [--json] [--top N]
      Summarise a JSON access log: calls and denials per subject and target, the top denial
      reasons, latency percentiles. Lines that are not JSON are skipped.
  keyward version
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let cmd = args.next();
    let rest: Vec<String> = args.collect();
    let r = match cmd.as_deref() {
        Some("mint") => mint(&rest),
        Some("inspect") => inspect(&rest),
        Some("check-config") => check_config(&rest),
        Some("check-envoy") => envoy_lint::run(&rest),
        Some("revoke") => revoke::revoke(&rest),
        Some("unrevoke") => revoke::unrevoke(&rest),
        Some("revoked") => revoke::list(&rest),
        Some("report") => report::run(&rest),
        Some("version" | "--version") => {
            println!("keyward {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}; see `keyward help`")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Minimal flag parser: `--name value` pairs (repeatable) and positionals.
pub struct Args {
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
    pub positional: Vec<String>,
}

impl Args {
    pub fn parse(args: &[String], known_flags: &[&str]) -> Result<Args, String> {
        let mut a = Args { pairs: vec![], flags: vec![], positional: vec![] };
        let mut i = 0;
        while i < args.len() {
            let s = args.get(i).cloned().unwrap_or_default();
            if let Some(name) = s.strip_prefix("--") {
                if known_flags.contains(&name) {
                    a.flags.push(name.to_string());
                } else {
                    let v = args.get(i + 1).ok_or_else(|| format!("--{name} needs a value"))?;
                    a.pairs.push((name.to_string(), v.clone()));
                    i += 1;
                }
            } else {
                a.positional.push(s);
            }
            i += 1;
        }
        Ok(a)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    pub fn all(&self, k: &str) -> Vec<&str> {
        self.pairs.iter().filter(|(n, _)| n == k).map(|(_, v)| v.as_str()).collect()
    }
    pub fn flag(&self, k: &str) -> bool {
        self.flags.iter().any(|f| f == k)
    }
    pub fn check_known(&self, allowed: &[&str]) -> Result<(), String> {
        self.check(allowed)
    }
    fn check(&self, allowed: &[&str]) -> Result<(), String> {
        for (n, _) in &self.pairs {
            if !allowed.contains(&n.as_str()) {
                return Err(format!("unknown option --{n}"));
            }
        }
        Ok(())
    }
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn load_key(a: &Args) -> Result<Option<HmacKey>, String> {
    let value = match (a.get("key-env"), a.get("key-file")) {
        (Some(_), Some(_)) => return Err("give one of --key-env and --key-file".into()),
        (Some(var), None) => Secret::text(&std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?),
        (None, Some(path)) => Secret::new(std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?),
        (None, None) => return Ok(None),
    };
    let text = value.expose_str().ok_or("the key is not text (base64 expected)")?;
    let bytes = b64::key_decode(text).ok_or("the key is not base64")?;
    HmacKey::new(&bytes).map(Some)
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mint(args: &[String]) -> Result<(), String> {
    let a = Args::parse(args, &[])?;
    a.check(&["kid", "key-env", "key-file", "sub", "allow", "ttl", "aud", "iss", "run", "rpm", "total", "jti"])?;
    let kid = a.get("kid").ok_or("--kid is required")?;
    let key = load_key(&a)?.ok_or("--key-env or --key-file is required")?;
    let sub = a.get("sub").ok_or("--sub is required")?;
    let rules = a.all("allow");
    if rules.is_empty() {
        return Err("at least one --allow rule is required".into());
    }
    for r in &rules {
        TokenRule::parse(r).map_err(|e| format!("--allow: {e}"))?;
    }
    let ttl: i64 = a.get("ttl").unwrap_or("900").parse().map_err(|_| "--ttl must be a number of seconds")?;
    if ttl <= 0 {
        return Err("--ttl must be positive".into());
    }
    let now = now();
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
    field("iat", &now.to_string(), true);
    field("exp", &(now + ttl).to_string(), true);
    field("jti", &a.get("jti").map_or_else(random_id, str::to_string), false);
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
    let rpm = a.get("rpm").map(|v| v.parse::<u64>().map_err(|_| "--rpm must be a positive integer")).transpose()?;
    let total = a.get("total").map(|v| v.parse::<u64>().map_err(|_| "--total must be a positive integer")).transpose()?;
    if rpm.is_some() || total.is_some() {
        let mut l = Vec::new();
        if let Some(n) = rpm {
            l.push(format!("\"rpm\":{n}"));
        }
        if let Some(n) = total {
            l.push(format!("\"total\":{n}"));
        }
        field("lim", &format!("{{{}}}", l.join(",")), true);
    }
    c.push('}');
    // Check what we mint with the same parser the filter uses.
    let t = jwt::mint(kid, &key, &c);
    let u = jwt::parse(&t).map_err(|e| e.to_string())?;
    jwt::parse_claims(u.verify(&key).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    println!("{t}");
    Ok(())
}

fn decode_part(p: &str) -> String {
    match b64::jws_decode(p.as_bytes()) {
        Some(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => format!("(not JSON: {} bytes)", b.len()),
        },
        None => "(not base64url)".to_string(),
    }
}

fn inspect(args: &[String]) -> Result<(), String> {
    let a = Args::parse(args, &[])?;
    a.check(&["key-env", "key-file", "config", "aud", "iss", "max-lifetime", "skew"])?;
    let mut t = match a.positional.first().map(String::as_str) {
        Some("-") | None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| e.to_string())?;
            s
        }
        Some(t) => t.to_string(),
    };
    t = t.trim().to_string();
    if let Some(rest) = t.strip_prefix("Bearer ") {
        t = rest.trim().to_string();
    }
    let parts: Vec<&str> = t.split('.').collect();
    if let (Some(h), Some(p)) = (parts.first(), parts.get(1)) {
        println!("header:\n{}", decode_part(h));
        println!("claims (UNVERIFIED until the signature checks out):\n{}", decode_part(p));
    }
    let (key, policy) = match a.get("config") {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            let env = |n: &str| std::env::var(n).ok();
            let cfg = config::compile(&bytes, &env).map_err(|e| e.to_string())?;
            let u = jwt::parse(&t).map_err(|e| explain(&e))?;
            let key = match cfg.key(&u.kid).map(|k| &k.source) {
                Some(config::KeySource::Ready(k)) => Some(k.clone()),
                Some(config::KeySource::Stored { .. }) => return Err(format!("kid {:?} is held in a store; pass it with --key-env or --key-file", u.kid)),
                None => return Err(explain(&TokenError::UnknownKid(u.kid.clone()))),
            };
            (load_key(&a)?.or(key), cfg.policy.clone())
        }
        None => (
            load_key(&a)?,
            Policy {
                audience: a.get("aud").unwrap_or("keyward").to_string(),
                issuer: a.get("iss").map(str::to_string),
                clock_skew_s: a.get("skew").and_then(|s| s.parse().ok()).unwrap_or(30),
                max_token_lifetime_s: a.get("max-lifetime").and_then(|s| s.parse().ok()).unwrap_or(86_400),
            },
        ),
    };
    let u = jwt::parse(&t).map_err(|e| explain(&e))?;
    println!("kid: {}", u.kid);
    let Some(key) = key else {
        return Err("structure is valid; pass --key-env, --key-file or --config to verify the signature".into());
    };
    let payload = u.verify(&key).map_err(|e| explain(&e))?;
    let claims = jwt::parse_claims(payload).map_err(|e| explain(&e))?;
    policy.check(&claims, now()).map_err(|e| explain(&e))?;
    println!("valid: sub={} jti={} expires in {}s; {} rule(s)", claims.sub, claims.jti, claims.exp - now(), claims.allow.len());
    Ok(())
}

fn explain(e: &TokenError) -> String {
    format!("invalid ({}): {e}", e.code())
}

fn check_config(args: &[String]) -> Result<(), String> {
    let a = Args::parse(args, &["no-env"])?;
    a.check(&[])?;
    let path = a.positional.first().ok_or("usage: keyward check-config FILE [--no-env]")?;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let cfg = compile_for_check(&bytes, a.flag("no-env")).map_err(|e| format!("{path}: {e}"))?;
    println!("ok: {}", cfg.summary());
    Ok(())
}

/// With `no_env`, every environment variable reads as a placeholder 32-byte key, so that the
/// structure can be checked where the secrets are not present (CI).
pub fn compile_for_check(bytes: &[u8], no_env: bool) -> Result<config::Config, config::ConfigError> {
    if no_env {
        let placeholder = |_: &str| Some(b64::std_encode(&[0x5a; 32]));
        config::compile(bytes, &placeholder)
    } else {
        let env = |n: &str| std::env::var(n).ok();
        config::compile(bytes, &env)
    }
}
