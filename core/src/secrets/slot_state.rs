//! The secret cache's shared state, one record per slot in Envoy shared data (one copy per
//! process, read and written by every worker with compare-and-swap), and the lifecycle rules:
//!
//! - **fresh** for `ttl` after a fetch; within `ahead` of the end of the TTL a background refresh
//!   is due, so a key in use never expires under traffic;
//! - **stale**: after a *transient* failure (timeout, connection failure, 5xx, garbage), the last
//!   good value is served up to `stale_if_error` past its TTL, and retried in the background;
//! - **evicted**: an *authoritative* answer (404, 401/403, a deleted or destroyed version) drops
//!   the value at once; it is never served stale;
//! - **suspect**: the vendor rejected the value (401/403); the next request fetches it again;
//! - a **fetch lease** makes one worker of the process fetch while the others wait for its result.
//!
//! Layout, version 2: `"KW2" | lease_until_ms u64 | suspect_at_ms u64 | failure_at_ms u64 |
//! failure kind u8 (0 none, 1 transient, 2 authoritative) | has_entry u8 | [entry]`, where an entry
//! is `fetched_at_ms u64 | version len u16 + bytes | n u16 | n * (key len u16 + key, value len u32 + value)`.

use crate::secret::Secret;
use crate::secrets::store::Fetched;
use crate::wire::Reader;

const MAGIC: &[u8; 3] = b"KW2";

#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub fetched_at_ms: u64,
    pub data: Fetched,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub at_ms: u64,
    /// Transient failures may be served stale; authoritative ones evict.
    pub transient: bool,
}

/// The lifecycle's clock settings, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl_ms: u64,
    pub stale_ms: u64,
    /// Refresh this long before the TTL ends.
    pub ahead_ms: u64,
    /// After a failure: answer from the record (stale or 503) for this long before trying again.
    pub retry_ms: u64,
    /// The vendor may mark a value suspect at most this often.
    pub suspect_every_ms: u64,
}

impl Timing {
    /// `ahead` is a fifth of the TTL, at most 30 s.
    pub fn new(ttl_s: u32, stale_if_error_s: u32) -> Timing {
        let ttl_ms = u64::from(ttl_s) * 1000;
        Timing { ttl_ms, stale_ms: u64::from(stale_if_error_s) * 1000, ahead_ms: (ttl_ms / 5).min(30_000), retry_ms: 1000, suspect_every_ms: 5000 }
    }
}

/// What a request may do with a slot now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Fresh,
    /// Past its TTL (or suspect), the store failing transiently: serve it, marked stale.
    Stale,
    /// Fetch it (the request waits for the answer).
    Fetch,
    /// Nothing usable and the store failed a moment ago: 503 without asking again.
    Failed,
}

#[derive(Debug, Clone, Default)]
pub struct SlotState {
    pub entry: Option<Entry>,
    pub failure: Option<Failure>,
    pub lease_until_ms: u64,
    pub suspect_at_ms: u64,
}

impl SlotState {
    /// A failure newer than the value (or with no value).
    fn failure_since_entry(&self) -> Option<Failure> {
        let f = self.failure?;
        match &self.entry {
            Some(e) if f.at_ms < e.fetched_at_ms => None,
            _ => Some(f),
        }
    }

    /// Is the value past its TTL, or marked suspect by the vendor since it was fetched?
    fn due(e: &Entry, suspect_at_ms: u64, now_ms: u64, t: &Timing) -> bool {
        now_ms >= e.fetched_at_ms.saturating_add(t.ttl_ms) || suspect_at_ms > e.fetched_at_ms
    }

    pub fn classify(&self, now_ms: u64, t: &Timing) -> Use {
        let failure = self.failure_since_entry();
        let recently_failed = failure.is_some_and(|f| now_ms < f.at_ms.saturating_add(t.retry_ms));
        let Some(e) = &self.entry else {
            return if recently_failed { Use::Failed } else { Use::Fetch };
        };
        if !SlotState::due(e, self.suspect_at_ms, now_ms, t) {
            return Use::Fresh;
        }
        if let Some(f) = failure {
            let within_stale = now_ms < e.fetched_at_ms.saturating_add(t.ttl_ms).saturating_add(t.stale_ms);
            if f.transient && within_stale {
                return Use::Stale;
            }
            if recently_failed {
                return Use::Failed;
            }
        }
        Use::Fetch
    }

