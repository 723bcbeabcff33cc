use super::*;

fn lim(rpm: Option<u64>, total: Option<u64>) -> Limits {
    Limits { rpm, total }
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
