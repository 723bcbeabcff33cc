//! Configuration parsing on arbitrary documents: never panics, and an accepted configuration
//! is internally consistent (every target's slot and every slot's store exist).
#![no_main]
use keyward_core::config;
use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    match name {
        "KEYWARD_KEY_K1" => Some("a2V5d2FyZC10ZXN0LXNpZ25pbmcta2V5LTMyYnl0ZXM=".into()),
        "VAULT_TOKEN" | "ROLE_ID" | "SECRET_ID" => Some("fuzz-token".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = config::compile(data, &env) {
        for t in &c.targets {
            let slot = c.slots.get(t.slot);
            assert!(slot.is_some());
            assert!(slot.and_then(|s| c.stores.get(s.store)).is_some());
        }
        let _ = c.summary();
    }
});
