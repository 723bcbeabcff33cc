//! Spend caps across events: a cost read from the body at its end and reserved atomically in
//! shared data (every worker sees it), refusals that hold nothing, refunds on the vendor's own
//! `refund_on` answers, retries with the same `Idempotency-Key`, and the stream or the
//! configuration going away mid-body.

use super::*;
use crate::policy::limits::Table;
use crate::secrets::keys;

pub(super) const TARGETS: &str = r#"
    "stripe":{"credential":"bearer","secret":{"store":"bao","path":"stripe","field":"api_key"},"inject":{"type":"bearer"},
              "cost":{"form_field":"amount","currency_field":"currency","currencies":["usd"],"max_body_bytes":256,
                      "free":["GET /**"]},
              "refund_on":[400,402]},
    "fixed":{"credential":"bearer","secret":{"store":"bao","path":"stripe","field":"api_key"},"inject":{"type":"bearer"},
             "cost":{"per_request":7},"refund_on":[503]}"#;

pub(super) fn spend_config() -> Config {
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}}}},"stores":{{"bao":{BAO}}},
        "cache":{{"ttl_s":300}},"targets":{{{TARGETS}}}}}"#
    );
    compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn capped(host: &MemHost, jti: &str, lim: &str, extra: &str) -> String {
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let claims = format!(
        r#"{{"sub":"lambda/pay","aud":"keyward","exp":{},"jti":"{jti}","allow":["stripe * /**","fixed * /**"],"lim":{lim}{extra}}}"#,
        host.now_ms() / 1000 + 300
    );
    jwt::mint("k1", &k, &claims)
}

/// What credential `jti` has reserved, as every worker reads it from shared data.
pub(super) fn spent(host: &MemHost, jti: &str) -> u64 {
    let id = HmacKey::new(K1).map(|k| k.id()).unwrap_or_default();
    let entry = keys::limit_entry(id, jti);
    host.shared_value(&keys::limit_shard(&entry)).and_then(|b| Table::decode(&b)).map_or(0, |t| t.spent(&entry))
}

/// A worker whose cache holds the stripe key.
pub(super) fn warm_worker(host: &mut MemHost) -> Lifecycle {
    let mut lc = worker(host, spend_config());
    host.open(9, "stripe", &[(":method", "GET"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {}", token(host.now_ms())))]);
    if lc.handle(host.now_us(), host, Event::Request(9)) == Action::Continue {
        host.take();
        return lc; // another worker fetched it: the shared record has it
    }
    lc.handle(host.now_us(), host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), host, Event::Answer { call, answer: stripe_answer() });
    host.take();
    lc
}

/// A payment's headers on stream `ctx` (the body is set for the body events).
pub(super) fn pay_headers(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, tok: &str, body: &str, extra: &[(&str, &str)]) -> Action {
    let auth = format!("Bearer {tok}");
    let mut h =
        vec![(":method", "POST"), (":path", "/v1/payment_intents"), ("authorization", auth.as_str()), ("content-type", "application/x-www-form-urlencoded")];
    h.extend_from_slice(extra);
    host.open(ctx, "stripe", &h);
    if let Some(s) = host.streams.get_mut(&ctx) {
        s.body = body.as_bytes().to_vec();
    }
    lc.handle(host.now_us(), host, Event::Request(ctx))
}

/// A whole payment: headers, then the body in one piece.
pub(super) fn pay(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, tok: &str, body: &str, extra: &[(&str, &str)]) -> Action {
    assert_eq!(pay_headers(lc, host, ctx, tok, body, extra), Action::Continue, "the headers go on, rewritten, to the buffer filter");
    host.current = ctx;
    lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true })
}

pub(super) fn state(host: &MemHost, ctx: ContextId, key: &str) -> Option<String> {
    host.streams.get(&ctx).and_then(|s| s.filter_state.get(key).cloned())
}

/// The vendor answers stream `ctx` with `status` (`local`: Envoy made it up).
pub(super) fn answer(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, status: &str, local: bool) {
    if let Some(s) = host.streams.get_mut(&ctx) {
        s.response = vec![(":status".into(), status.as_bytes().to_vec())];
        s.local_response = local;
    }
    host.current = ctx;
    lc.handle(host.now_us(), host, Event::Response(ctx));
}

