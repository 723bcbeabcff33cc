//! One keyward configuration on one Envoy worker thread: its lifecycle, and the host that carries
//! out its effects. Workers are kept per thread (Envoy runs a stream's hooks on its worker), keyed
//! by configuration; what workers share (secret records, limits, the revocation list) is the
//! lifecycle's shared data, process-wide here (`shared`).

use crate::config::{register_link, Shared};
use crate::host::{now_us, Hook, NativeHost, Slot};
use crate::link::{Link, Sched};
use crate::stream::Stream;
use keyward_core::config;
use keyward_core::host::{Action, ContextId};
use keyward_core::lifecycle::{Event, Lifecycle};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub struct Worker {
    pub lc: Lifecycle,
    pub host: NativeHost,
    /// A hook panicked while this worker ran it: its state may be torn. Its requests are refused
    /// (and the next stream of this configuration on this thread gets a new worker).
    pub poisoned: bool,
}

pub type WorkerRef = Rc<RefCell<Worker>>;

thread_local! {
    static WORKERS: RefCell<HashMap<u64, WorkerRef>> = RefCell::new(HashMap::new());
}

/// Roots (one per worker and configuration) take ids below this; streams the ids above, so that
/// a stream's id is never a root's, even once the stream counter wraps (after 4 billion streams:
/// a stream would then share an id only with one that has lived that long).
const FIRST_STREAM_ID: u32 = 1 << 20;

/// A root's context id, unique in the process.
pub fn next_root_id() -> ContextId {
    static IDS: AtomicU32 = AtomicU32::new(0);
    2 + IDS.fetch_add(1, Ordering::Relaxed) % (FIRST_STREAM_ID - 2)
}

/// A stream's context id.
pub fn next_id() -> ContextId {
    static IDS: AtomicU32 = AtomicU32::new(0);
    FIRST_STREAM_ID + IDS.fetch_add(1, Ordering::Relaxed) % (u32::MAX - FIRST_STREAM_ID)
}

/// This thread's worker for `shared` (made and configured on first use). The main thread's
/// worker (`main`) has no streams: it ticks on its own, woken through the configuration's
/// scheduler, so that the revocation list is refreshed (and callouts given up on time) whether or
/// not requests come, as the wasm executor's main-thread VM does.
pub fn for_config(shared: &Arc<Shared>) -> Option<WorkerRef> {
    for_config_on(shared, false)
}

pub fn main_for_config(shared: &Arc<Shared>) -> Option<WorkerRef> {
    for_config_on(shared, true)
}

/// The main thread's worker of a configuration that goes.
pub fn drop_main(shared: &Arc<Shared>) {
    WORKERS.with(|w| w.borrow_mut().remove(&shared.id));
}

fn for_config_on(shared: &Arc<Shared>, main: bool) -> Option<WorkerRef> {
    WORKERS.with(|w| {
        let mut all = w.borrow_mut();
        if let Some(found) = all.get(&shared.id) {
            if found.try_borrow().is_ok_and(|w| !w.poisoned) {
                return Some(found.clone());
            }
        }
        let env = |name: &str| std::env::var(name).ok();
        let cfg = match config::compile(&shared.json, &env) {
            Ok(cfg) => cfg,
            Err(e) => {
                log::error!("configuration rejected on a worker: {e}");
                return None;
            }
        };
        let root = next_root_id();
        let waker = if main { crate::link::Waker::Main(Arc::downgrade(shared)) } else { crate::link::Waker::Streams };
        let link = Arc::new(Link::new(waker));
        register_link(&link);
        shared.add_link(&link);
        let mut host = NativeHost::new(root, shared.clone(), link.clone());
        let mut lc = Lifecycle::new(root);
        lc.configure(now_us(), &mut host, cfg);
        link.due_ms.store(lc.next_deadline_ms().unwrap_or(0), Ordering::Release);
        let worker = Rc::new(RefCell::new(Worker { lc, host, poisoned: false }));
        // Workers of configurations Envoy no longer has (only this map holds them) go.
        all.retain(|_, w| w.try_borrow().is_ok_and(|w| Arc::strong_count(&w.host.shared) > 1));
        all.insert(shared.id, worker.clone());
        Some(worker)
    })
}

impl Worker {
    /// A hook of stream `ctx` starts: the stream is known to the host, and what is due for the
    /// root (callout answers, the tick) runs first.
    pub fn enter(&mut self, ctx: ContextId, stream: Stream, hook: Hook) {
        let gone = std::mem::take(&mut *self.host.gone.borrow_mut());
        for g in gone {
            self.gone(g);
        }
        self.host.streams.entry(ctx).or_insert_with(|| Slot::new(stream));
        self.host.hook = hook;
        let now = now_us();
        let due = self.host.link.due_ms.load(Ordering::Acquire);
        if (due != 0 && now / 1000 >= due) || self.host.link.has_answers() {
            self.root_work(now);
        }
        self.host.focus(ctx);
    }

