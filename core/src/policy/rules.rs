//! Allow rules and the path checks that run before any matching.
//!
//! Token rule:  `<target> <METHOD> <path-pattern>`
//! Target rule: `<METHOD> <path-pattern>`
//! Pattern segments are literals (exact, case-sensitive), `*` (one non-empty segment) or, as the
//! last segment only, `**` (zero or more segments). A trailing `/` is an empty last segment.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    One,
    Rest,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    segs: Vec<Seg>,
    text: String,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Any,
    Exact(String),
}

/// A target's own rule (its ceiling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub method: Method,
    pub pattern: Pattern,
}

/// A rule carried by a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRule {
    pub target: String,
    pub rule: RouteRule,
}

fn is_target_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')
}

/// A valid target name: 1..=64 of `[A-Za-z0-9_.-]`.
pub fn valid_target_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(is_target_char)
}

/// Characters a literal pattern segment may hold: RFC 3986 pchar minus `%`-escapes of the
/// separators. `%` itself is allowed so that a literal can name an encoded byte exactly.
fn is_literal_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'+' | b',' | b';' | b'=' | b':' | b'@' | b'%')
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!("path pattern {s:?} must start with '/'"));
        };
        if s.len() > 1024 {
            return Err("path pattern is longer than 1024 bytes".into());
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let n = parts.len();
        let mut segs = Vec::with_capacity(n);
        for (i, p) in parts.iter().enumerate() {
            let last = i + 1 == n;
            let seg = match *p {
                "**" if last => Seg::Rest,
                "**" => return Err(format!("in {s:?}: '**' is allowed only as the last segment")),
                "*" => Seg::One,
                "" if last => Seg::Lit(String::new()),
                "" => return Err(format!("in {s:?}: empty segment ('//')")),
                "." | ".." => return Err(format!("in {s:?}: dot segments never match")),
                lit => {
                    if lit.contains('*') {
                        return Err(format!("in {s:?}: '*' must be a whole segment (no globs or regular expressions)"));
                    }
                    if !lit.bytes().all(is_literal_char) {
                        return Err(format!("in {s:?}: segment {lit:?} has a character not allowed in a path"));
                    }
                    Seg::Lit(lit.to_string())
                }
            };
            segs.push(seg);
        }
        Ok(Pattern { segs, text: s.to_string() })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Does every path this pattern matches also match `outer`? Decided segment by segment, so
    /// it never says yes wrongly (a child credential never exceeds its parent); it may say no to
    /// a pattern that is contained only through a coincidence of literals, which costs the caller
    /// nothing but a narrower request.
    pub fn within(&self, outer: &Pattern) -> bool {
        let mut inner = self.segs.iter();
        for o in &outer.segs {
            let i = inner.next();
            match (o, i) {
                // The rest of any path is allowed by `**`, whatever the inner pattern still has.
                (Seg::Rest, _) => return true,
                // The inner pattern matches shorter paths, or any number of segments where the
                // outer needs exactly one.
                (_, None | Some(Seg::Rest)) => return false,
                (Seg::One, Some(Seg::One)) => {}
                (Seg::One, Some(Seg::Lit(l))) if !l.is_empty() => {}
                (Seg::One, Some(Seg::Lit(_))) => return false,
                (Seg::Lit(a), Some(Seg::Lit(b))) if a == b => {}
                (Seg::Lit(_), Some(_)) => return false,
            }
        }
        inner.next().is_none()
    }

    /// Match a sanitised path (no query), e.g. `/v1/charges`.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut it = rest.split('/');
        for seg in &self.segs {
            match seg {
                Seg::Rest => return true,
                Seg::One => match it.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Seg::Lit(l) => match it.next() {
                    Some(p) if p == l => {}
                    _ => return false,
                },
            }
        }
        it.next().is_none()
    }
}

impl Method {
    pub fn parse(s: &str) -> Result<Method, String> {
        if s == "*" {
            return Ok(Method::Any);
        }
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_uppercase()) {
            return Err(format!("method {s:?} must be upper-case letters or '*'"));
        }
        Ok(Method::Exact(s.to_string()))
    }
    pub fn matches(&self, m: &str) -> bool {
        match self {
            Method::Any => true,
            Method::Exact(x) => x == m,
        }
    }

    /// Every method this allows, `outer` allows.
    pub fn within(&self, outer: &Method) -> bool {
        match (self, outer) {
            (_, Method::Any) => true,
            (Method::Exact(a), Method::Exact(b)) => a == b,
            (Method::Any, Method::Exact(_)) => false,
        }
    }
}

impl RouteRule {
    /// `"<METHOD> <path-pattern>"`
    pub fn parse(s: &str) -> Result<RouteRule, String> {
        let mut parts = s.split(' ');
        let (Some(m), Some(p), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("rule {s:?} must be \"<METHOD> <path-pattern>\" separated by one space"));
        };
        Ok(RouteRule { method: Method::parse(m)?, pattern: Pattern::parse(p)? })
    }
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.matches(method) && self.pattern.matches(path)
    }

    pub fn within(&self, outer: &RouteRule) -> bool {
        self.method.within(&outer.method) && self.pattern.within(&outer.pattern)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Any => f.write_str("*"),
            Method::Exact(m) => f.write_str(m),
        }
    }
}

