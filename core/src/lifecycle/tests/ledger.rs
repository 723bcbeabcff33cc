//! The fleet ledger across events, on the in-memory host with the ledger's answers scripted as
//! DynamoDB would give them: slices granted, used and renewed with one call, followed by another
//! worker, refused, failing; direct charges with a retry fingerprint; refunds credited; leases
//! given back by the tick and the drain; budgets turning with the calendar.

use super::spend::{answer, capped, pay_headers, TARGETS};
use super::table::{Attr, Table};
use super::*;
use crate::ledger::budget::days_from_civil;
use crate::ledger::slice;
use crate::wire::json::{self, Value};

const LEDGER: &str = r#","ledger":{"type":"dynamodb","cluster":"ledger","authority":"dynamodb.us-east-1.amazonaws.com","table":"kw-ledger","timeout_ms":500,"lease_s":10,
    "budgets":[{"name":"team","match":"sub:lambda/team*","spend":5000,"window":"month","targets":["stripe"]}]}"#;

fn ledger_config() -> Config {
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}}}},"stores":{{"bao":{BAO}}},
        "cache":{{"ttl_s":300}},"targets":{{{TARGETS}}}{LEDGER}}}"#
    );
    compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

/// A worker whose secret cache holds the stripe key.
fn warm(host: &mut MemHost) -> Lifecycle {
    let mut lc = worker(host, ledger_config());
    host.open(9, "stripe", &[(":method", "GET"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {}", token(host.now_ms())))]);
    if lc.handle(host.now_us(), host, Event::Request(9)) == Action::Pause {
        lc.handle(host.now_us(), host, Event::Woken);
        let call = only_call(&host.take());
        lc.handle(host.now_us(), host, Event::Answer { call, answer: stripe_answer() });
    }
    host.take();
    lc
}

/// Two warm workers of one gateway (their hosts share its shared data).
fn two_workers() -> (MemHost, Lifecycle, MemHost, Lifecycle) {
    let mut h1 = MemHost::new(ROOT);
    let w1 = warm(&mut h1);
    let mut h2 = h1.worker(2);
    let w2 = warm(&mut h2);
    (h1, w1, h2, w2)
}

/// A limited credential's GET on stream `ctx`.
fn get(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, tok: &str) -> Action {
    host.open(ctx, "stripe", &[(":method", "GET"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {tok}"))]);
    lc.handle(host.now_us(), host, Event::Request(ctx))
}

/// The ledger calls among the effects since the last look.
fn calls(host: &mut MemHost) -> Vec<(CallId, String, Value)> {
    let effects = host.take();
    ledger_calls(host, &effects)
}

/// The ledger calls sent: (id, operation, body).
fn ledger_calls(host: &MemHost, effects: &[Effect]) -> Vec<(CallId, String, Value)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch { call, cluster, .. } if cluster == "ledger" => {
                let sent = host.sent.get(call)?;
                let op = sent.headers.iter().find(|(k, _)| k == "x-amz-target").and_then(|(_, v)| v.expose_str()).unwrap_or("").to_string();
                let body = json::parse(sent.body.as_deref().unwrap_or_default()).ok()?;
                Some((*call, op.trim_start_matches("DynamoDB_20120810.").to_string(), body))
            }
            _ => None,
        })
        .collect()
}

/// Run the worker until the ledger has answered every call it sends (root wake-ups included),
/// and return the other effects.
fn settle(lc: &mut Lifecycle, host: &mut MemHost, table: &mut Table) -> Vec<Effect> {
    let mut rest = Vec::new();
    for _ in 0..64 {
        let effects = host.take();
        let sent = ledger_calls(host, &effects);
        let woken = effects.contains(&Effect::WakeRoot);
        rest.extend(effects.into_iter().filter(|e| !matches!(e, Effect::Dispatch { cluster, .. } if cluster == "ledger") && *e != Effect::WakeRoot));
        if sent.is_empty() && !woken {
            return rest;
        }
        if woken {
            lc.handle(host.now_us(), host, Event::Woken);
        }
        for (call, _, _) in sent {
            let answer = table.serve(&host.sent[&call]);
            lc.handle(host.now_us(), host, Event::Answer { call, answer });
        }
    }
    panic!("the ledger calls never settle");
}

fn gateway(host: &MemHost) -> String {
    let prefix = format!("{}/", crate::secrets::keys::GATEWAY_ID);
    let key = host.shared_keys().into_iter().find(|k| k.starts_with(&prefix)).unwrap_or_default();
    String::from_utf8(host.shared_value(&key).unwrap_or_default()).unwrap_or_default()
}

fn item_key(body: &Value) -> String {
    body.get("Key").and_then(|k| k.get("pk")).and_then(|p| p.get("S")).and_then(Value::as_str).unwrap_or("").to_string()
}

/// The ledger key of credential `jti` (signed with K1).
fn account_pk(jti: &str) -> String {
    let id = HmacKey::new(K1).map(|k| k.id()).unwrap_or_default();
    format!("c/{id:016x}/{jti}")
}

/// Another gateway's lease on `pk`, holding `spend` and `count` of it until `expires_s`.
fn other_gateway_holds(table: &mut Table, pk: &str, spend: i128, count: i128, expires_s: u64) {
    let lease = [("i", 1), ("q", 1), ("s", spend), ("n", count), ("e", i128::from(expires_s))].into_iter().map(|(k, v)| (k.to_string(), Attr::N(v))).collect();
    let item =
        [("pk".to_string(), Attr::S(pk.into())), ("s".into(), Attr::N(spend)), ("n".into(), Attr::N(count)), ("l_0000000000000abc".into(), Attr::M(lease))];
    table.items.insert(pk.into(), item.into_iter().collect());
}

#[test]
fn a_slice_is_granted_with_one_call_serves_many_requests_and_is_topped_up_in_place() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-1", r#"{"total":1000}"#, "");
    let pk = account_pk("l-1");
    assert_eq!(get(&mut lc, &mut host, 10, &t), Action::Pause, "no slice yet: it waits for the ledger");
    assert_eq!(host.take(), vec![Effect::WakeRoot]);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let sent = calls(&mut host);
    assert_eq!(sent.len(), 1, "one call");
    let (call, op, body) = sent[0].clone();
    assert_eq!((op.as_str(), item_key(&body)), ("UpdateItem", pk.clone()));
    let answer = table.serve(&host.sent[&call]);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer });
    assert!(host.take().contains(&Effect::Resume(10)), "the waiting request goes on");
    let gw = format!("l_{}", gateway(&host));
    let count = table.n(&pk, &[&gw, "n"]).unwrap_or(0);
    assert!(count >= slice::MIN_COUNT as i128, "a slice of several requests: {count}");
    assert_eq!(table.n(&pk, &["n"]), Some(count), "held in the account as granted");
    // The slice serves the next requests without a call.
    for ctx in 11..10 + count as u32 {
        assert_eq!(get(&mut lc, &mut host, ctx, &t), Action::Continue);
    }
    assert!(calls(&mut host).is_empty());
    // Spent: the next one tops the lease up, in place (same id, the next sequence).
    let id = table.n(&pk, &[&gw, "i"]);
    assert_eq!(get(&mut lc, &mut host, 100, &t), Action::Pause);
    let effects = settle(&mut lc, &mut host, &mut table);
    assert!(effects.contains(&Effect::Resume(100)), "{effects:?}");
    assert_eq!(table.served, vec!["UpdateItem", "UpdateItem"]);
    assert_eq!((table.n(&pk, &[&gw, "i"]), table.n(&pk, &[&gw, "q"])), (id, Some(2)));
    let total = table.n(&pk, &[&gw, "n"]).unwrap_or(0);
    assert!(total > count && total <= 1000);
    assert_eq!(table.n(&pk, &["n"]), Some(total));
}

