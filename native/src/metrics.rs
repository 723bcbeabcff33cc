//! The contract's counters and histograms as Envoy dynamic-module metrics. Each name is defined
//! once per configuration, with its labels (a `Metric`'s one label, a `Family`'s labels), while
//! Envoy lets a configuration define them (`on_http_filter_config_new`). With the runtime flag
//! `envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix`, Envoy's Prometheus
//! output names them exactly as the wasm executor's (`keyward_requests_total{decision="allow"}`).

use crate::abi::{self, ConfigEnvoy, ModuleBuffer};
use keyward_core::record::{Family, Metric};
use std::collections::HashMap;

/// A defined metric: Envoy's id, and whether it is a histogram.
#[derive(Clone, Copy, Debug)]
struct Def {
    id: usize,
    histogram: bool,
}

#[derive(Default, Debug)]
pub struct Metrics {
    /// Each counter: its definition and its one label value, if it has one.
    plain: keyward_core::Map<Metric, (Def, Option<String>)>,
    families: keyward_core::Map<Family, Def>,
}

/// `keyward_requests_total;decision=allow` → (`keyward_requests_total`, `decision`, `allow`).
fn split(name: &str) -> (String, Option<(String, String)>) {
    match name.split_once(';').and_then(|(base, l)| l.split_once('=').map(|(k, v)| (base, k, v))) {
        Some((base, k, v)) => (base.to_string(), Some((k.to_string(), v.to_string()))),
        None => (name.to_string(), None),
    }
}

fn define(cfg: ConfigEnvoy, name: &str, labels: &[&str], histogram: bool) -> Option<Def> {
    let mut ls: Vec<ModuleBuffer> = labels.iter().map(|l| ModuleBuffer::of(l.as_bytes())).collect();
    let mut id = 0usize;
    // SAFETY: the configuration's pointer, during `on_http_filter_config_new`; buffers outlive the call.
    let r = unsafe {
        if histogram {
            abi::envoy_dynamic_module_callback_http_filter_config_define_histogram(cfg, ModuleBuffer::of(name.as_bytes()), ls.as_mut_ptr(), ls.len(), &mut id)
        } else {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(cfg, ModuleBuffer::of(name.as_bytes()), ls.as_mut_ptr(), ls.len(), &mut id)
        }
    };
    (r == abi::METRICS_SUCCESS).then_some(Def { id, histogram })
}

impl Metrics {
    /// Define every metric (at configuration time, on the main thread).
    pub fn define(cfg: ConfigEnvoy) -> Metrics {
        let mut m = Metrics::default();
        let mut bases: HashMap<String, Def> = HashMap::new();
        for metric in Metric::all() {
            let (base, label) = split(&metric.name());
            let def = match bases.get(&base) {
                Some(d) => Some(*d),
                None => {
                    let labels: Vec<&str> = label.iter().map(|(k, _)| k.as_str()).collect();
                    let d = define(cfg, &base, &labels, false);
                    if let Some(d) = d {
                        bases.insert(base.clone(), d);
                    }
                    d
                }
            };
            match def {
                Some(d) => {
                    // Every counter exists from the start, at zero (dashboards see it).
                    let value = label.map(|(_, v)| v);
                    Self::record(cfg, d, &value.iter().map(String::as_str).collect::<Vec<_>>(), 0);
                    m.plain.insert(metric, (d, value));
                }
                None => log::warn!("could not define metric {base}"),
            }
        }
        for f in Family::ALL {
            match define(cfg, f.name(), f.labels(), f.is_histogram()) {
                Some(d) => {
                    m.families.insert(f, d);
                }
                None => log::warn!("could not define metric {}", f.name()),
            }
        }
        m
    }

    fn record(cfg: ConfigEnvoy, def: Def, values: &[&str], n: u64) {
        let mut vs: Vec<ModuleBuffer> = values.iter().map(|v| ModuleBuffer::of(v.as_bytes())).collect();
        // SAFETY: the configuration lives as long as any stream of it; Envoy's stats are
        // thread-safe; buffers outlive the call.
        unsafe {
            if def.histogram {
                abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value(cfg, def.id, vs.as_mut_ptr(), vs.len(), n);
            } else {
                abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(cfg, def.id, vs.as_mut_ptr(), vs.len(), n);
            }
        }
    }

    pub fn add(&self, cfg: ConfigEnvoy, m: Metric, n: u64) {
        if let Some((def, value)) = self.plain.get(&m) {
            match value {
                Some(v) => Self::record(cfg, *def, &[v.as_str()], n),
                None => Self::record(cfg, *def, &[], n),
            }
        }
    }

    pub fn family(&self, cfg: ConfigEnvoy, f: Family, values: &[&str], n: u64) {
        if let Some(def) = self.families.get(&f) {
            if values.len() == f.labels().len() {
                Self::record(cfg, *def, values, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn names_split_into_base_and_label() {
        assert_eq!(split("keyward_requests_total;decision=allow"), ("keyward_requests_total".into(), Some(("decision".into(), "allow".into()))));
        assert_eq!(split("keyward_limit_cas_retries_total"), ("keyward_limit_cas_retries_total".into(), None));
    }
}
