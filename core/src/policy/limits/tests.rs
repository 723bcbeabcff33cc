use super::*;

fn lim(rpm: Option<u64>, total: Option<u64>) -> Limits {
    Limits { rpm, total, spend: None }
}

const T0: u64 = 1_800_000_000;
const FAR: i64 = 1_900_000_000;

/// Admit at each second in `times`, returning the verdicts.
fn run(t: &mut Table, l: &Limits, times: &[u64]) -> Vec<Verdict> {
    times.iter().map(|s| t.admit("j", l, FAR, *s)).collect()
}

#[test]
fn total_is_a_lifetime_count() {
    let mut t = Table::default();
    let l = lim(None, Some(3));
    let v = run(&mut t, &l, &[T0, T0, T0 + 100, T0 + 5000]);
    assert_eq!(&v[..3], &[Verdict::Admit; 3]);
    assert!(matches!(v[3], Verdict::Exhausted { .. }));
    assert_eq!(t.used("j"), 3);
    // Refusals are not counted.
    assert!(matches!(t.admit("j", &l, FAR, T0 + 6000), Verdict::Exhausted { .. }));
    assert_eq!(t.used("j"), 3);
}

#[test]
fn exhausted_retry_after_is_the_time_left_on_the_credential() {
    let mut t = Table::default();
    let l = lim(None, Some(1));
    let keep = (T0 + 90) as i64;
    assert_eq!(t.admit("j", &l, keep, T0), Verdict::Admit);
    assert_eq!(t.admit("j", &l, keep, T0 + 30), Verdict::Exhausted { retry_after_s: 60 });
    assert_eq!(t.admit("j", &l, keep, T0 + 89), Verdict::Exhausted { retry_after_s: 1 });
}

#[test]
fn rpm_allows_n_then_refuses_with_the_wait() {
    let mut t = Table::default();
    let l = lim(Some(3), None);
    assert_eq!(run(&mut t, &l, &[T0, T0 + 10, T0 + 20]), vec![Verdict::Admit; 3]);
    // The first request (second T0) leaves the window once it is more than 60 s old: bucket T0
    // still overlaps a window ending in second T0+60, so the wait from T0+30 is 31 s.
    assert_eq!(t.admit("j", &l, FAR, T0 + 30), Verdict::RateLimited { retry_after_s: 31 });
    assert_eq!(t.admit("j", &l, FAR, T0 + 60), Verdict::RateLimited { retry_after_s: 1 });
    assert_eq!(t.admit("j", &l, FAR, T0 + 61), Verdict::Admit);
    assert_eq!(t.admit("j", &l, FAR, T0 + 62), Verdict::RateLimited { retry_after_s: 9 });
}

#[test]
fn rpm_retry_after_is_exact_for_a_burst() {
    let mut t = Table::default();
    let l = lim(Some(5), None);
    assert_eq!(run(&mut t, &l, &[T0; 5]), vec![Verdict::Admit; 5]);
    assert_eq!(t.admit("j", &l, FAR, T0), Verdict::RateLimited { retry_after_s: 61 });
    assert_eq!(t.admit("j", &l, FAR, T0 + 61), Verdict::Admit);
}

/// The guarantee itself: whatever the arrival pattern, no 60-second window (in milliseconds, at
/// any offset) ever holds more than `rpm` admitted requests.
#[test]
fn no_sixty_second_window_ever_exceeds_rpm() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for rpm in [1u64, 2, 7, 30] {
        let mut t = Table::default();
        let l = lim(Some(rpm), None);
        let mut now_ms = T0 * 1000;
        let mut admitted: Vec<u64> = Vec::new();
        for _ in 0..3000 {
            now_ms += rnd(4000);
            if t.admit("j", &l, FAR, now_ms / 1000) == Verdict::Admit {
                admitted.push(now_ms);
            }
        }
        assert!(admitted.len() as u64 > rpm * 10, "the limiter must not starve: {}", admitted.len());
        for (i, start) in admitted.iter().enumerate() {
            let within = admitted[i..].iter().take_while(|x| **x <= start + 60_000).count() as u64;
            assert!(within <= rpm, "rpm {rpm}: {within} requests within 60 s from {start}");
        }
    }
}

#[test]
fn rpm_and_total_together() {
    let mut t = Table::default();
    let l = lim(Some(2), Some(3));
    assert_eq!(run(&mut t, &l, &[T0, T0]), vec![Verdict::Admit; 2]);
    assert!(matches!(t.admit("j", &l, FAR, T0 + 1), Verdict::RateLimited { .. }));
    assert_eq!(t.admit("j", &l, FAR, T0 + 61), Verdict::Admit);
    // The quota wins over the rate once it is spent.
    assert!(matches!(t.admit("j", &l, FAR, T0 + 200), Verdict::Exhausted { .. }));
}

