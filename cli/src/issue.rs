//! `keyward token`: get a credential from a gateway's issuing endpoint, for the current AWS
//! identity (`--aws`: a SigV4-signed sts:GetCallerIdentity the gateway forwards to STS), or
//! derived from a credential you hold (`--attenuate`). The AWS identity is whatever the AWS SDK's
//! default credential chain finds (environment, profile or SSO, web identity, the ECS or EKS
//! container role, instance metadata), signed with the SDK's SigV4 signer; moto's STS checks the
//! signature in `make test`.

use crate::args::{Args, Fail};
use crate::aws::Session;
use keyward_core::secret::Secret;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

const STS_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// A SigV4-signed GetCallerIdentity (not sent), as the issuing endpoint's `iam_request`: the
/// gateway's server id is a signed header, so the proof is good for that gateway only.
pub fn iam_proof(session: &Session, server_id: &str, region: &str, host: &str, at: SystemTime) -> Result<Value, Fail> {
    let url = format!("https://{host}/");
    let headers = [("content-type", CONTENT_TYPE), ("host", host), ("x-keyward-server-id", server_id)];
    let signed = session.sign(("sts", region), "POST", &url, &headers, STS_BODY.as_bytes(), at)?;
    let mut out = serde_json::Map::new();
    for (k, v) in headers {
        out.insert(k.to_string(), json!(v));
    }
    for (k, v) in signed {
        out.insert(k, json!(v));
    }
    Ok(json!({ "method": "POST", "url": url, "headers": out, "body": STS_BODY }))
}

fn post(url: &str, grant: &Value, bearer: Option<&Secret>) -> Result<Value, Fail> {
    let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(20))).build().new_agent();
    let mut req = ureq::http::Request::builder().method("POST").uri(url).header("content-type", "application/json");
    if let Some(t) = bearer.and_then(Secret::expose_str) {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(grant.to_string()).map_err(|e| Fail::usage(e.to_string()))?;
    let mut resp = agent.run(req).map_err(|e| Fail::unavailable(format!("cannot reach {url}: {e}")))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().with_config().limit(64 << 10).read_to_string().map_err(|e| Fail::unavailable(format!("reading the answer: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|_| Fail::unavailable(format!("the gateway answered HTTP {status} without JSON")))?;
    match status {
        200 => Ok(v),
        s => {
            let code = v.get("error").and_then(Value::as_str).unwrap_or("?");
            let msg = v.get("message").and_then(Value::as_str).unwrap_or("");
            let text = format!("the gateway refused (HTTP {s}, {code}): {msg}");
            Err(if s >= 500 { Fail::Unavailable(text) } else { Fail::Failed(text) })
        }
    }
}

pub fn run(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(
        args,
        &["aws", "attenuate"],
        &["url", "path", "server-id", "region", "sts-host", "allow", "ttl", "run", "rpm", "total", "spend", "token", "token-env"],
        0,
    )?;
    let base = a.get("url").ok_or_else(|| Fail::usage("--url (the gateway, e.g. http://keyward.internal:10000) is required"))?;
    let url = format!("{}{}", base.trim_end_matches('/'), a.get("path").unwrap_or("/keyward/v1/credentials"));
    let num = |name: &str| -> Result<Option<u64>, Fail> {
        a.get(name).map(|v| v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| Fail::usage(format!("--{name} must be a positive integer")))).transpose()
    };
    let mut grant = serde_json::Map::new();
    let allow = a.all("allow");
    if !allow.is_empty() {
        grant.insert("allow".into(), json!(allow));
    }
    if let Some(t) = num("ttl")? {
        grant.insert("ttl_s".into(), json!(t));
    }
    if let Some(r) = a.get("run") {
        grant.insert("run".into(), json!(r));
    }
    let (answer, what) = match (a.flag("aws"), a.flag("attenuate")) {
        (true, false) => {
            let server_id = a.get("server-id").ok_or_else(|| Fail::usage("--server-id (the gateway's issuer.aws_iam.server_id) is required"))?;
            let region = a.get("region").unwrap_or("us-east-1");
            let session = Session::load(Some(region))?;
            let host = a.get("sts-host").unwrap_or("sts.amazonaws.com");
            grant.insert("grant".into(), json!("aws_iam"));
            grant.insert("iam_request".into(), iam_proof(&session, server_id, region, host, SystemTime::now())?);
            (post(&url, &Value::Object(grant), None)?, "issued for your AWS identity")
        }
        (false, true) => {
            let parent = match (a.get("token"), a.get("token-env")) {
                (Some(t), None) => Secret::text(t),
                (None, Some(var)) => Secret::text(&std::env::var(var).map_err(|_| Fail::usage(format!("environment variable {var} is not set")))?),
                _ => return Err(Fail::usage("give the parent credential with --token or --token-env")),
            };
            let (rpm, total, spend) = (num("rpm")?, num("total")?, num("spend")?);
            if rpm.is_some() || total.is_some() || spend.is_some() {
                let mut l = serde_json::Map::new();
                if let Some(n) = spend {
                    l.insert("spend".into(), json!(n));
                }
                if let Some(n) = rpm {
                    l.insert("rpm".into(), json!(n));
                }
                if let Some(n) = total {
                    l.insert("total".into(), json!(n));
                }
                grant.insert("lim".into(), Value::Object(l));
            }
            grant.insert("grant".into(), json!("attenuate"));
            (post(&url, &Value::Object(grant), Some(&parent))?, "derived from your credential")
        }
        _ => return Err(Fail::usage("give exactly one of --aws and --attenuate")),
    };
    if a.json() {
        println!("{answer}");
    } else {
        eprintln!(
            "keyward: {what}: sub={} jti={} expires_at={}",
            answer.get("sub").and_then(Value::as_str).unwrap_or("?"),
            answer.get("jti").and_then(Value::as_str).unwrap_or("?"),
            answer.get("expires_at").and_then(Value::as_i64).unwrap_or(0)
        );
        println!("{}", answer.get("token").and_then(Value::as_str).unwrap_or_default());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proof_signs_the_server_id_and_the_session_token() {
        let s = Session::fixed("keyward-fake-key-id", "secret", Some("tok"));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_223_600);
        let p = iam_proof(&s, "keyward-prod", "us-east-1", "sts.amazonaws.com", at).unwrap_or_default();
        let auth = p.pointer("/headers/authorization").and_then(Value::as_str).unwrap_or_default();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=keyward-fake-key-id/20261202/us-east-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-keyward-server-id, Signature="), "{auth}");
        assert_eq!(p.pointer("/headers/x-keyward-server-id").and_then(Value::as_str), Some("keyward-prod"));
        assert_eq!(p.pointer("/headers/x-amz-security-token").and_then(Value::as_str), Some("tok"));
        assert_eq!(p.get("body").and_then(Value::as_str), Some(STS_BODY));
    }
}
