use super::*;

const EXAMPLE: &str = include_str!("../../../tests/fixtures/contract-config.json");
// 32 bytes, base64: "keyward-test-signing-key-32bytes"
const K1: &str = "a2V5d2FyZC10ZXN0LXNpZ25pbmcta2V5LTMyYnl0ZXM=";

fn env(name: &str) -> Option<String> {
    match name {
        "KEYWARD_KEY_K1" => Some(K1.into()),
        "VAULT_TOKEN" => Some("root".into()),
        "SHORT" => Some("c2hvcnQ=".into()),
        "ROLE_ID" => Some("0d1e-role".into()),
        "SECRET_ID" => Some("5ec7-secret".into()),
        "SPACEY" => Some("a b".into()),
        _ => None,
    }
}

/// The example with the bao store logging in with AppRole instead of a token.
fn approle(a: serde_json::Value) -> String {
    edit(|v| {
        v["stores"]["bao"].as_object_mut().map(|o| o.remove("token_env"));
        v["stores"]["bao"]["approle"] = a;
    })
}

#[test]
fn approle_reads_role_and_secret_id_from_the_environment() {
    let c = compile_str(&approle(serde_json::json!({"role_id_env": "ROLE_ID", "secret_id_env": "SECRET_ID"}))).unwrap();
    let bao = c.stores.iter().find(|s| s.name == "bao").unwrap();
    let StoreKind::VaultKv2 { auth: VaultAuth::AppRole { mount, role_id, secret_id }, .. } = &bao.kind else { panic!("{:?}", bao.kind) };
    assert_eq!(mount, "approle");
    assert_eq!(role_id.expose_str(), Some("0d1e-role"));
    assert_eq!(secret_id.expose_str(), Some("5ec7-secret"));
    assert!(!format!("{c:?}").contains("5ec7"), "Debug of the configuration prints no secret_id");
    let c = compile_str(&approle(serde_json::json!({"role_id_env": "ROLE_ID", "secret_id_env": "SECRET_ID", "mount": "/team/approle/"}))).unwrap();
    let bao = c.stores.iter().find(|s| s.name == "bao").unwrap();
    assert!(matches!(&bao.kind, StoreKind::VaultKv2 { auth: VaultAuth::AppRole { mount, .. }, .. } if mount == "team/approle"));
}

fn compile_str(s: &str) -> Result<Config, ConfigError> {
    compile(s.as_bytes(), &env)
}

fn error_of(s: &str) -> String {
    match compile_str(s) {
        Ok(_) => panic!("accepted: {s}"),
        Err(e) => e.to_string(),
    }
}

fn edit(f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = match serde_json::from_str(EXAMPLE) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    f(&mut v);
    v.to_string()
}

#[test]
fn contract_example_compiles() {
    let c = match compile_str(EXAMPLE) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(c.policy.audience, "keyward");
    assert_eq!(c.policy.issuer.as_deref(), Some("https://issuer.example"));
    assert_eq!(c.targets.len(), 4);
    let (_, stripe) = match c.target("stripe") {
        Some(t) => t,
        None => panic!("no stripe"),
    };
    assert_eq!(stripe.credential, CredentialSource::Bearer);
    assert_eq!(stripe.allow.as_ref().map(Vec::len), Some(2));
    let (_, twilio) = match c.target("twilio") {
        Some(t) => t,
        None => panic!("no twilio"),
    };
    assert_eq!(c.slots[twilio.slot].fields, vec!["account_sid".to_string(), "auth_token".to_string()]);
    let (_, anthropic) = match c.target("anthropic") {
        Some(t) => t,
        None => panic!("no anthropic"),
    };
    assert_eq!(anthropic.credential, CredentialSource::Header("x-api-key".into()));
    assert!(matches!(c.store_of(anthropic.slot).map(|s| &s.kind), Some(StoreKind::AwsSecretsManager)));
    assert!(matches!(c.key("k1").map(|k| &k.source), Some(KeySource::Ready(_))));
    assert!(matches!(c.key("k2").map(|k| &k.source), Some(KeySource::Stored { .. })));
    assert!(c.key("k3").is_none());
    assert_eq!(c.revocation.as_ref().map(|r| r.refresh_s), Some(5));
    assert_eq!(c.revocation.as_ref().map(|r| r.max_stale_s), Some(300), "the default");
}

