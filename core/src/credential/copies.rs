//! Copies of the workload's credential elsewhere in the request: another header, a cookie, the
//! path or its query. The filter removes the header it reads the credential from; a copy anywhere
//! else would reach the vendor, so a request that carries one is refused (400), never forwarded.
//!
//! What is looked for is the credential's signature, its last segment: every copy that could be
//! replayed carries it (or enough of it: the first 32 characters leave 64 bits to guess), and it
//! is random enough never to match by chance. Also looked for: the signature as it reads in any
//! base64 of text holding the credential (standard or URL alphabet, whatever precedes it: a
//! `user:` pair, a wrapper), which catches a `Basic` pair copied into another header. A value is
//! searched as sent and percent-decoded (once and twice), as a vendor's framework decodes a query,
//! a path or a cookie. The needles are made once per credential and kept with its verification.

use crate::host::Headers;
use crate::wire::needles::NeedleSet;
use crate::wire::{b64, pct};
use std::rc::Rc;

/// The shortest needle searched for: anything shorter is not a signature.
const MIN_NEEDLE: usize = 16;
/// How much of the signature must appear for a copy to count.
const SIGNATURE_PART: usize = 32;

/// One credential's needles, shared by the requests it makes (equal when they are the same).
#[derive(Debug, Clone, Default)]
pub struct Shared(pub Rc<Needles>);

impl PartialEq for Shared {
    fn eq(&self, other: &Shared) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
}

/// What to look for.
#[derive(Debug, Default)]
pub struct Needles {
    set: NeedleSet,
}

impl Needles {
    /// The needles of `token`: its signature, and the signature as base64 of text containing the
    /// token would show it (three alignments, two alphabets).
    pub fn of(token: &str) -> Needles {
        let mut n = Needles::default();
        let Some(sig) = token.rsplit('.').next().filter(|s| s.len() >= MIN_NEEDLE) else { return n };
        n.add(sig.as_bytes().get(..SIGNATURE_PART.min(sig.len())).unwrap_or_default());
        let bytes = token.as_bytes();
        for k in 0..3 {
            let Some(rest) = bytes.get(k..) else { continue };
            for enc in [b64::std_encode(rest), b64::jws_encode(rest)] {
                // The signature's last bytes in the encoding, away from the padding at the end.
                let e = enc.trim_end_matches('=').as_bytes();
                if let Some(part) = e.len().checked_sub(40).and_then(|s| e.get(s..e.len() - 8)) {
                    n.add(part);
                }
            }
        }
        n
    }

    fn add(&mut self, needle: &[u8]) {
        self.set.add(needle, MIN_NEEDLE);
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    fn in_raw(&self, hay: &[u8]) -> bool {
        self.set.in_(hay)
    }

    /// Does `value` hold a copy, as is or percent-decoded (once or twice)?
    pub fn holds(&self, value: &[u8]) -> bool {
        if self.in_raw(value) {
            return true;
        }
        if !value.contains(&b'%') {
            return false;
        }
        let once = pct::decode(value, true);
        self.in_raw(&once) || (once.contains(&b'%') && self.in_raw(&pct::decode(&once, true)))
    }

    /// The first header (pseudo-headers such as `:path` included) other than `source` that holds
    /// a copy of the credential, by name; in a header's name itself, `"a header name"` (never the
    /// name: it would put the copy in the log).
    pub fn find(&self, headers: &Headers, source: &str) -> Option<String> {
        if self.set.is_empty() {
            return None;
        }
        headers.iter().find_map(|(name, value)| {
            if self.holds(name) {
                Some("a header name".to_string())
            } else if !name.eq_ignore_ascii_case(source.as_bytes()) && self.holds(value) {
                Some(String::from_utf8_lossy(name).into_owned())
            } else {
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.n4yFf2JkF1h2eZbY7mM0Yl1bBqkV3u8Tzq4kCw9sXyA";
    const SIG: &str = "n4yFf2JkF1h2eZbY7mM0Yl1bBqkV3u8Tzq4kCw9sXyA";

    fn h(pairs: &[(&str, &str)]) -> Headers {
        Headers::of(pairs.iter().copied())
    }

    fn pct_all(s: &str) -> String {
        s.bytes().map(|b| format!("%{b:02X}")).collect()
    }

    #[test]
    fn a_copy_in_any_other_header_cookie_path_or_query_is_found() {
        let n = Needles::of(TOKEN);
        let bearer = format!("Bearer {TOKEN}");
        for (name, value) in [
            ("x-api-key", TOKEN.to_string()),
            ("x-goog-api-key", TOKEN.to_string()),
            ("api-key", TOKEN.to_string()),
            ("x-auth-token", format!("Token {TOKEN}")),
            ("cookie", format!("a=1; session={TOKEN}; b=2")),
            (":path", format!("/v1/x?key={TOKEN}")),
            (":path", format!("/v1/{TOKEN}/x")),
            (":path", format!("/v1/x?key={}", pct_all(SIG))),
            (":path", format!("/v1/x?key={}", pct_all(&pct_all(SIG)))),
            ("cookie", format!("s={}", SIG.bytes().map(|b| format!("%{b:02x}")).collect::<String>())),
            ("x-cut", TOKEN[..TOKEN.len() - 1].to_string()),
        ] {
            let headers = h(&[("authorization", &bearer), (":method", "GET"), (name, &value)]);
            assert_eq!(n.find(&headers, "authorization").as_deref(), Some(name), "{name}: {value}");
        }
    }

    #[test]
    fn a_copy_in_a_header_name_is_found_and_not_named() {
        let n = Needles::of(TOKEN);
        let bearer = format!("Bearer {TOKEN}");
        for name in [TOKEN.to_string(), format!("x-{SIG}"), format!("x-{}", pct_all(SIG))] {
            let headers = h(&[("authorization", &bearer), (name.as_str(), "1")]);
            assert_eq!(n.find(&headers, "authorization").as_deref(), Some("a header name"), "{name}");
        }
        assert_eq!(n.find(&h(&[("authorization", &bearer), ("x-other", "1")]), "authorization"), None);
    }

    #[test]
    fn base64_of_anything_holding_the_credential_is_found() {
        let n = Needles::of(TOKEN);
        for prefix in ["", "a", "ab", "user:", "AC123:", "x-token "] {
            let text = format!("{prefix}{TOKEN}");
            for enc in [b64::std_encode(text.as_bytes()), b64::jws_encode(text.as_bytes()), b64::std_encode(text.as_bytes()).trim_end_matches('=').to_string()]
            {
                assert!(n.holds(format!("Basic {enc}").as_bytes()), "{prefix:?} {enc}");
            }
        }
        assert!(n.holds(b64::std_encode(SIG.as_bytes()).as_bytes()), "the signature alone, encoded");
    }

    #[test]
    fn the_credential_header_itself_and_unrelated_values_are_not_copies() {
        let n = Needles::of(TOKEN);
        let bearer = format!("Bearer {TOKEN}");
        let headers = h(&[
            ("Authorization", &bearer),
            (":path", "/v1/x?key=abc"),
            ("x-other", &SIG[..20]),
            ("x-b64", &b64::std_encode(b"an unrelated value of some length")),
        ]);
        assert_eq!(n.find(&headers, "authorization"), None);
        assert!(Needles::of("not-a-jwt").is_empty(), "nothing short is searched for");
    }
}
