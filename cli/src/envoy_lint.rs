//! `keyward check-envoy`: lint an Envoy bootstrap that runs Keyward.

use crate::{compile_for_check, Args};
use keyward_core::config::{Config, Inject};
use keyward_core::rules::strip_prefix;
use serde_json::Value;

const WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

pub fn run(args: &[String]) -> Result<(), String> {
    let a = Args::parse(args, &["no-env"])?;
    let path = a.positional.first().ok_or("usage: keyward check-envoy FILE.yaml [--no-env]")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let doc: Value = serde_norway::from_str(&text).map_err(|e| format!("{path}: not YAML: {e}"))?;
    let report = lint(&doc, a.flag("no-env"));
    for w in &report.notes {
        println!("note: {w}");
    }
    if report.problems.is_empty() {
        println!("ok: {path}: {} keyward listener(s), {} keyward route(s)", report.listeners, report.routes);
        Ok(())
    } else {
        for p in &report.problems {
            println!("problem: {p}");
        }
        Err(format!("{path}: {} problem(s)", report.problems.len()))
    }
}

#[derive(Default, Debug)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    pub listeners: usize,
    pub routes: usize,
}

fn arr(v: &Value, k: &str) -> Vec<Value> {
    v.get(k).and_then(Value::as_array).cloned().unwrap_or_default()
}
fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}
fn b(v: &Value, path: &[&str]) -> Option<bool> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_bool()
}

pub fn lint(doc: &Value, no_env: bool) -> Report {
    let mut r = Report::default();
    let listeners = doc.get("static_resources").map(|s| arr(s, "listeners")).unwrap_or_default();
    for l in &listeners {
        let lname = s(l, &["name"]).unwrap_or("?").to_string();
        for chain in arr(l, "filter_chains") {
            for f in arr(&chain, "filters") {
                let Some(tc) = f.get("typed_config") else { continue };
                if s(tc, &["@type"]) != Some(HCM) {
                    continue;
                }
                lint_hcm(&mut r, &format!("listener {lname}"), tc, no_env);
            }
        }
    }
    if r.listeners == 0 {
        r.problems.push("no HTTP connection manager runs the keyward wasm filter".into());
    }
    r
}

