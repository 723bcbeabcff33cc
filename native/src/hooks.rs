//! The stream hooks: each becomes a lifecycle event on the stream's worker, its status is the
//! lifecycle's action, and what re-enters Envoy runs once the worker is let go.

use crate::abi;
use crate::host::{self, now_us, Hook};
use crate::stream::Stream;
use crate::worker::{self, WorkerRef};
use crate::{link, refuse, Shared};
use keyward_core::host::{Action, ContextId};
use keyward_core::lifecycle::Event;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

/// One stream: its id, and its configuration's worker on this thread.
pub(crate) struct Filter {
    ctx: ContextId,
    worker: Option<WorkerRef>,
    /// The worker's list of streams destroyed while it was busy.
    gone: Option<Rc<RefCell<Vec<ContextId>>>>,
}

/// # Safety
/// A pointer `on_http_filter_config_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(cfg: *const c_void, _envoy: abi::FilterEnvoy) -> *const c_void {
    let shared = &*(cfg as *const Arc<Shared>);
    let worker = catch_unwind(AssertUnwindSafe(|| worker::for_config(shared))).ok().flatten();
    let gone = worker.as_ref().and_then(|w| w.try_borrow().ok().map(|w| w.host.gone.clone()));
    Box::into_raw(Box::new(Filter { ctx: worker::next_id(), worker, gone })) as *const c_void
}

/// Run `work` on the stream's worker inside `hook`. `None`: no worker, a busy or poisoned one, or a
/// panic (the worker is then poisoned).
unsafe fn on_stream<T>(
    envoy: abi::FilterEnvoy,
    fm: *const c_void,
    request_body: bool,
    work: impl FnOnce(&mut worker::Worker, ContextId, Stream) -> (T, Option<bool>),
) -> Option<T> {
    // Copied out first: a reply sent from this hook may end the stream, and Envoy then destroys
    // this filter (its box) before the hook returns.
    let (ctx, w) = {
        let f = &*(fm as *const Filter);
        (f.ctx, f.worker.clone()?)
    };
    let w = &w;
    let s = Stream(envoy);
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let mut w = w.try_borrow_mut().ok()?;
        if w.poisoned {
            return None;
        }
        w.enter(ctx, s, Hook::Stream { ctx, request_body });
        let (out, paused) = work(&mut w, ctx, s);
        w.leave(ctx, paused);
        Some((out, std::mem::take(&mut w.host.after)))
    }));
    match ran {
        Ok(Some((out, after))) => {
            run_after(after);
            Some(out)
        }
        Ok(None) => None,
        Err(_) => {
            log::error!("keyward panicked in a stream hook; the request is refused and the worker replaced");
            if let Ok(mut w) = w.try_borrow_mut() {
                w.poison();
            }
            None
        }
    }
}

/// What was decided to re-enter Envoy, once per stream (continuing or resetting a stream may end
/// it: nothing else is done to it after).
fn run_after(after: Vec<host::After>) {
    let mut done: Vec<Stream> = Vec::with_capacity(after.len());
    for a in after {
        if !done.contains(&a.stream()) {
            done.push(a.stream());
            a.run();
        }
    }
}

fn paused(a: Action) -> bool {
    a == Action::Pause
}

/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: abi::FilterEnvoy,
    fm: *const c_void,
    end_of_stream: bool,
) -> abi::HeadersStatus {
    let a = on_stream(envoy, fm, false, |w, ctx, _s| {
        #[cfg(feature = "panic-test")]
        #[allow(clippy::panic)]
        if _s.headers(abi::REQUEST_HEADER).is_some_and(|h| h.get("x-keyward-test-panic").is_some()) {
            panic!("x-keyward-test-panic");
        }
        let now = now_us();
        let mut a = w.event(now, Event::Request(ctx));
        // A request without a body: whatever waits for the body's end learns now.
        if end_of_stream && w.event(now, Event::RequestBody { ctx, size: 0, end: true }) == Action::Pause {
            a = Action::Pause;
        }
        (a, Some(paused(a)))
    });
    match a {
        Some(Action::Continue) => abi::HEADERS_CONTINUE,
        // Its body and trailers still come to this filter (and are held here): a stream paused
        // for its secret is continued once, past this filter, never replayed into it.
        Some(Action::Pause) => abi::HEADERS_STOP_ITERATION,
        None => {
            refuse(Stream(envoy));
            abi::HEADERS_STOP_ITERATION
        }
    }
}

/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(envoy: abi::FilterEnvoy, fm: *const c_void, end_of_stream: bool) -> abi::BodyStatus {
    let a = on_stream(envoy, fm, true, |w, ctx, s| {
        let mut size = s.body_size(abi::BUFFERED_REQUEST_BODY);
        if !s.received_is_buffered() {
            size += s.body_size(abi::RECEIVED_REQUEST_BODY);
        }
        let a = w.event(now_us(), Event::RequestBody { ctx, size, end: end_of_stream });
        (a, Some(paused(a)))
    });
    match a {
        Some(Action::Continue) => abi::BODY_CONTINUE,
        Some(Action::Pause) => abi::BODY_STOP_AND_BUFFER,
        None => {
            refuse(Stream(envoy));
            abi::BODY_STOP_AND_BUFFER
        }
    }
}

