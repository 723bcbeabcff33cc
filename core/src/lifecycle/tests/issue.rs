//! The issuing endpoint: attenuation end to end in memory, the STS callout from the root with its
//! deadline, and the refusals.

use super::*;
use crate::credential::jwt::parse_claims;

const ISSUER_ATTENUATE: &str = r#","issuer":{"kid":"k1","max_ttl_s":600,"attenuate":true}"#;

fn sts_issuer() -> String {
    r#","issuer":{"kid":"k1","max_ttl_s":600,"aws_iam":{"cluster":"sts","authority":"sts.amazonaws.com","timeout_ms":1000,"server_id":"kw-test",
       "roles":{"arn:aws:iam::123456789012:role/checkout":{"sub":"lambda/checkout","allow":["stripe POST /v1/payment_intents","stripe GET /v1/**"],"ttl_s":300}}}}"#
        .to_string()
}

/// An issuance request on stream `ctx` with this body: the headers, then the whole body.
fn issue(lc: &mut Lifecycle, host: &mut MemHost, ctx: ContextId, auth: Option<&str>, body: &str) -> Action {
    let mut headers = vec![(":method", "POST"), (":path", "/keyward/v1/credentials"), ("content-type", "application/json")];
    let bearer = auth.map(|t| format!("Bearer {t}"));
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    host.open_route(ctx, &[("endpoint", "issue")], &headers);
    if let Some(s) = host.streams.get_mut(&ctx) {
        s.body = body.as_bytes().to_vec();
    }
    assert_eq!(lc.handle(host.now_us(), host, Event::Request(ctx)), Action::Continue, "the headers go on to the buffer filter; the body comes to Keyward");
    lc.handle(host.now_us(), host, Event::RequestBody { ctx, size: body.len(), end: true })
}

fn issued_claims(host: &MemHost, ctx: ContextId) -> jwt::Claims {
    let body = host.streams[&ctx].reply_body.clone().unwrap_or_default();
    let v = crate::wire::json::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"));
    let token = v.get("token").and_then(|t| t.as_str()).unwrap_or_else(|| panic!("no token in {body}")).to_string();
    let u = jwt::parse(&token).unwrap_or_else(|e| panic!("{e}"));
    let key = HmacKey::new(K1).unwrap_or_else(|e| panic!("{e}"));
    parse_claims(u.verify(&key).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn attenuate_issues_a_child_within_its_parent() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, ISSUER_ATTENUATE));
    let parent = token(host.now_ms());
    let body = r#"{"grant":"attenuate","allow":["stripe GET /v1/charges"],"ttl_s":60,"lim":{"total":3},"run":"sqs/m-1"}"#;
    assert_eq!(issue(&mut lc, &mut host, 10, Some(&parent), body), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(10, 200, String::new())]);
    let c = issued_claims(&host, 10);
    assert_eq!((c.sub.as_str(), c.run.as_deref(), c.lim.total, c.par.as_deref()), ("lambda/pay", Some("sqs/m-1"), Some(3), Some("j-1")));
    assert!(c.exp <= (host.now_ms() / 1000) as i64 + 60);
    assert_eq!(host.streams[&10].filter_state.get("keyward.issued").map(String::as_str), Some(c.jti.as_str()));
    assert_eq!(host.count(Metric::Issued), 1);
    // The child is an ordinary credential: it works on the stripe route, within its rule only.
    let child = host.streams[&10].reply_body.clone().unwrap_or_default();
    let child = crate::wire::json::parse(child.as_bytes()).ok().and_then(|v| v.get("token").and_then(|t| t.as_str().map(str::to_string))).unwrap_or_default();
    let call = cold_fetch(&mut lc, &mut host, 11);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    host.take();
    assert_eq!(request(&mut lc, &mut host, 12, &child), Action::Continue);
    host.open(13, "stripe", &[(":method", "DELETE"), (":path", "/v1/charges"), ("authorization", &format!("Bearer {child}"))]);
    lc.handle(host.now_us(), &mut host, Event::Request(13));
    assert_eq!(replies(&host.take()), vec![(13, 403, "forbidden".to_string())]);
}

