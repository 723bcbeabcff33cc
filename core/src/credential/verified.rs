//! Verified credentials, remembered per worker so that a workload calling again with the same
//! credential costs a hash lookup instead of an HMAC and a JSON parse (the two largest costs of
//! the warm path, measured with callgrind: see the README's performance section).
//!
//! An entry is keyed by the credential's exact text and remembers which key verified it (the
//! key's identity, derived from its bytes). A hit counts only if the same `kid` still resolves to that
//! same prepared key: a key removed from the store or rotated misses, and is verified again.
//! Only verified credentials enter; the policy (time bounds, audience, issuer), revocation, rules
//! and limits are checked on every request as before. The cache is bounded: when full, it is
//! emptied (an attacker with many valid credentials can only make it miss).

use crate::credential::copies::Needles;
use crate::credential::jwt::Claims;
use std::rc::Rc;

/// Most credentials remembered per worker.
pub const MAX_ENTRIES: usize = 512;

pub struct Entry {
    pub kid: Rc<str>,
    /// The identity of the key that verified it (`HmacKey::id`, derived from the key's bytes).
    pub key: u64,
    pub claims: Rc<Claims>,
    /// What a copy of it elsewhere in a request looks like (`credential::copies`).
    pub copies: Rc<Needles>,
}

#[derive(Default)]
pub struct VerifiedCache {
    map: crate::Map<Box<str>, Entry>,
}

impl VerifiedCache {
    pub fn get(&self, token: &str) -> Option<&Entry> {
        self.map.get(token)
    }

    pub fn insert(&mut self, token: &str, kid: &str, key: u64, claims: Rc<Claims>, copies: Rc<Needles>) {
        if self.map.len() >= MAX_ENTRIES {
            self.map.clear();
        }
        self.map.insert(token.into(), Entry { kid: kid.into(), key, claims, copies });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::limits::Limits;

    fn claims(sub: &str) -> Rc<Claims> {
        Rc::new(Claims {
            sub: sub.into(),
            aud: vec![],
            iss: None,
            exp: 0,
            nbf: None,
            iat: None,
            jti: "j".into(),
            allow: vec![],
            pkid: None,
            pexp: None,
            run: None,
            lim: Limits::default(),
            par: None,
            plim: Limits::default(),
        })
    }

    #[test]
    fn remembers_by_exact_text_and_stays_bounded() {
        let mut c = VerifiedCache::default();
        c.insert("a.b.c", "k1", 7, claims("s"), Rc::default());
        assert_eq!(c.get("a.b.c").map(|e| (e.kid.as_ref(), e.key, e.claims.sub.as_str())), Some(("k1", 7, "s")));
        assert!(c.get("a.b.C").is_none() && c.get("a.b.c ").is_none());
        for i in 0..MAX_ENTRIES {
            c.insert(&format!("t{i}"), "k1", 7, claims("s"), Rc::default());
        }
        assert!(c.len() <= MAX_ENTRIES);
        assert!(c.get("a.b.c").is_none(), "emptied when full");
    }
}
