//! The workload credential: a JWS compact HS256 JWT.
//!
//! Verification order: structure and header (alg, kid, crit) -> MAC with the key named by `kid`
//! (constant-time) -> claims JSON (strict, no duplicate keys) -> claim types -> time, audience,
//! issuer. Claims are never interpreted before the MAC is verified.

use crate::policy::limits::Limits;
use crate::policy::rules::TokenRule;
use crate::wire::b64;
use crate::wire::json::{self, Value};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt;

pub const MAX_TOKEN_LEN: usize = 8192;
pub const MAX_RUN_LEN: usize = 128;
pub const MAX_ID_LEN: usize = 256;
pub const MAX_RULES: usize = 64;
pub const MIN_KEY_LEN: usize = 32;

/// An HS256 key with its HMAC state prepared once (inner and outer pads hashed).
#[derive(Clone)]
pub struct HmacKey {
    mac: Hmac<Sha256>,
    id: u64,
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

impl HmacKey {
    /// Keys shorter than 32 bytes are refused.
    pub fn new(key: &[u8]) -> Result<HmacKey, String> {
        if key.len() < MIN_KEY_LEN {
            return Err(format!("key is {} bytes; at least {MIN_KEY_LEN} are required", key.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| "invalid key".to_string())?;
        let mut m = mac.clone();
        m.update(b"keyward/v1/key-identity");
        let tag: [u8; 32] = m.finalize().into_bytes().into();
        let id = tag.iter().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        Ok(HmacKey { mac, id })
    }

    /// The key's identity: derived from the key itself (a MAC of a fixed label), so the same
    /// bytes have the same identity in every worker and a rotated key never shares one with its
    /// predecessor. It names the key in caches and shared data without revealing it.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn sign(&self, data: &[u8]) -> [u8; 32] {
        let mut m = self.mac.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Constant-time MAC check.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        m.update(data);
        m.verify_slice(tag).is_ok()
    }
}

/// Every reason a credential is refused. `code()` maps each to the contract's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    TooLong,
    NotThreeParts,
    BadBase64(&'static str),
    BadJson(&'static str, String),
    HeaderNotObject,
    BadAlg(String),
    BadTyp,
    MissingKid,
    BadKid,
    Crit,
    UnknownKid(String),
    KeyUnavailable(String),
    BadSignature,
    ClaimsNotObject,
    MissingClaim(&'static str),
    ClaimType(&'static str, &'static str),
    BadClaim(&'static str, String),
    Expired { exp: i64, now: i64 },
    NotYetValid { nbf: i64, now: i64 },
    IssuedInFuture { iat: i64, now: i64 },
    LifetimeTooLong { lifetime: i64, max: i64 },
    WrongAudience,
    WrongIssuer,
}

impl TokenError {
    /// The contract's `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Expired { .. } => "expired_credential",
            _ => "invalid_credential",
        }
    }

    /// A one-line message safe to return to the client: it never echoes token content.
    pub fn public_message(&self) -> &'static str {
        match self {
            TokenError::Expired { .. } => "the credential has expired",
            TokenError::NotYetValid { .. } => "the credential is not valid yet",
            TokenError::IssuedInFuture { .. } => "the credential was issued in the future",
            TokenError::LifetimeTooLong { .. } => "the credential's lifetime exceeds the allowed maximum",
            TokenError::WrongAudience => "the credential is not for this audience",
            TokenError::WrongIssuer => "the credential has the wrong issuer",
            TokenError::UnknownKid(_) => "the credential's signing key is unknown",
            TokenError::BadSignature => "the credential's signature is invalid",
            TokenError::BadAlg(_) => "the credential must be signed with HS256",
            TokenError::MissingClaim(_) | TokenError::ClaimType(..) | TokenError::BadClaim(..) => "the credential's claims are invalid",
            _ => "the credential is malformed",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::TooLong => write!(f, "token is longer than {MAX_TOKEN_LEN} bytes"),
            TokenError::NotThreeParts => f.write_str("token is not three base64url parts separated by '.'"),
            TokenError::BadBase64(part) => write!(f, "{part} is not unpadded base64url"),
            TokenError::BadJson(part, e) => write!(f, "{part} is not valid JSON: {e}"),
            TokenError::HeaderNotObject => f.write_str("header is not a JSON object"),
            TokenError::BadAlg(a) => write!(f, "alg is {a}; only \"HS256\" is accepted"),
            TokenError::BadTyp => f.write_str("typ must be \"JWT\" when present"),
            TokenError::MissingKid => f.write_str("header has no kid"),
            TokenError::BadKid => f.write_str("kid must be a non-empty printable string"),
            TokenError::Crit => f.write_str("header lists critical extensions (crit), none are supported"),
            TokenError::UnknownKid(k) => write!(f, "kid {k:?} is not a configured signing key"),
            TokenError::KeyUnavailable(k) => write!(f, "signing key {k:?} could not be loaded"),
            TokenError::BadSignature => f.write_str("signature does not verify"),
            TokenError::ClaimsNotObject => f.write_str("claims are not a JSON object"),
            TokenError::MissingClaim(c) => write!(f, "required claim {c} is missing"),
            TokenError::ClaimType(c, t) => write!(f, "claim {c} must be {t}"),
            TokenError::BadClaim(c, why) => write!(f, "claim {c}: {why}"),
            TokenError::Expired { exp, now } => write!(f, "expired at {exp} (now {now})"),
            TokenError::NotYetValid { nbf, now } => write!(f, "not valid before {nbf} (now {now})"),
            TokenError::IssuedInFuture { iat, now } => write!(f, "issued at {iat}, in the future (now {now})"),
            TokenError::LifetimeTooLong { lifetime, max } => {
                write!(f, "expires {lifetime}s from now; the maximum is {max}s")
            }
            TokenError::WrongAudience => f.write_str("aud does not contain the configured audience"),
            TokenError::WrongIssuer => f.write_str("iss does not equal the configured issuer"),
        }
    }
}

/// A structurally valid token whose MAC has not been checked yet.
#[derive(Debug)]
pub struct Unverified<'a> {
    pub kid: String,
    signing_input: &'a [u8],
    payload: Vec<u8>,
    signature: Vec<u8>,
}

fn printable(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.chars().all(|c| !c.is_control())
}

/// Parse the compact form and the header.
pub fn parse(token: &str) -> Result<Unverified<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let b = token.as_bytes();
    let mut dots = b.iter().enumerate().filter(|(_, c)| **c == b'.').map(|(i, _)| i);
    let (Some(d1), Some(d2), None) = (dots.next(), dots.next(), dots.next()) else {
        return Err(TokenError::NotThreeParts);
    };
    let (h64, p64, s64) = (b.get(..d1).unwrap_or_default(), b.get(d1 + 1..d2).unwrap_or_default(), b.get(d2 + 1..).unwrap_or_default());
    if h64.is_empty() || p64.is_empty() || s64.is_empty() {
        return Err(TokenError::NotThreeParts);
    }
    let header = b64::jws_decode(h64).ok_or(TokenError::BadBase64("header"))?;
    let signature = b64::jws_decode(s64).ok_or(TokenError::BadBase64("signature"))?;
    // The payload is decoded now (once), so a malformed token is malformed whatever the key.
    let payload = b64::jws_decode(p64).ok_or(TokenError::BadBase64("payload"))?;
    let h = json::parse(&header).map_err(|e| TokenError::BadJson("header", e.to_string()))?;
    if h.as_object().is_none() {
        return Err(TokenError::HeaderNotObject);
    }
    match h.get("alg") {
        Some(Value::Str(a)) if a == "HS256" => {}
        Some(Value::Str(a)) => return Err(TokenError::BadAlg(format!("{a:?}"))),
        Some(v) => return Err(TokenError::BadAlg(v.kind().to_string())),
        None => return Err(TokenError::BadAlg("missing".into())),
    }
    match h.get("typ") {
        None => {}
        Some(Value::Str(t)) if t.eq_ignore_ascii_case("JWT") => {}
        Some(_) => return Err(TokenError::BadTyp),
    }
    if h.get("crit").is_some() {
        return Err(TokenError::Crit);
    }
    let kid = match h.get("kid") {
        None => return Err(TokenError::MissingKid),
        Some(Value::Str(k)) if printable(k) && k.len() <= 128 => k.clone(),
        Some(_) => return Err(TokenError::BadKid),
    };
    Ok(Unverified { kid, signing_input: b.get(..d2).unwrap_or_default(), payload, signature })
}

