//! Per-credential limit entries in Envoy shared data (`policy::limits::Table` shards): counting a
//! request and reserving its cost with compare-and-swap, and releasing a reservation.

use crate::engine::{Admitted, Holder, Reservation};
use crate::host::{ContextId, Host, HostError};
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

impl super::Lifecycle {
    /// Release a reservation from every entry that holds it: the request was refused after all.
    pub(super) fn release_reservation(&mut self, host: &mut impl Host, r: &Reservation) {
        self.give_back(host, r, false);
    }

    /// The vendor said the charge did not happen: its cost goes back to every entry that holds it.
    pub(super) fn refund_reservation(&mut self, host: &mut impl Host, r: &Reservation) {
        self.give_back(host, r, true);
    }

    /// A stream that waited leaves without going on (refused, given up, gone, or its
    /// configuration replaced): what it was counted in before it waited goes back.
    pub(super) fn abandon(&mut self, host: &mut impl Host, ctx: ContextId, admitted: &[Admitted]) {
        let made = self.ledger.results.iter().any(|((c, _), a)| *c == ctx && a.ok() && a.holder.as_ref().is_some_and(Holder::stands));
        self.ledger.results.retain(|(c, _), _| *c != ctx);
        if made || admitted.iter().filter_map(|a| a.holder.as_ref()).any(Holder::stands) {
            // Its direct charge was made: it stands, and what the stream took before stands with it.
            return;
        }
        if self.direct_in_flight(ctx) {
            // Its direct charge may still be made: what it took waits for that answer.
            self.ledger.orphans.insert(ctx, admitted.to_vec());
            return;
        }
        self.release_all(host, admitted);
    }

    /// Give back every ledger share in `admitted` (a rate count stays counted).
    pub(super) fn release_all(&mut self, host: &mut impl Host, admitted: &[Admitted]) {
        let ledger = self.cfg.as_ref().and_then(|c| c.ledger.clone());
        for h in admitted.iter().filter_map(|a| a.holder.as_ref()) {
            match (h, &ledger) {
                (Holder::Ledger { .. }, Some(l)) => self.ledger_release(host, l, h),
                // A request-rate count stays counted (the request was made, and refused).
                (Holder::Local { .. }, _) => {}
                (Holder::Ledger { .. }, None) => log::debug!("a ledger reservation outlived its configuration; it stays held"),
            }
        }
    }

    /// A model call's usage cost less than its reservation: `amount` of it goes back to every
    /// entry that holds it (the rest stays charged).
    pub(super) fn release_part(&mut self, host: &mut impl Host, r: &Reservation, amount: u64) {
        let part = Reservation { holders: r.holders.clone(), charge: Charge { cost: amount.min(r.charge.cost), retry: r.charge.retry } };
        self.give_back(host, &part, true);
    }

    fn give_back(&mut self, host: &mut impl Host, r: &Reservation, refund: bool) {
        if !refund && r.holders.iter().any(Holder::stands) {
            // A request refused after its direct charge was made: the charge stands (its mark may
            // have admitted a retry elsewhere), and everything it was counted in with it.
            return;
        }
        let ledger = self.cfg.as_ref().and_then(|c| c.ledger.clone());
        for h in &r.holders {
            match (h, &ledger) {
                (Holder::Local { key_id, jti }, _) => {
                    refund_entry(host, *key_id, jti, &r.charge);
                }
                (Holder::Ledger { .. }, Some(l)) if refund => self.ledger_refund(host, l, h, r.charge.cost),
                (Holder::Ledger { .. }, Some(l)) => self.ledger_release(host, l, h),
                (Holder::Ledger { .. }, None) => log::debug!("a ledger reservation outlived its configuration; it stays held"),
            }
        }
    }
}