#[test]
fn credentials_are_counted_separately() {
    let mut t = Table::default();
    let l = lim(None, Some(1));
    assert_eq!(t.admit("a", &l, FAR, T0), Verdict::Admit);
    assert_eq!(t.admit("b", &l, FAR, T0), Verdict::Admit);
    assert!(matches!(t.admit("a", &l, FAR, T0), Verdict::Exhausted { .. }));
    assert_eq!(t.len(), 2);
}

#[test]
fn records_expire_with_their_credential() {
    let mut t = Table::default();
    let l = lim(None, Some(1));
    assert_eq!(t.admit("old", &l, (T0 + 10) as i64, T0), Verdict::Admit);
    assert_eq!(t.admit("new", &l, FAR, T0 + 5), Verdict::Admit);
    assert_eq!(t.len(), 2);
    // At keep_until the old credential is refused by the token check anyway; its record goes.
    assert_eq!(t.admit("new2", &l, FAR, T0 + 10), Verdict::Admit);
    assert_eq!(t.len(), 2);
    assert_eq!(t.used("old"), 0);
}

#[test]
fn a_full_shard_refuses_new_credentials_but_serves_known_ones() {
    let mut t = Table::default();
    let l = lim(None, Some(5));
    for i in 0..MAX_RECORDS_PER_SHARD {
        assert_eq!(t.admit(&format!("j{i}"), &l, FAR, T0), Verdict::Admit);
    }
    assert_eq!(t.admit("one-too-many", &l, FAR, T0), Verdict::Full);
    assert_eq!(t.admit("j7", &l, FAR, T0), Verdict::Admit);
    // Once credentials expire there is room again.
    let mut t2 = Table::default();
    for i in 0..MAX_RECORDS_PER_SHARD {
        assert_eq!(t2.admit(&format!("j{i}"), &l, (T0 + 1) as i64, T0), Verdict::Admit);
    }
    assert_eq!(t2.admit("later", &l, FAR, T0 + 1), Verdict::Admit);
    assert_eq!(t2.len(), 1);
}

#[test]
fn buckets_stay_bounded_under_steady_traffic() {
    let mut t = Table::default();
    let l = lim(Some(1_000_000), None);
    for s in 0..10_000u64 {
        assert_eq!(t.admit("j", &l, FAR, T0 + s), Verdict::Admit);
    }
    let r = &t.records[0];
    assert_eq!(r.buckets.len(), WINDOW_BUCKETS as usize);
    assert_eq!(r.in_window(T0 + 9_999, 0), 61);
    assert!(t.encode().len() < 400);
}

#[test]
fn encoding_round_trips_and_rejects_garbage() {
    let mut t = Table::default();
    let l = lim(Some(10), Some(100));
    for (i, s) in [0u64, 0, 3, 17, 59, 60].iter().enumerate() {
        assert_eq!(t.admit(&format!("j{}", i % 3), &l, FAR, T0 + s), Verdict::Admit);
    }
    let b = t.encode();
    assert_eq!(Table::decode(&b), Some(t.clone()));
    assert_eq!(Table::decode(&Table::default().encode()), Some(Table::default()));
    assert_eq!(Table::decode(b""), None);
    assert_eq!(Table::decode(b"KWR1\0\0\0\0"), None);
    for cut in 0..b.len() {
        assert_eq!(Table::decode(&b[..cut]), None, "a table cut at {cut} must not decode");
    }
    let mut trailing = b.clone();
    trailing.push(0);
    assert_eq!(Table::decode(&trailing), None);
}

fn spend(cap: u64) -> Limits {
    Limits { spend: Some(cap), ..Limits::default() }
}

fn charge(cost: u64, retry: Option<u8>) -> Charge {
    Charge { cost, retry: retry.map(|b| [b; 16]) }
}

#[test]
fn spend_reserves_up_to_the_cap_and_never_past_it() {
    let mut t = Table::default();
    let l = spend(10_000);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(6_000, None))), Verdict::Reserved);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(4_001, None))), Verdict::SpendExhausted { retry_after_s: (FAR as u64 - T0) as u32 });
    assert_eq!((t.spent("j"), t.used("j")), (6_000, 1), "a refused cost reserves nothing and is not counted");
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(4_000, None))), Verdict::Reserved);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1, None))), Verdict::SpendExhausted { retry_after_s: (FAR as u64 - T0) as u32 });
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(0, None))), Verdict::Reserved, "a free request still fits");
    assert_eq!(t.spent("j"), 10_000);
    // Overflow is a refusal, not a wrap.
    let mut t = Table::default();
    let l = spend(u64::MAX);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(u64::MAX, None))), Verdict::Reserved);
    assert!(matches!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1, None))), Verdict::SpendExhausted { .. }));
}

