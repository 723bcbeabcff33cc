//! Every way a request can end, and the invariant behind them: a request goes on only once it is
//! decided and allowed. Trailers end a body like its last data frame; a stream the lifecycle never
//! decided is refused and counted, never let through; a free request whose body names a priced
//! method is priced; a parent and its children, whatever keys signed them, never get past the
//! parent's limits in any interleaving.

use super::spend::{capped, pay_headers, spent, state, warm_worker, TARGETS};
use super::*;
use crate::policy::limits::Table;
use crate::secrets::keys;

#[test]
fn trailers_end_a_priced_body() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "tr-1", r#"{"spend":1000}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, "amount=5000&currency=usd", &[]), Action::Continue);
    assert_eq!(lc.stream(10).map(Stream::name), Some("pricing"));
    assert_eq!(state(&host, 10, "keyward.subject").as_deref(), Some("lambda/pay"), "who asked is recorded with the headers");
    assert_eq!(state(&host, 10, "keyward.jti").as_deref(), Some("tr-1"));
    // The last data frame does not say it is the last: the trailers do.
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: 24, end: false }), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(10)), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 429, "spend_exhausted".into())]);
    assert_eq!(state(&host, 10, "keyward.decision").as_deref(), Some("spend_exhausted"));
    // What fits is reserved at the trailers, and goes on by a resume from the root: the body
    // held here passes before the trailers, whatever Envoy had buffered before.
    assert_eq!(pay_headers(&mut lc, &mut host, 11, &t, "amount=600&currency=usd", &[]), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 11, size: 23, end: false }), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(11)), Action::Pause);
    assert_eq!(spent(&host, "tr-1"), 600);
    assert_eq!(lc.stream(11).map(Stream::name), Some("allowed"));
    assert_eq!(host.take(), vec![Effect::WakeRoot]);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    assert!(host.take().contains(&Effect::Resume(11)));
    // A stream that went away meanwhile is not resumed.
    assert_eq!(pay_headers(&mut lc, &mut host, 12, &t, "amount=1&currency=usd", &[]), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(12)), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(12));
    host.close(12);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    assert!(!host.take().contains(&Effect::Resume(12)));
}

#[test]
fn a_body_ended_by_trailers_is_read_up_to_the_bound() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let t = capped(&host, "tr-2", r#"{"spend":1000}"#, "");
    let big = format!("amount=1&currency=usd&d={}", "x".repeat(300));
    assert_eq!(pay_headers(&mut lc, &mut host, 10, &t, &big, &[]), Action::Continue);
    // Envoy never said how much was buffered: the trailers arrive with all of it.
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(10)), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 413, "body_too_large".into())]);
    assert_eq!(spent(&host, "tr-2"), 0);
}

#[test]
fn a_stream_never_decided_is_refused_and_counted_never_let_through() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    // Body and trailer events for streams the lifecycle has no decision for.
    host.open(20, "stripe", &[(":method", "POST"), (":path", "/v1/x")]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 20, size: 10, end: true }), Action::Pause);
    host.open(21, "stripe", &[(":method", "POST"), (":path", "/v1/x")]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(21)), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(20, 503, "secret_unavailable".into()), (21, 503, "secret_unavailable".into())]);
    assert_eq!(host.count(Metric::Undecided), 2);
    // A refused request stays refused: its later parts go nowhere.
    let t = capped(&host, "tr-3", r#"{"spend":10}"#, "");
    assert_eq!(pay_headers(&mut lc, &mut host, 22, &t, "amount=abc&currency=usd", &[]), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 22, size: 23, end: true }), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(22, 400, "bad_request".into())]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 22, size: 30, end: true }), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(22)), Action::Pause);
    assert_eq!(host.count(Metric::Undecided), 2, "answered is decided");
    assert!(host.take().is_empty());
}