#[test]
fn summary_has_no_secrets() {
    let c = match compile_str(EXAMPLE) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let s = c.summary();
    assert!(s.contains("targets=[anthropic,maps,stripe,twilio]"), "{s}");
    assert!(!s.contains(K1) && !s.contains("root"), "{s}");
    assert!(!format!("{c:?}").contains("root"));
}

#[test]
fn shared_slots() {
    let s = edit(|v| {
        v["targets"]["stripe2"] = serde_json::json!({
            "credential": "bearer", "secret": {"store": "bao", "path": "stripe", "field": "restricted_key"},
            "inject": {"type": "bearer"}});
    });
    let c = match compile_str(&s) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let a = c.target("stripe").map(|(_, t)| t.slot);
    let b = c.target("stripe2").map(|(_, t)| t.slot);
    assert_eq!(a, b);
    let slot = &c.slots[a.unwrap_or_default()];
    assert_eq!(slot.fields, vec!["api_key".to_string(), "restricted_key".to_string()]);
}

#[test]
fn errors_name_the_path() {
    let cases: Vec<(String, &str)> = vec![
        (edit(|v| v["targets"]["stripe"]["secret"]["store"] = "bao2".into()), r#"targets.stripe.secret.store: unknown store "bao2""#),
        (edit(|v| v["targets"]["stripe"]["inject"]["foo"] = 1.into()), "targets.stripe.inject"),
        (edit(|v| v["targets"]["stripe"]["colour"] = 1.into()), "targets.stripe.colour: unknown field `colour`"),
        (edit(|v| v["auidence"] = "x".into()), "unknown field `auidence`"),
        (edit(|v| v["signing_keys"]["k1"]["env"] = "SHORT".into()), "signing_keys.k1.env: key is 5 bytes; at least 32 are required"),
        (edit(|v| v["signing_keys"]["k1"]["env"] = "MISSING_VAR".into()), "signing_keys.k1.env: environment variable MISSING_VAR is not set"),
        (edit(|v| v["signing_keys"]["k1"] = serde_json::json!({})), "signing_keys.k1: give exactly one of env or secret"),
        (edit(|v| v["signing_keys"] = serde_json::json!({})), "signing_keys: at least one signing key (or a signing_keyset) is required"),
        (edit(|v| v["stores"]["bao"]["token_env"] = "NOPE".into()), "stores.bao.token_env: environment variable NOPE is not set"),
        (edit(|v| v["stores"]["bao"]["type"] = "consul".into()), "stores.bao"),
        (edit(|v| v["stores"]["bao"]["token_env"] = "SPACEY".into()), "stores.bao.token_env: SPACEY has whitespace"),
        (
            edit(|v| {
                v["stores"]["bao"].as_object_mut().map(|o| o.remove("token_env"));
            }),
            "stores.bao: a vault_kv2 store needs token_env or approle",
        ),
        (
            edit(|v| v["stores"]["bao"]["approle"] = serde_json::json!({"role_id_env": "ROLE_ID", "secret_id_env": "SECRET_ID"})),
            "stores.bao: set token_env or approle, not both",
        ),
        (approle(serde_json::json!({"role_id_env": "ROLE_ID"})), "stores.bao: missing field `secret_id_env`"),
        (
            approle(serde_json::json!({"role_id_env": "ROLE_ID", "secret_id_env": "NOPE"})),
            "stores.bao.approle.secret_id_env: environment variable NOPE is not set",
        ),
        (approle(serde_json::json!({"role_id_env": "ROLE_ID", "secret_id_env": "SECRET_ID", "mount": "../x"})), "stores.bao.approle.mount"),
        (approle(serde_json::json!({"role_id_env": "ROLE_ID", "secret_id_env": "SECRET_ID", "secret_id": "inline"})), "unknown field `secret_id`"),
        (edit(|v| v["stores"]["bao"]["timeout_ms"] = 0.into()), "stores.bao.timeout_ms"),
        (edit(|v| v["stores"]["bao"]["namespace"] = "a//b".into()), "stores.bao.namespace"),
        (edit(|v| v["stores"]["aws"]["namespace"] = "a".into()), "stores.aws"),
        (edit(|v| v["targets"]["stripe"]["allow"][1] = "GET /v1/**/x".into()), "targets.stripe.allow[1]: "),
        (edit(|v| v["targets"]["stripe"]["allow"][0] = "post /v1".into()), "targets.stripe.allow[0]: "),
        (edit(|v| v["targets"]["stripe"]["credential"] = "cookie".into()), "targets.stripe.credential: unknown credential source"),
        (edit(|v| v["targets"]["stripe"]["credential"] = "header:host".into()), "targets.stripe.credential"),
        (edit(|v| v["targets"]["stripe"]["secret"]["path"] = "../etc".into()), "targets.stripe.secret.path"),
        (edit(|v| v["targets"]["stripe"]["secret"]["path"] = "a//b".into()), "targets.stripe.secret.path"),
        (
            edit(|v| {
                v["targets"]["stripe"]["secret"].as_object_mut().map(|o| o.remove("field"));
            }),
            "targets.stripe.secret.field",
        ),
        (edit(|v| v["targets"]["twilio"]["secret"]["field"] = "x".into()), "targets.twilio.secret.field"),
        (edit(|v| v["targets"]["anthropic"]["inject"]["name"] = "Host".into()), "targets.anthropic.inject.name"),
        (edit(|v| v["targets"]["maps"]["inject"]["name"] = "a&b".into()), "targets.maps.inject.name"),
        (edit(|v| v["targets"] = serde_json::json!({})), "targets: at least one target is required"),
        (edit(|v| v["revocation"]["store"] = "nope".into()), "revocation.store: unknown store"),
        (edit(|v| v["targets"]["stripe"]["require_idempotency_key"] = serde_json::json!(["post"])), "targets.stripe.require_idempotency_key[0]"),
        (edit(|v| v["targets"]["stripe"]["require_idempotency_key"] = serde_json::json!(["POST", "*"])), "targets.stripe.require_idempotency_key[1]"),
        (edit(|v| v["targets"]["stripe"]["require_idempotency_key"] = "POST".into()), "targets.stripe.require_idempotency_key"),
        (edit(|v| v["cache"]["ttl_s"] = 0.into()), "cache.ttl_s"),
        (edit(|v| v["clock_skew_s"] = (-1).into()), "clock_skew_s"),
        (edit(|v| v["audience"] = "".into()), "audience"),
        (
            edit(|v| {
                v.as_object_mut().map(|o| o.remove("audience"));
            }),
            "missing field `audience`",
        ),
        ("{\"audience\":\"a\",\"audience\":\"b\"}".to_string(), "duplicate object key"),
        ("not json".to_string(), "not valid JSON"),
        ("".to_string(), "not valid JSON"),
    ];
    for (doc, want) in cases {
        let got = error_of(&doc);
        assert!(got.contains(want), "want {want:?} in {got:?}");
    }
}

#[test]
fn idempotency_methods() {
    let c = match compile_str(&edit(|v| v["targets"]["stripe"]["require_idempotency_key"] = serde_json::json!(["POST", "PATCH"]))) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(c.target("stripe").map(|(_, t)| t.require_idempotency_key.clone()), Some(vec!["POST".to_string(), "PATCH".to_string()]));
    assert_eq!(c.target("twilio").map(|(_, t)| t.require_idempotency_key.len()), Some(0));
}

#[test]
fn no_target_reads_keywards_own_secrets() {
    // A target on the secret that holds a signing key, or the revocation list: refused, whatever
    // the field (a vendor would receive the signing key or the list).
    let on_key = edit(|v| {
        v["signing_keys"]["k2"] = serde_json::json!({"secret": {"store": "bao", "path": "keyward/signing", "field": "k2"}});
        v["targets"]["stripe"]["secret"] = serde_json::json!({"store": "bao", "path": "keyward/signing", "field": "api_key"});
    });
    let e = compile_str(&on_key).unwrap_err();
    assert!(e.path == "targets.stripe.secret" && e.message.contains("signing_keys.k2"), "{e}");
    let on_list = edit(|v| {
        let rev = v["revocation"].clone();
        v["targets"]["stripe"]["secret"] = serde_json::json!({"store": rev["store"], "path": rev["path"], "field": "api_key"});
    });
    let e = compile_str(&on_list).unwrap_err();
    assert!(e.path == "targets.stripe.secret" && e.message.contains("revocation"), "{e}");
}
