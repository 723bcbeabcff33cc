use super::*;

fn p(input: &str, output: &str) -> Prices {
    Prices { input: parse_price(input).unwrap_or(u64::MAX), output: parse_price(output).unwrap_or(u64::MAX), cached_input: 0, cache_write: 0 }
}

#[test]
fn prices_are_decimals_held_exactly() {
    assert_eq!(parse_price("2.5"), Some(2_500_000));
    assert_eq!(parse_price("0.075"), Some(75_000));
    assert_eq!(parse_price("15"), Some(15_000_000));
    assert_eq!(parse_price("0.000001"), Some(1));
    for bad in ["", ".5", "5.", "1.0000001", "-1", "1e3", "1,5", " 1", "0x10", "1.2.3"] {
        assert_eq!(parse_price(bad), None, "{bad}");
    }
}

#[test]
fn cost_is_exact_and_rounded_up() {
    // 250 cents per million input tokens, 1000 per million output (gpt-4o's $2.50 and $10).
    let gpt = p("250", "1000");
    assert_eq!(cost(&gpt, &Usage { input: 1_000_000, output: 0, ..Usage::default() }), 250);
    assert_eq!(cost(&gpt, &Usage { input: 1, output: 0, ..Usage::default() }), 1, "a fraction of a cent is a cent");
    assert_eq!(cost(&gpt, &Usage::default()), 0);
    assert_eq!(cost(&gpt, &Usage { input: 4_000, output: 1_000, ..Usage::default() }), 2, "1.0 + 1.0 cents: exactly 2");
    assert_eq!(cost(&gpt, &Usage { input: 4_001, output: 1_000, ..Usage::default() }), 3);
    // Cheap prices in fractions of a cent.
    let mini = p("0.075", "0.3");
    assert_eq!(cost(&mini, &Usage { input: 10_000_000, output: 0, ..Usage::default() }), 1, "0.75 cents, rounded up");
    // No overflow at the largest counts and prices.
    let dear = Prices { input: u64::MAX, output: u64::MAX, cached_input: u64::MAX, cache_write: u64::MAX };
    let most = Usage { input: MAX_TOKENS, output: MAX_TOKENS, cached_input: MAX_TOKENS, cache_write: MAX_TOKENS };
    assert!(cost(&dear, &most) > 0);
}

#[test]
fn the_bound_covers_every_usage_the_call_can_report() {
    let prices = Prices { input: 300_000_000, output: 1_500_000_000, cached_input: 30_000_000, cache_write: 375_000_000 };
    let (max_output, body) = (1024u64, 20_000u64);
    let b = bound(&prices, max_output, body);
    // Any split of at most `body` input tokens over the three input prices, and any output up to
    // the limit, costs at most the bound.
    for (i, c, w, o) in [(body, 0, 0, max_output), (0, body, 0, max_output), (0, 0, body, max_output), (body / 3, body / 3, body / 3, max_output), (1, 0, 0, 0)]
    {
        let u = Usage { input: i, cached_input: c, cache_write: w, output: o };
        assert!(cost(&prices, &u) <= b, "{u:?}: {} > {b}", cost(&prices, &u));
    }
}