#[test]
fn counts_refuse_before_spend_reserves() {
    let mut t = Table::default();
    let l = Limits { total: Some(1), spend: Some(100), ..Limits::default() };
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(10, None))), Verdict::Reserved);
    assert!(matches!(t.admit_charged("j", &l, FAR, T0, Some(&charge(10, None))), Verdict::Exhausted { .. }));
    assert_eq!(t.spent("j"), 10, "a request refused for its count reserves nothing");
}

#[test]
fn without_a_cap_or_a_charge_nothing_is_reserved() {
    let mut t = Table::default();
    assert_eq!(t.admit_charged("j", &lim(None, Some(5)), FAR, T0, Some(&charge(10, Some(1)))), Verdict::Admit);
    assert_eq!(t.admit_charged("k", &spend(5), FAR, T0, None), Verdict::Admit);
    assert_eq!((t.spent("j"), t.spent("k")), (0, 0));
}

#[test]
fn a_retry_with_the_same_key_and_cost_is_not_charged_again() {
    let mut t = Table::default();
    let l = spend(1_000);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(800, Some(1)))), Verdict::Reserved);
    assert_eq!(t.admit_charged("j", &l, FAR, T0 + 5, Some(&charge(800, Some(1)))), Verdict::Retry);
    assert_eq!(t.admit_charged("j", &l, FAR, T0 + 6, Some(&charge(800, Some(1)))), Verdict::Retry);
    assert_eq!((t.spent("j"), t.used("j")), (800, 3), "retries count as requests, not as spend");
    // Another key, or the same key with another cost, is a new charge.
    assert!(matches!(t.admit_charged("j", &l, FAR, T0, Some(&charge(800, Some(2)))), Verdict::SpendExhausted { .. }));
    assert!(matches!(t.admit_charged("j", &l, FAR, T0, Some(&charge(801, Some(1)))), Verdict::SpendExhausted { .. }));
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(200, Some(1)))), Verdict::Reserved);
    assert_eq!(t.spent("j"), 1_000);
}

#[test]
fn refunds_release_the_cost_and_the_retry() {
    let mut t = Table::default();
    let l = spend(1_000);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1_000, Some(7)))), Verdict::Reserved);
    assert!(t.refund("j", &charge(1_000, Some(7))));
    assert_eq!(t.spent("j"), 0);
    // The refunded key is charged anew (the vendor did not charge it; a retry may).
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1_000, Some(7)))), Verdict::Reserved);
    assert!(!t.refund("gone", &charge(1, None)), "nothing to refund for an unknown credential");
    assert!(t.refund("j", &charge(5_000, None)));
    assert_eq!(t.spent("j"), 0, "a refund never goes below zero");
}

#[test]
fn held_reservations_are_bounded_and_expire() {
    let mut t = Table::default();
    let l = spend(u64::MAX);
    for k in 0..=MAX_HELD as u8 {
        assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1, Some(k)))), Verdict::Reserved);
    }
    // The oldest was forgotten: its retry is charged again (more, never less).
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1, Some(0)))), Verdict::Reserved);
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(1, Some(MAX_HELD as u8)))), Verdict::Retry);
    // Past the retry window, a retry is a new charge.
    assert_eq!(t.admit_charged("j", &l, FAR, T0 + RETRY_WINDOW_S, Some(&charge(1, Some(MAX_HELD as u8)))), Verdict::Reserved);
    assert!(t.encode().len() < 8 + 64 + MAX_HELD * 32 + 400);
}

#[test]
fn spend_survives_encoding_and_old_shards_read_as_unspent() {
    let mut t = Table::default();
    let l = Limits { rpm: Some(5), total: Some(9), spend: Some(100) };
    assert_eq!(t.admit_charged("j", &l, FAR, T0, Some(&charge(40, Some(3)))), Verdict::Reserved);
    let b = t.encode();
    let back = Table::decode(&b);
    assert_eq!(back.as_ref(), Some(&t));
    for cut in 0..b.len() {
        assert_eq!(Table::decode(&b[..cut]), None, "cut at {cut}");
    }
    // A version-1 shard: the same record without its spend.
    let mut v1 = Table::default();
    assert_eq!(v1.admit("j", &l, FAR, T0), Verdict::Admit);
    let mut bytes = v1.encode();
    bytes.truncate(bytes.len() - 9);
    bytes[..4].copy_from_slice(b"KWL1");
    let old = Table::decode(&bytes);
    assert_eq!(old.as_ref().map(|t| (t.used("j"), t.spent("j"))), Some((1, 0)));
}
