//! Base64 helpers with the exact strictness each place needs.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// JWS base64url: no padding, url-safe alphabet only, canonical trailing bits.
const JWS: GeneralPurpose =
    GeneralPurpose::new(&alphabet::URL_SAFE, GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::RequireNone));
const STD_ANY: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));
const URL_ANY: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

pub fn jws_decode(s: &[u8]) -> Option<Vec<u8>> {
    JWS.decode(s).ok()
}

pub fn jws_encode(b: &[u8]) -> String {
    JWS.encode(b)
}

/// Key material: standard or url-safe alphabet, padded or not (surrounding whitespace trimmed).
pub fn key_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    STD_ANY.decode(s).ok().or_else(|| URL_ANY.decode(s).ok())
}

/// HTTP Basic credentials: standard alphabet, padding optional.
pub fn basic_decode(s: &[u8]) -> Option<Vec<u8>> {
    STD_ANY.decode(s).ok()
}

pub fn std_encode(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jws_is_strict() {
        assert_eq!(jws_decode(b"YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(jws_decode(b"YWI").as_deref(), Some(&b"ab"[..]));
        assert!(jws_decode(b"YWI=").is_none(), "padding");
        assert!(jws_decode(b"+/8").is_none(), "standard alphabet");
        assert!(jws_decode(b"YW I").is_none(), "whitespace");
        assert!(jws_decode(b"YWJ").is_none(), "non-canonical trailing bits");
        assert!(jws_decode(b"Y").is_none(), "impossible length");
        assert_eq!(jws_decode(b"-_8").as_deref(), Some(&[0xfb, 0xff][..]));
    }

    #[test]
    fn keys_accept_both_alphabets() {
        assert_eq!(key_decode("+/8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(key_decode("-_8").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(key_decode(" -_8=\n").as_deref(), Some(&[0xfb, 0xff][..]));
        assert!(key_decode("not base64!").is_none());
    }
}
