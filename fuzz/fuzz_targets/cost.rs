//! Reading a request's cost from its body (spend caps): never panics, and a form amount that is
//! accepted is exactly what a simple reference reader finds: pairs split on `&` or `;`, one field
//! named `amount` once percent-decoded, and no other name a lenient parser could read as `amount`
//! or `_method` (whitespace or control characters around it, another case, `.` or space for `_`,
//! a bracket form, a NUL, `%uXXXX`, fullwidth letters), holding only digits, at most 10^15; a
//! `_method` field, if any, once and a method token.
#![no_main]
use keyward_core::policy::cost::{compile, RawCost, MAX_COST};
use libfuzzer_sys::fuzz_target;

fn decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|x| (*x as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// What a lenient parser reads a name as.
fn lenient(name: &[u8]) -> Vec<u8> {
    let cut = name.iter().position(|b| *b == b'[' || *b == 0).unwrap_or(name.len());
    let s = String::from_utf8_lossy(&name[..cut]).to_string();
    // IIS's %uXXXX, read one escape at a time.
    let cs: Vec<char> = s.chars().collect();
    let mut u = String::new();
    let mut i = 0;
    while i < cs.len() {
        let esc = (cs[i] == '%' && cs.get(i + 1) == Some(&'u') && i + 6 <= cs.len())
            .then(|| cs[i + 2..i + 6].iter().collect::<String>())
            .and_then(|h| u32::from_str_radix(&h, 16).ok())
            .and_then(char::from_u32);
        match esc {
            Some(c) => {
                u.push(c);
                i += 6;
            }
            None => {
                u.push(cs[i]);
                i += 1;
            }
        }
    }
    let wide: String = u.chars().map(|c| if ('\u{FF01}'..='\u{FF5E}').contains(&c) { char::from_u32(c as u32 - 0xFEE0).unwrap_or(c) } else { c }).collect();
    let t = wide.trim_matches(|c: char| c.is_whitespace() || c.is_control());
    t.chars().map(|c| if c == '.' || c == ' ' { '_' } else { c.to_ascii_lowercase() }).collect::<String>().into_bytes()
}

fn reference(body: &[u8]) -> Option<u64> {
    let mut found = None;
    let mut method: Option<Vec<u8>> = None;
    for pair in body.split(|b| *b == b'&' || *b == b';').filter(|p| !p.is_empty()) {
        let mut kv = pair.splitn(2, |b| *b == b'=');
        let name = decode(kv.next().unwrap_or_default());
        let value = decode(kv.next().unwrap_or_default());
        let l = lenient(&name);
        if (l == b"amount" && name != b"amount") || (l == b"_method" && name != b"_method") {
            return None;
        }
        if name == b"amount" {
            if found.is_some() {
                return None;
            }
            found = Some(value);
        } else if name == b"_method" {
            if method.is_some() {
                return None;
            }
            method = Some(value);
        }
    }
    if let Some(m) = method {
        let m = String::from_utf8_lossy(&m).trim().to_ascii_uppercase();
        if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return None;
        }
    }
    let v = found?;
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let s = std::str::from_utf8(&v).ok()?.trim_start_matches('0');
    let n: u64 = if s.is_empty() { 0 } else { s.parse().ok()? };
    (n <= MAX_COST).then_some(n)
}

fuzz_target!(|data: &[u8]| {
    let form: RawCost = serde_json::from_str(r#"{"form_field": "amount", "max_body_bytes": 4096}"#).unwrap_or_default();
    let json: RawCost = serde_json::from_str(r#"{"json_field": "amount", "currency_field": "c", "currencies": ["usd"]}"#).unwrap_or_default();
    let (Ok(form), Ok(json)) = (compile("f", &form), compile("j", &json)) else { return };
    let got = form.read(data).ok().map(|p| p.cost);
    assert_eq!(got, reference(data), "{:?}", String::from_utf8_lossy(data));
    if let Ok(p) = json.read(data) {
        assert!(p.cost <= MAX_COST && p.currency.as_deref() == Some("usd"));
    }
});
