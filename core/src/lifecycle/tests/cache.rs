//! The secret cache: lease, coalescing, followers, deadlines, streams that go away.

use super::*;

#[test]
fn a_cold_request_parks_the_root_fetches_and_the_answer_resumes_it() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    assert!(matches!(lc.fetch_state(0), Some(Fetch::InFlight { call: c, session: None, retried: false, .. }) if *c == call));
    assert_eq!(lc.parked().keys().copied().collect::<Vec<_>>(), vec![10]);

    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let effects = host.take();
    assert!(effects.contains(&Effect::Resume(10)), "{effects:?}");
    assert_eq!(injected(&host, 10), Some(format!("Bearer {STRIPE_KEY}")));
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
    assert!(lc.parked().is_empty() && lc.calls().is_empty());
    assert_eq!(host.streams[&10].filter_state.get("keyward.cache").map(String::as_str), Some("miss"));

    // Warm: the next request continues at once, with no callout.
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Continue);
    assert!(host.dispatches().is_empty());
    assert_eq!(host.count(Metric::CacheHit), 1);
}

#[test]
fn requests_for_one_cold_secret_share_one_callout() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    for ctx in 11..15 {
        assert_eq!(send_request(&mut lc, &mut host, ctx), Action::Pause);
    }
    assert!(host.take().is_empty(), "no second callout, no second wake-up");
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let resumed: Vec<Effect> = host.take().into_iter().filter(|e| matches!(e, Effect::Resume(_))).collect();
    assert_eq!(resumed, (10..15).map(Effect::Resume).collect::<Vec<_>>());
}

#[test]
fn a_stream_that_leaves_before_the_dispatch_does_not_stall_the_secret() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Queued { retried: false }));
    // The client leaves before the root's callback.
    host.close(10);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(10));
    assert!(lc.parked().is_empty());
    host.take();
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
    host.take();
    // The next request is served from the cache.
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Continue);
    assert_eq!(injected(&host, 11), Some(format!("Bearer {STRIPE_KEY}")));
}

#[test]
fn a_stream_that_leaves_after_the_dispatch_does_not_stall_the_secret() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    host.close(10);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(10));
    // The answer belongs to the root: it is recorded although nobody waits for it.
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let effects = host.take();
    assert!(!effects.iter().any(|e| matches!(e, Effect::Resume(_) | Effect::Reply { .. })), "{effects:?}");
    assert_eq!(host.count(Metric::FetchOk), 1);
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Continue);
    assert!(host.dispatches().is_empty());
}

#[test]
fn an_answer_that_never_comes_is_given_up_and_the_next_request_fetches_again() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    // Store timeout 1000 ms, + 500 ms grace: the tick gives the call up.
    host.advance(1_400);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert!(matches!(lc.fetch_state(0), Some(Fetch::InFlight { .. })), "not yet");
    host.advance(200);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    let effects = host.take();
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
    assert!(lc.calls().is_empty());
    assert_eq!(replies(&effects), vec![(10, 503, "secret_unavailable".into())], "the parked request is answered at once");
    // A late answer to the given-up call changes nothing.
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert_eq!(host.count(Metric::FetchOk), 0);
    // After the failure's retry window the next request fetches again (not stalled).
    host.advance(5_000);
    host.take();
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Pause);
    assert_eq!(host.take(), vec![Effect::WakeRoot]);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let again = only_call(&host.take());
    assert_ne!(again, call);
}

#[test]
fn an_answer_for_an_unknown_call_is_ignored() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    lc.handle(host.now_us(), &mut host, Event::Answer { call: 999, answer: stripe_answer() });
    assert!(host.take().is_empty());
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
    assert_eq!(host.count(Metric::FetchOk) + host.count(Metric::FetchError), 0);
}

#[test]
fn a_refused_dispatch_fails_the_waiters_and_frees_the_slot() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    host.refuse_dispatch = true;
    lc.handle(host.now_us(), &mut host, Event::Woken);
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
    assert_eq!(lc.fetch_state(0), Some(&Fetch::Idle));
}

#[test]
fn without_a_wake_up_queue_the_tick_sends_the_callout() {
    let mut host = MemHost::new(ROOT);
    host.refuse_wake = true;
    let mut lc = worker(&mut host, config());
    assert_eq!(send_request(&mut lc, &mut host, 10), Action::Pause);
    assert!(host.take().is_empty());
    lc.handle(host.now_us(), &mut host, Event::Tick);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(10)));
}