impl Unverified<'_> {
    /// Check the MAC; on success return the claims bytes (not yet parsed).
    pub fn verify(&self, key: &HmacKey) -> Result<&[u8], TokenError> {
        if !key.verify(self.signing_input, &self.signature) {
            return Err(TokenError::BadSignature);
        }
        Ok(&self.payload)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub aud: Vec<String>,
    pub iss: Option<String>,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    pub jti: String,
    pub allow: Vec<TokenRule>,
    pub run: Option<String>,
    pub lim: Limits,
    /// The parent's `jti`, for a credential derived by the `attenuate` grant: revoking the parent
    /// revokes it, and its requests count against the parent's limits too.
    pub par: Option<String>,
    /// The parent's limits when this credential was derived: its requests count against the
    /// parent's entry under these.
    pub plim: Limits,
    /// The `kid` the parent was signed with: the parent's limit entry is named by the key that
    /// verifies it, so its own requests and its children's count in one entry whatever key
    /// signed each. Absent in children issued before it was carried: counted under their own key.
    pub pkid: Option<String>,
    /// The parent's `exp`: its limit entry is kept until then (not only until a child's end),
    /// so children issued one after another all count against the same budget.
    pub pexp: Option<i64>,
}

fn req<'a>(o: &'a Value, name: &'static str) -> Result<&'a Value, TokenError> {
    o.get(name).ok_or(TokenError::MissingClaim(name))
}