#[test]
fn requests_say_their_model_and_limit_strictly() {
    let a = asked(br#"{"model":"gpt-4o","max_completion_tokens":300,"messages":[]}"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a, Asked { model: "gpt-4o".into(), max_output: Some(300), stream: false });
    let a = asked(br#"{"model":"claude-sonnet-5","max_tokens":64,"stream":true}"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((a.max_output, a.stream), (Some(64), true));
    assert_eq!(asked(br#"{"model":"m","messages":[]}"#).map(|a| a.max_output), Ok(None));
    for bad in [
        &br#"{"messages":[]}"#[..],
        br#"{"model":5}"#,
        br#"{"model":"m","max_tokens":-1}"#,
        br#"{"model":"m","max_tokens":1.5}"#,
        br#"{"model":"m","max_tokens":"100"}"#,
        br#"{"model":"m","max_tokens":10,"max_completion_tokens":20}"#,
        br#"{"model":"m","model":"n"}"#,
        br#"{"model":"m","stream":"yes"}"#,
        br#"["model"]"#,
        b"model=m",
    ] {
        assert!(asked(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn usage_is_read_from_each_vendors_answer() {
    let chat = br#"{"id":"x","usage":{"prompt_tokens":1200,"completion_tokens":80,"total_tokens":1280,"prompt_tokens_details":{"cached_tokens":1000}}}"#;
    assert_eq!(answer_usage(Dialect::OpenAi, chat), Ok(Usage { input: 200, cached_input: 1000, cache_write: 0, output: 80 }));
    let responses = br#"{"usage":{"input_tokens":50,"output_tokens":7,"input_tokens_details":{"cached_tokens":0}}}"#;
    assert_eq!(answer_usage(Dialect::OpenAi, responses), Ok(Usage { input: 50, cached_input: 0, cache_write: 0, output: 7 }));
    let claude = br#"{"usage":{"input_tokens":10,"output_tokens":20,"cache_creation_input_tokens":300,"cache_read_input_tokens":400}}"#;
    assert_eq!(answer_usage(Dialect::Anthropic, claude), Ok(Usage { input: 10, cached_input: 400, cache_write: 300, output: 20 }));
    for bad in [
        &br#"{"id":"x"}"#[..],
        br#"{"usage":{}}"#,
        br#"{"usage":{"prompt_tokens":-5,"completion_tokens":1}}"#,
        br#"{"usage":{"prompt_tokens":"5","completion_tokens":1}}"#,
        br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":6}}}"#,
        br#"{"usage":{"prompt_tokens":1000000000000,"completion_tokens":1}}"#,
        b"not json",
    ] {
        assert!(answer_usage(Dialect::OpenAi, bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

fn stream(d: Dialect, text: &str, chunk: usize) -> Option<Usage> {
    let mut s = StreamUsage::new(d);
    for c in text.as_bytes().chunks(chunk.max(1)) {
        s.feed(c);
    }
    s.usage()
}

#[test]
fn streamed_usage_is_read_as_the_events_pass_in_any_split() {
    let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                  data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}\n\n\
                  data: [DONE]\n\n";
    let claude = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":100}}}\n\n\
                  event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hello\"}}\n\n\
                  event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
                  event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    for chunk in [1, 2, 7, 64, 10_000] {
        assert_eq!(stream(Dialect::OpenAi, openai, chunk), Some(Usage { input: 12, cached_input: 0, cache_write: 0, output: 3 }), "{chunk}");
        assert_eq!(stream(Dialect::Anthropic, claude, chunk), Some(Usage { input: 25, cached_input: 100, cache_write: 0, output: 15 }), "{chunk}");
        assert_eq!(stream(Dialect::Anthropic, &claude.replace("\n", "\r\n"), chunk).map(|u| u.output), Some(15));
    }
    // Cut before the usage, a stream without it, garbage in it: no usage (the reservation stays).
    let cut = &claude[..claude.find("event: message_delta").unwrap_or(0)];
    assert_eq!(stream(Dialect::Anthropic, cut, 5), None);
    assert_eq!(stream(Dialect::Anthropic, &claude.replace("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", ""), 5), None);
    assert_eq!(stream(Dialect::OpenAi, "data: {\"choices\":[]}\n\ndata: [DONE]\n\n", 3), None);
    assert_eq!(stream(Dialect::OpenAi, &openai.replace("\"prompt_tokens\":12", "\"prompt_tokens\":\"12\""), 3), None);
    assert_eq!(stream(Dialect::OpenAi, &format!("data: {}\n", "x".repeat(MAX_EVENT_LINE + 1)), 4096), None);
}
