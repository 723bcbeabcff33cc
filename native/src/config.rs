//! One keyward configuration in Envoy (one `DynamicModuleFilter` config): its JSON, its metrics,
//! and the main-thread side of its callouts. A worker's lifecycle asks for a callout on its own
//! thread; the callout is made here, on the main thread (Envoy's configuration callouts belong
//! to it, and no client that leaves can cancel them), and its answer goes back to the worker.

use crate::abi::{self, ModuleBuffer, ModuleHeader};
use crate::link::Link;
use crate::metrics::Metrics;
use keyward_core::host::CallId;
use keyward_core::lifecycle::Answer;
use keyward_core::secrets::store::{self, HttpCall};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Envoy's configuration object, usable from any thread for what Envoy allows there (stats, the
/// scheduler's commit).
#[derive(Clone, Copy)]
pub struct ConfigPtr(pub abi::ConfigEnvoy);
// SAFETY: used off the main thread only for stats (thread-safe in Envoy) and, through the
// scheduler, for posting to the main thread; callouts are made on the main thread only.
unsafe impl Send for ConfigPtr {}
unsafe impl Sync for ConfigPtr {}

#[derive(Clone, Copy)]
struct ConfigSched(abi::ConfigScheduler);
// SAFETY: Envoy's scheduler commit is thread-safe; deleted once, when the configuration goes.
unsafe impl Send for ConfigSched {}
unsafe impl Sync for ConfigSched {}

/// Callouts asked for and not yet made (`queue`), and those in flight by Envoy's id.
#[derive(Default)]
struct Relay {
    queue: Vec<(CallId, HttpCall, Weak<Link>)>,
    flight: HashMap<u64, (CallId, Weak<Link>)>,
}

pub struct Shared {
    /// Tells configurations apart in a worker's registry.
    pub id: u64,
    pub envoy: ConfigPtr,
    pub json: Vec<u8>,
    pub metrics: Metrics,
    /// Posts to the main thread; `None` once the configuration went.
    scheduler: Mutex<Option<ConfigSched>>,
    relay: Mutex<Relay>,
    /// Every worker of this configuration, whose counters the main thread hands to Envoy.
    links: Mutex<Vec<Weak<Link>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every worker link of the process, for the ticker.
fn links() -> &'static Mutex<Vec<Weak<Link>>> {
    static LINKS: OnceLock<Mutex<Vec<Weak<Link>>>> = OnceLock::new();
    LINKS.get_or_init(Mutex::default)
}

/// The main thread's events: make the queued callouts; the main thread's worker's root work.
pub const CALLOUTS_EVENT: u64 = 0;

/// The ticker: a thread that wakes each worker whose tick is due (a worker's lifecycle states
/// when: `Lifecycle::next_deadline_ms`). It runs for the life of the process (the module is
/// loaded with `do_not_close`).
const TICKER_MS: u64 = 10;

pub fn register_link(link: &Arc<Link>) {
    static TICKER: OnceLock<()> = OnceLock::new();
    {
        let mut all = lock(links());
        all.retain(|l| l.strong_count() > 0);
        all.push(Arc::downgrade(link));
    }
    TICKER.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("keyward-ticker".into()).spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(TICKER_MS));
            let now_ms = crate::host::now_us() / 1000;
            let live: Vec<Arc<Link>> = lock(links()).iter().filter_map(Weak::upgrade).collect();
            for l in live {
                let due = l.due_ms.load(Ordering::Acquire);
                if due != 0 && now_ms >= due {
                    l.wake(now_ms);
                }
            }
        });
        if spawned.is_err() {
            log::error!("could not start the tick thread: waiting requests are served at the next request");
        }
    });
}