#[test]
fn two_workers_racing_for_one_lease_make_one_callout_and_both_serve() {
    let mut h1 = MemHost::new(ROOT);
    let mut h2 = h1.worker(ROOT);
    let mut w1 = worker(&mut h1, config());
    let mut w2 = worker(&mut h2, config());
    assert_eq!(send_request(&mut w1, &mut h1, 10), Action::Pause);
    assert_eq!(send_request(&mut w2, &mut h2, 20), Action::Pause);
    assert_eq!(w1.fetch_state(0), Some(&Fetch::Queued { retried: false }));
    assert_eq!(w2.fetch_state(0), Some(&Fetch::Following), "the lease is taken: follow");
    assert!(h2.take().is_empty());
    w1.handle(h1.now_us(), &mut h1, Event::Woken);
    let call = only_call(&h1.take());
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    assert!(h2.dispatches().is_empty() && w2.parked().contains_key(&20), "still following");
    assert_eq!(w2.tick_period_ms(), FAST_TICK_MS, "a follower watches on the fast tick");
    assert_eq!(w2.next_deadline_ms(), Some(h2.now_us() / 1000 + FAST_TICK_MS));
    h2.take();
    w1.handle(h1.now_us(), &mut h1, Event::Answer { call, answer: stripe_answer() });
    assert!(h1.take().contains(&Effect::Resume(10)));
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    let e2 = h2.take();
    assert!(e2.contains(&Effect::Resume(20)), "{e2:?}");
    assert_eq!(w2.tick_period_ms(), TICK_MS);
    assert_eq!(injected(&h2, 20), Some(format!("Bearer {STRIPE_KEY}")));
}

#[test]
fn a_follower_takes_over_when_the_lease_holder_never_answers() {
    let mut h1 = MemHost::new(ROOT);
    let mut h2 = h1.worker(ROOT);
    let mut w1 = worker(&mut h1, config());
    let mut w2 = worker(&mut h2, config());
    send_request(&mut w1, &mut h1, 10);
    // Worker 1 never gets its root callback (it is stuck); worker 2 follows.
    send_request(&mut w2, &mut h2, 20);
    assert_eq!(w2.fetch_state(0), Some(&Fetch::Following));
    // The lease (timeout 1000 + 500 ms) lapses: worker 2 decides again and takes it.
    h2.advance(1_600);
    h2.take();
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    let call = only_call(&h2.take());
    w2.handle(h2.now_us(), &mut h2, Event::Answer { call, answer: stripe_answer() });
    assert!(h2.take().contains(&Effect::Resume(20)));
}

#[test]
fn a_parked_request_past_its_deadline_gets_503_and_the_fetch_goes_on() {
    let mut h1 = MemHost::new(ROOT);
    let mut h2 = h1.worker(ROOT);
    let mut w1 = worker(&mut h1, config());
    let mut w2 = worker(&mut h2, config());
    let call = cold_fetch(&mut w1, &mut h1, 10);
    // Keep worker 1's call alive but make worker 2's waiter late: it only follows.
    send_request(&mut w2, &mut h2, 20);
    h2.advance(2_100);
    h2.take();
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    let e2 = h2.take();
    assert!(replies(&e2).contains(&(20, 503, "secret_unavailable".into())), "{e2:?}");
    assert!(w2.parked().is_empty());
    let _ = call;
}

#[test]
fn a_vendor_rejection_marks_the_value_suspect_and_the_tick_fetches_it_again() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    host.take();
    host.advance(10);
    if let Some(s) = host.streams.get_mut(&10) {
        s.response = vec![(":status".into(), b"401".to_vec())];
    }
    host.current = 10;
    lc.handle(host.now_us(), &mut host, Event::Response(10));
    assert_eq!(host.count(Metric::VendorRejected), 1);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    let effects = host.take();
    only_call(&effects);
}

#[test]
fn a_reflected_secret_is_removed_from_the_response() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    if let Some(s) = host.streams.get_mut(&10) {
        s.response = vec![(":status".into(), b"200".to_vec()), ("x-echo".into(), format!("Bearer {STRIPE_KEY}").into_bytes())];
    }
    host.current = 10;
    lc.handle(host.now_us(), &mut host, Event::Response(10));
    assert_eq!(host.streams[&10].response, vec![(":status".to_string(), b"200".to_vec())]);
    assert_eq!(host.count(Metric::ResponseScrubbed), 1);
}

#[test]
fn a_store_error_page_serves_stale_and_a_404_evicts() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    // Past the TTL: the next request sees the value due and fetches; a 502 page keeps it stale.
    host.advance(301_000);
    host.take();
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(502), body: Some(b"<html>bad gateway</html>".to_vec()) } });
    assert!(host.take().contains(&Effect::Resume(11)));
    assert_eq!(host.streams[&11].filter_state.get("keyward.cache").map(String::as_str), Some("stale"));
    // The store's own 404: evicted, 503.
    host.advance(6_000);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(404), body: Some(b"{\"errors\":[]}".to_vec()) } });
    host.take();
    assert_eq!(send_request(&mut lc, &mut host, 12), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(12, 503, "secret_unavailable".into())], "the store's word: no stale value");
}

