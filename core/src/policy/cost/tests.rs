use super::*;

fn cost(v: serde_json::Value) -> Result<Cost, (String, String)> {
    let raw: RawCost = serde_json::from_value(v).map_err(|e| (String::new(), e.to_string()))?;
    compile("targets.stripe.cost", &raw)
}

fn form() -> Cost {
    cost(serde_json::json!({"form_field": "amount", "currency_field": "currency", "currencies": ["USD", "eur"]})).unwrap_or_else(|e| unreachable!("{e:?}"))
}

fn json_cost() -> Cost {
    cost(serde_json::json!({"json_field": "amount", "max_body_bytes": 64})).unwrap_or_else(|e| unreachable!("{e:?}"))
}

#[test]
fn compiles_each_source_and_names_the_path_of_errors() {
    assert_eq!(cost(serde_json::json!({"per_request": 5})).map(|c| c.fixed()), Ok(Some(5)));
    assert_eq!(form().currency, Some(("currency".to_string(), vec!["usd".to_string(), "eur".to_string()])));
    assert_eq!(form().max_body, DEFAULT_MAX_BODY);
    for (v, at) in [
        (serde_json::json!({}), "targets.stripe.cost"),
        (serde_json::json!({"per_request": 1, "form_field": "amount"}), "targets.stripe.cost"),
        (serde_json::json!({"per_request": MAX_COST + 1}), "targets.stripe.cost.per_request"),
        (serde_json::json!({"form_field": ""}), "targets.stripe.cost.form_field"),
        (serde_json::json!({"json_field": "a b"}), "targets.stripe.cost.json_field"),
        (serde_json::json!({"per_request": 1, "currency_field": "c", "currencies": ["usd"]}), "targets.stripe.cost.currency_field"),
        (serde_json::json!({"form_field": "amount", "currency_field": "amount", "currencies": ["usd"]}), "targets.stripe.cost.currency_field"),
        (serde_json::json!({"form_field": "amount", "currency_field": "currency"}), "targets.stripe.cost.currencies"),
        (serde_json::json!({"form_field": "amount", "currencies": ["usd"]}), "targets.stripe.cost.currency_field"),
        (serde_json::json!({"form_field": "amount", "currency_field": "c", "currencies": []}), "targets.stripe.cost.currencies"),
        (serde_json::json!({"form_field": "amount", "currency_field": "c", "currencies": ["dollars"]}), "targets.stripe.cost.currencies[0]"),
        (serde_json::json!({"form_field": "amount", "max_body_bytes": 0}), "targets.stripe.cost.max_body_bytes"),
        (serde_json::json!({"form_field": "amount", "max_body_bytes": 2_000_000}), "targets.stripe.cost.max_body_bytes"),
        (serde_json::json!({"per_request": 1, "max_body_bytes": 10}), "targets.stripe.cost.max_body_bytes"),
        (serde_json::json!({"per_request": 1, "free": ["GET /", "POST v1"]}), "targets.stripe.cost.free[1]"),
    ] {
        assert_eq!(cost(v.clone()).err().map(|e| e.0), Some(at.to_string()), "{v}");
    }
    assert!(cost(serde_json::json!({"per_request": 1, "surprise": 1})).is_err(), "unknown fields are refused");
}

#[test]
fn refunds_are_error_statuses() {
    assert_eq!(compile_refunds("t", &[402, 400, 402]), Ok(vec![402, 400]));
    assert_eq!(compile_refunds("t", &[400, 200]).err().map(|e| e.0), Some("t.refund_on[1]".into()));
    assert!(compile_refunds("t", &[600]).is_err());
}

#[test]
fn every_request_not_listed_free_costs() {
    let c = cost(serde_json::json!({"form_field": "amount", "free": ["GET /v1/**", "POST /v1/customers"]})).unwrap_or_else(|e| unreachable!("{e:?}"));
    assert!(c.applies("POST", "/v1/payment_intents"));
    assert!(c.applies("POST", "/v1/payment_intents/"), "a path the list does not foresee is priced");
    assert!(c.applies("POST", "/v1/customers/cus_1"));
    assert!(!c.applies("GET", "/v1/payment_intents"));
    assert!(!c.applies("POST", "/v1/customers"));
    assert!(form().applies("GET", "/anything"), "without free every request costs");
}