#[test]
fn a_top_up_asked_again_after_a_lost_answer_is_made_once() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-7", r#"{"total":1000}"#, "");
    let pk = account_pk("l-7");
    assert_eq!(get(&mut lc, &mut host, 10, &t), Action::Pause);
    settle(&mut lc, &mut host, &mut table);
    let gw = format!("l_{}", gateway(&host));
    let first = table.n(&pk, &["n"]).unwrap_or(0);
    for ctx in 11..10 + first as u32 {
        assert_eq!(get(&mut lc, &mut host, ctx, &t), Action::Continue);
    }
    // The top-up is made, but its answer is lost (a timeout after DynamoDB wrote it).
    assert_eq!(get(&mut lc, &mut host, 100, &t), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let (call, _, _) = calls(&mut host).pop().unwrap_or_else(|| panic!("a top-up"));
    table.serve(&host.sent[&call]);
    let held = table.n(&pk, &["n"]);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: None, body: None } });
    assert_eq!(replies(&host.take()), vec![(100, 503, "secret_unavailable".into())]);
    // Asked again a moment later: the same top-up, which the ledger already made, is found by a
    // read and taken as it is; the account holds it once.
    host.advance(slice::FAILING_MS);
    assert_eq!(get(&mut lc, &mut host, 101, &t), Action::Pause);
    let effects = settle(&mut lc, &mut host, &mut table);
    assert!(effects.contains(&Effect::Resume(101)), "{effects:?}");
    assert_eq!(table.n(&pk, &["n"]), held, "the top-up counted once");
    assert_eq!(table.n(&pk, &[&gw, "q"]), Some(2));
}

