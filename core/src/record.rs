//! The last step of the pipeline: what the gateway records about a request. `Audit` is who
//! called what (the access log's fields, set as Envoy filter state); `Metric` names the
//! contract's counters. Neither ever holds a token or a secret.

use crate::response::Code;

/// Who called what, for the access log. Never a token or a secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    pub subject: Option<String>,
    pub target: Option<String>,
    pub jti: Option<String>,
    pub run: Option<String>,
    pub decision: &'static str,
    pub cache: Option<&'static str>,
    /// The request's `Idempotency-Key`, when it is a valid one.
    pub idempotency_key: Option<String>,
    /// The store's version of the injected secret (KV v2 version, AWS `VersionId`).
    pub secret_version: Option<String>,
    /// The `jti` of a credential the issuing endpoint issued.
    pub issued: Option<String>,
    /// What the request costs in its target's unit (targets with a `cost`).
    pub cost: Option<u64>,
    /// How its cost stands against spend caps: `reserved`, `retry`, `uncapped`, later `refunded`.
    pub spend: Option<&'static str>,
    /// The fleet ledger's budgets it was counted in (names, comma-separated).
    pub budgets: Option<String>,
    /// The model a priced model call named.
    pub model: Option<String>,
}

/// A labelled metric family. Proxy-wasm has no labels: the stat name carries them as
/// `family;label=value;label=value`, and the shipped bootstraps' `stats_config.stats_tags` turn
/// each `;label=value` into a Prometheus label (`keyward_target_requests{target="stripe",
/// code="allow"}`). Label values are target and store names from the configuration (`[A-Za-z0-9_.-]`)
/// and the contract's codes, never anything a client sends, so their number is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Counter: requests decided per target (`target`, `code`: `allow` or the denial's error).
    TargetRequests,
    /// Counter: secret fetches per store (`store`, `result`: `ok` or `error`).
    StoreFetches,
    /// Histogram: a store's answer time for a secret fetch, in microseconds (`store`).
    StoreFetchUs,
    /// Histogram: what the filter added to a request, in microseconds, from its headers reaching
    /// the filter to the request going on or being answered (`outcome`: `hit`, `miss`, `stale`,
    /// `denied`). A miss includes the store's answer time.
    AddedUs,
    /// Counter: costs reserved against credentials' spend caps, in the target's cost unit
    /// (`target`).
    SpendReserved,
    /// Counter: reservations released because the vendor answered with a `refund_on` status
    /// (`target`).
    SpendRefunded,
    /// Histogram: where a cold miss's time goes, in microseconds (`phase`): `park` (the headers'
    /// decision up to parking), `wake` (the fetch queued until the root sends it), `decode` (the
    /// store's answer arriving until its waiters are decided again: parse, shared write), `resume`
    /// (deciding one waiter again and resuming it). The callout itself is `StoreFetchUs`.
    ColdUs,
    /// Counter: calls to the fleet ledger (`op`: `grant`, `return`, `direct`, `refund`, `read`;
    /// `result`: `ok`, `condition` (refused by its condition: no room, a retry), `throttled`,
    /// `error`).
    LedgerCalls,
    /// Counter: spend charged to each budget (`budget`), in its targets' cost unit.
    BudgetSpend,
    /// Counter: tokens model calls used, as their vendor reported them (`target`, `model`,
    /// `kind`: `input`, `cached_input`, `cache_write`, `cache_write_1h`, `output`; `model` is
    /// `other` for a model priced by a target's default).
    Tokens,
    /// Counter: what model calls cost from their reported usage, in the cap's unit (`target`,
    /// `model`).
    UsageCost,
    /// Counter: the unused part of model calls' reservations, released once their usage was read
    /// (`target`).
    SpendReleased,
    /// Counter: model calls whose usage could not be read (cut, compressed, malformed, too large):
    /// their whole reservation stays charged (`target`).
    UsageUnread,
}

impl Family {
    pub const ALL: [Family; 13] = [
        Family::TargetRequests,
        Family::StoreFetches,
        Family::StoreFetchUs,
        Family::AddedUs,
        Family::SpendReserved,
        Family::SpendRefunded,
        Family::ColdUs,
        Family::LedgerCalls,
        Family::BudgetSpend,
        Family::Tokens,
        Family::UsageCost,
        Family::SpendReleased,
        Family::UsageUnread,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::TargetRequests => "keyward_target_requests_total",
            Family::StoreFetches => "keyward_store_fetches_total",
            Family::StoreFetchUs => "keyward_store_fetch_microseconds",
            Family::AddedUs => "keyward_added_microseconds",
            Family::SpendReserved => "keyward_spend_reserved_total",
            Family::SpendRefunded => "keyward_spend_refunded_total",
            Family::ColdUs => "keyward_cold_phase_microseconds",
            Family::LedgerCalls => "keyward_ledger_calls_total",
            Family::BudgetSpend => "keyward_budget_spend_total",
            Family::Tokens => "keyward_tokens_total",
            Family::UsageCost => "keyward_usage_cost_total",
            Family::SpendReleased => "keyward_spend_released_total",
            Family::UsageUnread => "keyward_usage_unread_total",
        }
    }

    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Family::TargetRequests => &["target", "code"],
            Family::StoreFetches => &["store", "result"],
            Family::StoreFetchUs => &["store"],
            Family::AddedUs => &["outcome"],
            Family::SpendReserved | Family::SpendRefunded | Family::SpendReleased | Family::UsageUnread => &["target"],
            Family::Tokens => &["target", "model", "kind"],
            Family::UsageCost => &["target", "model"],
            Family::ColdUs => &["phase"],
            Family::LedgerCalls => &["op", "result"],
            Family::BudgetSpend => &["budget"],
        }
    }

    /// FNV-1a over the family's name and each label value (a 0xff byte between values: none is in a
    /// name): how the executors key the labelled stats they keep (collisions share a bucket).
    pub fn label_hash(self, values: &[&str]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: u8| {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        self.name().bytes().for_each(&mut eat);
        for v in values {
            eat(0xff);
            v.bytes().for_each(&mut eat);
        }
        h
    }

    pub fn is_histogram(self) -> bool {
        matches!(self, Family::StoreFetchUs | Family::AddedUs | Family::ColdUs)
    }

    /// The stat name for these label values (in the order of `labels`), written into `out`.
    pub fn write_stat_name(self, values: &[&str], out: &mut String) {
        out.clear();
        out.push_str(self.name());
        for (label, value) in self.labels().iter().zip(values) {
            out.push(';');
            out.push_str(label);
            out.push('=');
            out.push_str(value);
        }
    }
}