#[test]
fn reads_form_amounts_and_currencies_as_the_vendor_would() {
    let c = form();
    let ok = |b: &[u8]| c.read(b);
    assert_eq!(ok(b"amount=1000&currency=usd"), Ok(Priced { cost: 1000, currency: Some("usd".into()), meter: None, body: None }));
    assert_eq!(ok(b"currency=EUR&description=a%26b&amount=0"), Ok(Priced { cost: 0, currency: Some("eur".into()), meter: None, body: None }));
    // Names and values are compared decoded, like the vendor decodes them.
    assert_eq!(ok(b"am%6Funt=12&currency=usd"), Ok(Priced { cost: 12, currency: Some("usd".into()), meter: None, body: None }));
    assert_eq!(ok(b"amount=1%32&currency=us%64"), Ok(Priced { cost: 12, currency: Some("usd".into()), meter: None, body: None }));
    assert_eq!(ok(b"amount=007&currency=usd").map(|p| p.cost), Ok(7));
    assert_eq!(ok(b"&&amount=5&&currency=usd&").map(|p| p.cost), Ok(5));
    assert_eq!(ok(b"amount_capturable=99999&amount=5&currency=usd").map(|p| p.cost), Ok(5), "a longer name is another field");
    for (body, why) in [
        (&b"currency=usd"[..], "the body has no amount"),
        (b"amount=&currency=usd", "the amount is not an integer"),
        (b"amount=-5&currency=usd", "the amount is negative"),
        (b"amount=10.5&currency=usd", "the amount is not an integer"),
        (b"amount=1e3&currency=usd", "the amount is not an integer"),
        (b"amount=+5&currency=usd", "the amount is not an integer"),
        (b"amount=%205&currency=usd", "the amount is not an integer"),
        (b"amount=5&amount=1&currency=usd", "the amount, currency or _method is given more than once"),
        (b"amount=5&am%6Funt=1&currency=usd", "the amount, currency or _method is given more than once"),
        (b"amount[]=5&currency=usd", "a field name in the body could be read as the amount, the currency or _method (case, spaces, dots or brackets)"),
        (
            b"amount%5B0%5D=5&amount=5&currency=usd",
            "a field name in the body could be read as the amount, the currency or _method (case, spaces, dots or brackets)",
        ),
        (b"amount=10000000000000001&currency=usd", "the amount is too large"),
        (b"amount=99999999999999999999999999&currency=usd", "the amount is too large"),
        (b"amount=5", "the body has no currency"),
        (b"amount=5&currency=gbp", "the currency is not allowed here"),
        (b"amount=5&currency=usd&currency=gbp", "the amount, currency or _method is given more than once"),
        (b"amount=5&currency=%FF", "the currency is not allowed here"),
    ] {
        assert_eq!(ok(body), Err(Unreadable::Bad(why)), "{}", String::from_utf8_lossy(body));
    }
    assert_eq!(ok(b"amount=0000000000000000000000005&currency=usd").map(|p| p.cost), Ok(5), "leading zeros are not digits of size");
}

