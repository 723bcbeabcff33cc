//! Model calls settled from their answer: the vendor's reported usage is read as the answer passes
//! (a JSON body copied up to a bound, or server-sent events scanned line by line, never held
//! back), and at its end the usage is charged and the rest of the reservation released. An
//! answer whose usage cannot be read (cut, compressed, malformed, too large, not the vendor's)
//! keeps the whole reservation: a cap may over-count, never under-count.

use super::state::{Served, Stream};
use super::Lifecycle;
use crate::host::{ContextId, Headers, Host};
use crate::policy::tokens::{self, Meter, StreamUsage, Usage};
use crate::record::Family;

/// The largest JSON answer copied to read its usage (a chat completion is a few KiB).
pub const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// A model call from its reservation to its settlement.
#[derive(Clone)]
pub struct Metering {
    pub(super) meter: Meter,
    pub(super) reading: Reading,
}

#[derive(Clone)]
pub enum Reading {
    /// The answer has not begun.
    Waiting,
    /// A whole JSON answer, copied as it passes.
    Json(Vec<u8>),
    Stream(StreamUsage),
    /// Settled, refunded, or its usage unreadable: nothing more is read.
    Done,
}

impl Metering {
    pub fn new(meter: Meter) -> Metering {
        Metering { meter, reading: Reading::Waiting }
    }
}

/// A model name as a metric label: `[A-Za-z0-9_.-]`, anything else as `_` (the access log has it
/// exactly).
fn label(model: &str) -> String {
    model.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect()
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers.get(name)
}

impl Lifecycle {
    /// The vendor's answer to a model call began (`refunded`: its status released the whole
    /// reservation already).
    pub(super) fn begin_reading(&mut self, host: &mut impl Host, ctx: ContextId, headers: &Headers, refunded: bool) {
        let from_vendor = host.response_from_upstream();
        let Some(Stream::Allowed(Served { meter: Some(m), .. })) = self.streams.get_mut(&ctx) else { return };
        let encoded = header(headers, "content-encoding").is_some_and(|v| !v.eq_ignore_ascii_case(b"identity"));
        let sse = header(headers, "content-type").and_then(|v| v.get(..17)).is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"));
        m.reading = if refunded || !from_vendor || encoded {
            Reading::Done
        } else if sse {
            Reading::Stream(StreamUsage::new(m.meter.dialect))
        } else {
            Reading::Json(Vec::new())
        };
        host.set_filter_state("keyward.usage", if refunded { "refunded" } else { "unread" });
        if !refunded && matches!(m.reading, Reading::Done) {
            self.unread(host, ctx, if encoded { "a compressed answer" } else { "an answer Envoy made" });
        }
    }

    /// Part of the vendor's answer to a stream (`size`: the bytes of this part; `end`: the last).
    pub(super) fn read_answer(&mut self, host: &mut impl Host, ctx: ContextId, size: usize, end: bool) {
        let Some(Stream::Allowed(Served { meter: Some(m), .. })) = self.streams.get(&ctx) else { return };
        if matches!(m.reading, Reading::Done | Reading::Waiting) {
            return;
        }
        let chunk = if size == 0 { Ok(Vec::new()) } else { host.response_body(size) };
        let Some(Stream::Allowed(Served { meter: Some(m), .. })) = self.streams.get_mut(&ctx) else { return };
        let Ok(chunk) = chunk else {
            m.reading = Reading::Done;
            return self.unread(host, ctx, "an answer that could not be read");
        };
        match &mut m.reading {
            Reading::Json(buf) if buf.len() + chunk.len() > MAX_ANSWER => {
                m.reading = Reading::Done;
                return self.unread(host, ctx, "an answer larger than the gateway reads");
            }
            Reading::Json(buf) => buf.extend_from_slice(&chunk),
            Reading::Stream(s) => s.feed(&chunk),
            Reading::Waiting | Reading::Done => {}
        }
        // A stream is settled as soon as it has said all its usage: an SDK closes it after the
        // last event, often before the vendor's end of stream arrives.
        let said_all = matches!(&m.reading, Reading::Stream(s) if s.usage().is_some());
        if end || said_all {
            self.settle_call(host, ctx);
        }
    }

    /// The answer ended (its last part, or its trailers): charge its usage, release the rest.
    pub(super) fn settle_call(&mut self, host: &mut impl Host, ctx: ContextId) {
        let Some(Stream::Allowed(s)) = self.streams.get_mut(&ctx) else { return };
        let Some(m) = s.meter.as_mut() else { return };
        let usage = match std::mem::replace(&mut m.reading, Reading::Done) {
            Reading::Json(buf) => tokens::answer_usage(m.meter.dialect, &buf).ok(),
            Reading::Stream(st) => st.usage(),
            Reading::Waiting | Reading::Done => return,
        };
        let Some(usage) = usage else {
            return self.unread(host, ctx, "an answer without readable usage");
        };
        let (meter, reservation, target) = (m.meter.clone(), s.reservation.take(), s.cfg.targets.get(s.target).map(|t| t.name.clone()).unwrap_or_default());
        let cost = tokens::cost(&meter.prices, &usage);
        if let Some(r) = reservation {
            let held = r.charge.cost;
            if cost < held {
                self.release_part(host, &r, held - cost);
                host.count(Family::SpendReleased, &[&target], held - cost);
            } else if cost > held {
                log::warn!("target {target}: a call's reported usage cost {cost}, beyond the {held} reserved for it; the cap counts what was reserved");
            }
        }
        record_usage(host, &target, &meter, &usage, cost);
    }

    /// A model call whose usage cannot be read: its whole reservation stays charged.
    fn unread(&mut self, host: &mut impl Host, ctx: ContextId, why: &str) {
        let Some(Stream::Allowed(s)) = self.streams.get(&ctx) else { return };
        let target = s.cfg.targets.get(s.target).map_or("none", |t| t.name.as_str());
        log::info!("target {target}: {why}; the call's whole reservation stays charged");
        host.count(Family::UsageUnread, &[target], 1);
    }
}

/// A model call whose stream ended before its answer did (a client or a vendor that left): its
/// whole reservation stays charged.
pub(super) fn gone_unsettled(host: &mut impl Host, s: &Served) {
    if s.meter.as_ref().is_some_and(|m| !matches!(m.reading, Reading::Done)) {
        let target = s.cfg.targets.get(s.target).map_or("none", |t| t.name.as_str());
        log::info!("target {target}: a call ended before its answer did; its whole reservation stays charged");
        host.count(Family::UsageUnread, &[target], 1);
    }
}

/// The access log's and the metrics' record of a settled call.
fn record_usage(host: &mut impl Host, target: &str, meter: &Meter, u: &Usage, cost: u64) {
    // Unlisted models (priced by the default) share one label: their names are the caller's.
    let model = if meter.unlisted { "other".to_string() } else { label(&meter.model) };
    let kinds =
        [("input", u.input), ("cached_input", u.cached_input), ("cache_write", u.cache_write), ("cache_write_1h", u.cache_write_1h), ("output", u.output)];
    for (kind, n) in kinds {
        if n > 0 {
            host.count(Family::Tokens, &[target, &model, kind], n);
        }
    }
    host.count(Family::UsageCost, &[target, &model], cost);
    let tokens_in = u.input.saturating_add(u.cached_input).saturating_add(u.cache_write).saturating_add(u.cache_write_1h);
    host.set_filter_state("keyward.tokens_in", &tokens_in.to_string());
    host.set_filter_state("keyward.tokens_out", &u.output.to_string());
    host.set_filter_state("keyward.cost", &cost.to_string());
    host.set_filter_state("keyward.usage", "read");
}
