//! Reading the workload's credential from the request, per the target's `credential` source.

use crate::wire::b64;

/// Where a target's workload credential is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Bearer,
    BasicPassword,
    Header(String),
}

impl CredentialSource {
    /// The request header the credential is read from (lower case).
    pub fn header(&self) -> &str {
        match self {
            CredentialSource::Bearer | CredentialSource::BasicPassword => "authorization",
            CredentialSource::Header(h) => h,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredError {
    /// No header.
    Missing,
    /// Two header fields, or one comma-joined value: refused, never guessed.
    Duplicate,
    /// Present but not of the expected form.
    Malformed,
}

fn visible(b: &[u8]) -> bool {
    b.iter().all(|c| (0x21..0x7f).contains(c))
}

/// Extract the token from the source header's value. `values` is how many fields the header had
/// (the host reports it when it can; 1 otherwise).
pub fn extract(source: &CredentialSource, value: Option<&[u8]>) -> Result<String, CredError> {
    let Some(v) = value else {
        return Err(CredError::Missing);
    };
    if v.contains(&b',') {
        return Err(CredError::Duplicate);
    }
    let v = trim(v);
    if v.is_empty() {
        return Err(CredError::Missing);
    }
    let token: Vec<u8> = match source {
        CredentialSource::Bearer => scheme(v, b"bearer").ok_or(CredError::Malformed)?.to_vec(),
        CredentialSource::BasicPassword => {
            let enc = scheme(v, b"basic").ok_or(CredError::Malformed)?;
            let dec = b64::basic_decode(enc).ok_or(CredError::Malformed)?;
            let colon = dec.iter().position(|c| *c == b':').ok_or(CredError::Malformed)?;
            dec.get(colon + 1..).unwrap_or_default().to_vec()
        }
        CredentialSource::Header(_) => v.to_vec(),
    };
    if token.is_empty() || !visible(&token) {
        return Err(CredError::Malformed);
    }
    String::from_utf8(token).map_err(|_| CredError::Malformed)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|c| *c != b' ' && *c != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|c| *c != b' ' && *c != b'\t').map_or(start, |e| e + 1);
    v.get(start..end).unwrap_or_default()
}

/// `<scheme> 1*SP <credentials>` with a case-insensitive scheme.
fn scheme<'a>(v: &'a [u8], want: &[u8]) -> Option<&'a [u8]> {
    let sp = v.iter().position(|c| *c == b' ')?;
    let (s, rest) = v.split_at(sp);
    if !s.eq_ignore_ascii_case(want) {
        return None;
    }
    let rest = trim(rest);
    if rest.is_empty() || rest.contains(&b' ') || rest.contains(&b'\t') {
        return None;
    }
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "aaa.bbb.ccc";

    #[test]
    fn bearer() {
        let s = CredentialSource::Bearer;
        assert_eq!(extract(&s, Some(b"Bearer aaa.bbb.ccc")), Ok(T.into()));
        assert_eq!(extract(&s, Some(b"bearer aaa.bbb.ccc")), Ok(T.into()));
        assert_eq!(extract(&s, Some(b"BEARER   aaa.bbb.ccc ")), Ok(T.into()));
        assert_eq!(extract(&s, None), Err(CredError::Missing));
        assert_eq!(extract(&s, Some(b"")), Err(CredError::Missing));
        assert_eq!(extract(&s, Some(b"Bearer A,Bearer B")), Err(CredError::Duplicate));
        assert_eq!(extract(&s, Some(b"Bearer a, b")), Err(CredError::Duplicate));
        assert_eq!(extract(&s, Some(b"Bearer")), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"Bearer ")), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"Basic dXNlcjpwYXNz")), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"Bearer a b")), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"Bearerx aaa")), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some("Bearer aé".as_bytes())), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"aaa.bbb.ccc")), Err(CredError::Malformed));
    }

    #[test]
    fn basic_password() {
        let s = CredentialSource::BasicPassword;
        let v = format!("Basic {}", b64::std_encode(b"AC123:aaa.bbb.ccc"));
        assert_eq!(extract(&s, Some(v.as_bytes())), Ok(T.into()));
        let v = format!("Basic {}", b64::std_encode(b":aaa.bbb.ccc"));
        assert_eq!(extract(&s, Some(v.as_bytes())), Ok(T.into()));
        let v = format!("Basic {}", b64::std_encode(b"AC123"));
        assert_eq!(extract(&s, Some(v.as_bytes())), Err(CredError::Malformed));
        let v = format!("Basic {}", b64::std_encode(b"AC123:"));
        assert_eq!(extract(&s, Some(v.as_bytes())), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"Basic !!!")), Err(CredError::Malformed));
        assert_eq!(extract(&s, Some(b"Bearer aaa.bbb.ccc")), Err(CredError::Malformed));
    }

    #[test]
    fn header() {
        let s = CredentialSource::Header("x-api-key".into());
        assert_eq!(extract(&s, Some(b"aaa.bbb.ccc")), Ok(T.into()));
        assert_eq!(extract(&s, Some(b"a,b")), Err(CredError::Duplicate));
        assert_eq!(extract(&s, Some(b"a b")), Err(CredError::Malformed));
        assert_eq!(extract(&s, None), Err(CredError::Missing));
    }
}
