use super::*;

const T0: u64 = 1_800_000_000_000;

fn t() -> Timing {
    // ttl 10 s, stale 20 s: ahead 2 s, retry 1 s, suspect every 5 s.
    Timing::new(10, 20)
}

fn fetched(v: &str) -> Fetched {
    Fetched { fields: vec![("k".into(), Secret::text(v))], version: Some("3".into()), problems: vec![] }
}

fn warm() -> SlotState {
    let mut s = SlotState::default();
    s.record(Ok(fetched("v1")), T0);
    s
}

const TRANSIENT: Failure = Failure { at_ms: 0, transient: true };

fn fail(transient: bool, at_ms: u64) -> Result<Fetched, Failure> {
    Err(Failure { at_ms, transient })
}

#[test]
fn timing_defaults() {
    assert_eq!(Timing::new(300, 900).ahead_ms, 30_000);
    assert_eq!(Timing::new(10, 0).ahead_ms, 2_000);
    assert_eq!(Timing::new(1, 0).ahead_ms, 200);
    assert_eq!(TRANSIENT.at_ms, 0);
}

#[test]
fn cold_fetches_then_fresh_until_the_ttl() {
    let s = SlotState::default();
    assert_eq!(s.classify(T0, &t()), Use::Fetch);
    let s = warm();
    assert_eq!(s.classify(T0, &t()), Use::Fresh);
    assert_eq!(s.classify(T0 + 9_999, &t()), Use::Fresh);
    assert_eq!(s.classify(T0 + 10_000, &t()), Use::Fetch);
}

#[test]
fn refresh_ahead_starts_before_the_ttl_and_only_once() {
    let mut s = warm();
    assert!(!s.refresh_due(T0 + 7_999, &t()));
    assert!(s.refresh_due(T0 + 8_000, &t()));
    assert!(s.take_lease(T0 + 8_000, 3_000));
    assert!(!s.refresh_due(T0 + 8_200, &t()), "a lease is held");
    let mut other = s.clone();
    assert!(!other.take_lease(T0 + 8_200, 3_000), "only one worker fetches");
    // Still fresh meanwhile: no request waits.
    assert_eq!(s.classify(T0 + 9_000, &t()), Use::Fresh);
    s.record(Ok(fetched("v2")), T0 + 9_000);
    assert!(!s.lease_held(T0 + 9_000));
    assert_eq!(s.classify(T0 + 18_999, &t()), Use::Fresh);
    // An unanswered lease expires, and another worker may take it.
    let mut s = warm();
    assert!(s.take_lease(T0 + 8_000, 3_000));
    assert!(s.lease_held(T0 + 10_999));
    assert!(s.refresh_due(T0 + 11_000, &t()));
    assert!(s.take_lease(T0 + 11_000, 3_000));
}

#[test]
fn transient_failure_serves_stale_within_the_window_then_503() {
    let mut s = warm();
    s.record(fail(true, T0 + 8_000), T0 + 8_000);
    assert!(s.entry.is_some(), "a transient failure keeps the value");
    assert_eq!(s.classify(T0 + 9_000, &t()), Use::Fresh, "fresh values are not stale");
    assert_eq!(s.classify(T0 + 10_000, &t()), Use::Stale);
    assert_eq!(s.classify(T0 + 29_999, &t()), Use::Stale);
    // Past ttl + stale_if_error: a recent failure answers 503 at once, an older one fetches again.
    let mut late = s.clone();
    late.record(fail(true, T0 + 30_000), T0 + 30_000);
    assert_eq!(late.classify(T0 + 30_500, &t()), Use::Failed);
    assert_eq!(late.classify(T0 + 31_000, &t()), Use::Fetch);
    // While stale, the background retries once per retry_ms.
    assert!(!s.refresh_due(T0 + 8_500, &t()));
    assert!(s.refresh_due(T0 + 9_000, &t()));
    // Recovery: fresh again, the failure forgotten.
    s.record(Ok(fetched("v2")), T0 + 12_000);
    assert_eq!(s.classify(T0 + 12_000, &t()), Use::Fresh);
    assert!(s.failure.is_none());
}