#[test]
fn another_worker_follows_the_grant_instead_of_calling_too() {
    let (mut h1, mut w1, mut h2, mut w2) = two_workers();
    let mut table = Table::default();
    let t = capped(&h1, "l-2", r#"{"total":50}"#, "");
    assert_eq!(get(&mut w1, &mut h1, 10, &t), Action::Pause);
    w1.handle(h1.now_us(), &mut h1, Event::Woken);
    let (call, _, _) = calls(&mut h1).pop().unwrap_or_else(|| panic!("a grant"));
    // Worker 2 needs the same account meanwhile: it waits, it does not call.
    assert_eq!(get(&mut w2, &mut h2, 20, &t), Action::Pause);
    w2.handle(h2.now_us(), &mut h2, Event::Woken);
    assert!(calls(&mut h2).is_empty(), "one call per gateway, not per worker");
    let answer = table.serve(&h1.sent[&call]);
    w1.handle(h1.now_us(), &mut h1, Event::Answer { call, answer });
    h2.advance(20);
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    assert!(h2.take().contains(&Effect::Resume(20)), "worker 2's request goes on from the shared slice");
    assert_eq!(table.served.len(), 1);
}

#[test]
fn a_failing_ledger_refuses_fast_with_503_and_is_asked_again_after_a_moment() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-3", r#"{"total":10}"#, "");
    assert_eq!(get(&mut lc, &mut host, 10, &t), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let (call, _, _) = calls(&mut host).pop().unwrap_or_else(|| panic!("a grant"));
    let throttled =
        Answer { status: Some(400), body: Some(br#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException"}"#.to_vec()) };
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: throttled });
    assert_eq!(replies(&host.take()), vec![(10, 503, "secret_unavailable".into())]);
    assert_eq!(host.count(Metric::LedgerUnavailable), 1);
    // Right after: refused at once, no call.
    assert_eq!(get(&mut lc, &mut host, 11, &t), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(11, 503, "secret_unavailable".into())]);
    // A moment later the ledger is asked again, with the same grant (it may have been made).
    host.advance(slice::FAILING_MS);
    assert_eq!(get(&mut lc, &mut host, 12, &t), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    assert_eq!(calls(&mut host).len(), 1);
    // No answer at all: given up at the deadline, 503.
    host.advance(500 + CALL_GRACE_MS);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert_eq!(replies(&host.take()), vec![(12, 503, "secret_unavailable".into())]);
    // Garbage (an attribute this ledger never writes) is a failure too, never a grant.
    host.advance(slice::FAILING_MS);
    assert_eq!(get(&mut lc, &mut host, 13, &t), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let (call, _, body) = calls(&mut host).pop().unwrap_or_else(|| panic!("a grant"));
    let forged = format!(r#"{{"Attributes":{{"pk":{{"S":"{}"}},"n":{{"N":"1"}},"admin":{{"S":"yes"}}}}}}"#, item_key(&body));
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(200), body: Some(forged.into_bytes()) } });
    assert_eq!(replies(&host.take()), vec![(13, 503, "secret_unavailable".into())]);
}

#[test]
fn no_room_left_is_429_until_another_lease_ends_and_a_smaller_grant_is_asked_when_it_covers_the_request() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-4", r#"{"spend":1000}"#, "");
    let pk = account_pk("l-4");
    // Another gateway holds 900 of 1000 for 7 more seconds.
    other_gateway_holds(&mut table, &pk, 900, 0, host.now_ms() / 1000 + 7);
    let pay = |lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, amount: u64| {
        let body = format!("amount={amount}&currency=usd");
        assert_eq!(pay_headers(lc, host, ctx, &t, &body, &[]), Action::Continue);
        lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true })
    };
    assert_eq!(pay(&mut lc, &mut host, 10, 300), Action::Pause, "it waits at its body's end");
    let effects = settle(&mut lc, &mut host, &mut table);
    assert_eq!(replies(&effects), vec![(10, 429, "spend_exhausted".into())]);
    assert_eq!(table.served, vec!["UpdateItem", "GetItem"], "refused, then read to see what is left");
    let retry = host.streams[&10].reply_headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
    assert_eq!(retry.as_deref(), Some("9"), "when the other gateway gives back what its lease did not use: 7 s to its end, 2 to give it back");
    assert_eq!(table.n(&pk, &["s"]), Some(900), "a refusal holds nothing");
    // A request that fits what is left (100) gets a grant sized to it.
    host.advance(slice::NO_ROOM_MS);
    assert_eq!(pay(&mut lc, &mut host, 11, 100), Action::Pause);
    let effects = settle(&mut lc, &mut host, &mut table);
    assert!(effects.contains(&Effect::Resume(11)), "{effects:?}");
    assert_eq!(table.n(&pk, &["s"]), Some(1000), "exactly what was left");
    // Nothing is left: the next is refused with no more than a read.
    host.advance(slice::NO_ROOM_MS);
    assert_eq!(pay(&mut lc, &mut host, 12, 1), Action::Pause);
    let effects = settle(&mut lc, &mut host, &mut table);
    assert_eq!(replies(&effects), vec![(12, 429, "spend_exhausted".into())]);
    assert_eq!(table.n(&pk, &["s"]), Some(1000));
}

