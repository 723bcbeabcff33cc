use super::*;

fn p(input: &str, output: &str) -> Prices {
    Prices {
        input: parse_price(input).unwrap_or(u64::MAX),
        output: parse_price(output).unwrap_or(u64::MAX),
        cached_input: 0,
        cache_write: 0,
        cache_write_1h: 0,
    }
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
    let dear = Prices { input: u64::MAX, output: u64::MAX, cached_input: u64::MAX, cache_write: u64::MAX, cache_write_1h: u64::MAX };
    let most = Usage { input: MAX_TOKENS, output: MAX_TOKENS, cached_input: MAX_TOKENS, cache_write: MAX_TOKENS, cache_write_1h: MAX_TOKENS };
    assert!(cost(&dear, &most) > 0);
}

#[test]
fn the_bound_covers_every_usage_the_call_can_report() {
    let prices = Prices { input: 300_000_000, output: 1_500_000_000, cached_input: 30_000_000, cache_write: 375_000_000, cache_write_1h: 600_000_000 };
    let (max_output, body) = (1024u64, 20_000u64);
    let b = bound(&prices, max_output, body);
    // Any split of at most `body` input tokens over the three input prices, and any output up to
    // the limit, costs at most the bound.
    for (i, c, w, o) in [(body, 0, 0, max_output), (0, body, 0, max_output), (0, 0, body, max_output), (body / 3, body / 3, body / 3, max_output), (1, 0, 0, 0)]
    {
        let u = Usage { input: i, cached_input: c, cache_write: w, cache_write_1h: 0, output: o };
        assert!(cost(&prices, &u) <= b, "{u:?}: {} > {b}", cost(&prices, &u));
    }
}

const CHAT: &str = "/v1/chat/completions";

/// Nothing is forbidden in a body's strings.
fn none(_: &str) -> bool {
    false
}
const NONE: fn(&str) -> bool = none;

fn ask(body: &[u8]) -> Result<Asked, &'static str> {
    asked(Dialect::OpenAi, body, CHAT, &NONE)
}

