//! `keyward revoke`, `keyward unrevoke` and `keyward revoked`: the revocation list in a Vault or
//! OpenBao KV v2 secret. The commands write its compact form (`format`, and every entry as a line
//! of `entries`: see `keyward_core::credential::revocation`), so that ten thousand entries fit in
//! one write; they read the first form too (one key per entry) and move it into the compact one
//! on the next change. Every change is a check-and-set write of the whole list.
//!
//! Environment, as the `vault`/`bao` CLIs read it: `VAULT_ADDR` (required), `VAULT_TOKEN` (or the
//! token helper file `~/.vault-token`), `VAULT_NAMESPACE`, `VAULT_CACERT`. The token is sent only
//! in `X-Vault-Token` and never printed.

use crate::args::{Args, Fail};
use keyward_core::config::{self, StoreKind};
use keyward_core::credential::jwt::MAX_ID_LEN;
use keyward_core::credential::revocation::{ENTRIES_KEY, FORMAT, FORMAT_KEY};
use keyward_core::secret::Secret;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const DEFAULT_MOUNT: &str = "secret";
const DEFAULT_PATH: &str = "keyward/revoked";
/// Attempts when another writer changes the list between our read and our write.
const CAS_TRIES: u32 = 5;

/// Where the list lives: `--config FILE` (the filter configuration's `revocation`), or
/// `--mount`/`--path`, defaulting to `secret` and `keyward/revoked`.
#[derive(Debug, PartialEq, Eq)]
pub struct Location {
    pub mount: String,
    pub path: String,
}

pub fn location(a: &Args) -> Result<Location, String> {
    if let Some(file) = a.get("config") {
        if a.get("mount").is_some() || a.get("path").is_some() {
            return Err("give --config or --mount/--path, not both".into());
        }
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        let cfg = crate::compile_for_check(&bytes, true).map_err(|e| format!("{file}: {e}"))?;
        let rev = cfg.revocation.as_ref().ok_or_else(|| format!("{file}: no revocation is configured"))?;
        let store = cfg.stores.get(rev.store).ok_or_else(|| format!("{file}: the revocation store is missing"))?;
        return match &store.kind {
            StoreKind::VaultKv2 { mount, .. } => Ok(Location { mount: mount.clone(), path: rev.path.clone() }),
            StoreKind::AwsSecretsManager => {
                Err(format!("{file}: the revocation list is in AWS Secrets Manager ({}); edit it with `aws secretsmanager put-secret-value`", rev.path))
            }
        };
    }
    let loc = Location {
        mount: a.get("mount").unwrap_or(DEFAULT_MOUNT).trim_matches('/').to_string(),
        path: a.get("path").unwrap_or(DEFAULT_PATH).trim_matches('/').to_string(),
    };
    for (what, v) in [("--mount", &loc.mount), ("--path", &loc.path)] {
        if !config::valid_store_path(v) {
            return Err(format!("{what} {v:?} is not a valid KV path"));
        }
    }
    Ok(loc)
}

/// The list entry key for `--jti ID` or `--sub SUB` (exactly one).
pub fn entry_key(a: &Args) -> Result<String, String> {
    let (kind, id) = match (a.get("jti"), a.get("sub")) {
        (Some(j), None) => ("jti", j),
        (None, Some(s)) => ("sub", s),
        _ => return Err("give exactly one of --jti ID and --sub SUBJECT".into()),
    };
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!("--{kind} must be 1 to {MAX_ID_LEN} bytes without control characters"));
    }
    Ok(format!("{kind}:{id}"))
}

/// `2026-11-23T10:04:05Z` for seconds since the epoch (UTC; days from civil, Howard Hinnant).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The list's entries (key to the credential's expiry, 0 when unknown, and the reason) and its
/// KV version.
pub type Entries = BTreeMap<String, (i64, String)>;
pub type Listing = (Entries, u64);

