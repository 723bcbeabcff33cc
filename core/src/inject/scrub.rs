//! Response scrubbing: a vendor that reflects the upstream secret in a response header (an echo,
//! a debug header, a redirect `Location` carrying a query key, a hex dump of its bytes, a base64
//! of a header that held it) must not hand it to the workload. The filter removes every response
//! header and trailer whose value contains a form of the secret it injected into that request.

use crate::config::{Inject, Target};
use crate::inject::pct_encode;
use crate::secret::Secret;
use crate::secrets::store::Fetched;
use crate::wire::needles::NeedleSet;
use crate::wire::{b64, pct};

/// Shorter values are not searched for: they would match unrelated headers, and a secret that
/// short is not a secret.
pub const MIN_NEEDLE: usize = 8;

/// The forms of a secret a response could reflect.
#[derive(Default, Debug)]
pub struct Needles {
    /// Compared as they are: the raw value, its percent-encoding (a `Location` query), for basic
    /// auth the base64 `user:password`, and the value as it reads in base64 of text holding it
    /// (whatever precedes it: `Bearer `, a name).
    exact: NeedleSet,
    /// Hex of the raw value's bytes, in lower case: compared with the value in lower case (a
    /// vendor may print either case).
    hex: NeedleSet,
}

impl Needles {
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
    }
}

/// `v` as it reads inside base64 of any text that holds it: for each of the three alignments, the
/// encoding of `v` from there, without its first and last four characters (they depend on what
/// precedes and follows), in both alphabets.
fn base64_forms(v: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for k in 0..3 {
        let Some(rest) = v.get(k..) else { continue };
        for enc in [b64::std_encode(rest), b64::jws_encode(rest)] {
            let e = enc.trim_end_matches('=');
            if let Some(mid) = e.get(4..e.len().saturating_sub(4)).filter(|m| m.len() >= MIN_NEEDLE) {
                out.push(mid.to_string());
            }
        }
    }
    out
}

fn hex(s: &str) -> String {
    s.bytes().fold(String::with_capacity(s.len() * 2), |mut out, b| {
        out.push_str(&format!("{b:02x}"));
        out
    })
}

/// The forms of `target`'s injected secret a response could reflect.
pub fn needles(target: &Target, secret: &Fetched) -> Needles {
    let mut out = Needles::default();
    let mut add = |s: &str| {
        if s.len() >= MIN_NEEDLE {
            out.exact.add(s.as_bytes(), MIN_NEEDLE);
            out.hex.add(hex(s).as_bytes(), MIN_NEEDLE);
            for form in base64_forms(s.as_bytes()) {
                out.exact.add(form.as_bytes(), MIN_NEEDLE);
            }
        }
    };
    let value = |f: &str| secret.field(f).and_then(Secret::expose_str);
    match &target.inject {
        Inject::Bearer { field } | Inject::Header { field, .. } | Inject::Query { field, .. } => {
            if let Some(v) = value(field) {
                add(v);
                add(&pct_encode(v));
            }
        }
        Inject::Basic { username_field, password_field } => {
            if let Some(p) = value(password_field) {
                add(p);
                add(&pct_encode(p));
                if let Some(u) = value(username_field) {
                    add(&b64::std_encode(format!("{u}:{p}").as_bytes()));
                }
            }
        }
    }
    out
}

/// Does `value` contain any of `needles`, as is or once percent-decoded, or the hex of the
/// secret in either case? Decoding first catches every way a vendor may encode the key in a URL:
/// upper- or lower-case hex, or only some characters encoded.
pub fn leaks(needles: &Needles, value: &[u8]) -> bool {
    if needles.exact.in_(value) || needles.hex.in_(value) {
        return true;
    }
    if value.len() >= needles.hex.shortest() && value.iter().any(u8::is_ascii_uppercase) && needles.hex.in_(&value.to_ascii_lowercase()) {
        return true;
    }
    value.contains(&b'%') && needles.exact.in_(&pct::decode(value, false))
}

