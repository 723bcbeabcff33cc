//! Routes answered by the filter itself rather than forwarded: a route whose keyward metadata is
//! `{"endpoint": "<name>"}`: `health`, for load-balancer and Kubernetes probes; `issue` (see
//! `issue`); and `drain`, which the image's entrypoint calls on SIGTERM so that this gateway gives
//! back to the fleet ledger what its slices did not use (answered only to a loopback client).
//!
//! `health` answers 200 only when this worker's VM runs, is configured, and (with a revocation
//! list) holds a list it trusts: what a request needs to be served. A dead VM cannot answer at
//! all: with `FAIL_CLOSED` Envoy answers 503 for it, and the shipped health routes carry a
//! `direct_response` of 503 for the case where the filter is skipped (`FAIL_OPEN`, or a filter
//! chain without Keyward). The probe never reaches a store and is not counted or logged as a
//! request.

use super::Lifecycle;
use crate::engine::Lookup;
use crate::host::{Action, Host};
use crate::response::{Code, Denial};

fn host_ctx(lc: &Lifecycle) -> crate::host::ContextId {
    lc.current
}

impl Lifecycle {
    pub(super) fn answer_endpoint(&mut self, host: &mut impl Host, name: &str, now_ms: u64, resumed: bool) -> Action {
        if name == "issue" {
            return self.issue_start(host, host_ctx(self), now_ms);
        }
        if name == "drain" {
            return self.answer_drain(host, now_ms, resumed);
        }
        let (status, body) = match name {
            "health" => match self.revocation_lookup(host, "", "", now_ms) {
                Lookup::Ready(_) | Lookup::Stale(_) => (200, r#"{"status":"ok"}"#),
                Lookup::Pending => (503, r#"{"status":"starting","message":"no revocation list loaded yet"}"#),
                Lookup::Failed => (503, r#"{"status":"unavailable","message":"the revocation list is older than max_stale_s"}"#),
            },
            _ => {
                let d = Denial::new(Code::UnknownTarget, "this route names an unknown keyward endpoint");
                return self.reply(host, d.status(), &d.headers(), &d.body());
            }
        };
        let headers = [("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())];
        self.reply(host, status, &headers, body)
    }

    /// `POST /keyward/drain` from the gateway itself: give back every lease (the calls go out from
    /// the root at once). The request waits for a return under way to be answered (or given up
    /// at its deadline): an executor whose idle worker learns of an answer only when woken (the
    /// native module) would otherwise hold it until the next request. The answer says how many
    /// returns this call asked for and how many leases are still held, so the entrypoint asks
    /// again until none is.
    fn answer_drain(&mut self, host: &mut impl Host, now_ms: u64, resumed: bool) -> Action {
        // Envoy's RBAC on the shipped drain routes admits loopback peers only (by the peer's own
        // address); this check is the second line, on the address Envoy reports.
        let local = host.downstream_address().is_some_and(|a| a.starts_with("127.") || a.starts_with("[::1]"));
        if !local {
            let d = Denial::new(Code::Forbidden, "the drain endpoint answers the gateway itself only");
            return self.reply(host, d.status(), &d.headers(), &d.body());
        }
        let post = host.request_headers().is_ok_and(|h| h.values(":method").any(|v| v == b"POST"));
        if !post {
            let d = Denial::new(Code::Forbidden, "the drain endpoint takes POST only");
            return self.reply(host, d.status(), &d.headers(), &d.body());
        }
        // Resumed: the returns asked for are answered (or given up); what is under way is
        // counted as returning.
        let asked = if resumed { self.ledger_returns().count() } else { self.drain_ledger(host, now_ms) };
        let held = self.ledger_leases_held(host);
        let waits_on = if resumed || held == 0 { None } else { self.ledger_returns().next().map(|j| j.account) };
        if let Some(id) = waits_on {
            let timeout = self.cfg.as_ref().and_then(|c| c.ledger.as_ref()).map_or(1000, |l| u64::from(l.timeout_ms));
            let parked = super::state::Parked {
                wait: super::Wait::Drain(id),
                deadline_ms: now_ms + timeout + super::PARK_GRACE_MS,
                audit: crate::record::Audit::default(),
                admitted: Vec::new(),
                started_us: self.now_us,
                body_end: None,
            };
            self.streams.insert(self.current, super::Stream::Parked(Box::new(parked)));
            return Action::Pause;
        }
        let body = format!(r#"{{"returning":{asked},"held":{held}}}"#);
        let headers = [("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())];
        self.reply(host, 200, &headers, &body)
    }

    fn reply(&mut self, host: &mut impl Host, status: u32, headers: &[(&str, String)], body: &str) -> Action {
        self.streams.insert(self.current, super::Stream::Answered);
        if host.reply(status, headers, body).is_err() {
            host.reset();
        }
        Action::Pause
    }
}