/// The entries of a list document, in either form.
pub fn parse_entries(data: &serde_json::Map<String, Value>) -> Entries {
    let mut out = BTreeMap::new();
    for (k, val) in data {
        match (k.as_str(), val) {
            (FORMAT_KEY, _) => {}
            (ENTRIES_KEY, Value::String(text)) => {
                for line in text.lines().filter(|l| !l.is_empty()) {
                    let mut parts = line.splitn(3, '\t');
                    let key = parts.next().unwrap_or_default().to_string();
                    let exp = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
                    out.insert(key, (exp, parts.next().unwrap_or_default().to_string()));
                }
            }
            (_, Value::String(reason)) => {
                out.insert(k.clone(), (0, reason.clone()));
            }
            (_, other) => {
                out.insert(k.clone(), (0, other.to_string()));
            }
        }
    }
    out
}

/// The compact form of `entries`.
pub fn render(entries: &Entries) -> Value {
    let text: String = entries.iter().map(|(k, (exp, reason))| format!("{k}\t{exp}\t{reason}\n")).collect();
    json!({ FORMAT_KEY: FORMAT, ENTRIES_KEY: text })
}

/// A KV v2 client for one secret.
pub struct Kv {
    agent: ureq::Agent,
    addr: String,
    token: Secret,
    namespace: Option<String>,
    loc: Location,
}

fn vault_errors(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("errors").and_then(Value::as_array) {
            Some(e) if !e.is_empty() => e.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "),
            _ => "no error detail".into(),
        },
        Err(_) => format!("a {}-byte answer that is not JSON", body.len()),
    }
}

impl Kv {
    pub fn from_env(loc: Location) -> Result<Kv, String> {
        let addr = std::env::var("VAULT_ADDR").map_err(|_| "VAULT_ADDR is not set (e.g. https://vault.internal:8200)")?;
        let addr = addr.trim_end_matches('/').to_string();
        if !(addr.starts_with("http://") || addr.starts_with("https://")) {
            return Err(format!("VAULT_ADDR {addr:?} must start with http:// or https://"));
        }
        let token = match std::env::var("VAULT_TOKEN") {
            Ok(t) if !t.is_empty() => Secret::text(&t),
            _ => {
                let home = std::env::var("HOME").unwrap_or_default();
                let t = std::fs::read_to_string(format!("{home}/.vault-token")).map_err(|_| "VAULT_TOKEN is not set and ~/.vault-token cannot be read")?;
                Secret::text(t.trim())
            }
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Ok(ca) = std::env::var("VAULT_CACERT") {
            let pem = std::fs::read(&ca).map_err(|e| format!("VAULT_CACERT {ca}: {e}"))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(format!("VAULT_CACERT {ca}: no PEM certificate found"));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(15))).tls_config(tls.build()).build().new_agent();
        let namespace = std::env::var("VAULT_NAMESPACE").ok().filter(|n| !n.is_empty());
        Ok(Kv { agent, addr, token, namespace, loc })
    }

    fn url(&self, kind: &str) -> String {
        format!("{}/v1/{}/{kind}/{}", self.addr, self.loc.mount, self.loc.path)
    }

    pub fn describe(&self) -> String {
        format!("{}/{} at {}", self.loc.mount, self.loc.path, self.addr)
    }

    fn call(&self, method: &str, url: &str, body: Option<&Value>, content_type: &str) -> Result<(u16, String), String> {
        let token = self.token.expose_str().ok_or("the Vault token is not text")?;
        let req = ureq::http::Request::builder().method(method).uri(url).header("X-Vault-Token", token);
        let req = match &self.namespace {
            Some(ns) => req.header("X-Vault-Namespace", ns.as_str()),
            None => req,
        };
        let sent = match body {
            Some(b) => {
                let req = req.header("Content-Type", content_type).body(b.to_string()).map_err(|e| e.to_string())?;
                self.agent.run(req)
            }
            None => self.agent.run(req.body(()).map_err(|e| e.to_string())?),
        };
        let mut resp = sent.map_err(|e| format!("cannot reach {}: {e}", self.addr))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().with_config().limit(4 << 20).read_to_string().map_err(|e| format!("reading the answer: {e}"))?;
        Ok((status, text))
    }

