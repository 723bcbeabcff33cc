//! AWS for the CLI: credentials and region from the AWS SDK's default chains (environment,
//! shared config and credentials files with profiles and SSO, web identity, ECS and EKS container
//! credentials, instance metadata), requests signed by the SDK's SigV4 signer and sent with ureq.
//! Nothing here prints or returns a credential; errors name the step that failed.

use crate::args::Fail;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde_json::Value;
use std::time::{Duration, SystemTime};

/// How long finding credentials may take (an SSO refresh or a container endpoint included).
const CHAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one AWS API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The most of an AWS answer read (an SSM parameter holds at most 8 KiB, a secret 64 KiB).
const ANSWER_LIMIT: u64 = 256 << 10;

/// The identity and region the SDK's chains resolve, as `aws` CLI v2 would.
pub struct Session {
    credentials: Credentials,
    region: Option<String>,
}

impl Session {
    /// `region`: a command's `--region`; without it, the chain's (AWS_REGION, the profile's).
    pub fn load(region: Option<&str>) -> Result<Session, Fail> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Fail::unavailable(format!("cannot start the AWS credential chain: {e}")))?;
        rt.block_on(async {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
            if let Some(r) = region {
                loader = loader.region(aws_config::Region::new(r.to_string()));
            }
            let conf = tokio::time::timeout(CHAIN_TIMEOUT, loader.load()).await.map_err(|_| Fail::unavailable("the AWS configuration did not load in 15 s"))?;
            let provider = conf.credentials_provider().ok_or_else(|| Fail::unavailable("no AWS credential provider is configured"))?;
            let credentials = tokio::time::timeout(CHAIN_TIMEOUT, provider.provide_credentials())
                .await
                .map_err(|_| Fail::unavailable("no AWS credentials within 15 s"))?
                .map_err(|e| {
                    Fail::unavailable(format!(
                        "no AWS credentials ({}); set a profile (AWS_PROFILE), run `aws sso login`, or run where a role is attached",
                        first_line(&e)
                    ))
                })?;
            Ok(Session { credentials, region: conf.region().map(|r| r.as_ref().to_string()) })
        })
    }

    /// A session with fixed credentials, for unit tests of what is signed.
    #[cfg(test)]
    pub fn fixed(key_id: &str, secret: &str, token: Option<&str>) -> Session {
        Session { credentials: Credentials::new(key_id, secret, token.map(str::to_string), None, "test"), region: None }
    }

    pub fn region(&self) -> Result<&str, Fail> {
        self.region.as_deref().ok_or_else(|| Fail::usage("no AWS region: give --region or set AWS_REGION"))
    }

    /// The SigV4 headers (`x-amz-date`, `authorization`, and `x-amz-security-token` with temporary
    /// credentials) for a request whose other signed headers are `headers` (`host` included).
    pub fn sign(
        &self,
        (service, region): (&str, &str),
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        at: SystemTime,
    ) -> Result<Vec<(String, String)>, Fail> {
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(service)
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| Fail::usage(format!("SigV4: {e}")))?
            .into();
        let request = SignableRequest::new(method, url, headers.iter().copied(), SignableBody::Bytes(body)).map_err(|e| Fail::usage(format!("SigV4: {e}")))?;
        let (instructions, _) = sign(request, &params).map_err(|e| Fail::usage(format!("SigV4: {e}")))?.into_parts();
        Ok(instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// One call to an AWS JSON-protocol API (SSM, Secrets Manager): `target` is the
    /// `X-Amz-Target` (e.g. `AmazonSSM.GetParameter`). An AWS error becomes a `Fail` carrying
    /// AWS's error type and message (which never hold the secret).
    pub fn call_json(&self, service: &str, region: &str, endpoint: &str, target: &str, body: &Value) -> Result<Value, Fail> {
        let url = format!("{}/", endpoint.trim_end_matches('/'));
        let host = host_of(&url).ok_or_else(|| Fail::usage(format!("{endpoint:?} is not an http(s) URL")))?;
        let body = body.to_string();
        let headers = [("content-type", "application/x-amz-json-1.1"), ("host", host), ("x-amz-target", target)];
        let signed = self.sign((service, region), "POST", &url, &headers, body.as_bytes(), SystemTime::now())?;
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(CALL_TIMEOUT)).build().new_agent();
        let mut req = ureq::http::Request::builder().method("POST").uri(&url);
        for (k, v) in headers.iter().filter(|(k, _)| *k != "host") {
            req = req.header(*k, *v);
        }
        for (k, v) in &signed {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(body).map_err(|e| Fail::usage(e.to_string()))?;
        let mut resp = agent.run(req).map_err(|e| Fail::unavailable(format!("cannot reach {service} at {endpoint}: {e}")))?;
        let status = resp.status().as_u16();
        let text =
            resp.body_mut().with_config().limit(ANSWER_LIMIT).read_to_string().map_err(|e| Fail::unavailable(format!("reading {service}'s answer: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            // An AWS error in XML (a signature or an authorization refused by the front end): its
            // code and message say why; they never hold the secret asked for.
            let tag = |t: &str| text.split(&format!("<{t}>")).nth(1).and_then(|r| r.split(&format!("</{t}>")).next()).unwrap_or("");
            let why: String = format!("{} {}", tag("Code"), tag("Message")).trim().chars().filter(|c| !c.is_control()).take(300).collect();
            Fail::unavailable(format!("{service} answered HTTP {status} without JSON{}", if why.is_empty() { String::new() } else { format!(": {why}") }))
        })?;
        if status == 200 {
            return Ok(v);
        }
        let kind = v.get("__type").and_then(Value::as_str).unwrap_or("?");
        let kind = kind.rsplit('#').next().unwrap_or(kind);
        let msg = v.get("message").or_else(|| v.get("Message")).and_then(Value::as_str).unwrap_or("");
        // An answer's words, not its control characters (a hostile endpoint could forge log lines).
        let clean = |t: &str| t.chars().filter(|c| !c.is_control()).take(300).collect::<String>();
        let text = format!("{service} {target}: HTTP {status} {}: {}", clean(kind), clean(msg));
        Err(if status >= 500 || kind.contains("Throttl") { Fail::Unavailable(text) } else { Fail::Failed(text) })
    }
}

/// The endpoint of `service` in `region`: `AWS_ENDPOINT_URL_<SERVICE>` or `AWS_ENDPOINT_URL`
/// when set (the SDKs' own variables), else the public regional endpoint.
pub fn endpoint(service: &str, env_name: &str, region: &str) -> String {
    let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    get(&format!("AWS_ENDPOINT_URL_{env_name}")).or_else(|| get("AWS_ENDPOINT_URL")).unwrap_or_else(|| format!("https://{service}.{region}.amazonaws.com"))
}

fn host_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split('/').next()?;
    (!host.is_empty()).then_some(host)
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_keep_their_port() {
        assert_eq!(host_of("http://127.0.0.1:5000/"), Some("127.0.0.1:5000"));
        assert_eq!(host_of("https://ssm.eu-west-1.amazonaws.com/"), Some("ssm.eu-west-1.amazonaws.com"));
        assert_eq!(host_of("ftp://x/"), None);
        assert_eq!(host_of("https:///"), None);
    }

    /// The signer signs every header it is given, the session token included, and says so.
    #[test]
    fn signs_the_given_headers_and_the_session_token() {
        let s = Session::fixed("keyward-fake-key-id", "keyward-fake-secret", Some("tok"));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_223_600); // 2026-12-02T15:00:00Z
        let h = s
            .sign(("sts", "us-east-1"), "POST", "https://sts.amazonaws.com/", &[("host", "sts.amazonaws.com"), ("x-keyward-server-id", "prod")], b"x", at)
            .unwrap_or_default();
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-amz-date"), Some("20261202T150000Z"));
        assert_eq!(get("x-amz-security-token"), Some("tok"));
        let auth = get("authorization").unwrap_or_default();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=keyward-fake-key-id/20261202/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token;x-keyward-server-id, Signature="),
            "{auth}"
        );
    }
}
