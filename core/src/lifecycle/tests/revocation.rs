//! The revocation list's refresh: success, failure, a hang, garbage.

use super::*;

const REV: &str = r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5}"#;

fn first_refresh(lc: &mut Lifecycle, host: &mut MemHost) -> CallId {
    lc.handle(host, Event::Tick);
    let effects = host.take();
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, from: ROOT, .. } if path == "/v1/secret/data/keyward/revoked")), "{effects:?}");
    let call = only_call(&effects);
    assert!(matches!(lc.refresh_state(), Refresh::InFlight { call: c, .. } if *c == call));
    call
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
    w1.handle(&mut h1, Event::Answer { call, answer: revoked("j-1") });
    assert_eq!(w1.refresh_state(), &Refresh::Idle);
    assert_eq!(h1.count(Metric::RevocationOk), 1);
    // Worker 2 picks up the shared list on its tick without a callout of its own.
    w2.handle(&mut h2, Event::Tick);
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
    lc.handle(&mut host, Event::Answer { call, answer: revoked("j-1") });
    host.advance(7_000);
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(&mut host, Event::Answer { call, answer: Answer { status: Some(503), body: Some(b"upstream connect error".to_vec()) } });
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
    lc.handle(&mut host, Event::Tick);
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
    lc.handle(&mut host, Event::Answer { call, answer: revoked("j-1") });
    host.advance(7_000);
    let call = first_refresh(&mut lc, &mut host);
    lc.handle(&mut host, Event::Answer { call, answer: Answer { status: Some(200), body: Some(b"<html>login</html>".to_vec()) } });
    assert_eq!(host.count(Metric::RevocationError), 1);
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 401, "revoked_credential".into())]);
}