/// The contract's counters (`keyward_*` in Envoy's stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Allowed,
    Denied(Code),
    FetchOk,
    FetchError,
    CacheHit,
    CacheMiss,
    CacheStale,
    RevocationOk,
    RevocationError,
    /// A request refused because the revocation list in force is older than `max_stale_s`.
    RevocationStale,
    LimitCasRetry,
    LimitFull,
    VendorRejected,
    VaultLogin,
    VaultRenew,
    VaultAuthError,
    ResponseScrubbed,
    /// A VM took a configuration: once per worker at start, again after each reload of a VM
    /// whose module crashed (`failure_policy: FAIL_RELOAD`) and each reconfiguration.
    VmConfigured,
    /// The issuing endpoint issued a credential.
    Issued,
    /// A request that would have gone on without a decision (a path the lifecycle did not
    /// foresee), refused instead.
    Undecided,
    /// A fleet-ledger call failed (no answer, throttled, garbage): the requests that needed it get
    /// 503 for a moment.
    LedgerUnavailable,
    /// The issuing endpoint refused, per error code.
    IssueDenied(Code),
}

impl Metric {
    /// Every counter but the denials (those are one per `Code`), for defining them up front.
    pub const PLAIN: [Metric; 19] = [
        Metric::Allowed,
        Metric::FetchOk,
        Metric::FetchError,
        Metric::CacheHit,
        Metric::CacheMiss,
        Metric::CacheStale,
        Metric::RevocationOk,
        Metric::RevocationError,
        Metric::RevocationStale,
        Metric::LimitCasRetry,
        Metric::LimitFull,
        Metric::VendorRejected,
        Metric::VaultLogin,
        Metric::VaultRenew,
        Metric::VaultAuthError,
        Metric::ResponseScrubbed,
        Metric::VmConfigured,
        Metric::Undecided,
        Metric::LedgerUnavailable,
    ];

    /// The counter's name in Envoy's stats: Prometheus's conventions (`_total`), a code or an
    /// outcome as a label (`;label=value`, which the bootstraps' `stats_tags` turn into one).
    pub fn name(self) -> String {
        let plain = match self {
            Metric::Denied(c) => return format!("keyward_requests_total;decision={}", c.as_str()),
            Metric::IssueDenied(c) => return format!("keyward_issue_requests_total;decision={}", c.as_str()),
            Metric::Issued => "keyward_issue_requests_total;decision=issued",
            Metric::Allowed => "keyward_requests_total;decision=allow",
            Metric::FetchOk => "keyward_secret_fetches_total;result=ok",
            Metric::FetchError => "keyward_secret_fetches_total;result=error",
            Metric::CacheHit => "keyward_cache_lookups_total;outcome=hit",
            Metric::CacheMiss => "keyward_cache_lookups_total;outcome=miss",
            Metric::CacheStale => "keyward_cache_lookups_total;outcome=stale",
            Metric::RevocationOk => "keyward_revocation_refreshes_total;result=ok",
            Metric::RevocationError => "keyward_revocation_refreshes_total;result=error",
            Metric::RevocationStale => "keyward_revocation_stale_refusals_total",
            Metric::LimitCasRetry => "keyward_limit_cas_retries_total",
            Metric::LimitFull => "keyward_limit_table_full_total",
            Metric::VendorRejected => "keyward_vendor_rejected_keys_total",
            Metric::VaultLogin => "keyward_vault_logins_total",
            Metric::VaultRenew => "keyward_vault_renewals_total",
            Metric::VaultAuthError => "keyward_vault_auth_errors_total",
            Metric::ResponseScrubbed => "keyward_responses_scrubbed_total",
            Metric::VmConfigured => "keyward_vm_configurations_total",
            Metric::Undecided => "keyward_undecided_requests_total",
            Metric::LedgerUnavailable => "keyward_ledger_unavailable_total",
        };
        plain.to_string()
    }

    /// Every counter, denials included.
    pub fn all() -> impl Iterator<Item = Metric> {
        Metric::PLAIN
            .into_iter()
            .chain([Metric::Issued])
            .chain(Code::ALL.iter().map(|c| Metric::Denied(*c)))
            .chain(Code::ALL.iter().map(|c| Metric::IssueDenied(*c)))
    }
}