fn id_str(v: &Value, name: &'static str) -> Result<String, TokenError> {
    match v {
        Value::Str(s) if s.is_empty() => Err(TokenError::BadClaim(name, "must not be empty".into())),
        Value::Str(s) if s.len() > MAX_ID_LEN => Err(TokenError::BadClaim(name, format!("longer than {MAX_ID_LEN} bytes"))),
        Value::Str(s) if s.chars().any(char::is_control) => Err(TokenError::BadClaim(name, "contains a control character".into())),
        Value::Str(s) => Ok(s.clone()),
        _ => Err(TokenError::ClaimType(name, "a string")),
    }
}

fn numeric_date(v: &Value, name: &'static str) -> Result<i64, TokenError> {
    match v {
        Value::Int(n) if *n >= 0 => Ok(*n),
        _ => Err(TokenError::ClaimType(name, "a non-negative integer NumericDate")),
    }
}

fn positive(v: &Value, name: &'static str) -> Result<u64, TokenError> {
    match v {
        Value::Int(n) if *n > 0 => Ok(*n as u64),
        _ => Err(TokenError::ClaimType(name, "a positive integer")),
    }
}

/// A spend cap: an integer from 0 to `cost::MAX_COST`.
fn amount(v: &Value, name: &'static str) -> Result<u64, TokenError> {
    match v {
        Value::Int(n) if *n >= 0 && (*n as u64) <= crate::policy::cost::MAX_COST => Ok(*n as u64),
        _ => Err(TokenError::ClaimType(name, "an integer from 0 to 10^15")),
    }
}

/// Parse and type-check the claims (after the MAC has been verified).
pub fn parse_claims(payload: &[u8]) -> Result<Claims, TokenError> {
    let v = json::parse(payload).map_err(|e| TokenError::BadJson("claims", e.to_string()))?;
    if v.as_object().is_none() {
        return Err(TokenError::ClaimsNotObject);
    }
    let sub = id_str(req(&v, "sub")?, "sub")?;
    let jti = id_str(req(&v, "jti")?, "jti")?;
    let aud = match req(&v, "aud")? {
        Value::Str(s) => vec![s.clone()],
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                match i {
                    Value::Str(s) => out.push(s.clone()),
                    _ => return Err(TokenError::ClaimType("aud", "a string or an array of strings")),
                }
            }
            out
        }
        _ => return Err(TokenError::ClaimType("aud", "a string or an array of strings")),
    };
    let iss = match v.get("iss") {
        None => None,
        Some(Value::Str(s)) => Some(s.clone()),
        Some(_) => return Err(TokenError::ClaimType("iss", "a string")),
    };
    let exp = numeric_date(req(&v, "exp")?, "exp")?;
    let nbf = v.get("nbf").map(|x| numeric_date(x, "nbf")).transpose()?;
    let iat = v.get("iat").map(|x| numeric_date(x, "iat")).transpose()?;
    let allow = match req(&v, "allow")? {
        Value::Array(items) if items.is_empty() => return Err(TokenError::BadClaim("allow", "must not be empty".into())),
        Value::Array(items) if items.len() > MAX_RULES => return Err(TokenError::BadClaim("allow", format!("more than {MAX_RULES} rules"))),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                let Value::Str(s) = i else {
                    return Err(TokenError::ClaimType("allow", "an array of rule strings"));
                };
                out.push(TokenRule::parse(s).map_err(|e| TokenError::BadClaim("allow", e))?);
            }
            out
        }
        _ => return Err(TokenError::ClaimType("allow", "an array of rule strings")),
    };
    let run = match v.get("run") {
        None => None,
        Some(Value::Str(s)) if s.len() > MAX_RUN_LEN => return Err(TokenError::BadClaim("run", format!("longer than {MAX_RUN_LEN} bytes"))),
        Some(Value::Str(s)) if s.chars().any(char::is_control) => return Err(TokenError::BadClaim("run", "contains a control character".into())),
        Some(Value::Str(s)) => Some(s.clone()),
        Some(_) => return Err(TokenError::ClaimType("run", "a string")),
    };
    let limits = |name: &'static str| -> Result<Limits, TokenError> {
        Ok(match v.get(name) {
            None => Limits::default(),
            Some(Value::Object(members)) => {
                let mut l = Limits::default();
                for (k, x) in members {
                    match k.as_str() {
                        "rpm" => l.rpm = Some(positive(x, if name == "lim" { "lim.rpm" } else { "plim.rpm" })?),
                        "total" => l.total = Some(positive(x, if name == "lim" { "lim.total" } else { "plim.total" })?),
                        "spend" => l.spend = Some(amount(x, if name == "lim" { "lim.spend" } else { "plim.spend" })?),
                        _ => return Err(TokenError::BadClaim(name, format!("unknown limit {k:?}"))),
                    }
                }
                l
            }
            Some(_) => return Err(TokenError::ClaimType(name, "an object")),
        })
    };
    let lim = limits("lim")?;
    let plim = limits("plim")?;
    let par = v.get("par").map(|p| id_str(p, "par")).transpose()?;
    let pkid = v.get("pkid").map(|p| id_str(p, "pkid")).transpose()?;
    let pexp = v.get("pexp").map(|x| numeric_date(x, "pexp")).transpose()?;
    Ok(Claims { sub, aud, iss, exp, nbf, iat, jti, allow, run, lim, par, plim, pkid, pexp })
}

