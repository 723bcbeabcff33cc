//! The contract's counters, defined in Envoy at configure time so dashboards see them from the
//! start. Their names and meaning are `keyward_core::record::Metric`'s.

use keyward_core::record::Metric;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Metrics {
    ids: HashMap<Metric, u32>,
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
        Metrics { ids }
    }

    pub fn inc(&self, m: Metric) {
        if let Some(id) = self.ids.get(&m) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}
