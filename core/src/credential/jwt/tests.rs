use super::*;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const NOW: i64 = 1_800_000_000;

fn key() -> HmacKey {
    match HmacKey::new(KEY) {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}

fn policy() -> Policy {
    Policy { audience: "keyward".into(), issuer: None, clock_skew_s: 30, max_token_lifetime_s: 3600 }
}

fn claims_json(extra: &str) -> String {
    format!(r#"{{"sub":"lambda/pay","aud":"keyward","exp":{},"jti":"j1","allow":["stripe POST /v1/payment_intents"]{extra}}}"#, NOW + 600)
}

/// Sign arbitrary header and payload bytes.
fn raw(header: &str, payload: &str) -> String {
    let mut s = b64::jws_encode(header.as_bytes());
    s.push('.');
    s.push_str(&b64::jws_encode(payload.as_bytes()));
    let sig = key().sign(s.as_bytes());
    s.push('.');
    s.push_str(&b64::jws_encode(&sig));
    s
}

const HDR: &str = r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#;

fn full(token: &str) -> Result<Claims, TokenError> {
    let u = parse(token)?;
    if u.kid != "k1" {
        return Err(TokenError::UnknownKid(u.kid));
    }
    let payload = u.verify(&key())?;
    let c = parse_claims(payload)?;
    policy().check(&c, NOW)?;
    Ok(c)
}

#[test]
fn accepts_valid_token() {
    let t = mint("k1", &key(), &claims_json(r#","run":"sqs/123","lim":{"rpm":10,"total":5}"#));
    let c = match full(&t) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(c.sub, "lambda/pay");
    assert_eq!(c.jti, "j1");
    assert_eq!(c.run.as_deref(), Some("sqs/123"));
    assert_eq!(c.lim, Limits { rpm: Some(10), total: Some(5), spend: None });
    assert_eq!(c.allow.len(), 1);
    // typ is optional, and case-insensitive.
    assert!(full(&raw(r#"{"alg":"HS256","kid":"k1"}"#, &claims_json(""))).is_ok());
    assert!(full(&raw(r#"{"alg":"HS256","typ":"jwt","kid":"k1"}"#, &claims_json(""))).is_ok());
    // Embedded keys are ignored, never used.
    assert!(full(&raw(r#"{"alg":"HS256","kid":"k1","jku":"https://evil/","jwk":{"k":"AA"}}"#, &claims_json(""))).is_ok());
    // aud as an array.
    let t = raw(HDR, &claims_json("").replace(r#""aud":"keyward""#, r#""aud":["other","keyward"]"#));
    assert!(full(&t).is_ok());
}

#[test]
fn rejects_bad_alg() {
    for h in [
        r#"{"alg":"none","kid":"k1"}"#,
        r#"{"alg":"None","kid":"k1"}"#,
        r#"{"alg":"NONE","kid":"k1"}"#,
        r#"{"alg":"hs256","kid":"k1"}"#,
        r#"{"alg":"HS384","kid":"k1"}"#,
        r#"{"alg":"HS512","kid":"k1"}"#,
        r#"{"alg":"RS256","kid":"k1"}"#,
        r#"{"alg":"HS256 ","kid":"k1"}"#,
        r#"{"alg":["HS256"],"kid":"k1"}"#,
        r#"{"alg":null,"kid":"k1"}"#,
        r#"{"kid":"k1"}"#,
    ] {
        assert!(matches!(full(&raw(h, &claims_json(""))), Err(TokenError::BadAlg(_))), "{h}");
    }
    // alg none with an empty signature is not even three parts.
    let t = format!("{}.{}.", b64::jws_encode(br#"{"alg":"none","kid":"k1"}"#), b64::jws_encode(claims_json("").as_bytes()));
    assert_eq!(full(&t), Err(TokenError::NotThreeParts));
}

#[test]
fn rejects_header_problems() {
    let c = claims_json("");
    assert_eq!(full(&raw(r#"{"alg":"HS256"}"#, &c)), Err(TokenError::MissingKid));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":""}"#, &c)), Err(TokenError::BadKid));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":5}"#, &c)), Err(TokenError::BadKid));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":"k\n1"}"#, &c)), Err(TokenError::BadKid));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":"k2"}"#, &c)), Err(TokenError::UnknownKid("k2".into())));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":"k1","crit":["exp"]}"#, &c)), Err(TokenError::Crit));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":"k1","crit":[]}"#, &c)), Err(TokenError::Crit));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":"k1","b64":false,"crit":["b64"]}"#, &c)), Err(TokenError::Crit));
    assert_eq!(full(&raw(r#"{"alg":"HS256","kid":"k1","typ":"JOSE+JSON"}"#, &c)), Err(TokenError::BadTyp));
    assert_eq!(full(&raw(r#"["HS256"]"#, &c)), Err(TokenError::HeaderNotObject));
    assert!(matches!(full(&raw(r#"{"alg":"HS256","kid":"k1","kid":"k2"}"#, &c)), Err(TokenError::BadJson("header", _))));
    assert!(matches!(full(&raw(r#"{"alg":"HS256","kid":"k1""#, &c)), Err(TokenError::BadJson("header", _))));
}

#[test]
fn rejects_structure_and_encoding() {
    let good = mint("k1", &key(), &claims_json(""));
    let parts: Vec<&str> = good.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let cases = [
        String::new(),
        "a.b".to_string(),
        format!("{h}.{p}"),
        format!("{h}.{p}.{s}.x"),
        format!("{h}..{s}"),
        format!(".{p}.{s}"),
        format!("{h}.{p}.{s}="),
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}.+{}", &s[1..]),
        format!("{h}.{p}./{}", &s[1..]),
        format!(" {h}.{p}.{s}"),
        format!("{h}.{p}.{s}\n"),
        format!("{h}.{p} .{s}"),
        format!("{h}.{p}.{}", &s[..s.len() - 1]),
        "x".repeat(MAX_TOKEN_LEN + 1),
    ];
    for t in &cases {
        assert!(full(t).is_err(), "{t:?} accepted");
    }
    assert_eq!(full(&"x".repeat(MAX_TOKEN_LEN + 1)), Err(TokenError::TooLong));
}

#[test]
fn rejects_any_bit_flip_and_truncation() {
    let good = mint("k1", &key(), &claims_json(""));
    assert!(full(&good).is_ok());
    let bytes = good.as_bytes();
    for i in 0..bytes.len() {
        for bit in [1u8, 2, 4, 8, 16, 32, 64] {
            let mut b = bytes.to_vec();
            b[i] ^= bit;
            if let Ok(t) = String::from_utf8(b) {
                assert!(full(&t).is_err(), "flip at {i} bit {bit} accepted");
            }
        }
    }
    for n in 0..bytes.len() {
        assert!(full(&good[..n]).is_err(), "truncation to {n} accepted");
    }
}

#[test]
fn rejects_wrong_key() {
    let other = match HmacKey::new(b"another-key-that-is-32-bytes-lon") {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    let t = mint("k1", &other, &claims_json(""));
    assert_eq!(full(&t), Err(TokenError::BadSignature));
}

#[test]
fn short_keys_refused() {
    assert!(HmacKey::new(&[7u8; 31]).is_err());
    assert!(HmacKey::new(&[7u8; 32]).is_ok());
}

#[test]
fn claim_types_and_presence() {
    let base = format!(r#""aud":"keyward","exp":{},"#, NOW + 60);
    let cases: Vec<(String, TokenError)> = vec![
        (format!(r#"{{{base}"jti":"j","allow":["s GET /"]}}"#), TokenError::MissingClaim("sub")),
        (format!(r#"{{{base}"sub":"a","allow":["s GET /"]}}"#), TokenError::MissingClaim("jti")),
        (format!(r#"{{{base}"sub":"a","jti":"j"}}"#), TokenError::MissingClaim("allow")),
        (r#"{"aud":"keyward","sub":"a","jti":"j","allow":["s GET /"]}"#.to_string(), TokenError::MissingClaim("exp")),
        (format!(r#"{{"exp":{},"sub":"a","jti":"j","allow":["s GET /"]}}"#, NOW + 60), TokenError::MissingClaim("aud")),
        (format!(r#"{{{base}"sub":5,"jti":"j","allow":["s GET /"]}}"#), TokenError::ClaimType("sub", "a string")),
        (format!(r#"{{{base}"sub":"a","jti":["j"],"allow":["s GET /"]}}"#), TokenError::ClaimType("jti", "a string")),
        (
            format!(r#"{{"aud":"keyward","exp":"{}","sub":"a","jti":"j","allow":["s GET /"]}}"#, NOW + 60),
            TokenError::ClaimType("exp", "a non-negative integer NumericDate"),
        ),
        (
            format!(r#"{{"aud":"keyward","exp":{}.5,"sub":"a","jti":"j","allow":["s GET /"]}}"#, NOW + 60),
            TokenError::ClaimType("exp", "a non-negative integer NumericDate"),
        ),
        (format!(r#"{{{base}"sub":"a","jti":"j","allow":"s GET /"}}"#), TokenError::ClaimType("allow", "an array of rule strings")),
        (format!(r#"{{{base}"sub":"a","jti":"j","allow":[1]}}"#), TokenError::ClaimType("allow", "an array of rule strings")),
        (format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"run":1}}"#), TokenError::ClaimType("run", "a string")),
        (format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"lim":[]}}"#), TokenError::ClaimType("lim", "an object")),
        (format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"lim":{{"rpm":0}}}}"#), TokenError::ClaimType("lim.rpm", "a positive integer")),
        (format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"iss":false}}"#), TokenError::ClaimType("iss", "a string")),
        (
            format!(r#"{{"aud":[1],"exp":{},"sub":"a","jti":"j","allow":["s GET /"]}}"#, NOW + 60),
            TokenError::ClaimType("aud", "a string or an array of strings"),
        ),
    ];
    for (c, want) in cases {
        assert_eq!(full(&raw(HDR, &c)), Err(want), "{c}");
    }
    let bad = [
        format!(r#"{{{base}"sub":"","jti":"j","allow":["s GET /"]}}"#),
        format!(r#"{{{base}"sub":"a\nb","jti":"j","allow":["s GET /"]}}"#),
        format!(r#"{{{base}"sub":"a","jti":"j","allow":[]}}"#),
        format!(r#"{{{base}"sub":"a","jti":"j","allow":["s get /"]}}"#),
        format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"run":"{}"}}"#, "r".repeat(129)),
        format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"lim":{{"rmp":5}}}}"#),
        format!(r#"{{{base}"sub":"a","sub":"b","jti":"j","allow":["s GET /"]}}"#),
        format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"x":1,"x":2}}"#),
        "[]".to_string(),
        "not json".to_string(),
    ];
    for c in bad {
        assert!(full(&raw(HDR, &c)).is_err(), "{c} accepted");
    }
    // run of exactly 128 bytes is fine.
    let ok = format!(r#"{{{base}"sub":"a","jti":"j","allow":["s GET /"],"run":"{}"}}"#, "r".repeat(128));
    assert!(full(&raw(HDR, &ok)).is_ok());
}

fn with_times(exp: i64, extra: &str) -> Result<Claims, TokenError> {
    full(&raw(HDR, &format!(r#"{{"sub":"a","aud":"keyward","exp":{exp},"jti":"j","allow":["s GET /"]{extra}}}"#)))
}

#[test]
fn time_bounds() {
    assert!(with_times(NOW + 1, "").is_ok());
    assert!(with_times(NOW - 29, "").is_ok(), "within skew");
    assert_eq!(with_times(NOW - 30, ""), Err(TokenError::Expired { exp: NOW - 30, now: NOW }));
    assert_eq!(with_times(NOW - 30, "").map_err(|e| e.code()), Err("expired_credential"));
    assert!(with_times(NOW + 3600 + 30, "").is_ok());
    assert!(matches!(with_times(NOW + 3600 + 31, ""), Err(TokenError::LifetimeTooLong { .. })));
    assert!(with_times(NOW + 60, &format!(r#","nbf":{}"#, NOW + 30)).is_ok());
    assert!(matches!(with_times(NOW + 60, &format!(r#","nbf":{}"#, NOW + 31)), Err(TokenError::NotYetValid { .. })));
    assert!(with_times(NOW + 60, &format!(r#","iat":{}"#, NOW + 30)).is_ok());
    assert!(matches!(with_times(NOW + 60, &format!(r#","iat":{}"#, NOW + 31)), Err(TokenError::IssuedInFuture { .. })));
    assert!(matches!(with_times(NOW + 60, r#","nbf":-1"#), Err(TokenError::ClaimType("nbf", _))));
}

#[test]
fn audience_and_issuer() {
    let t = raw(HDR, &claims_json("").replace(r#""aud":"keyward""#, r#""aud":"other""#));
    assert_eq!(full(&t), Err(TokenError::WrongAudience));
    let t = raw(HDR, &claims_json("").replace(r#""aud":"keyward""#, r#""aud":[]"#));
    assert_eq!(full(&t), Err(TokenError::WrongAudience));
    let mut p = policy();
    p.issuer = Some("https://issuer.example".into());
    let ok = parse_claims(claims_json(r#","iss":"https://issuer.example""#).as_bytes());
    let ok = match ok {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(p.check(&ok, NOW).is_ok());
    let none = match parse_claims(claims_json("").as_bytes()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(p.check(&none, NOW), Err(TokenError::WrongIssuer));
}

#[test]
fn messages_never_echo_input() {
    let t = raw(r#"{"alg":"SECRETALG","kid":"k1"}"#, &claims_json(""));
    let e = match full(&t) {
        Err(e) => e,
        Ok(_) => panic!("accepted"),
    };
    assert!(!e.public_message().contains("SECRETALG"));
}
