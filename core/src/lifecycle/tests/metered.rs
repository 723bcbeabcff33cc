//! Model calls priced from their usage across events: the bound reserved at the body's end, the
//! answer read as it passes (JSON or server-sent events, in parts, ended by its last part or its
//! trailers), the usage charged and the rest released; and every way the usage can go unread
//! keeping the whole reservation.

use super::spend::{answer, spent, state};
use super::*;

// One unit per input token, two per output token (prices per million tokens); a small overhead
// so bounds are easy to count.
const TARGETS: &str = r#"
    "ai":{"credential":"bearer","secret":{"store":"bao","path":"stripe","field":"api_key"},"inject":{"type":"bearer"},
          "cost":{"usage":"openai","models":{"m1":{"input":1000000,"output":2000000}},"max_tokens":50,"input_overhead_tokens":10,
                  "free":["GET /**"]},
          "refund_on":[429]},
    "claude":{"credential":"bearer","secret":{"store":"bao","path":"stripe","field":"api_key"},"inject":{"type":"bearer"},
          "cost":{"usage":"anthropic","models":{"c1":{"input":1000000,"output":2000000,"cached_input":100000,"cache_write":1250000}},
                  "input_overhead_tokens":0}}"#;

fn ai_config() -> Config {
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}}}},"stores":{{"bao":{BAO}}},
        "cache":{{"ttl_s":300}},"targets":{{{TARGETS}}}}}"#
    );
    compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

fn token_for(host: &MemHost, jti: &str, lim: &str, extra: &str) -> String {
    let k = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    let claims = format!(
        r#"{{"sub":"agent/a","aud":"keyward","exp":{},"jti":"{jti}","allow":["ai * /**","claude * /**"],"lim":{lim}{extra}}}"#,
        host.now_ms() / 1000 + 300
    );
    jwt::mint("k1", &k, &claims)
}

fn warm(host: &mut MemHost) -> Lifecycle {
    let mut lc = worker(host, ai_config());
    let t = token_for(host, "warm", "{}", "");
    host.open(9, "ai", &[(":method", "GET"), (":path", "/v1/models"), ("authorization", &format!("Bearer {t}"))]);
    if lc.handle(host.now_us(), host, Event::Request(9)) != Action::Continue {
        lc.handle(host.now_us(), host, Event::Woken);
        let call = only_call(&host.take());
        lc.handle(host.now_us(), host, Event::Answer { call, answer: stripe_answer() });
    }
    host.take();
    lc
}

/// A model call's headers and whole body on stream `ctx`.
fn call(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, target: &str, tok: &str, body: &str) -> Action {
    let auth = format!("Bearer {tok}");
    let path = if target == "claude" { "/v1/messages" } else { "/v1/chat/completions" };
    let length = body.len().to_string();
    host.open(
        ctx,
        target,
        &[
            (":method", "POST"),
            (":path", path),
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-length", &length),
            ("accept-encoding", "gzip, br"),
        ],
    );
    if let Some(s) = host.streams.get_mut(&ctx) {
        s.body = body.as_bytes().to_vec();
    }
    assert_eq!(lc.handle(host.now_us(), host, Event::Request(ctx)), Action::Continue);
    host.current = ctx;
    lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true })
}

/// The vendor's answer: headers, then the body in parts of `part` bytes (`end`: the last part
/// says so; otherwise trailers end it).
fn respond(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, headers: &[(&str, &str)], body: &str, part: usize, end: bool) {
    if let Some(s) = host.streams.get_mut(&ctx) {
        s.response = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
    }
    host.current = ctx;
    lc.handle(host.now_us(), host, Event::Response(ctx));
    let parts: Vec<&[u8]> = body.as_bytes().chunks(part.max(1)).collect();
    for (i, p) in parts.iter().enumerate() {
        if let Some(s) = host.streams.get_mut(&ctx) {
            s.response_body = p.to_vec();
        }
        lc.handle(host.now_us(), host, Event::ResponseBody { ctx, size: p.len(), end: end && i + 1 == parts.len() });
    }
    if !end {
        lc.handle(host.now_us(), host, Event::ResponseTrailers(ctx));
    }
}