impl Shared {
    pub fn new(envoy: abi::ConfigEnvoy, json: Vec<u8>) -> Option<Shared> {
        static IDS: AtomicU64 = AtomicU64::new(1);
        // SAFETY: on the main thread, during `on_http_filter_config_new`.
        let scheduler = unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy) };
        if scheduler.is_null() {
            return None;
        }
        Some(Shared {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            envoy: ConfigPtr(envoy),
            json,
            metrics: Metrics::define(envoy),
            scheduler: Mutex::new(Some(ConfigSched(scheduler))),
            relay: Mutex::default(),
            links: Mutex::default(),
        })
    }

    /// A worker asks for a callout: queued, and the main thread told. The id is the module's own
    /// (unique in the process); a callout that cannot be made is answered as failed.
    pub fn send(&self, call: HttpCall, link: Weak<Link>) -> CallId {
        static CALLS: AtomicU32 = AtomicU32::new(1);
        let id = CALLS.fetch_add(1, Ordering::Relaxed);
        lock(&self.relay).queue.push((id, call, link.clone()));
        if !self.commit(CALLOUTS_EVENT) {
            if let Some(l) = link.upgrade() {
                l.deliver(id, Answer::failed(), crate::host::now_us() / 1000);
            }
        }
        id
    }

    pub fn add_link(&self, link: &Arc<Link>) {
        let mut all = lock(&self.links);
        all.retain(|l| l.strong_count() > 0);
        all.push(Arc::downgrade(link));
    }

    /// On the main thread: every worker's counters since the last flush, to Envoy.
    pub fn flush_counts(&self) {
        let links: Vec<Arc<Link>> = lock(&self.links).iter().filter_map(Weak::upgrade).collect();
        for l in links {
            let mut counts = lock(&l.counts);
            counts.drain(|m, n| self.metrics.add(self.envoy.0, m, n), |f, v, n| self.metrics.family(self.envoy.0, f, v, n));
        }
    }

    /// Post `event` to the main thread (`false`: the configuration went).
    pub fn commit(&self, event: u64) -> bool {
        match *lock(&self.scheduler) {
            // SAFETY: not deleted (under the lock).
            Some(s) => {
                unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(s.0, event) };
                true
            }
            None => false,
        }
    }

    /// On the main thread: make the queued callouts.
    pub fn make_callouts(&self) {
        let queued = std::mem::take(&mut lock(&self.relay).queue);
        for (id, call, link) in queued {
            let mut hs: Vec<ModuleHeader> = Vec::with_capacity(call.headers.len());
            for (k, v) in &call.headers {
                hs.push(ModuleHeader::of(k.as_bytes(), v.expose()));
            }
            let body = call.body.as_deref().map_or(ModuleBuffer::NONE, ModuleBuffer::of);
            let mut envoy_id = 0u64;
            // SAFETY: on the main thread; every buffer outlives the call (Envoy copies them).
            let r = unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                    self.envoy.0,
                    &mut envoy_id,
                    ModuleBuffer::of(call.cluster.as_bytes()),
                    hs.as_mut_ptr(),
                    hs.len(),
                    body,
                    u64::from(call.timeout_ms),
                )
            };
            if r == abi::CALLOUT_INIT_SUCCESS {
                lock(&self.relay).flight.insert(envoy_id, (id, link));
            } else {
                log::warn!("could not make a callout to cluster {} (Envoy's result {r})", call.cluster);
                if let Some(l) = link.upgrade() {
                    l.deliver(id, Answer::failed(), crate::host::now_us() / 1000);
                }
            }
        }
    }

    /// On the main thread: a callout's answer, to its worker. `status` is `None` when nothing
    /// arrived; the body is `None` when larger than any callout may answer.
    pub fn answered(&self, envoy_id: u64, ok: bool, headers: &[abi::EnvoyHeader], chunks: &[abi::EnvoyBuffer]) {
        let Some((id, link)) = lock(&self.relay).flight.remove(&envoy_id) else { return };
        let Some(link) = link.upgrade() else { return };
        let answer = if !ok || headers.is_empty() {
            Answer::failed()
        } else {
            // SAFETY: Envoy's buffers, valid during this hook; copied.
            let status = headers.iter().find_map(|h| unsafe {
                let k = abi::EnvoyBuffer { ptr: h.key_ptr, length: h.key_length }.bytes();
                (k == b":status").then(|| abi::EnvoyBuffer { ptr: h.value_ptr, length: h.value_length }.bytes())
            });
            let status = status.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse::<u32>().ok());
            let size: usize = chunks.iter().map(|c| c.length).sum();
            if size > store::MAX_LIST_BODY {
                Answer { status, body: None }
            } else {
                let mut body = Vec::with_capacity(size);
                for c in chunks {
                    // SAFETY: as above.
                    body.extend_from_slice(unsafe { c.bytes() });
                }
                Answer { status, body: Some(body) }
            }
        };
        link.deliver(id, answer, crate::host::now_us() / 1000);
    }
}

impl Shared {
    /// The configuration goes (main thread, `on_http_filter_config_destroy`): its scheduler is
    /// deleted while Envoy's configuration still exists.
    pub fn close(&self) {
        if let Some(s) = lock(&self.scheduler).take() {
            // SAFETY: taken out under the lock; deleted once.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(s.0) };
        }
    }
}
