#!/usr/bin/env python3
"""`make bench`: what Keyward adds to every request, against bare Envoy and Envoy's native filters,
measured in one run on this machine.

Arms (identical connection manager settings and access-log format; only the HTTP filters differ):
  A  bare routing (router only)
  B  a no-op proxy-wasm filter (bench/noop)
  C  Keyward, cache warm, a credential rotated per request over 100 distinct valid tokens
  D  Envoy's native stack doing comparable work: jwt_authn (HS256, local JWKS), rbac (method and
     path), credential_injector (a generic secret)
  N  Keyward's native executor (dist/native/libkeyward.so, Envoy's dynamic-modules filter): arm C's
     configuration and load; its CPU is the worker's plus the module's tick thread's
  M  arm N with the native module built with stream hooks that do nothing (dist/bench/native-noop):
     what any dynamic module costs, the floor under N

Each arm is its own Envoy (--concurrency 1) pinned to core 0. The load generator (open loop at a
fixed rate, bench/loadgen) and a direct-response upstream Envoy share core 1. Arms are interleaved
in rounds (the order rotates each round); warm-up rounds are discarded. CPU per request is the
delta of the Envoy worker thread's CPU time (/proc/<pid>/task/<tid>/schedstat) over the delta of
downstream_rq_completed; each figure is the median over rounds of the per-round ratio.

Then the cost of a target priced from its body (spend caps): arm F is Keyward with a second target,
`pay`, whose cost is a form field read from the body (its route has Envoy's buffer filter, as the
shipped configurations do), and every credential carries `lim.spend`, so each payment is read,
priced and reserved in shared data. For each body size, F answers POSTed payments and bare Envoy
(A) the same POSTs, in alternating rounds; the table shows CPU per request and the difference.

Then how the cost grows with the work (the scaling table): one dimension at a time, the others as
in arm C (100 credentials of one rule, one target, no revocation list): live credentials (1, 100,
10,000: beyond the 512 verified credentials a worker remembers), rules per credential (1, 10, 50, the
matching one last), targets in the configuration (5, 100, 1,000) and revocation entries (none, and a
list of 10,000). Each row is its own Envoy, measured in rounds alternating with bare Envoy (A); the
row's figure is the median per-round ratio to bare, times the main run's bare CPU per request.

Writes bench/results/latest.json and prints a markdown table.
Environment: BENCH_RATE (1500 rps), BENCH_SECONDS (8 per arm per round), BENCH_ROUNDS (8),
BENCH_WARMUP (2), BENCH_COLD_SAMPLES (41), BENCH_PRICED_ROUNDS (3), BENCH_BODY_SIZES (100,4096,32768),
BENCH_SCALING_ROUNDS (2), BENCH_SCALING_SECONDS (5); BENCH_ONLY=scaling runs the scaling table alone.

Ablation (where the warm path's cost goes): builds of the module that each skip one kind of hostcall
(dist/bench/ablate-*.wasm: no filter-state writes; no response-header read; no metrics; all three;
and `onekey`, the proposed shape: the access-log fields as one filter-state key) run like arm C in
rounds alternating with it; each row is what the skipped work costs per request.
BENCH_ABLATION_ROUNDS (4); BENCH_ONLY=ablation runs it alone.

Fleet ledger (bench/fleet.py): a limited credential's warm request per instance and with a live
slice, the latency of a slice grant and of a direct reservation, and ledger calls per 1,000
requests through 1 and 3 gateways, against dynalite. BENCH_ONLY=fleet runs it alone.

Model calls (bench/models.py): the CPU a target priced from token usage adds per call, whole JSON
and streamed (one event per token, chunked), against an unpriced target in the same Envoy, with
scripts/model_vendor.py as the vendor. BENCH_ONLY=models runs it alone.

Cold miss: each sample is the first use of its own secret between hot requests (see cold_miss).
Memory: bare, no-op and Keyward at --concurrency 1 and 3, RSS and Envoy's /memory (see memory).
BENCH_ONLY=cold, BENCH_ONLY=memory run one of them alone; BENCH_ONLY=warm runs the main arms alone and
prints their figures (nothing is written). Instruction counts: bench/icount.py.
"""
import base64
import http.client
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))
import harness  # noqa: E402  (Bao, free_port, mint, wait_until)
import executor  # noqa: E402  (the native module's bootstrap from the wasm one)

ENVOY = ROOT / ".venv" / "bin" / "envoy"
LOADGEN = ROOT / "target" / "release" / "keyward-loadgen"
KEYWARD_WASM = ROOT / "dist" / "keyward.wasm"
KEYWARD_NATIVE = ROOT / "dist" / "native" / "libkeyward.so"
NOOP_WASM = ROOT / "dist" / "bench" / "noop.wasm"
RESULTS = ROOT / "bench" / "results"

RATE = float(os.environ.get("BENCH_RATE", 1500))
SECONDS = float(os.environ.get("BENCH_SECONDS", 8))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 8))
WARMUP = int(os.environ.get("BENCH_WARMUP", 2))
COLD_SAMPLES = int(os.environ.get("BENCH_COLD_SAMPLES", 41))
PRICED_ROUNDS = int(os.environ.get("BENCH_PRICED_ROUNDS", 3))
SCALING_ROUNDS = int(os.environ.get("BENCH_SCALING_ROUNDS", 2))
SCALING_SECONDS = float(os.environ.get("BENCH_SCALING_SECONDS", 5))
ABLATION_ROUNDS = int(os.environ.get("BENCH_ABLATION_ROUNDS", 4))
ABLATIONS = {"audit": "filter-state writes (the access-log keys)", "scrub": "reading the response headers (scrubbing)",
             "metrics": "counters, histograms and their clock reads", "all": "all three",
             "onekey": "the proposed shape: the access-log fields as one filter-state key instead of one each"}
ONLY = os.environ.get("BENCH_ONLY", "")
BODY_SIZES = [int(x) for x in os.environ.get("BENCH_BODY_SIZES", "100,4096,32768").split(",")]
TOKENS = 100
ARMS = {"A": "bare", "B": "noop", "C": "keyward", "D": "native", "N": "keyward_native", "M": "noop_native"}
# Arm M's module: the native module's bench-noop build.
NOOP_NATIVE_DIR = ROOT / "dist" / "bench" / "native-noop"
# BENCH_BASELINE_WASM=path: a fifth arm, E, runs that build of keyward.wasm (an earlier commit) in
# the same rounds, for before/after figures measured in one run.
BASELINE_WASM = os.environ.get("BENCH_BASELINE_WASM")
if BASELINE_WASM:
    ARMS["E"] = "keyward_baseline"