#[test]
fn a_secret_reflected_in_response_trailers_is_removed_too() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let lower: String = STRIPE_KEY.bytes().map(|b| format!("%{b:02x}")).collect();
    if let Some(s) = host.streams.get_mut(&10) {
        s.response = vec![(":status".into(), b"200".to_vec())];
        s.trailers = vec![("grpc-message".into(), format!("bad key {lower}").into_bytes()), ("x-ok".into(), b"1".to_vec())];
    }
    host.current = 10;
    lc.handle(host.now_us(), &mut host, Event::Response(10));
    lc.handle(host.now_us(), &mut host, Event::ResponseTrailers(10));
    assert_eq!(host.streams[&10].trailers, vec![("x-ok".to_string(), b"1".to_vec())]);
    assert_eq!(host.count(Metric::ResponseScrubbed), 1);
}

#[test]
fn labelled_metrics_name_the_target_the_code_the_store_and_the_time_added() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    host.advance(7);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert_eq!(host.observed.get("keyward_store_fetch_microseconds;store=bao"), Some(&vec![7000]), "the store's answer time");
    assert_eq!(host.counts.get("keyward_store_fetches_total;store=bao;result=ok"), Some(&1));
    assert_eq!(host.observed.get("keyward_added_microseconds;outcome=miss"), Some(&vec![7000]), "a miss waited for the store");
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Continue);
    assert_eq!(host.observed.get("keyward_added_microseconds;outcome=hit"), Some(&vec![0]));
    // A denial: counted under its target and code.
    host.open(12, "stripe", &[(":method", "GET"), (":path", "/v1/charges")]);
    lc.handle(host.now_us(), &mut host, Event::Request(12));
    assert_eq!(host.counts.get("keyward_target_requests_total;target=stripe;code=allow"), Some(&2));
    assert_eq!(host.counts.get("keyward_target_requests_total;target=stripe;code=missing_credential"), Some(&1));
    assert_eq!(host.observed.get("keyward_added_microseconds;outcome=denied").map(Vec::len), Some(1));
    // A route that names no configured target is counted under `none`, never the route's word.
    host.open(13, "not-configured", &[(":method", "GET"), (":path", "/x")]);
    lc.handle(host.now_us(), &mut host, Event::Request(13));
    assert_eq!(host.counts.get("keyward_target_requests_total;target=none;code=unknown_target"), Some(&1));
    assert!(host.counts.keys().all(|k| !k.contains("not-configured")));
}

#[test]
fn decision_headers_replace_what_the_client_sent() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, r#","decision_headers":true"#));
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let tok = token(host.now_ms());
    host.open(
        11,
        "stripe",
        &[
            (":method", "GET"),
            (":path", "/v1/charges"),
            ("authorization", &format!("Bearer {tok}")),
            ("x-keyward-subject", "admin"),
            ("x-keyward-run", "forged"),
        ],
    );
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(11)), Action::Continue);
    let h = |name: &str| host.streams[&11].request.iter().filter(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).to_string()).collect::<Vec<_>>();
    assert_eq!(h("x-keyward-subject"), vec!["lambda/pay".to_string()]);
    assert_eq!(h("x-keyward-target"), vec!["stripe".to_string()]);
    assert_eq!(h("x-keyward-jti").len(), 1);
    assert!(h("x-keyward-run").is_empty(), "the credential has no run label: the client's is gone");
    // Off by default: nothing is added (and nothing is removed).
    let mut h2 = host.worker(ROOT + 1);
    let mut plain = worker(&mut h2, config());
    h2.open(12, "stripe", &[(":method", "GET"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {tok}"))]);
    assert_eq!(plain.handle(h2.now_us(), &mut h2, Event::Request(12)), Action::Continue);
    assert!(h2.streams[&12].request.iter().all(|(k, _)| !k.starts_with("x-keyward-")));
}

#[test]
fn a_cold_miss_reports_where_its_time_goes() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    host.advance(3);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    for phase in ["park", "wake", "dispatch", "decode", "resume"] {
        assert_eq!(host.observed.get(&format!("keyward_cold_phase_microseconds;phase={phase}")).map(Vec::len), Some(1), "{phase}: {:?}", host.observed);
    }
    assert!(host.observed.keys().any(|k| k.starts_with("keyward_store_fetch_microseconds")), "the callout itself");
    // A warm request reports none of it.
    host.observed.clear();
    assert_eq!(send_request(&mut lc, &mut host, 11), Action::Continue);
    assert!(!host.observed.keys().any(|k| k.starts_with("keyward_cold_phase_microseconds")));
}