#[test]
fn a_body_cost_is_read_at_the_end_of_the_body_and_reserved_then() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-1", r#"{"spend":10000}"#, "");
    let body = "amount=6000&currency=usd";
    let allowed = host.count(Metric::Allowed);
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, body, &[]), Action::Continue);
    // Rewritten already (Envoy's buffer filter holds it), decided only at the body's end.
    assert_eq!(injected(&host, 10).as_deref(), Some(format!("Bearer {STRIPE_KEY}").as_str()));
    assert!(lc.pricing().contains_key(&10));
    assert_eq!(state(&host, 10, "keyward.decision"), None, "nothing recorded before the body is read");
    assert_eq!(host.count(Metric::Allowed), allowed);
    // Parts of the body are buffered.
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 10, end: false }), Action::Pause);
    assert_eq!(spent(&host, "c-1"), 0);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: body.len(), end: true }), Action::Continue);
    assert!(lc.pricing().is_empty());
    assert_eq!(spent(&host, "c-1"), 6000);
    assert_eq!(state(&host, 10, "keyward.decision").as_deref(), Some("allow"));
    assert_eq!(state(&host, 10, "keyward.cost").as_deref(), Some("6000"));
    assert_eq!(state(&host, 10, "keyward.spend").as_deref(), Some("reserved"));
    assert_eq!(host.counts.get("keyward_spend_reserved_total;target=stripe"), Some(&6000));
    assert_eq!(host.count(Metric::Allowed), allowed + 1);
    // What is left does not cover the next one: refused, nothing reserved, nothing forwarded.
    assert_eq!(pay(&mut lc, &mut host, 11, &t, "amount=4001&currency=usd", &[]), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(11, 429, "spend_exhausted".into())]);
    assert_eq!(spent(&host, "c-1"), 6000);
    assert_eq!(state(&host, 11, "keyward.decision").as_deref(), Some("spend_exhausted"));
    assert_eq!(host.count(Metric::Denied(crate::response::Code::SpendExhausted)), 1);
    assert_eq!(pay(&mut lc, &mut host, 12, &t, "amount=4000&currency=usd", &[]), Action::Continue);
    assert_eq!(spent(&host, "c-1"), 10000);
}

#[test]
fn every_worker_reserves_against_the_same_cap() {
    let mut a = MemHost::new(ROOT);
    let mut b = a.worker(2);
    let mut la = warm_worker(&mut a);
    let mut lb = warm_worker(&mut b);
    let t = capped(&a, "c-2", r#"{"spend":10000}"#, "");
    // Both workers have the headers; the bodies end one after the other.
    assert_eq!(pay_headers(&mut la, &mut a, 10, &t, "amount=6000&currency=usd", &[]), Action::Continue);
    assert_eq!(pay_headers(&mut lb, &mut b, 20, &t, "amount=6000&currency=usd", &[]), Action::Continue);
    assert_eq!(la.handle(a.now_us(), &mut a, Event::RequestBody { ctx: 10, size: 24, end: true }), Action::Continue);
    assert_eq!(lb.handle(b.now_us(), &mut b, Event::RequestBody { ctx: 20, size: 24, end: true }), Action::Pause);
    assert_eq!(replies(&b.take()), vec![(20, 429, "spend_exhausted".into())]);
    assert_eq!(spent(&a, "c-2"), 6000);
}

#[test]
fn unreadable_costs_are_refused_and_hold_nothing() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-3", r#"{"spend":10000,"total":2}"#, "");
    for (i, body) in
        ["currency=usd", "amount=-1&currency=usd", "amount=1.5&currency=usd", "amount=5&currency=eur", "amount=5&amount=6&currency=usd"].iter().enumerate()
    {
        let ctx = 10 + i as ContextId;
        assert_eq!(pay(&mut lc, &mut host, ctx, &t, body, &[]), Action::Pause, "{body}");
        assert_eq!(replies(&host.take()), vec![(ctx, 400, "bad_request".into())], "{body}");
    }
    assert_eq!(spent(&host, "c-3"), 0);
    // None of them counted against `total` either: two payments still go through.
    assert_eq!(pay(&mut lc, &mut host, 20, &t, "amount=1&currency=usd", &[]), Action::Continue);
    assert_eq!(pay(&mut lc, &mut host, 21, &t, "amount=1&currency=usd", &[]), Action::Continue);
    assert_eq!(pay(&mut lc, &mut host, 22, &t, "amount=1&currency=usd", &[]), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(22, 429, "quota_exhausted".into())]);
    assert_eq!(spent(&host, "c-3"), 2);
}

#[test]
fn a_body_over_the_bound_is_refused_as_it_grows() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-4", r#"{"spend":10000}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "", &[]), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 200, end: false }), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 257, end: false }), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 413, "body_too_large".into())]);
    assert!(lc.pricing().is_empty());
    // A declared length over the bound is refused at the headers, before anything is fetched.
    assert_eq!(pay_headers(&mut lc, &mut host, 11, &t, "", &[("content-length", "257")]), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(11, 413, "body_too_large".into())]);
    // So is a body the target cannot read.
    assert_eq!(pay_headers(&mut lc, &mut host, 12, &t, "", &[("content-encoding", "gzip")]), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(12, 400, "bad_request".into())]);
    assert_eq!(spent(&host, "c-4"), 0);
}

