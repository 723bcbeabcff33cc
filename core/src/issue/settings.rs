//! The `issuer` section of the configuration (stage one: the raw document; stage two: checked
//! settings). Errors name the offending path, as the rest of the configuration does.

use super::identity::{principal, StsSettings};
use crate::credential::jwt::MAX_ID_LEN;
use crate::policy::limits::Limits;
use crate::policy::rules::TokenRule;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// A credential the endpoint issues lives at most this long unless `max_ttl_s` says less.
pub const DEFAULT_MAX_TTL_S: u32 = 900;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    /// The `iss` credentials must carry, and issued credentials do carry.
    #[serde(default)]
    pub iss: Option<String>,
    kid: String,
    #[serde(default)]
    max_ttl_s: Option<u32>,
    #[serde(default)]
    aws_iam: Option<RawAwsIam>,
    #[serde(default)]
    attenuate: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAwsIam {
    cluster: String,
    authority: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
    server_id: String,
    roles: BTreeMap<String, RawRole>,
}

fn default_timeout() -> u32 {
    2000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    sub: String,
    allow: Vec<String>,
    #[serde(default)]
    lim: Option<RawLim>,
    #[serde(default)]
    ttl_s: Option<u32>,
}

/// `{"rpm", "total", "spend"}` as a role entry or a grant writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLim {
    #[serde(default)]
    pub(super) rpm: Option<u64>,
    #[serde(default)]
    pub(super) total: Option<u64>,
    #[serde(default)]
    pub(super) spend: Option<u64>,
}

impl RawLim {
    /// The limits, or the first that is out of range (`rpm` and `total` positive, `spend` at most
    /// `cost::MAX_COST`).
    pub(super) fn limits(&self) -> Result<Limits, &'static str> {
        for (name, v) in [("rpm", self.rpm), ("total", self.total)] {
            if v == Some(0) {
                return Err(name);
            }
        }
        if self.spend.is_some_and(|s| s > crate::policy::cost::MAX_COST) {
            return Err("spend");
        }
        Ok(Limits { rpm: self.rpm, total: self.total, spend: self.spend })
    }
}

/// What one IAM principal may be issued: a ceiling the request can only narrow.
#[derive(Debug, Clone)]
pub struct RoleGrant {
    pub sub: String,
    pub allow: Vec<TokenRule>,
    /// The rules as written (what an issued credential carries when the request names none).
    pub allow_text: Vec<String>,
    pub lim: Limits,
    pub ttl_s: u32,
}

#[derive(Debug, Clone)]
pub struct AwsIam {
    pub sts: StsSettings,
    /// By principal ARN (`arn:aws:iam::<acct>:role/<name>` or `…:user/<name>`).
    pub roles: HashMap<String, RoleGrant>,
}

#[derive(Debug, Clone)]
pub struct Issuer {
    /// The signing key's `kid` (one of `signing_keys`).
    pub kid: String,
    pub max_ttl_s: u32,
    pub aws_iam: Option<AwsIam>,
    pub attenuate: bool,
}

/// What is wrong, and where (`issuer.…`); the configuration reports it as its own error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub path: String,
    pub message: String,
}

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, SettingsError> {
    Err(SettingsError { path: path.into(), message: message.into() })
}

fn id_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && !s.chars().any(char::is_control)
}

fn lim(path: &str, l: Option<&RawLim>) -> Result<Limits, SettingsError> {
    let Some(l) = l else { return Ok(Limits::default()) };
    l.limits().or_else(|name| err(format!("{path}.lim.{name}"), if name == "spend" { "must be at most 10^15" } else { "must be positive" }))
}

/// Stage two. `has_kid`: is this kid one of the configuration's signing keys;
/// `max_token_lifetime_s`: the policy's ceiling, which issued credentials must pass.
pub fn compile(raw: &RawIssuer, has_kid: &dyn Fn(&str) -> bool, max_token_lifetime_s: u32) -> Result<Issuer, SettingsError> {
    if !has_kid(&raw.kid) {
        return err("issuer.kid", format!("{:?} is not one of signing_keys", raw.kid));
    }
    let max_ttl_s = raw.max_ttl_s.unwrap_or(DEFAULT_MAX_TTL_S.min(max_token_lifetime_s));
    if max_ttl_s == 0 || max_ttl_s > max_token_lifetime_s {
        return err("issuer.max_ttl_s", format!("must be between 1 and max_token_lifetime_s ({max_token_lifetime_s})"));
    }
    let aws_iam = match &raw.aws_iam {
        None => None,
        Some(a) => {
            if a.cluster.is_empty() || a.cluster.chars().any(|c| c.is_control() || c == ' ') {
                return err("issuer.aws_iam.cluster", "must name an Envoy cluster");
            }
            let host_ok = !a.authority.is_empty()
                && a.authority.len() <= 255
                && a.authority.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'));
            if !host_ok {
                return err("issuer.aws_iam.authority", format!("{:?} is not a host name", a.authority));
            }
            if a.timeout_ms == 0 || a.timeout_ms > 60_000 {
                return err("issuer.aws_iam.timeout_ms", "must be between 1 and 60000");
            }
            if a.server_id.is_empty() || a.server_id.len() > 128 || !a.server_id.bytes().all(|c| c.is_ascii_graphic()) {
                return err("issuer.aws_iam.server_id", "must be 1 to 128 visible ASCII characters");
            }
            if a.roles.is_empty() {
                return err("issuer.aws_iam.roles", "at least one role is required");
            }
            let mut roles = HashMap::new();
            for (arn, r) in &a.roles {
                let path = format!("issuer.aws_iam.roles.{arn}");
                if principal(arn).as_deref() != Some(arn.as_str()) || arn.contains(":sts:") {
                    return err(path, "must be an IAM role or user ARN (arn:aws:iam::<account>:role/<name>)");
                }
                if arn.split(":role/").nth(1).is_some_and(|n| n.contains('/')) {
                    return err(path, "roles with a path cannot be matched (STS's answer drops the path): name the role without it");
                }
                if !id_ok(&r.sub) {
                    return err(format!("{path}.sub"), "must be 1 to 256 bytes without control characters");
                }
                if r.allow.is_empty() {
                    return err(format!("{path}.allow"), "at least one rule is required");
                }
                let mut allow = Vec::with_capacity(r.allow.len());
                for (i, rule) in r.allow.iter().enumerate() {
                    allow.push(TokenRule::parse(rule).or_else(|e| err(format!("{path}.allow[{i}]"), e))?);
                }
                let ttl_s = r.ttl_s.unwrap_or(max_ttl_s);
                if ttl_s == 0 || ttl_s > max_ttl_s {
                    return err(format!("{path}.ttl_s"), format!("must be between 1 and issuer.max_ttl_s ({max_ttl_s})"));
                }
                roles.insert(arn.clone(), RoleGrant { sub: r.sub.clone(), allow, allow_text: r.allow.clone(), lim: lim(&path, r.lim.as_ref())?, ttl_s });
            }
            let sts = StsSettings { cluster: a.cluster.clone(), authority: a.authority.clone(), timeout_ms: a.timeout_ms, server_id: a.server_id.clone() };
            Some(AwsIam { sts, roles })
        }
    };
    if aws_iam.is_none() && !raw.attenuate {
        return err("issuer", "enable at least one grant (aws_iam, or attenuate: true)");
    }
    Ok(Issuer { kid: raw.kid.clone(), max_ttl_s, aws_iam, attenuate: raw.attenuate })
}
