//! This gateway's slice of one ledger account, kept in Envoy shared data so that every worker
//! spends from it: the lease the ledger granted, what was used of it, refunds credited to it, the
//! grant asked for and not yet answered, and whether the ledger is refusing or failing. Pure
//! values and transitions; the lifecycle stores them with compare-and-swap.
//!
//! Record layout (little-endian): `"KWS3" | lease_id u64 | seq u64 | granted.spend u64 |
//! granted.count u64 | expires_ms u64 | used.spend u64 | used.count u64 | credit.spend u64 | credit.count u64 |
//! job_until_ms u64 | job_owner u64 | pending_id u64 | pending_seq u64 | pending.spend u64 |
//! pending.count u64 | blocked_until_ms u64 | block u8 | retry_after_s u32 | granted_at_ms u64 |
//! used_at_grant.spend u64 | used_at_grant.count u64 | last_use_ms u64 | returning u64 | last_id u64`; a lease id of 0 is no lease.

use super::dynamo::Lease;
use super::{Amounts, Caps};
use crate::wire::Reader;

const MAGIC: &[u8; 4] = b"KWS3";
/// Shortest grant of counts asked for; a credential's slice covers at least this many requests.
pub const MIN_COUNT: u64 = 4;
/// At most this fraction (1/N) of what is left in an account goes into one gateway's slice.
pub const SHARE: u64 = 4;
/// How long a refusal (no room) is believed before the ledger is asked again.
pub const NO_ROOM_MS: u64 = 1000;
/// How long a failing ledger is not asked again for this account (requests get 503 meanwhile).
pub const FAILING_MS: u64 = 1000;

/// Why the slice cannot grow now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    None,
    /// The account has no room for what was asked (`retry_after_s`: until room may come back).
    NoRoom,
    /// The ledger did not answer, throttled or answered garbage.
    Failing,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slice {
    /// The live lease (`lease_id` 0: none): its id and the ledger's count of its top-ups, what
    /// it grants in all, and when this gateway stops using it.
    pub lease_id: u64,
    pub seq: u64,
    pub granted: Amounts,
    pub expires_ms: u64,
    pub used: Amounts,
    /// What went back after its lease ended, not yet given back to the ledger: spend refunded
    /// by vendors, requests refused after they were counted. Room in the live lease, given back
    /// with it (what lands between leases waits for the next one).
    pub credit: Amounts,
    /// A worker (`job_owner`) is calling the ledger for this account until then (the others wait).
    pub job_until_ms: u64,
    pub job_owner: u64,
    /// A grant or top-up asked for whose outcome is not known yet (`pending_seq` 0: none): the
    /// lease id (a new one for a first lease), the sequence it makes, and what it adds. Asked
    /// again exactly so, so that at most one is ever made.
    pub pending_id: u64,
    pub pending_seq: u64,
    pub pending: Amounts,
    pub blocked_until_ms: u64,
    pub block: Option<Block>,
    pub retry_after_s: u32,
    /// When the last grant or top-up landed, and what was used then (the rate of use since).
    pub granted_at_ms: u64,
    pub used_at_grant: Amounts,
    pub last_use_ms: u64,
    /// The lease a return was counted from (0: none): what goes back for it from then on is
    /// credit, given back with the next lease.
    pub returning: u64,
    /// The largest lease id this gateway used or asked for (a new lease's id is larger).
    pub last_id: u64,
}

/// What a request gets from the slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Taken from the live lease.
    Taken,
    /// The lease is missing, ended, or too small: the ledger must be asked.
    Renew,
    /// The ledger said there is no room (recently): refuse, `retry_after_s`.
    NoRoom { retry_after_s: u32 },
    /// The ledger is failing (recently): 503.
    Failing,
}

impl Slice {
    pub fn live(&self, now_ms: u64) -> bool {
        self.lease_id != 0 && now_ms < self.expires_ms
    }

    /// What the live lease still has room for.
    pub fn room(&self) -> Amounts {
        Amounts {
            spend: (self.granted.spend + self.credit.spend).saturating_sub(self.used.spend),
            count: (self.granted.count + self.credit.count).saturating_sub(self.used.count),
        }
    }

    /// What goes back to the ledger when this lease ends.
    pub fn unused(&self) -> Amounts {
        if self.lease_id == 0 {
            return Amounts::default();
        }
        self.room()
    }