#[test]
fn requests_the_cost_does_not_apply_to_are_not_buffered() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-5", r#"{"spend":0}"#, "");
    host.open(10, "stripe", &[(":method", "GET"), (":path", "/v1/payment_intents"), ("authorization", &format!("Bearer {t}"))]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(10)), Action::Continue);
    assert!(lc.pricing().is_empty());
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 5, end: false }), Action::Continue, "its body streams through");
    assert_eq!(state(&host, 10, "keyward.cost"), None);
}

#[test]
fn a_refund_on_status_from_the_vendor_releases_the_reservation() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-6", r#"{"spend":1000}"#, "");
    assert_eq!(pay(&mut lc, &mut host, 10, &t, "amount=1000&currency=usd", &[]), Action::Continue);
    answer(&mut lc, &mut host, 10, "402", false);
    assert_eq!(spent(&host, "c-6"), 0);
    assert_eq!(state(&host, 10, "keyward.spend").as_deref(), Some("refunded"));
    assert_eq!(host.counts.get("keyward_spend_refunded_total;target=stripe"), Some(&1000));
    // A status not listed, or one Envoy made up (a timeout: the charge may have happened), keeps it.
    assert_eq!(pay(&mut lc, &mut host, 11, &t, "amount=600&currency=usd", &[]), Action::Continue);
    answer(&mut lc, &mut host, 11, "500", false);
    assert_eq!(pay(&mut lc, &mut host, 12, &t, "amount=400&currency=usd", &[]), Action::Continue);
    answer(&mut lc, &mut host, 12, "400", true);
    assert_eq!(spent(&host, "c-6"), 1000);
    assert_eq!(state(&host, 12, "keyward.spend").as_deref(), Some("reserved"));
    // A client that leaves before the answer keeps it too.
    let u = capped(&host, "c-6b", r#"{"spend":1000}"#, "");
    assert_eq!(pay(&mut lc, &mut host, 13, &u, "amount=300&currency=usd", &[]), Action::Continue);
    host.close(13);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(13));
    assert_eq!(spent(&host, "c-6b"), 300);
}

#[test]
fn a_retry_with_the_same_idempotency_key_is_not_charged_again() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-7", r#"{"spend":1000}"#, "");
    let key = [("idempotency-key", "order-1")];
    assert_eq!(pay(&mut lc, &mut host, 10, &t, "amount=800&currency=usd", &key), Action::Continue);
    assert_eq!(pay(&mut lc, &mut host, 11, &t, "amount=800&currency=usd", &key), Action::Continue);
    assert_eq!(state(&host, 11, "keyward.spend").as_deref(), Some("retry"));
    assert_eq!(state(&host, 11, "keyward.cost").as_deref(), Some("800"));
    assert_eq!(spent(&host, "c-7"), 800);
    // The retry's own answer never refunds what the original holds.
    answer(&mut lc, &mut host, 11, "400", false);
    assert_eq!(spent(&host, "c-7"), 800);
    // The same key for another amount is another charge (refused here: it does not fit).
    assert_eq!(pay(&mut lc, &mut host, 12, &t, "amount=801&currency=usd", &key), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(12, 429, "spend_exhausted".into())]);
    // A retry went to the vendor on the original's reservation (and may have succeeded there):
    // the original's refund status no longer takes it back. Over-counted, never under.
    answer(&mut lc, &mut host, 10, "402", false);
    assert_eq!(spent(&host, "c-7"), 800);
    // A reservation no retry leaned on goes back on a refund status; its retry is then charged
    // like a new request.
    let t2 = capped(&host, "c-7b", r#"{"spend":1000}"#, "");
    let key2 = [("idempotency-key", "order-2")];
    assert_eq!(pay(&mut lc, &mut host, 13, &t2, "amount=800&currency=usd", &key2), Action::Continue);
    answer(&mut lc, &mut host, 13, "402", false);
    assert_eq!(spent(&host, "c-7b"), 0);
    assert_eq!(pay(&mut lc, &mut host, 14, &t2, "amount=800&currency=usd", &key2), Action::Continue);
    assert_eq!(state(&host, 14, "keyward.spend").as_deref(), Some("reserved"));
    assert_eq!(spent(&host, "c-7b"), 800);
}

#[test]
fn a_client_that_leaves_mid_body_holds_nothing() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-8", r#"{"spend":1000}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "amount=1000&currency=usd", &[]), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 5, end: false }), Action::Pause);
    host.close(10);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(10));
    assert!(lc.pricing().is_empty());
    assert_eq!(spent(&host, "c-8"), 0);
    assert_eq!(pay(&mut lc, &mut host, 11, &t, "amount=1000&currency=usd", &[]), Action::Continue, "the whole cap is still there");
}