#[test]
fn reads_json_amounts() {
    let c = json_cost();
    assert_eq!(c.read(br#"{"amount": 250, "model": "x"}"#), Ok(Priced { cost: 250, currency: None, meter: None, body: None }));
    assert_eq!(c.read(br#"{"\u0061mount": 3}"#).map(|p| p.cost), Ok(3), "escaped names are the same name");
    for (body, why) in [
        (&br#"{"amount": -1}"#[..], "the amount is negative"),
        (br#"{"amount": 1.5}"#, "the amount is not an integer"),
        (br#"{"amount": 1e2}"#, "the amount is not an integer"),
        (br#"{"amount": "100"}"#, "the amount is not an integer"),
        (br#"{"amount": null}"#, "the amount is not an integer"),
        (br#"{"amount": 99999999999999999999}"#, "the amount is not an integer"),
        (br#"{"amount": 1000000000000001}"#, "the amount is too large"),
        (br#"{"nested": {"amount": 1}}"#, "the body has no amount"),
        (br#"{"amount": 1, "amount": 2}"#, "the body is not valid JSON"),
        (br#"[{"amount": 1}]"#, "the body is not a JSON object"),
        (b"amount=1", "the body is not valid JSON"),
    ] {
        assert_eq!(c.read(body), Err(Unreadable::Bad(why)), "{}", String::from_utf8_lossy(body));
    }
    assert_eq!(c.read(&[b' '; 65]), Err(Unreadable::TooLarge));
}

#[test]
fn json_currencies() {
    let c = cost(serde_json::json!({"json_field": "amount", "currency_field": "currency", "currencies": ["usd"]})).unwrap_or_else(|e| unreachable!("{e:?}"));
    assert_eq!(c.read(br#"{"amount": 1, "currency": "USD"}"#).map(|p| p.currency), Ok(Some("usd".into())));
    assert_eq!(c.read(br#"{"amount": 1, "currency": "eur"}"#), Err(Unreadable::Bad("the currency is not allowed here")));
    assert_eq!(c.read(br#"{"amount": 1, "currency": 840}"#), Err(Unreadable::Bad("the currency is not a string")));
    assert_eq!(c.read(br#"{"amount": 1}"#), Err(Unreadable::Bad("the body has no currency")));
}

#[test]
fn header_checks() {
    let c = form();
    let h = |ct: &str| BodyHeaders { content_type: Some(ct.as_bytes().to_vec()), ..BodyHeaders::default() };
    assert_eq!(c.check_headers(&h("application/x-www-form-urlencoded")), Ok(()));
    assert_eq!(c.check_headers(&h("Application/X-WWW-Form-Urlencoded; charset=utf-8")), Ok(()));
    assert!(matches!(c.check_headers(&h("application/json")), Err(Unreadable::Bad(_))));
    assert!(matches!(c.check_headers(&h("multipart/form-data; boundary=x")), Err(Unreadable::Bad(_))));
    assert!(matches!(c.check_headers(&BodyHeaders::default()), Err(Unreadable::Bad(_))), "no content type");
    assert!(matches!(json_cost().check_headers(&h("application/x-www-form-urlencoded")), Err(Unreadable::Bad(_))));
    assert_eq!(json_cost().check_headers(&h("application/json")), Ok(()));
    let with = |f: &dyn Fn(&mut BodyHeaders)| {
        let mut x = h("application/x-www-form-urlencoded");
        f(&mut x);
        c.check_headers(&x)
    };
    assert!(matches!(with(&|x| x.content_encoding = Some(b"gzip".to_vec())), Err(Unreadable::Bad(_))));
    assert_eq!(with(&|x| x.content_encoding = Some(b"identity".to_vec())), Ok(()));
    assert_eq!(with(&|x| x.content_length = Some(b"65536".to_vec())), Ok(()));
    assert_eq!(with(&|x| x.content_length = Some(b"65537".to_vec())), Err(Unreadable::TooLarge));
    assert!(matches!(with(&|x| x.content_length = Some(b"ten".to_vec())), Err(Unreadable::Bad(_))));
    assert_eq!(with(&|x| x.query = Some("expand=x&limit=3".into())), Ok(()));
    for q in ["amount=1", "a=1&am%6Funt=5", "currency=gbp", "amount[]=1", "amount"] {
        assert!(matches!(with(&|x| x.query = Some(q.into())), Err(Unreadable::Bad(_))), "{q}");
    }
    assert_eq!(cost(serde_json::json!({"per_request": 5})).map(|c| c.check_headers(&BodyHeaders::default())), Ok(Ok(())), "a fixed cost reads no body");
}
