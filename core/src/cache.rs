//! Cache entries as stored in Envoy shared data (one copy per process, read by every worker).
//! Binary layout, version 1:
//! `"KW1" | fetched_at_ms u64 | version len u16 + bytes | n u16 | n * (key len u16 + key, value len u32 + value)`

use crate::secret::Secret;
use crate::store::Fetched;

const MAGIC: &[u8; 3] = b"KW1";

#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub fetched_at_ms: u64,
    pub data: Fetched,
}

impl Entry {
    /// Fresh for `ttl_s` after it was fetched.
    pub fn is_fresh(&self, now_ms: u64, ttl_s: u32) -> bool {
        now_ms < self.fetched_at_ms.saturating_add(u64::from(ttl_s) * 1000)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.fetched_at_ms.to_le_bytes());
        let ver = self.data.version.as_deref().unwrap_or("").as_bytes();
        let ver = ver.get(..ver.len().min(u16::MAX as usize)).unwrap_or_default();
        out.extend_from_slice(&(ver.len() as u16).to_le_bytes());
        out.extend_from_slice(ver);
        out.extend_from_slice(&(self.data.fields.len() as u16).to_le_bytes());
        for (k, v) in &self.data.fields {
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.expose());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Entry> {
        let mut r = Reader { b, i: 0 };
        if r.take(3)? != MAGIC {
            return None;
        }
        let fetched_at_ms = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let vlen = r.u16()? as usize;
        let ver = std::str::from_utf8(r.take(vlen)?).ok()?.to_string();
        let n = r.u16()? as usize;
        let mut fields = Vec::with_capacity(n);
        for _ in 0..n {
            let klen = r.u16()? as usize;
            let k = std::str::from_utf8(r.take(klen)?).ok()?.to_string();
            let vlen = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
            let v = Secret::new(r.take(vlen)?.to_vec());
            fields.push((k, v));
        }
        if r.i != b.len() {
            return None;
        }
        let version = if ver.is_empty() { None } else { Some(ver) };
        Some(Entry { fetched_at_ms, data: Fetched { fields, version, problems: Vec::new() } })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
}

/// The shared-data key of a slot. The config generation is not part of it, so a config reload
/// keeps a warm cache; an entry lacking a field the new config needs is treated as a miss.
pub fn shared_key(store: &str, path: &str) -> String {
    format!("keyward/v1/secret/{store}/{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = Entry {
            fetched_at_ms: 1_800_000_000_123,
            data: Fetched {
                fields: vec![("api_key".into(), Secret::text("sk_test_x")), ("b".into(), Secret::text("é")), ("gone".into(), Secret::default())],
                version: Some("7".into()),
                problems: vec![],
            },
        };
        let b = e.encode();
        let d = match Entry::decode(&b) {
            Some(d) => d,
            None => panic!("decode failed"),
        };
        assert_eq!(d.fetched_at_ms, e.fetched_at_ms);
        assert_eq!(d.data.version.as_deref(), Some("7"));
        assert_eq!(d.data.field("api_key").and_then(Secret::expose_str), Some("sk_test_x"));
        assert_eq!(d.data.field("b").and_then(Secret::expose_str), Some("é"));
        assert!(d.data.field("gone").is_none() && d.data.covers("gone"));
        // Every truncation and any trailing byte is refused.
        for n in 0..b.len() {
            assert!(Entry::decode(&b[..n]).is_none(), "truncated to {n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(Entry::decode(&longer).is_none());
        assert!(Entry::decode(b"KW2").is_none());
    }

    #[test]
    fn freshness() {
        let e = Entry { fetched_at_ms: 10_000, data: Fetched::default() };
        assert!(e.is_fresh(10_000, 1));
        assert!(e.is_fresh(10_999, 1));
        assert!(!e.is_fresh(11_000, 1));
    }
}