    /// The list's entries and version; `None` when the secret does not exist or its latest
    /// version is deleted.
    pub fn read(&self) -> Result<Option<Listing>, String> {
        let (status, body) = self.call("GET", &self.url("data"), None, "")?;
        match status {
            200 => {}
            404 => return Ok(None),
            s => return Err(format!("reading {}: HTTP {s}: {}", self.describe(), vault_errors(&body))),
        }
        let v: Value = serde_json::from_str(&body).map_err(|_| format!("reading {}: the answer is not JSON", self.describe()))?;
        let version = v.pointer("/data/metadata/version").and_then(Value::as_u64).unwrap_or(0);
        let entries = v.pointer("/data/data").and_then(Value::as_object).map(parse_entries).unwrap_or_default();
        Ok(Some((entries, version)))
    }

    /// The current version number from the metadata (0: the secret has never been written).
    fn current_version(&self) -> Result<u64, String> {
        let (status, body) = self.call("GET", &self.url("metadata"), None, "")?;
        match status {
            200 => {
                let v: Value = serde_json::from_str(&body).map_err(|_| "the metadata answer is not JSON".to_string())?;
                Ok(v.pointer("/data/current_version").and_then(Value::as_u64).unwrap_or(0))
            }
            404 => Ok(0),
            s => Err(format!("reading the metadata of {}: HTTP {s}: {}", self.describe(), vault_errors(&body))),
        }
    }

    /// Change the list with `change` without losing concurrent writes: read it, change it, and
    /// write it back in the compact form with check-and-set on the version read; again if
    /// another writer came in between.
    /// Failures of the store are `Unavailable`; `change`'s own refusal is passed through.
    pub fn update(&self, change: impl Fn(&mut Entries) -> Result<(), Fail>) -> Result<(), Fail> {
        for _ in 0..CAS_TRIES {
            let (mut entries, cas) = match self.read().map_err(Fail::Unavailable)? {
                Some(l) => l,
                // Never written, or its latest version deleted: the next version, from nothing.
                None => (BTreeMap::new(), self.current_version().map_err(Fail::Unavailable)?),
            };
            change(&mut entries)?;
            let (status, body) = self
                .call("POST", &self.url("data"), Some(&json!({ "data": render(&entries), "options": { "cas": cas } })), "application/json")
                .map_err(Fail::Unavailable)?;
            match status {
                200 | 204 => return Ok(()),
                400 if body.contains("check-and-set") => continue,
                s => return Err(Fail::Unavailable(format!("writing {}: HTTP {s}: {}", self.describe(), vault_errors(&body)))),
            }
        }
        Err(Fail::Unavailable(format!("{} kept changing; try again", self.describe())))
    }
}

fn open(a: &Args) -> Result<Kv, Fail> {
    Kv::from_env(location(a).map_err(Fail::Usage)?).map_err(Fail::Usage)
}

pub fn revoke(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &["prune"], &["jti", "sub", "reason", "expires-at", "config", "mount", "path"], 0)?;
    let prune = a.flag("prune");
    let key = match (a.get("jti"), a.get("sub"), prune) {
        (None, None, true) => None,
        _ => Some(entry_key(&a).map_err(Fail::Usage)?),
    };
    let reason = a.get("reason").unwrap_or("revoked with the keyward CLI");
    if reason.len() > 512 || reason.chars().any(char::is_control) {
        return Err(Fail::usage("--reason must be at most 512 bytes without control characters"));
    }
    let exp: i64 = match a.get("expires-at") {
        None => 0,
        Some(v) => v.parse().ok().filter(|e| *e > 0).ok_or_else(|| Fail::usage("--expires-at takes the credential's exp: Unix seconds"))?,
    };
    let kv = open(&a)?;
    let now = crate::now();
    let stamped = format!("{reason} [{}]", rfc3339(now));
    let pruned = std::cell::Cell::new(0usize);
    kv.update(|entries| {
        if prune {
            let before = entries.len();
            entries.retain(|_, (exp, _)| *exp == 0 || *exp >= now);
            pruned.set(before - entries.len());
        }
        if let Some(k) = &key {
            entries.insert(k.clone(), (exp, stamped.clone()));
        }
        Ok(())
    })?;
    if a.json() {
        println!("{}", json!({ "ok": true, "revoked": key, "expires_at": (exp != 0).then_some(exp), "pruned": pruned.get(), "list": kv.describe() }));
        return Ok(());
    }
    if let Some(k) = &key {
        println!("revoked {k} in {}; gateways deny it within their refresh_s plus one second", kv.describe());
    }
    if prune {
        println!("pruned {} entr{} of expired credentials from {}", pruned.get(), if pruned.get() == 1 { "y" } else { "ies" }, kv.describe());
    }
    Ok(())
}

