//! `keyward token`: get a credential from a gateway's issuing endpoint, for the current AWS
//! identity (`--aws`: a SigV4-signed sts:GetCallerIdentity the gateway forwards to STS), or
//! derived from a credential you hold (`--attenuate`). The signing is SigV4 as AWS documents it,
//! written here so that the CLI needs no AWS SDK; moto's STS checks it in `make test`.

use crate::args::{Args, Fail};
use crate::revoke::rfc3339;
use hmac::{Hmac, Mac};
use keyward_core::secret::Secret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

const STS_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(), // HMAC takes keys of any length
    }
}

/// AWS credentials from the environment (what Lambda sets; elsewhere
/// `eval "$(aws configure export-credentials --format env)"`).
pub struct AwsCredentials {
    pub key_id: String,
    pub secret: Secret,
    pub session_token: Option<Secret>,
}

impl AwsCredentials {
    fn from_env() -> Result<AwsCredentials, Fail> {
        let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let (Some(key_id), Some(secret)) = (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) else {
            return Err(Fail::usage(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set (try: eval \"$(aws configure export-credentials --format env)\")",
            ));
        };
        Ok(AwsCredentials { key_id, secret: Secret::text(&secret), session_token: get("AWS_SESSION_TOKEN").map(|t| Secret::text(&t)) })
    }
}

/// A SigV4-signed GetCallerIdentity (not sent), as the issuing endpoint's `iam_request`.
/// `amz_date` is `YYYYMMDDTHHMMSSZ`.
pub fn iam_proof(creds: &AwsCredentials, server_id: &str, region: &str, host: &str, amz_date: &str) -> Value {
    let date = amz_date.get(..8).unwrap_or_default();
    let mut headers: Vec<(String, String)> = vec![
        ("content-type".into(), CONTENT_TYPE.into()),
        ("host".into(), host.into()),
        ("x-amz-date".into(), amz_date.into()),
        ("x-keyward-server-id".into(), server_id.into()),
    ];
    if let Some(t) = creds.session_token.as_ref().and_then(Secret::expose_str) {
        headers.push(("x-amz-security-token".into(), t.into()));
    }
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect();
    let canonical = format!("POST\n/\n\n{canonical_headers}\n{signed}\n{}", hex(&Sha256::digest(STS_BODY.as_bytes())));
    let scope = format!("{date}/{region}/sts/aws4_request");
    let to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
    let mut k = b"AWS4".to_vec();
    k.extend_from_slice(creds.secret.expose());
    let k = hmac(&hmac(&hmac(&hmac(&k, date.as_bytes()), region.as_bytes()), b"sts"), b"aws4_request");
    let signature = hex(&hmac(&k, to_sign.as_bytes()));
    let mut out = serde_json::Map::new();
    for (k, v) in &headers {
        out.insert(k.clone(), json!(v));
    }
    out.insert("authorization".into(), json!(format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}", creds.key_id)));
    json!({ "method": "POST", "url": format!("https://{host}/"), "headers": out, "body": STS_BODY })
}

fn amz_date_now() -> String {
    // rfc3339 gives 2026-12-02T15:00:00Z; SigV4 wants 20261202T150000Z.
    rfc3339(crate::now()).chars().filter(|c| c.is_ascii_alphanumeric()).collect()
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
    let a = Args::parse(args, &["aws", "attenuate"])?;
    a.check(&["url", "path", "server-id", "region", "sts-host", "allow", "ttl", "run", "rpm", "total", "spend", "token", "token-env"])?;
    a.at_most(0)?;
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
            let creds = AwsCredentials::from_env()?;
            let region = a.get("region").unwrap_or("us-east-1");
            let host = a.get("sts-host").unwrap_or("sts.amazonaws.com");
            grant.insert("grant".into(), json!("aws_iam"));
            grant.insert("iam_request".into(), iam_proof(&creds, server_id, region, host, &amz_date_now()));
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

    /// The SigV4 signing-key derivation (AWS General Reference, "Examples of how to derive a
    /// signing key": 20120215, us-east-1, iam), with an obviously fake secret; the expected value
    /// was computed independently with Python's hmac. moto's STS checks whole signatures in
    /// `integration/test_issue.py`.
    #[test]
    fn signing_key_matches_an_independent_derivation() {
        let mut k = b"AWS4".to_vec();
        k.extend_from_slice(b"keyward-fake-secret-not-an-aws-key");
        let k = hmac(&hmac(&hmac(&hmac(&k, b"20120215"), b"us-east-1"), b"iam"), b"aws4_request");
        assert_eq!(hex(&k), "f18367016a944eba66f6ea3595d742a61f20e7d0162be2919c9eacad3b76a8cf");
    }

    #[test]
    fn the_proof_signs_the_server_id_and_the_session_token() {
        let creds = AwsCredentials { key_id: "keyward-fake-key-id".into(), secret: Secret::text("secret"), session_token: Some(Secret::text("tok")) };
        let p = iam_proof(&creds, "keyward-prod", "us-east-1", "sts.amazonaws.com", "20261202T150000Z");
        let auth = p.pointer("/headers/authorization").and_then(Value::as_str).unwrap_or_default();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=keyward-fake-key-id/20261202/us-east-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-keyward-server-id, Signature="));
        assert_eq!(p.pointer("/headers/x-keyward-server-id").and_then(Value::as_str), Some("keyward-prod"));
        assert_eq!(amz_date_now().len(), 16);
    }
}
