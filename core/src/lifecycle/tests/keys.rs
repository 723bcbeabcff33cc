//! Shared-data names and signing keys: several configurations in one VM, reconfiguration, and
//! key rotation with the verified-credential cache warm.

use super::*;

const BAO_B: &str = r#"{"type":"vault_kv2","cluster":"vault","authority":"vault.internal","mount":"tenant-b","token_env":"VAULT_TOKEN","timeout_ms":1000}"#;

#[test]
fn two_configurations_in_one_vm_never_share_a_secret_of_another_mount() {
    // Two listeners, one vm_id: the same local store name and path, different mounts.
    let mut ha = MemHost::new(ROOT);
    let mut hb = ha.worker(2);
    let mut a = worker(&mut ha, config());
    let mut b = worker(&mut hb, config_with(BAO_B, ""));
    assert_ne!(a.secret_name(0), b.secret_name(0));
    let call = cold_fetch(&mut a, &mut ha, 10);
    a.handle(ha.now_us(), &mut ha, Event::Answer { call, answer: stripe_answer() });
    // B must fetch its own, from its own mount, not serve A's key.
    hb.take();
    assert_eq!(send_request(&mut b, &mut hb, 20), Action::Pause);
    b.handle(hb.now_us(), &mut hb, Event::Woken);
    let effects = hb.take();
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, .. } if path == "/v1/tenant-b/data/stripe")), "{effects:?}");
    let call = only_call(&effects);
    b.handle(hb.now_us(), &mut hb, Event::Answer { call, answer: kv(r#"{"api_key":"sk_test_tenant_b"}"#, 1) });
    assert_eq!(injected(&hb, 20).as_deref(), Some("Bearer sk_test_tenant_b"));
    assert_eq!(send_request(&mut a, &mut ha, 11), Action::Continue);
    assert_eq!(injected(&ha, 11), Some(format!("Bearer {STRIPE_KEY}")));
}

#[test]
fn two_identical_configurations_share_one_record() {
    let mut ha = MemHost::new(ROOT);
    let mut hb = ha.worker(2);
    let mut a = worker(&mut ha, config());
    let mut b = worker(&mut hb, config());
    assert_eq!(a.secret_name(0), b.secret_name(0));
    let call = cold_fetch(&mut a, &mut ha, 10);
    a.handle(ha.now_us(), &mut ha, Event::Answer { call, answer: stripe_answer() });
    assert_eq!(send_request(&mut b, &mut hb, 20), Action::Continue, "the very same document: one fetch serves both");
}

#[test]
fn a_reconfiguration_that_repoints_a_store_never_serves_the_old_value() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config());
    let call = cold_fetch(&mut lc, &mut host, 10);
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    // A call in flight under the old configuration answers after the reload: ignored.
    send_request(&mut lc, &mut host, 11);
    lc.configure(host.now_us(), &mut host, config_with(BAO_B, ""));
    host.take();
    assert!(lc.calls().is_empty());
    assert_eq!(send_request(&mut lc, &mut host, 12), Action::Pause, "a new mount: nothing cached for it");
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let effects = host.take();
    assert!(effects.iter().any(|e| matches!(e, Effect::Dispatch { path, .. } if path == "/v1/tenant-b/data/stripe")), "{effects:?}");
}