ACCESS_LOG_KEYS = ["subject", "target", "jti", "run", "decision", "cache", "secret_version"]

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "suppress_envoy_headers": True}}


def cluster(name, port):
    return {"name": name, "connect_timeout": "1s", "type": "STATIC",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def wasm_filter(name, path, vm_id, config, env_keys=()):
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": name, "root_id": name, "fail_open": False,
                   "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(path)}},
                                 "environment_variables": {"host_env_keys": list(env_keys)}},
                   "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": config}}}}


def native_filters(key: bytes, upstream_secret_name):
    jwks = {"keys": [{"kty": "oct", "alg": "HS256", "kid": "k1", "k": base64.urlsafe_b64encode(key).rstrip(b"=").decode()}]}
    return [
        {"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"keyward": {"audiences": ["keyward"], "local_jwks": {"inline_string": json.dumps(jwks)},
                                      "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
                                      "forward": False, "payload_in_metadata": "jwt_payload"}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "keyward"}}]}},
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"vendor-get-v1": {
                "permissions": [{"and_rules": {"rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                    {"url_path": {"path": {"prefix": "/v/v1/"}}}]}}],
                "principals": [{"any": True}]}}}}},
        {"name": "envoy.filters.http.credential_injector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                "credential": {"name": upstream_secret_name}, "header": "Authorization"}}}},
    ]


def access_log_fields(arm):
    """Who called what, in every arm's access log: Keyward's filter-state keys; for the native arm
    (which must record the caller too, to do the same job) jwt_authn's payload and the route."""
    fields = {k: f"%FILTER_STATE(wasm.keyward.{k}:PLAIN)%" for k in ACCESS_LOG_KEYS}
    if arm == "D":
        jwt = "envoy.filters.http.jwt_authn:jwt_payload"
        fields.update({"subject": f"%DYNAMIC_METADATA({jwt}:sub)%", "jti": f"%DYNAMIC_METADATA({jwt}:jti)%",
                       "target": "%ROUTE_NAME%", "decision": "%RESPONSE_CODE_DETAILS%"})
    return fields


def keyward_config(ttl_s=300, extra_targets=0, revocation=False):
    vendor = {"credential": "bearer", "secret": {"store": "bao", "path": "bench/vendor", "field": "api_key"},
              "inject": {"type": "bearer"}, "allow": ["GET /v1/**"]}
    cfg = {
        "audience": "keyward", "clock_skew_s": 30, "max_token_lifetime_s": 86400,
        "signing_keys": {"k1": {"env": "KEYWARD_KEY_K1"}},
        "stores": {"bao": {"type": "vault_kv2", "cluster": "vault", "authority": "vault.bench", "token_env": "VAULT_TOKEN",
                           "timeout_ms": 2000}},
        "cache": {"ttl_s": ttl_s, "stale_if_error_s": 0},
        "targets": {"vendor": vendor, **{f"t{i}": {**vendor, "secret": {**vendor["secret"], "path": f"bench/t{i}"}}
                                         for i in range(extra_targets)}},
    }
    if revocation:
        cfg["revocation"] = {"store": "bao", "path": "bench/revoked", "refresh_s": 5}
    return json.dumps(cfg)


def keyward_priced_config():
    cfg = json.loads(keyward_config())
    cfg["targets"]["pay"] = {"credential": "bearer", "secret": {"store": "bao", "path": "bench/vendor", "field": "api_key"},
                             "inject": {"type": "bearer"},
                             "cost": {"form_field": "amount", "currency_field": "currency", "currencies": ["usd"], "max_body_bytes": 65536},
                             "refund_on": [402]}
    return json.dumps(cfg)


BUFFER = "envoy.filters.http.buffer"
BUFFER_FILTER = {"name": BUFFER, "disabled": True, "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 65536}}


def bootstrap(arm, ports, workdir, ctx):
    if arm in ("N", "M"):
        b = executor.native(bootstrap("C", ports, workdir, ctx))
        hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"][0]["typed_config"]["path"] = str(workdir / f"access-{arm}.log")
        return b
    filters = {
        "A": [],
        "B": [wasm_filter("noop", NOOP_WASM, "noop", "")],
        "C": [wasm_filter("keyward", KEYWARD_WASM, "keyward", ctx["keyward_config"], ["KEYWARD_KEY_K1", "VAULT_TOKEN"])],
        "D": native_filters(ctx["key"], "upstream-key"),
        "E": [wasm_filter("keyward", Path(BASELINE_WASM or "-").resolve(), "keyward", ctx["keyward_config"], ["KEYWARD_KEY_K1", "VAULT_TOKEN"])],
        "F": [wasm_filter("keyward", KEYWARD_WASM, "keyward", ctx.get("priced_config", ""), ["KEYWARD_KEY_K1", "VAULT_TOKEN"]), BUFFER_FILTER],
    }[arm]
    routes = [{"name": "vendor", "match": {"prefix": "/v/"},
               "route": {"cluster": "upstream", "prefix_rewrite": "/", "host_rewrite_literal": "vendor.bench"},
               "metadata": {"filter_metadata": {"keyward": {"target": "vendor", "prefix": "/v"}}}}]
    if arm == "F":
        routes.append({"name": "pay", "match": {"prefix": "/p/"},
                       "route": {"cluster": "upstream", "prefix_rewrite": "/", "host_rewrite_literal": "vendor.bench"},
                       "typed_per_filter_config": {BUFFER: {
                           "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                           "config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
                                      "buffer": {"max_request_bytes": 65536}}}},
                       "metadata": {"filter_metadata": {"keyward": {"target": "pay", "prefix": "/p"}}}})
    hcm = {
        "@type": HCM, "stat_prefix": "bench",
        "normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "max_request_headers_kb": 32, "request_headers_timeout": "10s", "request_timeout": "60s",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST", "max_headers_count": 64,
                                         "idle_timeout": "300s"},
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(workdir / f"access-{arm}.log"),
            "log_format": {"json_format": {
                "method": "%REQ(:METHOD)%", "path": "%PATH(NQ:PATH)%", "status": "%RESPONSE_CODE%", "duration_ms": "%DURATION%",
                **access_log_fields(arm)}}}}],
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": filters + [ROUTER],
    }
    b = {
        "node": {"id": f"bench-{arm}", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports["admin"]}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports["listen"]}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": [cluster("upstream", ctx["upstream_port"]), cluster("vault", ctx["bao_port"])],
        },
    }
    if arm == "D":
        b["static_resources"]["secrets"] = [{"name": "upstream-key", "generic_secret": {"secret": {"inline_string": f"Bearer {ctx['vendor_key']}"}}}]
    return b


