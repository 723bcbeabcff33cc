//! The contract's counters, defined in Envoy at configure time so dashboards see them from the
//! start, and the labelled families, defined on first use. Their names and meaning are
//! `keyward_core::record::Metric`'s and `Family`'s.
//!
//! Counters are added up in the module and handed to Envoy on the root's tick (every
//! `lifecycle::TICK_MS`, 200 ms): one hostcall per counter that moved, instead of three per request.
//! Histograms are recorded at once (Envoy has no call that records several values).

use keyward_core::record::{Family, Metric};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

/// One stat Envoy knows, and what this worker has counted in it since the last flush.
#[derive(Debug)]
struct Stat {
    id: u32,
    pending: u64,
}

/// A labelled stat: its family and label values, kept to tell apart two that hash alike.
#[derive(Debug)]
struct Labelled {
    family: Family,
    values: Vec<String>,
    stat: Stat,
}

#[derive(Debug, Default)]
pub struct Metrics {
    plain: HashMap<Metric, Stat>,
    /// Gauge: this VM's linear memory (the module's heap, stack and data), in bytes.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    memory: Option<u32>,
    /// Labelled stats by a hash of family and values (FNV-1a; collisions share a bucket). Values
    /// come from the configuration and the contract's codes, so the map is bounded by
    /// targets × codes + stores × 3 + 4.
    labelled: HashMap<u64, Vec<Labelled>>,
    scratch: String,
}

impl Metrics {
    pub fn define() -> Metrics {
        let mut plain = HashMap::new();
        for m in Metric::all() {
            let name = m.name();
            match hostcalls::define_metric(MetricType::Counter, &name) {
                Ok(id) => {
                    plain.insert(m, Stat { id, pending: 0 });
                }
                Err(_) => log::warn!("could not define metric {name}"),
            }
        }
        let memory = hostcalls::define_metric(MetricType::Gauge, "keyward_wasm_memory_bytes").ok();
        Metrics { plain, memory, ..Metrics::default() }
    }

    /// Report this VM's linear memory (at configure time, and on every tick of a VM that has had
    /// a stream). Several configurations in one VM report the same figure; several workers share
    /// the gauge (the last one to tick sets it).
    pub fn report_memory(&self) {
        #[cfg(target_arch = "wasm32")]
        if let Some(id) = self.memory {
            let bytes = core::arch::wasm32::memory_size(0) as u64 * 65536;
            let _ = hostcalls::record_metric(id, bytes);
        }
    }

    /// Hand every counter's pending count to Envoy.
    pub fn flush(&mut self) {
        let plain = self.plain.values_mut();
        let labelled = self.labelled.values_mut().flat_map(|b| b.iter_mut().map(|l| &mut l.stat));
        for s in plain.chain(labelled) {
            if s.pending > 0 {
                let _ = hostcalls::increment_metric(s.id, i64::try_from(s.pending).unwrap_or(i64::MAX));
                s.pending = 0;
            }
        }
    }

    pub fn inc(&mut self, m: Metric) {
        if let Some(s) = self.plain.get_mut(&m) {
            s.pending = s.pending.saturating_add(1);
        }
    }

    fn labelled(&mut self, family: Family, values: &[&str]) -> Option<&mut Stat> {
        let bucket = self.labelled.entry(family.label_hash(values)).or_default();
        let known = bucket.iter().position(|l| l.family == family && l.values.len() == values.len() && l.values.iter().zip(values).all(|(a, b)| a == b));
        let at = match known {
            Some(at) => at,
            None => {
                family.write_stat_name(values, &mut self.scratch);
                let kind = if family.is_histogram() { MetricType::Histogram } else { MetricType::Counter };
                let id = hostcalls::define_metric(kind, &self.scratch).ok()?;
                bucket.push(Labelled { family, values: values.iter().map(|v| v.to_string()).collect(), stat: Stat { id, pending: 0 } });
                bucket.len() - 1
            }
        };
        bucket.get_mut(at).map(|l| &mut l.stat)
    }

    pub fn count(&mut self, family: Family, values: &[&str], n: u64) {
        if let Some(s) = self.labelled(family, values) {
            s.pending = s.pending.saturating_add(n);
        }
    }

    pub fn observe(&mut self, family: Family, values: &[&str], value: u64) {
        if let Some(s) = self.labelled(family, values) {
            let _ = hostcalls::record_metric(s.id, value);
        }
    }
}
