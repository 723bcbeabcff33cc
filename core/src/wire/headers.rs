//! A header map as the host hands it over, read in place: every name and value lives in one
//! buffer, with their places in a second. Reading a request's or a response's headers then costs
//! two allocations, not two per field: the warm path reads both maps on every request, and in
//! the wasm filter each allocation is the VM's.
//!
//! Names are bytes: Envoy's are lower-case tokens, and matching never needs them as text. Values
//! are bytes too (a header value need not be UTF-8).

use std::fmt;

/// A header map: its fields in the order the host gave them, repeats kept.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    buf: Vec<u8>,
    /// Each field's name and value, as (start, length) in `buf`.
    fields: Vec<[u32; 4]>,
}

impl Headers {
    pub const fn new() -> Headers {
        Headers { buf: Vec::new(), fields: Vec::new() }
    }

    /// An empty map with room for `fields` fields of `bytes` bytes of names and values in all.
    pub fn with_capacity(fields: usize, bytes: usize) -> Headers {
        Headers { buf: Vec::with_capacity(bytes), fields: Vec::with_capacity(fields) }
    }

    /// Add a field at the end. `false`: it was not added (a map over 4 GiB is not a header map;
    /// whoever reads one fails closed).
    #[must_use]
    pub fn push(&mut self, name: &[u8], value: &[u8]) -> bool {
        let (Ok(n0), Ok(nl), Ok(vl)) = (u32::try_from(self.buf.len()), u32::try_from(name.len()), u32::try_from(value.len())) else { return false };
        let Some(v0) = n0.checked_add(nl) else { return false };
        if v0.checked_add(vl).is_none() {
            return false;
        }
        self.buf.extend_from_slice(name);
        self.buf.extend_from_slice(value);
        self.fields.push([n0, nl, v0, vl]);
        true
    }

    /// A map of these fields, in this order (a test's, or a host's own copy: under 4 GiB).
    pub fn of<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (N, V)>) -> Headers {
        let mut h = Headers::default();
        for (n, v) in pairs {
            let _ = h.push(n.as_ref(), v.as_ref());
        }
        h
    }

    /// proxy-wasm's serialized header map, taken as is: the number of fields, each field's name
    /// and value lengths, then each name and value followed by a NUL (all integers 32-bit little
    /// endian). `None`: it is not one (a length runs past the end).
    pub fn from_proxy_wasm(buf: Vec<u8>) -> Option<Headers> {
        if buf.is_empty() {
            return Some(Headers::default());
        }
        let word = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?)) };
        let n = usize::try_from(word(0)?).ok()?;
        let mut at = n.checked_mul(8)?.checked_add(4)?;
        if at > buf.len() {
            return None;
        }
        let mut fields = Vec::with_capacity(n);
        for i in 0..n {
            let (nl, vl) = (word(4 + i * 8)?, word(8 + i * 8)?);
            let n0 = at;
            let v0 = n0.checked_add(usize::try_from(nl).ok()?)?.checked_add(1)?;
            at = v0.checked_add(usize::try_from(vl).ok()?)?.checked_add(1)?;
            if at > buf.len() {
                return None;
            }
            fields.push([u32::try_from(n0).ok()?, nl, u32::try_from(v0).ok()?, vl]);
        }
        Some(Headers { buf, fields })
    }

    fn span(&self, start: u32, len: u32) -> &[u8] {
        let s = start as usize;
        self.buf.get(s..s.saturating_add(len as usize)).unwrap_or_default()
    }

    /// Every field (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields.iter().map(|&[n0, nl, v0, vl]| (self.span(n0, nl), self.span(v0, vl)))
    }

    /// Every value of `name` (ASCII case-insensitive), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Names only: a header map may hold credentials and keys.
impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|(k, _)| String::from_utf8_lossy(k))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialized(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn reads_fields_in_order_with_repeats_and_any_case() {
        let pairs = [(":path", "/v1/x"), ("x-a", "1"), ("X-A", "2"), ("empty", ""), ("", "no name")];
        for h in [Headers::of(pairs), Headers::from_proxy_wasm(serialized(&pairs)).unwrap_or_else(|| panic!("parses"))] {
            assert_eq!(h.len(), 5);
            let got: Vec<(&[u8], &[u8])> = h.iter().collect();
            let want: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
            assert_eq!(got, want);
            assert_eq!(h.values("x-a").collect::<Vec<_>>(), [b"1".as_slice(), b"2"]);
            assert_eq!(h.get("X-a"), Some(b"1".as_slice()));
            assert_eq!(h.get("empty"), Some(b"".as_slice()));
            assert_eq!(h.get("absent"), None);
            assert_eq!(format!("{h:?}"), r#"[":path", "x-a", "X-A", "empty", ""]"#, "names only");
        }
        assert_eq!(Headers::from_proxy_wasm(Vec::new()), Some(Headers::default()));
        assert_eq!(Headers::from_proxy_wasm(serialized(&[])).map(|h| h.len()), Some(0));
    }

    #[test]
    fn a_serialized_map_that_runs_past_its_end_is_refused() {
        let good = serialized(&[("authorization", "Bearer x"), ("x", "y")]);
        for cut in 1..good.len() - 1 {
            assert_eq!(Headers::from_proxy_wasm(good[..cut].to_vec()), None, "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Headers::from_proxy_wasm(huge), None);
        let mut long = good;
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Headers::from_proxy_wasm(long), None);
    }
}