#[test]
fn a_keyed_charge_is_reserved_directly_and_its_retry_is_recognised() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-5", r#"{"spend":1000}"#, "");
    let pk = account_pk("l-5");
    let key = [("idempotency-key", "order-9")];
    let pay = |lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId| {
        let body = "amount=400&currency=usd";
        assert_eq!(pay_headers(lc, host, ctx, &t, body, &key), Action::Continue);
        lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true })
    };
    assert_eq!(pay(&mut lc, &mut host, 10), Action::Pause);
    let effects = settle(&mut lc, &mut host, &mut table);
    assert!(effects.contains(&Effect::Resume(10)));
    assert_eq!(host.streams[&10].filter_state.get("keyward.spend").map(String::as_str), Some("reserved"));
    let marks: Vec<String> = table.items[&pk].keys().filter(|k| k.starts_with("r_")).cloned().collect();
    assert_eq!((marks.len(), table.n(&pk, &["s"])), (1, Some(400)), "charged directly, with its retry fingerprint");
    // The same request again (on any gateway): the mark is there, so it is a retry, not charged.
    assert_eq!(pay(&mut lc, &mut host, 11), Action::Pause);
    let effects = settle(&mut lc, &mut host, &mut table);
    assert!(effects.contains(&Effect::Resume(11)));
    assert_eq!(host.streams[&11].filter_state.get("keyward.spend").map(String::as_str), Some("retry"));
    assert_eq!(table.n(&pk, &["s"]), Some(400));
    // The retry pinned the charge: once a retry went to the vendor on it, the first's refund
    // status cannot take it back (the retry may have succeeded there).
    assert!(table.items[&pk].keys().any(|k| k.starts_with("p_")), "pinned");
    answer(&mut lc, &mut host, 10, "402", false);
    settle(&mut lc, &mut host, &mut table);
    assert_eq!(table.n(&pk, &["s"]), Some(400), "a pinned charge stands");
    // A charge no retry leaned on: the vendor's refund status takes it and its mark back, once.
    let other = [("idempotency-key", "order-10")];
    let body = "amount=300&currency=usd";
    assert_eq!(pay_headers(&mut lc, &mut host, 12, &t, body, &other), Action::Continue);
    lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 12, size: body.len(), end: true });
    assert!(settle(&mut lc, &mut host, &mut table).contains(&Effect::Resume(12)));
    assert_eq!(table.n(&pk, &["s"]), Some(700));
    answer(&mut lc, &mut host, 12, "402", false);
    settle(&mut lc, &mut host, &mut table);
    assert_eq!(table.n(&pk, &["s"]), Some(400));
    assert_eq!(table.items[&pk].keys().filter(|k| k.starts_with("r_")).count(), 1, "only the pinned charge's mark is left");
}

