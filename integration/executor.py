"""Which executor the integration suite runs: the wasm filter (`dist/keyward.wasm`) or the native
dynamic module (`dist/native/libkeyward.so`), chosen by KEYWARD_EXECUTOR (`make test` runs the
suite once with each).

Every Envoy the suite starts is described for the wasm filter, as the shipped configurations are;
for the native executor, `native()` has `keyward native-config` rewrite each keyward filter into
Envoy's dynamic-modules filter with the same JSON configuration (and the runtime flag that names
the module's metrics as the wasm filter's are named in Prometheus), and `stat_names()` reads
`/stats` back in the wasm filter's names, so one suite asserts the same behaviour of both."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATIVE_DIR = ROOT / "dist" / "native"
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


def native(bootstrap: dict) -> dict:
    """`bootstrap` with every keyward wasm filter as the native module: rewritten by the CLI's
    `keyward native-config`, as the image's entrypoint and `make run` rewrite the shipped files."""
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.json", Path(d) / "out.json"
        src.write_text(json.dumps(bootstrap))
        r = subprocess.run([str(ROOT / "target" / "release" / "keyward"), "native-config", str(src), "--out", str(out)],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"keyward native-config: {r.stderr}")
        return json.loads(out.read_text())


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
