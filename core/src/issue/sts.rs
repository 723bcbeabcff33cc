//! The `aws_iam` grant's proof of identity, built the way Vault's AWS IAM auth method is: the
//! caller signs an `sts:GetCallerIdentity` request it does not send; the gateway forwards it
//! unchanged through its STS cluster and believes only STS's answer. Before forwarding, the request
//! must be exactly a GetCallerIdentity to the configured STS host, signed (SigV4) over the
//! `x-keyward-server-id` header carrying this gateway's server id: a proof made for another
//! service, or for another gateway, is refused here, and a proof whose headers were changed after
//! signing is refused by STS.

pub use super::identity::{principal, StsSettings};
use crate::secret::Secret;
use crate::secrets::store::HttpCall;
use crate::wire::pct;

/// The header a proof must sign, with the configured value (replay protection across services).
pub const SERVER_ID_HEADER: &str = "x-keyward-server-id";
/// What a GetCallerIdentity form body holds, and nothing else.
const ACTION: &str = "GetCallerIdentity";
const VERSION: &str = "2011-06-15";
/// Bounds on what a caller may hand over.
pub const MAX_HEADERS: usize = 32;
pub const MAX_HEADER_BYTES: usize = 8192;
/// STS's answer is small; a larger one is not STS.
pub const MAX_ANSWER: usize = 16 * 1024;

/// The signed request as the caller sent it in the grant. Its headers carry the caller's signature
/// and session token: Debug prints header names only.
#[derive(Clone, PartialEq, Eq)]
pub struct IamRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl std::fmt::Debug for IamRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "IamRequest {{ method: {:?}, url: {:?}, headers: {names:?}, body: {} bytes }}", self.method, self.url, self.body.len())
    }
}

/// Why a proof was refused, and how the endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofError {
    /// Malformed (400 `bad_request`).
    Malformed(String),
    /// Well formed, but not a proof for this gateway, or STS refused it (401 `invalid_credential`).
    Refused(String),
    /// STS could not be asked or did not answer usefully (503 `secret_unavailable`).
    Unavailable(String),
}

fn header<'a>(req: &'a IamRequest, name: &str) -> Option<&'a str> {
    req.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The SignedHeaders of a SigV4 `Authorization` header, lower-cased.
fn signed_headers(authorization: &str) -> Option<Vec<String>> {
    let rest = authorization.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let part = rest.split(',').map(str::trim).find_map(|p| p.strip_prefix("SignedHeaders="))?;
    Some(part.split(';').map(str::to_ascii_lowercase).collect())
}

/// Check the caller's proof and build the callout that forwards it, unchanged, to STS.
pub fn callout(req: &IamRequest, sts: &StsSettings) -> Result<HttpCall, ProofError> {
    let bad = |m: &str| Err(ProofError::Malformed(m.to_string()));
    if req.method != "POST" {
        return bad("iam_request.method must be POST");
    }
    let url_ok = req.url == format!("https://{}/", sts.authority) || req.url == format!("https://{}", sts.authority);
    if !url_ok {
        return Err(ProofError::Refused(format!("iam_request.url must be https://{}/", sts.authority)));
    }
    // Exactly Action=GetCallerIdentity and Version=2011-06-15, in any order, nothing else.
    let mut action = None;
    let mut version = None;
    for pair in req.body.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (pct::decode_query_text(k), pct::decode_query_text(v));
        match (k.as_str(), action.is_none(), version.is_none()) {
            ("Action", true, _) => action = Some(v),
            ("Version", _, true) => version = Some(v),
            _ => return bad("iam_request.body must be exactly Action=GetCallerIdentity&Version=2011-06-15"),
        }
    }
    if action.as_deref() != Some(ACTION) || version.as_deref() != Some(VERSION) {
        return bad("iam_request.body must be exactly Action=GetCallerIdentity&Version=2011-06-15");
    }
    if req.headers.len() > MAX_HEADERS || req.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > MAX_HEADER_BYTES {
        return bad("iam_request.headers is too large");
    }
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in &req.headers {
        let lk = k.to_ascii_lowercase();
        let name_ok = !lk.is_empty() && lk.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
        if !name_ok || v.bytes().any(|c| c < 0x20 || c == 0x7f) {
            return bad("iam_request.headers: a header name or value is not allowed");
        }
        if seen.contains(&lk) {
            return bad("iam_request.headers: a header appears twice");
        }
        if matches!(lk.as_str(), "content-length" | "transfer-encoding" | "connection") {
            return bad("iam_request.headers: hop-by-hop and length headers are set by the gateway");
        }
        seen.push(lk);
    }
    let Some(auth) = header(req, "authorization") else { return bad("iam_request.headers has no SigV4 Authorization") };
    let Some(signed) = signed_headers(auth) else { return bad("iam_request.headers.Authorization is not AWS4-HMAC-SHA256") };
    if !signed.iter().any(|h| h == SERVER_ID_HEADER) {
        return Err(ProofError::Refused(format!("the proof does not sign {SERVER_ID_HEADER}")));
    }
    match header(req, SERVER_ID_HEADER) {
        Some(v) if v == sts.server_id => {}
        _ => return Err(ProofError::Refused(format!("the proof was made for another server id (expected {:?})", sts.server_id))),
    }
    if let Some(h) = header(req, "host") {
        if !h.eq_ignore_ascii_case(&sts.authority) {
            return Err(ProofError::Refused(format!("the proof was signed for host {h:?}, not {}", sts.authority)));
        }
    }
    let mut headers: Vec<(String, Secret)> =
        vec![(":method".into(), Secret::text("POST")), (":path".into(), Secret::text("/")), (":authority".into(), Secret::text(&sts.authority))];
    for (k, v) in &req.headers {
        if !k.eq_ignore_ascii_case("host") {
            headers.push((k.to_ascii_lowercase(), Secret::text(v)));
        }
    }
    Ok(HttpCall { cluster: sts.cluster.clone(), headers, body: Some(req.body.as_bytes().to_vec()), timeout_ms: sts.timeout_ms })
}

