//! Filter configuration: stage one is serde with `deny_unknown_fields` (plus a strict pass that
//! rejects duplicate keys), stage two compiles and validates into `Config`. Every error names the
//! offending path, e.g. `targets.stripe.secret.store: unknown store "bao2"`.

use crate::credential::extract::CredentialSource;
use crate::credential::jwt::{HmacKey, Policy};
use crate::policy::cost::Cost;
use crate::policy::rules::{valid_target_name, Method, RouteRule};
use crate::secret::Secret;
use crate::wire::b64;
use crate::wire::json;
use std::fmt;

mod checks;
mod compiled;
mod raw;

pub use checks::valid_store_path;
use checks::*;
pub use compiled::*;
use raw::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "configuration: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { path: path.into(), message: message.into() })
}

// ---------------------------------------------------------------- stage one: the raw document

struct Compiler<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    slots: Vec<Slot>,
    store_index: crate::Map<String, usize>,
}

impl Compiler<'_> {
    fn env(&self, path: &str, name: &str) -> Result<String, ConfigError> {
        if !valid_env_name(name) {
            return err(path, format!("{name:?} is not a valid environment variable name"));
        }
        match (self.env)(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => err(path, format!("environment variable {name} is not set (list it in vm_config.environment_variables.host_env_keys)")),
        }
    }

    /// A credential from the environment: printable, no whitespace (it goes into a header or a
    /// JSON body).
    fn token(&self, path: &str, name: &str) -> Result<Secret, ConfigError> {
        let v = self.env(path, name)?;
        if v.len() > 4096 || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return err(path, format!("{name} has whitespace, control or non-ASCII characters, or is too long"));
        }
        Ok(Secret::text(&v))
    }

    /// Resolve a secret reference to a slot, registering the fields it needs.
    fn slot(&mut self, path: &str, r: &RawSecretRef, fields: &[&str]) -> Result<usize, ConfigError> {
        let Some(&store) = self.store_index.get(&r.store) else {
            return err(format!("{path}.store"), format!("unknown store {:?}", r.store));
        };
        if !valid_store_path(&r.path) {
            return err(format!("{path}.path"), format!("{:?} is not a valid store path ([A-Za-z0-9_.-] segments separated by '/')", r.path));
        }
        for f in fields {
            if f.is_empty() || f.len() > 256 || f.chars().any(char::is_control) {
                return err(format!("{path}.field"), format!("{f:?} is not a valid field name"));
            }
        }
        let i = match self.slots.iter().position(|s| s.store == store && s.path == r.path) {
            Some(i) => i,
            None => {
                self.slots.push(Slot { store, path: r.path.clone(), fields: Vec::new(), whole: false });
                self.slots.len() - 1
            }
        };
        if let Some(slot) = self.slots.get_mut(i) {
            for f in fields {
                if !slot.fields.iter().any(|x| x == f) {
                    slot.fields.push((*f).to_string());
                }
            }
        }
        Ok(i)
    }
}

/// Does any target read the secret at (store, path)? A key set's secret must not hold vendor keys.
fn targets_share(raw: &RawConfig, store: &str, path: &str) -> bool {
    raw.targets.values().any(|t| t.secret.store == store && t.secret.path == path)
}

