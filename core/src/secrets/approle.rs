//! Vault AppRole authentication: the login and renewal callouts, their answers, and the session
//! lifecycle shared by every worker of the process (one record in Envoy shared data, updated
//! with compare-and-swap, like the secret cache).
//!
//! - **login** (`POST /v1/auth/<mount>/login` with `role_id` and `secret_id`) when there is no
//!   usable token, when renewal is refused, or after the store answered 403 to the current token;
//! - **renewal** (`POST /v1/auth/token/renew-self`) once two thirds of the token's granted lease
//!   have passed (and at least two seconds before it ends), so no request waits for a login at
//!   the lease boundary;
//! - when the token is not renewable, or its grants shrink (the role's `token_max_ttl` is near),
//!   the renewal is a fresh login instead, done while the old token is still valid;
//! - a **lease** makes one worker log in or renew while the others keep using the current token;
//! - a failed login or renewal is retried after `RETRY_MS`; the old token is used while valid.
//!
//! Layout, version 1: `"KWA1" | lease_until_ms u64 | failed_at_ms u64 | generation u64 |
//! has_session u8 | [session]`, a session being `obtained_ms u64 | renewed_ms u64 | expires_ms u64
//! | granted_ms u64 | login_ms u64 | renewable u8 | token len u16 + bytes`.

use crate::config::{Store, StoreKind, VaultAuth};
use crate::secret::Secret;
use crate::secrets::store::{header, FetchError, HttpCall};
use crate::wire::json::{self, Value};
use crate::wire::Reader;

const MAGIC: &[u8; 4] = b"KWA1";
/// After a failed login or renewal, wait this long before the next attempt.
pub const RETRY_MS: u64 = 1000;
/// A token is not used in its last second (it could expire on the way to the store).
pub const EXPIRY_MARGIN_MS: u64 = 1000;
/// Longest token accepted from a login answer.
const MAX_TOKEN: usize = 4096;

/// A Vault token and its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub token: Secret,
    /// When the token was issued by a login.
    pub obtained_ms: u64,
    /// When it was last renewed (or obtained).
    pub renewed_ms: u64,
    /// When it stops being valid (`u64::MAX`: no expiry).
    pub expires_ms: u64,
    /// The lease granted by the last login or renewal.
    pub granted_ms: u64,
    /// The lease granted by the login.
    pub login_ms: u64,
    pub renewable: bool,
}

/// What the holder of a session should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing: the token is good for a while.
    Nothing,
    /// Extend the current token.
    Renew,
    /// Log in again (no token, an expired or refused one, or one that cannot be renewed).
    Login,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    pub session: Option<Session>,
    pub lease_until_ms: u64,
    pub failed_at_ms: u64,
    /// Counts sessions; a 403 invalidates only the session it was answered to.
    pub generation: u64,
}

impl SessionState {
    /// The token to use now, with its generation, if there is a valid one.
    pub fn session_token(&self, now_ms: u64) -> Option<(&Secret, u64)> {
        let s = self.session.as_ref()?;
        let valid = s.expires_ms == u64::MAX || now_ms.saturating_add(EXPIRY_MARGIN_MS) < s.expires_ms;
        valid.then_some((&s.token, self.generation))
    }

    /// What is due now (ignoring leases).
    pub fn next(&self, now_ms: u64) -> Next {
        let Some(s) = &self.session else { return Next::Login };
        if self.session_token(now_ms).is_none() {
            return Next::Login;
        }
        if s.expires_ms == u64::MAX {
            return Next::Nothing;
        }
        // Two thirds into the lease, and while the token still has a clear second to live.
        let g = s.granted_ms;
        let lead = if g > 3 * EXPIRY_MARGIN_MS { (g.saturating_mul(2) / 3).min(g - 2 * EXPIRY_MARGIN_MS) } else { g / 3 };
        let renew_at = s.renewed_ms.saturating_add(lead);
        if now_ms < renew_at {
            return Next::Nothing;
        }
        // Renewal would not buy much: the role's max TTL is near, or the token is not renewable.
        if !s.renewable || s.granted_ms.saturating_mul(2) < s.login_ms {
            Next::Login
        } else {
            Next::Renew
        }
    }

