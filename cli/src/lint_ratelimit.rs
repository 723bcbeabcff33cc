//! `check-envoy`'s checks of Keyward's decision headers (`decision_headers`) and of Envoy's
//! global rate limit reading them: a vendor must never receive them, and a rate limit must never
//! trust a copy the client wrote.

use crate::lint_report::{arr, s, Report};
use keyward_core::config::Config;
use keyward_core::inject::DECISION_HEADERS;
use serde_json::Value;

const RATELIMIT: &str = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit";

fn removed(v: &Value) -> Vec<String> {
    arr(v, "request_headers_to_remove").iter().filter_map(Value::as_str).map(str::to_ascii_lowercase).collect()
}

/// Every `x-keyward-*` header a `rate_limits` list's actions read.
fn read_by(limits: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for l in limits {
        for a in arr(l, "actions") {
            if let Some(h) = s(&a, &["request_headers", "header_name"]) {
                let h = h.to_ascii_lowercase();
                if h.starts_with("x-keyward-") {
                    out.push(h);
                }
            }
        }
    }
    out
}

pub fn check(r: &mut Report, at: &str, hcm: &Value, cfg: Option<&Config>, keyward_pos: Option<usize>) {
    let filters = arr(hcm, "http_filters");
    let rl_pos = filters.iter().position(|f| s(f, &["typed_config", "@type"]) == Some(RATELIMIT));
    let on = cfg.is_some_and(|c| c.decision_headers);
    let Some(rc) = hcm.get("route_config") else { return };
    let top = removed(rc);
    for vh in arr(rc, "virtual_hosts") {
        let vh_removed = removed(&vh);
        let mut reads = read_by(&arr(&vh, "rate_limits"));
        for route in arr(&vh, "routes") {
            let rname = s(&route, &["name"]).unwrap_or("(unnamed)");
            reads.extend(read_by(&route.get("route").map(|a| arr(a, "rate_limits")).unwrap_or_default()));
            let keyward_route =
                route.get("metadata").and_then(|m| m.get("filter_metadata")).and_then(|m| m.get("keyward")).and_then(|k| k.get("target")).is_some();
            if on && keyward_route {
                let here = removed(&route);
                let missing: Vec<&str> =
                    DECISION_HEADERS.iter().copied().filter(|h| ![&top, &vh_removed, &here].iter().any(|l| l.iter().any(|x| x == h))).collect();
                if !missing.is_empty() {
                    r.problems.push(format!(
                        "{at}: route {rname}: decision_headers is on but {} would reach the vendor: add them to request_headers_to_remove",
                        missing.join(", ")
                    ));
                }
            }
        }
        if !reads.is_empty() {
            if !on {
                r.problems.push(format!(
                    "{at}: rate limits read {} but the keyward configuration does not set decision_headers: those are whatever the client sent",
                    reads.join(", ")
                ));
            }
            match (rl_pos, keyward_pos) {
                (Some(rl), Some(kw)) if rl < kw => {
                    r.problems.push(format!("{at}: the rate limit filter runs before keyward: it would read the client's x-keyward-* headers"))
                }
                (None, _) => r.notes.push(format!("{at}: rate_limits read x-keyward-* headers but there is no envoy.filters.http.ratelimit filter")),
                _ => {}
            }
        }
    }
}