/// The rule as written: `"<target> <METHOD> <path-pattern>"`.
impl fmt::Display for TokenRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.target, self.rule.method, self.rule.pattern.text)
    }
}

impl TokenRule {
    /// `"<target> <METHOD> <path-pattern>"`
    pub fn parse(s: &str) -> Result<TokenRule, String> {
        let mut parts = s.splitn(2, ' ');
        let (Some(t), Some(rest)) = (parts.next(), parts.next()) else {
            return Err(format!("rule {s:?} must be \"<target> <METHOD> <path-pattern>\""));
        };
        if !valid_target_name(t) {
            return Err(format!("rule {s:?}: invalid target name"));
        }
        Ok(TokenRule { target: t.to_string(), rule: RouteRule::parse(rest)? })
    }

    /// Is this rule provably within one of `outer`'s (same target, method and path set inside)?
    pub fn within_any(&self, outer: &[TokenRule]) -> bool {
        outer.iter().any(|o| o.target == self.target && self.rule.within(&o.rule))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> Pattern {
        match Pattern::parse(s) {
            Ok(p) => p,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn literal_and_wildcards() {
        let p = pat("/v1/charges");
        assert!(p.matches("/v1/charges"));
        assert!(!p.matches("/v1/charges/"));
        assert!(!p.matches("/v1/Charges"));
        assert!(!p.matches("/v1"));
        assert!(!p.matches("/v1/charges/x"));

        let p = pat("/v1/*/refund");
        assert!(p.matches("/v1/ch_1/refund"));
        assert!(!p.matches("/v1//refund"));
        assert!(!p.matches("/v1/refund"));
        assert!(!p.matches("/v1/a/b/refund"));

        let p = pat("/v1/**");
        assert!(p.matches("/v1"));
        assert!(p.matches("/v1/"));
        assert!(p.matches("/v1/a/b/c"));
        assert!(!p.matches("/v2/a"));
        assert!(!p.matches("/v10"));

        let p = pat("/**");
        assert!(p.matches("/"));
        assert!(p.matches("/anything/at/all/"));

        let p = pat("/");
        assert!(p.matches("/"));
        assert!(!p.matches("/a"));

        let p = pat("/v1/items/");
        assert!(p.matches("/v1/items/"));
        assert!(!p.matches("/v1/items"));

        let p = pat("/v1/*");
        assert!(p.matches("/v1/x"));
        assert!(!p.matches("/v1/"), "* needs a non-empty segment");
        assert!(!p.matches("/v1/x/"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for s in ["v1", "", "/v1//x", "/**/x", "/v1/a*", "/v1/*b", "/./x", "/a/../b", "/a b", "/a\\b", "/a?b", "/a#b", "/***"] {
            assert!(Pattern::parse(s).is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn rules_parse() {
        let r = match TokenRule::parse("stripe POST /v1/payment_intents") {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r.target, "stripe");
        assert!(r.rule.matches("POST", "/v1/payment_intents"));
        assert!(!r.rule.matches("GET", "/v1/payment_intents"));
        assert!(!r.rule.matches("post", "/v1/payment_intents"));
        let any = match TokenRule::parse("stripe * /v1/**") {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert!(any.rule.matches("DELETE", "/v1/x"));
        for s in [
            "stripe",
            "stripe POST",
            "stripe post /v1",
            "stripe  POST /v1",
            "stripe POST /v1 x",
            "str ipe POST /v1",
            "stripe POST v1",
            "st/ripe GET /",
            " stripe GET /",
            "stripe GET /\t",
        ] {
            assert!(TokenRule::parse(s).is_err(), "{s:?} should be rejected");
        }
        assert!(RouteRule::parse("GET /v1/**").is_ok());
        assert!(RouteRule::parse("GET").is_err());
        assert!(RouteRule::parse("Get /").is_err());
    }

    #[test]
    fn sanitize_paths() {
        assert_eq!(sanitize("/v1/charges?x=1&y=/../"), Ok("/v1/charges"));
        assert_eq!(sanitize("/"), Ok("/"));
        assert_eq!(sanitize("/v1/"), Ok("/v1/"));
        assert_eq!(sanitize("/v1/ch%61rges"), Ok("/v1/ch%61rges"));
        assert_eq!(sanitize("/a/%252e%252e/b"), Ok("/a/%252e%252e/b"));
        assert_eq!(sanitize("/v1/..."), Ok("/v1/..."));
        let cases: &[(&str, PathError)] = &[
            ("v1", PathError::NotOriginForm),
            ("", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
            ("http://x/v1", PathError::NotOriginForm),
            ("//v1", PathError::EmptySegment),
            ("/v1//x", PathError::EmptySegment),
            ("/v1/./x", PathError::DotSegment),
            ("/v1/../admin", PathError::DotSegment),
            ("/..", PathError::DotSegment),
            ("/.", PathError::DotSegment),
            ("/v1\\..\\x", PathError::Backslash),
            ("/v1/%2e%2e/x", PathError::EncodedSeparator),
            ("/v1/%2E/x", PathError::EncodedSeparator),
            ("/v1%2fadmin", PathError::EncodedSeparator),
            ("/v1%2Fadmin", PathError::EncodedSeparator),
            ("/v1%5cadmin", PathError::EncodedSeparator),
            ("/v1%00", PathError::EncodedSeparator),
            ("/v1%", PathError::BadPercent),
            ("/v1%2", PathError::BadPercent),
            ("/v1%zz", PathError::BadPercent),
            ("/v1\n", PathError::ControlOrNonAscii),
            ("/v1 x", PathError::ControlOrNonAscii),
            ("/v1\u{7f}", PathError::ControlOrNonAscii),
            ("/caf\u{e9}", PathError::ControlOrNonAscii),
            ("/v1#frag", PathError::Fragment),
        ];
        for (p, e) in cases {
            assert_eq!(sanitize(p), Err(*e), "{p:?}");
        }
        assert_eq!(sanitize(&format!("/{}", "a".repeat(MAX_PATH))), Err(PathError::TooLong));
    }

    #[test]
    fn prefixes() {
        assert_eq!(strip_prefix("/stripe/v1/x", "/stripe"), Some("/v1/x"));
        assert_eq!(strip_prefix("/stripe/v1/x", "/stripe/"), Some("/v1/x"));
        assert_eq!(strip_prefix("/stripe", "/stripe"), Some("/"));
        assert_eq!(strip_prefix("/stripe/", "/stripe"), Some("/"));
        assert_eq!(strip_prefix("/stripev1", "/stripe"), None);
        assert_eq!(strip_prefix("/other/v1", "/stripe"), None);
        assert_eq!(strip_prefix("/v1", ""), Some("/v1"));
        assert_eq!(strip_prefix("/v1", "/"), Some("/v1"));
    }

    #[test]
    fn containment_examples() {
        let w = |a: &str, b: &str| pat(a).within(&pat(b));
        assert!(w("/v1/charges", "/v1/charges") && w("/v1/charges", "/v1/*") && w("/v1/charges", "/v1/**"));
        assert!(w("/v1/*", "/v1/**") && w("/v1/*/refunds", "/v1/**") && w("/v1/**", "/v1/**") && w("/v1/**", "/**"));
        assert!(w("/v1/", "/v1/**"), "a trailing slash is an empty segment, which ** allows");
        assert!(!w("/v1/", "/v1/*"), "* needs a non-empty segment");
        assert!(!w("/v1/**", "/v1/*"), "** is more than one segment");
        assert!(!w("/v1/*", "/v1/charges") && !w("/v1", "/v1/*") && !w("/v1/a/b", "/v1/*"));
        assert!(!w("/v1/**", "/v1/*/**"), "/v1 itself matches the inner pattern only");
        assert!(!w("/v2/x", "/v1/**") && !w("/**", "/v1/**"));
        let r = |a: &str| match TokenRule::parse(a) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let parent = [r("stripe POST /v1/payment_intents"), r("stripe GET /v1/**")];
        assert!(r("stripe GET /v1/customers/*").within_any(&parent));
        assert!(r("stripe POST /v1/payment_intents").within_any(&parent));
        assert!(!r("stripe * /v1/payment_intents").within_any(&parent), "any method is more than POST");
        assert!(!r("stripe DELETE /v1/customers/x").within_any(&parent));
        assert!(!r("openai GET /v1/models").within_any(&parent), "another target");
    }

    /// A small deterministic generator (no new dependency): patterns and paths over a tiny
    /// alphabet, so that collisions between literals, `*`, `**` and trailing slashes are common.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[(self.next() % xs.len() as u64) as usize]
        }
        fn pattern(&mut self) -> String {
            let n = 1 + self.next() % 4;
            let mut out = String::new();
            for i in 0..n {
                out.push('/');
                let last = i + 1 == n;
                out.push_str(if last { self.pick(&["a", "b", "*", "**", ""]) } else { self.pick(&["a", "b", "*"]) });
            }
            out
        }
        fn path(&mut self) -> String {
            let n = 1 + self.next() % 5;
            let mut out = String::new();
            for i in 0..n {
                out.push('/');
                out.push_str(if i + 1 == n { self.pick(&["a", "b", "c", ""]) } else { self.pick(&["a", "b", "c"]) });
            }
            out
        }
    }

    /// The property attenuation relies on: when `within` says yes, no path matches the inner
    /// pattern without matching the outer one.
    #[test]
    fn within_never_says_yes_wrongly() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let paths: Vec<String> = (0..400).map(|_| g.path()).collect();
        let mut contained = 0;
        for _ in 0..4000 {
            let (a, b) = (pat(&g.pattern()), pat(&g.pattern()));
            if a.within(&b) {
                contained += 1;
                for p in &paths {
                    assert!(!a.matches(p) || b.matches(p), "{a:?} within {b:?}, but {p} matches only the first");
                }
            }
        }
        assert!(contained > 300, "the generator exercises containment ({contained})");
    }
}
