//! `Host` in memory, for the lifecycle's unit tests: shared data with Envoy's compare-and-swap
//! rules, shared by several workers (`MemHost::worker`); streams with request and response
//! headers; a clock the test moves; and every effect recorded in order, to compare with what a
//! test expects. It is not a model of Envoy's timing: the integration suite runs the real one.

use crate::host::{CallId, ContextId, Headers, Host, HostError};

/// A header map a test builds and inspects (the host hands it over as `Headers`).
pub type Fields = Vec<(String, Vec<u8>)>;

fn map(fields: &Fields) -> Headers {
    Headers::of(fields.iter().map(|(k, v)| (k, v)))
}
use crate::record::{Family, Metric};
use crate::secrets::store::HttpCall;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// What the lifecycle asked of the host, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A callout: its id, cluster and `:path`, and the effective context it was sent from.
    Dispatch {
        call: CallId,
        cluster: String,
        path: String,
        from: ContextId,
    },
    WakeRoot,
    Resume(ContextId),
    /// A local reply: its status and the contract's error code (`error` in the body).
    Reply {
        ctx: ContextId,
        status: u32,
        code: String,
    },
    Reset(ContextId),
}

/// One stream as the host sees it.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub request: Fields,
    pub route: Vec<(String, String)>,
    pub response: Fields,
    pub trailers: Fields,
    /// The request body as the client sent it (a test sets it before the body event).
    pub body: Vec<u8>,
    /// The response body part of the next response body event (a test sets it before).
    pub response_body: Vec<u8>,
    /// The body of the local reply, if one was sent.
    pub reply_body: Option<String>,
    /// The local reply's headers.
    pub reply_headers: Vec<(String, String)>,
    pub filter_state: BTreeMap<&'static str, String>,
    /// The stream ended: its context is gone.
    pub gone: bool,
    /// The response was made by Envoy, not the upstream (a timeout, a reset).
    pub local_response: bool,
    /// The downstream client's address.
    pub client: String,
}

#[derive(Default)]
struct Shared {
    entries: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

/// One worker's host. Workers made with `worker` share shared data and the clock.
pub struct MemHost {
    shared: Rc<RefCell<Shared>>,
    clock: Rc<Cell<u64>>,
    next_call: Rc<Cell<CallId>>,
    pub root: ContextId,
    pub current: ContextId,
    pub streams: BTreeMap<ContextId, Stream>,
    pub effects: Vec<Effect>,
    /// Every callout sent, by id (with its header values, for tests that read the token).
    pub sent: BTreeMap<CallId, HttpCall>,
    pub metrics: HashMap<Metric, u64>,
    /// Labelled counters by stat name (`family;label=value...`).
    pub counts: HashMap<String, u64>,
    /// Labelled histograms' recorded values by stat name.
    pub observed: HashMap<String, Vec<u64>>,
    /// Make `dispatch` fail (Envoy refuses a callout to an unknown cluster, say).
    pub refuse_dispatch: bool,
    /// Make `wake_root` fail (no queue).
    pub refuse_wake: bool,
    /// Make `shared_set` fail (not a CAS mismatch).
    pub refuse_shared_writes: bool,
}

impl MemHost {
    pub fn new(root: ContextId) -> MemHost {
        MemHost {
            shared: Rc::default(),
            clock: Rc::new(Cell::new(1_000_000)),
            next_call: Rc::new(Cell::new(1)),
            root,
            current: root,
            streams: BTreeMap::new(),
            effects: Vec::new(),
            sent: BTreeMap::new(),
            metrics: HashMap::new(),
            counts: HashMap::new(),
            observed: HashMap::new(),
            refuse_dispatch: false,
            refuse_wake: false,
            refuse_shared_writes: false,
        }
    }

    /// Another worker (or another configuration's root) of the same VM: same shared data and
    /// clock, its own streams and effects.
    pub fn worker(&self, root: ContextId) -> MemHost {
        MemHost { shared: self.shared.clone(), clock: self.clock.clone(), next_call: self.next_call.clone(), ..MemHost::new(root) }
    }

    pub fn advance(&self, ms: u64) {
        self.clock.set(self.clock.get() + ms);
    }

    /// A new stream with these request headers, routed to `target`; it becomes current.
    pub fn open(&mut self, ctx: ContextId, target: &str, headers: &[(&str, &str)]) {
        let request = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        self.streams.insert(ctx, Stream { request, route: vec![("target".into(), target.into())], client: "127.0.0.1:50000".into(), ..Stream::default() });
        self.current = ctx;
    }

    /// A new stream on a route with this keyward metadata (`pairs`); it becomes current.
    pub fn open_route(&mut self, ctx: ContextId, route: &[(&str, &str)], headers: &[(&str, &str)]) {
        self.open(ctx, "", headers);
        if let Some(s) = self.streams.get_mut(&ctx) {
            s.route = route.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
    }

    /// The stream ended (the client left): its context is gone.
    pub fn close(&mut self, ctx: ContextId) {
        if let Some(s) = self.streams.get_mut(&ctx) {
            s.gone = true;
        }
    }

    /// Take the effects recorded so far.
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    pub fn dispatches(&self) -> Vec<(CallId, String)> {
        self.effects.iter().filter_map(|e| if let Effect::Dispatch { call, path, .. } = e { Some((*call, path.clone())) } else { None }).collect()
    }

    pub fn count(&self, m: Metric) -> u64 {
        self.metrics.get(&m).copied().unwrap_or(0)
    }

    /// The shared entry's bytes.
    pub fn shared_value(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.borrow().entries.get(key).map(|(v, _)| v.clone())
    }

    pub fn shared_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.shared.borrow().entries.keys().cloned().collect();
        k.sort();
        k
    }