/// A streamed answer that begins with `events` (not its end), then the stream goes away.
fn stream_then_leave(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, events: &str) {
    if let Some(s) = host.streams.get_mut(&ctx) {
        s.response = SSE.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        s.response_body = events.as_bytes().to_vec();
    }
    host.current = ctx;
    lc.handle(host.now_us(), host, Event::Response(ctx));
    lc.handle(host.now_us(), host, Event::ResponseBody { ctx, size: events.len(), end: false });
    lc.handle(host.now_us(), host, Event::StreamGone(ctx));
}

const JSON: [(&str, &str); 2] = [(":status", "200"), ("content-type", "application/json")];
const SSE: [(&str, &str); 2] = [(":status", "200"), ("content-type", "text/event-stream; charset=utf-8")];

fn chat(max_tokens: u64) -> String {
    format!(r#"{{"model":"m1","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// The bound of `body` at one unit per input byte (plus 10) and two per output token.
fn bound(body: &str, max_tokens: u64) -> u64 {
    body.len() as u64 + 10 + 2 * max_tokens
}

#[test]
fn a_json_answer_charges_its_usage_and_releases_the_rest() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-1", r#"{"spend":1000}"#, "");
    let body = chat(40);
    assert_eq!(call(&mut lc, &mut host, 10, "ai", &t, &body), Action::Continue);
    let b = bound(&body, 40);
    assert_eq!(spent(&host, "ai-1"), b, "the bound is reserved before the call");
    assert_eq!(state(&host, 10, "keyward.model").as_deref(), Some("m1"));
    assert_eq!(state(&host, 10, "keyward.reserved"), Some(b.to_string()));
    let accept = host.streams.get(&10).and_then(|s| s.request.iter().find(|(k, _)| k == "accept-encoding").map(|(_, v)| v.clone()));
    assert_eq!(accept.as_deref(), Some(&b"identity"[..]), "the answer must come readable");
    let answer = r#"{"id":"c","choices":[{"message":{"content":"yo"}}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
    respond(&mut lc, &mut host, 10, &JSON, answer, 16, true);
    assert_eq!(spent(&host, "ai-1"), 12 + 14, "charged what it used");
    assert_eq!(state(&host, 10, "keyward.cost").as_deref(), Some("26"));
    assert_eq!(state(&host, 10, "keyward.tokens_in").as_deref(), Some("12"));
    assert_eq!(state(&host, 10, "keyward.tokens_out").as_deref(), Some("7"));
    assert_eq!(state(&host, 10, "keyward.usage").as_deref(), Some("read"));
    assert_eq!(host.counts.get("keyward_tokens_total;target=ai;model=m1;kind=output"), Some(&7));
    assert_eq!(host.counts.get("keyward_usage_cost_total;target=ai;model=m1"), Some(&26));
    assert_eq!(host.counts.get("keyward_spend_released_total;target=ai"), Some(&(b - 26)));
}

#[test]
fn a_stream_is_read_in_any_split_and_trailers_end_it() {
    for (part, end) in [(1, true), (7, false), (4096, true)] {
        let mut host = MemHost::new(ROOT);
        let mut lc = warm(&mut host);
        let t = token_for(&host, "ai-2", r#"{"spend":100000}"#, "");
        let body = r#"{"model":"c1","max_tokens":100,"stream":true,"messages":[]}"#;
        assert_eq!(call(&mut lc, &mut host, 10, "claude", &t, body), Action::Continue);
        assert_eq!(spent(&host, "ai-2"), body.len() as u64 * 2 + 200, "the dearest input price bounds the body (a write for an hour: twice the input)");
        let events = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":1000,\"cache_creation_input_tokens\":8,\"output_tokens\":1}}}\n\n\
                      event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hello\"}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\n\n\
                      event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        respond(&mut lc, &mut host, 10, &SSE, events, part, end);
        // 20 + 1000 × 0.1 + 8 × 1.25 + 30 × 2 = 190.
        assert_eq!(spent(&host, "ai-2"), 190, "part {part}");
        assert_eq!(state(&host, 10, "keyward.tokens_in").as_deref(), Some("1028"));
    }
}

#[test]
fn an_answer_whose_usage_cannot_be_read_keeps_the_whole_reservation() {
    let no_usage = r#"{"id":"c","choices":[]}"#;
    let usage = r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, bool);
    let cases: [Case; 5] = [
        ("no usage", &JSON, no_usage, false),
        ("malformed", &JSON, "{\"usage\":{\"prompt_tokens\":1,", false),
        ("compressed", &[(":status", "200"), ("content-type", "application/json"), ("content-encoding", "gzip")], usage, false),
        ("an error without usage", &[(":status", "500"), ("content-type", "application/json")], r#"{"error":{}}"#, false),
        ("made by Envoy", &JSON, usage, true),
    ];
    for (what, headers, answer, local) in cases {
        let mut host = MemHost::new(ROOT);
        let mut lc = warm(&mut host);
        let t = token_for(&host, "ai-3", r#"{"spend":1000}"#, "");
        let body = chat(40);
        assert_eq!(call(&mut lc, &mut host, 10, "ai", &t, &body), Action::Continue);
        if let Some(s) = host.streams.get_mut(&10) {
            s.local_response = local;
        }
        respond(&mut lc, &mut host, 10, headers, answer, 5, true);
        assert_eq!(spent(&host, "ai-3"), bound(&body, 40), "{what}");
        assert_eq!(state(&host, 10, "keyward.usage").as_deref(), Some("unread"), "{what}");
        assert_eq!(host.counts.get("keyward_usage_unread_total;target=ai"), Some(&1), "{what}");
    }
}

#[test]
fn a_stream_is_settled_once_it_has_said_its_usage_even_if_the_client_then_leaves() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-9", r#"{"spend":1000}"#, "");
    let body = r#"{"model":"m1","max_tokens":40,"stream":true,"stream_options":{"include_usage":true}}"#;
    assert_eq!(call(&mut lc, &mut host, 10, "ai", &t, body), Action::Continue);
    stream_then_leave(&mut lc, &mut host, 10, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n");
    assert_eq!(spent(&host, "ai-9"), 5 + 6, "charged its usage; the client left before the vendor's end of stream");
    assert_eq!(host.counts.get("keyward_usage_unread_total;target=ai"), Some(&0));
}

#[test]
fn a_cut_stream_keeps_the_whole_reservation() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-4", r#"{"spend":1000}"#, "");
    let body = r#"{"model":"m1","max_tokens":40,"stream":true,"stream_options":{"include_usage":true}}"#;
    assert_eq!(call(&mut lc, &mut host, 10, "ai", &t, body), Action::Continue);
    stream_then_leave(&mut lc, &mut host, 10, "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n");
    assert_eq!(spent(&host, "ai-4"), bound(body, 40));
    assert_eq!(host.counts.get("keyward_usage_unread_total;target=ai"), Some(&1), "counted as unread");
    // The next call on the same credential sees exactly that much gone.
    let left = 1000 - bound(body, 40);
    let big = chat(left / 2);
    assert_eq!(call(&mut lc, &mut host, 11, "ai", &t, &big), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(11, 429, "spend_exhausted".into())]);
}

#[test]
fn a_refund_status_releases_everything_and_nothing_is_read() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-5", r#"{"spend":1000}"#, "");
    assert_eq!(call(&mut lc, &mut host, 10, "ai", &t, &chat(40)), Action::Continue);
    answer(&mut lc, &mut host, 10, "429", false);
    assert_eq!(spent(&host, "ai-5"), 0);
    assert_eq!(state(&host, 10, "keyward.usage").as_deref(), Some("refunded"));
}