    /// Is a login or renewal due, not in flight elsewhere, and not just failed?
    pub fn due(&self, now_ms: u64) -> Next {
        let recently_failed = self.failed_at_ms != 0 && now_ms < self.failed_at_ms.saturating_add(RETRY_MS);
        if now_ms < self.lease_until_ms || recently_failed {
            return Next::Nothing;
        }
        self.next(now_ms)
    }

    /// Take the lease for a login or renewal; false when another worker holds it.
    pub fn take_lease(&mut self, now_ms: u64, lease_ms: u64) -> bool {
        if now_ms < self.lease_until_ms {
            return false;
        }
        self.lease_until_ms = now_ms.saturating_add(lease_ms);
        true
    }

    /// Record a login's or renewal's answer. A refused renewal (the token is gone) drops the
    /// session, so the next step is a login; any other failure keeps the token while it is valid.
    pub fn record(&mut self, result: Result<Grant, FetchError>, renewal: bool, now_ms: u64) {
        self.lease_until_ms = 0;
        match result {
            Ok(g) => {
                self.failed_at_ms = 0;
                let expires_ms = if g.lease_s == 0 { u64::MAX } else { now_ms.saturating_add(g.lease_s.saturating_mul(1000)) };
                let granted_ms = g.lease_s.saturating_mul(1000);
                match (&mut self.session, renewal) {
                    (Some(s), true) => {
                        s.renewed_ms = now_ms;
                        s.expires_ms = expires_ms;
                        s.granted_ms = granted_ms;
                        s.renewable = g.renewable;
                        if !g.token.is_empty() {
                            s.token = g.token;
                        }
                    }
                    _ => {
                        self.generation = self.generation.wrapping_add(1);
                        self.session = Some(Session {
                            token: g.token,
                            obtained_ms: now_ms,
                            renewed_ms: now_ms,
                            expires_ms,
                            granted_ms,
                            login_ms: granted_ms,
                            renewable: g.renewable,
                        });
                    }
                }
            }
            Err(FetchError::Denied(_)) if renewal => {
                self.session = None;
            }
            Err(_) => self.failed_at_ms = now_ms,
        }
    }

    /// The store refused the token of `generation` (HTTP 403): drop it, unless a newer session
    /// already replaced it. Returns whether anything changed.
    pub fn invalidate(&mut self, generation: u64) -> bool {
        if self.generation != generation || self.session.is_none() {
            return false;
        }
        self.session = None;
        self.failed_at_ms = 0;
        true
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.lease_until_ms.to_le_bytes());
        b.extend_from_slice(&self.failed_at_ms.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        match &self.session {
            None => b.push(0),
            Some(s) => {
                b.push(1);
                for v in [s.obtained_ms, s.renewed_ms, s.expires_ms, s.granted_ms, s.login_ms] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.push(u8::from(s.renewable));
                let t = s.token.expose();
                let n = t.len().min(MAX_TOKEN);
                b.extend_from_slice(&(n as u16).to_le_bytes());
                b.extend_from_slice(t.get(..n).unwrap_or_default());
            }
        }
        b
    }

    pub fn decode(bytes: &[u8]) -> Option<SessionState> {
        let mut r = Reader::new(bytes);
        if r.take(4)? != MAGIC {
            return None;
        }
        let mut st = SessionState { lease_until_ms: r.u64()?, failed_at_ms: r.u64()?, generation: r.u64()?, session: None };
        if r.u8()? == 1 {
            let (obtained_ms, renewed_ms, expires_ms, granted_ms, login_ms) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let renewable = r.u8()? == 1;
            let n = usize::from(r.u16()?);
            let token = Secret::new(r.take(n)?.to_vec());
            st.session = Some(Session { token, obtained_ms, renewed_ms, expires_ms, granted_ms, login_ms, renewable });
        }
        r.done().then_some(st)
    }
}