/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(envoy: abi::FilterEnvoy, fm: *const c_void) -> abi::TrailersStatus {
    let a = on_stream(envoy, fm, false, |w, ctx, _| {
        let a = w.event(now_us(), Event::RequestTrailers(ctx));
        (a, Some(paused(a)))
    });
    match a {
        Some(Action::Continue) => abi::TRAILERS_CONTINUE,
        Some(Action::Pause) => abi::TRAILERS_STOP_ITERATION,
        None => {
            refuse(Stream(envoy));
            abi::TRAILERS_STOP_ITERATION
        }
    }
}

/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: abi::FilterEnvoy,
    fm: *const c_void,
    end_of_stream: bool,
) -> abi::HeadersStatus {
    let ran = on_stream(envoy, fm, false, |w, ctx, _| {
        let now = now_us();
        w.event(now, Event::Response(ctx));
        if end_of_stream {
            // An answer without a body: a model call's usage is not in it.
            w.event(now, Event::ResponseBody { ctx, size: 0, end: true });
        }
        ((), None)
    });
    match ran {
        Some(()) => abi::HEADERS_CONTINUE,
        None => fail_response(envoy),
    }
}

/// An answer the module could not look at (a panic, a worker that could not run) is never passed
/// on unscrubbed: the stream is reset.
fn fail_response(envoy: abi::FilterEnvoy) -> u32 {
    log::error!("keyward could not check an answer; the stream is reset");
    Stream(envoy).reset();
    abi::HEADERS_STOP_ITERATION
}

/// Each part of the answer goes on as it comes; a model call's usage is read as it passes.
///
/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(envoy: abi::FilterEnvoy, fm: *const c_void, end_of_stream: bool) -> abi::BodyStatus {
    let ran = on_stream(envoy, fm, false, |w, ctx, s| {
        let size = s.body_size(abi::RECEIVED_RESPONSE_BODY);
        w.event(now_us(), Event::ResponseBody { ctx, size, end: end_of_stream });
        ((), None)
    });
    match ran {
        Some(()) => abi::BODY_CONTINUE,
        None => {
            fail_response(envoy);
            abi::BODY_STOP_AND_BUFFER
        }
    }
}

/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(envoy: abi::FilterEnvoy, fm: *const c_void) -> abi::TrailersStatus {
    let ran = on_stream(envoy, fm, false, |w, ctx, _| {
        w.event(now_us(), Event::ResponseTrailers(ctx));
        ((), None)
    });
    match ran {
        Some(()) => abi::TRAILERS_CONTINUE,
        None => {
            fail_response(envoy);
            abi::TRAILERS_STOP_ITERATION
        }
    }
}

/// A stream's scheduler event: the root work (`ROOT_EVENT`) and what was decided for the stream
/// itself (a reply, a resume, a reset), from its own callback.
///
/// # Safety
/// Pointers Envoy handed over for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(envoy: abi::FilterEnvoy, fm: *const c_void, event: u64) {
    // Copied out first: a reply sent from here may end the stream (its box is then freed).
    let (ctx, w) = {
        let f = &*(fm as *const Filter);
        let Some(w) = f.worker.clone() else { return };
        (f.ctx, w)
    };
    let w = &w;
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let Ok(mut w) = w.try_borrow_mut() else { return Vec::new() };
        w.host.hook = Hook::Scheduled(ctx);
        w.host.focus(ctx);
        if event == link::ROOT_EVENT && !w.poisoned {
            w.root_work(now_us());
        }
        w.host.run_deferred(ctx);
        w.leave(ctx, None);
        std::mem::take(&mut w.host.after)
    }));
    if let Ok(after) = &ran {
        run_after(after.clone());
    }
    if ran.is_err() {
        log::error!("keyward panicked in a scheduled event; the request is refused and the worker replaced");
        refuse(Stream(envoy));
        if let Ok(mut w) = w.try_borrow_mut() {
            w.poison();
        }
    }
}

/// # Safety
/// A pointer `on_http_filter_new` returned, once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(fm: *const c_void) {
    let f = Box::from_raw(fm as *mut Filter);
    if let Some(w) = f.worker.as_ref() {
        let _ = catch_unwind(AssertUnwindSafe(|| match w.try_borrow_mut() {
            Ok(mut w) => w.gone(f.ctx),
            // Destroyed while its worker runs (Envoy ended it from within a call the worker
            // made): forgotten when the worker is next entered.
            Err(_) => {
                if let Some(g) = &f.gone {
                    g.borrow_mut().push(f.ctx);
                }
            }
        }));
    }
}