/// Parse and compile a configuration document. `env` looks up environment variables (the
/// filter passes the process environment, tests pass a map).
pub fn compile(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    // A strict pass first: duplicate keys anywhere are an error (serde would keep the last one).
    if let Err(e) = json::parse(bytes) {
        return err("", format!("not valid JSON: {e}"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut raw: RawConfig = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            return err(path, e.into_inner().to_string());
        }
    };

    if raw.audience.is_empty() || raw.audience.chars().any(char::is_control) {
        return err("audience", "must be a non-empty string");
    }
    let (iss, issuing) = match raw.issuer.take() {
        None => (None, None),
        Some(RawIssuerField::Iss(i)) => (Some(i), None),
        Some(RawIssuerField::Issuing(i)) => (i.iss.clone(), Some(i)),
    };
    if let Some(i) = &iss {
        if i.is_empty() || i.chars().any(char::is_control) {
            return err("issuer", "must not be empty when present");
        }
    }
    if raw.clock_skew_s > 600 {
        return err("clock_skew_s", "must be at most 600");
    }
    if raw.max_token_lifetime_s == 0 {
        return err("max_token_lifetime_s", "must be at least 1");
    }

    let mut c = Compiler { env, slots: Vec::new(), store_index: crate::Map::default() };

    let mut stores = Vec::new();
    for (name, s) in &raw.stores {
        let path = format!("stores.{name}");
        if !valid_target_name(name) {
            return err(path, "store names are 1-64 of [A-Za-z0-9_.-]");
        }
        let (cluster, authority, timeout_ms, kind) = match s {
            RawStore::VaultKv2 { cluster, authority, mount, token_env, approle, namespace, timeout_ms } => {
                let namespace = match namespace.as_deref().map(|n| n.trim_matches('/')) {
                    None => None,
                    Some(n) if valid_store_path(n) => Some(n.to_string()),
                    Some(n) => return err(format!("{path}.namespace"), format!("{n:?} is not a valid namespace path")),
                };
                if !valid_store_path(mount) {
                    return err(format!("{path}.mount"), format!("{mount:?} is not a valid mount path"));
                }
                let auth = match (token_env, approle) {
                    (Some(var), None) => VaultAuth::Token(c.token(&format!("{path}.token_env"), var)?),
                    (None, Some(a)) => {
                        let mount = a.mount.trim_matches('/');
                        if !valid_store_path(mount) {
                            return err(format!("{path}.approle.mount"), format!("{:?} is not a valid mount path", a.mount));
                        }
                        VaultAuth::AppRole {
                            mount: mount.to_string(),
                            role_id: c.token(&format!("{path}.approle.role_id_env"), &a.role_id_env)?,
                            secret_id: c.token(&format!("{path}.approle.secret_id_env"), &a.secret_id_env)?,
                        }
                    }
                    (Some(_), Some(_)) => return err(path, "set token_env or approle, not both"),
                    (None, None) => return err(path, "a vault_kv2 store needs token_env or approle"),
                };
                (cluster, authority, *timeout_ms, StoreKind::VaultKv2 { mount: mount.clone(), auth, namespace })
            }
            RawStore::AwsSecretsManager { cluster, authority, timeout_ms } => (cluster, authority, *timeout_ms, StoreKind::AwsSecretsManager),
        };
        if cluster.is_empty() || cluster.chars().any(|ch| ch.is_control() || ch == ' ') {
            return err(format!("{path}.cluster"), "must name an Envoy cluster");
        }
        if !valid_authority(authority) {
            return err(format!("{path}.authority"), format!("{authority:?} is not a valid host name"));
        }
        if timeout_ms == 0 || timeout_ms > 60_000 {
            return err(format!("{path}.timeout_ms"), "must be between 1 and 60000");
        }
        c.store_index.insert(name.clone(), stores.len());
        stores.push(Store { name: name.clone(), cluster: cluster.clone(), authority: authority.clone(), timeout_ms, kind, scope: String::new() });
    }

    if raw.signing_keys.is_empty() && raw.signing_keyset.is_none() {
        return err("signing_keys", "at least one signing key (or a signing_keyset) is required");
    }
    let mut keys = Vec::new();
    let mut key_index = crate::Map::default();
    for (kid, k) in &raw.signing_keys {
        let path = format!("signing_keys.{kid}");
        if kid.is_empty() || kid.len() > 128 || kid.chars().any(char::is_control) {
            return err(path, "a kid is 1-128 printable characters");
        }
        let source = match (&k.env, &k.secret) {
            (Some(var), None) => {
                let value = c.env(&format!("{path}.env"), var)?;
                let Some(bytes) = b64::key_decode(&value) else {
                    return err(format!("{path}.env"), format!("{var} is not base64"));
                };
                KeySource::Ready(HmacKey::new(&bytes).or_else(|e| err(format!("{path}.env"), e))?)
            }
            (None, Some(r)) => {
                let Some(field) = r.field.clone() else {
                    return err(format!("{path}.secret.field"), "a signing key held in a store needs a field");
                };
                let slot = c.slot(&format!("{path}.secret"), r, &[field.as_str()])?;
                KeySource::Stored { slot, field }
            }
            _ => return err(path, "give exactly one of env or secret"),
        };
        key_index.insert(kid.clone(), keys.len());
        keys.push(SigningKey { kid: kid.clone(), source });
    }

    let keyset = match &raw.signing_keyset {
        None => None,
        Some(k) => {
            let r = RawSecretRef { store: k.store.clone(), path: k.path.clone(), field: None };
            let slot = c.slot("signing_keyset", &r, &[])?;
            if c.slots.get(slot).is_some_and(|s| !s.fields.is_empty()) || targets_share(&raw, &k.store, &k.path) {
                return err("signing_keyset.path", "a signing key set needs a secret of its own");
            }
            if let Some(s) = c.slots.get_mut(slot) {
                s.whole = true;
            }
            Some(slot)
        }
    };

    if raw.cache.ttl_s == 0 {
        return err("cache.ttl_s", "must be at least 1");
    }
    let cache = CacheSettings { ttl_s: raw.cache.ttl_s, stale_if_error_s: raw.cache.stale_if_error_s };

    let revocation = match &raw.revocation {
        None => None,
        Some(r) => {
            let Some(&store) = c.store_index.get(&r.store) else {
                return err("revocation.store", format!("unknown store {:?}", r.store));
            };
            if !valid_store_path(&r.path) {
                return err("revocation.path", format!("{:?} is not a valid store path", r.path));
            }
            if r.refresh_s == 0 || r.refresh_s > 3600 {
                return err("revocation.refresh_s", "must be between 1 and 3600");
            }
            // Default: five minutes, and never less than three refresh periods.
            let max_stale_s = r.max_stale_s.unwrap_or_else(|| DEFAULT_MAX_STALE_S.max(r.refresh_s.saturating_mul(3)));
            if max_stale_s < r.refresh_s.saturating_mul(2) || max_stale_s > 86_400 {
                return err("revocation.max_stale_s", "must be at least twice refresh_s and at most 86400");
            }
            Some(Revocation { store, path: r.path.clone(), refresh_s: r.refresh_s, max_stale_s })
        }
    };

    if raw.targets.is_empty() {
        return err("targets", "at least one target is required");
    }
    let mut targets = Vec::new();
    let mut target_index = crate::Map::default();
    for (name, t) in &raw.targets {
        let path = format!("targets.{name}");
        if !valid_target_name(name) {
            return err(path, "target names are 1-64 of [A-Za-z0-9_.-]");
        }
        let credential = parse_credential(&format!("{path}.credential"), &t.credential)?;
        let need_field = |what: &str| -> Result<String, ConfigError> {
            match &t.secret.field {
                Some(f) => Ok(f.clone()),
                None => err(format!("{path}.secret.field"), format!("inject type {what} needs the secret's field")),
            }
        };
        let inject = match &t.inject {
            RawInject::Bearer {} => Inject::Bearer { field: need_field("bearer")? },
            RawInject::Basic { username_field, password_field } => {
                if t.secret.field.is_some() {
                    return err(format!("{path}.secret.field"), "inject type basic takes username_field and password_field instead");
                }
                Inject::Basic { username_field: username_field.clone(), password_field: password_field.clone() }
            }
            RawInject::Header { name: h, prefix } => {
                let h = h.to_ascii_lowercase();
                if !valid_header_name(&h) || RESERVED_HEADERS.contains(&h.as_str()) {
                    return err(format!("{path}.inject.name"), format!("{h:?} cannot be used for injection"));
                }
                let prefix = prefix.clone().unwrap_or_default();
                if prefix.len() > 64 || !prefix.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                    return err(format!("{path}.inject.prefix"), "must be at most 64 printable ASCII characters");
                }
                Inject::Header { name: h, prefix, field: need_field("header")? }
            }
            RawInject::Query { name: q } => {
                if !valid_query_name(q) {
                    return err(format!("{path}.inject.name"), format!("{q:?} is not a valid query parameter name"));
                }
                Inject::Query { name: q.clone(), field: need_field("query")? }
            }
        };
        let fields: Vec<&str> = match &inject {
            Inject::Bearer { field } | Inject::Header { field, .. } | Inject::Query { field, .. } => vec![field.as_str()],
            Inject::Basic { username_field, password_field } => vec![username_field.as_str(), password_field.as_str()],
        };
        let slot = c.slot(&format!("{path}.secret"), &t.secret, &fields)?;
        // A vendor must never receive Keyward's own secrets: the secret that holds a signing key,
        // the key set, or the revocation list is no target's.
        let signing = keys.iter().find(|k| matches!(k.source, KeySource::Stored { slot: s, .. } if s == slot)).map(|k| format!("signing_keys.{}", k.kid));
        let shared = signing.or_else(|| (keyset == Some(slot)).then(|| "signing_keyset".to_string())).or_else(|| {
            revocation.as_ref().filter(|r| c.store_index.get(&t.secret.store) == Some(&r.store) && r.path == t.secret.path).map(|_| "revocation".to_string())
        });
        if let Some(what) = shared {
            return err(format!("{path}.secret"), format!("the secret of {what}: a vendor would receive it"));
        }
        let allow = match &t.allow {
            None => None,
            Some(rules) => {
                let mut out = Vec::with_capacity(rules.len());
                for (i, r) in rules.iter().enumerate() {
                    out.push(RouteRule::parse(r).or_else(|e| err(format!("{path}.allow[{i}]"), e))?);
                }
                Some(out)
            }
        };
        let mut require_idempotency_key = Vec::new();
        for (i, m) in t.require_idempotency_key.iter().enumerate() {
            match Method::parse(m) {
                Ok(Method::Exact(m)) => require_idempotency_key.push(m),
                _ => return err(format!("{path}.require_idempotency_key[{i}]"), format!("{m:?} is not an upper-case method name")),
            }
        }
        let cost = match &t.cost {
            None => None,
            Some(raw) => Some(crate::policy::cost::compile(&format!("{path}.cost"), raw).or_else(|(p, m)| err(p, m))?),
        };
        if cost.is_none() && !t.refund_on.is_empty() {
            return err(format!("{path}.refund_on"), "a target without a cost has nothing to refund");
        }
        let refund_on = crate::policy::cost::compile_refunds(&path, &t.refund_on).or_else(|(p, m)| err(p, m))?;
        target_index.insert(name.clone(), targets.len());
        targets.push(Target { name: name.clone(), credential, slot, inject, allow, require_idempotency_key, cost, refund_on });
    }

    let policy =
        Policy { audience: raw.audience, issuer: iss, clock_skew_s: i64::from(raw.clock_skew_s), max_token_lifetime_s: i64::from(raw.max_token_lifetime_s) };
    let scope = crate::credential::jwt::keys_scope(keys.iter().filter_map(|k| match &k.source {
        KeySource::Ready(h) => Some(h.id()),
        KeySource::Stored { .. } => None,
    }));
    let mut stores = stores;
    for st in &mut stores {
        if matches!(st.kind, StoreKind::AwsSecretsManager) {
            st.scope.clone_from(&scope);
        }
    }
    let issuer = match &issuing {
        None => None,
        Some(i) => {
            let max_life = u32::try_from(policy.max_token_lifetime_s).unwrap_or(u32::MAX);
            let issuer = crate::issue::settings::compile(i, &|kid| key_index.contains_key(kid), max_life);
            Some(issuer.map_err(|e| ConfigError { path: e.path, message: e.message })?)
        }
    };
    let ledger = match &raw.ledger {
        None => None,
        Some(l) => {
            let mut l = crate::ledger::config::compile(l, &valid_authority, &|t| target_index.contains_key(t)).or_else(|(p, m)| err(p, m))?;
            l.scope.clone_from(&scope);
            Some(l)
        }
    };
    Ok(Config {
        policy,
        keys,
        key_index,
        keyset,
        stores,
        slots: c.slots,
        cache,
        revocation,
        decision_headers: raw.decision_headers,
        issuer,
        ledger,
        targets,
        target_index,
    })
}

#[cfg(test)]
mod tests;
