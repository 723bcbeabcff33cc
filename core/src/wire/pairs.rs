//! The proxy-wasm "pairs" encoding, in which Envoy returns a map-valued property such as
//! `xds.route_metadata.filter_metadata.keyward`: `n: u32`, then `n` pairs of
//! `(key_len: u32, value_len: u32)`, then each key and value followed by a NUL byte (all
//! little-endian). One property read decoded here replaces one read per field (make bench:
//! each metadata read costs a few microseconds per request). Anything malformed reads as `None`.

use crate::wire::Reader;

/// Most pairs accepted (a metadata struct has a handful).
const MAX_PAIRS: usize = 1024;

pub fn decode(b: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut r = Reader::new(b);
    let n = r.u32()? as usize;
    if n > MAX_PAIRS {
        return None;
    }
    let mut lens = Vec::with_capacity(n);
    for _ in 0..n {
        lens.push((r.u32()? as usize, r.u32()? as usize));
    }
    let mut out = Vec::with_capacity(n);
    for (kl, vl) in lens {
        let k = std::str::from_utf8(r.take(kl)?).ok()?.to_string();
        if r.u8()? != 0 {
            return None;
        }
        let v = r.take(vl)?.to_vec();
        if r.u8()? != 0 {
            return None;
        }
        out.push((k, v));
    }
    r.done().then_some(out)
}

/// Encode pairs as Envoy does (the in-memory host hands route metadata over in this form).
pub fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        b.extend((k.len() as u32).to_le_bytes());
        b.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        b.extend(k.as_bytes());
        b.push(0);
        b.extend(v.as_bytes());
        b.push(0);
    }
    b
}

/// The value of `key` as text, if present and UTF-8.
pub fn get<'a>(pairs: &'a [(String, Vec<u8>)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_envoy_sends() {
        // Bytes as Envoy 1.40 returned them for {target: stripe, prefix: /stripe}.
        let envoy = b"\x02\0\0\0\x06\0\0\0\x06\0\0\0\x06\0\0\0\x07\0\0\0target\0stripe\0prefix\0/stripe\0";
        let p = decode(envoy).unwrap();
        assert_eq!(get(&p, "target"), Some("stripe"));
        assert_eq!(get(&p, "prefix"), Some("/stripe"));
        assert_eq!(get(&p, "other"), None);
        assert_eq!(decode(&encode(&[])), Some(vec![]));
        assert_eq!(decode(&encode(&[("k", "")])).map(|p| p.len()), Some(1));
    }

    #[test]
    fn malformed_input_is_none() {
        let good = encode(&[("target", "stripe"), ("prefix", "/s")]);
        for n in 0..good.len() {
            assert_eq!(decode(&good[..n]), None, "truncated at {n}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), None);
        let mut no_nul = good.clone();
        let i = 4 + 16 + "target".len();
        no_nul[i] = b'x';
        assert_eq!(decode(&no_nul), None);
        assert_eq!(decode(&u32::MAX.to_le_bytes()), None, "absurd count");
        let mut huge = encode(&[("k", "v")]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), None);
    }
}
