//! Store protocols: the callout each store needs, and a strict reading of its answer.
//! Vault/OpenBao KV v2: `GET /v1/<mount>/data/<path>` with `X-Vault-Token`; AWS Secrets Manager:
//! `POST /` with `X-Amz-Target: secretsmanager.GetSecretValue` (Envoy signs it).

use crate::config::{Store, StoreKind, VaultAuth};
use crate::secret::Secret;
use crate::wire::json::{self, Value};
use std::fmt;

/// Largest store answer read; anything bigger is refused as garbage.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest revocation-list answer accepted (about 40,000 entries in the compact format).
pub const MAX_LIST_BODY: usize = 4 * 1024 * 1024;
/// Largest secret value accepted.
pub const MAX_SECRET: usize = 8 * 1024;

/// An HTTP callout to make through an Envoy cluster. Header values may hold a store token, so
/// Debug prints names only.
#[derive(Clone)]
pub struct HttpCall {
    pub cluster: String,
    pub headers: Vec<(String, Secret)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u32,
}

impl fmt::Debug for HttpCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "HttpCall {{ cluster: {:?}, headers: {names:?}, timeout_ms: {} }}", self.cluster, self.timeout_ms)
    }
}

/// Why a fetch failed. Only authoritative answers (`NotFound`, `Denied`) evict a cached value;
/// the others may be served stale (see `may_serve_stale`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Timeout, connection failure, 5xx, throttling.
    Transient(String),
    /// 404, or a deleted or destroyed latest version.
    NotFound,
    /// 401/403: the store refused Keyward's own credential.
    Denied(u32),
    /// An answer that is not what the protocol promises.
    Garbage(String),
}

impl FetchError {
    /// May the last good value still be served? Yes for a timeout, a connection failure or a 5xx,
    /// and for garbage: an answer that is not the store's (a proxy's error page, a truncated or
    /// oversized body) says nothing about the secret. 404 and 401/403 are the store's own word.
    pub fn may_serve_stale(&self) -> bool {
        matches!(self, FetchError::Transient(_) | FetchError::Garbage(_))
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Transient(why) => write!(f, "store unavailable: {why}"),
            FetchError::NotFound => f.write_str("secret not found (absent, deleted or destroyed)"),
            FetchError::Denied(s) => write!(f, "store refused access (HTTP {s})"),
            FetchError::Garbage(why) => write!(f, "unusable store answer: {why}"),
        }
    }
}

/// The fields Keyward needs from one secret document. A wanted field that is absent or unusable
/// is kept with an empty value, so the cache still knows it was asked for; `field` returns
/// `None` for it and only the targets that need it fail.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub fields: Vec<(String, Secret)>,
    pub version: Option<String>,
    /// Why wanted fields are unusable (names and reasons only, never values).
    pub problems: Vec<String>,
}

impl Fetched {
    pub fn field(&self, name: &str) -> Option<&Secret> {
        self.fields.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v)
    }
    /// Was this field asked for when the entry was fetched (usable or not)?
    pub fn covers(&self, name: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == name)
    }
}

/// A callout header whose value is not secret (kept as `Secret` like every callout header).
pub(crate) fn header(k: &str, v: &str) -> (String, Secret) {
    (k.to_string(), Secret::text(v))
}

/// The callout that reads `path` from `store`. `session`: the token from an AppRole login
/// (`secrets::approle`); a store configured with `token_env` uses its own token.
pub fn read_call(store: &Store, path: &str, session: Option<&Secret>) -> HttpCall {
    match &store.kind {
        StoreKind::VaultKv2 { mount, auth, namespace } => {
            let token = match (auth, session) {
                (_, Some(t)) => t.clone(),
                (VaultAuth::Token(t), None) => t.clone(),
                (VaultAuth::AppRole { .. }, None) => Secret::default(),
            };
            let mut headers = vec![
                header(":method", "GET"),
                header(":path", &format!("/v1/{mount}/data/{path}")),
                header(":authority", &store.authority),
                header("accept", "application/json"),
                (String::from("x-vault-token"), token),
            ];
            if let Some(ns) = namespace {
                headers.push(header("x-vault-namespace", ns));
            }
            HttpCall { cluster: store.cluster.clone(), headers, body: None, timeout_ms: store.timeout_ms }
        }
        StoreKind::AwsSecretsManager => {
            let mut body = String::from("{\"SecretId\":");
            json::write_str(&mut body, path);
            body.push('}');
            let headers = vec![
                header(":method", "POST"),
                header(":path", "/"),
                header(":authority", &store.authority),
                header("content-type", "application/x-amz-json-1.1"),
                header("x-amz-target", "secretsmanager.GetSecretValue"),
                header("accept", "application/json"),
            ];
            HttpCall { cluster: store.cluster.clone(), headers, body: Some(body.into_bytes()), timeout_ms: store.timeout_ms }
        }
    }
}