#[test]
fn the_issuing_endpoint_reads_a_body_ended_by_trailers() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, r#","issuer":{"kid":"k1","max_ttl_s":600,"attenuate":true}"#));
    let parent = token(host.now_ms());
    let body = r#"{"grant":"attenuate","allow":["stripe GET /v1/charges"],"ttl_s":60}"#;
    let bearer = format!("Bearer {parent}");
    host.open_route(
        10,
        &[("endpoint", "issue")],
        &[(":method", "POST"), (":path", "/keyward/v1/credentials"), ("content-type", "application/json"), ("authorization", &bearer)],
    );
    if let Some(s) = host.streams.get_mut(&10) {
        s.body = body.as_bytes().to_vec();
    }
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(10)), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 10, size: body.len(), end: false }), Action::Pause);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestTrailers(10)), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 200, String::new())]);
    assert_eq!(host.count(Metric::Issued), 1);
    assert!(!host.take().contains(&Effect::WakeRoot), "answered: nothing to resume");
}

#[test]
fn a_free_request_whose_body_names_a_priced_method_is_priced() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm_worker(&mut host);
    let get = |t: &str| {
        vec![(":method", "GET"), (":path", "/v1/payment_intents"), ("content-type", "application/x-www-form-urlencoded")]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .chain([("authorization", format!("Bearer {t}"))])
            .collect::<Vec<_>>()
    };
    let t = capped(&host, "fr-1", r#"{"spend":100,"total":5}"#, "");
    for (ctx, body, want) in [
        (10, "_method=POST&amount=60&currency=usd", Some(Action::Continue)),
        (11, "_method=POST&amount=41&currency=usd", None),
        (12, "q=1", Some(Action::Continue)),
    ] {
        let h = get(&t);
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        host.open(ctx, "stripe", &h);
        if let Some(s) = host.streams.get_mut(&ctx) {
            s.body = body.as_bytes().to_vec();
        }
        assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(ctx)), Action::Continue, "a free request with a body is read too");
        let got = lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx, size: body.len(), end: true });
        match want {
            Some(a) => assert_eq!(got, a, "{body}"),
            None => assert_eq!(replies(&host.take()), vec![(ctx, 429, "spend_exhausted".into())], "{body}"),
        }
    }
    assert_eq!(spent(&host, "fr-1"), 60, "priced as the POST it asked for; a plain read costs nothing");
    let id = HmacKey::new(K1).map(|k| k.id()).unwrap_or_default();
    let entry = keys::limit_entry(id, "fr-1");
    let used = host.shared_value(&keys::limit_shard(&entry)).and_then(|b| Table::decode(&b)).map_or(0, |t| t.used(&entry));
    assert_eq!(used, 2, "the free read is counted at its body's end, the refused one not at all");
    // A method no rule allows, named in the body, is refused like the override headers.
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let narrow = jwt::mint(
        "k1",
        &k,
        &format!(r#"{{"sub":"s","aud":"keyward","exp":{},"jti":"fr-2","allow":["stripe GET /**","stripe POST /**"]}}"#, host.now_ms() / 1000 + 60),
    );
    let h = get(&narrow);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    host.open(13, "stripe", &h);
    if let Some(s) = host.streams.get_mut(&13) {
        s.body = b"_method=DELETE".to_vec();
    }
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(13)), Action::Continue);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx: 13, size: 14, end: true }), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(13, 403, "forbidden".into())]);
}

