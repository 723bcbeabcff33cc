//! Step two of the pipeline, for the engine: the presented credential verified with the
//! configuration's keys (a store-held key or key set may have to be fetched first), checked
//! against the policy and the revocation list.

use super::{unavailable, Lookup, Outcome, Secrets, RETRY_AFTER_UNAVAILABLE_S};
use crate::config::{Config, KeySource};
use crate::credential::copies::Needles;
use crate::credential::extract::{self, CredError, CredentialSource};
use crate::credential::jwt::{self, HmacKey};
use crate::record::Audit;
use crate::response::{Code, Denial};
use std::rc::Rc;

/// A credential that verified: its claims, the identity of the key that did, that key's `kid`,
/// and what a copy of it elsewhere in the request looks like.
pub(super) struct Verified {
    pub claims: Rc<jwt::Claims>,
    pub key_id: u64,
    pub kid: Rc<str>,
    pub copies: Rc<Needles>,
}

/// The prepared key for a kid, and its identity (for the verified-token cache).
enum KeyFor<'a> {
    /// Held in a store.
    Key(Rc<HmacKey>),
    /// From the configuration (the environment).
    Static(&'a HmacKey),
    Unknown,
    Need(usize),
    Failed,
}

fn key_for<'a>(cfg: &'a Config, secrets: &mut impl Secrets, kid: &str) -> KeyFor<'a> {
    match (cfg.key(kid).map(|k| &k.source), cfg.keyset) {
        (Some(KeySource::Ready(k)), _) => KeyFor::Static(k),
        (Some(KeySource::Stored { slot, field }), _) => stored_key(secrets, *slot, field),
        // Kids not configured one by one are looked up in the key set.
        (None, Some(slot)) => stored_key(secrets, slot, kid),
        (None, None) => KeyFor::Unknown,
    }
}

/// A key held in a store: `slot`'s `field`.
fn stored_key<'a>(secrets: &mut impl Secrets, slot: usize, field: &str) -> KeyFor<'a> {
    match secrets.signing_key(slot, field) {
        Lookup::Ready(Some(k)) | Lookup::Stale(Some(k)) => KeyFor::Key(k),
        Lookup::Ready(None) | Lookup::Stale(None) => KeyFor::Unknown,
        Lookup::Pending => KeyFor::Need(slot),
        Lookup::Failed => KeyFor::Failed,
    }
}

/// The identity of a resolved key (`HmacKey::id`: derived from its bytes), if it resolved.
fn key_id(k: &KeyFor) -> Option<u64> {
    match k {
        KeyFor::Key(k) => Some(k.id()),
        KeyFor::Static(k) => Some(k.id()),
        _ => None,
    }
}

