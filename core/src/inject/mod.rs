//! The header and path edits that replace the workload credential with the upstream one.
//! Injection overwrites: every header that could carry a credential is removed first, then
//! exactly one upstream credential is set.

pub mod scrub;

use crate::config::{Inject, Target};
use crate::secret::Secret;
use crate::secrets::store::Fetched;
use crate::wire::b64;
use std::fmt;

/// The decision as request headers for the filters after Keyward (`decision_headers`): subject,
/// jti, target and run label, in that order. Vendors never see them: every route that runs
/// Keyward removes them (`request_headers_to_remove`, checked by `keyward check-envoy`).
pub const DECISION_HEADERS: [&str; 4] = ["x-keyward-subject", "x-keyward-jti", "x-keyward-target", "x-keyward-run"];

/// The operations that hand an allowed request's decision to the next filters: each header
/// removed (a client's copy never survives), then set from the verified credential.
pub fn decision_ops(subject: &str, jti: &str, target: &str, run: Option<&str>) -> Vec<Op> {
    let mut ops: Vec<Op> = DECISION_HEADERS.iter().map(|h| Op::Remove((*h).to_string())).collect();
    for (h, v) in DECISION_HEADERS.iter().zip([Some(subject), Some(jti), Some(target), run]) {
        if let Some(v) = v {
            ops.push(Op::Set((*h).to_string(), Secret::text(v)));
        }
    }
    ops
}

pub enum Op {
    Remove(String),
    /// Set (replace) a request header. The value holds the upstream secret.
    Set(String, Secret),
    /// Replace `:path` (query injection). The value holds the upstream secret.
    SetPath(Secret),
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Remove(h) => write!(f, "Remove({h})"),
            Op::Set(h, _) => write!(f, "Set({h}, <redacted>)"),
            Op::SetPath(_) => f.write_str("SetPath(<redacted>)"),
        }
    }
}

/// The header Envoy's default access-log format prints as the path when it is set.
pub const ORIGINAL_PATH: &str = "x-envoy-original-path";

/// Headers always removed before injection: the workload may not pass any credential through.
pub const ALWAYS_REMOVED: [&str; 2] = ["authorization", "proxy-authorization"];

fn field<'a>(f: &'a Fetched, name: &str) -> Result<&'a Secret, String> {
    f.field(name).ok_or_else(|| format!("field {name:?} missing from the cached secret"))
}

fn text(s: &Secret) -> Result<&str, String> {
    s.expose_str().ok_or_else(|| "secret is not UTF-8".to_string())
}

/// Compute the edits for `target`. `raw_path` is the request's `:path` (needed for `query`).
pub fn plan(target: &Target, secret: &Fetched, raw_path: &str) -> Result<Vec<Op>, String> {
    let mut ops: Vec<Op> = Vec::with_capacity(4);
    let src = target.credential.header();
    if !ALWAYS_REMOVED.contains(&src) {
        ops.push(Op::Remove(src.to_string()));
    }
    for h in ALWAYS_REMOVED {
        ops.push(Op::Remove(h.to_string()));
    }
    match &target.inject {
        Inject::Bearer { field: f } => {
            let v = text(field(secret, f)?)?;
            ops.push(Op::Set("authorization".into(), Secret::text(&format!("Bearer {v}"))));
        }
        Inject::Basic { username_field, password_field } => {
            let u = text(field(secret, username_field)?)?;
            let p = text(field(secret, password_field)?)?;
            if u.contains(':') {
                return Err("basic username contains ':'".into());
            }
            let enc = b64::std_encode(format!("{u}:{p}").as_bytes());
            ops.push(Op::Set("authorization".into(), Secret::text(&format!("Basic {enc}"))));
        }
        Inject::Header { name, prefix, field: f } => {
            let v = text(field(secret, f)?)?;
            if *name != src && !ALWAYS_REMOVED.contains(&name.as_str()) {
                ops.push(Op::Remove(name.clone()));
            }
            ops.push(Op::Set(name.clone(), Secret::text(&format!("{prefix}{v}"))));
        }
        Inject::Query { name, field: f } => {
            let v = text(field(secret, f)?)?;
            // Envoy's default access-log format prints `x-envoy-original-path` when it is set,
            // `:path` (which now holds the key) otherwise: the path as the workload sent it is
            // what an access log shows. The router keeps it with `suppress_envoy_headers: true`
            // (it would otherwise overwrite it with the rewritten path on a `prefix_rewrite`).
            ops.push(Op::Set(ORIGINAL_PATH.to_string(), Secret::text(raw_path)));
            ops.push(Op::SetPath(Secret::text(&with_query_param(raw_path, name, v))));
        }
    }
    if target.cost.as_ref().is_some_and(crate::policy::cost::Cost::metered) {
        // A model call is settled from the usage in its answer: the answer must come readable,
        // not compressed (no `accept-encoding` would let the vendor pick any coding).
        ops.push(Op::Set("accept-encoding".into(), Secret::text("identity")));
        // The gateway may add to its body (an output limit, the request for usage): Envoy's
        // buffer filter behind sets the length of the body that goes on. (Headers cannot be
        // changed once they went on, when the body is read.)
        ops.push(Op::Remove("content-length".into()));
    }
    Ok(ops)
}

