use super::*;
use crate::ledger::Caps;

fn ledger() -> Ledger {
    Ledger {
        cluster: "dynamodb".into(),
        authority: "dynamodb.us-east-1.amazonaws.com".into(),
        table: "keyward-ledger".into(),
        timeout_ms: 800,
        lease_s: 60,
        budgets: vec![],
        scope: String::new(),
    }
}

fn account() -> Account {
    Account { pk: "c/00000000000000aa/j-1".into(), caps: Caps { spend: Some(10_000), count: Some(10) }, ends_s: 1_899_996_400, ttl_s: 1_900_000_000 }
}

fn body(c: &HttpCall) -> Value {
    json::parse(c.body.as_deref().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"))
}

fn header_of(c: &HttpCall, name: &str) -> String {
    c.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.expose_str()).unwrap_or_default().to_string()
}

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

#[test]
fn a_top_up_is_one_conditional_update_made_at_most_once() {
    let change = Change::Grant {
        gateway: "0a1b".into(),
        old: Some((42, 3)),
        add: Amounts { spend: 500, count: 3 },
        new: Lease { id: 42, seq: 4, granted: Amounts { spend: 1100, count: 7 }, expires_s: 1_800_000_060 },
        prune: vec!["r_00112233445566778899aabbccddeeff".into()],
    };
    let c = update(&ledger(), &account(), &change);
    assert_eq!((c.cluster.as_str(), c.timeout_ms), ("dynamodb", 800));
    assert_eq!(header_of(&c, "x-amz-target"), "DynamoDB_20120810.UpdateItem");
    assert_eq!(header_of(&c, ":authority"), "dynamodb.us-east-1.amazonaws.com");
    let b = body(&c);
    assert_eq!(s(&b, "TableName"), "keyward-ledger");
    let names = b.get("ExpressionAttributeNames").and_then(Value::as_object).unwrap_or_default();
    let name = |attr: &str| names.iter().find(|(_, v)| v.as_str() == Some(attr)).map(|(k, _)| k.clone()).unwrap_or_else(|| panic!("{attr}"));
    let (sp, n, l, t) = (name("s"), name("n"), name("l_0a1b"), name("ttl"));
    let update = s(&b, "UpdateExpression");
    assert!(update.starts_with("SET ") && update.contains(&format!("{sp} = if_not_exists({sp}, ")) && update.contains(&format!("{t} = ")), "{update}");
    assert!(update.contains("REMOVE ") && update.contains(&name("r_00112233445566778899aabbccddeeff")), "{update}");
    let cond = s(&b, "ConditionExpression");
    assert!(cond.contains(&format!("(attribute_not_exists({sp}) OR {sp} <= ")) && cond.contains(&format!("(attribute_not_exists({n}) OR {n} <= ")), "{cond}");
    let (i, q) = (name("i"), name("q"));
    assert!(cond.contains(&format!("{l}.{i} = ")) && cond.contains(&format!("{l}.{q} = ")), "only on the lease as it was: {cond}");
    assert!(update.contains(&format!("{l}.{sp} = {l}.{sp} + ")), "{update}");
    // The caps less the net grant: held + 500 <= 10000 and held + 3 <= 10.
    let values = b.get("ExpressionAttributeValues").and_then(Value::as_object).unwrap_or_default();
    let nums: Vec<String> = values.iter().filter_map(|(_, v)| v.get("N").and_then(Value::as_str).map(str::to_string)).collect();
    for want in ["500", "9500", "3", "7", "42", "4", "1900000000"] {
        assert!(nums.iter().any(|n| n == want), "{want} in {nums:?}");
    }
    assert_eq!(s(&b, "ReturnValues"), "ALL_NEW");
}