#[test]
fn names_carry_no_secret_and_are_scoped_by_store_identity() {
    let mut host = MemHost::new(ROOT);
    let _lc = worker(&mut host, config_with(BAO, r#","revocation":{"store":"bao","path":"keyward/revoked","refresh_s":5}"#));
    for k in host.shared_keys() {
        assert!(k.starts_with("keyward/v3/"), "{k}");
        assert!(!k.contains("root-token"), "{k}");
    }
}

const KEYSET: &str = r#","signing_keyset":{"store":"bao","path":"keyward/keys"}"#;
const OLD: &[u8] = b"old-store-held-signing-key-32byt";
const NEW: &[u8] = b"new-store-held-signing-key-32byt";

fn keyset(kid: &str, key: &[u8], version: u32) -> Answer {
    kv(&format!(r#"{{"{kid}":"{}"}}"#, b64::std_encode(key)), version)
}

#[test]
fn a_rotated_out_key_is_refused_at_once_even_with_the_verified_cache_warm() {
    let mut host = MemHost::new(ROOT);
    let mut lc = worker(&mut host, config_with(BAO, KEYSET));
    let now = host.now_ms();
    let old_token = token_with(OLD, "ks1", "j-old", now);
    // Cold: the key set, then the secret.
    host.open(10, "stripe", &[(":method", "GET"), (":path", "/v1/x"), ("authorization", &format!("Bearer {old_token}"))]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(10)), Action::Pause);
    lc.handle(host.now_us(), &mut host, Event::Woken);
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: keyset("ks1", OLD, 1) });
    let call = only_call(&host.take());
    lc.handle(host.now_us(), &mut host, Event::Answer { call, answer: stripe_answer() });
    assert!(host.take().contains(&Effect::Resume(10)));
    // Warm: verified once, remembered.
    host.open(11, "stripe", &[(":method", "GET"), (":path", "/v1/x"), ("authorization", &format!("Bearer {old_token}"))]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(11)), Action::Continue);
    // The key set is rotated (same kid, new bytes) by another worker's fetch.
    let name = (0..4).filter_map(|i| lc.secret_name(i)).find(|n| n.ends_with("keyward/keys")).map(str::to_string).unwrap_or_default();
    let mut st: crate::secrets::slot_state::SlotState = super::super::shared::read(&host, &name);
    if let Some(e) = st.entry.as_mut() {
        e.data.fields = vec![("ks1".into(), crate::secret::Secret::text(&b64::std_encode(NEW)))];
        e.fetched_at_ms = host.now_ms() + 1;
    }
    assert!(host.shared_set(&name, &st.encode(), None).is_ok());
    host.advance(200);
    // The very next request with the old token is refused, although it verified a moment ago.
    host.open(12, "stripe", &[(":method", "GET"), (":path", "/v1/x"), ("authorization", &format!("Bearer {old_token}"))]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(12)), Action::Pause);
    assert_eq!(replies(&host.take()), vec![(12, 401, "invalid_credential".into())]);
    // A token signed with the new key is accepted.
    let new_token = token_with(NEW, "ks1", "j-new", host.now_ms());
    host.open(13, "stripe", &[(":method", "GET"), (":path", "/v1/x"), ("authorization", &format!("Bearer {new_token}"))]);
    assert_eq!(lc.handle(host.now_us(), &mut host, Event::Request(13)), Action::Continue);
}

#[test]
fn key_identity_is_the_key_bytes_not_an_address() {
    let id = {
        let a = std::rc::Rc::new(HmacKey::new(OLD).unwrap_or_else(|e| panic!("{e}")));
        a.id()
    };
    // A new key allocated where the old one was must not look like it.
    let b = HmacKey::new(NEW).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(b.id(), id);
    assert_eq!(HmacKey::new(OLD).map(|k| k.id()).ok(), Some(id), "the same bytes: the same identity in every worker");
}

#[test]
fn aws_store_names_carry_a_scope_only_the_configuration_s_keys_give() {
    let aws = r#"{"type":"aws_secrets_manager","cluster":"sm","authority":"secretsmanager.us-east-1.amazonaws.com"}"#;
    let names = |key_env: &str| {
        let env = |n: &str| match n {
            "K_A" => Some(b64::std_encode(b"a-signing-key-of-32-bytes-length")),
            "K_B" => Some(b64::std_encode(b"b-signing-key-of-32-bytes-length")),
            _ => None,
        };
        let json = format!(
            r#"{{"audience":"keyward","signing_keys":{{"k1":{{"env":"{key_env}"}}}},"stores":{{"aws":{aws}}},"targets":{{"openai":{{"credential":"bearer","secret":{{"store":"aws","path":"keyward/openai","field":"api_key"}},"inject":{{"type":"bearer"}}}}}}}}"#
        );
        let cfg = crate::config::compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
        cfg.stores.first().map(|st| crate::secrets::keys::secret(st, "keyward/openai")).unwrap_or_default()
    };
    let (a, b) = (names("K_A"), names("K_B"));
    assert_ne!(a, b, "two configurations with different keys never share (or can guess) an AWS record");
    assert_eq!(a, names("K_A"), "the same configuration names it the same in every worker");
    let predictable = "keyward/v3/secret/6:aws-sm/2:sm/38:secretsmanager.us-east-1.amazonaws.com/";
    assert!(a.starts_with(predictable) && a.len() > predictable.len() + 32, "{a}");
    assert!(!a.contains("signing-key"));
}
