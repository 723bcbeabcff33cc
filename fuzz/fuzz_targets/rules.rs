//! Rule parsing and path matching, checked against a simple reference matcher: a pattern is
//! `/`-separated segments where `*` matches one non-empty segment, a final `**` matches anything
//! that follows (including nothing), and every other segment matches itself exactly.
//! Also: path sanitising never panics, and a sanitised path never holds a dot segment, `//`,
//! a backslash or a NUL.
#![no_main]
use keyward_core::policy::rules::{sanitize, Pattern, RouteRule, TokenRule};
use libfuzzer_sys::fuzz_target;

fn reference(pattern: &str, path: &str) -> bool {
    let (Some(p), Some(q)) = (pattern.strip_prefix('/'), path.strip_prefix('/')) else { return false };
    let ps: Vec<&str> = p.split('/').collect();
    let qs: Vec<&str> = q.split('/').collect();
    for (i, seg) in ps.iter().enumerate() {
        if *seg == "**" && i + 1 == ps.len() {
            return true;
        }
        let Some(got) = qs.get(i) else { return false };
        if *seg == "*" {
            if got.is_empty() {
                return false;
            }
        } else if seg != got {
            return false;
        }
    }
    ps.len() == qs.len()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pattern, path) = text.split_once('\n').unwrap_or((&text, "/"));
    if let Ok(p) = Pattern::parse(pattern) {
        assert_eq!(p.matches(path), reference(pattern, path), "pattern {pattern:?} path {path:?}");
    }
    let _ = RouteRule::parse(pattern).map(|r| r.matches("GET", path));
    let _ = TokenRule::parse(pattern);
    if let Ok(clean) = sanitize(path) {
        let p = clean.split('?').next().unwrap_or_default();
        assert!(p.starts_with('/'), "{path:?} -> {clean:?}");
        assert!(!p.contains("//") && !p.contains('\\') && !p.contains('\0'), "{path:?} -> {clean:?}");
        assert!(!p.split('/').any(|s| s == "." || s == ".."), "{path:?} -> {clean:?}");
    }
});
