use super::*;

fn vault() -> Store {
    Store {
        name: "bao".into(),
        cluster: "vault".into(),
        authority: "vault.internal".into(),
        timeout_ms: 2000,
        kind: StoreKind::VaultKv2 { mount: "secret".into(), auth: VaultAuth::Token(Secret::text("s.roottoken")), namespace: None },
        scope: String::new(),
    }
}
fn aws() -> Store {
    Store {
        name: "aws".into(),
        cluster: "sm".into(),
        authority: "secretsmanager.us-east-1.amazonaws.com".into(),
        timeout_ms: 500,
        kind: StoreKind::AwsSecretsManager,
        scope: String::new(),
    }
}
fn want(f: &[&str]) -> Vec<String> {
    f.iter().map(|s| s.to_string()).collect()
}

#[test]
fn vault_callout() {
    let c = read_call(&vault(), "keyward/stripe", None);
    let get = |k: &str| c.headers.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.expose_str().map(str::to_string));
    assert_eq!(get(":path").as_deref(), Some("/v1/secret/data/keyward/stripe"));
    assert_eq!(get(":method").as_deref(), Some("GET"));
    assert_eq!(get(":authority").as_deref(), Some("vault.internal"));
    assert_eq!(get("x-vault-token").as_deref(), Some("s.roottoken"));
    assert_eq!(c.cluster, "vault");
    assert!(!format!("{c:?}").contains("roottoken"));
    assert_eq!(get("x-vault-namespace"), None);
    let mut ns = vault();
    ns.kind = StoreKind::VaultKv2 { mount: "kv".into(), auth: VaultAuth::Token(Secret::text("t")), namespace: Some("admin/payments".into()) };
    let c = read_call(&ns, "stripe", None);
    let get = |k: &str| c.headers.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.expose_str().map(str::to_string));
    assert_eq!(get("x-vault-namespace").as_deref(), Some("admin/payments"));
    assert_eq!(get(":path").as_deref(), Some("/v1/kv/data/stripe"));
}

