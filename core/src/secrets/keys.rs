//! Every name Keyward uses in Envoy shared data, built in one place.
//!
//! Shared data is per `vm_id`, and one Envoy can run several keyward configurations (listeners,
//! routes, tenants) in one VM. A name therefore carries the full identity of what it holds, never
//! a configuration's local name: for a secret, the store's kind, cluster, authority, mount,
//! namespace and a fingerprint of the credential Keyward reads it with, then the path. Two
//! configurations share an entry only if they would fetch the very same document with the very
//! same rights. Each part is length-prefixed, so no choice of names makes two identities collide.
//! A credential's limit counters carry the identity of the key that verified it
//! (`crate::credential::jwt::HmacKey::id`).

use crate::config::{Store, StoreKind, VaultAuth};
use crate::policy::limits::SHARDS;
use crate::secret::Secret;
use sha2::{Digest, Sha256};
use std::fmt::Write;

/// The version of every layout below: bumped when a record's encoding or a name changes, so an
/// Envoy hot restart never reads another version's records.
const PREFIX: &str = "keyward/v3";

fn part(out: &mut String, s: &str) {
    let _ = write!(out, "{}:{s}/", s.len());
}

/// A short, non-reversible fingerprint of a credential (names must not carry secrets).
fn fingerprint(label: &str, s: &Secret) -> String {
    let mut h = Sha256::new();
    h.update(b"keyward/v1/fingerprint\0");
    h.update(label.as_bytes());
    h.update([0]);
    h.update(s.expose());
    h.finalize().iter().take(8).fold(String::with_capacity(16), |mut acc, b| {
        let _ = write!(acc, "{b:02x}");
        acc
    })
}

/// The identity of a store as Keyward reaches it.
pub fn store_identity(st: &Store) -> String {
    let mut out = String::new();
    match &st.kind {
        StoreKind::VaultKv2 { mount, auth, namespace } => {
            part(&mut out, "vault-kv2");
            part(&mut out, &st.cluster);
            part(&mut out, &st.authority);
            part(&mut out, mount);
            part(&mut out, namespace.as_deref().unwrap_or(""));
            match auth {
                VaultAuth::Token(t) => part(&mut out, &format!("token:{}", fingerprint("token", t))),
                VaultAuth::AppRole { mount, role_id, secret_id } => {
                    part(&mut out, &format!("approle:{mount}:{}:{}", fingerprint("role", role_id), fingerprint("secret-id", secret_id)))
                }
            }
        }
        StoreKind::AwsSecretsManager => {
            // Envoy signs the request for the cluster: the cluster and authority are the identity.
            part(&mut out, "aws-sm");
            part(&mut out, &st.cluster);
            part(&mut out, &st.authority);
            part(&mut out, &st.scope);
        }
    }
    out
}

/// The shared record of the secret at `path` in `st` (`secrets::slot_state::SlotState`).
pub fn secret(st: &Store, path: &str) -> String {
    format!("{PREFIX}/secret/{}{path}", store_identity(st))
}

/// The shared revocation list read from `path` in `st`.
pub fn revocation(st: &Store, path: &str) -> String {
    format!("{PREFIX}/revocation/{}{path}", store_identity(st))
}

/// When that list was last confirmed current (its version, and the time), without reading it.
pub fn revocation_checked(st: &Store, path: &str) -> String {
    format!("{PREFIX}/revocation-checked/{}{path}", store_identity(st))
}

/// The lease of that list's refresh (one worker refreshes it at a time).
pub fn revocation_lease(st: &Store, path: &str) -> String {
    format!("{PREFIX}/revocation-lease/{}{path}", store_identity(st))
}

/// The shared Vault session of an AppRole store (`secrets::approle::SessionState`); `None` for
/// stores that need none.
pub fn session(st: &Store) -> Option<String> {
    match &st.kind {
        StoreKind::VaultKv2 { auth: VaultAuth::AppRole { .. }, .. } => Some(format!("{PREFIX}/session/{}", store_identity(st))),
        _ => None,
    }
}

/// Every limit shard's name (they are created at configure time).
pub fn limit_shards() -> impl Iterator<Item = String> {
    (0..SHARDS).map(|i| format!("{PREFIX}/limits/{i:02}"))
}

/// A credential's entry in the limit tables: the verifying key's identity and its `jti`. A
/// credential with the same `jti` signed by another configuration's key is another credential.
pub fn limit_entry(key_id: u64, jti: &str) -> String {
    format!("{key_id:016x}.{jti}")
}

/// The shard that holds `entry` (FNV-1a: cheap and the same in every worker).
pub fn limit_shard(entry: &str) -> String {
    format!("{PREFIX}/limits/{:02}", crate::wire::fnv1a(entry.bytes()) % u64::from(SHARDS))
}

/// A fleet ledger's identity as Keyward reaches it: its cluster, authority and table, and the
/// configuration's key scope (another module sharing the VM cannot predict the names).
fn ledger_identity(l: &crate::ledger::Ledger) -> String {
    let mut out = String::new();
    part(&mut out, "dynamodb");
    part(&mut out, &l.cluster);
    part(&mut out, &l.authority);
    part(&mut out, &l.table);
    part(&mut out, &l.scope);
    out
}

