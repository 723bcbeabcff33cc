//! What goes into the lifecycle: the events of a root context and a callout's answer.

use super::state::Stream;
use super::Lifecycle;
use crate::host::{CallId, ContextId};

/// What happens to a root context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stream's request headers arrived: decide the request.
    Request(ContextId),
    /// Part of a stream's request body arrived (`size`: all of it buffered so far; `end`: the
    /// last part). The issuing endpoint and requests priced from their body read bodies; other
    /// streams continue.
    RequestBody { ctx: ContextId, size: usize, end: bool },
    /// A stream's request trailers arrived: the end of its body (the last data frame did not say
    /// so).
    RequestTrailers(ContextId),
    /// The vendor's response headers for a stream arrived.
    Response(ContextId),
    /// Part of the vendor's response body arrived (`size`: the bytes of this part, each part
    /// goes on as it comes; `end`: the last part). Only model calls read it.
    ResponseBody { ctx: ContextId, size: usize, end: bool },
    /// The vendor's response trailers for a stream arrived.
    ResponseTrailers(ContextId),
    /// A stream ended (answered, reset, or the client left).
    StreamGone(ContextId),
    /// A callout answered or failed (Envoy answers a failure with no headers).
    Answer { call: CallId, answer: Answer },
    /// The periodic tick.
    Tick,
    /// The root callback asked for with `Host::wake_root`.
    Woken,
}

/// A callout's answer: its `:status` (`None`: no answer at all: timeout, reset, no route) and its
/// body (`None`: larger than `secrets::store::MAX_BODY`, not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: Option<u32>,
    pub body: Option<Vec<u8>>,
}

impl Answer {
    pub fn failed() -> Answer {
        Answer { status: None, body: Some(Vec::new()) }
    }
}

impl Lifecycle {
    /// Whether handling `ev` now looks at the time it is given. It does not for the events that
    /// only pass a decided stream's parts along (its body, an answer not read for usage) or
    /// forget a stream that holds nothing waiting: an executor whose clock is costly (a hostcall
    /// in wasm) may give those its last reading instead. Lifecycle tests hand such events a time
    /// of zero, so any of them that used it would show.
    pub fn reads_clock(&self, ev: &Event) -> bool {
        let state = |ctx: &ContextId| self.streams.get(ctx);
        match ev {
            // Let on (allowed) or held (answered): no deadline, no record.
            Event::RequestBody { ctx, .. } => !matches!(state(ctx), Some(Stream::Allowed(_) | Stream::Answered)),
            // Read only for a model call's usage.
            Event::ResponseBody { ctx, .. } => matches!(state(ctx), Some(Stream::Allowed(s)) if s.meter.is_some()),
            // Only a stream counted while it waits gives anything back.
            Event::StreamGone(ctx) => matches!(state(ctx), Some(Stream::Parked(_) | Stream::Pricing { .. })),
            _ => true,
        }
    }
}
