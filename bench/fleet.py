"""The fleet ledger in `make bench` (BENCH_ONLY=fleet runs it alone), against dynalite (DynamoDB on
LevelDB) through a ledger cluster Envoy signs, as the shipped configurations do:

- warm CPU per request of a limited credential (`lim.total`) counted per instance (arm L, no
  ledger) and in the fleet ledger with a live slice (arm M), in alternating rounds;
- the latency a slice grant adds (the first request of a new credential, against the warm one
  right after), and a direct reservation (a payment with an `Idempotency-Key`, against one
  without, served from a slice), with dynalite's own answer time beside them;
- ledger calls per 1,000 requests of one credential used steadily through 1 and 3 gateways.
"""
import http.client
import json
import secrets
import subprocess
import time

import harness
import ledger as it_ledger

import run as bench

TABLE = "keyward-bench"
SAMPLES = 31


def limited_config(with_ledger, ledger_port_cluster="ledger"):
    cfg = json.loads(bench.keyward_priced_config())
    if with_ledger:
        cfg["ledger"] = {"type": "dynamodb", "cluster": ledger_port_cluster, "authority": it_ledger.AUTHORITY, "table": TABLE,
                         "timeout_ms": 1000, "lease_s": 60}
    return json.dumps(cfg)


def gateway(name, workdir, ctx, cfg, ledger_port, core=0):
    ports = {"admin": harness.free_port(), "listen": harness.free_port()}
    b = bench.bootstrap("F", ports, workdir, {**ctx, "priced_config": cfg})
    b["static_resources"]["clusters"].append(it_ledger.ledger_cluster("ledger", ledger_port))
    p = bench.Proc(name, b, workdir, core, ctx["ledger_env"])
    p.port = ports["listen"]
    return p


def tokens(ctx, workdir, name, n, lim):
    now = int(time.time())
    path = workdir / f"{name}.txt"
    path.write_text("\n".join(harness.mint(ctx["key"], {"sub": f"lambda/{name}-{i}", "aud": "keyward", "iat": now, "exp": now + 3600,
                                                        "jti": f"{name}-{i}-{secrets.token_hex(4)}",
                                                        "allow": ["vendor GET /v1/**", "pay POST /v1/payment_intents"],
                                                        "lim": lim}) for i in range(n)) + "\n")
    return path


def ledger_calls(p):
    with bench.urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/stats?filter=keyward_ledger_calls_total", timeout=5) as r:
        return sum(int(line.rpartition(": ")[2]) for line in r.read().decode().splitlines() if ": " in line)


def timed(conn, method, path, headers, body=None):
    t0 = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    return (time.perf_counter() - t0) * 1e6, r.status


