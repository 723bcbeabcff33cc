//! Stage two of the configuration: the compiled form every request reads.

use super::*;

#[derive(Debug)]
pub struct Config {
    pub policy: Policy,
    pub keys: Vec<SigningKey>,
    pub(super) key_index: crate::Map<String, usize>,
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
    pub(super) target_index: crate::Map<String, usize>,
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
