//! The revocation list: a KV secret whose keys are `jti:<jti>` or `sub:<sub>` (values are free
//! text, e.g. a reason, and are ignored). Shared by all workers through Envoy shared data.
//! Shared-data layout: `"KWR2" | fetched_at_ms u64 | version u64 | entries separated by '\n'`
//! (`version`: the store's KV v2 version of the list, 0 when the store has none or the list was
//! confirmed missing).

use crate::wire::json::Value;
use std::collections::HashSet;

const MAGIC: &[u8; 4] = b"KWR2";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    pub fetched_at_ms: u64,
    /// The store's version of the list (0: none known).
    pub version: u64,
    jtis: HashSet<String>,
    subs: HashSet<String>,
}

impl RevocationList {
    /// Read the KV document. Keys that are neither `jti:` nor `sub:`, or that hold control
    /// characters, are ignored; the count of ignored keys is returned for a warning.
    pub fn from_document(doc: &Value, fetched_at_ms: u64) -> (RevocationList, usize) {
        let mut l = RevocationList { fetched_at_ms, ..RevocationList::default() };
        let mut ignored = 0;
        for (k, _) in doc.as_object().unwrap_or_default() {
            if k.chars().any(char::is_control) {
                ignored += 1;
            } else if let Some(j) = k.strip_prefix("jti:").filter(|j| !j.is_empty()) {
                l.jtis.insert(j.to_string());
            } else if let Some(s) = k.strip_prefix("sub:").filter(|s| !s.is_empty()) {
                l.subs.insert(s.to_string());
            } else {
                ignored += 1;
            }
        }
        (l, ignored)
    }

    pub fn empty(fetched_at_ms: u64) -> RevocationList {
        RevocationList { fetched_at_ms, ..RevocationList::default() }
    }

    pub fn is_revoked(&self, jti: &str, sub: &str) -> bool {
        self.jtis.contains(jti) || self.subs.contains(sub)
    }

    pub fn len(&self) -> usize {
        self.jtis.len() + self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.len() * 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.fetched_at_ms.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        let mut first = true;
        for (p, set) in [("jti:", &self.jtis), ("sub:", &self.subs)] {
            for v in set {
                if !first {
                    out.push(b'\n');
                }
                first = false;
                out.extend_from_slice(p.as_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<RevocationList> {
        if b.get(..4)? != MAGIC {
            return None;
        }
        let fetched_at_ms = u64::from_le_bytes(b.get(4..12)?.try_into().ok()?);
        let version = u64::from_le_bytes(b.get(12..20)?.try_into().ok()?);
        let mut l = RevocationList { version, ..RevocationList::empty(fetched_at_ms) };
        let body = std::str::from_utf8(b.get(20..)?).ok()?;
        for line in body.split('\n').filter(|x| !x.is_empty()) {
            if let Some(j) = line.strip_prefix("jti:") {
                l.jtis.insert(j.to_string());
            } else if let Some(s) = line.strip_prefix("sub:") {
                l.subs.insert(s.to_string());
            } else {
                return None;
            }
        }
        Some(l)
    }
}

/// Is a refresh due? `refresh_s` after the last successful fetch.
pub fn refresh_due(list: Option<&RevocationList>, now_ms: u64, refresh_s: u32) -> bool {
    list.is_none_or(|l| now_ms >= l.fetched_at_ms.saturating_add(u64::from(refresh_s) * 1000))
}

/// A lease value: the time until which the holder owns the refresh.
pub fn lease_free(lease: Option<&[u8]>, now_ms: u64) -> bool {
    match lease.and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
        Some(until) => now_ms >= until,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::json;

    #[test]
    fn reads_the_document() {
        let doc = json::parse(br#"{"jti:abc":"leaked in logs","sub:lambda/pay":"compromised","other":"x","jti:":"empty","sub:a\nb":"x"}"#);
        let (l, ignored) = RevocationList::from_document(&doc.unwrap_or(json::Value::Null), 5);
        assert!(l.is_revoked("abc", "nobody"));
        assert!(l.is_revoked("zzz", "lambda/pay"));
        assert!(!l.is_revoked("abd", "lambda/pa"));
        assert!(!l.is_revoked("", ""));
        assert_eq!(ignored, 3);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn round_trip() {
        let doc = json::parse(br#"{"jti:a":"","jti:b c":"","sub:x/y":""}"#).unwrap_or(json::Value::Null);
        let (mut l, _) = RevocationList::from_document(&doc, 1_800_000_000_000);
        l.version = 42;
        let d = RevocationList::decode(&l.encode());
        assert_eq!(d.as_ref(), Some(&l));
        assert_eq!(RevocationList::decode(&RevocationList::empty(7).encode()), Some(RevocationList::empty(7)));
        assert!(RevocationList::decode(b"KWR1").is_none());
        assert!(RevocationList::decode(b"nope").is_none());
    }

    #[test]
    fn schedule_and_lease() {
        let l = RevocationList::empty(10_000);
        assert!(refresh_due(None, 0, 5));
        assert!(!refresh_due(Some(&l), 14_999, 5));
        assert!(refresh_due(Some(&l), 15_000, 5));
        assert!(lease_free(None, 1));
        assert!(!lease_free(Some(&20u64.to_le_bytes()), 19));
        assert!(lease_free(Some(&20u64.to_le_bytes()), 20));
        assert!(lease_free(Some(b"garbage"), 0));
    }
}