/// The callout that reads the KV v2 metadata of `path` (its current version, a small answer
/// whatever the secret's size). `None` for stores without such metadata.
pub fn metadata_call(store: &Store, path: &str, session: Option<&Secret>) -> Option<HttpCall> {
    let StoreKind::VaultKv2 { mount, .. } = &store.kind else { return None };
    let mut call = read_call(store, path, session);
    for (k, v) in call.headers.iter_mut() {
        if k == ":path" {
            *v = Secret::text(&format!("/v1/{mount}/metadata/{path}"));
        }
    }
    Some(call)
}

/// The current version in a KV v2 metadata answer, if that version is live (not deleted or
/// destroyed).
pub fn current_version(status: Option<u32>, body: &[u8]) -> Result<u64, FetchError> {
    let Some(status) = status else {
        return Err(FetchError::Transient("no response (timeout or connection failure)".into()));
    };
    match status {
        200 => {}
        401 | 403 => return Err(FetchError::Denied(status)),
        429 | 500..=599 => return Err(FetchError::Transient(format!("HTTP {status}"))),
        _ => return Err(FetchError::Garbage(format!("HTTP {status} for the metadata"))),
    }
    let v = json::parse(body).map_err(|e| FetchError::Garbage(format!("metadata, not JSON: {e}")))?;
    let Some(Value::Int(current)) = v.get("data").and_then(|d| d.get("current_version")) else {
        return Err(FetchError::Garbage("metadata without data.current_version".into()));
    };
    let current = u64::try_from(*current).map_err(|_| FetchError::Garbage("a negative version".into()))?;
    let this = v.get("data").and_then(|d| d.get("versions")).and_then(|vs| vs.get(&current.to_string()));
    let deleted =
        this.is_some_and(|m| matches!(m.get("destroyed"), Some(Value::Bool(true))) || matches!(m.get("deletion_time"), Some(Value::Str(t)) if !t.is_empty()));
    if deleted {
        return Err(FetchError::NotFound);
    }
    Ok(current)
}

