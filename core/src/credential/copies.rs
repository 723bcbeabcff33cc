//! Copies of the workload's credential elsewhere in the request: another header, a cookie, the
//! path or its query. The filter removes the header it reads the credential from; a copy anywhere
//! else would reach the vendor, so a request that carries one is refused (400), never forwarded.
//!
//! What is looked for is the credential's signature, its last segment: every copy that could be
//! replayed carries it whole, and it is long and random enough (43 characters for HS256) never to
//! match by chance. For `basic_password` the header's base64 pair is looked for too (the whole
//! `Basic` value copied into another header). A value is searched as sent and, if it holds a `%`,
//! percent-decoded as well, as a vendor's framework decodes a query, a path or a cookie.

use crate::wire::pct;

/// The shortest needle searched for: anything shorter is not a signature.
const MIN_NEEDLE: usize = 16;

/// What to look for: the signature of `token`, and `extra` (the encoded form the credential
/// header carried it in, if any).
pub fn needles<'a>(token: &'a str, extra: Option<&'a [u8]>) -> Vec<&'a [u8]> {
    let mut out: Vec<&[u8]> = Vec::with_capacity(2);
    if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() >= MIN_NEEDLE) {
        out.push(sig.as_bytes());
    }
    if let Some(e) = extra.filter(|e| e.len() >= MIN_NEEDLE) {
        out.push(e);
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else { return false };
    if hay.len() < needle.len() {
        return false;
    }
    let last_start = hay.len() - needle.len();
    hay.iter().enumerate().take(last_start + 1).any(|(i, &b)| b == first && hay.get(i + 1..i + needle.len()) == Some(rest))
}

/// Does `value` hold one of `needles`, as is or percent-decoded?
pub fn holds(needles: &[&[u8]], value: &[u8]) -> bool {
    if needles.iter().any(|n| contains(value, n)) {
        return true;
    }
    value.contains(&b'%') && {
        let decoded = pct::decode(value, true);
        needles.iter().any(|n| contains(&decoded, n))
    }
}

/// The first header (pseudo-headers such as `:path` included) other than `source` that holds a
/// copy of the credential.
pub fn find<'h>(needles: &[&[u8]], headers: &'h [(String, Vec<u8>)], source: &str) -> Option<&'h str> {
    if needles.is_empty() {
        return None;
    }
    headers.iter().find(|(name, value)| !name.eq_ignore_ascii_case(source) && holds(needles, value)).map(|(name, _)| name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.n4yFf2JkF1h2eZbY7mM0Yl1bBqkV3u8Tzq4kCw9sXyA";
    const SIG: &str = "n4yFf2JkF1h2eZbY7mM0Yl1bBqkV3u8Tzq4kCw9sXyA";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn a_copy_in_any_other_header_cookie_path_or_query_is_found() {
        let n = needles(TOKEN, None);
        let bearer = format!("Bearer {TOKEN}");
        for (name, value) in [
            ("x-api-key", TOKEN.to_string()),
            ("x-goog-api-key", TOKEN.to_string()),
            ("api-key", TOKEN.to_string()),
            ("x-auth-token", format!("Token {TOKEN}")),
            ("cookie", format!("a=1; session={TOKEN}; b=2")),
            (":path", format!("/v1/x?key={TOKEN}")),
            (":path", format!("/v1/{TOKEN}/x")),
            // Percent-encoded, as a framework decodes it for the vendor.
            (":path", format!("/v1/x?key={}", SIG.bytes().map(|b| format!("%{b:02X}")).collect::<String>())),
            ("cookie", format!("s={}", SIG.bytes().map(|b| format!("%{b:02x}")).collect::<String>())),
        ] {
            let headers = h(&[("authorization", &bearer), (":method", "GET"), (name, &value)]);
            assert_eq!(find(&n, &headers, "authorization"), Some(name), "{name}: {value}");
        }
    }

    #[test]
    fn the_credential_header_itself_and_unrelated_values_are_not_copies() {
        let n = needles(TOKEN, None);
        let bearer = format!("Bearer {TOKEN}");
        let headers = h(&[("Authorization", &bearer), (":path", "/v1/x?key=abc"), ("x-other", &SIG[..SIG.len() - 1])]);
        assert_eq!(find(&n, &headers, "authorization"), None);
        assert_eq!(find(&needles("not-a-jwt", None), &headers, "authorization"), None, "nothing short is searched for");
    }

    #[test]
    fn a_basic_pair_copied_into_another_header_is_found() {
        let pair = "QUMxMjM6ZXlKaGJHY2lPaUpJVXpJMU5pSjku";
        let n = needles(TOKEN, Some(pair.as_bytes()));
        let headers = h(&[("authorization", &format!("Basic {pair}")), ("x-forwarded-authorization", &format!("Basic {pair}"))]);
        assert_eq!(find(&n, &headers, "authorization"), Some("x-forwarded-authorization"));
    }
}