    /// What the lease lacks for `want` (per capped dimension; all of it without a live lease).
    pub fn lacks(&self, want: Amounts, caps: Caps) -> Amounts {
        let room = self.room();
        Amounts {
            spend: if caps.spend.is_some() { want.spend.saturating_sub(room.spend) } else { 0 },
            count: if caps.count.is_some() { want.count.saturating_sub(room.count) } else { 0 },
        }
    }

    /// Take `want` from the live lease, in the dimensions `caps` caps.
    pub fn take(&mut self, want: Amounts, caps: Caps, now_ms: u64) -> Take {
        if self.live(now_ms) && self.lacks(want, caps).is_zero() {
            if caps.spend.is_some() {
                self.used.spend += want.spend;
            }
            if caps.count.is_some() {
                self.used.count += want.count;
            }
            self.last_use_ms = now_ms;
            return Take::Taken;
        }
        if now_ms < self.blocked_until_ms {
            return match self.block {
                Some(Block::Failing) => Take::Failing,
                _ => Take::NoRoom { retry_after_s: self.retry_after_s.max(1) },
            };
        }
        Take::Renew
    }

    /// Give back what a request took (it was refused after all, before it left).
    pub fn untake(&mut self, took: Amounts, caps: Caps, lease: u64) {
        let took = Amounts { spend: if caps.spend.is_some() { took.spend } else { 0 }, count: if caps.count.is_some() { took.count } else { 0 } };
        if lease == self.lease_id && lease != 0 && lease != self.returning && self.used.spend >= took.spend && self.used.count >= took.count {
            self.used.spend -= took.spend;
            self.used.count -= took.count;
        } else {
            // Taken from a lease that has ended, or whose return was counted already (it is
            // counted in the ledger as used).
            self.credit.spend = self.credit.spend.saturating_add(took.spend);
            self.credit.count = self.credit.count.saturating_add(took.count);
        }
    }

    /// A vendor refunded `spend` charged to this gateway's slices: room again, and given back to
    /// the ledger with the lease.
    pub fn refund(&mut self, spend: u64) {
        self.credit.spend = self.credit.spend.saturating_add(spend);
    }

    /// The ledger's record of this gateway's lease is now `lease` (a first grant or a top-up):
    /// the slice takes it (this gateway stops using it `margin_ms` before it ends). What was used
    /// of the same lease stays used; a new lease starts unused.
    pub fn granted(&mut self, lease: &Lease, now_ms: u64, margin_ms: u64) {
        if lease.id != self.lease_id {
            // A new lease while the slice still had another: that one is gone unconfirmed.
            self.lost();
            self.used = Amounts::default();
        }
        self.lease_id = lease.id;
        self.seq = lease.seq;
        self.granted = lease.granted;
        self.expires_ms = (lease.expires_s * 1000).saturating_sub(margin_ms).max(now_ms);
        self.pending_id = 0;
        self.pending_seq = 0;
        self.pending = Amounts::default();
        self.blocked_until_ms = 0;
        self.block = None;
        self.granted_at_ms = now_ms;
        self.used_at_grant = self.used;
        self.returning = 0;
        self.last_id = self.last_id.max(lease.id);
    }

    /// Take the job of calling the ledger for this account, unless a call for it is under way
    /// (this worker's or another's): one change at a time, each counted from the state the last
    /// one left.
    pub fn claim_job(&mut self, worker: u64, until_ms: u64, now_ms: u64) -> bool {
        if self.job_until_ms > now_ms {
            return false;
        }
        self.job_owner = worker;
        self.job_until_ms = until_ms;
        true
    }

    /// `worker`'s call for this account is over: the job is free again, unless another worker
    /// took it since (this one's call was given up at its deadline, and its outcome came late).
    pub fn release(&mut self, worker: u64) {
        if self.job_owner == worker {
            self.job_until_ms = 0;
        }
    }

    /// The lease ended (given back, or found gone).
    pub fn ended(&mut self) {
        self.lease_id = 0;
        self.seq = 0;
        self.granted = Amounts::default();
        self.used = Amounts::default();
        self.used_at_grant = Amounts::default();
        self.expires_ms = 0;
        self.returning = 0;
    }