#[test]
fn an_idle_lease_is_given_back_by_the_tick_and_by_the_drain() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-6", r#"{"total":100}"#, "");
    let pk = account_pk("l-6");
    assert_eq!(get(&mut lc, &mut host, 10, &t), Action::Pause);
    settle(&mut lc, &mut host, &mut table);
    let gw = format!("l_{}", gateway(&host));
    assert!(table.n(&pk, &["n"]).unwrap_or(0) > 1);
    // The drain, from the gateway itself, gives it back now; from elsewhere it is refused.
    host.open_route(30, &[("endpoint", "drain")], &[(":method", "POST"), (":path", "/keyward/drain")]);
    if let Some(s) = host.streams.get_mut(&30) {
        s.client = "10.0.0.9:4000".into();
    }
    lc.handle(host.now_us(), &mut host, Event::Request(30));
    assert_eq!(replies(&host.take()), vec![(30, 403, "forbidden".into())]);
    host.open_route(31, &[("endpoint", "drain")], &[(":method", "POST"), (":path", "/keyward/drain")]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(31)), Action::Pause, "it waits for the return it asked for");
    let effects = settle(&mut lc, &mut host, &mut table);
    assert_eq!(replies(&effects), vec![(31, 200, String::new())]);
    assert_eq!(host.streams[&31].reply_body.as_deref(), Some(r#"{"returning":0,"held":0}"#), "answered once given back");
    assert_eq!(table.n(&pk, &["n"]), Some(1), "all but the one request used went back");
    assert_eq!((table.n(&pk, &[&gw, "q"]), table.n(&pk, &[&gw, "n"])), (Some(0), Some(0)), "the lease ended: its end mark holds nothing");
    host.open_route(32, &[("endpoint", "drain")], &[(":method", "POST"), (":path", "/keyward/drain")]);
    lc.handle(host.now_us(), &mut host, Event::Request(32));
    assert_eq!(host.streams[&32].reply_body.as_deref(), Some(r#"{"returning":0,"held":0}"#));
    // A new lease, used twice, is given back by the tick a moment after its end.
    assert_eq!(get(&mut lc, &mut host, 40, &t), Action::Pause);
    settle(&mut lc, &mut host, &mut table);
    assert_eq!(get(&mut lc, &mut host, 41, &t), Action::Continue);
    host.advance(9_000);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert!(settle(&mut lc, &mut host, &mut table).is_empty());
    assert!(table.n(&pk, &[&gw, "q"]) > Some(0), "still live");
    host.advance(3_000);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    settle(&mut lc, &mut host, &mut table);
    assert_eq!(table.n(&pk, &["n"]), Some(3), "what was used stays counted");
    assert_eq!(table.n(&pk, &[&gw, "q"]), Some(0));
}

#[test]
fn budgets_turn_with_the_calendar() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    // A second before the new year, UTC.
    let eve = (days_from_civil(2027, 1, 1) as u64 * 86_400 - 1) * 1000;
    host.advance(eve - host.now_ms());
    let mut lc = warm(&mut host);
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let tok = jwt::mint("k1", &k, &format!(r#"{{"sub":"lambda/team-a","aud":"keyward","exp":{},"jti":"b-1","allow":["stripe * /**"]}}"#, eve / 1000 + 300));
    let pay = |lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId| {
        let body = "amount=100&currency=usd";
        assert_eq!(pay_headers(lc, host, ctx, &tok, body, &[]), Action::Continue);
        lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true })
    };
    assert_eq!(pay(&mut lc, &mut host, 10), Action::Pause);
    assert!(settle(&mut lc, &mut host, &mut table).contains(&Effect::Resume(10)));
    assert!(table.items.contains_key("b/team/2026-12"), "an uncapped credential is still counted in its team's budget");
    host.advance(1000);
    assert_eq!(pay(&mut lc, &mut host, 11), Action::Pause, "a new month: a new budget window");
    assert!(settle(&mut lc, &mut host, &mut table).contains(&Effect::Resume(11)));
    assert!(table.items.contains_key("b/team/2027-01"));
}

#[test]
fn a_budget_caps_the_team_across_credentials() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let mut paid = 0;
    for i in 0..8u32 {
        let tok = jwt::mint(
            "k1",
            &k,
            &format!(r#"{{"sub":"lambda/team-{i}","aud":"keyward","exp":{},"jti":"bt-{i}","allow":["stripe * /**"]}}"#, host.now_ms() / 1000 + 300),
        );
        let body = "amount=1000&currency=usd";
        let ctx = 10 + i;
        assert_eq!(pay_headers(&mut lc, &mut host, ctx, &tok, body, &[]), Action::Continue);
        lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx, size: body.len(), end: true });
        let effects = settle(&mut lc, &mut host, &mut table);
        if effects.contains(&Effect::Resume(ctx)) {
            paid += 1000;
        } else {
            assert_eq!(replies(&effects), vec![(ctx, 429, "spend_exhausted".into())]);
            assert!(host.streams[&ctx].reply_body.as_deref().is_some_and(|b| b.contains("budget")));
            // No other gateway holds a lease to give back: room comes back with the next month.
            let month_end = crate::ledger::budget::Window::Month.at(host.now_ms() / 1000).1;
            let retry = host.streams[&ctx].reply_headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
            assert_eq!(retry, Some((month_end - host.now_ms() / 1000).to_string()));
        }
        host.advance(slice::NO_ROOM_MS);
    }
    assert_eq!(paid, 5000, "the team's 5000 a month, across eight credentials");
}

/// A team credential's keyed payment of `amount` on stream `ctx`, decided with the ledger
/// answering from `table`: its effects.
fn team_pay(lc: &mut Lifecycle, host: &mut MemHost, table: &mut Table, ctx: ContextId, tok: &str, amount: u64, key: &str) -> Vec<Effect> {
    let body = format!("amount={amount}&currency=usd");
    let keys: Vec<(&str, &str)> = if key.is_empty() { vec![] } else { vec![("idempotency-key", key)] };
    assert_eq!(pay_headers(lc, host, ctx, tok, &body, &keys), Action::Continue);
    lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true });
    settle(lc, host, table)
}