/// A fingerprint of a configuration's own signing keys (their identities, in any order): mixed
/// into the names of stores whose identity holds no secret, so that another module sharing the
/// VM (Istio gives every WasmPlugin the same empty `vm_id`) can neither read those records nor
/// plant one. 128 bits, from a MAC of each key: no key can be recovered from it. Empty without
/// keys from the environment.
pub fn keys_scope(ids: impl Iterator<Item = u64>) -> String {
    let mut ids: Vec<u64> = ids.collect();
    if ids.is_empty() {
        return String::new();
    }
    ids.sort_unstable();
    ids.dedup();
    let mut h = Sha256::new();
    h.update(b"keyward/v1/scope\0");
    for id in ids {
        h.update(id.to_be_bytes());
    }
    h.finalize().iter().take(16).fold(String::with_capacity(32), |mut acc, b| {
        acc.push_str(&format!("{b:02x}"));
        acc
    })
}

/// What the deployment requires of every credential.
#[derive(Debug, Clone)]
pub struct Policy {
    pub audience: String,
    pub issuer: Option<String>,
    pub clock_skew_s: i64,
    pub max_token_lifetime_s: i64,
}

impl Policy {
    /// Time, audience and issuer checks. `now` is seconds since the epoch.
    pub fn check(&self, c: &Claims, now: i64) -> Result<(), TokenError> {
        let skew = self.clock_skew_s;
        if now >= c.exp.saturating_add(skew) {
            return Err(TokenError::Expired { exp: c.exp, now });
        }
        if let Some(nbf) = c.nbf {
            if now.saturating_add(skew) < nbf {
                return Err(TokenError::NotYetValid { nbf, now });
            }
        }
        if let Some(iat) = c.iat {
            if iat > now.saturating_add(skew) {
                return Err(TokenError::IssuedInFuture { iat, now });
            }
        }
        let lifetime = c.exp.saturating_sub(now);
        if lifetime > self.max_token_lifetime_s.saturating_add(skew) {
            return Err(TokenError::LifetimeTooLong { lifetime, max: self.max_token_lifetime_s });
        }
        if !c.aud.contains(&self.audience) {
            return Err(TokenError::WrongAudience);
        }
        if let Some(want) = &self.issuer {
            if c.iss.as_deref() != Some(want.as_str()) {
                return Err(TokenError::WrongIssuer);
            }
        }
        Ok(())
    }
}

/// Sign a claims document (any JSON object text) as an HS256 JWT with the given `kid`.
pub fn mint(kid: &str, key: &HmacKey, claims_json: &str) -> String {
    let mut header = String::from("{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":");
    json::write_str(&mut header, kid);
    header.push('}');
    let mut out = b64::jws_encode(header.as_bytes());
    out.push('.');
    out.push_str(&b64::jws_encode(claims_json.as_bytes()));
    let sig = key.sign(out.as_bytes());
    out.push('.');
    out.push_str(&b64::jws_encode(&sig));
    out
}

#[cfg(test)]
mod tests;