#[test]
fn calls_that_cannot_be_bounded_or_do_not_fit_never_go_on() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-6", r#"{"spend":200}"#, "");
    let cases = [
        (r#"{"model":"gpt-9","max_tokens":1}"#, 400, "bad_request"),
        (r#"{"model":"c1","messages":[]}"#, 400, "bad_request"),
        (r#"{"model":"m1","max_tokens":1,"stream":true,"stream_options":{"include_usage":false}}"#, 400, "bad_request"),
        (r#"{"model":"m1","max_tokens":1,"previous_response_id":"r"}"#, 400, "bad_request"),
        (r#"{"model":"m1","max_tokens":100}"#, 429, "spend_exhausted"),
    ];
    for (i, (body, status, code)) in cases.iter().enumerate() {
        let ctx = 10 + i as ContextId;
        let target = if body.contains("c1") { "claude" } else { "ai" };
        assert_eq!(call(&mut lc, &mut host, ctx, target, &t, body), Action::Pause, "{body}");
        assert_eq!(replies(&host.take()), vec![(ctx, *status, (*code).into())], "{body}");
    }
    assert_eq!(spent(&host, "ai-6"), 0);
    // Without its own limit, the target's (50 tokens) bounds it, and is written into the call
    // (the vendor would otherwise generate up to the model's own limit).
    let body = r#"{"model":"m1"}"#;
    assert_eq!(call(&mut lc, &mut host, 20, "ai", &t, body), Action::Continue);
    let forwarded = r#"{"max_completion_tokens":50,"model":"m1"}"#;
    assert_eq!(spent(&host, "ai-6"), bound(forwarded, 50));
    let s = host.streams.get(&20);
    assert_eq!(s.map(|s| s.body.as_slice()), Some(forwarded.as_bytes()));
    assert!(s.is_some_and(|s| !s.request.iter().any(|(k, _)| k == "content-length")), "the buffer filter sets the new length");
}

#[test]
fn the_same_idempotency_key_is_billed_every_time() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-7", r#"{"spend":1000}"#, "");
    let body = chat(40);
    for ctx in [10, 11] {
        host.open(
            ctx,
            "ai",
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                ("authorization", &format!("Bearer {t}")),
                ("content-type", "application/json"),
                ("idempotency-key", "k-1"),
            ],
        );
        if let Some(s) = host.streams.get_mut(&ctx) {
            s.body = body.as_bytes().to_vec();
        }
        lc.handle(host.now_us(), &mut host, Event::Request(ctx));
        assert_eq!(lc.handle(host.now_us(), &mut host, Event::RequestBody { ctx, size: body.len(), end: true }), Action::Continue);
    }
    assert_eq!(spent(&host, "ai-7"), 2 * bound(&body, 40), "a model call is never a free retry");
}

#[test]
fn a_child_settles_in_its_own_and_its_parents_entries() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let c = token_for(&host, "kid-ai", r#"{"spend":800}"#, r#","par":"p-ai","plim":{"spend":1000}"#);
    let body = chat(40);
    assert_eq!(call(&mut lc, &mut host, 10, "ai", &c, &body), Action::Continue);
    assert_eq!((spent(&host, "kid-ai"), spent(&host, "p-ai")), (bound(&body, 40), bound(&body, 40)));
    respond(&mut lc, &mut host, 10, &JSON, r#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#, 100, true);
    assert_eq!((spent(&host, "kid-ai"), spent(&host, "p-ai")), (7, 7));
}

#[test]
fn unpriced_streams_do_not_read_their_answer() {
    let mut host = MemHost::new(ROOT);
    let mut lc = warm(&mut host);
    let t = token_for(&host, "ai-8", r#"{"spend":1000}"#, "");
    host.open(10, "ai", &[(":method", "GET"), (":path", "/v1/models"), ("authorization", &format!("Bearer {t}"))]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(10)), Action::Continue);
    respond(&mut lc, &mut host, 10, &JSON, r#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#, 100, true);
    assert_eq!(state(&host, 10, "keyward.usage"), None);
    assert_eq!(spent(&host, "ai-8"), 0);
}