def admin_stat(admin, name, timeout=5):
    """One counter or gauge from an Envoy's admin /stats (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^{name}$", timeout=timeout) as r:
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
    return 0


def arm_c_tokens(key, workdir):
    """Arm C's TOKENS distinct valid credentials, and the file the load generator rotates through."""
    now = int(time.time())
    tokens = [harness.mint(key, {"sub": f"lambda/bench-{i}", "aud": "keyward", "iat": now, "exp": now + 3600,
                                 "jti": secrets.token_hex(8), "allow": ["vendor GET /v1/**"]}) for i in range(TOKENS)]
    path = workdir / "tokens.txt"
    path.write_text("\n".join(tokens) + "\n")
    return tokens, path


def upstream_bootstrap(port, admin):
    hcm = {"@type": HCM, "stat_prefix": "up",
           "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "{\"ok\":true}"}}}]}]},
           "http_filters": [ROUTER]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [{"name": "up", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                                                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                                                "typed_config": hcm}]}]}]}}


class Proc:
    def __init__(self, name, bootstrap, workdir, core, env=None, concurrency=1):
        self.name = name
        self.admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        cfg = workdir / f"{name}.json"
        cfg.write_text(json.dumps(bootstrap))
        self.log = open(workdir / f"{name}.log", "wb")
        full_env = {**os.environ, **executor.env(), **(env or {})}
        self.proc = subprocess.Popen(["taskset", "-c", str(core), str(ENVOY), "-c", str(cfg), "--concurrency", str(concurrency),
                                      "--log-level", "warn", "--base-id", str(harness.free_port()), "--disable-hot-restart"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        harness.wait_until(self.ready, timeout=60, what=f"{name} ready")

    def ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: see {self.log.name}")
        return urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1).status == 200

    def stat(self, name):
        time.sleep(0.25)  # the filter hands its counters to Envoy on its 200 ms tick
        v = admin_stat(self.admin, name)
        if v == 0 and name.startswith("wasmcustom.keyward_"):
            # The native module's name for it (`name.label.value`, Envoy's dynamic-module stats).
            base = name.removeprefix("wasmcustom.")
            v = admin_stat(self.admin, "dynamicmodulescustom." + base.replace(";", ".").replace("=", "."))
        return v

    def histogram_p50s(self):
        """The median of every keyward histogram (interpolated in its bucket), by stat name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?format=json&filter=keyward_.*_microseconds", timeout=5) as r:
            d = json.loads(r.read())
        out = {}
        for s in d.get("stats", []):
            h = s.get("histograms")
            if not h:
                continue
            i = h["supported_quantiles"].index(50)
            for q in h["computed_quantiles"]:
                v = q["values"][i]["cumulative"]
                if v is not None:
                    name = q["name"].removeprefix("wasmcustom.").removeprefix("dynamicmodulescustom.")
                    out[executor.stat_name(name).removeprefix("wasmcustom.")] = round(v, 1)
        return out

    def worker_cpu_ns(self):
        """CPU time of the Envoy worker thread (wrk:worker_0), from schedstat, plus the native
        module's tick thread (keyward-ticker) where there is one: work the module does off the worker."""
        total, found = 0, False
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
                if comm.startswith("wrk:worker") or comm.startswith("keyward-ticker"):
                    total += int((task / "schedstat").read_text().split()[0])
                    found = found or comm.startswith("wrk:worker")
            except OSError:
                continue
        if not found:
            raise RuntimeError(f"{self.name}: no worker thread")
        return total

    def rss_kb(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def memory(self):
        """Envoy's allocator (tcmalloc) figures from /memory, in KiB. V8 keeps each VM's linear memory
        outside it (mmap), so RSS minus `allocated` minus the allocator's free lists is mostly that."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/memory", timeout=5) as r:
            d = json.loads(r.read())
        return {k: int(d.get(k, 0)) // 1024 for k in ("allocated", "heap_size", "pageheap_unmapped", "pageheap_free", "total_thread_cache")}

    def stop(self):
        harness.stop_process(self.proc, 10)
        self.log.close()


def load(port, tokens_file, seconds, rate, path="/v/v1/items", body_bytes=None):
    extra = ["--body-bytes", str(body_bytes)] if body_bytes is not None else []
    out = subprocess.run(["taskset", "-c", "1", str(LOADGEN), "--addr", f"127.0.0.1:{port}", "--path", path,
                          "--rate", str(rate), "--seconds", str(seconds), "--connections", "16", "--tokens", str(tokens_file), *extra],
                         capture_output=True, text=True, timeout=seconds * 3 + 30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def load_json(port, tokens_file, seconds, rate, path, body_file):
    """Load with a JSON body (a model call) from a file."""
    out = subprocess.run(["taskset", "-c", "1", str(LOADGEN), "--addr", f"127.0.0.1:{port}", "--path", path, "--rate", str(rate),
                          "--seconds", str(seconds), "--connections", "16", "--tokens", str(tokens_file), "--json-body", str(body_file)],
                         capture_output=True, text=True, timeout=seconds * 3 + 30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def median(xs):
    return statistics.median(xs) if xs else None


def cold_miss(workdir, ctx, bao, arm="C"):
    """Latency a cold miss adds, beyond the vault's own time for the read (arm C: this build; arm
    E: the baseline build). Each sample is the first use of its own secret (target c<i>, path
    bench/c<i>), between hot neighbours: a vault read (which also wakes OpenBao), a warm request,
    the cold request, a warm request again, and the vault read that is the sample's vault time.
    The warm request after a quiet spell of 0.3 s is reported too: every request after a quiet
    spell is slower on this machine (an idle CPU), Keyward or not, so the cold figure is taken
    between hot requests and not after a wait."""
    n = COLD_SAMPLES
    for i in range(n):
        bao.put(f"bench/c{i}", {"api_key": f"sk_bench_cold_{i}"})
    cfg = json.loads(keyward_config())
    vendor = cfg["targets"]["vendor"]
    cfg["targets"].update({f"c{i}": {**vendor, "secret": {**vendor["secret"], "path": f"bench/c{i}"}} for i in range(n)})
    now = int(time.time())
    token = harness.mint(ctx["key"], {"sub": "lambda/cold", "aud": "keyward", "iat": now, "exp": now + 3600, "jti": "cold-1",
                                      "allow": ["vendor GET /v1/**"] + [f"c{i} GET /v1/**" for i in range(n)]})
    ports = {"admin": harness.free_port(), "listen": harness.free_port()}
    b = bootstrap(arm, ports, workdir, {**ctx, "keyward_config": json.dumps(cfg)})
    routes = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    routes[:0] = [{"name": f"c{i}", "match": {"prefix": f"/c{i}/"},
                   "route": {"cluster": "upstream", "prefix_rewrite": "/", "host_rewrite_literal": "vendor.bench"},
                   "metadata": {"filter_metadata": {"keyward": {"target": f"c{i}", "prefix": f"/c{i}"}}}} for i in range(n)]
    # Fine histogram buckets (µs) for the filter's own timings, flushed every second.
    b["stats_flush_interval"] = "1s"
    b["stats_config"] = {"histogram_bucket_settings": [{"match": {"safe_regex": {"regex": "^(wasmcustom|dynamicmodulescustom)[.]keyward_.*"}}, "buckets": [
        5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100, 120, 140, 160, 180, 200, 250, 300, 350, 400, 500, 600, 700,
        800, 900, 1000, 1100, 1200, 1300, 1400, 1500, 1700, 2000, 2500, 3000, 4000, 5000, 10000]}]}
    e = Proc(f"cold-{arm}", b, workdir, 0, ctx["env"])
    try:
        gw = http.client.HTTPConnection("127.0.0.1", ports["listen"], timeout=10)
        vault = http.client.HTTPConnection("127.0.0.1", ctx["bao_port"], timeout=10)
        auth = {"Authorization": f"Bearer {token}"}

        def timed(conn, path, headers):
            t0 = time.perf_counter()
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            return (time.perf_counter() - t0) * 1e6, r.status
        timed(gw, "/v/v1/items", auth)
        idle, totals, warm, vaults = [], [], [], []
        for i in range(n):
            time.sleep(0.3)
            vpath = f"/v1/secret/data/bench/c{i}"
            timed(vault, vpath, {"X-Vault-Token": bao.token})
            idle.append(timed(gw, "/v/v1/items", auth)[0])
            t, status = timed(gw, f"/c{i}/v1/items", auth)
            assert status == 200, status
            totals.append(t)
            warm.append(timed(gw, "/v/v1/items", auth)[0])
            vaults.append(timed(vault, vpath, {"X-Vault-Token": bao.token})[0])
        misses = e.stat("wasmcustom.keyward_cache_lookups_total;outcome=miss")
        time.sleep(1.5)  # the histograms' flush
        return {"samples": n, "cache_misses_counted": misses,
                "cold_request_p50_us": median(totals), "warm_request_p50_us": median(warm),
                "warm_request_after_quiet_0_3s_p50_us": median(idle),
                "vault_read_p50_us": median(vaults),
                "cold_minus_vault_p50_us": median([t - v for t, v in zip(totals, vaults)]),
                "cold_minus_warm_minus_vault_p50_us": median([t - w - v for t, w, v in zip(totals, warm, vaults)]),
                "filter_p50_us": e.histogram_p50s()}
    finally:
        e.stop()


def priced(workdir, ctx, bare):
    """CPU per request of payments priced from their body (arm F), against bare Envoy (arm A, the
    same POSTs), per body size; alternating rounds, medians of per-round figures."""
    ports = {"admin": harness.free_port(), "listen": harness.free_port()}
    f = Proc("arm-F", bootstrap("F", ports, workdir, ctx), workdir, 0, ctx["env"])
    f.port = ports["listen"]
    try:
        # Every payment must be priced and reserved: 200, and the reservations counted.
        probe = load(f.port, ctx["priced_tokens_file"], 1, 200, "/p/v1/payment_intents", 100)
        assert probe["ok"] == probe["requests"], probe
        assert load(f.port, ctx["no_spend_file"], 0.5, 20, "/p/v1/payment_intents", 100)["ok"] == 0, "a payment the cap refuses was forwarded"
        rows = []
        for size in BODY_SIZES:
            fig = {"F": [], "A": [], "F_get": []}
            for rnd in range(PRICED_ROUNDS + 1):
                for arm, p, path, body in (("F", f, "/p/v1/payment_intents", size), ("A", bare, "/v/v1/items", size), ("F_get", f, "/v/v1/items", None)):
                    cpu0, rq0 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                    res = load(p.port, ctx["priced_tokens_file"], SECONDS, RATE, path, body)
                    time.sleep(0.3)
                    cpu1, rq1 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                    if rnd == 0:
                        continue  # warm-up
                    assert res["ok"] == res["requests"], (arm, size, res)
                    fig[arm].append((cpu1 - cpu0) / 1000 / max(1, rq1 - rq0))
            reserved = f.stat("wasmcustom.keyward_spend_reserved_total;target=pay")
            row = {"body_bytes": size, "priced_cpu_us_per_request": round(median(fig["F"]), 2),
                   "bare_cpu_us_per_request": round(median(fig["A"]), 2),
                   "priced_minus_bare_us": round(median([x - y for x, y in zip(fig["F"], fig["A"])]), 2),
                   "unpriced_get_same_envoy_cpu_us_per_request": round(median(fig["F_get"]), 2),
                   "reserved_so_far": reserved}
            rows.append(row)
            print(f"priced body {size} B: keyward {row['priced_cpu_us_per_request']} µs, bare {row['bare_cpu_us_per_request']} µs, "
                  f"+{row['priced_minus_bare_us']} µs", flush=True)
        return {"rounds": PRICED_ROUNDS, "rows": rows,
                "note": "POSTed form payments to a target priced from the body (buffer filter on its route, lim.spend on every "
                        "credential, so each one is read, priced and reserved with compare-and-swap in shared data) vs the same "
                        "POSTs through bare Envoy"}
    finally:
        f.stop()


def scaling(workdir, ctx, bare, bare_cpu):
    """CPU per request as one dimension grows, the others as in arm C."""
    key, now = ctx["key"], int(time.time())

    def tokens(n, rules=1):
        allow = [f"vendor GET /v2/r{i}/**" for i in range(rules - 1)] + ["vendor GET /v1/**"]
        path = workdir / f"tokens-{n}-{rules}.txt"
        path.write_text("\n".join(harness.mint(key, {"sub": f"lambda/s-{i}", "aud": "keyward", "iat": now, "exp": now + 3600,
                                                     "jti": f"{n}-{rules}-{i}", "allow": allow}) for i in range(n)) + "\n")
        return path
    rows = [
        ("live credentials", 1, keyward_config(), tokens(1)),
        ("live credentials", 100, keyward_config(), tokens(100)),
        ("live credentials", 10000, keyward_config(), tokens(10000)),
        ("rules per credential", 1, keyward_config(), tokens(100)),
        ("rules per credential", 10, keyward_config(), tokens(100, 10)),
        ("rules per credential", 50, keyward_config(), tokens(100, 50)),
        ("targets", 5, keyward_config(extra_targets=4), tokens(100)),
        ("targets", 100, keyward_config(extra_targets=99), tokens(100)),
        ("targets", 1000, keyward_config(extra_targets=999), tokens(100)),
        ("revocation entries", 0, keyward_config(), tokens(100)),
        ("revocation entries", 10000, keyward_config(revocation=True), tokens(100)),
    ]
    out = []
    for dim, n, cfg, tfile in rows:
        ports = {"admin": harness.free_port(), "listen": harness.free_port()}
        p = Proc(f"scale-{dim.split()[0]}-{n}", bootstrap("C", ports, workdir, {**ctx, "keyward_config": cfg}), workdir, 0, ctx["env"])
        p.port = ports["listen"]
        try:
            probe = load(p.port, tfile, 1, 200)
            assert probe["ok"] == probe["requests"], (dim, n, probe)
            ratios, cpus = [], []
            for rnd in range(SCALING_ROUNDS + 1):
                fig = {}
                for name, proc, tf in (("k", p, tfile), ("a", bare, tfile)):
                    cpu0, rq0 = proc.worker_cpu_ns(), proc.stat("http.bench.downstream_rq_completed")
                    res = load(proc.port, tf, SCALING_SECONDS, RATE)
                    time.sleep(0.3)
                    cpu1, rq1 = proc.worker_cpu_ns(), proc.stat("http.bench.downstream_rq_completed")
                    assert res["ok"] == res["requests"], (dim, n, name, res)
                    fig[name] = (cpu1 - cpu0) / 1000 / max(1, rq1 - rq0)
                if rnd == 0:
                    continue  # warm-up (a new Envoy; 10,000 credentials verified for the first time)
                ratios.append(fig["k"] / fig["a"])
                cpus.append(fig["k"])
            row = {"dimension": dim, "value": n, "keyward_over_bare": round(median(ratios), 3),
                   "cpu_us_per_request": round(median(cpus), 1),
                   "cpu_us_per_request_at_main_bare": round(median(ratios) * bare_cpu, 1),
                   "rss_kb": p.rss_kb(), "wasm_linear_memory_kb": p.stat("wasmcustom.keyward_wasm_memory_bytes") // 1024}
            out.append(row)
            print(f"scaling {dim} = {n}: {row['keyward_over_bare']}x bare ({row['cpu_us_per_request']} µs), "
                  f"linear memory {row['wasm_linear_memory_kb']} KiB", flush=True)
        finally:
            p.stop()
    return {"rounds": SCALING_ROUNDS, "seconds": SCALING_SECONDS, "rows": out}


def memory(workdir, ctx):
    """Where Keyward's memory goes: bare Envoy (A), the no-op module (B) and Keyward (C), each at
    --concurrency 1 and 3 (one VM per worker plus the main thread's: 2 and 4 VMs), after a second
    of traffic. What grows with the VM count is per VM; what does not is fixed per Envoy process."""
    runs = {}
    for conc in (1, 3):
        for arm in ("A", "B", "C", "N"):
            ports = {"admin": harness.free_port(), "listen": harness.free_port()}
            p = Proc(f"mem-{arm}-{conc}", bootstrap(arm, ports, workdir, ctx), workdir, 0, ctx["env"], concurrency=conc)
            try:
                configured = p.stat("wasmcustom.keyward_wasm_memory_bytes") // 1024 if arm == "C" else None
                load(ports["listen"], ctx["tokens_file"], 1, 400)
                time.sleep(0.5)
                runs[(arm, conc)] = {"rss_kb": p.rss_kb(), **p.memory(),
                                     **({"wasm_linear_memory_after_configure_kb": configured,
                                         "wasm_linear_memory_after_traffic_kb": p.stat("wasmcustom.keyward_wasm_memory_bytes") // 1024}
                                        if arm == "C" else {})}
            finally:
                p.stop()

    def per_vm(arm, k="rss_kb"):
        return (runs[(arm, 3)][k] - runs[(arm, 1)][k]) / 2
    c1, b1 = runs[("C", 1)], runs[("B", 1)]
    over_noop_per_vm = per_vm("C") - per_vm("B")
    out = {
        "runs": [{"arm": ARMS[a], "concurrency": n, **({"vms": n + 1} if a in ("B", "C") else {}), **v} for (a, n), v in runs.items()],
        "per_vm_rss_kb": {ARMS[a]: round(per_vm(a)) for a in ("A", "B", "C")},
        "keyward_over_noop_per_vm_kb": round(over_noop_per_vm),
        "keyward_over_noop_fixed_kb": round((c1["rss_kb"] - b1["rss_kb"]) - 2 * over_noop_per_vm),
        "keyward_over_noop_allocated_kb": c1["allocated"] - b1["allocated"],
        "keyward_over_noop_allocator_free_kb": (c1["pageheap_free"] + c1["total_thread_cache"]) - (b1["pageheap_free"] + b1["total_thread_cache"]),
        "module_bytes": KEYWARD_WASM.stat().st_size,
        # The native executor has no VM: what it adds to an Envoy process, at each concurrency.
        "keyward_native_over_bare_kb": {str(n): runs[("N", n)]["rss_kb"] - runs[("A", n)]["rss_kb"] for n in (1, 3)},
        "keyward_native_over_bare_allocated_kb": {str(n): runs[("N", n)]["allocated"] - runs[("A", n)]["allocated"] for n in (1, 3)},
        "wasm_linear_memory_after_configure_kb": c1["wasm_linear_memory_after_configure_kb"],
        "wasm_linear_memory_after_traffic_kb": c1["wasm_linear_memory_after_traffic_kb"],
        "note": "RSS after 1 s of traffic; per VM = (RSS at concurrency 3 - RSS at concurrency 1) / 2. allocated, "
                "pageheap_free and total_thread_cache are Envoy's /memory (tcmalloc); V8 maps each VM's linear memory "
                "outside it. Caches at their bounds: the scaling rows' wasm_linear_memory_kb (10,000 credentials, "
                "10,000 revocations)",
    }
    print(f"memory: per VM bare {out['per_vm_rss_kb']['bare']} KiB, noop {out['per_vm_rss_kb']['noop']} KiB, keyward "
          f"{out['per_vm_rss_kb']['keyward']} KiB; keyward over noop {over_noop_per_vm:.0f} KiB/VM + {out['keyward_over_noop_fixed_kb']} KiB "
          f"fixed; native module over bare {out['keyward_native_over_bare_kb']} KiB", flush=True)
    return out


def ablation(workdir, ctx, keyward):
    """What each kind of hostcall costs on the warm path: arm C against builds that skip it."""
    procs = {}
    try:
        for name in ABLATIONS:
            ports = {"admin": harness.free_port(), "listen": harness.free_port()}
            b = bootstrap("C", ports, workdir, ctx)
            b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0][
                "typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(ROOT / "dist" / "bench" / f"ablate-{name}.wasm")
            p = Proc(f"ablate-{name}", b, workdir, 0, ctx["env"])
            p.port = ports["listen"]
            procs[name] = p
            probe = load(p.port, ctx["tokens_file"], 1, 200)
            assert probe["ok"] == probe["requests"], (name, probe)
        saved = {n: [] for n in ABLATIONS}
        for rnd in range(ABLATION_ROUNDS + 1):
            fig = {}
            for name, p in [("C", keyward)] + list(procs.items()):
                cpu0, rq0 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                load(p.port, ctx["tokens_file"], SCALING_SECONDS, RATE)
                time.sleep(0.3)
                cpu1, rq1 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                fig[name] = (cpu1 - cpu0) / 1000 / max(1, rq1 - rq0)
            if rnd == 0:
                continue
            for n in ABLATIONS:
                saved[n].append(fig["C"] - fig[n])
            print(f"ablation round {rnd}: C {fig['C']:.1f}us, " + ", ".join(f"{n} {fig[n]:.1f}us" for n in ABLATIONS), flush=True)
        return {"rounds": ABLATION_ROUNDS, "rows": [{"skipped": n, "what": ABLATIONS[n], "saves_us_per_request": round(median(saved[n]), 1)}
                                                     for n in ABLATIONS]}
    finally:
        for p in procs.values():
            p.stop()


def main():
    for p in (ENVOY, LOADGEN, KEYWARD_WASM, KEYWARD_NATIVE, NOOP_WASM):
        if not p.exists():
            sys.exit(f"{p} is missing: run make bench (it builds everything first)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("make bench needs two cores (Envoy on one, load on the other)")
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-"))
    key = secrets.token_bytes(32)
    vendor_key = "sk_bench_" + secrets.token_hex(12)
    bao = harness.Bao(workdir, name="bao-bench")
    procs = []
    try:
        bao.put("bench/vendor", {"api_key": vendor_key})
        # 10,000 live entries in the compact form `keyward revoke` writes (OpenBao refuses 10,000 keys).
        bao.put("bench/revoked", {"format": "keyward-revocations/2", "entries": "".join(
            f"jti:revoked-{i:05d}\t{int(time.time()) + 7200}\tbench\n" for i in range(10000))})
        now = int(time.time())
        tokens, tokens_file = arm_c_tokens(key, workdir)
        priced_tokens = [harness.mint(key, {"sub": f"lambda/pay-{i}", "aud": "keyward", "iat": now, "exp": now + 3600,
                                            "jti": secrets.token_hex(8), "allow": ["vendor GET /v1/**", "pay POST /v1/payment_intents"],
                                            "lim": {"spend": 10 ** 15}}) for i in range(TOKENS)]
        priced_tokens_file = workdir / "priced-tokens.txt"
        priced_tokens_file.write_text("\n".join(priced_tokens) + "\n")
        no_spend_file = workdir / "no-spend.txt"
        no_spend_file.write_text(harness.mint(key, {"sub": "lambda/broke", "aud": "keyward", "iat": now, "exp": now + 3600, "jti": "broke",
                                                    "allow": ["pay POST /**"], "lim": {"spend": 0}}) + "\n")
        env = {"KEYWARD_KEY_K1": base64.b64encode(key).decode(), "VAULT_TOKEN": bao.token}
        up_port = harness.free_port()
        procs.append(Proc("upstream", upstream_bootstrap(up_port, harness.free_port()), workdir, 1))
        ctx = {"key": key, "vendor_key": vendor_key, "upstream_port": up_port, "bao_port": bao.port, "tokens_file": tokens_file,
               "keyward_config": keyward_config(), "env": env, "tokens": tokens, "priced_config": keyward_priced_config(),
               "priced_tokens_file": priced_tokens_file, "no_spend_file": no_spend_file}
        if ONLY == "ablation":
            ports = {"admin": harness.free_port(), "listen": harness.free_port()}
            kw = Proc("arm-C", bootstrap("C", ports, workdir, ctx), workdir, 0, env)
            kw.port = ports["listen"]
            procs.append(kw)
            print(json.dumps(ablation(workdir, ctx, kw), indent=1))
            return
        if ONLY == "cold":
            print(json.dumps(cold_miss(workdir, ctx, bao), indent=1))
            print(json.dumps(cold_miss(workdir, ctx, bao, "N"), indent=1))
            if BASELINE_WASM:
                print(json.dumps(cold_miss(workdir, ctx, bao, "E"), indent=1))
            return
        if ONLY == "fleet":
            import fleet
            print(json.dumps(fleet.run(workdir, ctx), indent=1))
            return
        if ONLY == "models":
            import models
            print(json.dumps(models.run(workdir, ctx), indent=1))
            return
        if ONLY == "memory":
            print(json.dumps(memory(workdir, ctx), indent=1))
            return
        if ONLY == "scaling":
            ports = {"admin": harness.free_port(), "listen": harness.free_port()}
            bare = Proc("arm-A", bootstrap("A", ports, workdir, ctx), workdir, 0, env)
            bare.port = ports["listen"]
            procs.append(bare)
            res = scaling(workdir, ctx, bare, 1.0)
            print(json.dumps(res, indent=1))
            return
        arms = {}
        for arm in ARMS:
            ports = {"admin": harness.free_port(), "listen": harness.free_port()}
            arm_env = dict(env, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(NOOP_NATIVE_DIR)) if arm == "M" else env
            p = Proc(f"arm-{arm}", bootstrap(arm, ports, workdir, ctx), workdir, 0, arm_env)
            p.port = ports["listen"]
            procs.append(p)
            arms[arm] = p
        # Every arm must do its work: 200 with the vendor key injected (C, D), 401 without a token.
        for arm, p in arms.items():
            probe = load(p.port, tokens_file, 1, 200)
            assert probe["ok"] == probe["requests"], (arm, probe)
        no_tokens = workdir / "no-tokens.txt"
        no_tokens.write_text("")
        for arm in [a for a in ("C", "D", "E", "N") if a in arms]:
            r = load(arms[arm].port, no_tokens, 0.5, 20)
            assert r["ok"] == 0, (arm, "a request without a credential was forwarded", r)

        per_round = {a: [] for a in ARMS}
        fetches_before = arms["C"].stat("wasmcustom.keyward_secret_fetches_total;result=ok") + arms["C"].stat("wasmcustom.keyward_secret_fetches_total;result=error")
        c_requests = 0
        order = list(ARMS)
        for rnd in range(WARMUP + ROUNDS):
            rotated = order[rnd % len(order):] + order[:rnd % len(order)]
            for arm in rotated:
                p = arms[arm]
                cpu0, rq0 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                res = load(p.port, tokens_file, SECONDS, RATE)
                time.sleep(0.3)
                cpu1, rq1 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                if rnd < WARMUP:
                    continue
                if arm == "C":
                    c_requests += rq1 - rq0
                per_round[arm].append({"cpu_us_per_rq": (cpu1 - cpu0) / 1000 / max(1, rq1 - rq0),
                                       "completed": rq1 - rq0, **res})
            print(f"round {rnd + 1}/{WARMUP + ROUNDS}{' (warm-up)' if rnd < WARMUP else ''}: " + ", ".join(
                f"{a} {per_round[a][-1]['cpu_us_per_rq']:.1f}us" for a in ARMS if per_round[a] and rnd >= WARMUP), flush=True)
        fetches = arms["C"].stat("wasmcustom.keyward_secret_fetches_total;result=ok") + arms["C"].stat("wasmcustom.keyward_secret_fetches_total;result=error") - fetches_before
        rss = {a: p.rss_kb() for a, p in arms.items()}
        if ONLY == "warm":
            # The warm path alone (with BENCH_BASELINE_WASM: against an earlier build, in the same rounds).
            def cpu(a):
                return [r["cpu_us_per_rq"] for r in per_round[a]]
            warm = {ARMS[a]: {"cpu_us_per_request": round(median(cpu(a)), 2), "rounds": [round(x, 2) for x in cpu(a)]} for a in ARMS}
            ratios = {f"{ARMS[x]}_over_{ARMS[y]}": round(statistics.median([u / v for u, v in zip(cpu(x), cpu(y))]), 3)
                      for x, y in [("C", "A"), ("C", "D"), ("B", "A"), ("N", "A"), ("N", "D"), ("N", "C"), ("M", "A"), ("N", "M")]
                      + ([("C", "E"), ("E", "A")] if BASELINE_WASM else [])}
            print(json.dumps({"warm": warm, "ratios": ratios, "baseline": BASELINE_WASM}, indent=1))
            return
        ablation_rows = ablation(workdir, ctx, arms["C"])
        priced_rows = priced(workdir, ctx, arms["A"])
        scaling_rows = scaling(workdir, ctx, arms["A"], median([r["cpu_us_per_rq"] for r in per_round["A"]]))
        cold = cold_miss(workdir, ctx, bao)
        cold_native = cold_miss(workdir, ctx, bao, "N")
        mem = memory(workdir, ctx)
        import fleet
        fleet_rows = fleet.run(workdir, ctx)
        import models
        model_rows = models.run(workdir, ctx)
        cold_baseline = cold_miss(workdir, ctx, bao, "E") if BASELINE_WASM else None

        def summary(arm):
            rs = per_round[arm]
            return {"name": ARMS[arm], "cpu_us_per_request": median([r["cpu_us_per_rq"] for r in rs]),
                    "cpu_us_per_request_rounds": [round(r["cpu_us_per_rq"], 2) for r in rs],
                    "p50_us": median([r["p50_us"] for r in rs]), "p99_us": median([r["p99_us"] for r in rs]),
                    "errors": sum(r["errors"] + r["other_status"] for r in rs),
                    "achieved_rate": median([r["rate"] for r in rs]), "rss_kb": rss[arm]}
        s = {a: summary(a) for a in ARMS}

        def ratio(x, y):
            return round(statistics.median([a["cpu_us_per_rq"] / b["cpu_us_per_rq"] for a, b in zip(per_round[x], per_round[y])]), 3)
        out = {
            "ratios": {"keyward_over_bare_cpu_per_request": ratio("C", "A"),
                       "keyward_over_native_cpu_per_request": ratio("C", "D"),
                       "noop_over_bare_cpu_per_request": ratio("B", "A"),
                       "native_over_bare_cpu_per_request": ratio("D", "A"),
                       "keyward_native_over_bare_cpu_per_request": ratio("N", "A"),
                       "keyward_native_over_native_cpu_per_request": ratio("N", "D"),
                       "keyward_native_over_keyward_cpu_per_request": ratio("N", "C"),
                       "noop_native_over_bare_cpu_per_request": ratio("M", "A"),
                       "keyward_native_over_noop_native_cpu_per_request": ratio("N", "M")},
            "arms": s,
            **({"baseline": {"wasm": BASELINE_WASM, "wasm_bytes": Path(BASELINE_WASM).stat().st_size,
                             "keyward_over_baseline_cpu_per_request": ratio("C", "E"),
                             "baseline_over_bare_cpu_per_request": ratio("E", "A")}} if BASELINE_WASM else {}),
            "ablation": ablation_rows,
            "priced_by_body": priced_rows,
            "scaling": scaling_rows,
            "fleet_ledger": fleet_rows,
            "model_calls": model_rows,
            "cold_miss": cold,
            "cold_miss_native": cold_native,
            **({"cold_miss_baseline": cold_baseline} if cold_baseline else {}),
            "vault_calls_per_10k_requests": round(fetches * 10000 / max(1, c_requests), 3),
            "keyward_wasm_bytes": KEYWARD_WASM.stat().st_size,
            "keyward_native_bytes": KEYWARD_NATIVE.stat().st_size,
            "memory": {"main_run_rss_kb": rss, **mem},
            "method": {"rate_rps": RATE, "seconds_per_arm_per_round": SECONDS, "rounds": ROUNDS, "warmup_rounds": WARMUP,
                       "tokens": TOKENS, "connections": 16, "envoy": subprocess.run([str(ENVOY), "--version"], capture_output=True,
                                                                                  text=True).stdout.strip().split("version: ")[-1],
                       "machine": {"cpus": os.cpu_count(), "model": cpu_model(), "kernel": platform.release()}},
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latest.json").write_text(json.dumps(out, indent=2) + "\n")
        print_table(out)
    finally:
        for p in reversed(procs):
            p.stop()
        bao.stop()


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(out):
    a = out["arms"]
    bare = a["A"]["cpu_us_per_request"]
    print("\n| arm | CPU µs/request | × bare | p50 µs | p99 µs | errors | RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in ARMS:
        x = a[k]
        print(f"| {k} {x['name']} | {x['cpu_us_per_request']:.1f} | {x['cpu_us_per_request'] / bare:.3f} | {x['p50_us']:.0f} | "
              f"{x['p99_us']:.0f} | {x['errors']} | {x['rss_kb'] / 1024:.1f} |")
    r = out["ratios"]
    c = out["cold_miss"]
    print(f"\nkeyward/bare {r['keyward_over_bare_cpu_per_request']}  keyward/native {r['keyward_over_native_cpu_per_request']}  "
          f"noop/bare {r['noop_over_bare_cpu_per_request']}  (medians of per-round ratios)")
    print(f"keyward native module: /bare {r['keyward_native_over_bare_cpu_per_request']}  /Envoy's native stack "
          f"{r['keyward_native_over_native_cpu_per_request']}  /keyward wasm {r['keyward_native_over_keyward_cpu_per_request']}  "
          f"/no-op native module {r['keyward_native_over_noop_native_cpu_per_request']}; no-op native module /bare "
          f"{r['noop_native_over_bare_cpu_per_request']}")
    print(f"cold miss: {c['cold_request_p50_us']:.0f} µs, of which the vault's own read {c['vault_read_p50_us']:.0f} µs "
          f"-> {c['cold_minus_vault_p50_us']:.0f} µs added; warm {c['warm_request_p50_us']:.0f} µs; "
          f"cold - warm - vault {c['cold_minus_warm_minus_vault_p50_us']:.0f} µs")
    f = c.get("filter_p50_us", {})
    print("cold miss inside the filter (medians, µs): " + ", ".join(
        f"{k.split(';')[-1].split('=')[-1] if 'cold' in k else k.split(';')[0].removeprefix('keyward_')}"
        f"{'' if 'cold' in k else '(' + k.split('=')[-1] + ')'} {v:.0f}" for k, v in sorted(f.items())))
    if "cold_miss_native" in out:
        c = out["cold_miss_native"]
        print(f"native cold miss: {c['cold_request_p50_us']:.0f} µs, of which the vault's own read {c['vault_read_p50_us']:.0f} µs "
              f"-> {c['cold_minus_vault_p50_us']:.0f} µs added; warm {c['warm_request_p50_us']:.0f} µs")
    if "cold_miss_baseline" in out:
        c = out["cold_miss_baseline"]
        print(f"baseline cold miss: {c['cold_request_p50_us']:.0f} µs, of which the vault's own read {c['vault_read_p50_us']:.0f} µs "
              f"-> {c['cold_minus_vault_p50_us']:.0f} µs added; warm {c['warm_request_p50_us']:.0f} µs")
    m = out["memory"]
    print(f"vault calls per 10,000 requests: {out['vault_calls_per_10k_requests']}; keyward.wasm {out['keyward_wasm_bytes']} bytes; "
          f"memory: {m['keyward_over_noop_per_vm_kb'] / 1024:.2f} MiB per VM more than a no-op module, plus "
          f"{m['keyward_over_noop_fixed_kb'] / 1024:.1f} MiB once per Envoy; linear memory after configure "
          f"{m['wasm_linear_memory_after_configure_kb'] / 1024:.2f} MiB, after traffic {m['wasm_linear_memory_after_traffic_kb'] / 1024:.2f} MiB; "
          f"native module over bare Envoy: {m['keyward_native_over_bare_kb']} KiB RSS (by concurrency)")
    if "priced_by_body" in out:
        print("\n| priced payment body | keyward CPU µs/request | bare, same POST | added µs |")
        print("|---:|---:|---:|---:|")
        for row in out["priced_by_body"]["rows"]:
            print(f"| {row['body_bytes']} B | {row['priced_cpu_us_per_request']:.1f} | {row['bare_cpu_us_per_request']:.1f} | "
                  f"{row['priced_minus_bare_us']:.1f} |")
    if "ablation" in out:
        print("\n| skipped in an ablation build | saves µs/request |")
        print("|---|---:|")
        for row in out["ablation"]["rows"]:
            print(f"| {row['what']} | {row['saves_us_per_request']:.1f} |")
    if "scaling" in out:
        print("\n| dimension | value | × bare | CPU µs/request (at this run's bare) |")
        print("|---|---:|---:|---:|")
        for row in out["scaling"]["rows"]:
            print(f"| {row['dimension']} | {row['value']:,} | {row['keyward_over_bare']:.3f} | {row['cpu_us_per_request_at_main_bare']:.1f} |")
    if "fleet_ledger" in out:
        w, l, s = out["fleet_ledger"]["warm"], out["fleet_ledger"]["latency"], out["fleet_ledger"]["steady_one_credential"]
        print(f"\nfleet ledger: a limited credential's warm request {w['per_instance_cpu_us_per_request']:.1f} µs per instance, "
              f"{w['ledger_live_slice_cpu_us_per_request']:.1f} µs with a live slice ({w['ledger_over_per_instance']}x); "
              f"a grant adds {l['grant_added_p50_us']:.0f} µs, a direct reservation {l['direct_added_p50_us']:.0f} µs "
              f"(dynalite answers in {l['dynalite_update_item_p50_us']:.0f} µs); ledger calls per 1,000 requests of one credential: "
              f"{s['1_gateways']['calls_per_1000_requests']} through 1 gateway, {s['3_gateways']['calls_per_1000_requests']} through 3")
    if "baseline" in out:
        b = out["baseline"]
        print(f"baseline {b['wasm']} ({b['wasm_bytes']} bytes): baseline/bare {b['baseline_over_bare_cpu_per_request']}, "
              f"keyward/baseline {b['keyward_over_baseline_cpu_per_request']}")
    print(f"written: {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    main()
