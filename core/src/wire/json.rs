//! A small, strict JSON parser (RFC 8259) for untrusted input: token headers and claims, and store
//! responses. It differs from serde_json in the ways that matter for a security boundary:
//! duplicate object keys are an error at every depth, nesting and size are bounded, and the value
//! tree keeps integers exact. It allocates one tree and never panics.

use std::collections::HashSet;
use std::fmt;

/// Maximum nesting of arrays and objects (a model call's tool schemas nest deeply).
pub const MAX_DEPTH: usize = 64;
/// Members an object's duplicate check compares one by one; past this, a set.
const SMALL_OBJECT: usize = 16;

#[derive(Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// An integer literal that fits in i64 (no fraction, no exponent).
    Int(i64),
    /// Any other number (fraction, exponent, or out of i64 range).
    Float(f64),
    Str(String),
    Array(Vec<Value>),
    /// Members in document order; keys are unique.
    Object(Vec<(String, Value)>),
}

impl fmt::Debug for Value {
    // Values can carry secrets (store responses): never print contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Member of an object by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

impl std::error::Error for JsonError {}

/// Parse one JSON document. Leading and trailing JSON whitespace is allowed; anything else after
/// the value is an error.
pub fn parse(input: &[u8]) -> Result<Value, JsonError> {
    let mut p = Parser { s: input, i: 0 };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> JsonError {
        JsonError { offset: self.i, reason }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn lit(&mut self, word: &'static [u8], v: Value) -> Result<Value, JsonError> {
        if self.s.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        match self.peek() {
            None => Err(self.err("unexpected end of input")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.lit(b"true", Value::Bool(true)),
            Some(b'f') => self.lit(b"false", Value::Bool(false)),
            Some(b'n') => self.lit(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.i += 1; // '{'
        let mut members: Vec<(String, Value)> = Vec::new();
        let mut seen: Option<HashSet<String>> = None;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected object key"));
            }
            let key_at = self.i;
            let key = self.string()?;
            // Linear for small objects; a set once an object is large, so that a body of many
            // members costs linear time, not quadratic.
            let duplicate = match seen.as_mut() {
                Some(set) => !set.insert(key.clone()),
                None => members.iter().any(|(k, _)| *k == key),
            };
            if duplicate {
                return Err(JsonError { offset: key_at, reason: "duplicate object key" });
            }
            if seen.is_none() && members.len() >= SMALL_OBJECT {
                let mut set: HashSet<String> = members.iter().map(|(k, _)| k.clone()).collect();
                set.insert(key.clone());
                seen = Some(set);
            }
            self.ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected ':'"));
            }
            self.i += 1;
            self.ws();
            let v = self.value(depth)?;
            members.push((key, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.i += 1; // '['
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            v = v * 16 + u32::from(d);
            self.i += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.i += 1; // opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            match c {
                b'"' => {
                    self.i += 1;
                    break;
                }
                b'\\' => {
                    self.i += 1;
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated escape"));
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(self.err("lone surrogate"));
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or_else(|| self.err("invalid code point"))?
                        }
                        _ => return Err(self.err("invalid escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return Err(self.err("control character in string")),
                _ => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8 in string"))
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.err("leading zero"));
                }
            }
            Some(b'1'..=b'9') => {
                while let Some(b'0'..=b'9') = self.peek() {
                    self.i += 1;
                }
            }
            _ => return Err(self.err("invalid number")),
        }
        let mut integral = true;
        if self.peek() == Some(b'.') {
            integral = false;
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            integral = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
        }
        let text = std::str::from_utf8(self.s.get(start..self.i).unwrap_or_default()).map_err(|_| self.err("invalid number"))?;
        if integral {
            if let Ok(n) = text.parse::<i64>() {
                return Ok(Value::Int(n));
            }
        }
        text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Value::Float).ok_or_else(|| self.err("invalid number"))
    }
}

/// Append `s` to `out` as a JSON string literal (with quotes), escaping everything JSON requires
/// plus all control characters and non-ASCII-safe separators.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Value {
        match parse(s.as_bytes()) {
            Ok(v) => v,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }
    fn bad(s: &[u8]) -> &'static str {
        match parse(s) {
            Ok(v) => panic!("{s:?} parsed as {v:?}"),
            Err(e) => e.reason,
        }
    }

    #[test]
    fn parses_values() {
        assert_eq!(ok(" null "), Value::Null);
        assert_eq!(ok("true"), Value::Bool(true));
        assert_eq!(ok("-0"), Value::Int(0));
        assert_eq!(ok("1700000000"), Value::Int(1_700_000_000));
        assert_eq!(ok("1.5"), Value::Float(1.5));
        assert_eq!(ok("1e3"), Value::Float(1000.0));
        assert_eq!(ok("99999999999999999999"), Value::Float(1e20));
        assert_eq!(ok(r#""a\u00e9\ud83d\ude00\n""#), Value::Str("aé😀\n".into()));
        let v = ok(r#"{"a":[1,{"b":null}],"c":"d"}"#);
        assert_eq!(v.get("c").and_then(Value::as_str), Some("d"));
        assert_eq!(ok("[]"), Value::Array(vec![]));
        assert_eq!(ok("{}"), Value::Object(vec![]));
    }

    #[test]
    fn many_members_parse_in_linear_time_and_duplicates_among_them_are_found() {
        let big: String = format!("{{{}}}", (0..100_000).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(","));
        let started = std::time::Instant::now();
        assert!(parse(big.as_bytes()).is_ok());
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
        let dup = format!("{{{},\"k7\":0}}", (0..100).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(","));
        assert_eq!(bad(dup.as_bytes()), "duplicate object key");
        let early = format!("{{{},\"k3\":0}}", (0..5).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(","));
        assert_eq!(bad(early.as_bytes()), "duplicate object key");
    }

    #[test]
    fn rejects_duplicates_at_any_depth() {
        assert_eq!(bad(br#"{"a":1,"a":2}"#), "duplicate object key");
        assert_eq!(bad(br#"{"x":{"a":1,"a":1}}"#), "duplicate object key");
        assert_eq!(bad(br#"[{"sub":"a","sub":"b"}]"#), "duplicate object key");
        // Escapes are decoded before comparison: "\u0061" is "a".
        assert_eq!(bad(br#"{"a":1,"\u0061":2}"#), "duplicate object key");
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            &b""[..],
            b"{",
            b"}",
            b"[1,]",
            b"{\"a\":1,}",
            b"01",
            b"1.",
            b".5",
            b"-",
            b"+1",
            b"1e",
            b"NaN",
            b"Infinity",
            b"tru",
            b"nul",
            b"\"abc",
            b"\"\\x\"",
            b"\"\\ud800\"",
            b"\"\\udc00\"",
            b"\"\\ud800\\u0041\"",
            b"\"a\nb\"",
            b"\"\x01\"",
            b"{a:1}",
            b"{'a':1}",
            b"1 2",
            b"{} x",
            b"\"\xff\"",
            b"\"\xc3\"",
            b"1e999",
        ] {
            let _ = bad(s);
        }
    }

    #[test]
    fn bounds_depth() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(bad(deep.as_bytes()), "nesting too deep");
        let fine = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        let _ = ok(&fine);
    }

    #[test]
    fn debug_hides_contents() {
        assert_eq!(format!("{:?}", ok(r#""sk_test_secret""#)), "string");
    }

    #[test]
    fn writes_escaped_strings() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\c\nd\u{1}\u{2028}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001\u2028""#);
        assert_eq!(parse(s.as_bytes()), Ok(Value::Str("a\"b\\c\nd\u{1}\u{2028}".into())));
    }
}