#[test]
fn a_new_configuration_mid_body_refuses_the_request() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-9", r#"{"spend":1000}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "amount=10&currency=usd", &[]), Action::Continue);
    lc.configure(host.now_us(), &mut host, spend_config());
    host.take();
    host.current = 10;
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 22, end: true }), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
    assert_eq!(spent(&host, "c-9"), 0);
}

#[test]
fn a_cold_request_parks_then_reads_its_body() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, spend_config());
    let t = capped(&host, "c-10", r#"{"spend":1000}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "amount=10&currency=usd", &[]), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(10)));
    assert_eq!(spent(&host, "c-10"), 0, "nothing reserved before the body");
    host.current = 10;
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 22, end: true }), Action::Continue);
    assert_eq!(spent(&host, "c-10"), 10);
    assert_eq!(state(&host, 10, "keyward.cache").as_deref(), Some("miss"));
}

#[test]
fn a_fixed_cost_is_reserved_with_the_headers_and_refunded_likewise() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "c-11", r#"{"spend":14}"#, "");
    for (ctx, want) in [(10, Action::Continue), (11, Action::Continue), (12, Action::Pause)] {
        host.open(ctx, "fixed", &[(":method", "GET"), (":path", "/x"), ("authorization", &format!("Bearer {t}"))]);
        assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(ctx)), want);
    }
    assert_eq!(replies(&host.take()), vec![(12, 429, "spend_exhausted".into())]);
    assert_eq!(state(&host, 10, "keyward.cost").as_deref(), Some("7"));
    assert_eq!(spent(&host, "c-11"), 14);
    answer(&mut lc, &mut host, 11, "503", false);
    assert_eq!(spent(&host, "c-11"), 7);
}

#[test]
fn a_child_spends_against_its_parent_and_a_refusal_there_releases_its_own() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    // Two children of one parent capped at 1000, each allowed 800 of its own.
    let c1 = capped(&host, "kid-1", r#"{"spend":800}"#, r#","par":"p-1","plim":{"spend":1000}"#);
    let c2 = capped(&host, "kid-2", r#"{"spend":800}"#, r#","par":"p-1","plim":{"spend":1000}"#);
    assert_eq!(pay(&mut lc, &mut host, 10, &c1, "amount=700&currency=usd", &[]), Action::Continue);
    assert_eq!(pay(&mut lc, &mut host, 11, &c2, "amount=700&currency=usd", &[]), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(11, 429, "spend_exhausted".into())]);
    assert_eq!((spent(&host, "kid-1"), spent(&host, "kid-2"), spent(&host, "p-1")), (700, 0, 700), "kid-2's own reservation was released");
    // A refund releases both entries.
    answer(&mut lc, &mut host, 10, "402", false);
    assert_eq!((spent(&host, "kid-1"), spent(&host, "p-1")), (0, 0));
}

#[test]
fn a_cold_request_without_a_body_is_refused_when_it_resumes() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, spend_config());
    let t = capped(&host, "c-12", r#"{"spend":1000}"#, "");
    // Its headers end the stream: the filter announces the (empty) body right away, while it parks.
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "", &[]), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 0, end: true }), Action::Pause);
    assert_eq!(lc.parked().get(&10).and_then(|p| p.body_end), Some(Some(0)));
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let effects = host.take();
    assert_eq!(replies(&effects), vec![(10, 400, "bad_request".into())]);
    assert!(!effects.contains(&Effect::Resume(10)), "never resumed: Envoy would send it on without a body event");
    assert!(lc.pricing().is_empty());
}

#[test]
fn a_cold_request_whose_body_and_trailers_arrive_while_it_waits_is_priced_from_all_of_its_body() {
    // A native executor's paused stream still hears of its body and trailers (Envoy holds them):
    // the trailers end it, and the decision reads everything held.
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, spend_config());
    let t = capped(&host, "c-13", r#"{"spend":1000}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "amount=700&currency=usd", &[]), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 11, end: false }), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(10)), Action::Pause);
    assert_eq!(lc.parked().get(&10).and_then(|p| p.body_end), Some(None));
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    let effects = host.take();
    assert!(effects.contains(&Effect::Resume(10)), "{effects:?}");
    assert_eq!(spent(&host, "c-13"), 700, "priced from the whole body, not the part announced first");
}

#[test]
fn spend_series_exist_from_the_start_for_priced_targets() {
    let mut host = MemHost::new(ROOT);
    let _lc = worker(&mut host, spend_config());
    assert_eq!(host.counts.get("keyward_spend_reserved_total;target=stripe"), Some(&0));
    assert_eq!(host.counts.get("keyward_spend_refunded_total;target=fixed"), Some(&0));
}
