//! Process-wide shared data with a compare-and-swap, the semantics proxy-wasm's shared data gives
//! the wasm executor (`get` returns the value and its CAS; `set` with a CAS writes only if the
//! entry still has it; a CAS for an entry that does not exist is accepted; every write gets a new
//! CAS). Every worker of the process reads and writes here, under one lock held for a copy.

use keyward_core::host::HostError;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

#[derive(Default)]
struct Table {
    entries: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

pub fn get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    // A poisoned lock (a panic while it was held) still holds consistent entries: each write is
    // one insert.
    let t = table().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match t.entries.get(key) {
        Some((v, cas)) => (Some(v.clone()), Some(*cas)),
        None => (None, None),
    }
}

pub fn set(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
    let mut t = table().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let (Some(want), Some((_, have))) = (cas, t.entries.get(key)) {
        if want != *have {
            return Err(HostError::CasMismatch);
        }
    }
    // 0 means "no CAS" to callers: never hand it out.
    t.next_cas = t.next_cas.checked_add(1).unwrap_or(1);
    let next = t.next_cas;
    t.entries.insert(key.to_string(), (value.to_vec(), next));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap() {
        assert_eq!(get("t/a"), (None, None));
        assert_eq!(set("t/a", b"1", Some(7)), Ok(()), "a CAS for a missing entry is accepted");
        let (v, cas) = get("t/a");
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
        let cas = cas.unwrap_or(0);
        assert_eq!(set("t/a", b"2", Some(cas)), Ok(()));
        assert_eq!(set("t/a", b"3", Some(cas)), Err(HostError::CasMismatch), "the entry moved on");
        assert_eq!(set("t/a", b"4", None), Ok(()), "no CAS: always written");
        assert_eq!(get("t/a").0.as_deref(), Some(&b"4"[..]));
    }

    #[test]
    fn threads_never_both_win_one_cas() {
        set("t/race", b"0", None).ok();
        let cas = get("t/race").1;
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|i| s.spawn(move || usize::from(set("t/race", &[i], cas).is_ok()))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(wins, 1);
    }
}
