//! `keyward check-envoy`: lint an Envoy bootstrap that runs Keyward.

use crate::args::{Args, Fail};
use crate::compile_for_check;
use crate::lint_report::{arr, b, s, Report};
use keyward_core::config::{Config, Inject};
use keyward_core::policy::rules::strip_prefix;
use serde_json::json;
use serde_json::Value;

const WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The native module (`keyward native-config`): Envoy's dynamic-modules filter.
const MODULE: &str = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const BUFFER: &str = "envoy.filters.http.buffer";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

pub fn run(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &["no-env"], &["ecds"], 1)?;
    let path = a.positional.first().ok_or_else(|| Fail::usage("a FILE.yaml is required"))?;
    let text = std::fs::read_to_string(path).map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?;
    let doc: Value = serde_norway::from_str(&text).map_err(|e| format!("{path}: not YAML: {e}"))?;
    // A filter configured by ECDS: its resource, from --ecds or the file the bootstrap names.
    let ecds = match a.get("ecds") {
        Some(file) => Some(ecds_resource(file)?),
        None => ecds_path(&doc).and_then(|file| ecds_resource(&file).ok()),
    };
    let report = lint_with(&doc, a.flag("no-env"), ecds.as_ref());
    if a.json() {
        let ok = report.problems.is_empty();
        println!(
            "{}",
            json!({ "ok": ok, "file": path, "listeners": report.listeners, "routes": report.routes, "problems": report.problems, "notes": report.notes })
        );
        return if ok { Ok(()) } else { Err(Fail::Failed(String::new())) };
    }
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
        Err(Fail::Failed(format!("{path}: {} problem(s)", report.problems.len())))
    }
}

fn is_loopback(addr: &str) -> bool {
    addr == "localhost" || addr == "::1" || addr.starts_with("127.")
}

/// Every socket address of a cluster's endpoints.
fn endpoint_addresses(cluster: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for ep in cluster.get("load_assignment").map(|la| arr(la, "endpoints")).unwrap_or_default() {
        for lb in arr(&ep, "lb_endpoints") {
            if let Some(a) = s(&lb, &["endpoint", "address", "socket_address", "address"]) {
                out.push(a.to_string());
            }
        }
    }
    out
}

/// A cluster that leaves the host must verify who it talks to: TLS with a fixed SNI, a trusted
/// CA, and the peer certificate's SAN matched.
fn lint_upstream_tls(r: &mut Report, cluster: &Value, why: &str) {
    let name = s(cluster, &["name"]).unwrap_or("?");
    let addrs = endpoint_addresses(cluster);
    if !addrs.is_empty() && addrs.iter().all(|a| is_loopback(a)) {
        return;
    }
    let ts = cluster.get("transport_socket");
    let tls = ts.and_then(|t| t.get("typed_config")).filter(|tc| s(tc, &["@type"]).is_some_and(|t| t.ends_with("UpstreamTlsContext")));
    let Some(tls) = tls else {
        r.problems.push(format!("cluster {name} ({why}) leaves the host without TLS (transport_socket UpstreamTlsContext)"));
        return;
    };
    if s(tls, &["sni"]).is_none_or(str::is_empty) {
        r.problems.push(format!("cluster {name} ({why}): set a fixed sni"));
    }
    let vc = tls.get("common_tls_context").and_then(|c| c.get("validation_context"));
    if vc.and_then(|v| v.get("trusted_ca")).is_none() {
        r.problems.push(format!("cluster {name} ({why}): validation_context.trusted_ca is missing (the peer is not verified)"));
    }
    let san = vc.is_some_and(|v| !arr(v, "match_typed_subject_alt_names").is_empty() || !arr(v, "match_subject_alt_names").is_empty());
    if !san {
        r.problems.push(format!("cluster {name} ({why}): match_typed_subject_alt_names is missing (any certificate from the CA would do)"));
    }
}

#[cfg(test)]
pub fn lint(doc: &Value, no_env: bool) -> Report {
    lint_with(doc, no_env, None)
}

/// The keyward filter's ECDS file, as a bootstrap names it (`config_discovery` with a
/// `path_config_source`).
fn ecds_path(doc: &Value) -> Option<String> {
    let mut found = None;
    walk(doc, &mut |v| {
        if let Some(p) = v.get("config_discovery").and_then(|cd| s(cd, &["config_source", "path_config_source", "path"])) {
            if s(v, &["name"]) == Some("keyward") {
                found = Some(p.to_string());
            }
        }
    });
    found
}

fn walk(v: &Value, f: &mut impl FnMut(&Value)) {
    f(v);
    match v {
        Value::Array(a) => a.iter().for_each(|x| walk(x, f)),
        Value::Object(m) => m.values().for_each(|x| walk(x, f)),
        _ => {}
    }
}

