//! Allow rules and the path checks that run before any matching.
//!
//! Token rule:  `<target> <METHOD> <path-pattern>`
//! Target rule: `<METHOD> <path-pattern>`
//! Pattern segments are literals (exact, case-sensitive), `*` (one non-empty segment) or, as the
//! last segment only, `**` (zero or more segments). A trailing `/` is an empty last segment.

use std::fmt;

mod path;
pub use path::{sanitize, strip_prefix, PathError};

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

#[cfg(test)]
mod tests;