def run(workdir, ctx):
    db = it_ledger.Dynalite(workdir, "dynalite-bench")
    creds = {"AWS_ACCESS_KEY_ID": "bench-fake-access-key-id", "AWS_SECRET_ACCESS_KEY": "bench-fake-" + secrets.token_hex(8),
             "AWS_DEFAULT_REGION": "us-east-1"}
    it_ledger.create_table(it_ledger.client(db.url, creds), TABLE)
    ctx = {**ctx, "ledger_env": {**ctx["env"], **creds}}
    procs = []
    try:
        local = gateway("arm-L", workdir, ctx, limited_config(False), db.port)
        fleet = gateway("arm-M", workdir, ctx, limited_config(True), db.port)
        procs += [local, fleet]
        # 100 credentials with a total far above what the run uses: every request is counted.
        lim_file = tokens(ctx, workdir, "limited", bench.TOKENS, {"total": 10 ** 12})
        for p in (local, fleet):
            probe = bench.load(p.port, lim_file, 1, 200)
            assert probe["ok"] == probe["requests"], (p.name, probe)
        fig = {"L": [], "M": []}
        calls0, rq0m = ledger_calls(fleet), fleet.stat("http.bench.downstream_rq_completed")
        for rnd in range(bench.PRICED_ROUNDS + 1):
            for name, p in (("L", local), ("M", fleet)):
                cpu0, rq0 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                res = bench.load(p.port, lim_file, bench.SECONDS, bench.RATE)
                time.sleep(0.3)
                cpu1, rq1 = p.worker_cpu_ns(), p.stat("http.bench.downstream_rq_completed")
                if rnd == 0:
                    continue
                assert res["ok"] == res["requests"], (name, res)
                fig[name].append({"cpu": (cpu1 - cpu0) / 1000 / max(1, rq1 - rq0), "p50": res["p50_us"], "p99": res["p99_us"]})
        warm_calls = ledger_calls(fleet) - calls0
        warm_requests = fleet.stat("http.bench.downstream_rq_completed") - rq0m
        warm = {"per_instance_cpu_us_per_request": round(bench.median([r["cpu"] for r in fig["L"]]), 2),
                "ledger_live_slice_cpu_us_per_request": round(bench.median([r["cpu"] for r in fig["M"]]), 2),
                "ledger_over_per_instance": round(bench.median([m["cpu"] / l["cpu"] for m, l in zip(fig["M"], fig["L"])]), 3),
                "per_instance_p50_us": bench.median([r["p50"] for r in fig["L"]]),
                "ledger_p50_us": bench.median([r["p50"] for r in fig["M"]]),
                "ledger_calls_per_1000_requests_100_credentials": round(warm_calls * 1000 / max(1, warm_requests), 2)}
        print(f"ledger warm: per-instance {warm['per_instance_cpu_us_per_request']} µs, live slice "
              f"{warm['ledger_live_slice_cpu_us_per_request']} µs ({warm['ledger_over_per_instance']}x)", flush=True)

        # Latency of a grant (a new credential's first request) and of a direct reservation.
        conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
        ddb = http.client.HTTPConnection("127.0.0.1", db.port, timeout=10)
        now = int(time.time())
        grants, warms, direct, sliced, ddb_times = [], [], [], [], []
        for i in range(SAMPLES):
            tok = harness.mint(ctx["key"], {"sub": "lambda/grant", "aud": "keyward", "iat": now, "exp": now + 3600,
                                            "jti": f"grant-{i}-{secrets.token_hex(4)}", "allow": ["vendor GET /v1/**", "pay POST /v1/payment_intents"],
                                            "lim": {"total": 1000, "spend": 10 ** 9}})
            auth = {"Authorization": f"Bearer {tok}"}
            timed(conn, "GET", "/v/v1/items", {"Authorization": f"Bearer {tok}x"})  # a hot neighbour (refused)
            t, status = timed(conn, "GET", "/v/v1/items", auth)
            assert status == 200, status
            grants.append(t)
            warms.append(timed(conn, "GET", "/v/v1/items", auth)[0])
            form = {**auth, "content-type": "application/x-www-form-urlencoded"}
            t, status = timed(conn, "POST", "/p/v1/payment_intents", {**form, "Idempotency-Key": f"order-{i}"}, "amount=100&currency=usd")
            assert status == 200, status
            direct.append(t)
            # Payments without a key come from the slice (the first tops it up with spend).
            assert timed(conn, "POST", "/p/v1/payment_intents", form, "amount=100&currency=usd")[1] == 200
            t, status = timed(conn, "POST", "/p/v1/payment_intents", form, "amount=100&currency=usd")
            assert status == 200, status
            sliced.append(t)
            # dynalite's own answer to a small UpdateItem (it checks that a signature is there, not what it says).
            body = json.dumps({"TableName": TABLE, "Key": {"pk": {"S": f"probe-{i}"}}, "UpdateExpression": "SET #n = if_not_exists(#n, :z) + :one",
                               "ExpressionAttributeNames": {"#n": "n"}, "ExpressionAttributeValues": {":z": {"N": "0"}, ":one": {"N": "1"}}})
            t, status = timed(ddb, "POST", "/", {"x-amz-target": "DynamoDB_20120810.UpdateItem", "content-type": "application/x-amz-json-1.0",
                                                      "x-amz-date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
                                                      "authorization": "AWS4-HMAC-SHA256 Credential=x/20260101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0"}, body)
            assert status == 200, status
            ddb_times.append(t)
        latency = {"samples": SAMPLES,
                   "grant_request_p50_us": bench.median(grants), "warm_request_p50_us": bench.median(warms),
                   "grant_added_p50_us": bench.median([g - w for g, w in zip(grants, warms)]),
                   "direct_reservation_request_p50_us": bench.median(direct), "slice_payment_p50_us": bench.median(sliced),
                   "direct_added_p50_us": bench.median([d - s for d, s in zip(direct, sliced)]),
                   "dynalite_update_item_p50_us": bench.median(ddb_times)}
        print(f"ledger latency: a grant adds {latency['grant_added_p50_us']:.0f} µs, a direct reservation "
              f"{latency['direct_added_p50_us']:.0f} µs (dynalite answers in {latency['dynalite_update_item_p50_us']:.0f} µs)", flush=True)
        local.stop()
        fleet.stop()
        procs.clear()

        # Ledger calls per 1,000 requests of one credential, steadily, through 1 and 3 gateways.
        steady = {}
        for n in (1, 3):
            gws = [gateway(f"steady-{n}-{i}", workdir, ctx, limited_config(True), db.port) for i in range(n)]
            procs += gws
            one = tokens(ctx, workdir, f"steady-{n}", 1, {"total": 10 ** 12})
            for g in gws:
                assert bench.load(g.port, one, 0.5, 50)["ok"] > 0
            before = sum(ledger_calls(g) for g in gws)
            rq_before = sum(g.stat("http.bench.downstream_rq_completed") for g in gws)
            loads = [subprocess.Popen(["taskset", "-c", "1", str(bench.LOADGEN), "--addr", f"127.0.0.1:{g.port}", "--path", "/v/v1/items",
                                       "--rate", str(bench.RATE / n), "--seconds", str(bench.SECONDS * 2), "--connections", "4",
                                       "--tokens", str(one)], stdout=subprocess.PIPE, text=True) for g in gws]
            results = [json.loads(p.communicate(timeout=bench.SECONDS * 6 + 30)[0]) for p in loads]
            assert all(r["ok"] == r["requests"] for r in results), results
            calls = sum(ledger_calls(g) for g in gws) - before
            requests = sum(g.stat("http.bench.downstream_rq_completed") for g in gws) - rq_before
            steady[f"{n}_gateways"] = {"requests": requests, "ledger_calls": calls, "calls_per_1000_requests": round(calls * 1000 / max(1, requests), 2)}
            print(f"ledger calls, one credential through {n} gateway(s): {calls} for {requests} requests", flush=True)
            for g in gws:
                g.stop()
            procs.clear()
        return {"warm": warm, "latency": latency, "steady_one_credential": steady,
                "note": "dynalite on this machine stands in for DynamoDB: its answer time is beside the figures; "
                        "a grant and a direct reservation add about one ledger round trip"}
    finally:
        for p in procs:
            p.stop()
        db.close()
