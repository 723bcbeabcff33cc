//! `engine::Secrets` and `engine::Counter` for one request over this worker's view of shared
//! data: secrets from the cache (parking the request when one must be fetched), verified
//! credentials, the revocation list, and counting the request in its entries, in this Envoy's limit shards or, with a fleet
//! ledger, in the ledger through this gateway's slices.

use super::ledger::Need;
use super::{limits, Lifecycle};
use crate::credential::jwt::HmacKey;
use crate::credential::verified::VerifiedCache;
use crate::engine::{Admitted, Counter, Entry, Holder, Lookup, Secrets, Stage};
use crate::host::Host;
use crate::ledger::{Account, Amounts, Caps, Ledger};
use crate::policy::limits::{Charge, Limits, Verdict};
use crate::record::Family;
use crate::secret::Secret;
use crate::secrets::slot_state::Use;
use crate::secrets::store::Fetched;
use crate::wire::b64;
use std::rc::Rc;

/// `engine::Secrets` over the shared cache, for one request.
pub(super) struct SharedSecrets<'a, H: Host> {
    pub(super) lc: &'a mut Lifecycle,
    pub(super) host: &'a mut H,
    pub(super) now_ms: u64,
    /// The entries this request was already counted in before it parked (asked again in the
    /// same order, they answer as they did).
    pub(super) prior: Vec<Admitted>,
    /// Every entry it is counted in so far, in this decision (the prior ones first).
    pub(super) made: Vec<Admitted>,
}

impl<'a, H: Host> SharedSecrets<'a, H> {
    pub(super) fn new(lc: &'a mut Lifecycle, host: &'a mut H, now_ms: u64) -> SharedSecrets<'a, H> {
        SharedSecrets { lc, host, now_ms, prior: Vec::new(), made: Vec::new() }
    }

    pub(super) fn resumed(lc: &'a mut Lifecycle, host: &'a mut H, now_ms: u64, prior: Vec<Admitted>) -> SharedSecrets<'a, H> {
        SharedSecrets { lc, host, now_ms, prior, made: Vec::new() }
    }

    /// One entry in this Envoy's limit shards (no ledger, or a credential's `rpm`).
    fn local(&mut self, key_id: u64, jti: &str, lim: &Limits, keep_until_s: i64, charge: Option<&Charge>) -> Admitted {
        let verdict = limits::admit_entry(self.host, key_id, jti, lim, keep_until_s, self.now_ms / 1000, charge);
        Admitted { verdict, holder: Some(Holder::Local { key_id, jti: jti.to_string() }) }
    }

    /// One entry in the fleet ledger (a credential's `rpm` in this Envoy's shards).
    fn fleet(&mut self, ledger: &Ledger, entry: &Entry, charge: Option<&Charge>) -> Admitted {
        let now_s = self.now_ms / 1000;
        let cost = charge.map_or(0, |c| c.cost);
        match *entry {
            Entry::Credential { key_id, jti, lim, keep_until_s, stage: Stage::Rate } => {
                if lim.rpm.is_none() {
                    return Admitted::admit();
                }
                // The rate counts in this Envoy only; what it counted stays (the request was made).
                let rpm = Limits { rpm: lim.rpm, total: None, spend: None };
                Admitted { holder: None, ..self.local(key_id, jti, &rpm, keep_until_s, None) }
            }
            Entry::Credential { key_id, jti, lim, keep_until_s, stage } => {
                let caps = Caps { spend: lim.spend, count: lim.total };
                let want = match stage {
                    Stage::Count => Amounts { spend: 0, count: u64::from(caps.count.is_some()) },
                    _ if caps.spend.is_none() => Amounts::default(),
                    _ => Amounts { spend: cost, count: 0 },
                };
                if want.is_zero() {
                    // Nothing to count here (a free request on a spend-capped credential is still
                    // reserved: at nothing). No account is named for it: the warm path of a
                    // credential with one kind of cap stays one slice take.
                    let reserved = stage == Stage::Spend && charge.is_some() && caps.spend.is_some();
                    return Admitted { verdict: if reserved { Verdict::Reserved } else { Verdict::Admit }, holder: None };
                }
                let keep = u64::try_from(keep_until_s).unwrap_or(0);
                let account = Account::credential(key_id, jti, caps, keep);
                // A charge with an Idempotency-Key is made directly with its retry mark, so that
                // its retry on any gateway is recognised; while the account holds too many marks
                // to read back, it is taken from the slice (a retry is then charged again:
                // over-counted, never under-counted).
                let direct = match stage {
                    Stage::Spend if charge.and_then(|c| c.retry).is_some() && self.lc.ledger_marks_room(&account) => {
                        charge.and_then(|c| c.retry).map(|k| (super::ledger::retry_mark(&k), keep.min(now_s + crate::policy::limits::RETRY_WINDOW_S)))
                    }
                    _ => None,
                };
                let need = Need { account, want, direct, budget: false, ledger };
                let ctx = self.lc.current;
                self.lc.ledger_admit(self.host, ctx, &need, self.now_ms)
            }
            Entry::Budget(i) => {
                let Some(b) = ledger.budgets.get(i) else { return Admitted::admit() };
                let want = Amounts { spend: if b.spend.is_some() { cost } else { 0 }, count: u64::from(b.requests.is_some()) };
                if want.is_zero() {
                    return Admitted::admit();
                }
                let (account, _) = Account::budget(b, now_s);
                let need = Need { account, want, direct: None, budget: true, ledger };
                let ctx = self.lc.current;
                let a = self.lc.ledger_admit(self.host, ctx, &need, self.now_ms);
                if a.ok() && want.spend > 0 {
                    self.host.count(Family::BudgetSpend, &[&b.name], want.spend);
                }
                a
            }
        }
    }

    fn lookup(&mut self, slot: usize) -> Lookup<Rc<Fetched>> {
        let t = self.lc.timing;
        let now = self.now_ms;
        let Some(l) = self.lc.local_for_request(self.host, slot, now) else { return Lookup::Pending };
        let (use_, data) = (l.state.classify(now, &t), l.data.clone());
        let found = match (use_, data) {
            (Use::Fresh, Some(d)) => Lookup::Ready(d),
            (Use::Stale, Some(d)) => Lookup::Stale(d),
            (Use::Failed, _) => return Lookup::Failed,
            _ => return Lookup::Pending,
        };
        if let Some(s) = self.lc.slots.get_mut(slot) {
            s.used_at_ms = Some(now);
        }
        found
    }
}