/// Verify a presented credential: extract it from `value` (the header `source` names), check its
/// signature with the configuration's keys, its claims against the policy, and the revocation
/// list. The audit gets the subject, jti and run once the signature holds. `Err`: the outcome to
/// answer with (a denial, or what to wait for).
pub(super) fn verify(
    cfg: &Config,
    secrets: &mut impl Secrets,
    source: &CredentialSource,
    value: Option<&[u8]>,
    audit: &mut Audit,
    now_s: i64,
) -> Result<Verified, Outcome> {
    let token = match extract::extract(source, value) {
        Ok(t) => t,
        Err(CredError::Missing) => return Err(Outcome::Deny(Denial::new(Code::MissingCredential, "no credential was presented"))),
        Err(CredError::Duplicate) => return Err(Outcome::Deny(Denial::new(Code::BadRequest, "the credential header is duplicated"))),
        Err(CredError::Malformed) => return Err(Outcome::Deny(Denial::new(Code::InvalidCredential, "the credential is malformed"))),
    };
    // A credential this worker verified before, with the same key: no HMAC, no parse.
    let cached = secrets.verified().and_then(|c| c.get(&token)).map(|e| (e.kid.clone(), e.key, e.claims.clone(), e.copies.clone()));
    let hit = match cached {
        Some((kid, id, claims, copies)) => match key_for(cfg, secrets, &kid) {
            k if key_id(&k) == Some(id) => Some((claims, id, kid, copies)),
            KeyFor::Need(slot) => return Err(Outcome::Need(slot)),
            _ => None,
        },
        None => None,
    };
    let (claims, key_id, kid, copies) = match hit {
        Some(c) => c,
        None => {
            let unverified = match jwt::parse(&token) {
                Ok(u) => u,
                Err(e) => return Err(Outcome::Deny(Denial::new(Code::InvalidCredential, e.public_message()))),
            };
            let key = key_for(cfg, secrets, &unverified.kid);
            let payload = match &key {
                KeyFor::Static(k) => unverified.verify(k),
                KeyFor::Key(k) => unverified.verify(k),
                KeyFor::Unknown => Err(jwt::TokenError::UnknownKid(String::new())),
                KeyFor::Need(slot) => return Err(Outcome::Need(*slot)),
                KeyFor::Failed => return Err(Outcome::Deny(unavailable())),
            };
            let claims = match payload.and_then(jwt::parse_claims) {
                Ok(c) => Rc::new(c),
                Err(e) => return Err(Outcome::Deny(Denial::new(Code::InvalidCredential, e.public_message()))),
            };
            let id = key_id(&key).unwrap_or_default();
            let copies = Rc::new(Needles::of(&token));
            if let Some(cache) = secrets.verified() {
                cache.insert(&token, &unverified.kid, id, claims.clone(), copies.clone());
            }
            (claims, id, Rc::from(unverified.kid), copies)
        }
    };
    audit.subject = Some(claims.sub.clone());
    audit.jti = Some(claims.jti.clone());
    audit.run.clone_from(&claims.run);
    if let Err(e) = cfg.policy.check(&claims, now_s) {
        let code = if e.code() == "expired_credential" { Code::ExpiredCredential } else { Code::InvalidCredential };
        return Err(Outcome::Deny(Denial::new(code, e.public_message())));
    }
    // A derived credential is revoked with its parent.
    let revoked = match (secrets.revoked(&claims.jti, &claims.sub), claims.par.as_deref()) {
        (Lookup::Ready(false), Some(par)) => secrets.revoked(par, &claims.sub),
        (Lookup::Stale(false), Some(par)) => match secrets.revoked(par, &claims.sub) {
            Lookup::Ready(r) => Lookup::Stale(r),
            other => other,
        },
        (l, _) => l,
    };
    match revoked {
        Lookup::Ready(false) | Lookup::Stale(false) => {}
        Lookup::Ready(true) | Lookup::Stale(true) => {
            return Err(Outcome::Deny(Denial::new(Code::RevokedCredential, "the credential has been revoked")));
        }
        // Never an unchecked request: wait for the list, or refuse.
        Lookup::Pending => return Err(Outcome::NeedRevocation),
        Lookup::Failed => {
            let d = Denial::new(Code::SecretUnavailable, "the revocation list is unavailable; try again later");
            return Err(Outcome::Deny(d.retry_after(RETRY_AFTER_UNAVAILABLE_S)));
        }
    }
    Ok(Verified { claims, key_id, kid, copies })
}

/// The credential presented to the issuing endpoint (the `Authorization` value, `Bearer …`),
/// verified as for a request (signature, policy, revocation): the parent of an `attenuate` grant,
/// with the `kid` that signed it.
pub fn verify_bearer(
    cfg: &Config,
    authorization: Option<&[u8]>,
    secrets: &mut impl Secrets,
    audit: &mut Audit,
    now_s: i64,
) -> Result<(Rc<jwt::Claims>, String), Outcome> {
    verify(cfg, secrets, &CredentialSource::Bearer, authorization, audit, now_s).map(|v| (v.claims, v.kid.to_string()))
}

/// The identity of the key `kid` names here (the limit entries of credentials it signed are
/// named by it). `Err`: wait for it, or refuse.
pub(super) fn key_identity(cfg: &Config, secrets: &mut impl Secrets, kid: &str) -> Result<u64, Outcome> {
    let k = key_for(cfg, secrets, kid);
    match (key_id(&k), k) {
        (Some(id), _) => Ok(id),
        (None, KeyFor::Need(slot)) => Err(Outcome::Need(slot)),
        (None, KeyFor::Failed) => Err(Outcome::Deny(unavailable())),
        (None, _) => Err(Outcome::Deny(Denial::new(Code::InvalidCredential, "the key that signed the parent credential is not known here"))),
    }
}
