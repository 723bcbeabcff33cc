//! The revocation list's refresh: success, failure, a hang, garbage.

use super::*;

const REV: &str = r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5}"#;

const DATA: &str = "/v1/secret/data/keyward/revoked";
const METADATA: &str = "/v1/secret/metadata/keyward/revoked";

/// The tick's refresh: the one callout it sends, and its path.
fn tick_refresh(lc: &mut Lifecycle, host: &mut MemHost) -> (CallId, String) {
    lc.handle(host.now_us(), host, Event::Tick);
    let effects = host.take();
    let call = only_call(&effects);
    let path = effects.iter().find_map(|e| if let Effect::Dispatch { path, .. } = e { Some(path.clone()) } else { None }).unwrap_or_default();
    assert!(matches!(lc.refresh_state(), Refresh::InFlight { call: c, .. } if *c == call));
    (call, path)
}

fn metadata(version: u64) -> Answer {
    let body = format!(r#"{{"data":{{"current_version":{version},"versions":{{"{version}":{{"deletion_time":"","destroyed":false}}}}}}}}"#);
    Answer { status: Some(200), body: Some(body.into_bytes()) }
}

/// A refresh that reads the whole list: straight away when none is in force, else after the
/// metadata says the list changed. Returns the full read's call.
fn first_refresh(lc: &mut Lifecycle, host: &mut MemHost) -> CallId {
    let (call, path) = tick_refresh(lc, host);
    if path == DATA {
        return call;
    }
    assert_eq!(path, METADATA);
    lc.handle(host.now_us(), host, Event::Answer { call, answer: metadata(1_000) });
    let effects = host.take();
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, from: ROOT, .. } if path == DATA)), "{effects:?}");
    only_call(&effects)
}

fn revoked(jti: &str) -> Answer {
    kv(&format!(r#"{{"jti:{jti}":"2026-12-01"}}"#), 3)
}

#[test]
fn a_refreshed_list_revokes_at_once_on_every_worker() {
    let mut h1 = MemHost::new(ROOT);
    let mut h2 = h1.worker(ROOT);
    let mut w1 = worker(&mut h1, config_with(BAO, REV));
    let mut w2 = worker(&mut h2, config_with(BAO, REV));
    let call = first_refresh(&mut w1, &mut h1);
    w1.handle(h1.now_us(), &mut h1, Event::Answer { call, answer: revoked("j-1") });
    assert_eq!(w1.refresh_state(), &Refresh::Idle);
    assert_eq!(h1.count(Metric::RevocationOk), 1);
    // Worker 2 picks up the shared list on its tick without a callout of its own.
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    assert!(h2.dispatches().is_empty());
    h2.take();
    assert_eq!(send_request(&mut w2, &mut h2, 20), Action::Pause);
    assert_eq!(replies(&h2.take()), vec![(20, 401, "revoked_credential".into())]);
}

#[test]
fn a_failed_refresh_keeps_the_last_good_list() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("j-1") });
    host.advance(7_000);
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(503), body: Some(b"upstream connect error".to_vec()) } });
    assert_eq!(host.count(Metric::RevocationError), 1);
    assert_eq!(lc.refresh_state(), &Refresh::Idle);
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 401, "revoked_credential".into())], "still revoked");
}

#[test]
fn a_refresh_that_hangs_is_given_up_and_tried_again() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    let call = first_refresh(&mut lc, &mut host);
    host.advance(1_600);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert_eq!(lc.refresh_state(), &Refresh::Idle);
    assert!(!lc.calls().contains_key(&call));
    // Its lease (timeout + 1 s) lapses; the next tick refreshes again.
    host.advance(1_000);
    host.take();
    let again = first_refresh(&mut lc, &mut host);
    assert_ne!(again, call);
}

#[test]
fn a_garbage_answer_is_an_error_not_an_empty_list() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("j-1") });
    host.advance(7_000);
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(200), body: Some(b"<html>login</html>".to_vec()) } });
    assert_eq!(host.count(Metric::RevocationError), 1);
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 401, "revoked_credential".into())]);
}

#[test]
fn at_boot_a_valid_request_waits_for_the_list_and_is_never_served_unchecked() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    // No list yet: a valid credential waits for one (invalid ones are refused at once).
    assert_eq!(send_request(&mut lc, &mut host, 9), Action::Pause);
    assert_eq!(lc.parked().get(&9).map(|p| p.wait), Some(Wait::Revocation));
    assert_eq!(host.take(), vec![Effect::WakeRoot]);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let effects = host.take();
    let refresh = only_call(&effects);
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, .. } if path == "/v1/secret/data/keyward/revoked")), "{effects:?}");
    // The list lands: the request goes on to its secret, then is served.
    lc.handle(host.now_us(), &mut host, Event::Answer { call: refresh, answer: revoked("j-other") });
    let effects = host.take();
    assert!(!effects.contains(&Effect::Resume(9)), "{effects:?}");
    let fetch = only_call(&effects);
    lc.handle(host.now_us(), &mut host, Event::Answer { call: fetch, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(9)));
    // A credential on the list is refused from then on.
    let tok = token_with(K1, "k1", "j-other", host.now_ms());
    assert_eq!(request(&mut lc, &mut host, 10, &tok), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 401, "revoked_credential".into())]);
}

#[test]
fn a_first_refresh_that_keeps_failing_answers_503_never_200() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(429), body: Some(b"{\"errors\":[\"rate limited\"]}".to_vec()) } });
    host.take();
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    assert!(replies(&host.take()).is_empty(), "it waits");
    host.advance(2_600);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    let effects = host.take();
    assert!(replies(&effects).contains(&(10, 503, "secret_unavailable".into())), "{effects:?}");
}

