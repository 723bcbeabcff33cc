//! The revocation list: a KV secret whose keys are `jti:<jti>` or `sub:<sub>` (values are free
//! text, e.g. a reason, and are ignored). Shared by all workers through Envoy shared data.
//! Shared-data layout: `"KWR2" | fetched_at_ms u64 | version u64 | entries separated by '\n'`
//! (`version`: the store's KV v2 version of the list, 0 when the store has none or the list was
//! confirmed missing).

use crate::wire::json::Value;

const MAGIC: &[u8; 4] = b"KWR2";
/// The compact form's fields.
pub const FORMAT_KEY: &str = "format";
pub const ENTRIES_KEY: &str = "entries";
pub const FORMAT: &str = "keyward-revocations/2";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    pub fetched_at_ms: u64,
    /// The store's version of the list (0: none known).
    pub version: u64,
    jtis: crate::Set<String>,
    subs: crate::Set<String>,
}

impl RevocationList {
    /// Read the KV document (either form). Entries of credentials that expired before
    /// `expired_before_s` are dropped. Keys and lines that are neither `jti:` nor `sub:`, or that
    /// hold control characters, are ignored; their count is returned for a warning.
    pub fn from_document(doc: &Value, fetched_at_ms: u64, expired_before_s: i64) -> (RevocationList, usize) {
        let mut l = RevocationList { fetched_at_ms, ..RevocationList::default() };
        let mut ignored = 0;
        for (k, v) in doc.as_object().unwrap_or_default() {
            match k.as_str() {
                FORMAT_KEY => {}
                ENTRIES_KEY => match v.as_str() {
                    Some(text) => {
                        for line in text.split('\n').filter(|x| !x.is_empty()) {
                            let mut parts = line.split('\t');
                            let key = parts.next().unwrap_or_default();
                            let exp: i64 = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
                            if exp != 0 && exp < expired_before_s {
                                continue; // the credential has expired: the entry no longer matters
                            }
                            if !l.add(key) {
                                ignored += 1;
                            }
                        }
                    }
                    None => ignored += 1,
                },
                key => {
                    if !l.add(key) {
                        ignored += 1;
                    }
                }
            }
        }
        (l, ignored)
    }

    /// Add `jti:<id>` or `sub:<id>`; false for anything else.
    fn add(&mut self, key: &str) -> bool {
        if key.chars().any(char::is_control) {
            return false;
        }
        if let Some(j) = key.strip_prefix("jti:").filter(|j| !j.is_empty()) {
            self.jtis.insert(j.to_string());
        } else if let Some(s) = key.strip_prefix("sub:").filter(|s| !s.is_empty()) {
            self.subs.insert(s.to_string());
        } else {
            return false;
        }
        true
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
        let (l, ignored) = RevocationList::from_document(&doc.unwrap_or(json::Value::Null), 5, 0);
        assert!(l.is_revoked("abc", "nobody"));
        assert!(l.is_revoked("zzz", "lambda/pay"));
        assert!(!l.is_revoked("abd", "lambda/pa"));
        assert!(!l.is_revoked("", ""));
        assert_eq!(ignored, 3);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn reads_the_compact_form_and_drops_expired_entries() {
        let doc = json::parse(
            b"{\"format\":\"keyward-revocations/2\",\"entries\":\"jti:live\\t2000\\tleaked\\njti:gone\\t999\\told\\nsub:lambda/x\\t0\\tcompromised\\nnot-an-entry\\t0\\tx\\n\",\"jti:legacy\":\"first form\"}",
        )
        .unwrap_or(json::Value::Null);
        let (l, ignored) = RevocationList::from_document(&doc, 5, 1000);
        assert!(l.is_revoked("live", "-") && l.is_revoked("legacy", "-") && l.is_revoked("-", "lambda/x"));
        assert!(!l.is_revoked("gone", "-"), "expired before 1000: dropped");
        assert_eq!((l.len(), ignored), (3, 1));
    }

    #[test]
    fn ten_thousand_entries_in_one_field() {
        let entries: String = (0..10_000).map(|i| format!("jti:credential-{i:05}\t4000000000\tleaked in a log\n")).collect();
        let doc = json::Value::Object(vec![(FORMAT_KEY.into(), json::Value::Str(FORMAT.into())), (ENTRIES_KEY.into(), json::Value::Str(entries))]);
        let (l, ignored) = RevocationList::from_document(&doc, 5, 0);
        assert_eq!((l.len(), ignored), (10_000, 0));
        assert!(l.is_revoked("credential-09999", "-"));
        assert_eq!(RevocationList::decode(&l.encode()), Some(l));
    }

    #[test]
    fn round_trip() {
        let doc = json::parse(br#"{"jti:a":"","jti:b c":"","sub:x/y":""}"#).unwrap_or(json::Value::Null);
        let (mut l, _) = RevocationList::from_document(&doc, 1_800_000_000_000, 0);
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