impl<H: Host> Secrets for SharedSecrets<'_, H> {
    fn secret(&mut self, slot: usize) -> Lookup<Rc<Fetched>> {
        self.lookup(slot)
    }

    fn revoked(&mut self, jti: &str, sub: &str) -> Lookup<bool> {
        self.lc.revocation_lookup(self.host, jti, sub, self.now_ms)
    }

    fn verified(&mut self) -> Option<&mut VerifiedCache> {
        Some(&mut self.lc.verified)
    }

    fn signing_key(&mut self, slot: usize, field: &str) -> Lookup<Option<Rc<HmacKey>>> {
        let (f, stale) = match self.lookup(slot) {
            Lookup::Ready(f) => (f, false),
            Lookup::Stale(f) => (f, true),
            Lookup::Pending => return Lookup::Pending,
            Lookup::Failed => return Lookup::Failed,
        };
        if f.field(field).is_none() {
            // Not in the value (an unknown kid): nothing is cached per attacker-chosen kid.
            return if stale { Lookup::Stale(None) } else { Lookup::Ready(None) };
        }
        let Some(cache) = self.lc.slots.get_mut(slot) else { return Lookup::Failed };
        let key = match cache.keys.get(field) {
            Some((src, key)) if Rc::ptr_eq(src, &f) => key.clone(),
            _ => {
                let key = f.field(field).and_then(Secret::expose_str).and_then(b64::key_decode).and_then(|bytes| HmacKey::new(&bytes).ok()).map(Rc::new);
                if key.is_none() {
                    log::warn!("store-held signing key {field:?} is not base64 of at least 32 bytes");
                }
                cache.keys.insert(field.to_string(), (f, key.clone()));
                key
            }
        };
        if stale {
            Lookup::Stale(key)
        } else {
            Lookup::Ready(key)
        }
    }
}

impl<H: Host> Counter for SharedSecrets<'_, H> {
    /// Count the request (and reserve its charge) in one entry, unless this same request was
    /// counted there before it parked.
    fn admit(&mut self, entry: &Entry, charge: Option<&Charge>) -> Admitted {
        if let Some(a) = self.prior.get(self.made.len()).cloned() {
            self.made.push(a.clone());
            return a;
        }
        let a = match (self.lc.cfg.as_ref().and_then(|c| c.ledger.clone()), entry) {
            (Some(ledger), _) => self.fleet(&ledger, entry, charge),
            (None, Entry::Credential { key_id, jti, lim, keep_until_s, stage: Stage::Rate }) => self.local(*key_id, jti, lim, *keep_until_s, charge),
            (None, _) => Admitted::admit(),
        };
        if a.ok() {
            self.made.push(a.clone());
        }
        a
    }

    fn release(&mut self, holder: &Holder, charge: &Charge) {
        match holder {
            Holder::Local { key_id, jti } => {
                limits::refund_entry(self.host, *key_id, jti, charge);
            }
            Holder::Ledger { .. } => {
                if let Some(ledger) = self.lc.cfg.as_ref().and_then(|c| c.ledger.clone()) {
                    self.lc.ledger_release(self.host, &ledger, holder);
                }
            }
        }
    }
}