    /// Callout answers that arrived, then the tick if due.
    pub fn root_work(&mut self, now: u64) {
        self.host.link.woken();
        // Each answer at the time it arrived: a worker with no waiting stream learns of it only
        // when next woken, and an answer that came in time is not given up for that.
        for (call, answer, arrived) in self.host.link.take_answers() {
            self.event(arrived.min(now), Event::Answer { call, answer });
        }
        if self.lc.next_deadline_ms().is_some_and(|d| now / 1000 >= d) {
            self.event(now, Event::Tick);
        }
        if let Hook::Stream { ctx, .. } | Hook::Scheduled(ctx) = self.host.hook {
            self.host.focus(ctx);
        }
    }

    /// One event, then the root callback it asked for, if any (at once: a native executor may
    /// make callouts from any hook).
    pub fn event(&mut self, now: u64, ev: Event) -> Action {
        self.refocus();
        let own = match ev {
            Event::Request(c) | Event::RequestTrailers(c) | Event::RequestBody { ctx: c, .. } => Some(c),
            _ => None,
        };
        let a = self.lc.handle(now, &mut self.host, ev);
        if let (Action::Pause, Some(c)) = (a, own) {
            // Stopped for this decision: a resume asked before it is stale; one asked from here
            // on (the root work below) is not.
            if let Some(slot) = self.host.streams.get_mut(&c) {
                slot.stopped();
            }
        }
        if std::mem::take(&mut self.host.woke) {
            self.lc.handle(now, &mut self.host, Event::Woken);
            // The root work left the root current: the hook's next event is its stream's again.
            self.refocus();
        }
        a
    }

    /// The stream whose hook runs is the current one (as a proxy-wasm stream callback's own
    /// context is).
    fn refocus(&mut self) {
        if let Hook::Stream { ctx, .. } | Hook::Scheduled(ctx) = self.host.hook {
            self.host.focus(ctx);
        }
    }

    /// The main thread's worker was woken: its root work, every worker's counters to Envoy, and
    /// its next tick.
    pub fn main_turn(&mut self) {
        self.host.hook = Hook::None;
        self.root_work(now_us());
        self.host.shared.flush_counts();
        self.host.link.due_ms.store(self.lc.next_deadline_ms().unwrap_or(0), Ordering::Release);
    }

    /// A hook of stream `ctx` ends: a stream it paused can be woken (its scheduler made), and
    /// the next tick is set.
    pub fn leave(&mut self, ctx: ContextId, paused: Option<bool>) {
        // Streams Envoy destroyed during this hook (a reply that ended one): forgotten now, before
        // anything could touch their dangling pointers.
        let gone = std::mem::take(&mut *self.host.gone.borrow_mut());
        for g in gone {
            self.gone(g);
        }
        if let (Some(p), Some(slot)) = (paused, self.host.streams.get_mut(&ctx)) {
            slot.paused = p;
            if p {
                let sched = match slot.scheduler {
                    Some(s) => Some(s),
                    None => {
                        let s = Sched(slot.stream.new_scheduler());
                        (!s.0.is_null()).then(|| {
                            slot.scheduler = Some(s);
                            s
                        })
                    }
                };
                if let Some(s) = sched {
                    self.host.link.add_waker(ctx, s);
                }
            }
        }
        self.host.hook = Hook::None;
        self.host.link.due_ms.store(self.lc.next_deadline_ms().unwrap_or(0), Ordering::Release);
    }

    /// Stream `ctx` is gone: the lifecycle forgets it, its scheduler is deleted.
    pub fn gone(&mut self, ctx: ContextId) {
        let hook = std::mem::replace(&mut self.host.hook, Hook::None);
        // Out of the host first: Envoy's stream is gone, nothing may touch it.
        self.host.link.remove_waker(ctx);
        let slot = self.host.streams.remove(&ctx);
        if let Some(stream) = slot.as_ref().map(|s| s.stream) {
            self.host.after.retain(|a| a.stream() != stream);
        }
        self.lc.handle(now_us(), &mut self.host, Event::StreamGone(ctx));
        if let Some(s) = slot.and_then(|s| s.scheduler) {
            Link::delete(s, &self.host.link);
        }
        self.host.hook = if matches!(hook, Hook::Stream { ctx: c, .. } | Hook::Scheduled(c) if c == ctx) { Hook::None } else { hook };
    }

    /// After a panic: refuse what this worker holds (each waiting stream is answered 503 from
    /// its own scheduler event), and take no more events.
    pub fn poison(&mut self) {
        self.poisoned = true;
        let (status, headers, body) = crate::refusal();
        for slot in self.host.streams.values_mut().filter(|s| s.paused) {
            if slot.scheduler.is_none() {
                let s = Sched(slot.stream.new_scheduler());
                slot.scheduler = (!s.0.is_null()).then_some(s);
            }
            if let Some(s) = slot.scheduler {
                slot.deferred.push(crate::host::Deferred::Reply { status, headers: headers.clone(), body: body.clone() });
                s.commit(crate::link::EFFECTS_EVENT);
            }
        }
    }
}
