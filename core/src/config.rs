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
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    audience: String,
    /// v1: the `iss` every credential must carry (a string). v2: the issuing endpoint's settings
    /// (an object, whose optional `iss` takes the string's place).
    #[serde(default)]
    issuer: Option<RawIssuerField>,
    #[serde(default = "default_skew")]
    clock_skew_s: u32,
    #[serde(default = "default_lifetime")]
    max_token_lifetime_s: u32,
    #[serde(default)]
    signing_keys: BTreeMap<String, RawKey>,
    #[serde(default)]
    signing_keyset: Option<RawKeyset>,
    #[serde(default)]
    stores: BTreeMap<String, RawStore>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    revocation: Option<RawRevocation>,
    #[serde(default)]
    decision_headers: bool,
    /// The fleet ledger (`ledger::config`): caps, retries and budgets shared by every gateway.
    #[serde(default)]
    ledger: Option<crate::ledger::config::RawLedger>,
    targets: BTreeMap<String, RawTarget>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawIssuerField {
    Iss(String),
    Issuing(crate::issue::settings::RawIssuer),
}

fn default_skew() -> u32 {
    30
}
fn default_lifetime() -> u32 {
    86_400
}
fn default_timeout() -> u32 {
    2000
}
fn default_mount() -> String {
    "secret".into()
}
fn default_ttl() -> u32 {
    300
}
fn default_refresh() -> u32 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    secret: Option<RawSecretRef>,
}

/// A secret whose every field is a signing key, named by its kid.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyset {
    store: String,
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecretRef {
    store: String,
    path: String,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppRole {
    #[serde(default = "default_approle_mount")]
    mount: String,
    role_id_env: String,
    secret_id_env: String,
}

fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum RawStore {
    #[serde(rename = "vault_kv2")]
    VaultKv2 {
        cluster: String,
        authority: String,
        #[serde(default = "default_mount")]
        mount: String,
        #[serde(default)]
        token_env: Option<String>,
        #[serde(default)]
        approle: Option<RawAppRole>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default = "default_timeout")]
        timeout_ms: u32,
    },
    #[serde(rename = "aws_secrets_manager")]
    AwsSecretsManager {
        cluster: String,
        authority: String,
        #[serde(default = "default_timeout")]
        timeout_ms: u32,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "default_ttl")]
    ttl_s: u32,
    #[serde(default)]
    stale_if_error_s: u32,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache { ttl_s: default_ttl(), stale_if_error_s: 0 }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    store: String,
    path: String,
    #[serde(default = "default_refresh")]
    refresh_s: u32,
    /// How old the list in force may grow while refreshes fail before requests are refused.
    #[serde(default)]
    max_stale_s: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    credential: String,
    secret: RawSecretRef,
    inject: RawInject,
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    require_idempotency_key: Vec<String>,
    #[serde(default)]
    cost: Option<crate::policy::cost::RawCost>,
    #[serde(default)]
    refund_on: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum RawInject {
    #[serde(rename = "bearer")]
    Bearer {},
    #[serde(rename = "basic")]
    Basic { username_field: String, password_field: String },
    #[serde(rename = "header")]
    Header {
        name: String,
        #[serde(default)]
        prefix: Option<String>,
    },
    #[serde(rename = "query")]
    Query { name: String },
}

// ---------------------------------------------------------------- stage two: the compiled form

#[derive(Debug)]
pub struct Config {
    pub policy: Policy,
    pub keys: Vec<SigningKey>,
    key_index: HashMap<String, usize>,
    /// The slot of `signing_keyset`: kids not in `signing_keys` are looked up there.
    pub keyset: Option<usize>,
    pub stores: Vec<Store>,
    pub slots: Vec<Slot>,
    pub cache: CacheSettings,
    pub revocation: Option<Revocation>,
    /// Hand the decision to the filters after Keyward as request headers
    /// (`inject::DECISION_HEADERS`), for Envoy's global rate limit; what a client sent under
    /// those names is removed first.
    pub decision_headers: bool,
    /// The issuing endpoint's settings (`issuer`), when configured.
    pub issuer: Option<crate::issue::settings::Issuer>,
    /// The fleet ledger, when configured: without it, limits and caps hold per Envoy.
    pub ledger: Option<crate::ledger::Ledger>,
    pub targets: Vec<Target>,
    target_index: HashMap<String, usize>,
}

#[derive(Debug)]
pub struct SigningKey {
    pub kid: String,
    pub source: KeySource,
}

#[derive(Debug)]
pub enum KeySource {
    /// From the environment, prepared at configure time.
    Ready(HmacKey),
    /// Held in a store: `slot`'s `field` carries the base64 key.
    Stored { slot: usize, field: String },
}

#[derive(Debug)]
pub struct Store {
    pub name: String,
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u32,
    pub kind: StoreKind,
    /// A fingerprint of the configuration's signing keys from the environment
    /// (`credential::jwt::keys_scope`), for the shared-data names of stores whose identity holds
    /// no secret (AWS Secrets Manager): another module in the same VM cannot predict them. Empty
    /// when the configuration has no such key.
    pub scope: String,
}

/// How Keyward authenticates to a Vault/OpenBao store.
#[derive(Debug)]
pub enum VaultAuth {
    /// A token from the environment (`token_env`), used as is.
    Token(Secret),
    /// AppRole login at `auth/<mount>/login`; the token it returns is renewed and replaced
    /// (see `secrets::approle`).
    AppRole { mount: String, role_id: Secret, secret_id: Secret },
}