pub fn unrevoke(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &["jti", "sub", "config", "mount", "path"], 0)?;
    let key = entry_key(&a).map_err(Fail::Usage)?;
    let kv = open(&a)?;
    kv.update(|entries| match entries.remove(&key) {
        Some(_) => Ok(()),
        None => Err(Fail::Failed(format!("{key} is not in {}", kv.describe()))),
    })?;
    if a.json() {
        println!("{}", json!({ "ok": true, "removed": key, "list": kv.describe() }));
    } else {
        println!("removed {key} from {}", kv.describe());
    }
    Ok(())
}

pub fn list(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &["config", "mount", "path"], 0)?;
    let kv = open(&a)?;
    let (entries, version) = kv.read().map_err(Fail::Unavailable)?.unwrap_or_default();
    if a.flag("json") {
        let reasons: BTreeMap<&String, &String> = entries.iter().map(|(k, (_, r))| (k, r)).collect();
        let expires: BTreeMap<&String, i64> = entries.iter().filter(|(_, (e, _))| *e != 0).map(|(k, (e, _))| (k, *e)).collect();
        println!("{}", json!({ "version": version, "entries": reasons, "expires": expires }));
        return Ok(());
    }
    let n = entries.len();
    println!("{n} entr{} in {} (version {version})", if n == 1 { "y" } else { "ies" }, kv.describe());
    for (k, (exp, reason)) in &entries {
        let note = if k.starts_with("jti:") || k.starts_with("sub:") { "" } else { "   (ignored: not jti:/sub:)" };
        let until = if *exp != 0 { format!("\t(credential expires {})", rfc3339(*exp)) } else { String::new() };
        println!("{k}\t{reason}{until}{note}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        Args::read(&v, &["prune"], &["jti", "sub", "reason", "expires-at", "config", "mount", "path"], 0).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn both_forms_read_and_the_compact_one_written() {
        let doc = json!({
            "format": FORMAT,
            "entries": "jti:a\t2000000000\tleaked [2026-12-02T00:00:00Z]\nsub:lambda/x\t0\tcompromised\n",
            "jti:legacy": "first form",
        });
        let e = parse_entries(doc.as_object().unwrap_or_else(|| panic!("object")));
        assert_eq!(e.get("jti:a"), Some(&(2_000_000_000, "leaked [2026-12-02T00:00:00Z]".to_string())));
        assert_eq!(e.get("jti:legacy"), Some(&(0, "first form".to_string())));
        let written = render(&e);
        let again = parse_entries(written.as_object().unwrap_or_else(|| panic!("object")));
        assert_eq!(again, e, "round trip");
        assert_eq!(written.as_object().map(|o| o.len()), Some(2), "two strings, whatever the number of entries");
    }

    #[test]
    fn entry_keys() {
        assert_eq!(entry_key(&args(&["--jti", "abc"])), Ok("jti:abc".into()));
        assert_eq!(entry_key(&args(&["--sub", "lambda/pay"])), Ok("sub:lambda/pay".into()));
        assert!(entry_key(&args(&["--jti", "a", "--sub", "b"])).is_err());
        assert!(entry_key(&args(&[])).is_err());
        assert!(entry_key(&args(&["--jti", ""])).is_err());
        assert!(entry_key(&args(&["--jti", "a\nb"])).is_err());
        assert!(entry_key(&args(&["--jti", &"x".repeat(MAX_ID_LEN + 1)])).is_err());
    }

    #[test]
    fn locations() {
        assert_eq!(location(&args(&[])), Ok(Location { mount: "secret".into(), path: "keyward/revoked".into() }));
        assert_eq!(location(&args(&["--mount", "/kv/", "--path", "team/rev"])), Ok(Location { mount: "kv".into(), path: "team/rev".into() }));
        assert!(location(&args(&["--path", "../x"])).is_err());
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/contract-config.json");
        assert_eq!(location(&args(&["--config", fixture])), Ok(Location { mount: "secret".into(), path: "keyward/revoked".into() }));
        assert!(location(&args(&["--config", fixture, "--path", "x"])).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_435_445), "2026-11-23T12:04:05Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