#[test]
fn attenuate_refusals() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, ISSUER_ATTENUATE));
    let parent = token(host.now_ms());
    let cases = [
        (Some(parent.as_str()), r#"{"grant":"attenuate","allow":["openai POST /v1/responses"]}"#, 403, "forbidden"),
        (Some(parent.as_str()), r#"{"grant":"attenuate","ttl_s":601}"#, 403, "forbidden"),
        (None, r#"{"grant":"attenuate"}"#, 401, "missing_credential"),
        (Some("not-a-token"), r#"{"grant":"attenuate"}"#, 401, "invalid_credential"),
        (Some(parent.as_str()), r#"{"grant":"aws_iam","iam_request":{"method":"POST","url":"u","headers":{},"body":""}}"#, 400, "bad_request"),
        (Some(parent.as_str()), r#"{"grant":"attenuate","extra":true}"#, 400, "bad_request"),
        (Some(parent.as_str()), "", 400, "bad_request"),
    ];
    for (i, (auth, body, status, code)) in cases.iter().enumerate() {
        let ctx = 20 + i as u32;
        issue(&mut lc, &mut host, ctx, *auth, body);
        assert_eq!(replies(&host.take()), vec![(ctx, *status, code.to_string())], "{body}");
        assert!(!host.streams[&ctx].filter_state.contains_key("keyward.issued"));
    }
    assert_eq!(host.count(Metric::Issued), 0);
    assert_eq!(host.count(Metric::IssueDenied(crate::response::Code::Forbidden)), 2);
    // Not POST, or not JSON: refused at the headers.
    host.open_route(40, &[("endpoint", "issue")], &[(":method", "GET"), (":path", "/keyward/v1/credentials")]);
    lc.handle(host.now_us(), &mut host, Event::Request(40));
    assert_eq!(replies(&host.take()), vec![(40, 400, "bad_request".to_string())]);
    // A gateway without an issuer does not issue.
    let mut h2 = host.worker(ROOT + 1);
    let mut plain = worker(&mut h2, config());
    h2.open_route(41, &[("endpoint", "issue")], &[(":method", "POST"), (":path", "/x"), ("content-type", "application/json")]);
    plain.handle(h2.now_us(), &mut h2, Event::Request(41));
    assert_eq!(replies(&h2.take()), vec![(41, 403, "unknown_target".to_string())]);
}

fn proof_body(server_id: &str) -> String {
    format!(
        r#"{{"grant":"aws_iam","ttl_s":120,"iam_request":{{"method":"POST","url":"https://sts.amazonaws.com/","body":"Action=GetCallerIdentity&Version=2011-06-15",
        "headers":{{"X-Keyward-Server-Id":"{server_id}","X-Amz-Date":"20261202T150000Z",
        "Authorization":"AWS4-HMAC-SHA256 Credential=AKID/20261202/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date;x-keyward-server-id, Signature=ab"}}}}}}"#
    )
}

fn sts_ok(arn: &str) -> Answer {
    let body = format!("<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><GetCallerIdentityResult><Arn>{arn}</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>");
    Answer { status: Some(200), body: Some(body.into_bytes()) }
}

#[test]
fn aws_iam_goes_to_sts_from_the_root_and_maps_the_role() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, &sts_issuer()));
    assert_eq!(issue(&mut lc, &mut host, 10, None, &proof_body("kw-test")), Action::Pause);
    assert_eq!(host.take(), vec![Effect::WakeRoot], "the stream asks the root to send the proof");
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let effects = host.take();
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { cluster, from: ROOT, .. } if cluster == "sts")), "{effects:?}");
    let call = only_call(&effects);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: sts_ok("arn:aws:sts::123456789012:assumed-role/checkout/i-1") });
    assert_eq!(replies(&host.take()), vec![(10, 200, String::new())]);
    let c = issued_claims(&host, 10);
    assert_eq!(c.sub, "lambda/checkout");
    assert_eq!(c.allow.len(), 2);
    assert!(c.exp <= (host.now_ms() / 1000) as i64 + 120 && c.par.is_none());
}

