//! The fleet ledger: `lim.total`, `lim.spend`, a parent's `plim`, retry recognition and budgets
//! shared by every gateway that uses the same DynamoDB table, so the sum over the fleet never
//! exceeds a cap.
//!
//! One item per account (a credential's limits, or a budget's window), with `s` and `n`: the
//! spend and the count *held*, which is what every gateway has been granted (its live slice) plus
//! what it reported spent when it gave a slice back. Every change is one conditional `UpdateItem`
//! on one item (DynamoDB, dynalite and moto all do those atomically), and a grant is made only if
//! `held + grant <= cap`: the sum of what the fleet spent and may still spend never exceeds the
//! cap, at every instant.
//!
//! A gateway spends from its slice in Envoy shared data, with no call per request. It gives back
//! what it did not use when the slice runs out (renewal: give back and take again in one call),
//! when its lease ends unused, when the credential ends, and on drain. A gateway that dies holding
//! a slice cannot say what it spent from it, so its slice stays counted as spent: the cap may
//! over-count by at most one slice per gateway that died, never under-count. Slices are a fraction
//! of what is left (`slice`), so that loss is small, and the rest of the budget stays usable by the
//! other gateways.
//!
//! A charge with an `Idempotency-Key` is reserved directly, with its retry fingerprint in the same
//! item, so a retry that lands on another gateway is recognised; so is a charge larger than a
//! slice would be. Refunds are credited to this gateway's slice and reach the ledger with its next
//! renewal or return.

pub mod budget;
pub mod config;
pub mod dynamo;
pub mod slice;

pub use config::Ledger;

/// A direct charge's mark in an account's item: its attribute (`r_<fingerprint>`) and its value,
/// which names this charge and no other (`until_s << 21 | nonce`): a refund removes this charge
/// only, never a later one under the same fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub value: u64,
}

impl Mark {
    pub const NONCE_BITS: u32 = 21;
    pub fn new(name: String, until_s: u64, nonce: u64) -> Mark {
        Mark { name, value: (until_s.min((1 << 32) - 1) << Mark::NONCE_BITS) | (nonce & ((1 << Mark::NONCE_BITS) - 1)) }
    }
    /// The second a mark's value may be forgotten.
    pub fn until_s(value: u64) -> u64 {
        value >> Mark::NONCE_BITS
    }
    /// The pin that says a retry was admitted on the charge: the charge can no longer be refunded.
    pub fn pin_of(name: &str) -> String {
        format!("p_{}", name.trim_start_matches("r_").trim_start_matches("x_"))
    }
}

/// Spend and count, as the ledger keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub spend: u64,
    pub count: u64,
}

impl Amounts {
    pub fn is_zero(&self) -> bool {
        self.spend == 0 && self.count == 0
    }
}

/// The caps of an account (`None`: not capped in that dimension).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub spend: Option<u64>,
    pub count: Option<u64>,
}

/// One account in the ledger: its item's key, its caps, when it stops counting (its credential
/// may no longer be used, its budget window is over), and when its item may go (DynamoDB's TTL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub pk: String,
    pub caps: Caps,
    pub ends_s: u64,
    pub ttl_s: u64,
}

impl Account {
    /// A credential's account: named by the identity of the key that verifies it and its `jti`,
    /// like its per-instance limit entry.
    pub fn credential(key_id: u64, jti: &str, caps: Caps, keep_until_s: u64) -> Account {
        Account { pk: format!("c/{key_id:016x}/{jti}"), caps, ends_s: keep_until_s, ttl_s: keep_until_s.saturating_add(3600) }
    }

    /// A budget's account for the window that holds `now_s`; `Err`: when that window ends.
    pub fn budget(b: &budget::Budget, now_s: u64) -> (Account, u64) {
        let (window, ends_s) = b.window.at(now_s);
        let caps = Caps { spend: b.spend, count: b.requests };
        (Account { pk: format!("b/{}/{window}", b.name), caps, ends_s, ttl_s: ends_s.saturating_add(35 * 86_400) }, ends_s)
    }
}