/// The filter's `TypedExtensionConfig.typed_config` in an ECDS file (JSON or YAML, one resource).
fn ecds_resource(file: &str) -> Result<Value, Fail> {
    let text = std::fs::read_to_string(file).map_err(|e| Fail::unavailable(format!("cannot read {file}: {e}")))?;
    let doc: Value = serde_norway::from_str(&text).map_err(|e| Fail::Failed(format!("{file}: not YAML or JSON: {e}")))?;
    match doc.get("resources").and_then(Value::as_array).map(Vec::as_slice) {
        Some([one]) => one.get("typed_config").cloned().ok_or_else(|| Fail::Failed(format!("{file}: its resource has no typed_config"))),
        _ => Err(Fail::Failed(format!("{file}: an ECDS file holds exactly one resource"))),
    }
}

pub fn lint_with(doc: &Value, no_env: bool, ecds: Option<&Value>) -> Report {
    let mut r = Report::default();
    let listeners = doc.get("static_resources").map(|s| arr(s, "listeners")).unwrap_or_default();
    let mut used: Vec<(String, String)> = Vec::new();
    let mut vm_ids: Vec<(String, String)> = Vec::new();
    let mut ledgers: Vec<String> = Vec::new();
    let mut drains = false;
    for l in &listeners {
        let lname = s(l, &["name"]).unwrap_or("?").to_string();
        for chain in arr(l, "filter_chains") {
            for f in arr(&chain, "filters") {
                let Some(tc) = f.get("typed_config") else { continue };
                if s(tc, &["@type"]) != Some(HCM) {
                    continue;
                }
                let at = format!("listener {lname}");
                if let Some(h) = lint_hcm(&mut r, &at, tc, no_env, ecds) {
                    used.extend(h.store_clusters.into_iter().map(|c| (c, "a secret store".to_string())));
                    ledgers.extend(h.ledger_cluster.clone());
                    drains |= h.drain;
                    used.extend(h.ledger_cluster.into_iter().map(|c| (c, "the fleet ledger".to_string())));
                    used.extend(h.route_clusters.into_iter().map(|c| (c, "a keyward route".to_string())));
                    vm_ids.extend(h.vm_id.map(|v| (v, h.code)));
                }
                // Every wasm filter's VM, keyward or not: a shared vm_id shares Keyward's secrets.
                for hf in arr(tc, "http_filters") {
                    let Some(c) = hf.get("typed_config").filter(|c| s(c, &["@type"]) == Some(WASM)).and_then(|c| c.get("config")) else { continue };
                    let id = s(c, &["vm_config", "vm_id"]).unwrap_or("").to_string();
                    let code = s(c, &["vm_config", "code", "local", "filename"])
                        .or_else(|| s(c, &["vm_config", "code", "remote", "http_uri", "uri"]))
                        .unwrap_or("")
                        .to_string();
                    if !vm_ids.iter().any(|(v, k)| *v == id && *k == code) {
                        vm_ids.push((id, code));
                    }
                }
            }
        }
    }
    if r.listeners == 0 {
        r.problems.push("no HTTP connection manager runs the keyward wasm filter".into());
    }
    for (i, (id, code)) in vm_ids.iter().enumerate() {
        if vm_ids.iter().skip(i + 1).any(|(v, c)| v == id && c != code) {
            r.problems.push(format!("vm_id {id:?} is shared by different wasm modules: they could read Keyward's shared data (secrets)"));
        }
    }
    let admin = s(doc, &["admin", "address", "socket_address", "address"]);
    match admin {
        Some(a) if !is_loopback(a) => r.problems.push(format!("admin listens on {a}: bind it to 127.0.0.1 (it can dump config and change log levels)")),
        _ => {}
    }
    let clusters = doc.get("static_resources").map(|s| arr(s, "clusters")).unwrap_or_default();
    let mut seen: Vec<&str> = Vec::new();
    for (name, why) in &used {
        if seen.contains(&name.as_str()) {
            continue;
        }
        seen.push(name);
        if let Some(c) = clusters.iter().find(|c| s(c, &["name"]) == Some(name.as_str())) {
            lint_upstream_tls(&mut r, c, why);
        }
    }
    if !ledgers.is_empty() && !drains {
        r.problems.push(
            "a fleet ledger is configured but no route is a keyward drain endpoint: the entrypoint could not give the slices back on SIGTERM, and every stop would keep them counted as spent".into(),
        );
    }
    for name in &ledgers {
        match clusters.iter().find(|c| s(c, &["name"]) == Some(name.as_str())) {
            None => r.problems.push(format!("the ledger's cluster {name} is not defined (static_resources.clusters)")),
            Some(c) if !signs_dynamodb(c, &listeners) => r.problems.push(format!(
                "cluster {name} (the fleet ledger) does not sign its requests: add envoy.filters.http.aws_request_signing (service_name: dynamodb) as an upstream HTTP filter in its typed_extension_protocol_options, or point it at a loopback listener that signs; the filter holds no AWS credentials"
            )),
            Some(_) => {}
        }
    }
    r.notes.push("run Envoy at log level info or below: debug and trace print request headers (credentials and injected keys)".into());
    r
}

