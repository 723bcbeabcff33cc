use super::*;
use crate::config::{Store, StoreKind, VaultAuth};

fn approle(role: &str) -> Store {
    Store {
        name: "bao".into(),
        cluster: "vault".into(),
        authority: "vault.internal".into(),
        timeout_ms: 2000,
        kind: StoreKind::VaultKv2 {
            mount: "secret".into(),
            auth: VaultAuth::AppRole { mount: "approle".into(), role_id: Secret::text(role), secret_id: Secret::text("sid-\"quoted\"") },
            namespace: Some("team".into()),
        },
        scope: String::new(),
    }
}

fn grant(token: &str, lease_s: u64, renewable: bool) -> Grant {
    Grant { token: Secret::text(token), lease_s, renewable }
}

fn header(c: &HttpCall, k: &str) -> Option<String> {
    c.headers.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.expose_str().map(str::to_string))
}

#[test]
fn login_callout_posts_role_and_secret_id_as_json() {
    let c = login_call(&approle("r-1")).unwrap();
    assert_eq!(header(&c, ":method").as_deref(), Some("POST"));
    assert_eq!(header(&c, ":path").as_deref(), Some("/v1/auth/approle/login"));
    assert_eq!(header(&c, "x-vault-namespace").as_deref(), Some("team"));
    assert_eq!(header(&c, "x-vault-token"), None);
    let body = crate::wire::json::parse(c.body.as_deref().unwrap()).unwrap();
    assert_eq!(body.get("role_id").and_then(Value::as_str), Some("r-1"));
    assert_eq!(body.get("secret_id").and_then(Value::as_str), Some("sid-\"quoted\""));
    assert!(!format!("{c:?}").contains("sid-"), "Debug never prints the body or header values");
}

#[test]
fn token_stores_do_not_log_in() {
    let mut s = approle("r");
    s.kind = StoreKind::VaultKv2 { mount: "secret".into(), auth: VaultAuth::Token(Secret::text("t")), namespace: None };
    assert!(login_call(&s).is_none());
    assert!(crate::secrets::keys::session(&s).is_none());
}

#[test]
fn renew_callout_sends_the_token_to_renew_self() {
    let c = renew_call(&approle("r"), &Secret::text("s.abc"));
    assert_eq!(header(&c, ":path").as_deref(), Some("/v1/auth/token/renew-self"));
    assert_eq!(header(&c, "x-vault-token").as_deref(), Some("s.abc"));
    assert_eq!(c.body.as_deref(), Some(&b"{}"[..]));
}

#[test]
fn session_key_depends_on_the_role() {
    use crate::secrets::keys::session;
    let a = session(&approle("role-a")).unwrap();
    assert!(a.starts_with("keyward/v3/session/"));
    assert_ne!(a, session(&approle("role-b")).unwrap());
    assert!(!a.contains("role-a"));
}

#[test]
fn parse_grant_reads_token_lease_and_renewable() {
    let ok = br#"{"auth":{"client_token":"s.tok","lease_duration":60,"renewable":true,"policies":["x"]}}"#;
    assert_eq!(parse_grant(Some(200), ok), Ok(grant("s.tok", 60, true)));
    let no_renew = br#"{"auth":{"client_token":"s.tok","lease_duration":0,"renewable":false}}"#;
    assert_eq!(parse_grant(Some(200), no_renew), Ok(grant("s.tok", 0, false)));
}

#[test]
fn parse_grant_classifies_failures() {
    assert!(matches!(parse_grant(None, b""), Err(FetchError::Transient(_))));
    assert!(matches!(parse_grant(Some(503), b""), Err(FetchError::Transient(_))));
    assert!(matches!(parse_grant(Some(429), b""), Err(FetchError::Transient(_))));
    for s in [400, 401, 403] {
        assert_eq!(parse_grant(Some(s), br#"{"errors":["invalid secret id"]}"#), Err(FetchError::Denied(s)));
    }
    assert!(matches!(parse_grant(Some(302), b""), Err(FetchError::Garbage(_))));
    let garbage: &[&[u8]] = &[
        b"<html>",
        br#"{"data":{}}"#,
        br#"{"auth":null}"#,
        br#"{"auth":{"lease_duration":5}}"#,
        br#"{"auth":{"client_token":"","lease_duration":5}}"#,
        br#"{"auth":{"client_token":"a b","lease_duration":5}}"#,
        b"{\"auth\":{\"client_token\":\"a\\r\\nx: y\",\"lease_duration\":5}}",
        br#"{"auth":{"client_token":5,"lease_duration":5}}"#,
        br#"{"auth":{"client_token":"t","lease_duration":-1}}"#,
        br#"{"auth":{"client_token":"t","lease_duration":"5"}}"#,
        br#"{"auth":{"client_token":"t","lease_duration":1.5}}"#,
    ];
    for g in garbage {
        assert!(matches!(parse_grant(Some(200), g), Err(FetchError::Garbage(_))), "{}", String::from_utf8_lossy(g));
    }
    let big = vec![b' '; crate::secrets::store::MAX_BODY + 1];
    assert!(matches!(parse_grant(Some(200), &big), Err(FetchError::Garbage(_))));
}

#[test]
fn no_session_means_login() {
    let st = SessionState::default();
    assert_eq!(st.session_token(0), None);
    assert_eq!(st.next(0), Next::Login);
    assert_eq!(st.due(0), Next::Login);
}

#[test]
fn renewal_is_due_after_two_thirds_of_the_lease() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 30, true)), false, 1_000);
    assert_eq!(st.generation, 1);
    assert_eq!(st.session_token(1_000).map(|(t, g)| (t.expose_str().unwrap().to_string(), g)), Some(("s.1".into(), 1)));
    assert_eq!(st.next(20_999), Next::Nothing);
    assert_eq!(st.next(21_000), Next::Renew);
    // Renewal keeps the generation and the token, and moves the clock.
    st.record(Ok(grant("s.1", 30, true)), true, 21_000);
    assert_eq!(st.generation, 1);
    assert_eq!(st.session.as_ref().unwrap().expires_ms, 51_000);
    assert_eq!(st.next(40_999), Next::Nothing);
    assert_eq!(st.next(41_000), Next::Renew);
}