/// Where each `<name>` or `<name attr…>` start tag of `xml` ends.
fn starts<'a>(xml: &'a str, name: &'a str) -> impl Iterator<Item = usize> + 'a {
    let open = format!("<{name}");
    xml.match_indices(open.clone().as_str()).map(|(i, _)| i).collect::<Vec<_>>().into_iter().filter_map(move |i| {
        let after = xml.get(i + open.len()..)?;
        match after.bytes().next()? {
            b'>' => Some(i + open.len() + 1),
            b' ' | b'\n' | b'\t' | b'\r' => after.find('>').map(|j| i + open.len() + j + 1),
            _ => None,
        }
    })
}

/// The text of the one `<name>…</name>` element in `xml` (attributes on its start tag allowed,
/// the name not nested in itself). `None` when absent or repeated.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut found = starts(xml, name);
    let start = found.next()?;
    if found.next().is_some() {
        return None;
    }
    let close = format!("</{name}>");
    let len = xml.get(start..)?.find(&close)?;
    xml.get(start..start + len)
}

/// STS's answer, parsed strictly for the caller's ARN.
pub fn parse_answer(status: Option<u32>, body: Option<&[u8]>) -> Result<String, ProofError> {
    let Some(status) = status else { return Err(ProofError::Unavailable("STS did not answer".into())) };
    let text = match body {
        Some(b) if b.len() <= MAX_ANSWER => std::str::from_utf8(b).map_err(|_| ProofError::Unavailable("STS's answer is not UTF-8".into()))?,
        Some(_) => return Err(ProofError::Unavailable("STS's answer is too large".into())),
        None => "",
    };
    match status {
        200 => {
            let result = element(text, "GetCallerIdentityResponse")
                .and_then(|r| element(r, "GetCallerIdentityResult"))
                .ok_or_else(|| ProofError::Unavailable("STS's answer is not a GetCallerIdentityResponse".into()))?;
            let arn = element(result, "Arn").ok_or_else(|| ProofError::Unavailable("STS's answer has no Arn".into()))?;
            if arn.is_empty() || arn.len() > 2048 || !arn.bytes().all(|c| c.is_ascii_graphic()) || arn.contains('&') || arn.contains('<') {
                return Err(ProofError::Unavailable("STS's answer has an unusable Arn".into()));
            }
            Ok(arn.to_string())
        }
        // STS's refusals of the signature or the key: the proof is not valid.
        400 | 403 => {
            let code = element(text, "Code").unwrap_or("unknown");
            let code: String = code.chars().filter(char::is_ascii_alphanumeric).take(64).collect();
            Err(ProofError::Refused(format!("STS refused the proof ({code})")))
        }
        s => Err(ProofError::Unavailable(format!("STS answered HTTP {s}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts() -> StsSettings {
        StsSettings { cluster: "sts".into(), authority: "sts.amazonaws.com".into(), timeout_ms: 2000, server_id: "keyward-prod".into() }
    }

    fn proof() -> IamRequest {
        IamRequest {
            method: "POST".into(),
            url: "https://sts.amazonaws.com/".into(),
            headers: vec![
                ("Host".into(), "sts.amazonaws.com".into()),
                ("Content-Type".into(), "application/x-www-form-urlencoded; charset=utf-8".into()),
                ("X-Amz-Date".into(), "20261202T150000Z".into()),
                ("X-Keyward-Server-Id".into(), "keyward-prod".into()),
                (
                    "Authorization".into(),
                    "AWS4-HMAC-SHA256 Credential=AKID/20261202/us-east-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-keyward-server-id, Signature=abc".into(),
                ),
            ],
            body: "Action=GetCallerIdentity&Version=2011-06-15".into(),
        }
    }

    #[test]
    fn a_good_proof_is_forwarded_unchanged() {
        let call = callout(&proof(), &sts()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(call.cluster, "sts");
        assert_eq!(call.body.as_deref(), Some(&b"Action=GetCallerIdentity&Version=2011-06-15"[..]));
        let names: Vec<&str> = call.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"authorization") && names.contains(&"x-keyward-server-id") && !names.contains(&"host"));
        assert!(call.headers.iter().any(|(k, v)| k == ":authority" && v.expose() == b"sts.amazonaws.com"));
    }

    #[test]
    fn proofs_for_something_else_are_refused() {
        let with = |f: &dyn Fn(&mut IamRequest)| {
            let mut p = proof();
            f(&mut p);
            callout(&p, &sts())
        };
        assert!(matches!(with(&|p| p.method = "GET".into()), Err(ProofError::Malformed(_))));
        assert!(matches!(with(&|p| p.url = "https://evil.example/".into()), Err(ProofError::Refused(_))));
        assert!(matches!(with(&|p| p.body = "Action=AssumeRole&Version=2011-06-15".into()), Err(ProofError::Malformed(_))));
        assert!(matches!(with(&|p| p.body.push_str("&Action=GetCallerIdentity")), Err(ProofError::Malformed(_))));
        assert!(matches!(with(&|p| p.headers.retain(|(k, _)| k != "Authorization")), Err(ProofError::Malformed(_))));
        // Not signed over the server id, or signed for another one: a replay from elsewhere.
        let unsigned = |p: &mut IamRequest| {
            for h in &mut p.headers {
                if h.0 == "Authorization" {
                    h.1 = h.1.replace(";x-keyward-server-id", "");
                }
            }
        };
        assert!(matches!(with(&unsigned), Err(ProofError::Refused(m)) if m.contains("does not sign")));
        assert!(matches!(with(&|p| p.headers.retain(|(k, _)| k != "X-Keyward-Server-Id")), Err(ProofError::Refused(_))));
        let other = |p: &mut IamRequest| {
            for h in &mut p.headers {
                if h.0 == "X-Keyward-Server-Id" {
                    h.1 = "vault-prod".into();
                }
            }
        };
        assert!(matches!(with(&other), Err(ProofError::Refused(m)) if m.contains("another server id")));
        assert!(matches!(with(&|p| p.headers.push(("x-keyward-server-id".into(), "keyward-prod".into()))), Err(ProofError::Malformed(_))));
        assert!(matches!(with(&|p| p.headers.push(("X-Evil".into(), "a\r\nb".into()))), Err(ProofError::Malformed(_))));
        assert!(matches!(with(&|p| p.headers.push(("Content-Length".into(), "9".into()))), Err(ProofError::Malformed(_))));
    }

    #[test]
    fn answers_are_parsed_strictly() {
        let ok = br#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult><Arn>arn:aws:sts::123456789012:assumed-role/checkout/i-1</Arn><UserId>AROA:i-1</UserId><Account>123456789012</Account></GetCallerIdentityResult><ResponseMetadata><RequestId>x</RequestId></ResponseMetadata></GetCallerIdentityResponse>"#;
        let ok = String::from_utf8_lossy(ok).to_string();
        assert_eq!(parse_answer(Some(200), Some(ok.as_bytes())), Ok("arn:aws:sts::123456789012:assumed-role/checkout/i-1".into()));
        let twice = ok.replace("</Arn>", "</Arn><Arn>arn:aws:iam::123456789012:role/admin</Arn>");
        assert!(matches!(parse_answer(Some(200), Some(twice.as_bytes())), Err(ProofError::Unavailable(_))));
        let err = br#"<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error></ErrorResponse>"#;
        assert_eq!(parse_answer(Some(403), Some(err)), Err(ProofError::Refused("STS refused the proof (SignatureDoesNotMatch)".into())));
        assert!(matches!(parse_answer(None, None), Err(ProofError::Unavailable(_))));
        assert!(matches!(parse_answer(Some(503), Some(b"busy")), Err(ProofError::Unavailable(_))));
        assert!(matches!(parse_answer(Some(200), Some(b"<html>proxy</html>")), Err(ProofError::Unavailable(_))));
    }

    #[test]
    fn debug_never_shows_the_signature_or_the_session_token() {
        let mut p = proof();
        p.headers.push(("X-Amz-Security-Token".into(), "session-token-value".into()));
        let shown = format!("{p:?}");
        assert!(shown.contains("X-Amz-Security-Token") && !shown.contains("session-token-value") && !shown.contains("Signature=abc"));
    }

    #[test]
    fn arns_map_to_principals() {
        assert_eq!(principal("arn:aws:sts::123456789012:assumed-role/checkout/i-0abc"), Some("arn:aws:iam::123456789012:role/checkout".into()));
        assert_eq!(principal("arn:aws:iam::123456789012:user/ci"), Some("arn:aws:iam::123456789012:user/ci".into()));
        assert_eq!(principal("arn:aws-us-gov:sts::123456789012:assumed-role/r/s"), Some("arn:aws-us-gov:iam::123456789012:role/r".into()));
        assert_eq!(principal("arn:aws:sts::123456789012:federated-user/bob"), None);
        assert_eq!(principal("arn:aws:sts::12345:assumed-role/r/s"), None);
        assert_eq!(principal("arn:aws:sts::123456789012:assumed-role/r"), None);
        assert_eq!(principal("nonsense"), None);
    }
}