/// A secret value must be usable in a header: non-empty printable ASCII or UTF-8 with no control
/// characters (no CR/LF smuggling), and bounded.
fn usable(field: &str, v: &Value) -> Result<Secret, FetchError> {
    let Value::Str(s) = v else {
        return Err(FetchError::Garbage(format!("field {field:?} is a {}, not a string", v.kind())));
    };
    if s.is_empty() {
        return Err(FetchError::Garbage(format!("field {field:?} is empty")));
    }
    if s.len() > MAX_SECRET {
        return Err(FetchError::Garbage(format!("field {field:?} is longer than {MAX_SECRET} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(FetchError::Garbage(format!("field {field:?} contains a control character")));
    }
    Ok(Secret::text(s))
}

type Fields = Vec<(String, Secret)>;

/// Pick the wanted fields (and the reasons some are unusable). Fails only when none is usable.
fn pick(doc: &Value, wanted: &[String]) -> Result<(Fields, Vec<String>), FetchError> {
    let mut out = Vec::with_capacity(wanted.len());
    let mut problems = Vec::new();
    for f in wanted {
        let r = match doc.get(f) {
            None => Err(FetchError::Garbage(format!("field {f:?} is missing"))),
            Some(v) => usable(f, v),
        };
        match r {
            Ok(s) => out.push((f.clone(), s)),
            Err(e) => {
                problems.push(match e {
                    FetchError::Garbage(why) => why,
                    other => other.to_string(),
                });
                out.push((f.clone(), Secret::default()));
            }
        }
    }
    if !wanted.is_empty() && out.iter().all(|(_, v)| v.is_empty()) {
        return Err(FetchError::Garbage(problems.join("; ")));
    }
    Ok((out, problems))
}

/// Read a store's answer. `status` is `None` when no response arrived (timeout or reset).
pub fn parse_response(store: &Store, status: Option<u32>, body: &[u8], wanted: &[String]) -> Result<Fetched, FetchError> {
    let (doc, version) = read_document(store, status, body)?;
    let (fields, problems) = pick(&doc, wanted)?;
    Ok(Fetched { fields, version, problems })
}

/// Most keys a signing key set may hold.
pub const MAX_KEYSET: usize = 64;

/// Read a signing key set: every field is a key, named by its kid. Unusable fields are skipped
/// (and reported); a set with no usable key at all is garbage.
pub fn parse_keyset(store: &Store, status: Option<u32>, body: &[u8]) -> Result<Fetched, FetchError> {
    let (doc, version) = read_document(store, status, body)?;
    let members = doc.as_object().unwrap_or_default();
    if members.len() > MAX_KEYSET {
        return Err(FetchError::Garbage(format!("a signing key set holds at most {MAX_KEYSET} keys")));
    }
    let names: Vec<String> = members.iter().map(|(k, _)| k.clone()).collect();
    let (fields, problems) = pick(&doc, &names)?;
    let fields = fields.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    Ok(Fetched { fields, version, problems })
}

/// The whole secret document (an object) and its version, for readers that need every key
/// (the revocation list).
pub fn read_document(store: &Store, status: Option<u32>, body: &[u8]) -> Result<(Value, Option<String>), FetchError> {
    read_document_up_to(store, status, body, MAX_BODY)
}

/// `read_document` for answers of up to `max` bytes (the revocation list: `MAX_LIST_BODY`).
pub fn read_document_up_to(store: &Store, status: Option<u32>, body: &[u8], max: usize) -> Result<(Value, Option<String>), FetchError> {
    let Some(status) = status else {
        return Err(FetchError::Transient("no response (timeout or connection failure)".into()));
    };
    if body.len() > max {
        return Err(FetchError::Garbage(format!("answer is larger than {max} bytes")));
    }
    match &store.kind {
        StoreKind::VaultKv2 { .. } => vault_document(status, body),
        StoreKind::AwsSecretsManager => aws_document(status, body),
    }
}

fn vault_document(status: u32, body: &[u8]) -> Result<(Value, Option<String>), FetchError> {
    match status {
        200 | 404 => {}
        401 | 403 => return Err(FetchError::Denied(status)),
        429 | 500..=599 => return Err(FetchError::Transient(format!("HTTP {status}"))),
        _ => return Err(FetchError::Garbage(format!("unexpected HTTP {status}"))),
    }
    // Only the store's own answers count: a 404 from an ingress or a proxy (an HTML page, an empty
    // body) says nothing about the secret, so it is garbage (transient), never "not found".
    let v = json::parse(body).map_err(|e| FetchError::Garbage(format!("HTTP {status}, not JSON: {e}")))?;
    if status == 404 && is_vault_errors(&v) {
        return Err(FetchError::NotFound); // never written, or its metadata deleted
    }
    let data = match v.get("data") {
        Some(d @ Value::Object(_)) => d,
        // A KV v1 body, a response-wrapped one (`wrap_info`, `data: null`): not this protocol.
        _ => return Err(FetchError::Garbage(format!("HTTP {status} without a KV v2 data object"))),
    };
    let meta = data.get("metadata");
    if let Some(m) = meta {
        if matches!(m.get("destroyed"), Some(Value::Bool(true))) {
            return Err(FetchError::NotFound);
        }
        if let Some(Value::Str(t)) = m.get("deletion_time") {
            if !t.is_empty() {
                return Err(FetchError::NotFound);
            }
        }
    }
    if status == 404 {
        return Err(FetchError::Garbage("HTTP 404 that is not the store's own not-found".into()));
    }
    let version = match meta.and_then(|m| m.get("version")) {
        Some(Value::Int(n)) => Some(n.to_string()),
        _ => None,
    };
    match data.get("data") {
        Some(d @ Value::Object(_)) => Ok((d.clone(), version)),
        None | Some(Value::Null) => Err(FetchError::Garbage("no data.data (a KV v1 or wrapped body?)".into())),
        Some(d) => Err(FetchError::Garbage(format!("data.data is a {}", d.kind()))),
    }
}

/// Vault's own error answer: `{"errors": [...]}` and nothing else.
fn is_vault_errors(v: &Value) -> bool {
    let Some(members) = v.as_object() else { return false };
    matches!(v.get("errors"), Some(Value::Array(_))) && members.iter().all(|(k, _)| k == "errors" || k == "warnings")
}

fn aws_document(status: u32, body: &[u8]) -> Result<(Value, Option<String>), FetchError> {
    if status != 200 {
        if (500..=599).contains(&status) {
            return Err(FetchError::Transient(format!("HTTP {status}")));
        }
        let kind = json::parse(body).ok().and_then(|v| v.get("__type").and_then(Value::as_str).map(str::to_string)).unwrap_or_default();
        let kind = kind.rsplit('#').next().unwrap_or_default();
        return Err(match kind {
            "ResourceNotFoundException" => FetchError::NotFound,
            "ThrottlingException" | "InternalServiceError" | "RequestTimeout" => FetchError::Transient(format!("HTTP {status} {kind}")),
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "IncompleteSignature"
            | "MissingAuthenticationToken" => FetchError::Denied(status),
            // A deleted secret answers InvalidRequestException ("marked for deletion").
            "InvalidRequestException" => FetchError::NotFound,
            _ if status == 401 || status == 403 => FetchError::Denied(status),
            _ => FetchError::Garbage(format!("HTTP {status} {kind}")),
        });
    }
    let v = json::parse(body).map_err(|e| FetchError::Garbage(format!("not JSON: {e}")))?;
    let version = v.get("VersionId").and_then(Value::as_str).map(str::to_string);
    let Some(s) = v.get("SecretString") else {
        return Err(FetchError::Garbage("no SecretString (binary secrets are not supported)".into()));
    };
    let Value::Str(s) = s else {
        return Err(FetchError::Garbage("SecretString is not a string".into()));
    };
    let doc = json::parse(s.as_bytes()).map_err(|e| FetchError::Garbage(format!("SecretString is not JSON: {e}")))?;
    if doc.as_object().is_none() {
        return Err(FetchError::Garbage("SecretString is not a JSON object".into()));
    }
    Ok((doc, version))
}

#[cfg(test)]
mod tests;
