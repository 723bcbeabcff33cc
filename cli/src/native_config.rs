//! `keyward native-config`: an Envoy configuration that runs Keyward's wasm filter, rewritten to
//! run the native module (`libkeyward.so`, Envoy's dynamic-modules HTTP filter) instead. The
//! shipped configurations describe the wasm filter; the gateway image's entrypoint and `make run`
//! rewrite them with this when `KEYWARD_EXECUTOR=native`, so both executors run from one file.
//!
//! Each keyward Wasm filter config (a `code` file named `keyward*.wasm`) becomes a
//! `DynamicModuleFilter` with the same JSON configuration; the module is found as
//! `lib<name>.so` under `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`. A bootstrap also gets the runtime
//! flag that names the module's metrics as the wasm filter's are named (`keyward_*` in Prometheus).

use crate::args::{Args, Fail};
use serde_json::{json, Map, Value};

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const MODULE_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";
pub const STRIP_PREFIX: &str = "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix";

pub fn run(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &["out"], 1)?;
    let path = a.positional.first().ok_or_else(|| Fail::usage("a FILE is required"))?;
    let text = std::fs::read_to_string(path).map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?;
    let mut doc: Value = serde_norway::from_str(&text).map_err(|e| Fail::Failed(format!("{path}: not YAML or JSON: {e}")))?;
    let fixed = fixed_environment(&doc);
    if !fixed.is_empty() {
        return Err(Fail::Failed(format!(
            "{path}: the wasm filter's VM is given fixed values for {}: the native module reads Envoy's environment; set them there and remove key_values",
            fixed.join(", ")
        )));
    }
    let n = rewrite(&mut doc);
    if n == 0 {
        return Err(Fail::Failed(format!("{path}: no keyward wasm filter (or ECDS subscription for one) to rewrite")));
    }
    let out = a.get("out");
    let json_out = out.is_some_and(|o| o.ends_with(".json"));
    let rendered = if json_out {
        serde_json::to_string_pretty(&doc).map_err(|e| Fail::Failed(e.to_string()))?
    } else {
        serde_norway::to_string(&doc).map_err(|e| Fail::Failed(e.to_string()))?
    };
    match out {
        Some(o) => std::fs::write(o, rendered).map_err(|e| Fail::unavailable(format!("cannot write {o}: {e}")))?,
        None => print!("{rendered}"),
    }
    Ok(())
}

/// Rewrite every keyward wasm filter in `doc`; how many were rewritten.
/// Wasm filters whose VM is given fixed environment values (`key_values`): the native module reads
/// Envoy's own environment, so such a configuration cannot be run natively as it stands.
pub fn fixed_environment(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if m.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                    if let Some(kv) = v.pointer("/config/vm_config/environment_variables/key_values").and_then(Value::as_object) {
                        out.extend(kv.keys().cloned());
                    }
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(doc, &mut out);
    out
}

pub fn rewrite(doc: &mut Value) -> usize {
    let n = walk(doc);
    if n > 0 && doc.get("static_resources").is_some() {
        add_runtime_flag(doc);
        add_bucket_settings(doc);
    }
    n
}

fn walk(v: &mut Value) -> usize {
    match v {
        Value::Object(m) => {
            if let Some(native) = native_of(m) {
                *v = native;
                return 1;
            }
            let ecds = usize::from(subscribe_native(m));
            ecds + m.values_mut().map(walk).sum::<usize>()
        }
        Value::Array(a) => a.iter_mut().map(walk).sum(),
        _ => 0,
    }
}