#[test]
fn no_stale_window_means_503_right_after_the_ttl() {
    let t0 = Timing::new(10, 0);
    let mut s = warm();
    s.record(fail(true, T0 + 10_000), T0 + 10_000);
    assert_eq!(s.classify(T0 + 10_001, &t0), Use::Failed);
}

#[test]
fn authoritative_answers_evict_and_are_never_served_stale() {
    let mut s = warm();
    s.record(fail(false, T0 + 10_000), T0 + 10_000);
    assert!(s.entry.is_none());
    assert_eq!(s.classify(T0 + 10_000, &t()), Use::Failed);
    assert_eq!(s.classify(T0 + 11_000, &t()), Use::Fetch, "asked again after retry_ms");
    assert!(!s.refresh_due(T0 + 11_000, &t()), "nothing in use to refresh");
}

#[test]
fn cold_failure_is_remembered_for_retry_ms() {
    let mut s = SlotState::default();
    s.record(fail(true, T0), T0);
    assert_eq!(s.classify(T0 + 999, &t()), Use::Failed);
    assert_eq!(s.classify(T0 + 1_000, &t()), Use::Fetch);
}

#[test]
fn vendor_rejection_makes_the_next_request_fetch_rate_limited() {
    let mut s = warm();
    assert!(s.mark_suspect(T0, T0 + 1_000, &t()));
    assert_eq!(s.classify(T0 + 1_000, &t()), Use::Fetch);
    assert!(s.refresh_due(T0 + 1_000, &t()));
    assert!(!s.mark_suspect(T0, T0 + 1_100, &t()), "already suspect");
    // The same value comes back: fresh, and it cannot be marked again for 5 s.
    s.record(Ok(fetched("v1")), T0 + 1_200);
    assert_eq!(s.classify(T0 + 1_300, &t()), Use::Fresh);
    assert!(!s.mark_suspect(T0 + 1_200, T0 + 3_000, &t()));
    assert!(s.mark_suspect(T0 + 1_200, T0 + 6_000, &t()));
    // A rejection of an older value than the current one changes nothing.
    let mut s = warm();
    s.record(Ok(fetched("v2")), T0 + 2_000);
    assert!(!s.mark_suspect(T0, T0 + 8_000, &t()));
    // Suspect and the store down: the old value is served stale rather than nothing.
    let mut s = warm();
    assert!(s.mark_suspect(T0, T0 + 1_000, &t()));
    s.record(fail(true, T0 + 1_100), T0 + 1_100);
    assert_eq!(s.classify(T0 + 1_200, &t()), Use::Stale);
}

#[test]
fn encoding_round_trips_and_refuses_garbage() {
    let mut s = warm();
    s.suspect_at_ms = T0 + 5;
    s.lease_until_ms = T0 + 7;
    s.record(fail(true, T0 + 9), T0 + 9);
    s.lease_until_ms = T0 + 11;
    let b = s.encode();
    let d = SlotState::decode(&b).unwrap_or_else(|| panic!("decode"));
    assert_eq!(d.lease_until_ms, T0 + 11);
    assert_eq!(d.suspect_at_ms, T0 + 5);
    assert_eq!(d.failure, Some(Failure { at_ms: T0 + 9, transient: true }));
    let e = d.entry.unwrap_or_else(|| panic!("entry"));
    assert_eq!(e.fetched_at_ms, T0);
    assert_eq!(e.data.version.as_deref(), Some("3"));
    assert_eq!(e.data.field("k").and_then(Secret::expose_str), Some("v1"));
    for n in 0..b.len() {
        assert!(SlotState::decode(&b[..n]).is_none(), "truncated to {n}");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert!(SlotState::decode(&longer).is_none());
    let empty = SlotState::default().encode();
    assert!(SlotState::decode(&empty).is_some_and(|s| s.entry.is_none() && s.failure.is_none()));
    assert!(SlotState::decode(b"KW1").is_none());
    // A field that was asked for but unusable stays known and empty.
    let mut s = SlotState::default();
    s.record(Ok(Fetched { fields: vec![("gone".into(), Secret::default())], version: None, problems: vec![] }), T0);
    let d = SlotState::decode(&s.encode()).unwrap_or_else(|| panic!("decode"));
    let e = d.entry.unwrap_or_else(|| panic!("entry"));
    assert!(e.data.field("gone").is_none() && e.data.covers("gone"));
}
