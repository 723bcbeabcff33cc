use super::path::MAX_PATH;
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