#[derive(Debug)]
pub enum StoreKind {
    /// `namespace`: sent as `X-Vault-Namespace` (Vault Enterprise/HCP, OpenBao namespaces).
    VaultKv2 {
        mount: String,
        auth: VaultAuth,
        namespace: Option<String>,
    },
    AwsSecretsManager,
}

/// One secret document in one store, and the fields Keyward needs from it. Targets and signing
/// keys naming the same (store, path) share a slot, so it is fetched and cached once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub store: usize,
    pub path: String,
    pub fields: Vec<String>,
    /// Keep every field (a signing key set), not only `fields`.
    pub whole: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub ttl_s: u32,
    pub stale_if_error_s: u32,
}

#[derive(Debug, Clone)]
pub struct Revocation {
    pub store: usize,
    pub path: String,
    pub refresh_s: u32,
    /// A list older than this (refreshes failing) is not enforced silently: requests that need
    /// the check get 503 until a refresh succeeds.
    pub max_stale_s: u32,
}

/// `revocation.max_stale_s` when the configuration does not say.
pub const DEFAULT_MAX_STALE_S: u32 = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inject {
    Bearer { field: String },
    Basic { username_field: String, password_field: String },
    Header { name: String, prefix: String, field: String },
    Query { name: String, field: String },
}

#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub credential: CredentialSource,
    pub slot: usize,
    pub inject: Inject,
    pub allow: Option<Vec<RouteRule>>,
    /// Methods that must carry an `Idempotency-Key` header.
    pub require_idempotency_key: Vec<String>,
    /// What its requests cost (counted against a credential's `lim.spend`).
    pub cost: Option<Cost>,
    /// Vendor statuses that mean a charge did not happen: the reservation is released.
    pub refund_on: Vec<u16>,
}

impl Config {
    pub fn target(&self, name: &str) -> Option<(usize, &Target)> {
        let i = *self.target_index.get(name)?;
        self.targets.get(i).map(|t| (i, t))
    }
    pub fn key(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.get(*self.key_index.get(kid)?)
    }
    pub fn store_of(&self, slot: usize) -> Option<&Store> {
        self.stores.get(self.slots.get(slot)?.store)
    }

    /// A one-line summary for the startup log: names and counts only, never a secret.
    pub fn summary(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| match k.source {
                KeySource::Ready(_) => format!("{}(env)", k.kid),
                KeySource::Stored { .. } => format!("{}(store)", k.kid),
            })
            .collect();
        let stores: Vec<String> = self
            .stores
            .iter()
            .map(|s| {
                let kind = match s.kind {
                    StoreKind::VaultKv2 { auth: VaultAuth::Token(_), .. } => "vault_kv2",
                    StoreKind::VaultKv2 { auth: VaultAuth::AppRole { .. }, .. } => "vault_kv2+approle",
                    StoreKind::AwsSecretsManager => "aws_secrets_manager",
                };
                format!("{}({kind}@{})", s.name, s.cluster)
            })
            .collect();
        let mut keys = keys;
        if let Some(spec) = self.keyset.and_then(|k| self.slots.get(k)) {
            let store = self.stores.get(spec.store).map_or("?", |s| s.name.as_str());
            keys.push(format!("*(keyset {store}:{})", spec.path));
        }
        let targets: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        format!(
            "audience={} issuer={} keys=[{}] stores=[{}] targets=[{}] cache_ttl_s={} stale_if_error_s={} revocation={}",
            self.policy.audience,
            self.policy.issuer.as_deref().unwrap_or("-"),
            keys.join(","),
            stores.join(","),
            targets.join(","),
            self.cache.ttl_s,
            self.cache.stale_if_error_s,
            match &self.revocation {
                Some(r) => format!("{}s", r.refresh_s),
                None => "off".into(),
            }
        )
    }
}

fn valid_env_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') && !s.as_bytes().first().is_some_and(u8::is_ascii_digit)
}

/// A store path such as `keyward/revoked`: `[A-Za-z0-9_.-]` segments separated by single `/`.
pub fn valid_store_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && seg.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')))
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'))
}

/// Headers that must never be chosen as a credential source or an injection target.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "trailer",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "x-envoy-original-path",
];

fn valid_authority(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']' | b'_'))
}

fn valid_query_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

fn parse_credential(path: &str, s: &str) -> Result<CredentialSource, ConfigError> {
    match s {
        "bearer" => Ok(CredentialSource::Bearer),
        "basic_password" => Ok(CredentialSource::BasicPassword),
        _ => {
            let Some(h) = s.strip_prefix("header:") else {
                return err(path, format!("unknown credential source {s:?} (bearer, basic_password or header:<name>)"));
            };
            let h = h.to_ascii_lowercase();
            if !valid_header_name(&h) || RESERVED_HEADERS.contains(&h.as_str()) {
                return err(path, format!("{h:?} cannot carry the credential"));
            }
            Ok(CredentialSource::Header(h))
        }
    }
}

struct Compiler<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    slots: Vec<Slot>,
    store_index: HashMap<String, usize>,
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

    let mut c = Compiler { env, slots: Vec::new(), store_index: HashMap::new() };

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
    let mut key_index = HashMap::new();
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
    let mut target_index = HashMap::new();
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
