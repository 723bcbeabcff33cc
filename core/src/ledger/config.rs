//! The `ledger` section of the filter configuration:
//! `{"type": "dynamodb", "cluster": "...", "authority": "dynamodb.<region>.amazonaws.com",
//!   "table": "...", "timeout_ms": N, "lease_s": N, "budgets": [...]}`.
//! The cluster signs the gateway's calls (Envoy's `aws_request_signing`): no AWS secret here.

use super::budget::{Budget, Match, Window};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum RawLedger {
    #[serde(rename = "dynamodb")]
    DynamoDb {
        cluster: String,
        authority: String,
        table: String,
        #[serde(default = "default_timeout")]
        timeout_ms: u32,
        #[serde(default = "default_lease")]
        lease_s: u32,
        #[serde(default)]
        budgets: Vec<RawBudget>,
    },
}

fn default_timeout() -> u32 {
    1000
}
fn default_lease() -> u32 {
    DEFAULT_LEASE_S
}

/// How long a gateway may hold a slice before it gives back what it did not use.
pub const DEFAULT_LEASE_S: u32 = 60;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    name: String,
    #[serde(rename = "match")]
    matcher: String,
    #[serde(default)]
    spend: Option<u64>,
    #[serde(default)]
    requests: Option<u64>,
    window: String,
    #[serde(default)]
    targets: Option<Vec<String>>,
}

/// The compiled ledger settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pub cluster: String,
    pub authority: String,
    pub table: String,
    pub timeout_ms: u32,
    pub lease_s: u32,
    pub budgets: Vec<Budget>,
    /// A fingerprint of the configuration's signing keys (`credential::jwt::keys_scope`), in the
    /// shared-data names of this ledger's slices: another module in the same VM cannot predict them.
    pub scope: String,
}

fn valid_table(t: &str) -> bool {
    (3..=255).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Compile `ledger` (errors name their path). `valid_authority` and `target_exists` come from the
/// configuration around it.
pub fn compile(raw: &RawLedger, valid_authority: &dyn Fn(&str) -> bool, target_exists: &dyn Fn(&str) -> bool) -> Result<Ledger, (String, String)> {
    let e = |p: &str, m: &str| Err((format!("ledger{p}"), m.to_string()));
    let RawLedger::DynamoDb { cluster, authority, table, timeout_ms, lease_s, budgets } = raw;
    if cluster.is_empty() || cluster.chars().any(|c| c.is_control() || c == ' ') {
        return e(".cluster", "must name an Envoy cluster");
    }
    if !valid_authority(authority) {
        return e(".authority", "must be a host name, e.g. dynamodb.us-east-1.amazonaws.com");
    }
    if !valid_table(table) {
        return e(".table", "must be a DynamoDB table name: 3 to 255 of [A-Za-z0-9_.-]");
    }
    if *timeout_ms == 0 || *timeout_ms > 60_000 {
        return e(".timeout_ms", "must be between 1 and 60000");
    }
    if !(1..=3600).contains(lease_s) {
        return e(".lease_s", "must be between 1 and 3600");
    }
    let mut out: Vec<Budget> = Vec::with_capacity(budgets.len());
    for (i, b) in budgets.iter().enumerate() {
        let at = format!(".budgets[{i}]");
        if !crate::policy::rules::valid_target_name(&b.name) || out.iter().any(|o| o.name == b.name) {
            return e(&format!("{at}.name"), "must be a unique name of 1-64 [A-Za-z0-9_.-]");
        }
        let Some(matcher) = Match::parse(&b.matcher) else {
            return e(&format!("{at}.match"), "must be sub:<subject> or sub:<prefix>*");
        };
        if b.spend.is_none() && b.requests.is_none() {
            return e(&at, "set spend, requests or both");
        }
        if b.spend.is_some_and(|s| s > crate::policy::cost::MAX_COST) || b.requests == Some(0) {
            return e(&at, "spend is at most 10^15 and requests at least 1");
        }
        let window = match b.window.as_str() {
            "day" => Window::Day,
            "month" => Window::Month,
            _ => return e(&format!("{at}.window"), "must be day or month (UTC)"),
        };
        if let Some(ts) = &b.targets {
            if ts.is_empty() {
                return e(&format!("{at}.targets"), "leave it out to count every target");
            }
            if let Some((j, t)) = ts.iter().enumerate().find(|(_, t)| !target_exists(t)) {
                return e(&format!("{at}.targets[{j}]"), &format!("unknown target {t:?}"));
            }
        }
        out.push(Budget { name: b.name.clone(), matcher, spend: b.spend, requests: b.requests, window, targets: b.targets.clone() });
    }
    Ok(Ledger {
        cluster: cluster.clone(),
        authority: authority.clone(),
        table: table.clone(),
        timeout_ms: *timeout_ms,
        lease_s: *lease_s,
        budgets: out,
        scope: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: serde_json::Value) -> Result<Ledger, (String, String)> {
        let raw: RawLedger = serde_json::from_value(v).map_err(|e| (String::new(), e.to_string()))?;
        compile(&raw, &|a| !a.is_empty() && !a.contains(' '), &|t| t == "stripe")
    }

    #[test]
    fn compiles_and_names_the_path_of_errors() {
        let ok = serde_json::json!({"type": "dynamodb", "cluster": "dynamodb", "authority": "dynamodb.us-east-1.amazonaws.com", "table": "keyward-ledger",
            "budgets": [{"name": "checkout", "match": "sub:lambda/checkout*", "spend": 50000, "window": "month", "targets": ["stripe"]}]});
        let l = c(ok.clone()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((l.timeout_ms, l.lease_s, l.budgets.len()), (1000, DEFAULT_LEASE_S, 1));
        for (patch, at) in [
            (serde_json::json!({"table": "x"}), "ledger.table"),
            (serde_json::json!({"timeout_ms": 0}), "ledger.timeout_ms"),
            (serde_json::json!({"lease_s": 0}), "ledger.lease_s"),
            (serde_json::json!({"cluster": ""}), "ledger.cluster"),
            (serde_json::json!({"budgets": [{"name": "a", "match": "lambda/x", "spend": 1, "window": "month"}]}), "ledger.budgets[0].match"),
            (serde_json::json!({"budgets": [{"name": "a", "match": "sub:x", "window": "month"}]}), "ledger.budgets[0]"),
            (serde_json::json!({"budgets": [{"name": "a", "match": "sub:x", "spend": 1, "window": "week"}]}), "ledger.budgets[0].window"),
            (
                serde_json::json!({"budgets": [{"name": "a", "match": "sub:x", "spend": 1, "window": "day", "targets": ["paypal"]}]}),
                "ledger.budgets[0].targets[0]",
            ),
            (
                serde_json::json!({"budgets": [{"name": "a", "match": "sub:x", "spend": 1, "window": "day"}, {"name": "a", "match": "sub:y", "spend": 1, "window": "day"}]}),
                "ledger.budgets[1].name",
            ),
        ] {
            let mut v = ok.clone();
            for (k, x) in patch.as_object().into_iter().flatten() {
                v[k] = x.clone();
            }
            assert_eq!(c(v).err().map(|e| e.0), Some(at.to_string()), "{patch}");
        }
        let mut v = ok;
        v["colour"] = serde_json::json!(1);
        assert!(c(v).is_err(), "unknown fields are refused");
    }
}
