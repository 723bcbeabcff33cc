//! Counters added up per worker and handed to Envoy by the main thread's tick (every 200 ms), as
//! the wasm filter hands its counters over on its tick: one stat update per counter that moved,
//! instead of Envoy's labelled-stat lookup on every request. Histograms are recorded at once.

use keyward_core::record::{Family, Metric};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a for the counters' small keys: a per-request hash, where SipHash's resistance to chosen
/// keys buys nothing (the keys are the contract's metrics and the configuration's names).
#[derive(Default)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// A labelled counter: its family and label values (kept to tell apart two that hash alike).
struct Labelled {
    family: Family,
    values: Vec<String>,
    n: u64,
    /// Not handed to Envoy yet: it is, even at zero (a series dashboards see from the start).
    fresh: bool,
}

#[derive(Default)]
pub struct Counts {
    plain: FnvMap<Metric, u64>,
    /// By an FNV-1a hash of family and values; collisions share a bucket.
    labelled: FnvMap<u64, Vec<Labelled>>,
}

impl Counts {
    pub fn metric(&mut self, m: Metric) {
        *self.plain.entry(m).or_default() += 1;
    }

    pub fn count(&mut self, family: Family, values: &[&str], n: u64) {
        let bucket = self.labelled.entry(family.label_hash(values)).or_default();
        match bucket.iter_mut().find(|l| l.family == family && l.values.len() == values.len() && l.values.iter().zip(values).all(|(a, b)| a == b)) {
            Some(l) => l.n = l.n.saturating_add(n),
            None => bucket.push(Labelled { family, values: values.iter().map(|v| v.to_string()).collect(), n, fresh: true }),
        }
    }

    /// Everything counted since the last flush, handed to `plain` and `labelled`; the counts
    /// start again from zero (the labels stay known).
    pub fn drain(&mut self, mut plain: impl FnMut(Metric, u64), mut labelled: impl FnMut(Family, &[&str], u64)) {
        for (m, n) in self.plain.iter_mut().filter(|(_, n)| **n > 0) {
            plain(*m, std::mem::take(n));
        }
        for l in self.labelled.values_mut().flatten().filter(|l| l.n > 0 || l.fresh) {
            let values: Vec<&str> = l.values.iter().map(String::as_str).collect();
            l.fresh = false;
            labelled(l.family, &values, std::mem::take(&mut l.n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_drain_once() {
        let mut c = Counts::default();
        c.metric(Metric::Allowed);
        c.metric(Metric::Allowed);
        c.count(Family::TargetRequests, &["stripe", "allow"], 1);
        c.count(Family::TargetRequests, &["stripe", "allow"], 2);
        c.count(Family::TargetRequests, &["twilio", "allow"], 1);
        let (mut plain, mut labelled) = (Vec::new(), Vec::new());
        c.drain(|m, n| plain.push((m, n)), |f, v, n| labelled.push((f, v.join(","), n)));
        labelled.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(plain, vec![(Metric::Allowed, 2)]);
        assert_eq!(labelled, vec![(Family::TargetRequests, "stripe,allow".to_string(), 3), (Family::TargetRequests, "twilio,allow".to_string(), 1)]);
        let (mut again_plain, mut again_labelled) = (0, 0);
        c.drain(|_, _| again_plain += 1, |_, _, _| again_labelled += 1);
        assert_eq!((again_plain, again_labelled), (0, 0), "nothing moved since");
        // A series counted at zero (defined up front) is handed over once.
        c.count(Family::SpendReserved, &["stripe"], 0);
        let mut zero = Vec::new();
        c.drain(|_, _| {}, |f, v, n| zero.push((f, v.join(","), n)));
        assert_eq!(zero, vec![(Family::SpendReserved, "stripe".to_string(), 0)]);
    }
}