/// Is this an `aws_request_signing` filter for DynamoDB?
fn dynamodb_signer(f: &Value) -> bool {
    s(f, &["typed_config", "@type"]).is_some_and(|t| t.ends_with("AwsRequestSigning")) && s(f, &["typed_config", "service_name"]) == Some("dynamodb")
}

/// Does `cluster` sign what it sends to DynamoDB: with an upstream HTTP filter, or through a
/// loopback listener whose connection manager signs?
fn signs_dynamodb(cluster: &Value, listeners: &[Value]) -> bool {
    let upstream = cluster
        .get("typed_extension_protocol_options")
        .and_then(|o| o.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"))
        .is_some_and(|o| arr(o, "http_filters").iter().any(dynamodb_signer));
    if upstream {
        return true;
    }
    let ports: Vec<u64> = cluster
        .get("load_assignment")
        .map(|la| arr(la, "endpoints"))
        .unwrap_or_default()
        .iter()
        .flat_map(|ep| arr(ep, "lb_endpoints"))
        .filter(|lb| s(lb, &["endpoint", "address", "socket_address", "address"]).is_some_and(is_loopback))
        .filter_map(|lb| {
            lb.get("endpoint").and_then(|e| e.get("address")).and_then(|a| a.get("socket_address")).and_then(|a| a.get("port_value")).and_then(Value::as_u64)
        })
        .collect();
    listeners.iter().any(|l| {
        let port = l.get("address").and_then(|a| a.get("socket_address")).and_then(|a| a.get("port_value")).and_then(Value::as_u64);
        port.is_some_and(|p| ports.contains(&p))
            && arr(l, "filter_chains")
                .iter()
                .flat_map(|c| arr(c, "filters"))
                .any(|f| f.get("typed_config").is_some_and(|tc| arr(tc, "http_filters").iter().any(dynamodb_signer)))
    })
}

/// Does this access log print the request path with its query as the router sends it upstream
/// (`:path`, which holds a query-injected key)? `Some(why)`, naming the format. Envoy's default
/// format prints `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`: the filter sets that header to the path the
/// workload sent whenever it injects a key in the query, and the router keeps it
/// (`suppress_envoy_headers: true`, required separately), so that one prints no key.
fn logs_query(log: &Value) -> Option<String> {
    let tc = log.get("typed_config")?;
    let format = tc.get("log_format")?;
    let mut texts = Vec::new();
    collect_strings(format, &mut texts);
    for t in texts {
        for cmd in t.split('%').skip(1).step_by(2) {
            let c = cmd.to_ascii_uppercase();
            let original = c == "REQ(X-ENVOY-ORIGINAL-PATH?:PATH)" || c == "REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)";
            let risky = (c.starts_with("REQ(") && c.contains("PATH") && !original) || (c.starts_with("PATH") && !c.contains("NQ"));
            if risky {
                return Some(format!("prints %{cmd}% (the path with its query)"));
            }
        }
    }
    None
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(t) => out.push(t.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// What one keyward connection manager uses, for the bootstrap-wide checks.
struct HcmUse {
    store_clusters: Vec<String>,
    /// The fleet ledger's cluster, if the configuration has a ledger.
    ledger_cluster: Option<String>,
    /// Has a route the filter answers as `drain`.
    drain: bool,
    route_clusters: Vec<String>,
    vm_id: Option<String>,
    code: String,
}

fn lint_hcm(r: &mut Report, at: &str, hcm: &Value, no_env: bool, ecds: Option<&Value>) -> Option<HcmUse> {
    let filters = arr(hcm, "http_filters");
    let by_ecds = |f: &Value| {
        s(f, &["name"]) == Some("keyward")
            && f.get("config_discovery").is_some_and(|cd| arr(cd, "type_urls").iter().any(|t| matches!(t.as_str(), Some(WASM | MODULE))))
    };
    let kw = filters.iter().find(|f| {
        by_ecds(f)
            || f.get("typed_config").is_some_and(|tc| {
                (s(tc, &["@type"]) == Some(WASM)
                    && (s(tc, &["config", "root_id"]) == Some("keyward")
                        || s(tc, &["config", "name"]) == Some("keyward")
                        || s(tc, &["config", "vm_config", "code", "local", "filename"]).is_some_and(|p| p.ends_with("keyward.wasm"))))
                    || (s(tc, &["@type"]) == Some(MODULE) && s(tc, &["dynamic_module_config", "name"]).is_some_and(|n| n.starts_with("keyward")))
            })
    })?;
    r.listeners += 1;
    let tc = if by_ecds(kw) {
        if kw.get("config_discovery").and_then(|cd| cd.get("default_config")).is_some() {
            r.problems.push(format!("{at}: the keyward filter's ECDS has a default_config: without its configuration Envoy must not serve, not fall back"));
        }
        match ecds {
            Some(v) => v.clone(),
            None => {
                r.notes.push(format!("{at}: the keyward filter's configuration comes by ECDS; give --ecds FILE to check it too"));
                Value::Null
            }
        }
    } else {
        kw.get("typed_config").cloned().unwrap_or_default()
    };
    let native = s(&tc, &["@type"]) == Some(MODULE);
    // The wasm filter's VM checks apply to the wasm filter only: the native module has no VM, no
    // failure policy (a panic fails its request closed) and reads its configuration from
    // `filter_config`.
    let known = !tc.is_null() && !native;
    let cfgv =
        if native { json!({"configuration": tc.get("filter_config").cloned().unwrap_or_default()}) } else { tc.get("config").cloned().unwrap_or_default() };
    if native && s(&tc, &["dynamic_module_config", "name"]) != Some("keyward") {
        r.problems
            .push(format!("{at}: the native keyward module must be loaded by its name, keyward (libkeyward.so); a test build answers a header with a panic"));
    }
    if native && tc.pointer("/dynamic_module_config/module").is_some() {
        r.problems.push(format!("{at}: load the native keyward module by name from ENVOY_DYNAMIC_MODULES_SEARCH_PATH, not from dynamic_module_config.module"));
    }
    if native && b(&tc, &["dynamic_module_config", "do_not_close"]) != Some(true) {
        r.problems.push(format!("{at}: the native keyward module needs dynamic_module_config.do_not_close: true (its tick thread lives as long as Envoy)"));
    }
    let vm_id = s(&cfgv, &["vm_config", "vm_id"]).unwrap_or("").to_string();
    if vm_id.is_empty() && known {
        r.problems.push(format!("{at}: give the keyward filter its own vm_config.vm_id (an empty one is shared by every module without one)"));
    }
    let code = s(&cfgv, &["vm_config", "code", "local", "filename"]).unwrap_or("").to_string();
    if s(hcm, &["common_http_protocol_options", "headers_with_underscores_action"]) != Some("REJECT_REQUEST") {
        r.problems.push(format!(
            "{at}: common_http_protocol_options.headers_with_underscores_action must be REJECT_REQUEST (x_api_key would slip past header rules)"
        ));
    }
    if hcm.get("max_request_headers_kb").is_none() {
        r.problems.push(format!("{at}: set max_request_headers_kb (a header size limit)"));
    }
    if hcm.get("common_http_protocol_options").and_then(|c| c.get("max_headers_count")).is_none() {
        r.problems.push(format!("{at}: set common_http_protocol_options.max_headers_count (a header count limit)"));
    }
    if hcm.get("request_timeout").is_none() && hcm.get("request_headers_timeout").is_none() {
        r.problems.push(format!("{at}: set request_timeout or request_headers_timeout (slow clients hold connections)"));
    }
    if hcm.get("common_http_protocol_options").and_then(|c| c.get("idle_timeout")).is_none() {
        r.problems.push(format!("{at}: set common_http_protocol_options.idle_timeout"));
    }

    let policy = s(&cfgv, &["failure_policy"]);
    if !known {
    } else if b(&cfgv, &["fail_open"]) == Some(true) || policy == Some("FAIL_OPEN") {
        r.problems.push(format!("{at}: the keyward filter fails open (fail_open: true or failure_policy: FAIL_OPEN): a broken filter would forward requests"));
    } else if !matches!(policy, Some("FAIL_RELOAD" | "FAIL_CLOSED")) {
        r.problems.push(format!(
            "{at}: set failure_policy: FAIL_RELOAD with a reload_config backoff (a panicking module then fails closed for that request and its VM is reloaded), or FAIL_CLOSED"
        ));
    } else if policy == Some("FAIL_CLOSED") {
        r.notes
            .push(format!("{at}: failure_policy: FAIL_CLOSED leaves a worker whose module panicked answering 503 until Envoy restarts; FAIL_RELOAD heals it"));
    }
    if known && s(&cfgv, &["vm_config", "runtime"]) != Some("envoy.wasm.runtime.v8") {
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
        None if !known && !native => None,
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
        if uses_query {
            for (i, log) in arr(hcm, "access_log").iter().enumerate() {
                if let Some(why) = logs_query(log) {
                    let name = s(log, &["name"]).unwrap_or("?");
                    r.problems.push(format!(
                        "{at}: access_log[{i}] ({name}) {why}, and a target injects its key into the query: a request that ends without a response (a reset) would log the key. Print %REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)% or %PATH(NQ:PATH)% instead"
                    ));
                }
            }
        }
    }
    crate::lint_ratelimit::check(r, at, hcm, cfg.as_ref(), kw_pos);
    let store_clusters: Vec<String> = cfg.as_ref().map(|c| c.stores.iter().map(|st| st.cluster.clone()).collect()).unwrap_or_default();

    let mut route_clusters: Vec<String> = Vec::new();
    let mut drain = false;
    let vhosts = hcm.get("route_config").map(|rc| arr(rc, "virtual_hosts")).unwrap_or_default();
    if hcm.get("route_config").is_none() {
        r.notes.push(format!("{at}: routes are not inline (RDS?); route metadata was not checked"));
    }
    for vh in vhosts {
        for route in arr(&vh, "routes") {
            let rname = s(&route, &["name"]).unwrap_or("(unnamed)").to_string();
            let rat = format!("{at}: route {rname}");
            // The filter rewrites credential headers and may add a query parameter; Envoy then
            // selects the route again. A route that matches on what the filter changes could send
            // one target's key to another target's cluster.
            if let Some(c) = &cfg {
                let mut changed: Vec<String> = ["authorization", "proxy-authorization", "x-api-key", "cookie"].iter().map(|h| h.to_string()).collect();
                let mut params: Vec<String> = Vec::new();
                for t in &c.targets {
                    changed.push(t.credential.header().to_ascii_lowercase());
                    match &t.inject {
                        Inject::Header { name, .. } => changed.push(name.to_ascii_lowercase()),
                        Inject::Query { name, .. } => params.push(name.to_ascii_lowercase()),
                        _ => {}
                    }
                }
                for h in arr(route.get("match").unwrap_or(&Value::Null), "headers") {
                    let name = s(&h, &["name"]).unwrap_or("").to_ascii_lowercase();
                    if changed.contains(&name) {
                        r.problems.push(format!("{rat}: matches on header {name:?}, which the keyward filter rewrites; Envoy re-selects the route after the rewrite, so match on the path prefix instead"));
                    }
                }
                for q in arr(route.get("match").unwrap_or(&Value::Null), "query_parameters") {
                    let name = s(&q, &["name"]).unwrap_or("").to_ascii_lowercase();
                    if params.contains(&name) {
                        r.problems
                            .push(format!("{rat}: matches on query parameter {name:?}, which a keyward target injects; match on the path prefix instead"));
                    }
                }
            }
            if let Some(cl) = s(&route, &["route", "cluster"]) {
                if !route_clusters.iter().any(|c| c == cl) {
                    route_clusters.push(cl.to_string());
                }
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
            if let Some(ep) = s(meta, &["endpoint"]) {
                drain |= ep == "drain";
                let answers_503 = route.get("direct_response").and_then(|d| d.get("status")).and_then(Value::as_u64).is_some_and(|st| st >= 500);
                match ep {
                    "health" | "issue" | "drain" if !answers_503 => r.problems.push(format!(
                        "{rat}: a keyward {ep} endpoint needs `direct_response: {{status: 503}}`, so that it fails (and never goes upstream) when the filter does not run"
                    )),
                    "drain" if !loopback_only(&filters, &route) => r.problems.push(format!(
                        "{rat}: the drain endpoint needs envoy.filters.http.rbac on this route admitting only loopback peers (direct_remote_ip 127.0.0.1/32, ::1/128): the filter alone sees an address X-Forwarded-For can set"
                    )),
                    "health" | "drain" => {}
                    "issue" => {
                        if !buffered(&filters, &route) {
                            r.problems.push(format!(
                                "{rat}: the issuing endpoint needs envoy.filters.http.buffer after keyward, enabled on this route (the router must not see the request before keyward has read its body)"
                            ));
                        }
                    }
                    other => r.problems.push(format!("{rat}: unknown keyward endpoint {other:?}")),
                }
                continue;
            }
            r.routes += 1;
            let Some(target) = s(meta, &["target"]) else {
                r.problems.push(format!("{rat}: keyward metadata has no target"));
                continue;
            };
            if let Some(c) = &cfg {
                match c.target(target) {
                    None => r.problems.push(format!("{rat}: target {target:?} is not in the filter configuration")),
                    Some((_, t)) if t.cost.as_ref().is_some_and(|c| c.reads_body()) && !buffered(&filters, &route) => r.problems.push(format!(
                        "{rat}: target {target:?} prices requests from their body, so the route needs envoy.filters.http.buffer after keyward, enabled on it (else the vendor gets the request before its cost is reserved)"
                    )),
                    Some(_) => {}
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
    let ledger_cluster = cfg.as_ref().and_then(|c| c.ledger.as_ref()).map(|l| l.cluster.clone());
    Some(HcmUse { store_clusters, ledger_cluster, route_clusters, vm_id: Some(vm_id), code, drain })
}

/// Is Envoy's buffer filter after keyward and enabled on `route`? Envoy gives a wasm filter a
/// request's body only after its headers went on: the buffer filter holds them back from the
/// router until the whole body has passed keyward, which may still refuse the request.
fn buffered(filters: &[Value], route: &Value) -> bool {
    let buffer_at = filters.iter().position(|f| s(f, &["name"]) == Some(BUFFER));
    let kw_at = filters.iter().position(is_keyward);
    let globally = buffer_at.and_then(|i| filters.get(i)).is_some_and(|f| f.get("disabled").and_then(Value::as_bool) != Some(true));
    let per_route = route.get("typed_per_filter_config").and_then(|t| t.get(BUFFER));
    let wrapped = per_route.is_some_and(|p| s(p, &["@type"]).is_some_and(|t| t.ends_with("config.route.v3.FilterConfig")));
    let disabled_here = per_route.is_some_and(|p| {
        let off = |v: &Value| v.get("disabled").and_then(Value::as_bool) == Some(true);
        off(p) || p.get("config").is_some_and(off)
    });
    // A filter off in the chain is switched on for a route only by a FilterConfig that does not
    // disable it; on in the chain, a route may still switch it off.
    let on_here = if globally { !disabled_here } else { wrapped && !disabled_here };
    matches!((buffer_at, kw_at), (Some(b), Some(k)) if b > k && on_here)
}

/// Keyward's filter in a chain: a Wasm filter, or one named keyward (configured by ECDS).
fn is_keyward(f: &Value) -> bool {
    matches!(s(f, &["typed_config", "@type"]), Some(WASM | MODULE)) || (s(f, &["name"]) == Some("keyward") && f.get("config_discovery").is_some())
}

/// Does the route carry an RBAC that allows only loopback peers, by their own address, in a
/// chain where the RBAC filter runs before keyward?
fn loopback_only(filters: &[Value], route: &Value) -> bool {
    let rbac_at = filters.iter().position(|f| s(f, &["name"]) == Some("envoy.filters.http.rbac"));
    let kw_at = filters.iter().position(is_keyward);
    if !matches!((rbac_at, kw_at), (Some(r), Some(k)) if r < k) {
        return false;
    }
    let Some(per) = route.get("typed_per_filter_config").and_then(|m| m.get("envoy.filters.http.rbac")) else { return false };
    let cfg = per.get("config").unwrap_or(per);
    let Some(policies) = cfg.pointer("/rbac/rules/policies").and_then(Value::as_object) else { return false };
    if cfg.pointer("/rbac/rules/action").and_then(Value::as_str).unwrap_or("ALLOW") != "ALLOW" || policies.is_empty() {
        return false;
    }
    policies.values().all(|p| {
        let principals = p.get("principals").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        !principals.is_empty()
            && principals.iter().all(|pr| {
                let ip = pr.get("direct_remote_ip");
                let prefix = ip.and_then(|i| i.get("address_prefix")).and_then(Value::as_str).unwrap_or("");
                let len = ip.and_then(|i| i.get("prefix_len")).and_then(Value::as_u64).unwrap_or(0);
                (prefix.starts_with("127.") && len >= 8) || (prefix == "::1" && len == 128)
            })
    })
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

    const EGRESS: &str = include_str!("../../envoy/egress-gateway.yaml");
    const SIDECAR: &str = include_str!("../../envoy/sidecar.yaml");
    const AWS: &str = include_str!("../../envoy/aws-secrets-manager.yaml");

    #[test]
    fn shipped_production_configs_pass() {
        for (name, text) in [("egress", EGRESS), ("sidecar", SIDECAR), ("aws", AWS)] {
            let r = lint(&doc(text), true);
            assert!(r.problems.is_empty(), "{name}: {:?}", r.problems);
            assert!(r.notes.iter().any(|n| n.contains("debug and trace print request headers")));
        }
    }

    #[test]
    fn shipped_configs_rewritten_for_the_native_module_pass() {
        for (name, text) in [("local", LOCAL), ("egress", EGRESS), ("sidecar", SIDECAR), ("aws", AWS)] {
            let mut d = doc(text);
            assert!(crate::native_config::rewrite(&mut d) > 0, "{name}");
            let r = lint(&d, true);
            assert!(r.problems.is_empty(), "{name}: {:?}", r.problems);
            assert!(r.listeners > 0, "{name}: the native filter is found");
        }
        // Its configuration is still checked, and do_not_close is required.
        let mut d = doc(&EGRESS.replace("\"audience\": \"keyward\",", "\"audience\": \"keyward\", \"colour\": 1,"));
        crate::native_config::rewrite(&mut d);
        assert!(lint(&d, true).problems.iter().any(|p| p.contains("unknown field")));
        let mut d = doc(EGRESS);
        crate::native_config::rewrite(&mut d);
        let text = serde_json::to_string(&d).unwrap_or_default().replace("\"do_not_close\":true", "\"do_not_close\":false");
        assert!(lint(&serde_json::from_str(&text).unwrap_or_default(), true).problems.iter().any(|p| p.contains("do_not_close")));
    }

    #[test]
    fn flags_each_missing_hardening_setting() {
        let cases = [
            ("headers_with_underscores_action: REJECT_REQUEST\n            max_headers_count: 64", "max_headers_count: 64", "headers_with_underscores_action"),
            ("          max_request_headers_kb: 32\n", "", "max_request_headers_kb"),
            ("            max_headers_count: 64\n", "", "max_headers_count"),
            ("          request_headers_timeout: 10s\n          request_timeout: 300s\n", "", "request_timeout or request_headers_timeout"),
            ("            idle_timeout: 300s\n", "", "idle_timeout"),
            ("vm_id: keyward", "vm_id: \"\"", "vm_id"),
            ("address: {socket_address: {address: 127.0.0.1, port_value: 9901}}", "address: {socket_address: {address: 0.0.0.0, port_value: 9901}}", "admin listens on 0.0.0.0"),
            ("failure_policy: FAIL_RELOAD", "failure_policy: FAIL_OPEN", "fails open"),
            ("failure_policy: FAIL_RELOAD", "fail_open: true", "fails open"),
            ("failure_policy: FAIL_RELOAD", "failure_policy: UNSPECIFIED", "set failure_policy: FAIL_RELOAD"),
            ("        sni: api.stripe.com\n", "", "cluster stripe (a keyward route): set a fixed sni"),
            ("trusted_ca: {filename: /etc/ssl/certs/ca-certificates.crt}\n            match_typed_subject_alt_names:\n            - san_type: DNS\n              matcher: {exact: api.openai.com}",
             "match_typed_subject_alt_names:\n            - san_type: DNS\n              matcher: {exact: api.openai.com}", "cluster openai (a keyward route): validation_context.trusted_ca"),
            ("match_typed_subject_alt_names:\n            - san_type: DNS\n              matcher: {exact: vault.example.internal}", "match_typed_subject_alt_names: []", "cluster vault (a secret store): match_typed_subject_alt_names"),
            ("route: {cluster: stripe,", "route: {cluster: vault,", "store cluster"),
        ];
        for (from, to, want) in cases {
            assert!(EGRESS.contains(from), "fixture lacks {from:?}");
            let r = lint(&doc(&EGRESS.replacen(from, to, 1)), true);
            assert!(r.problems.iter().any(|p| p.contains(want)), "{to}: want {want:?} in {:?}", r.problems);
        }
        // A cluster with no TLS at all, and a wasm module sharing Keyward's vm_id.
        let start = EGRESS.find("  - name: twilio\n    connect_timeout").unwrap_or_default();
        let ts = start + EGRESS[start..].find("    transport_socket:\n").unwrap_or_default();
        let end = ts + EGRESS[ts..].find("  - name: ").unwrap_or_default();
        assert!(start > 0 && ts > start && end > ts);
        let plain = format!("{}{}", &EGRESS[..ts], &EGRESS[end..]);
        let r = lint(&doc(&plain), true);
        assert!(r.problems.iter().any(|p| p.contains("cluster twilio") && p.contains("without TLS")), "{:?}", r.problems);
        let shared = EGRESS.replacen(
            "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n              suppress_envoy_headers: true",
            "          - name: other\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n              config: {vm_config: {vm_id: keyward, code: {local: {filename: /x/other.wasm}}}}\n          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n              suppress_envoy_headers: true",
            1,
        );
        assert_ne!(shared, EGRESS);
        let r = lint(&doc(&shared), true);
        assert!(r.problems.iter().any(|p| p.contains("shared by different wasm modules")), "{:?}", r.problems);
    }

    #[test]
    fn flags_each_problem() {
        let cases = [
            ("normalize_path: true", "normalize_path: false", "normalize_path must be true"),
            ("merge_slashes: true", "merge_slashes: false", "merge_slashes must be true"),
            ("path_with_escaped_slashes_action: REJECT_REQUEST", "path_with_escaped_slashes_action: KEEP_UNCHANGED", "REJECT_REQUEST"),
            ("failure_policy: FAIL_RELOAD", "failure_policy: FAIL_OPEN", "fails open"),
            ("prefix_rewrite: \"/\", host_rewrite_literal: api.stripe.com", "prefix_rewrite: \"/v1/\", host_rewrite_literal: api.stripe.com", "disagrees"),
            ("{target: stripe, prefix: \"/stripe\"}", "{target: stripe, prefix: \"/strip\"}", "disagrees"),
            ("{target: openai, prefix: \"/openai\"}", "{target: nope, prefix: \"/openai\"}", "not in the filter configuration"),
            ("suppress_envoy_headers: true", "suppress_envoy_headers: false", "suppress_envoy_headers"),
            (
                "route: {cluster: vendor, prefix_rewrite: \"/\", host_rewrite_literal: maps.googleapis.com}",
                "route: {cluster: vault, prefix_rewrite: \"/\", host_rewrite_literal: maps.googleapis.com}",
                "store cluster",
            ),
            ("\"audience\": \"keyward\",", "\"audience\": \"keyward\", \"colour\": 1,", "unknown field"),
            // Routes matching on what the filter rewrites.
            (
                "match: {prefix: \"/stripe/\"}",
                "match: {prefix: \"/stripe/\", headers: [{name: Authorization, present_match: true}]}",
                "matches on header \"authorization\"",
            ),
            // A priced route whose buffer filter is switched off (the route's own entry).
            (
                "                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute\n                      buffer: {max_request_bytes: 65536}",
                "                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute\n                      disabled: true",
                "prices requests from their body",
            ),
            (
                "                    config:\n                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute\n                      buffer: {max_request_bytes: 65536}",
                "                    disabled: true",
                "prices requests from their body",
            ),
            // A query-injecting target (maps) with an access log that prints the query.
            ("path: \"%PATH(NQ:PATH)%\"", "path: \"%REQ(:PATH)%\"", "prints %REQ(:PATH)%"),
            ("path: \"%PATH(NQ:PATH)%\"", "path: \"%PATH%\"", "prints %PATH%"),
        ];
        for (from, to, want) in cases {
            assert!(LOCAL.contains(from), "fixture lacks {from}");
            let r = lint(&doc(&LOCAL.replacen(from, to, 1)), true);
            assert!(r.problems.iter().any(|p| p.contains(want)), "{to}: want {want:?} in {:?}", r.problems);
        }
        // A fleet ledger whose cluster does not sign its requests (the filter holds no AWS
        // credentials: Envoy must sign), then one that does.
        let with_ledger = LOCAL.replacen(
            "\"audience\": \"keyward\",",
            "\"audience\": \"keyward\", \"ledger\": {\"type\": \"dynamodb\", \"cluster\": \"ledger\", \"authority\": \"dynamodb.us-east-1.amazonaws.com\", \"table\": \"keyward-ledger\"},",
            1,
        );
        let unsigned = with_ledger.replacen(
            "  clusters:\n",
            "  clusters:\n  - name: ledger\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment:\n      cluster_name: ledger\n      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8000}}}}]}]\n",
            1,
        );
        let r = lint(&doc(&unsigned), true);
        assert!(r.problems.iter().any(|p| p.contains("ledger") && p.contains("does not sign")), "{:?}", r.problems);
        let signed = unsigned.replacen(
            "      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8000}}}}]}]\n",
            "      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8000}}}}]}]\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http_protocol_options: {}}\n        http_filters:\n        - name: envoy.filters.http.aws_request_signing\n          typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigning, service_name: dynamodb, region: us-east-1}\n        - name: envoy.filters.http.upstream_codec\n          typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec}\n",
            1,
        );
        let r = lint(&doc(&signed), true);
        let ledger_problems: Vec<&String> = r.problems.iter().filter(|p| p.contains("ledger")).collect();
        // Signed now; what is left is the missing drain route (LOCAL has none).
        assert!(ledger_problems.len() == 1 && ledger_problems.iter().all(|p| p.contains("no route is a keyward drain endpoint")), "{ledger_problems:?}");
        assert!(lint(&doc(&with_ledger), true).problems.iter().any(|p| p.contains("is not defined")));
        // The shipped gateway has its drain route; without it, the ledger's slices could never go back.
        assert!(!lint(&doc(EGRESS), true).problems.iter().any(|p| p.contains("drain")));
        let start = EGRESS.find("              - name: keyward_drain").unwrap_or(0);
        let end = EGRESS.find("              - name: stripe").unwrap_or(0);
        let no_drain = format!("{}{}", EGRESS.get(..start).unwrap_or(""), EGRESS.get(end..).unwrap_or(""));
        assert!(lint(&doc(&no_drain), true).problems.iter().any(|p| p.contains("no route is a keyward drain endpoint")));
        // The path as the workload sent it is safe to print: the filter sets x-envoy-original-path
        // when it injects a query key, and Envoy's default format prints that.
        for (from, to) in [
            ("path: \"%PATH(NQ:PATH)%\"", "path: \"%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\""),
            (
                "              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n              log_format:\n                json_format:\n",
                "              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n              unused:\n                json_format:\n",
            ),
        ] {
            assert!(LOCAL.contains(from), "fixture lacks {from}");
            let r = lint(&doc(&LOCAL.replacen(from, to, 1)), true);
            assert!(!r.problems.iter().any(|p| p.contains("access_log")), "{to}: {:?}", r.problems);
        }
    }
}
