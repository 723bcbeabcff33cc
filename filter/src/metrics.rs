//! The contract's counters, defined in Envoy at configure time so dashboards see them from the
//! start, and the labelled families, defined on first use. Their names and meaning are
//! `keyward_core::record::Metric`'s and `Family`'s.

use keyward_core::record::{Family, Metric};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Metrics {
    ids: HashMap<Metric, u32>,
    /// Gauge: this VM's linear memory (the module's heap, stack and data), in bytes.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    memory: Option<u32>,
    /// Labelled stats by name; names come from the configuration and the contract's codes, so
    /// the map is bounded by targets × codes + stores × 3 + 4.
    labelled: HashMap<String, u32>,
    scratch: String,
}

impl Metrics {
    pub fn define() -> Metrics {
        let mut ids = HashMap::new();
        for m in Metric::all() {
            let name = m.name();
            match hostcalls::define_metric(MetricType::Counter, &name) {
                Ok(id) => {
                    ids.insert(m, id);
                }
                Err(_) => log::warn!("could not define metric {name}"),
            }
        }
        let memory = hostcalls::define_metric(MetricType::Gauge, "keyward_wasm_memory_bytes").ok();
        Metrics { ids, memory, ..Metrics::default() }
    }

    /// Report this VM's linear memory (set at configure time and on every tick). Several
    /// configurations in one VM report the same figure.
    pub fn report_memory(&self) {
        #[cfg(target_arch = "wasm32")]
        if let Some(id) = self.memory {
            let bytes = core::arch::wasm32::memory_size(0) as u64 * 65536;
            let _ = hostcalls::record_metric(id, bytes);
        }
    }

    pub fn inc(&self, m: Metric) {
        if let Some(id) = self.ids.get(&m) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    fn id(&mut self, family: Family, values: &[&str]) -> Option<u32> {
        family.write_stat_name(values, &mut self.scratch);
        if let Some(id) = self.labelled.get(self.scratch.as_str()) {
            return Some(*id);
        }
        let kind = if family.is_histogram() { MetricType::Histogram } else { MetricType::Counter };
        let id = hostcalls::define_metric(kind, &self.scratch).ok()?;
        self.labelled.insert(self.scratch.clone(), id);
        Some(id)
    }

    pub fn count(&mut self, family: Family, values: &[&str], n: u64) {
        if let Some(id) = self.id(family, values) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn observe(&mut self, family: Family, values: &[&str], value: u64) {
        if let Some(id) = self.id(family, values) {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}
