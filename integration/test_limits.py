"""Per-credential limits and the idempotency guard (issue 4), against real Envoy with two workers
and real OpenBao. Every request here opens its own connection, so both workers take part."""
import time
from concurrent.futures import ThreadPoolExecutor

import requests

import executor
import harness
from test_core import access_entries


def burst(gw, path, token, n, headers=None):
    """`n` requests at once, each on its own connection."""
    def one(_):
        h = {"Authorization": f"Bearer {token}", "Connection": "close", **(headers or {})}
        return requests.get(gw.url + path, headers=h, timeout=15)
    with ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(one, range(n)))


def vendor_saw(gw, path):
    return sum(1 for r in gw.vendor.history if r["path"] == path)


def test_total_under_concurrency_lets_exactly_the_limit_through(gw):
    c = harness.claims(["stripe GET /v1/**"], sub="lambda/limited", lim={"total": 10})
    t = harness.mint(gw.k1, c)
    gw.get("/stripe/v1/warm", gw.token(["stripe GET /v1/**"]))  # the secret is cached: only the limit races
    before = gw.envoy.stats()
    path = f"/stripe/v1/total-{c['jti']}"
    rs = burst(gw, path, t, 50)
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 10, codes
    assert codes.count(429) == 40, codes
    for r in rs:
        if r.status_code == 429:
            assert r.json()["error"] == "quota_exhausted"
            assert 1 <= int(r.headers["retry-after"]) <= 330, r.headers["retry-after"]
    assert vendor_saw(gw, path.removeprefix("/stripe")) == 10
    # Still exhausted afterwards, one at a time too.
    r = gw.get(path, t)
    assert r.status_code == 429 and r.json()["error"] == "quota_exhausted"
    after = gw.envoy.stats()
    assert after["wasmcustom.keyward_requests_total;decision=quota_exhausted"] - before["wasmcustom.keyward_requests_total;decision=quota_exhausted"] == 41
    harness.wait_until(lambda: len(access_entries(gw, c["jti"])) == 51, timeout=10, what="51 access-log entries")
    decisions = [e["decision"] for e in access_entries(gw, c["jti"])]
    assert decisions.count("allow") == 10 and decisions.count("quota_exhausted") == 41
    gw.vendor.take()


def test_total_with_a_cold_secret_counts_parked_requests_once(gw):
    """Requests that park for the secret were counted before parking; resuming must not count
    them again (else fewer than the limit would get through)."""
    c = harness.claims(["coldlim GET /**"], lim={"total": 10})
    t = harness.mint(gw.k1, c)
    path = f"/coldlim/cold-{c['jti']}"
    rs = burst(gw, path, t, 30)
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 10 and codes.count(429) == 20, codes
    assert vendor_saw(gw, path.removeprefix("/coldlim")) == 10
    got = [h for r in gw.vendor.history if r["path"] == path.removeprefix("/coldlim")
           for h in harness.header_values(r, "authorization")]
    assert got == [f"Bearer {gw.s['coldlim']}"] * 10
    gw.vendor.take()


def test_rpm_window(gw):
    c = harness.claims(["stripe GET /v1/**"], lim={"rpm": 5})
    t = harness.mint(gw.k1, c)
    path = f"/stripe/v1/rpm-{c['jti']}"
    rs = burst(gw, path, t, 20)
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 5 and codes.count(429) == 15, codes
    for r in rs:
        if r.status_code == 429:
            assert r.json()["error"] == "rate_limited"
            # The five were admitted within this second: the window frees up 60 to 61 s later.
            assert 59 <= int(r.headers["retry-after"]) <= 61, r.headers["retry-after"]
    assert vendor_saw(gw, path.removeprefix("/stripe")) == 5
    # Another credential of the same workload has its own counters.
    other = harness.mint(gw.k1, harness.claims(["stripe GET /v1/**"], lim={"rpm": 5}))
    assert gw.get("/stripe/v1/other", other).status_code == 200
    stats = gw.envoy.stats()
    assert stats["wasmcustom.keyward_requests_total;decision=rate_limited"] >= 15
    gw.vendor.take()


def test_rpm_and_total_sequentially(gw):
    c = harness.claims(["stripe GET /v1/**"], lim={"rpm": 3, "total": 4})
    t = harness.mint(gw.k1, c)
    got = [gw.get("/stripe/v1/seq", t) for _ in range(4)]
    assert [r.status_code for r in got] == [200, 200, 200, 429]
    assert got[3].json()["error"] == "rate_limited"
    gw.vendor.take()


def test_limited_requests_refused_for_other_reasons_are_not_counted(gw):
    c = harness.claims(["stripe GET /v1/**"], lim={"total": 2})
    t = harness.mint(gw.k1, c)
    for _ in range(5):
        assert gw.get("/stripe/v2/not-allowed", t).status_code == 403
    assert [gw.get("/stripe/v1/ok", t).status_code for _ in range(3)] == [200, 200, 429]
    gw.vendor.take()


def test_idempotency_key_required_and_audited(gw):
    t = gw.token(["charges POST /v1/**", "charges GET /v1/**"])
    r = gw.get("/charges/v1/charges", t, method="POST", data=b"amount=100")
    assert r.status_code == 400
    assert r.json()["error"] == "bad_request"
    assert "Idempotency-Key" in r.json()["message"]
    for bad in ["", "with space", "x" * 256]:
        r = gw.get("/charges/v1/charges", t, method="POST", headers={"Idempotency-Key": bad})
        assert r.status_code == 400, bad
    assert gw.vendor.take() == []
    key = "order-" + harness.secrets.token_hex(6)
    r = gw.get("/charges/v1/charges", t, method="POST", headers={"Idempotency-Key": key}, data=b"amount=100")
    assert r.status_code == 200
    [seen] = gw.vendor.take()
    assert harness.header_values(seen, "idempotency-key") == [key], "the key reaches the vendor unchanged"
    # GET is not listed.
    assert gw.get("/charges/v1/charges", t).status_code == 200
    gw.vendor.take()

    def entries():
        return [e for e in access_entries(gw) if e.get("idempotency_key") == key]
    harness.wait_until(entries, timeout=10, what="the idempotency key in the access log")
    assert entries()[0]["decision"] == "allow" and entries()[0]["target"] == "charges"
    stats = gw.envoy.stats()
    assert stats["wasmcustom.keyward_requests_total;decision=bad_request"] >= 4


def test_limit_shards_exist_before_the_first_request(gw):
    """The shards are created at configure time (see worker::create_limit_shards), and Envoy
    logs each configure: with the wasm filter at least one more than the workers (the main
    thread's canary); the native module compiles a configuration once, on the main thread."""
    log = gw.envoy.log_path.read_text(errors="replace")
    assert log.count("configured: audience=keyward") >= (1 if executor.is_native() else 3)
    assert "limit shard" not in log, "no shard was unreadable, contended or full"