/// This gateway's slice of a ledger account (`ledger::slice::Slice`).
pub fn ledger_slice(l: &crate::ledger::Ledger, pk: &str) -> String {
    format!("{PREFIX}/ledger-slice/{}{pk}", ledger_identity(l))
}

/// The accounts this gateway holds a lease in, for the drain.
pub fn ledger_leases(l: &crate::ledger::Ledger) -> String {
    format!("{PREFIX}/ledger-leases/{}", ledger_identity(l))
}

/// This Envoy's id in every ledger (one per process, shared by its workers).
pub const GATEWAY_ID: &str = "keyward/v3/gateway-id";

/// This Envoy's id in one ledger configuration: two configurations in one VM (two listeners, or
/// the old and the new one during an update) are two gateways, each with its own leases.
pub fn gateway_id(l: &crate::ledger::Ledger) -> String {
    format!("{GATEWAY_ID}/{}", ledger_identity(l))
}

/// A counter that gives each worker's lifecycle its own number for ledger jobs.
pub const LEDGER_WORKERS: &str = "keyward/v3/ledger-workers";

/// The registry that hands each worker's root context its own wake-up queue name.
pub const WORKER_SEQUENCE: &str = "keyward/v3/worker-sequence";

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(cluster: &str, mount: &str, ns: Option<&str>, token: &str) -> Store {
        Store {
            name: "bao".into(),
            cluster: cluster.into(),
            authority: "bao.internal".into(),
            timeout_ms: 1000,
            kind: StoreKind::VaultKv2 { mount: mount.into(), auth: VaultAuth::Token(Secret::text(token)), namespace: ns.map(str::to_string) },
            scope: String::new(),
        }
    }

    #[test]
    fn the_same_local_name_in_two_configurations_names_two_records() {
        let a = secret(&vault("bao", "kv", None, "t1"), "stripe");
        assert_ne!(a, secret(&vault("bao", "kv-b", None, "t1"), "stripe"), "mount");
        assert_ne!(a, secret(&vault("bao2", "kv", None, "t1"), "stripe"), "cluster");
        assert_ne!(a, secret(&vault("bao", "kv", Some("team-b"), "t1"), "stripe"), "namespace");
        assert_ne!(a, secret(&vault("bao", "kv", None, "t2"), "stripe"), "the token that reads it");
        let approle = |secret_id: &str| {
            let mut s = vault("bao", "kv", None, "t1");
            s.kind = StoreKind::VaultKv2 {
                mount: "kv".into(),
                auth: VaultAuth::AppRole { mount: "approle".into(), role_id: Secret::text("r"), secret_id: Secret::text(secret_id) },
                namespace: None,
            };
            s
        };
        assert_ne!(session(&approle("s1")), session(&approle("s2")), "a wrong secret_id never borrows the right one's session");
        assert_eq!(a, secret(&vault("bao", "kv", None, "t1"), "stripe"), "the very same document");
        assert_ne!(revocation(&vault("bao", "kv", None, "t1"), "r"), revocation(&vault("bao", "kv-b", None, "t1"), "r"));
    }

    #[test]
    fn names_never_carry_the_credential() {
        let k = secret(&vault("bao", "kv", None, "s.super-secret-token"), "stripe");
        assert!(!k.contains("super-secret"), "{k}");
    }

    #[test]
    fn length_prefixes_keep_identities_apart() {
        // "a/" + "b" and "a" + "/b" would concatenate alike without the lengths.
        assert_ne!(secret(&vault("a/", "b", None, "t"), "p"), secret(&vault("a", "/b", None, "t"), "p"));
    }

    #[test]
    fn ledger_slices_are_named_by_the_configurations_keys() {
        let l = |scope: &str| crate::ledger::Ledger {
            cluster: "ledger".into(),
            authority: "dynamodb.us-east-1.amazonaws.com".into(),
            table: "t".into(),
            timeout_ms: 1000,
            lease_s: 60,
            budgets: vec![],
            scope: scope.into(),
        };
        assert_ne!(ledger_slice(&l("k1"), "c/1/j"), ledger_slice(&l("k2"), "c/1/j"));
        assert_ne!(ledger_leases(&l("k1")), ledger_leases(&l("k2")));
        assert_eq!(ledger_slice(&l("k1"), "c/1/j"), ledger_slice(&l("k1"), "c/1/j"));
    }

    #[test]
    fn limit_entries_are_scoped_by_key() {
        assert_ne!(limit_entry(1, "j"), limit_entry(2, "j"));
        let shards: Vec<String> = limit_shards().collect();
        assert_eq!(shards.len(), SHARDS as usize);
        let used: std::collections::HashSet<String> = (0..1000).map(|i| limit_shard(&limit_entry(7, &format!("jti-{i}")))).collect();
        assert!(used.iter().all(|s| shards.contains(s)));
        assert!(used.len() >= 30, "1000 credentials spread over most shards: {}", used.len());
    }
}
