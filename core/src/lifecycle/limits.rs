//! Per-credential limit entries in Envoy shared data (`policy::limits::Table` shards): counting a
//! request and reserving its cost with compare-and-swap, and releasing a reservation.

use crate::engine::Reservation;
use crate::host::{Host, HostError};
use crate::policy::limits::{Charge, Limits, Table, Verdict};
use crate::record::Metric;
use crate::secrets::keys;

/// Compare-and-swap attempts on a limit shard before refusing (fail closed).
const LIMIT_CAS_TRIES: u32 = 64;

/// A limit shard as stored (absent or empty: a new table; unreadable: started afresh, logged).
fn decode_shard(key: &str, bytes: Option<&[u8]>) -> Table {
    match bytes {
        None | Some([]) => Table::default(),
        Some(b) => Table::decode(b).unwrap_or_else(|| {
            log::warn!("limit shard {key} is unreadable; starting it afresh");
            Table::default()
        }),
    }
}

/// Count a request of credential `jti` and reserve `charge` in its entry: read, decide, write back
/// only if no other worker wrote in between, otherwise read again. Refusals write nothing.
pub(super) fn admit_entry(host: &mut impl Host, key_id: u64, jti: &str, lim: &Limits, keep_until_s: i64, now_s: u64, charge: Option<&Charge>) -> Verdict {
    let entry = keys::limit_entry(key_id, jti);
    let key = keys::limit_shard(&entry);
    for _ in 0..LIMIT_CAS_TRIES {
        let (bytes, cas) = host.shared_get(&key);
        let mut table = decode_shard(&key, bytes.as_deref());
        let verdict = table.admit_charged(&entry, lim, keep_until_s, now_s, charge);
        match verdict {
            Verdict::Admit | Verdict::Reserved | Verdict::Retry => {}
            Verdict::Full => {
                host.metric(Metric::LimitFull);
                log::warn!("limit shard {key} holds {} live credentials; refusing new ones", table.len());
                return verdict;
            }
            _ => return verdict,
        }
        match host.shared_set(&key, &table.encode(), cas) {
            Ok(()) => return verdict,
            Err(HostError::CasMismatch) => host.metric(Metric::LimitCasRetry),
            Err(e) => {
                log::warn!("limit shard {key} could not be written ({e:?}); refusing");
                return Verdict::Full;
            }
        }
    }
    log::warn!("limit shard {key}: still contended after {LIMIT_CAS_TRIES} tries; refusing");
    Verdict::RateLimited { retry_after_s: 1 }
}

/// Release `charge` from the entry of credential `jti` (compare-and-swap, like `admit_entry`).
pub(super) fn refund_entry(host: &mut impl Host, key_id: u64, jti: &str, charge: &Charge) -> bool {
    let entry = keys::limit_entry(key_id, jti);
    let key = keys::limit_shard(&entry);
    for _ in 0..LIMIT_CAS_TRIES {
        let (bytes, cas) = host.shared_get(&key);
        let mut table = decode_shard(&key, bytes.as_deref());
        if !table.refund(&entry, charge) {
            return false;
        }
        match host.shared_set(&key, &table.encode(), cas) {
            Ok(()) => return true,
            Err(HostError::CasMismatch) => host.metric(Metric::LimitCasRetry),
            Err(e) => {
                log::warn!("limit shard {key} could not be written ({e:?}); a reservation stays held");
                return false;
            }
        }
    }
    log::warn!("limit shard {key}: still contended after {LIMIT_CAS_TRIES} tries; a reservation stays held");
    false
}

/// Release a reservation from every entry that holds it.
pub(super) fn release(host: &mut impl Host, r: &Reservation) {
    for (key_id, jti) in &r.holders {
        refund_entry(host, *key_id, jti, &r.charge);
    }
}
