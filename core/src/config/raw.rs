//! Stage one of the configuration: what the JSON may hold, read by serde with
//! `deny_unknown_fields` (after a strict pass that refuses duplicate keys). Nothing here is
//! checked beyond its shape; `compile` does the rest.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) audience: String,
    /// v1: the `iss` every credential must carry (a string). v2: the issuing endpoint's settings
    /// (an object, whose optional `iss` takes the string's place).
    #[serde(default)]
    pub(super) issuer: Option<RawIssuerField>,
    #[serde(default = "default_skew")]
    pub(super) clock_skew_s: u32,
    #[serde(default = "default_lifetime")]
    pub(super) max_token_lifetime_s: u32,
    #[serde(default)]
    pub(super) signing_keys: BTreeMap<String, RawKey>,
    #[serde(default)]
    pub(super) signing_keyset: Option<RawKeyset>,
    #[serde(default)]
    pub(super) stores: BTreeMap<String, RawStore>,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) revocation: Option<RawRevocation>,
    #[serde(default)]
    pub(super) decision_headers: bool,
    /// The fleet ledger (`ledger::config`): caps, retries and budgets shared by every gateway.
    #[serde(default)]
    pub(super) ledger: Option<crate::ledger::config::RawLedger>,
    pub(super) targets: BTreeMap<String, RawTarget>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawIssuerField {
    Iss(String),
    Issuing(crate::issue::settings::RawIssuer),
}

pub(super) fn default_skew() -> u32 {
    30
}
pub(super) fn default_lifetime() -> u32 {
    86_400
}
pub(super) fn default_timeout() -> u32 {
    2000
}
pub(super) fn default_mount() -> String {
    "secret".into()
}
pub(super) fn default_ttl() -> u32 {
    300
}
pub(super) fn default_refresh() -> u32 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    #[serde(default)]
    pub(super) env: Option<String>,
    #[serde(default)]
    pub(super) secret: Option<RawSecretRef>,
}

/// A secret whose every field is a signing key, named by its kid.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeyset {
    pub(super) store: String,
    pub(super) path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecretRef {
    pub(super) store: String,
    pub(super) path: String,
    #[serde(default)]
    pub(super) field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAppRole {
    #[serde(default = "default_approle_mount")]
    pub(super) mount: String,
    pub(super) role_id_env: String,
    pub(super) secret_id_env: String,
}

pub(super) fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub(super) enum RawStore {
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
pub(super) struct RawCache {
    #[serde(default = "default_ttl")]
    pub(super) ttl_s: u32,
    #[serde(default)]
    pub(super) stale_if_error_s: u32,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache { ttl_s: default_ttl(), stale_if_error_s: 0 }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRevocation {
    pub(super) store: String,
    pub(super) path: String,
    #[serde(default = "default_refresh")]
    pub(super) refresh_s: u32,
    /// How old the list in force may grow while refreshes fail before requests are refused.
    #[serde(default)]
    pub(super) max_stale_s: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) credential: String,
    pub(super) secret: RawSecretRef,
    pub(super) inject: RawInject,
    #[serde(default)]
    pub(super) allow: Option<Vec<String>>,
    #[serde(default)]
    pub(super) require_idempotency_key: Vec<String>,
    #[serde(default)]
    pub(super) cost: Option<crate::policy::cost::RawCost>,
    #[serde(default)]
    pub(super) refund_on: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub(super) enum RawInject {
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
