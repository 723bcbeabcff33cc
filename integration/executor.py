"""Which executor the integration suite runs: the wasm filter (`dist/keyward.wasm`) or the native
dynamic module (`dist/native/libkeyward.so`), chosen by `--executor` (or KEYWARD_EXECUTOR).

Every Envoy the suite starts is described for the wasm filter, as the shipped configurations are;
for the native executor, `native()` rewrites each keyward filter into Envoy's dynamic-modules
filter with the same JSON configuration, turns on the runtime flag that names the module's
metrics as the wasm filter's are named in Prometheus, and `stat_names()` reads `/stats` back in
the wasm filter's names, so one suite asserts the same behaviour of both."""
import copy
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATIVE_DIR = ROOT / "dist" / "native"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
MODULE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
STRIP_PREFIX = "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix"
# The labels Keyward's metrics carry (keyward_core::record), to read Envoy's `name.label.value`.
LABELS = ("decision", "result", "outcome", "target", "code", "store", "phase", "op", "budget", "model", "kind")


def _native_environment():
    """What every process the suite starts needs for the native executor, in this process's
    environment so that children inherit it: the module's directory, and for the image's
    entrypoint (which rewrites configurations itself when KEYWARD_EXECUTOR=native) the CLI and a
    run directory."""
    import tempfile
    os.environ.setdefault("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", str(NATIVE_DIR))
    os.environ.setdefault("KEYWARD", str(ROOT / "target" / "release" / "keyward"))
    os.environ.setdefault("KEYWARD_RUN_DIR", tempfile.mkdtemp(prefix="keyward-run-"))


def current() -> str:
    return os.environ.get("KEYWARD_EXECUTOR", "wasm")


def is_native() -> bool:
    return current() == "native"


def module_name(wasm_file: str) -> str:
    """The module a wasm file stands for: the panic-test build has its own."""
    return "keyward_panic" if "panic" in Path(wasm_file).name else "keyward"


def native_filter(f: dict) -> dict:
    cfg = f["typed_config"]["config"]
    code = cfg["vm_config"]["code"]["local"]["filename"]
    out = {k: v for k, v in f.items() if k != "typed_config"}
    out["typed_config"] = {
        "@type": MODULE_TYPE,
        "dynamic_module_config": {"name": module_name(code), "do_not_close": True},
        "filter_name": "keyward",
        "filter_config": cfg.get("configuration", {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": ""}),
    }
    return out


def _walk(node, fn):
    if isinstance(node, dict):
        for k, v in list(node.items()):
            node[k] = _walk(v, fn)
        return fn(node)
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return node


def _is_keyward_wasm(node: dict) -> bool:
    tc = node.get("typed_config")
    if not isinstance(tc, dict) or tc.get("@type") != WASM_TYPE:
        return False
    code = tc.get("config", {}).get("vm_config", {}).get("code", {}).get("local", {}).get("filename", "")
    return "keyward" in Path(str(code)).name


def native(bootstrap: dict) -> dict:
    """`bootstrap` with every keyward wasm filter as the native module."""
    b = copy.deepcopy(bootstrap)
    b = _walk(b, lambda n: native_filter(n) if isinstance(n, dict) and _is_keyward_wasm(n) else n)
    rt = b.setdefault("layered_runtime", {}).setdefault("layers", [])
    static = next((l for l in rt if "static_layer" in l), None)
    if static is None:
        rt.insert(0, {"name": "static", "static_layer": {STRIP_PREFIX: True}})
    else:
        static["static_layer"][STRIP_PREFIX] = True
    return b


def env() -> dict:
    return {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(NATIVE_DIR)}


def prepare(bootstrap: dict, env_in: dict) -> tuple[dict, dict]:
    """The bootstrap and environment to run for the current executor."""
    if not is_native():
        return bootstrap, env_in
    e = dict(env_in)
    e.update(env())
    return native(bootstrap), e


_NAME = re.compile(r"^(keyward_[a-z0-9_]+?)((?:\.(?:%s)\..*)?)$" % "|".join(LABELS))


def stat_name(name: str) -> str:
    """A native stat's `/stats` name in the wasm filter's form:
    `keyward_requests_total.decision.allow` → `wasmcustom.keyward_requests_total;decision=allow`."""
    name = name.removeprefix("dynamicmodulescustom.")
    m = _NAME.match(name)
    if not m:
        return name
    base, rest = m.group(1), m.group(2)
    out = "wasmcustom." + base
    if rest:
        parts = re.split(r"\.(%s)\." % "|".join(LABELS), "." + rest[1:] if not rest.startswith(".") else rest)
        # parts: ['', label, value, label, value, ...]
        for i in range(1, len(parts) - 1, 2):
            out += f";{parts[i]}={parts[i + 1]}"
    return out


def stat_names(stats: dict) -> dict:
    if not is_native():
        return stats
    return {stat_name(k): v for k, v in stats.items()}


if is_native():
    _native_environment()