    /// The ledger holds no lease of this gateway's although the slice has one: gone with a return
    /// whose answer was lost, which gave back an unknown part of the refunds. None of them is
    /// given back again (the ledger may count some twice; never none).
    pub fn lost(&mut self) {
        if self.lease_id != 0 {
            self.ended();
            self.credit = Amounts::default();
        }
    }

    /// A return that gave back `credit` with the lease was made.
    pub fn gave_back(&mut self, credit: Amounts) {
        self.credit = Amounts { spend: self.credit.spend.saturating_sub(credit.spend), count: self.credit.count.saturating_sub(credit.count) };
    }

    /// The ledger refused or failed: no new calls for this account for a moment.
    pub fn block(&mut self, block: Block, now_ms: u64, retry_after_s: u32) {
        let ms = if block == Block::Failing { FAILING_MS } else { NO_ROOM_MS };
        self.block = Some(block);
        self.blocked_until_ms = now_ms + ms;
        self.retry_after_s = retry_after_s;
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(MAGIC);
        for v in [
            self.lease_id,
            self.seq,
            self.granted.spend,
            self.granted.count,
            self.expires_ms,
            self.used.spend,
            self.used.count,
            self.credit.spend,
            self.credit.count,
            self.job_until_ms,
            self.job_owner,
            self.pending_id,
            self.pending_seq,
            self.pending.spend,
            self.pending.count,
            self.blocked_until_ms,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(match self.block {
            None | Some(Block::None) => 0,
            Some(Block::NoRoom) => 1,
            Some(Block::Failing) => 2,
        });
        out.extend_from_slice(&self.retry_after_s.to_le_bytes());
        for v in [self.granted_at_ms, self.used_at_grant.spend, self.used_at_grant.count, self.last_use_ms, self.returning, self.last_id] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Slice> {
        let mut r = Reader::new(b);
        if r.take(4)? != MAGIC {
            return None;
        }
        let mut s = Slice {
            lease_id: r.u64()?,
            seq: r.u64()?,
            granted: Amounts { spend: r.u64()?, count: r.u64()? },
            expires_ms: r.u64()?,
            used: Amounts { spend: r.u64()?, count: r.u64()? },
            credit: Amounts { spend: r.u64()?, count: r.u64()? },
            job_until_ms: r.u64()?,
            job_owner: r.u64()?,
            pending_id: r.u64()?,
            pending_seq: r.u64()?,
            pending: Amounts { spend: r.u64()?, count: r.u64()? },
            blocked_until_ms: r.u64()?,
            ..Slice::default()
        };
        s.block = match r.u8()? {
            0 => None,
            1 => Some(Block::NoRoom),
            2 => Some(Block::Failing),
            _ => return None,
        };
        s.retry_after_s = r.u32()?;
        s.granted_at_ms = r.u64()?;
        s.used_at_grant = Amounts { spend: r.u64()?, count: r.u64()? };
        s.last_use_ms = r.u64()?;
        s.returning = r.u64()?;
        s.last_id = r.u64()?;
        r.done().then_some(s)
    }
}

/// How much to add to the lease: enough for the rate this gateway used it at since its last
/// grant, for a whole lease (twice that, so a steady stream tops up about once per lease), at
/// least a few requests' worth and what the request lacks; at most a `SHARE` of what the account
/// has left, so the other gateways always find room and a gateway that dies holds little; never
/// less than what the request lacks.
pub fn next_grant(s: &Slice, want: Amounts, caps: Caps, left: Option<Amounts>, lease_ms: u64, now_ms: u64) -> Amounts {
    let lacks = s.lacks(want, caps);
    let elapsed = now_ms.saturating_sub(s.granted_at_ms).max(1);
    let scale = |used: u64| -> u64 {
        if s.granted_at_ms == 0 {
            return 0;
        }
        let per_lease = u128::from(used) * u128::from(lease_ms) / u128::from(elapsed.min(lease_ms).max(1));
        u64::try_from(per_lease.saturating_mul(2)).unwrap_or(u64::MAX)
    };
    let used_since = Amounts { spend: s.used.spend.saturating_sub(s.used_at_grant.spend), count: s.used.count.saturating_sub(s.used_at_grant.count) };
    let dim = |cap: Option<u64>, used: u64, want: u64, lacks: u64, floor: u64, left: Option<u64>| -> u64 {
        let Some(cap) = cap else { return 0 };
        let left = left.unwrap_or(cap);
        let ask = scale(used).max(want).max(floor).max(lacks);
        let share = (left / SHARE).max(lacks);
        ask.min(share).min(left.max(lacks)).min(cap)
    };
    Amounts {
        spend: dim(caps.spend, used_since.spend, want.spend, lacks.spend, want.spend.saturating_mul(MIN_COUNT), left.map(|l| l.spend)),
        count: dim(caps.count, used_since.count, want.count, lacks.count, MIN_COUNT, left.map(|l| l.count)),
    }
}

/// The accounts this gateway holds a lease in (shared data, for the drain on SIGTERM): every
/// worker adds the ones it leases in and removes the ones it gives back.
///
/// Layout: `"KWI2" | n u32 | n * (pk_len u16 | pk | spend_cap u64 | count_cap u64 | ends_s u64 | ttl_s u64)`,
/// a cap of `u64::MAX` being none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    pub accounts: Vec<super::Account>,
}

/// Accounts listed at most (beyond, a lease is still made and used, and given back at its end).
pub const MAX_LISTED: usize = 4096;

impl Leases {
    pub fn add(&mut self, a: &super::Account) -> bool {
        if self.accounts.iter().any(|x| x.pk == a.pk) || self.accounts.len() >= MAX_LISTED {
            return false;
        }
        self.accounts.push(a.clone());
        true
    }