#[test]
fn requests_say_their_model_and_limit_strictly() {
    let a = ask(br#"{"model":"gpt-4o","max_completion_tokens":300,"messages":[]}"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        a,
        Asked {
            endpoint: Endpoint::Chat,
            model: "gpt-4o".into(),
            max_output: Some(300),
            limit_field: None,
            choices: 1,
            stream: false,
            add_include_usage: false,
            images: 0,
            largest_limit: 300
        }
    );
    let a = asked(Dialect::Anthropic, br#"{"model":"claude-sonnet-5","max_tokens":64,"stream":true}"#, "/v1/messages", &NONE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((a.max_output, a.stream), (Some(64), true));
    assert_eq!(ask(br#"{"model":"m","messages":[]}"#).map(|a| a.max_output), Ok(None));
    // Anthropic reads only max_tokens: another name is not a limit there.
    assert_eq!(asked(Dialect::Anthropic, br#"{"model":"m","max_completion_tokens":5}"#, "/v1/messages", &NONE).map(|a| a.max_output), Ok(None));
    for bad in [
        &br#"{"messages":[]}"#[..],
        br#"{"model":5}"#,
        br#"{"model":""}"#,
        br#"{"model":"m","max_tokens":-1}"#,
        br#"{"model":"m","max_tokens":1.5}"#,
        br#"{"model":"m","max_tokens":1e3}"#,
        br#"{"model":"m","max_tokens":"100"}"#,
        br#"{"model":"m","max_tokens":100000001}"#,
        br#"{"model":"m","max_tokens":10,"max_completion_tokens":20}"#,
        br#"{"model":"m","model":"n"}"#,
        br#"{"model":"m","stream":"yes"}"#,
        br#"{"model":"m","n":0.5}"#,
        br#"{"model":"m","n":129}"#,
        br#"["model"]"#,
        b"model=m",
    ] {
        assert!(ask(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn every_completion_asked_for_is_bounded() {
    let legacy = |body: &[u8]| asked(Dialect::OpenAi, body, "/v1/completions", &NONE).map(|a| a.choices);
    assert_eq!(ask(br#"{"model":"m","n":4}"#).map(|a| a.choices), Ok(4));
    assert_eq!(ask(br#"{"model":"m","n":null}"#).map(|a| a.choices), Ok(1));
    assert_eq!(ask(br#"{"model":"m","n":0}"#).map(|a| a.choices), Ok(1));
    assert_eq!(legacy(br#"{"model":"m","n":2,"best_of":5}"#), Ok(5));
    // Every prompt of a list is a completion (a list of token ids is one prompt).
    assert_eq!(legacy(br#"{"model":"m","n":2,"prompt":["a","b","c"]}"#), Ok(6));
    assert_eq!(legacy(br#"{"model":"m","prompt":[[1,2],[3]]}"#), Ok(2));
    assert_eq!(legacy(br#"{"model":"m","prompt":[1,2,3]}"#), Ok(1));
}

#[test]
fn a_stream_that_does_not_ask_for_its_usage_is_made_to() {
    let add = |body: &[u8], path: &str| asked(Dialect::OpenAi, body, path, &NONE).map(|a| a.add_include_usage);
    assert_eq!(add(br#"{"model":"m","stream":true}"#, CHAT), Ok(true));
    assert_eq!(add(br#"{"model":"m","stream":true}"#, "/v1/completions"), Ok(true));
    assert_eq!(add(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#, CHAT), Ok(false));
    assert_eq!(add(br#"{"model":"m","stream":false}"#, CHAT), Ok(false));
    // Asked not to, or with other stream options: refused (the body cannot say two things).
    assert!(add(br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#, CHAT).is_err());
    assert!(add(br#"{"model":"m","stream":true,"stream_options":{}}"#, CHAT).is_err());
    // The responses API and Anthropic report usage in their streams without being asked.
    assert_eq!(add(br#"{"model":"m","stream":true}"#, "/v1/responses"), Ok(false));
    assert!(asked(Dialect::Anthropic, br#"{"model":"m","stream":true}"#, "/v1/messages", &NONE).is_ok_and(|a| !a.add_include_usage));
}

#[test]
fn input_the_vendor_fetches_itself_is_refused() {
    for bad in [
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.example/a.png"}}]}]}"#,
        r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"https://x.example/a.png"}]}]}"#,
        r#"{"model":"m","input":[{"type":"input_file","file_id":"file-1"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_data":"data:application/pdf;base64,AAAA"}}]}]}"#,
        r#"{"model":"m","previous_response_id":"resp_1","input":"go on"}"#,
        r#"{"model":"m","conversation":"conv_1"}"#,
        r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#,
        r#"{"model":"m","tools":[{"type":"web_search"}]}"#,
        r#"{"model":"m","tools":[{"type":"file_search","vector_store_ids":["vs"]}]}"#,
    ] {
        assert!(ask(bad.as_bytes()).is_err(), "{bad}");
    }
    for bad in [
        r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://x.example/a.png"}}]}]}"#,
        r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"AAAA"}}]}]}"#,
        r#"{"model":"m","max_tokens":5,"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
        r#"{"model":"m","max_tokens":5,"mcp_servers":[{"type":"url","url":"https://mcp.example"}]}"#,
    ] {
        assert!(asked(Dialect::Anthropic, bad.as_bytes(), "/v1/messages", &NONE).is_err(), "{bad}");
    }
    // Inline content, the caller's own tools, and a completions prompt are in the body.
    for good in [
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
        r#"{"model":"m","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"url":{"type":"string"}}}}}]}"#,
        r#"{"model":"m","prompt":"Say hi"}"#,
    ] {
        assert!(ask(good.as_bytes()).is_ok(), "{good}");
    }
    assert!(asked(Dialect::Anthropic, br#"{"model":"m","tools":[{"name":"f","input_schema":{"type":"object"}}]}"#, "/v1/messages", &NONE).is_ok());
}

fn tariff(max_tokens: Option<u64>, with_default: bool) -> Tariff {
    let raw: std::collections::BTreeMap<String, RawPrices> =
        serde_json::from_str(r#"{"gpt-4o-mini": {"input": 0.15, "output": 0.6}, "gpt-4o": {"input": 2.5, "output": 10, "cached_input": 1.25}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
    let default: Option<RawPrices> = with_default.then(|| serde_json::from_str(r#"{"input": 30, "output": 60}"#).unwrap_or_else(|e| panic!("{e}")));
    compile_tariff("targets.ai.cost", "openai", Some(&raw), default.as_ref(), max_tokens, None).unwrap_or_else(|e| panic!("{e:?}"))
}

#[test]
fn a_tariff_prices_each_model_and_refuses_the_unlisted() {
    let t = tariff(Some(1000), false);
    assert_eq!(
        t.models.get("gpt-4o").map(|m| (m.prices.input, m.prices.output, m.prices.cached_input, m.prices.cache_write)),
        Some((2_500_000, 10_000_000, 1_250_000, 0))
    );
    let meter = |t: &Tariff, body: &[u8]| t.meter(body, CHAT, &NONE).map(|(m, _)| m);
    let body = br#"{"model":"gpt-4o","max_tokens":100,"messages":[]}"#;
    let (m, forwarded) = t.meter(body, CHAT, &NONE).unwrap_or_else(|e| panic!("{e}"));
    let input = body.len() as u64 + DEFAULT_OVERHEAD_TOKENS;
    assert_eq!(m.bound, bound(&t.models["gpt-4o"].prices, 100, input));
    assert_eq!((m.model.as_str(), m.stream, m.unlisted, forwarded), ("gpt-4o", false, false, None), "a call that states its limit goes as sent");
    // Without its own limit, the target's, written into the call; without either, refused.
    let (m, forwarded) = t.meter(br#"{"model":"gpt-4o-mini","messages":[]}"#, CHAT, &NONE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(forwarded.as_deref(), Some(&br#"{"max_completion_tokens":1000,"model":"gpt-4o-mini","messages":[]}"#[..]));
    assert_eq!(m.bound, bound(&t.models["gpt-4o-mini"].prices, 1000, 63 + DEFAULT_OVERHEAD_TOKENS), "the forwarded body's bytes bound its input");
    assert!(tariff(None, false).meter(br#"{"model":"gpt-4o-mini"}"#, CHAT, &NONE).is_err());
    // An unlisted model is refused, or priced by the default, never free.
    assert!(meter(&t, br#"{"model":"gpt-5","max_tokens":1}"#).is_err());
    let m = meter(&tariff(Some(10), true), br#"{"model":"gpt-5","max_tokens":1}"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((m.prices.output, m.unlisted), (60_000_000, true));
    // n completions are n times the output.
    let one = meter(&t, br#"{"model":"gpt-4o","max_tokens":100000,"n":1}"#).map(|m| m.bound).unwrap_or(0);
    let four = meter(&t, br#"{"model":"gpt-4o","max_tokens":100000,"n":4}"#).map(|m| m.bound).unwrap_or(0);
    assert!(four >= one + cost(&t.models["gpt-4o"].prices, &Usage { output: 300_000, ..Usage::default() }), "{one} {four}");
}

#[test]
fn each_endpoint_is_bounded_by_the_limit_it_reads() {
    let t = tariff(Some(64), false);
    let forwarded = |body: &[u8], path: &str| t.meter(body, path, &NONE).map(|(m, f)| (m.bound, f.map(|f| String::from_utf8_lossy(&f).into_owned())));
    // A limit the endpoint does not read is no limit: the endpoint's own is added.
    let (_, f) = forwarded(br#"{"model":"gpt-4o","max_output_tokens":5}"#, CHAT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.as_deref(), Some(r#"{"max_completion_tokens":64,"model":"gpt-4o","max_output_tokens":5}"#));
    let (_, f) = forwarded(br#"{"model":"gpt-4o","max_tokens":5}"#, "/v1/responses").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.as_deref(), Some(r#"{"max_output_tokens":64,"model":"gpt-4o","max_tokens":5}"#));
    let (_, f) = forwarded(br#" { "model":"gpt-4o" } "#, "/v1/completions").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.as_deref(), Some(r#" {"max_tokens":64, "model":"gpt-4o" } "#));
    // Embeddings generate nothing: no limit needed, none added.
    assert_eq!(forwarded(br#"{"model":"gpt-4o","input":["a","b"]}"#, "/v1/embeddings").map(|(_, f)| f), Ok(None));
    // A stream is asked for its usage when it does not say.
    let (_, f) = forwarded(br#"{"model":"gpt-4o","max_tokens":5,"stream":true}"#, CHAT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.as_deref(), Some(r#"{"stream_options":{"include_usage":true},"model":"gpt-4o","max_tokens":5,"stream":true}"#));
    // Other endpoints are not priced by usage.
    for path in ["/v1/audio/speech", "/v1/images/generations", "/v1/batches", "/v1/chat/completions/x"] {
        assert!(forwarded(br#"{"model":"gpt-4o","max_tokens":5}"#, path).is_err(), "{path}");
    }
    // A tier billed above the list is refused.
    assert!(forwarded(br#"{"model":"gpt-4o","max_tokens":5,"service_tier":"priority"}"#, CHAT).is_err());
    assert!(forwarded(br#"{"model":"gpt-4o","max_tokens":5,"service_tier":"flex"}"#, CHAT).is_ok());
}

#[test]
fn images_cost_the_tokens_their_model_says() {
    let raw: std::collections::BTreeMap<String, RawPrices> =
        serde_json::from_str(r#"{"seeing": {"input": 1000000, "output": 1000000, "image_tokens": 3000}, "blind": {"input": 1000000, "output": 1000000}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
    let t = compile_tariff("c", "openai", Some(&raw), None, Some(10), Some(0)).unwrap_or_else(|e| panic!("{e:?}"));
    let image = r#"{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}"#;
    let body = format!(r#"{{"model":"seeing","max_tokens":10,"messages":[{{"role":"user","content":[{image},{image}]}}]}}"#);
    let (m, _) = t.meter(body.as_bytes(), CHAT, &NONE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.bound, 10 + body.len() as u64 + 2 * 3000, "two images at 3000 tokens each");
    assert!(t.meter(body.replace("seeing", "blind").as_bytes(), CHAT, &NONE).is_err(), "a model without image_tokens refuses images");
    let reference = br#"{"model":"seeing","max_output_tokens":5,"input":[{"type":"item_reference","id":"msg_1"}]}"#;
    assert!(t.meter(reference, "/v1/responses", &NONE).is_err(), "a stored item by id");
    assert!(t.meter(br#"{"model":"seeing","max_tokens":5,"messages":[{"role":"assistant","audio":{"id":"audio_1"}}]}"#, CHAT, &NONE).is_err());
}

#[test]
fn a_tariff_is_checked_when_configured() {
    let bad = |models: &str, default: Option<&str>, max: Option<u64>| {
        let raw: std::collections::BTreeMap<String, RawPrices> = serde_json::from_str(models).unwrap_or_else(|e| panic!("{e}"));
        let d: Option<RawPrices> = default.map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}")));
        compile_tariff("c", "openai", Some(&raw), d.as_ref(), max, None).map(|_| ()).map_err(|(p, _)| p)
    };
    assert_eq!(bad(r#"{"m": {"input": -1, "output": 1}}"#, None, None), Err("c.models.m.input".into()));
    assert_eq!(bad(r#"{"m": {"input": 1, "output": 0.0000001}}"#, None, None), Err("c.models.m.output".into()));
    assert_eq!(bad(r#"{"m": {"input": 1, "output": 1e30}}"#, None, None), Err("c.models.m.output".into()));
    assert_eq!(bad(r#"{}"#, None, None), Err("c.models".into()));
    assert_eq!(bad(r#"{"m": {"input": 1, "output": 1}}"#, None, Some(0)), Err("c.max_tokens".into()));
    assert_eq!(bad(r#"{}"#, Some(r#"{"input": 1, "output": 1}"#), None), Ok(()));
    assert!(compile_tariff("c", "gemini", None, None, None, None).is_err());
    assert!(serde_json::from_str::<RawPrices>(r#"{"input": 1, "output": 1, "reasoning": 2}"#).is_err(), "unknown members are refused");
}

#[test]
fn usage_is_read_from_each_vendors_answer() {
    let chat = br#"{"id":"x","usage":{"prompt_tokens":1200,"completion_tokens":80,"total_tokens":1280,"prompt_tokens_details":{"cached_tokens":1000}}}"#;
    assert_eq!(answer_usage(Dialect::OpenAi, chat), Ok(Usage { input: 200, cached_input: 1000, cache_write: 0, cache_write_1h: 0, output: 80 }));
    let responses = br#"{"usage":{"input_tokens":50,"output_tokens":7,"input_tokens_details":{"cached_tokens":0}}}"#;
    assert_eq!(answer_usage(Dialect::OpenAi, responses), Ok(Usage { input: 50, cached_input: 0, cache_write: 0, cache_write_1h: 0, output: 7 }));
    let hour = br#"{"usage":{"input_tokens":10,"output_tokens":20,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#;
    assert_eq!(answer_usage(Dialect::Anthropic, hour).map(|u| (u.cache_write, u.cache_write_1h)), Ok((100, 200)), "writes for an hour are apart");
    let claude = br#"{"usage":{"input_tokens":10,"output_tokens":20,"cache_creation_input_tokens":300,"cache_read_input_tokens":400}}"#;
    assert_eq!(answer_usage(Dialect::Anthropic, claude), Ok(Usage { input: 10, cached_input: 400, cache_write: 300, cache_write_1h: 0, output: 20 }));
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
        assert_eq!(stream(Dialect::OpenAi, openai, chunk), Some(Usage { input: 12, cached_input: 0, cache_write: 0, cache_write_1h: 0, output: 3 }), "{chunk}");
        assert_eq!(
            stream(Dialect::Anthropic, claude, chunk),
            Some(Usage { input: 25, cached_input: 100, cache_write: 0, cache_write_1h: 0, output: 15 }),
            "{chunk}"
        );
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

#[test]
fn the_responses_api_and_cumulative_deltas_are_read() {
    let responses = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
                     event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
                     event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"input_tokens_details\":{\"cached_tokens\":2}}}}\n\n";
    for chunk in [1, 5, 4096] {
        assert_eq!(stream(Dialect::OpenAi, responses, chunk), Some(Usage { input: 7, cached_input: 2, cache_write: 0, cache_write_1h: 0, output: 4 }));
    }
    // A server tool's input shows in the delta's cumulative counts: the larger one is charged.
    let claude = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\
                  data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30,\"input_tokens\":500}}\n\
                  data: {\"type\":\"message_stop\"}\n";
    assert_eq!(stream(Dialect::Anthropic, claude, 3), Some(Usage { input: 500, cached_input: 0, cache_write: 0, cache_write_1h: 0, output: 30 }));
    // A delta before the start, or without its output count, is not a usage.
    assert_eq!(stream(Dialect::Anthropic, "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":3}}\ndata: {\"type\":\"message_stop\"}\n", 2), None);
}

#[test]
fn limits_a_vendor_could_read_otherwise_are_refused() {
    let t = tariff(Some(64), false);
    let refused = |body: &str, path: &str| t.meter(body.as_bytes(), path, &NONE).is_err();
    // `null` is the model's own limit at the vendor (and a member the gateway would add twice).
    assert!(refused(r#"{"model":"gpt-4o","max_completion_tokens":null}"#, CHAT));
    assert!(refused(r#"{"model":"gpt-4o","max_output_tokens":null}"#, "/v1/responses"));
    assert!(refused(r#"{"model":"gpt-4o","max_tokens":null,"prompt":"x"}"#, "/v1/completions"));
    assert!(refused(r#"{"model":"gpt-4o","max_tokens":0}"#, CHAT), "0 may read as the default");
    assert!(refused(r#"{"model":"gpt-4o","stream":true,"stream_options":null,"max_tokens":5}"#, CHAT));
    // Another name above the bound: a vendor routing the path otherwise would read it.
    assert!(refused(r#"{"model":"gpt-4o","max_tokens":1,"max_completion_tokens":50000}"#, "/v1/completions"));
    assert!(refused(r#"{"model":"gpt-4o","max_output_tokens":5,"max_tokens":9999}"#, "/v1/responses"));
    assert!(refused(r#"{"model":"gpt-4o","max_output_tokens":5000}"#, CHAT), "above the 64 the gateway writes in");
    // Output billed above the text price.
    assert!(refused(r#"{"model":"gpt-4o","max_tokens":5,"modalities":["text","audio"]}"#, CHAT));
    assert!(refused(r#"{"model":"gpt-4o","max_tokens":5,"prediction":{"type":"content","content":"x"}}"#, CHAT));
    // The path's case does not change the endpoint.
    assert_eq!(Endpoint::of(Dialect::OpenAi, "/v1/Chat/Completions"), Some(Endpoint::Chat));
}

#[test]
fn a_copy_of_the_credential_in_any_string_is_found_however_escaped() {
    let t = tariff(Some(64), true);
    let forbidden = |s: &str| s.contains("SIGNATURE");
    for body in [
        r#"{"model":"\u0053IGNATURE","max_tokens":5}"#,
        r#"{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"my token is \u0053IGNATURE"}]}"#,
        r#"{"model":"gpt-4o","max_tokens":5,"metadata":{"SIGNATURE":"x"}}"#,
    ] {
        assert!(t.meter(body.as_bytes(), CHAT, &forbidden).is_err(), "{body}");
    }
    assert!(t.meter(br#"{"model":"gpt-4o","max_tokens":5}"#, CHAT, &forbidden).is_ok());
}

#[test]
fn a_running_count_in_content_chunks_is_not_the_final_usage() {
    // vLLM's continuous usage: every chunk carries the count so far; only the last, without
    // choices, is the whole call's.
    let running = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n";
    let last = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":40}}\n\n";
    let mut s = StreamUsage::new(Dialect::OpenAi);
    s.feed(running.as_bytes());
    assert_eq!(s.usage(), None, "not settled on a running count");
    s.feed(last.as_bytes());
    assert_eq!(s.usage().map(|u| u.output), Some(40));
    assert_eq!(stream(Dialect::OpenAi, running, 7), None, "cut after a running count: unread");
}