#[test]
fn short_leases_renew_while_the_token_is_still_usable() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 3, true)), false, 0);
    assert_eq!(st.next(999), Next::Nothing);
    assert_eq!(st.next(1_000), Next::Renew, "2 s before the end, not at two thirds (1 s before)");
    assert!(st.session_token(1_000).is_some());
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 2, true)), false, 0);
    assert_eq!(st.next(666), Next::Renew);
}

#[test]
fn a_token_near_its_max_ttl_or_not_renewable_is_replaced_by_a_login() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 30, true)), false, 0);
    // The role's max TTL caps the renewal at 10 s: less than half the login's lease.
    st.record(Ok(grant("s.1", 10, true)), true, 20_000);
    assert_eq!(st.next(26_700), Next::Login);
    assert!(st.session_token(26_700).is_some(), "the old token stays usable until the new one arrives");
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 30, false)), false, 0);
    assert_eq!(st.next(20_000), Next::Login);
}

#[test]
fn tokens_are_not_used_in_their_last_second() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 10, true)), false, 0);
    assert!(st.session_token(8_999).is_some());
    assert!(st.session_token(9_000).is_none());
    assert_eq!(st.next(9_000), Next::Login);
}

#[test]
fn a_non_expiring_token_is_never_renewed() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.root", 0, false)), false, 0);
    assert!(st.session_token(u64::MAX - 10).is_some());
    assert_eq!(st.next(u64::MAX - 10), Next::Nothing);
}

#[test]
fn leases_and_retries_hold_back_attempts() {
    let mut st = SessionState::default();
    assert!(st.take_lease(0, 2_500));
    assert!(!st.take_lease(1_000, 2_500), "another worker holds it");
    assert_eq!(st.due(1_000), Next::Nothing);
    st.record(Err(FetchError::Transient("timeout".into())), false, 2_000);
    assert_eq!(st.lease_until_ms, 0);
    assert_eq!(st.due(2_999), Next::Nothing, "retry after RETRY_MS");
    assert_eq!(st.due(3_000), Next::Login);
    assert!(st.take_lease(3_000, 2_500));
}

#[test]
fn a_failed_renewal_keeps_the_token_while_valid_and_a_refused_one_drops_it() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 30, true)), false, 0);
    st.record(Err(FetchError::Transient("503".into())), true, 20_000);
    assert!(st.session_token(20_000).is_some());
    assert_eq!(st.due(20_500), Next::Nothing);
    assert_eq!(st.due(21_000), Next::Renew);
    st.record(Err(FetchError::Denied(403)), true, 21_000);
    assert!(st.session_token(21_000).is_none());
    assert_eq!(st.due(21_000), Next::Login);
}

#[test]
fn a_403_invalidates_only_the_session_it_answered() {
    let mut st = SessionState::default();
    st.record(Ok(grant("s.1", 30, true)), false, 0);
    let (_, old) = st.session_token(0).unwrap();
    st.record(Ok(grant("s.2", 30, true)), false, 1_000);
    assert!(!st.invalidate(old), "a newer session already replaced it");
    assert!(st.session_token(1_000).is_some());
    let (_, cur) = st.session_token(1_000).unwrap();
    assert!(st.invalidate(cur));
    assert!(st.session_token(1_000).is_none());
    assert_eq!(st.due(1_000), Next::Login);
    assert!(!st.invalidate(cur), "nothing left to invalidate");
}

#[test]
fn the_record_round_trips_and_rejects_damage() {
    let mut st = SessionState::default();
    assert_eq!(SessionState::decode(&st.encode()), Some(st.clone()));
    st.record(Ok(grant("s.token-value", 45, true)), false, 1234);
    st.lease_until_ms = 99;
    let b = st.encode();
    assert_eq!(SessionState::decode(&b), Some(st.clone()));
    for n in 0..b.len() {
        assert_eq!(SessionState::decode(&b[..n]), None, "truncated at {n}");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert_eq!(SessionState::decode(&longer), None);
    let mut bad = b;
    bad[0] = b'X';
    assert_eq!(SessionState::decode(&bad), None);
    assert!(!format!("{st:?}").contains("token-value"));
}