    pub fn remove(&mut self, pk: &str) -> bool {
        let before = self.accounts.len();
        self.accounts.retain(|a| a.pk != pk);
        self.accounts.len() != before
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.accounts.len() * 64);
        out.extend_from_slice(b"KWI2");
        out.extend_from_slice(&(self.accounts.len() as u32).to_le_bytes());
        for a in &self.accounts {
            out.extend_from_slice(&(a.pk.len() as u16).to_le_bytes());
            out.extend_from_slice(a.pk.as_bytes());
            for v in [a.caps.spend.unwrap_or(u64::MAX), a.caps.count.unwrap_or(u64::MAX), a.ends_s, a.ttl_s] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Leases> {
        let mut r = Reader::new(b);
        if r.take(4)? != b"KWI2" {
            return None;
        }
        let n = r.u32()? as usize;
        if n > MAX_LISTED {
            return None;
        }
        let mut accounts = Vec::with_capacity(n);
        for _ in 0..n {
            let len = usize::from(r.u16()?);
            let pk = String::from_utf8(r.take(len)?.to_vec()).ok()?;
            let cap = |v: u64| (v != u64::MAX).then_some(v);
            let caps = Caps { spend: cap(r.u64()?), count: cap(r.u64()?) };
            accounts.push(super::Account { pk, caps, ends_s: r.u64()?, ttl_s: r.u64()? });
        }
        r.done().then_some(Leases { accounts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { spend: Some(10_000), count: Some(100) };

    #[test]
    fn requests_take_from_a_live_lease_and_renew_when_it_is_spent_or_over() {
        let mut s = Slice::default();
        assert_eq!(s.take(Amounts { spend: 10, count: 1 }, CAPS, 1000), Take::Renew, "no lease yet");
        s.granted(&Lease { id: 7, seq: 1, granted: Amounts { spend: 100, count: 3 }, expires_s: 61 }, 1000, 1000);
        assert_eq!(s.expires_ms, 60_000);
        for _ in 0..3 {
            assert_eq!(s.take(Amounts { spend: 30, count: 1 }, CAPS, 2000), Take::Taken);
        }
        assert_eq!(s.take(Amounts { spend: 10, count: 1 }, CAPS, 2000), Take::Renew, "the counts are used up");
        assert_eq!(s.unused(), Amounts { spend: 10, count: 0 });
        s.untake(Amounts { spend: 30, count: 1 }, CAPS, 7);
        assert_eq!(s.take(Amounts { spend: 40, count: 1 }, CAPS, 2000), Take::Taken);
        // Given back for a lease that has ended: credit, given back with this one.
        s.untake(Amounts { spend: 5, count: 1 }, CAPS, 6);
        assert_eq!((s.credit, s.unused()), (Amounts { spend: 5, count: 1 }, Amounts { spend: 5, count: 1 }));
        s.take(Amounts { spend: 5, count: 1 }, CAPS, 2000);
        s.refund(25);
        assert_eq!(s.unused(), Amounts { spend: 25, count: 0 }, "a refund is room again, and goes back");
        assert_eq!(s.take(Amounts { spend: 1, count: 0 }, CAPS, 60_000), Take::Renew, "over");
        s.block(Block::NoRoom, 60_000, 30);
        assert_eq!(s.take(Amounts { spend: 1, count: 0 }, CAPS, 60_500), Take::NoRoom { retry_after_s: 30 });
        assert_eq!(s.take(Amounts { spend: 1, count: 0 }, CAPS, 61_000), Take::Renew, "asked again after a moment");
        s.block(Block::Failing, 61_000, 1);
        assert_eq!(s.take(Amounts { spend: 1, count: 0 }, CAPS, 61_100), Take::Failing);
    }

    #[test]
    fn uncapped_dimensions_are_not_counted() {
        let mut s = Slice::default();
        s.granted(&Lease { id: 1, seq: 1, granted: Amounts { spend: 0, count: 2 }, expires_s: 100 }, 0, 0);
        let counts_only = Caps { spend: None, count: Some(5) };
        assert_eq!(s.take(Amounts { spend: 999, count: 1 }, counts_only, 1), Take::Taken);
        assert_eq!(s.used, Amounts { spend: 0, count: 1 });
    }

    #[test]
    fn the_record_round_trips_and_refuses_garbage() {
        let mut s = Slice {
            lease_id: 9,
            seq: 2,
            credit: Amounts { spend: 5, count: 1 },
            pending_id: 4,
            pending_seq: 3,
            block: Some(Block::Failing),
            retry_after_s: 3,
            returning: 9,
            last_id: 11,
            ..Slice::default()
        };
        s.used = Amounts { spend: 1, count: 2 };
        assert_eq!(Slice::decode(&s.encode()), Some(s.clone()));
        let b = s.encode();
        assert_eq!(Slice::decode(&b[..b.len() - 1]), None);
        assert_eq!(Slice::decode(b"KWS1"), None);
        let mut bad = b.clone();
        bad[4 + 16 * 8] = 9; // the block byte
        assert_eq!(Slice::decode(&bad), None);
    }

    #[test]
    fn the_lease_list_round_trips() {
        let mut l = Leases::default();
        let a = super::super::Account { pk: "c/00/j".into(), caps: Caps { spend: Some(5), count: None }, ends_s: 8, ttl_s: 9 };
        assert!(l.add(&a) && !l.add(&a));
        assert_eq!(Leases::decode(&l.encode()), Some(l.clone()));
        assert!(l.remove("c/00/j") && l.accounts.is_empty());
        assert_eq!(Leases::decode(b"KWI2\x01\x00\x00\x00"), None);
    }

    #[test]
    fn grants_follow_the_rate_within_a_share_of_what_is_left() {
        let fresh = Slice::default();
        let one = Amounts { spend: 50, count: 1 };
        // A first grant: a few requests' worth.
        assert_eq!(next_grant(&fresh, one, CAPS, None, 60_000, 0), Amounts { spend: 200, count: 4 });
        // Used 40 requests in 6 s of a 60 s lease: twice the rate for a whole lease, within a
        // quarter of what is left.
        let mut busy = Slice { granted_at_ms: 1000, ..Slice::default() };
        busy.used = Amounts { spend: 2000, count: 40 };
        let g = next_grant(&busy, one, Caps { spend: Some(1_000_000), count: Some(1_000_000) }, None, 60_000, 7000);
        assert_eq!(g, Amounts { spend: 40_000, count: 800 });
        let g = next_grant(&busy, one, CAPS, Some(Amounts { spend: 1000, count: 10 }), 60_000, 7000);
        assert_eq!(g, Amounts { spend: 250, count: 2 });
        // Never less than the request itself (a large charge), even beyond the share.
        let big = Amounts { spend: 900, count: 1 };
        assert_eq!(next_grant(&fresh, big, CAPS, Some(Amounts { spend: 1000, count: 10 }), 60_000, 0), Amounts { spend: 900, count: 2 });
        assert_eq!(next_grant(&fresh, big, CAPS, Some(Amounts { spend: 950, count: 1 }), 60_000, 0), Amounts { spend: 900, count: 1 });
    }
}