/// The names (lower-case, once each) of the headers to remove from a response: those whose value
/// or name holds the secret. `None`: a header that leaks has a name that is not text, so it cannot
/// be named to remove it (the caller resets the stream).
/// A name that holds the secret must never be logged: see `shown`.
pub fn headers_to_remove(needles: &Needles, headers: &crate::host::Headers) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    if needles.is_empty() {
        return Some(out);
    }
    for (name, value) in headers.iter() {
        if name.starts_with(b":") {
            continue; // pseudo-headers (:status) cannot be removed, and never carry a secret
        }
        if !leaks(needles, value) && !leaks(needles, name) {
            continue;
        }
        let n = std::str::from_utf8(name).ok()?.to_ascii_lowercase();
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Some(out)
}

/// How a header to remove is named in a log line: not at all if its name holds the secret.
pub fn shown<'a>(needles: &Needles, name: &'a str) -> &'a str {
    if leaks(needles, name.as_bytes()) {
        "(a name that holds the secret)"
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_url_encoding_of_the_key_is_caught() {
        use super::leaks;
        let mut exact = NeedleSet::default();
        exact.add(b"sk+live/AbC=123_xyz", 1);
        let n = super::Needles { exact, hex: NeedleSet::default() };
        for v in [
            "https://cb/?key=sk%2Blive%2FAbC%3D123_xyz",   // upper-case hex
            "https://cb/?key=sk%2blive%2fAbC%3d123_xyz",   // lower-case hex
            "https://cb/?key=sk%2Blive/AbC=123_xyz",       // partly encoded
            "https://cb/?key=%73%6B+live%2FAbC=123%5Fxyz", // unreserved characters encoded too
        ] {
            assert!(leaks(&n, v.as_bytes()), "{v}");
        }
        assert!(!leaks(&n, b"https://cb/?key=sk%2Blive%2FAbC%3D124_xyz"), "another key");
        assert!(!leaks(&n, b"100%"), "a lone % is text");
    }

    use super::*;
    use crate::credential::extract::CredentialSource;

    fn fetched(fields: &[(&str, &str)]) -> Fetched {
        Fetched { fields: fields.iter().map(|(k, v)| (k.to_string(), Secret::text(v))).collect(), version: None, problems: vec![] }
    }
    fn target(inject: Inject) -> Target {
        Target {
            name: "t".into(),
            credential: CredentialSource::Bearer,
            slot: 0,
            inject,
            allow: None,
            require_idempotency_key: vec![],
            cost: None,
            refund_on: vec![],
        }
    }
    fn h(pairs: &[(&str, &str)]) -> crate::host::Headers {
        crate::host::Headers::of(pairs.iter().copied())
    }

    /// The names to remove, where every name is text.
    fn headers_to_remove(n: &Needles, headers: &crate::host::Headers) -> Vec<String> {
        super::headers_to_remove(n, headers).unwrap_or_else(|| panic!("the names are text"))
    }

    #[test]
    fn a_leaking_header_whose_name_is_not_text_cannot_be_named_so_the_stream_is_reset() {
        let n = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", "fake-vendor-key-abcdef123")]));
        let odd = crate::host::Headers::of([(b"x-\xff".as_slice(), b"fake-vendor-key-abcdef123".as_slice())]);
        assert_eq!(super::headers_to_remove(&n, &odd), None);
        let harmless = crate::host::Headers::of([(b"x-\xff".as_slice(), b"nothing".as_slice())]);
        assert_eq!(super::headers_to_remove(&n, &harmless), Some(vec![]));
    }

    #[test]
    fn bearer_value_reflected_anywhere_is_removed() {
        let n = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", "fake-vendor-key-abcdef123")]));
        let headers = h(&[
            (":status", "200"),
            ("content-type", "application/json"),
            ("X-Echo-Authorization", "Bearer fake-vendor-key-abcdef123"),
            ("x-debug", "key=fake-vendor-key-abcdef123;"),
            ("x-other", "fake-vendor-key-abcdef12"),
        ]);
        assert_eq!(headers_to_remove(&n, &headers), vec!["x-echo-authorization", "x-debug"]);
    }

    #[test]
    fn a_header_whose_name_reflects_the_key_is_removed_and_never_named_in_a_log() {
        let n = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", "fake-vendor-key-abcdef123")]));
        let headers = h(&[(":status", "200"), ("x-fake-vendor-key-abcdef123", "1"), ("x-fine", "1")]);
        assert_eq!(headers_to_remove(&n, &headers), vec!["x-fake-vendor-key-abcdef123"]);
        assert_eq!(super::shown(&n, "x-fake-vendor-key-abcdef123"), "(a name that holds the secret)");
        assert_eq!(super::shown(&n, "x-debug"), "x-debug");
    }

    #[test]
    fn query_key_in_a_redirect_location_is_removed_in_encoded_form_too() {
        let n = needles(&target(Inject::Query { name: "key".into(), field: "k".into() }), &fetched(&[("k", "AIza/x+y=z0123")]));
        let plain = h(&[("location", "https://vendor/cb?key=AIza/x+y=z0123")]);
        let encoded = h(&[("location", "https://vendor/cb?key=AIza%2Fx%2By%3Dz0123")]);
        assert_eq!(headers_to_remove(&n, &plain), vec!["location"]);
        assert_eq!(headers_to_remove(&n, &encoded), vec!["location"]);
        assert!(headers_to_remove(&n, &h(&[("location", "https://vendor/cb?key=other")])).is_empty());
    }

    #[test]
    fn basic_password_and_its_base64_pair_are_needles_but_not_the_username() {
        let t = target(Inject::Basic { username_field: "u".into(), password_field: "p".into() });
        let n = needles(&t, &fetched(&[("u", "AC0123456789"), ("p", "twilio-token-1")]));
        let pair = b64::std_encode(b"AC0123456789:twilio-token-1");
        assert_eq!(headers_to_remove(&n, &h(&[("www-authenticate", &format!("Basic {pair}"))])), vec!["www-authenticate"]);
        assert_eq!(headers_to_remove(&n, &h(&[("x-pw", "twilio-token-1")])), vec!["x-pw"]);
        assert!(headers_to_remove(&n, &h(&[("x-account", "AC0123456789")])).is_empty(), "the account id is not a secret");
    }

    #[test]
    fn base64_of_a_header_that_held_the_key_is_removed() {
        let key = "fake-vendor-key-abcdef123";
        let n = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", key)]));
        for text in [format!("Bearer {key}"), format!("k={key}"), key.to_string(), format!("ab{key}cd")] {
            let headers = h(&[("x-echo-b64", &b64::std_encode(text.as_bytes())), ("x-echo-b64url", &b64::jws_encode(text.as_bytes()))]);
            assert_eq!(headers_to_remove(&n, &headers), vec!["x-echo-b64", "x-echo-b64url"], "{text}");
        }
        assert!(headers_to_remove(&n, &h(&[("x-b64", &b64::std_encode(b"some other value entirely"))])).is_empty());
    }

    #[test]
    fn hex_of_the_key_in_either_case_is_removed() {
        let key = "fake-vendor-key-abcdef123";
        let n = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", key)]));
        let lower: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        let upper = lower.to_ascii_uppercase();
        let mixed: String = lower.chars().enumerate().map(|(i, c)| if i % 3 == 0 { c.to_ascii_uppercase() } else { c }).collect();
        let headers = h(&[
            ("x-debug-lower", &format!("key=0x{lower}")),
            ("x-debug-upper", &upper),
            ("x-debug-mixed", &mixed),
            ("x-debug-spaced", &lower[..lower.len() - 2]),
            ("x-request-id", "REQ-0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF"),
        ]);
        assert_eq!(headers_to_remove(&n, &headers), vec!["x-debug-lower", "x-debug-upper", "x-debug-mixed"]);
    }

    #[test]
    fn repeated_headers_are_named_once_and_short_secrets_are_not_searched() {
        let n = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", "k3y-value-123")]));
        let headers = h(&[("set-cookie", "a=k3y-value-123"), ("Set-Cookie", "b=k3y-value-123")]);
        assert_eq!(headers_to_remove(&n, &headers), vec!["set-cookie"]);
        let short = needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[("k", "abc")]));
        assert!(short.is_empty());
        assert!(headers_to_remove(&short, &h(&[("x", "abc")])).is_empty());
        assert!(needles(&target(Inject::Bearer { field: "k".into() }), &fetched(&[])).is_empty());
    }
}