pub(crate) fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `raw_path` with every parameter whose (decoded, case-insensitive) name is `name` removed and
/// `name=<value>` appended. Case-insensitive because some vendors read names that way.
pub fn with_query_param(raw_path: &str, name: &str, value: &str) -> String {
    let (path, query) = match raw_path.split_once('?') {
        Some((p, q)) => (p, q),
        None => (raw_path, ""),
    };
    let mut kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let n = p.split_once('=').map_or(*p, |(n, _)| n);
            !crate::wire::pct::decode_query_text(n).trim().eq_ignore_ascii_case(name)
        })
        .collect();
    let param = format!("{}={}", pct_encode(name), pct_encode(value));
    kept.push(&param);
    format!("{path}?{}", kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::extract::CredentialSource;

    fn fetched(fields: &[(&str, &str)]) -> Fetched {
        Fetched { fields: fields.iter().map(|(k, v)| (k.to_string(), Secret::text(v))).collect(), version: None, problems: vec![] }
    }
    fn target(cred: CredentialSource, inject: Inject) -> Target {
        Target { name: "t".into(), credential: cred, slot: 0, inject, allow: None, require_idempotency_key: vec![], cost: None, refund_on: vec![] }
    }
    fn show(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                Op::Remove(h) => format!("-{h}"),
                Op::Set(h, v) => format!("{h}={}", v.expose_str().unwrap_or("?")),
                Op::SetPath(p) => format!(":path={}", p.expose_str().unwrap_or("?")),
            })
            .collect()
    }

    #[test]
    fn bearer_overwrites() {
        let t = target(CredentialSource::Bearer, Inject::Bearer { field: "k".into() });
        let ops = plan(&t, &fetched(&[("k", "sk_test_1")]), "/v1/x").unwrap_or_default();
        assert_eq!(show(&ops), ["-authorization", "-proxy-authorization", "authorization=Bearer sk_test_1"]);
    }

    #[test]
    fn basic() {
        let t = target(CredentialSource::BasicPassword, Inject::Basic { username_field: "u".into(), password_field: "p".into() });
        let ops = plan(&t, &fetched(&[("u", "AC1"), ("p", "tok")]), "/").unwrap_or_default();
        assert_eq!(show(&ops).last().map(String::as_str), Some("authorization=Basic QUMxOnRvaw=="));
        assert!(plan(&t, &fetched(&[("u", "A:C"), ("p", "tok")]), "/").is_err());
        assert!(plan(&t, &fetched(&[("u", "AC")]), "/").is_err());
    }

    #[test]
    fn header_from_header() {
        let t = target(CredentialSource::Header("x-api-key".into()), Inject::Header { name: "x-api-key".into(), prefix: String::new(), field: "k".into() });
        let ops = plan(&t, &fetched(&[("k", "sk-ant")]), "/").unwrap_or_default();
        assert_eq!(show(&ops), ["-x-api-key", "-authorization", "-proxy-authorization", "x-api-key=sk-ant"]);
        let t = target(CredentialSource::Bearer, Inject::Header { name: "x-key".into(), prefix: "Token ".into(), field: "k".into() });
        let ops = plan(&t, &fetched(&[("k", "abc")]), "/").unwrap_or_default();
        assert_eq!(show(&ops), ["-authorization", "-proxy-authorization", "-x-key", "x-key=Token abc"]);
    }

    #[test]
    fn query_replaces() {
        assert_eq!(with_query_param("/maps/geo", "key", "s3cr&t"), "/maps/geo?key=s3cr%26t");
        assert_eq!(with_query_param("/g?a=1&key=evil&b=2", "key", "v"), "/g?a=1&b=2&key=v");
        assert_eq!(with_query_param("/g?KEY=evil&k%65y=evil2&key&b", "key", "v"), "/g?b&key=v");
        assert_eq!(with_query_param("/g?", "key", "v"), "/g?key=v");
        let t = target(CredentialSource::Bearer, Inject::Query { name: "key".into(), field: "k".into() });
        let ops = plan(&t, &fetched(&[("k", "AIza")]), "/maps/x?key=1").unwrap_or_default();
        assert_eq!(show(&ops), ["-authorization", "-proxy-authorization", "x-envoy-original-path=/maps/x?key=1", ":path=/maps/x?key=AIza"]);
    }

    #[test]
    fn debug_redacts() {
        let t = target(CredentialSource::Bearer, Inject::Bearer { field: "k".into() });
        let ops = plan(&t, &fetched(&[("k", "sk_test_1")]), "/").unwrap_or_default();
        assert!(!format!("{ops:?}").contains("sk_test_1"));
    }
}
