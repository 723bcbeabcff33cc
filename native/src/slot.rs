//! A stream as this worker's host knows it: its Envoy stream, its scheduler, whether Envoy holds
//! it stopped, and what waits for its own scheduler event (a reply, a resume, a reset decided while
//! another stream's hook ran).

use crate::link::Sched;
use crate::stream::Stream;

/// What is carried out for a stream from its own scheduler event.
#[derive(Debug)]
pub enum Deferred {
    Reply {
        status: u32,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Continue the stream, as decided when it had been stopped `stops` times.
    Resume {
        stops: u64,
    },
    Reset,
}

/// What re-enters Envoy's filter chain, run once the hook has let go of the worker: continuing a
/// stream delivers its held body and trailers (this module's hooks for it run at once), and a
/// reset destroys it (its destroy hook runs at once).
#[derive(Debug, Clone, Copy)]
pub enum After {
    Continue(Stream),
    Reset(Stream),
}

impl After {
    pub fn stream(self) -> Stream {
        match self {
            After::Continue(s) | After::Reset(s) => s,
        }
    }

    pub fn run(self) {
        match self {
            After::Continue(s) => s.continue_decoding(),
            After::Reset(s) => s.reset(),
        }
    }
}

/// A stream of this worker, as the host knows it.
pub struct Slot {
    pub stream: Stream,
    pub scheduler: Option<Sched>,
    /// A request hook of this stream returned a stop (Envoy holds it until continued).
    pub paused: bool,
    /// How many times the lifecycle stopped this stream in its own hooks: a resume asked for
    /// before the latest stop is stale (see `resume_due`).
    pub stops: u64,
    pub deferred: Vec<Deferred>,
}

impl Slot {
    pub fn new(stream: Stream) -> Slot {
        Slot { stream, scheduler: None, paused: false, stops: 0, deferred: Vec::new() }
    }

    /// The lifecycle stopped this stream in one of its hooks (its headers waiting for a secret,
    /// its body for the ledger).
    pub fn stopped(&mut self) {
        self.stops += 1;
    }

    /// Does a resume asked for when the stream had been stopped `stops` times continue it now?
    /// Only if it is held, and was not stopped again since: a resume that waited for the
    /// stream's scheduler while its next hook stopped it for a new reason (a priced body now
    /// waiting for the ledger) belongs to a decision that no longer holds, and would let the
    /// request go on undecided.
    pub fn resume_due(&mut self, stops: u64) -> bool {
        stops == self.stops && std::mem::take(&mut self.paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> Slot {
        let mut slot = Slot::new(Stream(std::ptr::null_mut()));
        slot.paused = true;
        slot.stopped();
        slot
    }

    #[test]
    fn a_resume_continues_a_held_stream_once() {
        let mut slot = held();
        assert!(slot.resume_due(1));
        assert!(!slot.resume_due(1), "continued already");
    }

    #[test]
    fn a_resume_asked_before_the_stream_was_stopped_again_is_stale() {
        // Decided at its headers (resume asked), then its body's hook stops it to wait for the
        // ledger before the resume's scheduler event runs: that resume must not let it go on.
        let mut slot = held();
        let asked = slot.stops;
        slot.stopped();
        assert!(!slot.resume_due(asked));
        assert!(slot.paused, "still held, for the ledger's answer");
        // The ledger's answer resumes it anew.
        assert!(slot.resume_due(slot.stops));
    }

    #[test]
    fn a_stream_its_hook_let_go_is_not_continued() {
        let mut slot = held();
        slot.paused = false;
        assert!(!slot.resume_due(slot.stops));
    }
}