fn team_token(host: &MemHost, jti: &str, lim: &str) -> String {
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    jwt::mint(
        "k1",
        &k,
        &format!(r#"{{"sub":"lambda/team-a","aud":"keyward","exp":{},"jti":"{jti}","allow":["stripe * /**"]{lim}}}"#, host.now_ms() / 1000 + 300),
    )
}

/// A keyed payment the budget refuses leaves no retry mark behind: its retry, on any gateway, is
/// refused by the budget too, never let through as "already charged".
#[test]
fn a_payment_the_budget_refuses_leaves_no_mark_for_its_retry() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let tok = team_token(&host, "race-1", r#","lim":{"spend":1000000}"#);
    let effects = team_pay(&mut lc, &mut host, &mut table, 10, &tok, 5000, "fill");
    assert!(effects.contains(&Effect::Resume(10)), "the team's whole budget");
    host.advance(slice::NO_ROOM_MS);
    let effects = team_pay(&mut lc, &mut host, &mut table, 11, &tok, 10, "race-key");
    assert_eq!(replies(&effects), vec![(11, 429, "spend_exhausted".into())]);
    let pk = account_pk("race-1");
    // Never, not even for a moment: a mark there while its charge waits to be undone would let a
    // retry on another gateway through as "already charged", past the budget.
    assert_eq!(table.marks_seen.len(), 1, "only the admitted payment's mark was ever in the ledger");
    assert_eq!(table.n(&pk, &["s"]), Some(5000), "the refused payment charged nothing");
    host.advance(slice::NO_ROOM_MS);
    let effects = team_pay(&mut lc, &mut host, &mut table, 12, &tok, 10, "race-key");
    assert_eq!(replies(&effects), vec![(12, 429, "spend_exhausted".into())], "its retry is refused by the budget as well");
}

/// More than the cap itself is refused at once, with no ledger call, even on an account the
/// ledger has never seen (where DynamoDB's `attribute_not_exists` would let any amount in).
#[test]
fn a_charge_larger_than_the_cap_is_refused_without_asking_the_ledger() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    for (i, (lim, amount, key)) in
        [(r#"{"spend":10000}"#, 1_000_000, "big"), (r#"{"spend":0}"#, 5000, "zero"), (r#"{"spend":0}"#, 5000, "")].into_iter().enumerate()
    {
        let jti = format!("cap-{i}");
        let t = capped(&host, &jti, lim, "");
        let ctx = 20 + i as u32;
        let body = format!("amount={amount}&currency=usd");
        let keys: Vec<(&str, &str)> = if key.is_empty() { vec![] } else { vec![("idempotency-key", key)] };
        assert_eq!(pay_headers(&mut lc, &mut host, ctx, &t, &body, &keys), Action::Continue);
        lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx, size: body.len(), end: true });
        let effects = host.take();
        assert!(ledger_calls(&host, &effects).is_empty(), "{lim} {amount}: no ledger call");
        assert_eq!(replies(&effects), vec![(ctx, 429, "spend_exhausted".into())], "{lim} {amount}");
        assert!(!table.items.contains_key(&account_pk(&jti)));
    }
    let _ = &mut table;
}

/// The ledger's own conditions hold the cap too: a charge larger than it fits nowhere.
#[test]
fn the_ledgers_condition_refuses_more_than_the_cap_on_a_new_item() {
    let mut table = Table::default();
    let l = ledger_config().ledger.unwrap_or_else(|| panic!("ledger"));
    let account = crate::ledger::Account::credential(1, "new", crate::ledger::Caps { spend: Some(100), count: None }, 2_000_000_000);
    let change = crate::ledger::dynamo::Change::Direct {
        amounts: crate::ledger::Amounts { spend: 101, count: 0 },
        mark: crate::ledger::Mark::new(format!("r_{}", "a".repeat(32)), 1, 7),
        prune: vec![],
    };
    let call = crate::ledger::dynamo::update(&l, &account, &change);
    let answer = table.serve(&call);
    assert_eq!(answer.status, Some(400), "refused: {:?}", answer.body.as_deref().map(String::from_utf8_lossy));
    assert!(!table.items.contains_key(&account.pk));
}

/// An answer that does not carry the change (`{}`, or an item without the mark) is not a
/// charge made: 503, never admitted.
#[test]
fn a_direct_charge_answered_without_its_mark_is_503_not_admitted() {
    for (n, hollow) in ["{}", r#"{"Attributes":{}}"#].into_iter().enumerate() {
        let mut host = MemHost::new(ROOT);
        let mut lc = warm(&mut host);
        let ctx = 30 + n as u32;
        let t = capped(&host, "hollow", r#"{"spend":10000}"#, "");
        let body = "amount=500&currency=usd";
        assert_eq!(pay_headers(&mut lc, &mut host, ctx, &t, body, &[("idempotency-key", "k")]), Action::Continue);
        assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx, size: body.len(), end: true }), Action::Pause);
        let mut effects = host.take();
        if effects.contains(&Effect::WakeRoot) {
            lc.handle(host.now_us(), &mut host, Event::Woken);
            effects = host.take();
        }
        let (call, op, _) = ledger_calls(&host, &effects).into_iter().next().unwrap_or_else(|| panic!("a ledger call"));
        assert_eq!(op, "UpdateItem");
        lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: Answer { status: Some(200), body: Some(hollow.as_bytes().to_vec()) } });
        let mut effects = host.take();
        if effects.contains(&Effect::WakeRoot) {
            lc.handle(host.now_us(), &mut host, Event::Woken);
            effects.extend(host.take());
        }
        // Not an answer it can trust: it reads the item back, finds no charge of its own there.
        let (read, op, _) = ledger_calls(&host, &effects).into_iter().next().unwrap_or_else(|| panic!("a read-back"));
        assert_eq!(op, "GetItem");
        lc.handle(host.now_us(), &mut host, Event::Answer { call: read, answer: Answer { status: Some(200), body: Some(b"{}".to_vec()) } });
        let mut effects = host.take();
        if effects.contains(&Effect::WakeRoot) {
            lc.handle(host.now_us(), &mut host, Event::Woken);
            effects.extend(host.take());
        }
        assert_eq!(replies(&effects), vec![(ctx, 503, "secret_unavailable".into())], "{hollow}");
    }
}

