"""Model calls priced from their usage in `make bench` (BENCH_ONLY=models runs it alone): the CPU a
gateway worker spends per call on a target priced from token usage, against the same call to an
unpriced target in the same Envoy, for a whole JSON answer and for a streamed one (server-sent
events, one event per token as a vendor sends them, chunked), in alternating rounds.

The vendor is scripts/model_vendor.py on the load generator's core (it answers with usage; its
time is not the gateway's). What a priced call adds: the buffer filter holding the request, the
body read and bounded, the reservation and its settlement in shared data, the answer read as it
passes (a JSON copy, or each event's line scanned)."""
import json
import subprocess
import sys
import time

import harness

import run as bench

MODEL = {"bench-model": {"input": 150000, "output": 600000}}
STREAM_TOKENS = 128  # events in a streamed answer (about 120 bytes each)
JSON_RATE, STREAM_RATE = 400, 100


def config() -> str:
    cfg = json.loads(bench.keyward_config())
    base = {"credential": "bearer", "secret": {"store": "bao", "path": "bench/vendor", "field": "api_key"}, "inject": {"type": "bearer"}}
    cfg["targets"]["ai"] = {**base, "cost": {"usage": "openai", "models": MODEL, "max_tokens": 256}}
    cfg["targets"]["plain"] = base
    return json.dumps(cfg)


def route(prefix, target, buffered):
    r = {"name": prefix, "match": {"prefix": f"/{prefix}/"},
         "route": {"cluster": "model", "prefix_rewrite": "/", "host_rewrite_literal": "vendor.bench", "timeout": "30s"},
         "metadata": {"filter_metadata": {"keyward": {"target": target, "prefix": f"/{prefix}"}}}}
    if buffered:
        r["typed_per_filter_config"] = {bench.BUFFER: {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
                       "buffer": {"max_request_bytes": 1048576}}}}
    return r


def gateway(workdir, ctx, vendor_port):
    ports = {"admin": harness.free_port(), "listen": harness.free_port()}
    b = bench.bootstrap("F", ports, workdir, {**ctx, "priced_config": config()})
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [route("ai", "ai", True), route("u", "plain", False)]
    b["static_resources"]["clusters"].append(bench.cluster("model", vendor_port))
    p = bench.Proc("arm-G", b, workdir, 0, ctx["env"])
    p.port = ports["listen"]
    return p


def tokens(ctx, workdir):
    now = int(time.time())
    toks = [harness.mint(ctx["key"], {"sub": f"agent/bench-{i}", "aud": "keyward", "iat": now, "exp": now + 3600, "jti": f"ai-{i}",
                                      "allow": ["ai POST /v1/chat/completions", "plain POST /v1/chat/completions"],
                                      "lim": {"spend": 10 ** 15}}) for i in range(bench.TOKENS)]
    path = workdir / "ai-tokens.txt"
    path.write_text("\n".join(toks) + "\n")
    return path


def port_open(port) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def run(workdir, ctx):
    vendor_port = harness.free_port()
    vendor_log = open(workdir / "model-vendor.log", "wb")
    vendor = subprocess.Popen(["taskset", "-c", "1", sys.executable, str(harness.ROOT / "scripts" / "model_vendor.py"), str(vendor_port)],
                              stdout=vendor_log, stderr=subprocess.STDOUT, start_new_session=True)
    g = None
    try:
        harness.wait_until(lambda: port_open(vendor_port), what="model vendor")
        g = gateway(workdir, ctx, vendor_port)
        toks = tokens(ctx, workdir)
        msgs = [{"role": "user", "content": "Say hello to the bench."}]
        whole = workdir / "ai-json.json"
        whole.write_text(json.dumps({"model": "bench-model", "max_tokens": 40, "messages": msgs}))
        streamed = workdir / "ai-stream.json"
        streamed.write_text(json.dumps({"model": "bench-model", "max_tokens": STREAM_TOKENS, "stream": True,
                                        "stream_options": {"include_usage": True}, "messages": msgs}))
        stream_bytes = len(subprocess.run(["curl", "-s", f"http://127.0.0.1:{vendor_port}/v1/chat/completions", "-d", f"@{streamed}"],
                                          capture_output=True, timeout=10).stdout)
        cases = [("priced_json", "/ai/v1/chat/completions", whole, JSON_RATE), ("plain_json", "/u/v1/chat/completions", whole, JSON_RATE),
                 ("priced_stream", "/ai/v1/chat/completions", streamed, STREAM_RATE),
                 ("plain_stream", "/u/v1/chat/completions", streamed, STREAM_RATE)]
        fig = {c[0]: [] for c in cases}
        for rnd in range(bench.PRICED_ROUNDS + 1):
            for name, path, body, rate in cases:
                cpu0, rq0 = g.worker_cpu_ns(), g.stat("http.bench.downstream_rq_completed")
                res = bench.load_json(g.port, toks, bench.SECONDS, rate, path, body)
                time.sleep(0.3)
                cpu1, rq1 = g.worker_cpu_ns(), g.stat("http.bench.downstream_rq_completed")
                assert res["ok"] == res["requests"], (name, res)
                if rnd:
                    fig[name].append((cpu1 - cpu0) / 1000 / max(1, rq1 - rq0))
        unread = g.stat("wasmcustom.keyward_usage_unread_total;target=ai")
        settled = g.stat("wasmcustom.keyward_usage_cost_total;target=ai;model=bench-model")
        assert unread == 0 and settled > 0, ("every priced call was settled from its usage", unread, settled)
        med = {k: round(bench.median(v), 2) for k, v in fig.items()}
        json_added = bench.median([p - u for p, u in zip(fig["priced_json"], fig["plain_json"])])
        stream_added = bench.median([p - u for p, u in zip(fig["priced_stream"], fig["plain_stream"])])
        kib = stream_bytes / 1024
        out = {"cpu_us_per_call": med, "rounds": bench.PRICED_ROUNDS,
               "priced_json_call_added_us": round(json_added, 2),
               "priced_stream_added_us": round(stream_added, 2),
               "stream_bytes": stream_bytes, "stream_events": STREAM_TOKENS + 3,
               "priced_stream_added_us_per_kib": round((stream_added - json_added) / kib, 2),
               "note": "CPU of the gateway's worker per call, a target priced from token usage (buffer filter, bound reserved, "
                       "usage read and settled) against an unpriced target in the same Envoy; the stream's figure per KiB is "
                       "what a priced stream adds beyond a priced JSON call, over the stream's size"}
        print(f"model calls: priced JSON +{out['priced_json_call_added_us']} µs, priced stream of {kib:.1f} KiB "
              f"+{out['priced_stream_added_us']} µs ({out['priced_stream_added_us_per_kib']} µs/KiB)", flush=True)
        return out
    finally:
        if g:
            g.stop()
        harness.stop_process(vendor, 5)
        vendor_log.close()