/// A token and lease from a login or renewal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token: Secret,
    /// Seconds; 0 means the token does not expire.
    pub lease_s: u64,
    pub renewable: bool,
}

fn base_headers(store: &Store, path: &str) -> Vec<(String, Secret)> {
    let mut h = vec![
        header(":method", "POST"),
        header(":path", path),
        header(":authority", &store.authority),
        header("content-type", "application/json"),
        header("accept", "application/json"),
    ];
    if let StoreKind::VaultKv2 { namespace: Some(ns), .. } = &store.kind {
        h.push(header("x-vault-namespace", ns));
    }
    h
}

/// The AppRole login callout (`None` for a store that does not log in).
pub fn login_call(store: &Store) -> Option<HttpCall> {
    let StoreKind::VaultKv2 { auth: VaultAuth::AppRole { mount, role_id, secret_id }, .. } = &store.kind else {
        return None;
    };
    let mut body = String::from("{\"role_id\":");
    json::write_str(&mut body, role_id.expose_str().unwrap_or_default());
    body.push_str(",\"secret_id\":");
    json::write_str(&mut body, secret_id.expose_str().unwrap_or_default());
    body.push('}');
    let headers = base_headers(store, &format!("/v1/auth/{mount}/login"));
    Some(HttpCall { cluster: store.cluster.clone(), headers, body: Some(body.into_bytes()), timeout_ms: store.timeout_ms })
}

/// The callout that renews `token` itself.
pub fn renew_call(store: &Store, token: &Secret) -> HttpCall {
    let mut headers = base_headers(store, "/v1/auth/token/renew-self");
    headers.push((String::from("x-vault-token"), token.clone()));
    HttpCall { cluster: store.cluster.clone(), headers, body: Some(b"{}".to_vec()), timeout_ms: store.timeout_ms }
}

/// Read a login or renewal answer. 400/401/403 are authoritative refusals (a wrong or used-up
/// secret_id, a revoked token); 429, 5xx and no answer are transient.
pub fn parse_grant(status: Option<u32>, body: &[u8]) -> Result<Grant, FetchError> {
    let Some(status) = status else {
        return Err(FetchError::Transient("no response (timeout or connection failure)".into()));
    };
    match status {
        200 => {}
        400 | 401 | 403 => return Err(FetchError::Denied(status)),
        429 | 500..=599 => return Err(FetchError::Transient(format!("HTTP {status}"))),
        _ => return Err(FetchError::Garbage(format!("unexpected HTTP {status}"))),
    }
    if body.len() > crate::secrets::store::MAX_BODY {
        return Err(FetchError::Garbage("answer is too large".into()));
    }
    let v = json::parse(body).map_err(|e| FetchError::Garbage(format!("not JSON: {e}")))?;
    let Some(auth) = v.get("auth").filter(|a| a.as_object().is_some()) else {
        return Err(FetchError::Garbage("no auth object".into()));
    };
    let token = match auth.get("client_token") {
        Some(Value::Str(t)) if !t.is_empty() && t.len() <= MAX_TOKEN && t.bytes().all(|b| b.is_ascii_graphic()) => Secret::text(t),
        Some(Value::Str(_)) => return Err(FetchError::Garbage("auth.client_token is not a usable token".into())),
        _ => return Err(FetchError::Garbage("auth.client_token is missing".into())),
    };
    let lease_s = match auth.get("lease_duration") {
        Some(Value::Int(n)) if *n >= 0 => *n as u64,
        _ => return Err(FetchError::Garbage("auth.lease_duration is not a non-negative integer".into())),
    };
    let renewable = matches!(auth.get("renewable"), Some(Value::Bool(true)));
    Ok(Grant { token, lease_s, renewable })
}

#[cfg(test)]
mod tests;
