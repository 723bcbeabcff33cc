//! The checks a request path passes before any rule is matched: origin form, no empty or dot
//! segments, no encoded separators or control characters; and the route prefix taken off it.

/// Why a request path was refused before matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    EmptySegment,
    DotSegment,
    Backslash,
    ControlOrNonAscii,
    EncodedSeparator,
    BadPercent,
    Fragment,
    TooLong,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "path must start with '/'",
            PathError::EmptySegment => "path has an empty segment ('//')",
            PathError::DotSegment => "path has a '.' or '..' segment",
            PathError::Backslash => "path has a backslash",
            PathError::ControlOrNonAscii => "path has a control, space or non-ASCII character",
            PathError::EncodedSeparator => "path has a percent-encoded '/', '\\', '.' or NUL",
            PathError::BadPercent => "path has a malformed percent-escape",
            PathError::Fragment => "path has a fragment",
            PathError::TooLong => "path is too long",
        }
    }
}

pub const MAX_PATH: usize = 8192;

/// Split `:path` into path and query, and check the path. Returns the path part.
pub fn sanitize(raw: &str) -> Result<&str, PathError> {
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    let path = match raw.find('?') {
        Some(i) => raw.get(..i).unwrap_or(""),
        None => raw,
    };
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let mut i = 0;
    while i < b.len() {
        let c = b.get(i).copied().unwrap_or(0);
        match c {
            b'\\' => return Err(PathError::Backslash),
            b'#' => return Err(PathError::Fragment),
            0..=0x20 | 0x7f..=0xff => return Err(PathError::ControlOrNonAscii),
            b'%' => {
                let h = b.get(i + 1).copied();
                let l = b.get(i + 2).copied();
                let (Some(h), Some(l)) = (h.and_then(hexval), l.and_then(hexval)) else {
                    return Err(PathError::BadPercent);
                };
                let byte = h * 16 + l;
                if matches!(byte, b'/' | b'\\' | b'.' | 0) {
                    return Err(PathError::EncodedSeparator);
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    // Segment checks: no empty segment except a trailing one, no dot segments.
    let segs: Vec<&str> = path.get(1..).unwrap_or("").split('/').collect();
    let n = segs.len();
    for (k, s) in segs.iter().enumerate() {
        if s.is_empty() && k + 1 != n {
            return Err(PathError::EmptySegment);
        }
        // A dot segment with matrix parameters (`..;x`) is one to servers that strip them.
        let bare = s.split(';').next().unwrap_or(s);
        if bare == "." || bare == ".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(path)
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Remove the route's `prefix` from a sanitised path. `/stripe/v1/x` with prefix `/stripe` gives
/// `/v1/x`; the bare prefix gives `/`. `None` when the path is not under the prefix.
pub fn strip_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() {
        Some("/")
    } else if rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}
