//! How other threads reach one worker's lifecycle: the answers of its callouts (made on the main
//! thread), and a wake-up. A wake-up is a scheduler event posted to one of the worker's waiting
//! streams (only a stream can be scheduled on a worker in this ABI); a worker with no waiting
//! stream takes its answers and its tick at its next request.

use crate::abi;
use keyward_core::host::{CallId, ContextId};
use keyward_core::lifecycle::Answer;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The scheduler event that runs the worker's root work (answers, the tick).
pub const ROOT_EVENT: u64 = 1;
/// The scheduler event that carries out what was decided for the stream itself.
pub const EFFECTS_EVENT: u64 = 2;
/// A wake-up not answered in this long is posted again (its stream may have gone meanwhile).
const REPOST_MS: u64 = 100;

/// A stream's scheduler, usable from any thread (Envoy's commit is thread-safe).
#[derive(Clone, Copy)]
pub struct Sched(pub abi::Scheduler);
// SAFETY: Envoy documents scheduler commits as callable from any thread; the pointer is deleted
// only under the `Link::wakers` lock, after it is taken out of the map.
unsafe impl Send for Sched {}

impl Sched {
    pub fn commit(self, event: u64) {
        // SAFETY: a scheduler not yet deleted (see `Send`).
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0, event) }
    }
}

/// How a worker is woken: a stream of its own (a worker thread), or the configuration's scheduler
/// (the main thread's worker, which has no streams).
#[derive(Default)]
pub enum Waker {
    #[default]
    Streams,
    Main(std::sync::Weak<crate::config::Shared>),
}

#[derive(Default)]
pub struct Link {
    pub waker: Waker,
    /// This worker's counters since the main thread last handed them to Envoy.
    pub counts: Mutex<crate::counts::Counts>,
    /// Callout answers, each with when it arrived (microseconds since the epoch).
    pub inbox: Mutex<Vec<(CallId, Answer, u64)>>,
    /// Streams of this worker that wait (paused), each with its scheduler.
    pub wakers: Mutex<BTreeMap<ContextId, Sched>>,
    /// When the lifecycle next wants its tick (milliseconds since the epoch).
    pub due_ms: AtomicU64,
    /// When a wake-up was last posted (0: none outstanding).
    posted_ms: AtomicU64,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Link {
    pub fn new(waker: Waker) -> Link {
        Link { waker, ..Link::default() }
    }

    pub fn deliver(&self, call: CallId, answer: Answer, now_ms: u64) {
        lock(&self.inbox).push((call, answer, crate::host::now_us()));
        self.wake(now_ms);
    }

    pub fn take_answers(&self) -> Vec<(CallId, Answer, u64)> {
        std::mem::take(&mut *lock(&self.inbox))
    }

    pub fn has_answers(&self) -> bool {
        !lock(&self.inbox).is_empty()
    }

    /// Post the root event to a waiting stream, unless one is on its way.
    pub fn wake(&self, now_ms: u64) {
        let posted = self.posted_ms.load(Ordering::Acquire);
        if posted != 0 && now_ms.saturating_sub(posted) < REPOST_MS {
            return;
        }
        if self.posted_ms.compare_exchange(posted, now_ms.max(1), Ordering::AcqRel, Ordering::Acquire).is_err() {
            return;
        }
        if let Waker::Main(shared) = &self.waker {
            if !shared.upgrade().is_some_and(|s| s.commit(ROOT_EVENT)) {
                self.posted_ms.store(0, Ordering::Release);
            }
            return;
        }
        let wakers = lock(&self.wakers);
        match wakers.values().next() {
            Some(s) => s.commit(ROOT_EVENT),
            None => self.posted_ms.store(0, Ordering::Release),
        }
    }

    /// The root work ran: the next wake-up may be posted.
    pub fn woken(&self) {
        self.posted_ms.store(0, Ordering::Release);
    }

    pub fn add_waker(&self, ctx: ContextId, s: Sched) {
        lock(&self.wakers).insert(ctx, s);
    }

    /// Take a stream's scheduler out (it is deleted by the caller, after the lock).
    pub fn remove_waker(&self, ctx: ContextId) -> Option<Sched> {
        lock(&self.wakers).remove(&ctx)
    }

    pub fn delete(s: Sched, link: &Link) {
        // Deleted under the lock, so no wake-up commits it meanwhile.
        let _guard = lock(&link.wakers);
        // SAFETY: taken out of the map; deleted once.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(s.0) }
    }
}