#[test]
fn aws_iam_refusals_and_a_hanging_sts() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, &sts_issuer()));
    // A proof made for another server id never reaches STS.
    issue(&mut lc, &mut host, 10, None, &proof_body("vault-prod"));
    assert_eq!(replies(&host.take()), vec![(10, 401, "invalid_credential".to_string())]);
    // An unmapped role, STS's refusal, STS down.
    let outcomes = [
        (sts_ok("arn:aws:sts::123456789012:assumed-role/other/i-1"), 403, "forbidden"),
        (
            Answer { status: Some(403), body: Some(b"<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code></Error></ErrorResponse>".to_vec()) },
            401,
            "invalid_credential",
        ),
        (Answer::failed(), 503, "secret_unavailable"),
    ];
    for (i, (answer, status, code)) in outcomes.into_iter().enumerate() {
        let ctx = 20 + i as u32;
        issue(&mut lc, &mut host, ctx, None, &proof_body("kw-test"));
        lc.handle(host.now_us(), &mut host, Event::Woken);
        let call = only_call(&host.take());
        lc.handle(host.now_us(), &mut host, Event::Answer { call, answer });
        assert_eq!(replies(&host.take()), vec![(ctx, status, code.to_string())]);
    }
    // STS hangs: 503 by the deadline, and the late answer is ignored.
    issue(&mut lc, &mut host, 30, None, &proof_body("kw-test"));
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    host.advance(1000 + 600);
    lc.handle(host.now_us(), &mut host, Event::Tick);
    assert_eq!(replies(&host.take()), vec![(30, 503, "secret_unavailable".to_string())]);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: sts_ok("arn:aws:sts::123456789012:assumed-role/checkout/i-1") });
    assert!(replies(&host.take()).is_empty());
    // A client that leaves while STS works: nothing is answered, nothing stalls.
    issue(&mut lc, &mut host, 31, None, &proof_body("kw-test"));
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    host.close(31);
    lc.handle(host.now_us(), &mut host, Event::StreamGone(31));
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: sts_ok("arn:aws:sts::123456789012:assumed-role/checkout/i-1") });
    assert!(replies(&host.take()).is_empty());
}

#[test]
fn a_store_held_issuing_key_is_fetched_then_used() {
    let mut host = MemHost::new(ROOT);
    let cfg = r#","issuer":{"kid":"k2","max_ttl_s":600,"attenuate":true}"#;
    let json = format!(
        r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"KEYWARD_KEY_K1"}},"k2":{{"secret":{{"store":"bao","path":"keys","field":"k2"}}}}}},
        "stores":{{"bao":{BAO}}},"targets":{{"stripe":{{"credential":"bearer","secret":{{"store":"bao","path":"stripe","field":"api_key"}},"inject":{{"type":"bearer"}}}}}}{cfg}}}"#
    );
    let mut lc = worker(&mut host, compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}")));
    let parent = token(host.now_ms());
    assert_eq!(issue(&mut lc, &mut host, 10, Some(&parent), r#"{"grant":"attenuate","ttl_s":60}"#), Action::Pause);
    let effects = host.take();
    assert!(replies(&effects).is_empty(), "{effects:?}");
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    let k2 = b64::std_encode(b"store-held-issuing-key-32-bytes!");
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: kv(&format!(r#"{{"k2":"{k2}"}}"#), 1) });
    assert_eq!(replies(&host.take()), vec![(10, 200, String::new())]);
}