#[test]
fn a_list_confirmed_missing_is_trusted_as_empty() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(404), body: Some(b"{\"errors\":[]}".to_vec()) } });
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(10)));
}

#[test]
fn odd_answers_never_lift_the_list_in_force() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, REV));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("j-1") });
    let odd: Vec<(&str, Answer)> = vec![
        ("an older version (a lagging replica)", kv(r#"{}"#, 2)),
        ("an HTML 404 from an ingress", Answer { status: Some(404), body: Some(b"<html>404</html>".to_vec()) }),
        ("a bare 404", Answer { status: Some(404), body: Some(Vec::new()) }),
        ("the store's own 404 for a list that existed", Answer { status: Some(404), body: Some(b"{\"errors\":[]}".to_vec()) }),
        ("a response-wrapped body", Answer { status: Some(200), body: Some(br#"{"wrap_info":{"token":"x"},"data":null}"#.to_vec()) }),
        ("a KV v1-shaped body", Answer { status: Some(200), body: Some(br#"{"data":{}}"#.to_vec()) }),
    ];
    for (what, answer) in odd {
        host.advance(7_000);
        let call = first_refresh(&mut lc, &mut host);
        let errors = host.count(Metric::RevocationError);
        lc.handle(host.now_us(), &mut host, Event::Answer { call, answer });
        assert_eq!(host.count(Metric::RevocationError), errors + 1, "{what}: counted as an error");
        assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause, "{what}");
        assert_eq!(replies(&host.take()), vec![(10, 401, "revoked_credential".into())], "{what}: still revoked");
    }
    // Clearing the list on purpose: a new, empty version.
    host.advance(7_000);
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: kv("{}", 4) });
    let call = cold_fetch(&mut lc, &mut host, 11);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(11)));
}

#[test]
fn a_list_older_than_max_stale_fails_closed_loudly_and_recovers() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5,"max_stale_s":20}"#));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("j-x") });
    // Every refresh fails for longer than max_stale_s.
    for _ in 0..4 {
        host.advance(6_000);
        let call = first_refresh(&mut lc, &mut host);
        lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer::failed() });
    }
    host.take();
    let tok = token_with(K1, "k1", "j-ok", host.now_ms());
    assert_eq!(request(&mut lc, &mut host, 10, &tok), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
    assert_eq!(host.count(Metric::RevocationStale), 1);
    // A refresh lands: served again.
    host.advance(2_000);
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("j-x") });
    let call = cold_fetch(&mut lc, &mut host, 11);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(11)));
}

#[test]
fn an_unchanged_list_costs_one_small_metadata_read_and_stays_fresh() {
    let mut host = MemHost::new(ROOT);
    let mut h2 = host.worker(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5,"max_stale_s":20}"#));
    let mut w2 = worker(&mut h2, config_with(BAO, r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5,"max_stale_s":20}"#));
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("j-x") });
    // For longer than max_stale_s, every refresh finds the version unchanged: no full read.
    for _ in 0..6 {
        host.advance(6_000);
        let (call, path) = tick_refresh(&mut lc, &mut host);
        assert_eq!(path, METADATA);
        lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: metadata(3) });
        assert!(host.take().iter().all(|e| !matches!(e, Effect::Dispatch { .. })), "no full read");
    }
    // Still fresh, here and on the other worker (the confirmation is shared).
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(10)));
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    h2.take();
    assert_eq!(send_request(&mut w2, &mut h2, 20), Action::Continue, "worker 2: fresh list, warm secret");
    assert_eq!(host.count(Metric::RevocationStale), 0);
}

/// A health probe on a `{"endpoint": "health"}` route.
fn probe(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, endpoint: &str) -> (u32, String) {
    host.open_route(ctx, &[("endpoint", endpoint)], &[(":method", "GET"), (":path", "/keyward/health")]);
    assert_eq!(lc.handle(host.now_us(), host, Event::Request(ctx)), Action::Pause);
    let effects = host.take();
    assert!(effects.iter().all(|e| !matches!(e, Effect::Dispatch { .. })), "a probe never reaches a store: {effects:?}");
    let (_, status, code) = replies(&effects).pop().unwrap_or_default();
    (status, code)
}

#[test]
fn health_is_ready_only_with_a_trusted_revocation_list() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5,"max_stale_s":20}"#));
    host.take();
    assert_eq!(probe(&mut lc, &mut host, 10, "health").0, 503, "starting: no list yet");
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: revoked("x") });
    host.take();
    assert_eq!(probe(&mut lc, &mut host, 11, "health").0, 200);
    // The list grows too old (every refresh fails): not ready any more.
    host.advance(21_000);
    assert_eq!(probe(&mut lc, &mut host, 12, "health").0, 503);
    assert_eq!(probe(&mut lc, &mut host, 13, "nonesuch"), (403, "unknown_target".to_string()));
    assert_eq!(host.metrics.get(&Metric::Allowed), None, "probes are not requests");
    assert!(host.counts.is_empty() && host.observed.is_empty());
}

#[test]
fn health_without_a_revocation_list_is_ready_once_configured() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    assert_eq!(probe(&mut lc, &mut host, 10, "health").0, 200);
    let mut h2 = host.worker(ROOT + 1);
    let mut unconfigured = Lifecycle::new(ROOT + 1);
    assert_eq!(probe(&mut unconfigured, &mut h2, 11, "health").0, 503);
}