/// Two configurations in one VM (two listeners, or an update's old and new one, here with
/// different key sets) are two gateways in the ledger: each leases for itself, so one lease is
/// never spent by both.
#[test]
fn two_configurations_in_one_vm_are_two_gateways() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut a = warm(&mut host);
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}},"k2":{{"env":"KEYWARD_KEY_K2"}}}},"stores":{{"bao":{BAO}}},
        "cache":{{"ttl_s":300}},"targets":{{{TARGETS}}}{LEDGER}}}"#
    );
    let other = compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
    let mut b = worker(&mut host, other);
    let t = capped(&host, "both", r#"{"total":10}"#, "");
    assert_eq!(get(&mut a, &mut host, 40, &t), Action::Pause);
    settle(&mut a, &mut host, &mut table);
    host.open(41, "stripe", &[(":method", "GET"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {t}"))]);
    b.handle(host.now_us(), &mut host, Event::Request(41));
    settle(&mut b, &mut host, &mut table);
    let pk = account_pk("both");
    let leases: Vec<&String> = table.items[&pk].keys().filter(|k| k.starts_with("l_")).collect();
    assert_eq!(leases.len(), 2, "one lease per configuration: {leases:?}");
    assert!(table.n(&pk, &["n"]).unwrap_or(0) <= 10);
}

/// An account's retry marks do not grow without end: those past their time go with the next
/// direct charge, and while it holds the most it may, charges go through the slice instead.
#[test]
fn retry_marks_are_pruned_and_bounded() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "marks", r#"{"spend":1000000}"#, "");
    let pk = account_pk("marks");
    let now_s = host.now_ms() / 1000;
    let mut item: super::table::Item = [("pk".to_string(), Attr::S(pk.clone())), ("s".into(), Attr::N(0))].into_iter().collect();
    for i in 0..20 {
        item.insert(format!("r_{i:032x}"), Attr::N(i128::from(now_s) - 10)); // past their time
    }
    table.items.insert(pk.clone(), item);
    // Admitted: resumed after the ledger answered, or let through at once.
    let pay = |lc: &mut Lifecycle, host: &mut MemHost, table: &mut Table, ctx: ContextId, key: &str| -> bool {
        let body = "amount=10&currency=usd";
        assert_eq!(pay_headers(lc, host, ctx, &t, body, &[("idempotency-key", key)]), Action::Continue);
        let now = lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true });
        now == Action::Continue || settle(lc, host, table).contains(&Effect::Resume(ctx))
    };
    let marks = |table: &Table| table.items[&pk].keys().filter(|k| k.starts_with("r_")).count();
    assert!(pay(&mut lc, &mut host, &mut table, 50, "a"));
    assert_eq!(marks(&table), 21, "the first charge learns which marks are past their time");
    assert!(pay(&mut lc, &mut host, &mut table, 51, "b"));
    assert_eq!(marks(&table), 6, "the next one removes sixteen of them");
    // An account at the most marks it may hold: the next keyed charge goes through the slice.
    let until = i128::from(now_s + 3600);
    if let Some(i) = table.items.get_mut(&pk) {
        for n in 0..crate::ledger::dynamo::MAX_MARKS {
            i.insert(format!("r_{:032x}", 1000 + n), Attr::N(until));
        }
    }
    assert!(pay(&mut lc, &mut host, &mut table, 52, "c"));
    let before = marks(&table);
    assert!(pay(&mut lc, &mut host, &mut table, 53, "d"));
    assert_eq!(marks(&table), before, "no new mark");
    assert!(table.items[&pk].keys().any(|k| k.starts_with("l_")), "charged from a slice");
}