    fn stream(&mut self) -> Result<&mut Stream, HostError> {
        let ctx = self.current;
        self.streams.get_mut(&ctx).filter(|s| !s.gone).ok_or(HostError::Failed)
    }
}

impl MemHost {
    /// The test clock, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.clock.get()
    }

    /// The test clock, in microseconds: the time a test gives each event.
    pub fn now_us(&self) -> u64 {
        self.clock.get() * 1000
    }
}

impl Host for MemHost {
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        let s = self.stream()?;
        Ok(s.body.iter().take(size).copied().collect())
    }

    fn set_request_body(&mut self, size: usize, body: &[u8]) -> Result<(), HostError> {
        let s = self.stream()?;
        let rest = s.body.split_off(size.min(s.body.len()));
        s.body = body.iter().copied().chain(rest).collect();
        Ok(())
    }

    fn clock_us(&self) -> u64 {
        self.clock.get() * 1000
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().entries.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        if self.refuse_shared_writes {
            return Err(HostError::Failed);
        }
        let mut sh = self.shared.borrow_mut();
        // Envoy: a CAS of 0 (none) always writes; a CAS for an entry that does not exist is accepted.
        if let (Some(want), Some((_, have))) = (cas, sh.entries.get(key)) {
            if want != *have {
                return Err(HostError::CasMismatch);
            }
        }
        sh.next_cas += 1;
        let next = sh.next_cas;
        sh.entries.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }

    fn dispatch(&mut self, call: &HttpCall) -> Result<CallId, HostError> {
        if self.refuse_dispatch {
            return Err(HostError::Failed);
        }
        let id = self.next_call.get();
        self.next_call.set(id + 1);
        let path = call.headers.iter().find(|(k, _)| k == ":path").and_then(|(_, v)| v.expose_str()).unwrap_or_default().to_string();
        self.effects.push(Effect::Dispatch { call: id, cluster: call.cluster.clone(), path, from: self.current });
        self.sent.insert(id, HttpCall { cluster: call.cluster.clone(), headers: call.headers.clone(), body: call.body.clone(), timeout_ms: call.timeout_ms });
        Ok(id)
    }

    fn wake_root(&mut self) -> bool {
        if self.refuse_wake {
            return false;
        }
        self.effects.push(Effect::WakeRoot);
        true
    }

    fn set_effective_context(&mut self, ctx: ContextId) -> Result<(), HostError> {
        if ctx != self.root && self.streams.get(&ctx).is_none_or(|s| s.gone) {
            return Err(HostError::Failed);
        }
        self.current = ctx;
        Ok(())
    }

    fn request_headers(&mut self) -> Result<Headers, HostError> {
        Ok(map(&self.stream()?.request))
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        let s = self.stream()?;
        s.request.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        s.request.push((name.to_string(), value.to_vec()));
        Ok(())
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        self.stream()?.request.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        Ok(())
    }

    fn response_headers(&mut self) -> Result<Headers, HostError> {
        Ok(map(&self.stream()?.response))
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        let s = self.stream()?;
        Ok(s.response_body.iter().take(size).copied().collect())
    }

    fn response_from_upstream(&mut self) -> bool {
        self.stream().is_ok_and(|s| !s.local_response)
    }

    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError> {
        self.stream()?.response.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        Ok(())
    }

    fn response_trailers(&mut self) -> Result<Headers, HostError> {
        Ok(map(&self.stream()?.trailers))
    }

    fn remove_response_trailer(&mut self, name: &str) -> Result<(), HostError> {
        self.stream()?.trailers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        Ok(())
    }

    fn downstream_address(&mut self) -> Option<String> {
        self.stream().ok().map(|s| s.client.clone())
    }

    fn route_metadata(&mut self) -> Option<Vec<(String, String)>> {
        self.stream().ok().map(|s| s.route.clone())
    }

    fn set_filter_state(&mut self, key: &'static str, value: &str) {
        if let Ok(s) = self.stream() {
            s.filter_state.insert(key, value.to_string());
        }
    }

    fn reply(&mut self, status: u32, headers: &[(&str, String)], body: &str) -> Result<(), HostError> {
        let s = self.stream()?;
        s.reply_body = Some(body.to_string());
        s.reply_headers = headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let code = crate::wire::json::parse(body.as_bytes()).ok().and_then(|v| v.get("error").and_then(|e| e.as_str().map(str::to_string))).unwrap_or_default();
        self.effects.push(Effect::Reply { ctx: self.current, status, code });
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.stream()?;
        self.effects.push(Effect::Resume(self.current));
        Ok(())
    }

    fn reset(&mut self) {
        self.effects.push(Effect::Reset(self.current));
    }

    fn metric(&mut self, m: Metric) {
        *self.metrics.entry(m).or_default() += 1;
    }

    fn count(&mut self, family: Family, values: &[&str], n: u64) {
        let mut name = String::new();
        family.write_stat_name(values, &mut name);
        *self.counts.entry(name).or_default() += n;
    }

    fn observe(&mut self, family: Family, values: &[&str], value: u64) {
        let mut name = String::new();
        family.write_stat_name(values, &mut name);
        self.observed.entry(name).or_default().push(value);
    }
}
