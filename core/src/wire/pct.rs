//! Percent-decoding, the one place Keyward undoes URL encoding: any case of hex digits; a `%` not
//! followed by two hex digits stays as it is.

/// Decode `b`. `plus_is_space`: a query component, where `+` stands for a space.
pub fn decode(b: &[u8], plus_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| b.get(j).and_then(|x| (*x as char).to_digit(16));
        match (c, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A query component decoded as text (lossily: for comparing names and values, never forwarded).
pub fn decode_query_text(s: &str) -> String {
    String::from_utf8_lossy(&decode(s.as_bytes(), true)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_any_case_and_leaves_stray_percents() {
        assert_eq!(decode(b"a%2Fb%2fc%zz%4", false), b"a/b/c%zz%4");
        assert_eq!(decode(b"a+b", false), b"a+b");
        assert_eq!(decode_query_text("a+b%20c"), "a b c");
    }
}