#[test]
fn aws_callout() {
    let c = read_call(&aws(), "prod/anthropic", None);
    assert_eq!(c.body.as_deref(), Some(&br#"{"SecretId":"prod/anthropic"}"#[..]));
    assert!(c.headers.iter().any(|(k, v)| k == "x-amz-target" && v.expose() == b"secretsmanager.GetSecretValue"));
    assert_eq!(c.timeout_ms, 500);
}

const KV_OK: &str = r#"{"request_id":"x","data":{"data":{"api_key":"sk_test_1","other":"y"},"metadata":{"created_time":"2026-01-01T00:00:00Z","deletion_time":"","destroyed":false,"version":3}}}"#;

#[test]
fn vault_answers() {
    let v = vault();
    let f = match parse_response(&v, Some(200), KV_OK.as_bytes(), &want(&["api_key"])) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(f.field("api_key").and_then(Secret::expose_str), Some("sk_test_1"));
    assert_eq!(f.version.as_deref(), Some("3"));
    assert_eq!(f.fields.len(), 1, "only the wanted fields are kept");

    let deleted = r#"{"data":{"data":null,"metadata":{"deletion_time":"2026-01-01T00:00:00Z","destroyed":false,"version":4}}}"#;
    assert_eq!(parse_response(&v, Some(200), deleted.as_bytes(), &want(&["api_key"])).err(), Some(FetchError::NotFound));
    let destroyed = r#"{"data":{"data":null,"metadata":{"deletion_time":"","destroyed":true,"version":4}}}"#;
    assert_eq!(parse_response(&v, Some(200), destroyed.as_bytes(), &want(&["api_key"])).err(), Some(FetchError::NotFound));
    // Deleted with data still present (should not happen) is still not found.
    let odd = r#"{"data":{"data":{"api_key":"old"},"metadata":{"deletion_time":"2026-01-01T00:00:00Z"}}}"#;
    assert_eq!(parse_response(&v, Some(200), odd.as_bytes(), &want(&["api_key"])).err(), Some(FetchError::NotFound));
    assert_eq!(parse_response(&v, Some(404), b"{\"errors\":[]}", &want(&["api_key"])).err(), Some(FetchError::NotFound));
    assert_eq!(parse_response(&v, Some(403), b"", &want(&["api_key"])).err(), Some(FetchError::Denied(403)));
    assert!(matches!(parse_response(&v, Some(503), b"", &want(&["api_key"])), Err(FetchError::Transient(_))));
    assert!(matches!(parse_response(&v, None, b"", &want(&["api_key"])), Err(FetchError::Transient(_))));
}

#[test]
fn garbage_is_refused() {
    let v = vault();
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (b"not json".to_vec(), 200),
        (b"{}".to_vec(), 200),
        (br#"{"data":{"data":"str"}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"api_key":5}}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"api_key":""}}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"api_key":"a\r\nX-Evil: 1"}}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"api_key":"a\nb"}}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"other":"x"}}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"api_key":null}}}"#.to_vec(), 200),
        (br#"{"data":{"data":{"api_key":"a","api_key":"b"}}}"#.to_vec(), 200),
        (format!(r#"{{"data":{{"data":{{"api_key":"{}"}}}}}}"#, "a".repeat(MAX_SECRET + 1)).into_bytes(), 200),
        (vec![b' '; MAX_BODY + 1], 200),
        (b"".to_vec(), 302),
    ];
    for (body, status) in cases {
        let r = parse_response(&v, Some(status), &body, &want(&["api_key"]));
        assert!(matches!(r, Err(FetchError::Garbage(_))), "{} -> {r:?}", String::from_utf8_lossy(&body[..body.len().min(80)]));
    }
}

#[test]
fn aws_answers() {
    let a = aws();
    let ok = r#"{"ARN":"arn:x","Name":"prod/anthropic","SecretString":"{\"api_key\":\"sk-ant-test\"}","VersionId":"v-123"}"#;
    let f = match parse_response(&a, Some(200), ok.as_bytes(), &want(&["api_key"])) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(f.field("api_key").and_then(Secret::expose_str), Some("sk-ant-test"));
    assert_eq!(f.version.as_deref(), Some("v-123"));
    let nf = br#"{"__type":"ResourceNotFoundException","message":"nope"}"#;
    assert_eq!(parse_response(&a, Some(400), nf, &want(&["api_key"])).err(), Some(FetchError::NotFound));
    let denied = br#"{"__type":"com.amazon.coral.service#AccessDeniedException"}"#;
    assert_eq!(parse_response(&a, Some(400), denied, &want(&["api_key"])).err(), Some(FetchError::Denied(400)));
    let throttled = br#"{"__type":"ThrottlingException"}"#;
    assert!(matches!(parse_response(&a, Some(400), throttled, &want(&["api_key"])), Err(FetchError::Transient(_))));
    let plain = r#"{"SecretString":"just-a-string"}"#;
    assert!(matches!(parse_response(&a, Some(200), plain.as_bytes(), &want(&["api_key"])), Err(FetchError::Garbage(_))));
    let binary = r#"{"SecretBinary":"AAAA"}"#;
    assert!(matches!(parse_response(&a, Some(200), binary.as_bytes(), &want(&["api_key"])), Err(FetchError::Garbage(_))));
}

#[test]
fn one_bad_field_fails_only_that_field() {
    let v = vault();
    let body = br#"{"data":{"data":{"api_key":"sk_test_1","bad":"a\r\nb"}}}"#;
    let f = match parse_response(&v, Some(200), body, &want(&["api_key", "bad", "absent"])) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(f.field("api_key").and_then(Secret::expose_str), Some("sk_test_1"));
    assert!(f.field("bad").is_none() && f.covers("bad"));
    assert!(f.field("absent").is_none() && f.covers("absent"));
    assert!(!f.covers("other"));
    assert_eq!(f.problems.len(), 2);
    assert!(!f.problems.join(" ").contains("a\r\nb"), "problems name fields, never values");
}

#[test]
fn only_authoritative_answers_forbid_stale() {
    assert!(FetchError::Transient("timeout".into()).may_serve_stale());
    assert!(FetchError::Garbage("not JSON".into()).may_serve_stale());
    assert!(!FetchError::NotFound.may_serve_stale());
    assert!(!FetchError::Denied(403).may_serve_stale());
    // As the protocols classify real answers.
    let v = vault();
    assert!(parse_response(&v, Some(503), b"", &want(&["k"])).is_err_and(|e| e.may_serve_stale()));
    assert!(parse_response(&v, None, b"", &want(&["k"])).is_err_and(|e| e.may_serve_stale()));
    assert!(parse_response(&v, Some(200), b"<html>", &want(&["k"])).is_err_and(|e| e.may_serve_stale()));
    assert!(parse_response(&v, Some(404), b"{\"errors\":[]}", &want(&["k"])).is_err_and(|e| !e.may_serve_stale()));
    // A 404 that is not the store's own (an ingress's page, an empty or odd body) is transient.
    for body in [&b"{}"[..], b"", b"<html><body>404 Not Found</body></html>", br#"{"message":"no route"}"#] {
        assert!(parse_response(&v, Some(404), body, &want(&["k"])).is_err_and(|e| e.may_serve_stale()), "{body:?}");
    }
    // Bodies that are not KV v2 answers: v1-shaped, response-wrapped, null data without a deletion.
    for body in [&br#"{"data":{"k":"v1-shaped"}}"#[..], br#"{"wrap_info":{"token":"w"},"data":null}"#, br#"{"data":{"data":null,"metadata":{"version":3}}}"#] {
        assert!(matches!(parse_response(&v, Some(200), body, &want(&["k"])), Err(FetchError::Garbage(_))), "{body:?}");
    }
    assert!(parse_response(&v, Some(403), b"{}", &want(&["k"])).is_err_and(|e| !e.may_serve_stale()));
}

#[test]
fn a_session_token_replaces_the_configured_one() {
    let session = Secret::text("s.from-approle");
    let c = read_call(&vault(), "keyward/stripe", Some(&session));
    let tokens: Vec<_> = c.headers.iter().filter(|(n, _)| n == "x-vault-token").map(|(_, v)| v.clone()).collect();
    assert_eq!(tokens, vec![session], "exactly one token, the session's");
}

#[test]
fn metadata_reads_the_current_live_version() {
    let v = vault();
    let c = metadata_call(&v, "keyward/revoked", None).unwrap_or_else(|| panic!("vault has metadata"));
    let path = c.headers.iter().find(|(n, _)| n == ":path").and_then(|(_, v)| v.expose_str().map(str::to_string));
    assert_eq!(path.as_deref(), Some("/v1/secret/metadata/keyward/revoked"));
    assert!(metadata_call(&aws(), "x", None).is_none());
    let ok = br#"{"data":{"current_version":7,"versions":{"7":{"deletion_time":"","destroyed":false}}}}"#;
    assert_eq!(current_version(Some(200), ok), Ok(7));
    let deleted = br#"{"data":{"current_version":7,"versions":{"7":{"deletion_time":"2026-01-01T00:00:00Z","destroyed":false}}}}"#;
    assert_eq!(current_version(Some(200), deleted), Err(FetchError::NotFound));
    assert!(matches!(current_version(Some(200), b"<html>"), Err(FetchError::Garbage(_))));
    assert_eq!(current_version(Some(403), b"{}"), Err(FetchError::Denied(403)));
    assert!(matches!(current_version(None, b""), Err(FetchError::Transient(_))));
}
