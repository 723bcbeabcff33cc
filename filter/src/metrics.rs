//! The contract's counters, defined once at configure time.

use keyward_core::response::Code;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Every contract counter is defined at configure time so dashboards see them from the start.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub allowed: Option<u32>,
    pub denied: [Option<u32>; 10],
    pub fetch_ok: Option<u32>,
    pub fetch_error: Option<u32>,
    pub cache_hit: Option<u32>,
    pub cache_miss: Option<u32>,
    pub cache_stale: Option<u32>,
    pub revocation_ok: Option<u32>,
    pub revocation_error: Option<u32>,
    pub limit_cas_retry: Option<u32>,
    pub limit_full: Option<u32>,
    pub vendor_rejected: Option<u32>,
    pub vault_login: Option<u32>,
    pub vault_renew: Option<u32>,
    pub vault_auth_error: Option<u32>,
    pub response_scrubbed: Option<u32>,
}

fn counter(name: &str) -> Option<u32> {
    match hostcalls::define_metric(MetricType::Counter, name) {
        Ok(id) => Some(id),
        Err(_) => {
            log::warn!("could not define metric {name}");
            None
        }
    }
}

pub fn inc(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

impl Metrics {
    pub fn define() -> Metrics {
        let mut denied = [None; 10];
        for c in Code::ALL {
            if let Some(slot) = denied.get_mut(c.index()) {
                *slot = counter(&format!("keyward_requests_denied_{}", c.as_str()));
            }
        }
        Metrics {
            allowed: counter("keyward_requests_allowed"),
            denied,
            fetch_ok: counter("keyward_secret_fetch_ok"),
            fetch_error: counter("keyward_secret_fetch_error"),
            cache_hit: counter("keyward_cache_hit"),
            cache_miss: counter("keyward_cache_miss"),
            cache_stale: counter("keyward_cache_stale"),
            revocation_ok: counter("keyward_revocation_refresh_ok"),
            revocation_error: counter("keyward_revocation_refresh_error"),
            limit_cas_retry: counter("keyward_limit_cas_retry"),
            limit_full: counter("keyward_limit_table_full"),
            vendor_rejected: counter("keyward_vendor_rejected_key"),
            vault_login: counter("keyward_vault_login"),
            vault_renew: counter("keyward_vault_renew"),
            vault_auth_error: counter("keyward_vault_auth_error"),
            response_scrubbed: counter("keyward_response_scrubbed"),
        }
    }

    pub fn denied(&self, c: Code) {
        inc(self.denied.get(c.index()).copied().flatten());
    }
}
