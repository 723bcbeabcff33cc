//! The small checks the configuration's names and values must pass.

use super::*;

pub(super) fn valid_env_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') && !s.as_bytes().first().is_some_and(u8::is_ascii_digit)
}

/// A store path such as `keyward/revoked`: `[A-Za-z0-9_.-]` segments separated by single `/`.
pub fn valid_store_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && seg.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')))
}

pub(super) fn valid_header_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'))
}

/// Headers that must never be chosen as a credential source or an injection target.
pub(super) const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "trailer",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "x-envoy-original-path",
];

pub(super) fn valid_authority(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']' | b'_'))
}

pub(super) fn valid_query_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

pub(super) fn parse_credential(path: &str, s: &str) -> Result<CredentialSource, ConfigError> {
    match s {
        "bearer" => Ok(CredentialSource::Bearer),
        "basic_password" => Ok(CredentialSource::BasicPassword),
        _ => {
            let Some(h) = s.strip_prefix("header:") else {
                return err(path, format!("unknown credential source {s:?} (bearer, basic_password or header:<name>)"));
            };
            let h = h.to_ascii_lowercase();
            if !valid_header_name(&h) || RESERVED_HEADERS.contains(&h.as_str()) {
                return err(path, format!("{h:?} cannot carry the credential"));
            }
            Ok(CredentialSource::Header(h))
        }
    }
}
