//! AppRole sessions: login before the first fetch, failures, renewals, refusals.

use super::*;

const APPROLE: &str = r#"{"type":"vault_kv2","cluster":"vault","authority":"vault.internal","mount":"secret","approle":{"role_id_env":"ROLE_ID","secret_id_env":"SECRET_ID"},"timeout_ms":1000}"#;

fn grant(token: &str, lease_s: u64) -> Answer {
    Answer { status: Some(200), body: Some(format!(r#"{{"auth":{{"client_token":"{token}","lease_duration":{lease_s},"renewable":true}}}}"#).into_bytes()) }
}

fn sent_token(host: &MemHost, call: CallId) -> Option<String> {
    host.sent.get(&call)?.headers.iter().find(|(k, _)| k == "x-vault-token").and_then(|(_, v)| v.expose_str().map(str::to_string))
}

/// A cold request on an AppRole store: the login goes out first. Returns its call id.
fn login_first(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId) -> CallId {
    assert_eq!(send_request(lc, host, ctx), Action::Pause);
    lc.handle(host.now_us(), host, Event::Woken);
    let effects = host.take();
    let call = only_call(&effects);
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, .. } if path == "/v1/auth/approle/login")), "{effects:?}");
    assert_eq!(lc.fetch_state(0), Some(&Fetch::AwaitingSession { retried: false }));
    assert!(matches!(lc.session_state(0), Some(SessionCall::InFlight { renewal: false, .. })));
    call
}

#[test]
fn the_first_fetch_waits_for_the_login_then_carries_its_token() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(APPROLE, ""));
    let login = login_first(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call: login, answer: grant("s.session-1", 60) });
    let fetch = only_call(&host.take());
    assert_eq!(sent_token(&host, fetch).as_deref(), Some("s.session-1"));
    assert!(matches!(lc.fetch_state(0), Some(Fetch::InFlight { session: Some(_), .. })));
    lc.handle(host.now_us(), &mut host, Event::Answer { call: fetch, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(10)));
    assert_eq!(host.count(Metric::VaultLogin), 1);
}

#[test]
fn a_failed_login_answers_the_waiters_503_and_the_next_request_logs_in_again() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(APPROLE, ""));
    let login = login_first(&mut lc, &mut host, 10);
    lc.handle(
        host.now_us(),
        &mut host,
        Event::Answer { call: login, answer: Answer { status: Some(400), body: Some(br#"{"errors":["invalid role or secret ID"]}"#.to_vec()) } },
    );
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
    assert_eq!(lc.session_state(0), Some(&SessionCall::Idle));
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
    assert_eq!(host.count(Metric::VaultAuthError), 1);
    host.advance(6_000);
    login_first(&mut lc, &mut host, 11);
}

#[test]
fn a_login_that_never_answers_is_given_up() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(APPROLE, ""));
    login_first(&mut lc, &mut host, 10);
    host.advance(1_600);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
    assert_eq!(lc.session_state(0), Some(&SessionCall::Idle));
    assert!(lc.calls().is_empty());
}

#[test]
fn a_session_in_use_is_renewed_ahead_of_expiry_by_the_tick() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(APPROLE, ""));
    let login = login_first(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call: login, answer: grant("s.session-1", 30) });
    let fetch = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call: fetch, answer: stripe_answer() });
    host.take();
    // Two thirds into a 30 s lease.
    host.advance(21_000);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    let effects = host.take();
    let renew = only_call(&effects);
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, .. } if path == "/v1/auth/token/renew-self")), "{effects:?}");
    assert_eq!(sent_token(&host, renew).as_deref(), Some("s.session-1"));
    lc.handle(host.now_us(), &mut host, Event::Answer { call: renew, answer: grant("s.session-1", 30) });
    assert_eq!(host.count(Metric::VaultRenew), 1);
    assert_eq!(lc.session_state(0), Some(&SessionCall::Idle));
}

#[test]
fn a_refused_session_token_logs_in_again_and_fetches_once_more() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(APPROLE, ""));
    let login = login_first(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call: login, answer: grant("s.session-1", 60) });
    let fetch = only_call(&host.take());
    // The token was revoked in Vault: 403 on the read.
    lc.handle(
        host.now_us(),
        &mut host,
        Event::Answer { call: fetch, answer: Answer { status: Some(403), body: Some(br#"{"errors":["permission denied"]}"#.to_vec()) } },
    );
    let effects = host.take();
    let relogin = only_call(&effects);
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, .. } if path == "/v1/auth/approle/login")), "{effects:?}");
    assert_eq!(lc.fetch_state(0), Some(&Fetch::AwaitingSession { retried: true }));
    lc.handle(host.now_us(), &mut host, Event::Answer { call: relogin, answer: grant("s.session-2", 60) });
    let again = only_call(&host.take());
    assert_eq!(sent_token(&host, again).as_deref(), Some("s.session-2"));
    // A second refusal is the store's word on the secret.
    lc.handle(host.now_us(), &mut host, Event::Answer { call: again, answer: Answer { status: Some(403), body: Some(b"{}".to_vec()) } });
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
}

#[test]
fn a_second_worker_uses_the_session_the_first_shared() {
    let mut h1 = MemHost::new(ROOT);
    let mut h2 = h1.worker(ROOT);
    let mut w1 = worker(&mut h1, config_with(APPROLE, ""));
    let mut w2 = worker(&mut h2, config_with(APPROLE, ""));
    let login = login_first(&mut w1, &mut h1, 10);
    // Worker 2 needs another secret path? Same slot: it follows the fetch lease instead.
    w1.handle(h1.now_us(), &mut h1, Event::Answer { call: login, answer: grant("s.shared", 60) });
    let fetch = only_call(&h1.take());
    w1.handle(h1.now_us(), &mut h1, Event::Answer { call: fetch, answer: stripe_answer() });
    assert_eq!(send_request(&mut w2, &mut h2, 20), Action::Continue);
    assert!(h2.dispatches().is_empty(), "no second login");
}

#[test]
fn a_stream_that_leaves_during_the_login_does_not_stall_the_store() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(APPROLE, ""));
    let login = login_first(&mut lc, &mut host, 10);
    host.close(10);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(10));
    // The login's answer belongs to the root: the session is shared and the fetch goes out.
    lc.handle(host.now_us(), &mut host, Event::Answer { call: login, answer: grant("s.session-1", 60) });
    let fetch = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call: fetch, answer: stripe_answer() });
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Continue, "served from the cache, no second login");
    assert!(host.dispatches().is_empty());
}