/// The dynamic-module filter for a keyward Wasm filter config; `None` for anything else.
fn native_of(m: &Map<String, Value>) -> Option<Value> {
    if m.get("@type").and_then(Value::as_str) != Some(WASM_TYPE) {
        return None;
    }
    let config = m.get("config")?;
    let file = config.pointer("/vm_config/code/local/filename")?.as_str()?;
    let base = file.rsplit('/').next().unwrap_or(file);
    if !(base.starts_with("keyward") && base.ends_with(".wasm")) {
        return None;
    }
    // keyward.wasm → libkeyward.so; keyward-panic.wasm (tests) → libkeyward_panic.so.
    let name = base.trim_end_matches(".wasm").replace('-', "_");
    let configuration =
        config.get("configuration").cloned().unwrap_or_else(|| json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": ""}));
    Some(json!({
        "@type": MODULE_TYPE,
        // do_not_close: the module's tick thread lives as long as the process.
        "dynamic_module_config": {"name": name, "do_not_close": true},
        "filter_name": "keyward",
        "filter_config": configuration,
    }))
}

/// A filter named keyward whose configuration comes by ECDS (`config_discovery`): its accepted
/// type becomes the native module's (config-sync writes the rewritten template there).
fn subscribe_native(m: &mut Map<String, Value>) -> bool {
    if !m.get("name").and_then(Value::as_str).is_some_and(|n| n.contains("keyward")) {
        return false;
    }
    let Some(urls) = m.get_mut("config_discovery").and_then(|c| c.get_mut("type_urls")).and_then(Value::as_array_mut) else { return false };
    let mut changed = false;
    for u in urls.iter_mut().filter(|u| u.as_str() == Some(WASM_TYPE)) {
        *u = Value::String(MODULE_TYPE.into());
        changed = true;
    }
    changed
}

/// Histogram buckets set for the wasm filter's stats (`wasmcustom.keyward_*`) apply to the native
/// module's too (`dynamicmodulescustom.keyward_*`).
fn add_bucket_settings(doc: &mut Value) {
    let Some(list) = doc.pointer_mut("/stats_config/histogram_bucket_settings").and_then(Value::as_array_mut) else { return };
    let native: Vec<Value> = list
        .iter()
        .filter_map(|e| {
            let prefix = e.pointer("/match/prefix").and_then(Value::as_str)?.strip_prefix("wasmcustom.")?;
            let mut copy = e.clone();
            *copy.pointer_mut("/match/prefix")? = Value::String(format!("dynamicmodulescustom.{prefix}"));
            Some(copy)
        })
        .collect();
    list.extend(native);
}

fn add_runtime_flag(doc: &mut Value) {
    let Some(root) = doc.as_object_mut() else { return };
    let rt = root.entry("layered_runtime").or_insert_with(|| json!({"layers": []}));
    let Some(layers) = rt.as_object_mut().map(|o| o.entry("layers").or_insert_with(|| json!([]))).and_then(Value::as_array_mut) else { return };
    if let Some(s) = layers.iter_mut().find_map(|l| l.get_mut("static_layer").and_then(Value::as_object_mut)) {
        s.insert(STRIP_PREFIX.into(), Value::Bool(true));
    } else {
        layers.insert(0, json!({"name": "keyward-native", "static_layer": {STRIP_PREFIX: true}}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(file: &str) -> Value {
        json!({"name": "keyward", "typed_config": {"@type": WASM_TYPE, "config": {"root_id": "keyward", "vm_config": {"code": {"local": {"filename": file}}},
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"a\":1}"}}}})
    }

    #[test]
    fn rewrites_keyward_filters_only_and_adds_the_flag_to_a_bootstrap() {
        let mut doc = json!({"static_resources": {"listeners": [{"filters": [wasm("/etc/envoy/keyward.wasm"), wasm("/x/other.wasm")]}]}});
        assert_eq!(rewrite(&mut doc), 1);
        let f = &doc["static_resources"]["listeners"][0]["filters"];
        assert_eq!(f[0]["typed_config"]["@type"], MODULE_TYPE);
        assert_eq!(f[0]["typed_config"]["dynamic_module_config"]["name"], "keyward");
        assert_eq!(f[0]["typed_config"]["filter_config"]["value"], "{\"a\":1}");
        assert_eq!(f[1]["typed_config"]["@type"], WASM_TYPE, "another module stays");
        assert_eq!(doc["layered_runtime"]["layers"][0]["static_layer"][STRIP_PREFIX], true);
    }

    #[test]
    fn the_wasm_filters_histogram_buckets_apply_to_the_modules_stats() {
        let mut doc = json!({"stats_config": {"histogram_bucket_settings": [{"match": {"prefix": "wasmcustom.keyward_"}, "buckets": [1, 2]}]},
            "static_resources": {"listeners": [{"filters": [wasm("/etc/envoy/keyward.wasm")]}]}});
        rewrite(&mut doc);
        let list = doc["stats_config"]["histogram_bucket_settings"].as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1]["match"]["prefix"], "dynamicmodulescustom.keyward_");
        assert_eq!(list[1]["buckets"], json!([1, 2]));
    }

    #[test]
    fn fixed_environment_values_are_named() {
        let mut w = wasm("/etc/envoy/keyward.wasm");
        w["typed_config"]["config"]["vm_config"]["environment_variables"] = json!({"key_values": {"VAULT_TOKEN": "x"}});
        assert_eq!(fixed_environment(&json!({"f": [w]})), vec!["VAULT_TOKEN".to_string()]);
        assert!(fixed_environment(&json!({"f": [wasm("/etc/envoy/keyward.wasm")]})).is_empty());
    }

    #[test]
    fn an_ecds_subscription_accepts_the_native_module() {
        let mut doc = json!({"static_resources": {"listeners": [{"http_filters": [{"name": "keyward", "config_discovery": {
            "config_source": {"path_config_source": {"path": "/run/keyward/keyward-filter.json"}}, "type_urls": [WASM_TYPE]}}]}]}});
        assert_eq!(rewrite(&mut doc), 1);
        assert_eq!(doc["static_resources"]["listeners"][0]["http_filters"][0]["config_discovery"]["type_urls"][0], MODULE_TYPE);
        assert_eq!(doc["layered_runtime"]["layers"][0]["static_layer"][STRIP_PREFIX], true);
    }

    #[test]
    fn an_ecds_resource_and_the_test_module() {
        let mut doc = json!({"resources": [{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", "name": "keyward", "typed_config": wasm("dist/test/keyward-panic.wasm")["typed_config"]}]});
        assert_eq!(rewrite(&mut doc), 1);
        assert_eq!(doc["resources"][0]["typed_config"]["dynamic_module_config"]["name"], "keyward_panic");
        assert!(doc.get("layered_runtime").is_none(), "not a bootstrap");
    }
}
