//! A request body read the strictest way a vendor could read it: the top-level fields of a form or
//! a JSON object that matter before the request goes on (the amount, the currency, a method
//! override). The vendor charges what *its* parser reads, and parsers disagree: one takes the
//! first of two fields, another the last; PHP reads ` amount`, `amount.x` and `amount x` as
//! `amount`, `amount[]` as an array; some frameworks compare names without case. So a name that
//! any of them could read as a wanted field, other than the field itself, makes the body ambiguous,
//! and an ambiguous body is refused, never guessed.

use super::Unreadable;
use crate::wire::{json, pct};

/// The field some frameworks (Rails, Laravel, Symfony) read as the method to run instead of
/// `:method`, in a form or a JSON body.
pub const METHOD_FIELD: &str = "_method";

/// How a body is encoded, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Form,
    Json,
}

impl BodyKind {
    /// The kind a `content-type` value names. `Ok(None)`: a body no framework reads fields from
    /// (or none declared); `Err`: one that some framework reads but this filter cannot read the
    /// same way (multipart, a charset other than UTF-8), refused where fields matter.
    pub fn of(content_type: Option<&[u8]>) -> Result<Option<BodyKind>, Unreadable> {
        let Some(ct) = content_type else { return Ok(None) };
        let v = String::from_utf8_lossy(ct).to_ascii_lowercase();
        let mut parts = v.split(';');
        let media = parts.next().unwrap_or_default().trim();
        for p in parts {
            let (k, val) = p.split_once('=').unwrap_or((p, ""));
            if k.trim() == "charset" && !matches!(val.trim().trim_matches('"'), "utf-8" | "utf8" | "us-ascii") {
                return Err(Unreadable::Bad("a body with fields that count here must be UTF-8 (charset=utf-8)"));
            }
        }
        let json = media == "application/json" || media == "text/json" || (media.starts_with("application/") && media.ends_with("+json"));
        match media {
            "application/x-www-form-urlencoded" => Ok(Some(BodyKind::Form)),
            _ if json => Ok(Some(BodyKind::Json)),
            m if m.starts_with("multipart/") => Err(Unreadable::Bad("a multipart body cannot be read here; this target reads form or JSON bodies")),
            _ => Ok(None),
        }
    }
}

/// A wanted field's value as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A form value (percent-decoded) or a JSON string.
    Text(Vec<u8>),
    /// A JSON integer.
    Int(i64),
    /// Any other JSON value (its kind, for the refusal).
    Other,
}

/// A name as the most forgiving parser reads it: only what precedes a `[` (the bracket form of a
/// structure) or a NUL (where C strings end), `%uXXXX` decoded (IIS), fullwidth letters as ASCII,
/// without leading or trailing whitespace or control characters (Unicode's, as Java's `trim` and
/// Python's `strip` drop them), in lower case, with `.` and space read as `_`.
fn normalise(name: &[u8]) -> String {
    let base = name.split(|b| *b == b'[' || *b == 0).next().unwrap_or_default();
    let text = String::from_utf8_lossy(base);
    let mut decoded = String::with_capacity(text.len());
    let mut rest = text.as_ref();
    while let Some(i) = rest.find("%u") {
        let (before, after) = rest.split_at(i);
        decoded.push_str(before);
        match after.get(2..6).and_then(|h| u32::from_str_radix(h, 16).ok()).and_then(char::from_u32) {
            Some(c) => {
                decoded.push(c);
                rest = after.get(6..).unwrap_or_default();
            }
            None => {
                decoded.push_str("%u");
                rest = after.get(2..).unwrap_or_default();
            }
        }
    }
    decoded.push_str(rest);
    let folded: String = decoded
        .chars()
        .map(|c| match c as u32 {
            0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            _ => c,
        })
        .collect();
    folded
        .trim_matches(|c: char| c.is_whitespace() || c.is_control())
        .chars()
        .map(|c| if c == '.' || c == ' ' { '_' } else { c.to_ascii_lowercase() })
        .collect()
}

/// Could a parser read `name` as `field`?
pub fn names(name: &[u8], field: &str) -> bool {
    normalise(name) == normalise(field.as_bytes())
}

/// Record `value` under `name` in `found` (one slot per wanted field).
fn take(found: &mut [Option<Value>], wanted: &[(&str, String)], name: &[u8], value: impl FnOnce() -> Value) -> Result<(), Unreadable> {
    let norm = normalise(name);
    let mut value = Some(value);
    for ((field, field_norm), slot) in wanted.iter().zip(found.iter_mut()) {
        if norm != *field_norm {
            continue;
        }
        if name != field.as_bytes() {
            return Err(Unreadable::Bad("a field name in the body could be read as the amount, the currency or _method (case, spaces, dots or brackets)"));
        }
        if slot.is_some() {
            return Err(Unreadable::Bad("the amount, currency or _method is given more than once"));
        }
        *slot = value.take().map(|f| f());
    }
    Ok(())
}