    /// Should a background fetch start now? For a value in use: shortly before its TTL ends,
    /// when the vendor marked it suspect, or (while served stale) once per `retry_ms`.
    pub fn refresh_due(&self, now_ms: u64, t: &Timing) -> bool {
        let Some(e) = &self.entry else { return false };
        if self.lease_until_ms > now_ms {
            return false;
        }
        if self.failure_since_entry().is_some_and(|f| now_ms < f.at_ms.saturating_add(t.retry_ms)) {
            return false;
        }
        let ahead = e.fetched_at_ms.saturating_add(t.ttl_ms.saturating_sub(t.ahead_ms));
        now_ms >= ahead || self.suspect_at_ms > e.fetched_at_ms
    }

    /// Take the fetch lease unless another worker holds one. The caller writes the state back
    /// with the CAS it read; only one worker can win.
    pub fn take_lease(&mut self, now_ms: u64, for_ms: u64) -> bool {
        if self.lease_until_ms > now_ms {
            return false;
        }
        self.lease_until_ms = now_ms.saturating_add(for_ms);
        true
    }

    pub fn lease_held(&self, now_ms: u64) -> bool {
        self.lease_until_ms > now_ms
    }

    /// The vendor rejected the value fetched at `fetched_at_ms`. Returns whether this changes
    /// anything: a newer value, or a mark within `suspect_every_ms`, is left alone.
    pub fn mark_suspect(&mut self, fetched_at_ms: u64, now_ms: u64, t: &Timing) -> bool {
        let Some(e) = &self.entry else { return false };
        if e.fetched_at_ms != fetched_at_ms || self.suspect_at_ms > e.fetched_at_ms {
            return false;
        }
        if now_ms < self.suspect_at_ms.saturating_add(t.suspect_every_ms) {
            return false;
        }
        self.suspect_at_ms = now_ms;
        true
    }

    /// Record a fetch's outcome and release the lease.
    pub fn record(&mut self, result: Result<Fetched, Failure>, now_ms: u64) {
        self.lease_until_ms = 0;
        match result {
            Ok(data) => {
                self.entry = Some(Entry { fetched_at_ms: now_ms, data });
                self.failure = None;
            }
            Err(f) => {
                if !f.transient {
                    self.entry = None;
                }
                self.failure = Some(f);
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.lease_until_ms.to_le_bytes());
        out.extend_from_slice(&self.suspect_at_ms.to_le_bytes());
        let (fat, kind) = match self.failure {
            None => (0, 0u8),
            Some(f) => (f.at_ms, if f.transient { 1 } else { 2 }),
        };
        out.extend_from_slice(&fat.to_le_bytes());
        out.push(kind);
        match &self.entry {
            None => out.push(0),
            Some(e) => {
                out.push(1);
                out.extend_from_slice(&e.fetched_at_ms.to_le_bytes());
                let ver = e.data.version.as_deref().unwrap_or("").as_bytes();
                let ver = ver.get(..ver.len().min(u16::MAX as usize)).unwrap_or_default();
                out.extend_from_slice(&(ver.len() as u16).to_le_bytes());
                out.extend_from_slice(ver);
                out.extend_from_slice(&(e.data.fields.len() as u16).to_le_bytes());
                for (k, v) in &e.data.fields {
                    out.extend_from_slice(&(k.len() as u16).to_le_bytes());
                    out.extend_from_slice(k.as_bytes());
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    out.extend_from_slice(v.expose());
                }
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<SlotState> {
        let mut r = Reader::new(b);
        if r.take(3)? != MAGIC {
            return None;
        }
        let lease_until_ms = r.u64()?;
        let suspect_at_ms = r.u64()?;
        let fat = r.u64()?;
        let failure = match r.u8()? {
            0 => None,
            1 => Some(Failure { at_ms: fat, transient: true }),
            2 => Some(Failure { at_ms: fat, transient: false }),
            _ => return None,
        };
        let entry = match r.u8()? {
            0 => None,
            1 => {
                let fetched_at_ms = r.u64()?;
                let vlen = r.u16()? as usize;
                let ver = std::str::from_utf8(r.take(vlen)?).ok()?.to_string();
                let n = r.u16()? as usize;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    let klen = r.u16()? as usize;
                    let k = std::str::from_utf8(r.take(klen)?).ok()?.to_string();
                    let vlen = r.u32()? as usize;
                    fields.push((k, Secret::new(r.take(vlen)?.to_vec())));
                }
                let version = if ver.is_empty() { None } else { Some(ver) };
                Some(Entry { fetched_at_ms, data: Fetched { fields, version, problems: Vec::new() } })
            }
            _ => return None,
        };
        if !r.done() {
            return None;
        }
        Some(SlotState { entry, failure, lease_until_ms, suspect_at_ms })
    }
}

#[cfg(test)]
mod tests;