#[test]
fn a_parent_and_its_children_never_exceed_the_parents_limits_in_any_interleaving() {
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}},"k2":{{"env":"KEYWARD_KEY_K2"}}}},"stores":{{"bao":{BAO}}},
        "cache":{{"ttl_s":300}},"targets":{{{TARGETS}}}}}"#
    );
    let cfg = || compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
    let (k1, k2) = (HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}")), HmacKey::new(K2).unwrap_or_else(|e| panic!("{e}")));
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut h1 = MemHost::new(ROOT);
        let mut h2 = h1.worker(2);
        let mut workers = [worker(&mut h1, cfg()), worker(&mut h2, cfg())];
        // Warm both workers' caches.
        for (i, (lc, host)) in workers.iter_mut().zip([&mut h1, &mut h2]).enumerate() {
            let ctx = 5 + i as ContextId;
            if send_request(lc, host, ctx) == Action::Pause {
                lc.handle(host.now_us(), host, Event::Woken);
                let call = only_call(&host.take());
                lc.handle(host.now_us(), host, Event::Answer { call, answer: stripe_answer() });
            }
            host.take();
        }
        let (cap, total) = (1 + rng.below(5000), 1 + rng.below(12));
        let now_s = h1.now_ms() / 1000;
        let parent_lim = format!(r#"{{"spend":{cap},"total":{total}}}"#);
        let mut tokens = vec![jwt::mint(
            "k1",
            &k1,
            &format!(r#"{{"sub":"p","aud":"keyward","exp":{},"jti":"parent","allow":["stripe * /**"],"lim":{parent_lim}}}"#, now_s + 300),
        )];
        for c in 0..1 + rng.below(4) {
            // A child's own limits are within the parent's; it carries the parent's as plim.
            let own = format!(r#"{{"spend":{},"total":{}}}"#, 1 + rng.below(cap), 1 + rng.below(total));
            tokens.push(jwt::mint(
                "k2",
                &k2,
                &format!(
                    r#"{{"sub":"p","aud":"keyward","exp":{},"jti":"child-{c}","allow":["stripe * /**"],"lim":{own},"par":"parent","plim":{parent_lim},"pkid":"k1"}}"#,
                    now_s + 300
                ),
            ));
        }
        let (mut allowed, mut allowed_spend) = (0u64, 0u64);
        for n in 0..40u32 {
            let tok = tokens[rng.below(tokens.len() as u64) as usize].clone();
            let amount = rng.below(cap / 2 + 2);
            let body = format!("amount={amount}&currency=usd");
            let w = rng.below(2) as usize;
            let (lc, host) = if w == 0 { (&mut workers[0], &mut h1) } else { (&mut workers[1], &mut h2) };
            let ctx = 100 + n;
            assert_eq!(pay_headers(lc, host, ctx, &tok, &body, &[]), Action::Continue);
            host.current = ctx;
            if lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true }) == Action::Continue {
                allowed += 1;
                allowed_spend += amount;
            } else {
                let r = replies(&host.take());
                assert!(matches!(r.as_slice(), [(_, 429, c)] if c == "spend_exhausted" || c == "quota_exhausted"), "seed {seed}: {r:?}");
            }
            host.take();
        }
        assert!(allowed_spend <= cap, "seed {seed}: {allowed_spend} spent of a parent's {cap}");
        assert!(allowed <= total, "seed {seed}: {allowed} requests of a parent's {total}");
        let entry = keys::limit_entry(k1.id(), "parent");
        let table = h1.shared_value(&keys::limit_shard(&entry)).and_then(|b| Table::decode(&b)).unwrap_or_default();
        assert_eq!((table.spent(&entry), table.used(&entry)), (allowed_spend, allowed), "seed {seed}: one entry holds them all");
    }
}

#[test]
fn a_parents_budget_outlives_the_children_that_spent_it() {
    let json = format!(
        r#"{{"audience":"keyward","clock_skew_s":30,"signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}},"k2":{{"env":"KEYWARD_KEY_K2"}}}},"stores":{{"bao":{BAO}}},
        "cache":{{"ttl_s":300}},"targets":{{{TARGETS}}}}}"#
    );
    let cfg = compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, cfg);
    if send_request(&mut lc, &mut host, 5) == Action::Pause {
        lc.handle(host.now_us(), &mut host, Event::Woken);
        let call = only_call(&host.take());
        lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    }
    host.take();
    let k2 = HmacKey::new(K2).unwrap_or_else(|e| panic!("{e}"));
    let now_s = host.now_ms() / 1000;
    // The parent lives an hour; each child a second.
    let child = |n: u32, now_s: u64| {
        jwt::mint(
            "k2",
            &k2,
            &format!(
                r#"{{"sub":"p","aud":"keyward","exp":{},"jti":"c-{n}","allow":["stripe * /**"],"par":"p-9","plim":{{"spend":1000}},"pkid":"k1","pexp":{}}}"#,
                now_s + 1,
                now_s + 3600
            ),
        )
    };
    let pay1 = |lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, tok: &str| {
        assert_eq!(pay_headers(lc, host, ctx, tok, "amount=1000&currency=usd", &[]), Action::Continue);
        lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: 24, end: true })
    };
    assert_eq!(pay1(&mut lc, &mut host, 10, &child(1, now_s)), Action::Continue);
    // Long after the first child (and its clock skew) ended, a new child finds the budget spent.
    host.advance(120_000);
    let later = host.now_ms() / 1000;
    assert_eq!(pay1(&mut lc, &mut host, 11, &child(2, later)), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(11, 429, "spend_exhausted".into())]);
}