/// The values of the `wanted` top-level fields of `body`, each at most once and named exactly.
pub fn scan(kind: BodyKind, body: &[u8], wanted: &[&str]) -> Result<Vec<Option<Value>>, Unreadable> {
    let wanted: Vec<(&str, String)> = wanted.iter().map(|w| (*w, normalise(w.as_bytes()))).collect();
    let mut found: Vec<Option<Value>> = vec![None; wanted.len()];
    match kind {
        BodyKind::Form => {
            // `;` separates pairs too for some parsers (older Go, Python, Perl): split on both.
            for pair in body.split(|b| *b == b'&' || *b == b';').filter(|p| !p.is_empty()) {
                let (k, v) = match pair.iter().position(|b| *b == b'=') {
                    Some(i) => (pair.get(..i).unwrap_or_default(), pair.get(i + 1..).unwrap_or_default()),
                    None => (pair, &[][..]),
                };
                take(&mut found, &wanted, &pct::decode(k, true), || Value::Text(pct::decode(v, true)))?;
            }
        }
        BodyKind::Json => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(found);
            }
            let v = json::parse(body).map_err(|_| Unreadable::Bad("the body is not valid JSON"))?;
            let members = v.as_object().ok_or(Unreadable::Bad("the body is not a JSON object"))?;
            for (name, value) in members {
                take(&mut found, &wanted, name.as_bytes(), || match value {
                    json::Value::Str(s) => Value::Text(s.as_bytes().to_vec()),
                    json::Value::Int(n) => Value::Int(*n),
                    _ => Value::Other,
                })?;
            }
        }
    }
    Ok(found)
}

/// A method override's value as a method token (upper case), as for the override headers.
pub fn method(v: &Value) -> Result<String, Unreadable> {
    let Value::Text(t) = v else { return Err(Unreadable::Bad("_method in the body is not a method")) };
    let m = String::from_utf8_lossy(t).trim().to_ascii_uppercase();
    let ok = !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
    if ok {
        Ok(m)
    } else {
        Err(Unreadable::Bad("_method in the body is not a method"))
    }
}

/// The methods a body asks the vendor to run instead of `:method` (its `_method` field).
pub fn overrides(kind: BodyKind, body: &[u8]) -> Result<Vec<String>, Unreadable> {
    let found = scan(kind, body, &[METHOD_FIELD])?;
    found.first().and_then(Option::as_ref).map(method).transpose().map(|m| m.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Vec<Option<Value>>, Unreadable> {
        scan(BodyKind::Form, body.as_bytes(), &["amount", "currency", METHOD_FIELD])
    }

    #[test]
    fn names_a_parser_could_read_as_a_field_are_ambiguous() {
        for body in [
            "amount=1&%20amount=900",
            "amount=1&amount%20=900",
            "amount=1&Amount=900",
            "amount=1&AMOUNT=900",
            "amount%00=1&x=1&am%20ount=2",
            "amount=1&amount[]=900",
            "amount=1&amount[x]=900",
            " amount=900",
            "amount=1&_METHOD=DELETE",
            "amount=1&+_method=DELETE",
            "amount=1&_method%20=DELETE",
            "a=b;amount=99999&amount=1",
            "%u0061mount=99999&amount=1",
            "%0Bamount=99999&amount=1",
            "amount%C2%A0=99999&amount=1",
            "%EF%BD%81mount=99999&amount=1",
        ] {
            assert!(form(body).is_err(), "{body}");
        }
        assert!(matches!(form("amount=1&amount=2"), Err(Unreadable::Bad(m)) if m.contains("more than once")));
    }

    #[test]
    fn exact_names_are_read_and_others_ignored() {
        let f = form("amount=500&currency=usd&amount_due=3&description=a+b").unwrap_or_default();
        assert_eq!(f, vec![Some(Value::Text(b"500".to_vec())), Some(Value::Text(b"usd".to_vec())), None]);
        let f = form("a%6Dount=500").unwrap_or_default();
        assert_eq!(f.first(), Some(&Some(Value::Text(b"500".to_vec()))), "percent-decoded as the vendor decodes it");
    }

    #[test]
    fn json_members_are_read_the_same_way() {
        let j = |b: &str| scan(BodyKind::Json, b.as_bytes(), &["amount", METHOD_FIELD]);
        assert_eq!(j(r#"{"amount":5,"_method":"delete"}"#).unwrap_or_default(), vec![Some(Value::Int(5)), Some(Value::Text(b"delete".to_vec()))]);
        assert!(j(r#"{"amount":5," amount":6}"#).is_err());
        assert!(j(r#"{"amount":5,"Amount":6}"#).is_err());
        assert_eq!(j("").unwrap_or_default(), vec![None, None], "an empty body has no fields");
        assert!(j("[1]").is_err());
    }

    #[test]
    fn method_overrides_in_bodies() {
        assert_eq!(overrides(BodyKind::Form, b"a=1&_method=delete").ok(), Some(vec!["DELETE".to_string()]));
        assert_eq!(overrides(BodyKind::Json, br#"{"_method":"PATCH"}"#).ok(), Some(vec!["PATCH".to_string()]));
        assert_eq!(overrides(BodyKind::Form, b"a=1").ok(), Some(vec![]));
        assert!(overrides(BodyKind::Form, b"_method=DE%0ALETE").is_err());
        assert!(overrides(BodyKind::Json, br#"{"_method":1}"#).is_err());
        assert_eq!(BodyKind::of(Some(b"Application/JSON; charset=utf-8")), Ok(Some(BodyKind::Json)));
        for json in ["text/json", "application/vnd.api+json", "application/json-patch+json"] {
            assert_eq!(BodyKind::of(Some(json.as_bytes())), Ok(Some(BodyKind::Json)), "{json}");
        }
        assert_eq!(BodyKind::of(Some(b"text/plain")), Ok(None));
        assert_eq!(BodyKind::of(None), Ok(None));
        assert!(BodyKind::of(Some(b"multipart/form-data; boundary=x")).is_err());
        assert!(BodyKind::of(Some(b"application/x-www-form-urlencoded; charset=utf-16le")).is_err());
    }
}