#[test]
fn giving_back_never_asks_for_room_only_the_lease_as_counted_and_a_first_lease_needs_none_recorded() {
    let b = body(&update(&ledger(), &account(), &Change::Return { gateway: "0a1b".into(), old: (42, 3), back: Amounts { spend: 100, count: 0 }, at_s: 7 }));
    let cond = s(&b, "ConditionExpression");
    assert!(!cond.contains("<="), "{cond}");
    assert_eq!(cond.matches(" = ").count(), 2, "its id and its sequence: {cond}");
    assert!(!s(&b, "UpdateExpression").contains("REMOVE"), "an end mark stays, so that a replayed first grant is refused");
    let first = Change::Grant {
        gateway: "0a1b".into(),
        old: None,
        add: Amounts { spend: 5, count: 0 },
        new: Lease { id: 1, seq: 1, granted: Amounts { spend: 5, count: 0 }, expires_s: 9 },
        prune: vec![],
    };
    let b = body(&update(&ledger(), &account(), &first));
    let cond = s(&b, "ConditionExpression");
    assert!(cond.contains("attribute_not_exists") && cond.contains(" < "), "only if this gateway holds none, and its last lease was older: {cond}");
}

#[test]
fn answers_are_read_strictly() {
    let a = account();
    let ok = br#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"s":{"N":"700"},"n":{"N":"3"},"ttl":{"N":"1900000000"},
        "l_0a1b":{"M":{"i":{"N":"42"},"q":{"N":"4"},"s":{"N":"600"},"n":{"N":"4"},"e":{"N":"1800000060"}}},"r_00112233445566778899aabbccddeeff":{"N":"1800086400"},
        "l_0c0d":{"M":{"i":{"N":"17"},"q":{"N":"0"},"s":{"N":"0"},"n":{"N":"0"},"e":{"N":"1700000000"}}}}}"#;
    let Answer::Done(Some(item)) = answer(&a, Some(200), Some(ok)) else { panic!("{:?}", answer(&a, Some(200), Some(ok))) };
    assert_eq!(item.held, Amounts { spend: 700, count: 3 });
    assert_eq!(item.lease_of("0a1b").map(|l| l.id), Some(42));
    assert!(item.has_mark("r_00112233445566778899aabbccddeeff"));
    assert_eq!((item.lease_of("0c0d"), item.ended_of("0c0d")), (None, Some(17)), "an end mark is no lease");
    assert_eq!(item.stale_marks("0a1b", 1_700_000_001), vec!["l_0c0d".to_string()]);
    assert!(item.stale_marks("0c0d", 1_700_000_001).is_empty(), "never a gateway's own");
    assert_eq!(answer(&a, Some(200), Some(b"{}")), Answer::Done(None), "a read of no item");
    assert_eq!(
        answer(&a, Some(400), Some(br#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException","message":"x"}"#)),
        Answer::ConditionFailed
    );
    for throttled in ["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"] {
        let b = format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{throttled}"}}"#);
        assert_eq!(answer(&a, Some(400), Some(b.as_bytes())), Answer::Throttled);
    }
    for (status, bad) in [
        (200, r#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"s":{"N":"-5"}}}"#),
        (200, r#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"s":{"N":"1e3"}}}"#),
        (200, r#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"s":{"S":"5"}}}"#),
        (200, r#"{"Attributes":{"pk":{"S":"c/other/j-2"},"s":{"N":"5"}}}"#),
        (200, r#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"extra":{"N":"5"}}}"#),
        (200, r#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"l_0a1b":{"M":{"i":{"N":"1"}}}}}"#),
        (200, r#"{"Attributes":{"pk":{"S":"c/00000000000000aa/j-1"},"l_0a1b":{"M":{"i":{"N":"1"},"q":{"N":"0"},"s":{"N":"5"},"n":{"N":"0"},"e":{"N":"1"}}}}}"#),
        (200, r#"{"Attributes":[]}"#),
        (200, r#"{"Surprise":{}}"#),
        (200, r#"<html>"#),
        (500, r#"{"__type":"InternalServerError"}"#),
        (400, r#"{"__type":"com.amazonaws.dynamodb.v20120810#ValidationException"}"#),
    ] {
        assert!(matches!(answer(&a, Some(status), Some(bad.as_bytes())), Answer::Failed(_)), "{status} {bad}");
    }
    assert!(matches!(answer(&a, None, None), Answer::Failed(_)));
    assert!(matches!(answer(&a, Some(200), None), Answer::Failed(_)), "too large to read");
}