fn lint_hcm(r: &mut Report, at: &str, hcm: &Value, no_env: bool) {
    let filters = arr(hcm, "http_filters");
    let Some(kw) = filters.iter().find(|f| {
        f.get("typed_config").is_some_and(|tc| {
            s(tc, &["@type"]) == Some(WASM)
                && (s(tc, &["config", "root_id"]) == Some("keyward")
                    || s(tc, &["config", "name"]) == Some("keyward")
                    || s(tc, &["config", "vm_config", "code", "local", "filename"]).is_some_and(|p| p.ends_with("keyward.wasm")))
        })
    }) else {
        return;
    };
    r.listeners += 1;
    let tc = kw.get("typed_config").cloned().unwrap_or_default();
    let cfgv = tc.get("config").cloned().unwrap_or_default();

    if b(&cfgv, &["fail_open"]) == Some(true) {
        r.problems.push(format!("{at}: the keyward filter has fail_open: true (a broken filter would forward requests)"));
    }
    if s(&cfgv, &["vm_config", "runtime"]) != Some("envoy.wasm.runtime.v8") {
        r.notes.push(format!("{at}: vm_config.runtime is not envoy.wasm.runtime.v8 (the tested runtime)"));
    }
    if b(hcm, &["normalize_path"]) != Some(true) {
        r.problems.push(format!("{at}: normalize_path must be true"));
    }
    if b(hcm, &["merge_slashes"]) != Some(true) {
        r.problems.push(format!("{at}: merge_slashes must be true"));
    }
    if s(hcm, &["path_with_escaped_slashes_action"]) != Some("REJECT_REQUEST") {
        r.problems.push(format!("{at}: path_with_escaped_slashes_action must be REJECT_REQUEST"));
    }
    let router = filters.iter().find(|f| s(f, &["typed_config", "@type"]) == Some(ROUTER));
    let kw_pos = filters.iter().position(|f| std::ptr::eq(f, kw));
    let router_pos = router.and_then(|rt| filters.iter().position(|f| std::ptr::eq(f, rt)));
    if let (Some(k), Some(rp)) = (kw_pos, router_pos) {
        if k > rp {
            r.problems.push(format!("{at}: the keyward filter must come before the router"));
        }
    }

    let cfg: Option<Config> = match s(&cfgv, &["configuration", "value"]) {
        None => {
            r.problems.push(format!("{at}: the keyward filter has no configuration (google.protobuf.StringValue)"));
            None
        }
        Some(text) => match compile_for_check(text.as_bytes(), no_env) {
            Ok(c) => Some(c),
            Err(e) => {
                r.problems.push(format!("{at}: filter configuration: {e}"));
                None
            }
        },
    };
    if let Some(c) = &cfg {
        let uses_query = c.targets.iter().any(|t| matches!(t.inject, Inject::Query { .. }));
        let suppress = router.and_then(|rt| b(rt, &["typed_config", "suppress_envoy_headers"])) == Some(true);
        if uses_query && !suppress {
            r.problems.push(format!(
                "{at}: a target injects a query credential: set the router's suppress_envoy_headers: true so x-envoy-original-path does not repeat it"
            ));
        }
    }
    let store_clusters: Vec<String> = cfg.as_ref().map(|c| c.stores.iter().map(|st| st.cluster.clone()).collect()).unwrap_or_default();

    let vhosts = hcm.get("route_config").map(|rc| arr(rc, "virtual_hosts")).unwrap_or_default();
    if hcm.get("route_config").is_none() {
        r.notes.push(format!("{at}: routes are not inline (RDS?); route metadata was not checked"));
    }
    for vh in vhosts {
        for route in arr(&vh, "routes") {
            let rname = s(&route, &["name"]).unwrap_or("(unnamed)").to_string();
            let rat = format!("{at}: route {rname}");
            if let Some(cl) = s(&route, &["route", "cluster"]) {
                if store_clusters.iter().any(|c| c == cl) {
                    r.problems.push(format!("{rat}: routes to the store cluster {cl:?}; workloads must never reach the vault"));
                }
            }
            let Some(meta) = route.get("metadata").and_then(|m| m.get("filter_metadata")).and_then(|m| m.get("keyward")) else {
                if route.get("route").is_some() {
                    r.notes.push(format!("{rat}: no keyward metadata; the filter denies it (unknown_target)"));
                }
                continue;
            };
            r.routes += 1;
            let Some(target) = s(meta, &["target"]) else {
                r.problems.push(format!("{rat}: keyward metadata has no target"));
                continue;
            };
            if let Some(c) = &cfg {
                if c.target(target).is_none() {
                    r.problems.push(format!("{rat}: target {target:?} is not in the filter configuration"));
                }
            }
            let prefix = s(meta, &["prefix"]).unwrap_or("");
            let Some(m) = s(&route, &["match", "prefix"]) else {
                r.problems.push(format!("{rat}: a keyward route must use a prefix match so its metadata prefix can be checked"));
                continue;
            };
            let rewrite = s(&route, &["route", "prefix_rewrite"]);
            if route.get("route").and_then(|x| x.get("regex_rewrite")).is_some() {
                r.problems.push(format!("{rat}: regex_rewrite is not supported on keyward routes; use prefix_rewrite"));
                continue;
            }
            for sample in ["v1/items", "a/b/c/", "x"] {
                let request = format!("{m}{sample}");
                let vendor = match rewrite {
                    Some(rw) => format!("{rw}{sample}"),
                    None => request.clone(),
                };
                let filter_view = strip_prefix(&request, prefix);
                if filter_view != Some(vendor.as_str()) {
                    r.problems.push(format!(
                        "{rat}: metadata prefix {prefix:?} disagrees with match prefix {m:?} and prefix_rewrite {:?}: the vendor gets {vendor:?} but rules would match {}",
                        rewrite.unwrap_or("(none)"),
                        filter_view.map_or("nothing (outside the prefix)".to_string(), |v| format!("{v:?}"))
                    ));
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = include_str!("../../envoy/local.yaml");

    fn doc(s: &str) -> Value {
        serde_norway::from_str(s).unwrap_or_default()
    }

    #[test]
    fn shipped_local_config_passes() {
        let r = lint(&doc(LOCAL), true);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.routes, 5);
    }

    #[test]
    fn flags_each_problem() {
        let cases = [
            ("normalize_path: true", "normalize_path: false", "normalize_path must be true"),
            ("merge_slashes: true", "merge_slashes: false", "merge_slashes must be true"),
            ("path_with_escaped_slashes_action: REJECT_REQUEST", "path_with_escaped_slashes_action: KEEP_UNCHANGED", "REJECT_REQUEST"),
            ("fail_open: false", "fail_open: true", "fail_open: true"),
            ("prefix_rewrite: \"/\", host_rewrite_literal: api.stripe.com", "prefix_rewrite: \"/v1/\", host_rewrite_literal: api.stripe.com", "disagrees"),
            ("{target: stripe, prefix: \"/stripe\"}", "{target: stripe, prefix: \"/strip\"}", "disagrees"),
            ("{target: openai, prefix: \"/openai\"}", "{target: nope, prefix: \"/openai\"}", "not in the filter configuration"),
            ("suppress_envoy_headers: true", "suppress_envoy_headers: false", "suppress_envoy_headers"),
            ("route: {cluster: vendor, prefix_rewrite: \"/\", host_rewrite_literal: maps.googleapis.com}",
             "route: {cluster: vault, prefix_rewrite: \"/\", host_rewrite_literal: maps.googleapis.com}", "store cluster"),
            ("\"audience\": \"keyward\",", "\"audience\": \"keyward\", \"colour\": 1,", "unknown field"),
        ];
        for (from, to, want) in cases {
            assert!(LOCAL.contains(from), "fixture lacks {from}");
            let r = lint(&doc(&LOCAL.replacen(from, to, 1)), true);
            assert!(r.problems.iter().any(|p| p.contains(want)), "{to}: want {want:?} in {:?}", r.problems);
        }
    }
}