/// A worker that ticks only when it is next woken (the native executor's idle worker) sees its
/// grant fail long after the call's deadline, while another worker, which asked again since,
/// has a top-up in flight. That stale failure is the past: it neither frees the other worker's
/// call nor blocks the slice, so a request that finds the slice spent waits for the top-up
/// instead of being refused 503.
#[test]
fn a_failure_seen_after_another_worker_asked_again_neither_blocks_nor_frees_its_call() {
    let (mut h1, mut w1, mut h2, mut w2) = two_workers();
    let mut table = Table::default();
    let t = capped(&h1, "l-late", r#"{"total":1000}"#, "");
    // Worker 1 asks for the first lease; no answer yet.
    assert_eq!(get(&mut w1, &mut h1, 10, &t), Action::Pause);
    w1.handle(h1.now_us(), &mut h1, Event::Woken);
    let (stale, _, _) = calls(&mut h1).pop().unwrap_or_else(|| panic!("a grant"));
    // Past that call's deadline, worker 2 asks again and is granted the lease.
    h2.advance(500 + CALL_GRACE_MS + 10);
    assert_eq!(get(&mut w2, &mut h2, 20, &t), Action::Pause);
    let effects = settle(&mut w2, &mut h2, &mut table);
    assert!(effects.contains(&Effect::Resume(20)), "{effects:?}");
    // Worker 2 spends it and asks for a top-up, still in flight.
    let mut ctx = 21;
    while get(&mut w2, &mut h2, ctx, &t) == Action::Continue {
        ctx += 1;
    }
    w2.handle(h2.now_us(), &mut h2, Event::Woken);
    let (top_up, _, _) = calls(&mut h2).pop().unwrap_or_else(|| panic!("a top-up"));
    // Worker 1 is woken now, and sees Envoy's timeout of its first call.
    w1.handle(h1.now_us(), &mut h1, Event::Answer { call: stale, answer: Answer { status: None, body: None } });
    assert!(replies(&h1.take()).is_empty(), "its request waits for worker 2's call, not refused");
    // So does a new one.
    assert_eq!(get(&mut w1, &mut h1, 11, &t), Action::Pause);
    assert!(replies(&h1.take()).is_empty(), "not refused: the ledger has answered since");
    let answer = table.serve(&h2.sent[&top_up]);
    w2.handle(h2.now_us(), &mut h2, Event::Answer { call: top_up, answer });
    assert!(h2.take().contains(&Effect::Resume(ctx)));
    h1.advance(20);
    w1.handle(h1.now_us(), &mut h1, Event::Tick);
    let effects = h1.take();
    assert!(effects.contains(&Effect::Resume(10)) && effects.contains(&Effect::Resume(11)), "worker 1's requests go on from the topped-up slice: {effects:?}");
}

/// A worker with no event to tick on (a native worker with no request) still has its ended lease
/// given back: by any worker that ticks, the main thread's included.
#[test]
fn a_lease_whose_worker_sleeps_is_given_back_by_another_worker() {
    let (mut h1, mut w1, mut h2, mut w2) = two_workers();
    let mut table = Table::default();
    let t = capped(&h1, "l-sleep", r#"{"total":100}"#, "");
    let pk = account_pk("l-sleep");
    assert_eq!(get(&mut w1, &mut h1, 10, &t), Action::Pause);
    settle(&mut w1, &mut h1, &mut table);
    let gw = format!("l_{}", gateway(&h1));
    assert!(table.n(&pk, &["n"]).unwrap_or(0) > 1, "a slice of several requests");
    // Worker 1 sleeps; worker 2, which never served this credential, ticks past the lease's end.
    h2.advance(11_000);
    w2.handle(h2.now_us(), &mut h2, Event::Tick);
    settle(&mut w2, &mut h2, &mut table);
    assert_eq!(table.n(&pk, &["n"]), Some(1), "what was not used went back");
    assert_eq!(table.n(&pk, &[&gw, "q"]), Some(0), "the lease ended");
}

/// The drain waits for the return it asked for, but a ledger that never answers gets it a 200
/// that says what is still held (the entrypoint asks again, within its own time), never a 503.
#[test]
fn a_drain_whose_return_is_never_answered_says_what_is_still_held() {
    let mut host = MemHost::new(ROOT);
    let mut table = Table::default();
    let mut lc = warm(&mut host);
    let t = capped(&host, "l-hang", r#"{"total":100}"#, "");
    assert_eq!(get(&mut lc, &mut host, 10, &t), Action::Pause);
    settle(&mut lc, &mut host, &mut table);
    host.open_route(31, &[("endpoint", "drain")], &[(":method", "POST"), (":path", "/keyward/drain")]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(31)), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let (call, _, _) = calls(&mut host).pop().unwrap_or_else(|| panic!("a return"));
    // Refused late (the lease is not as the return counted it): a read follows, never answered,
    // and the drain's own time runs out first.
    host.advance(900);
    let refused = Answer { status: Some(400), body: Some(br#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"}"#.to_vec()) };
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: refused });
    assert_eq!(calls(&mut host).len(), 1, "the read");
    assert!(replies(&host.take()).is_empty());
    host.advance(700);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert_eq!(replies(&host.take()), vec![(31, 200, String::new())]);
    let body = host.streams[&31].reply_body.clone().unwrap_or_default();
    assert!(body.ends_with(r#""held":1}"#), "{body}");
}
