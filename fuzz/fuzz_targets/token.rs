//! Token parsing and verification on arbitrary input, and on inputs that are validly signed
//! (so the fuzzer reaches the claims parser and the policy checks, not just the MAC).
//! Properties: never panics; a token that verifies under the key was signed with it; a
//! credential that passes the policy is within its time bounds and for the audience.
#![no_main]
use keyward_core::credential::jwt::{self, HmacKey, Policy};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = HmacKey::new(b"keyward-fuzz-signing-key-32bytes") else { return };
    let policy = Policy { audience: "keyward".into(), issuer: None, clock_skew_s: 30, max_token_lifetime_s: 3600 };
    let (mode, rest) = match data.split_first() {
        Some((m, r)) => (*m, r),
        None => return,
    };
    let text = String::from_utf8_lossy(rest);
    // Even modes: the input is the token. Odd modes: the input is a claims document, signed.
    let tok = if mode % 2 == 0 { text.into_owned() } else { jwt::mint("k1", &key, &text) };
    let Ok(u) = jwt::parse(&tok) else { return };
    let Ok(payload) = u.verify(&key) else {
        assert!(mode % 2 == 0, "a token minted with the key must verify");
        return;
    };
    let Ok(c) = jwt::parse_claims(payload) else { return };
    if policy.check(&c, NOW).is_ok() {
        assert!(NOW < c.exp.saturating_add(30));
        assert!(c.exp.saturating_sub(NOW) <= 3630);
        assert!(c.aud.iter().any(|a| a == "keyward"));
    }
});
