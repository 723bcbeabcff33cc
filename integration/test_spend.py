"""Spend caps (issue 16) in real Envoy with two workers and real OpenBao: a cost read from form and
JSON bodies (whole, chunked, too large, unreadable), reserved atomically across workers before the
request reaches the vendor, released by the vendor's own refund_on answers, not charged again for
a retry with the same Idempotency-Key, and kept across a worker's VM restart.

The gateway here runs the test build with a panic trigger (dist/test/, otherwise the same module)
so that a VM can be made to crash and reload. Payment routes put Envoy's buffer filter after
Keyward, as the shipped configurations do: the vendor sees a payment only once Keyward has read its
amount and reserved it."""
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import envoy_config
import harness
from conftest import assert_no_leaks
from test_core import access_entries
from test_observability import series

PANIC_WASM = harness.ROOT / "dist" / "test" / "keyward-panic.wasm"
FORM = {"content-type": "application/x-www-form-urlencoded"}


def spend_config() -> dict:
    cfg = envoy_config.filter_config()
    secret = {"store": "bao", "path": "it/stripe", "field": "api_key"}
    cfg["targets"].update({
        "pay": {"credential": "bearer", "secret": secret, "inject": {"type": "bearer"},
                "cost": {"form_field": "amount", "currency_field": "currency", "currencies": ["usd", "eur"],
                         "max_body_bytes": 4096, "free": ["GET /**"]},
                "refund_on": [400, 402, 504]},
        "payjson": {"credential": "bearer", "secret": secret, "inject": {"type": "bearer"},
                    "cost": {"json_field": "amount", "max_body_bytes": 4096}},
        "fixed": {"credential": "bearer", "secret": secret, "inject": {"type": "bearer"},
                  "cost": {"per_request": 25}, "refund_on": [402]},
    })
    return cfg


def spend_bootstrap(ports, log) -> dict:
    b = envoy_config.bootstrap(ports, log, spend_config())
    for lst in b["static_resources"]["listeners"]:
        filters = lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        filters[0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(PANIC_WASM)
    # Off everywhere, on for the routes of targets priced from the body.
    for r in envoy_config.buffer_on(b, ("pay", "payjson")):
        if r["name"] == "pay":
            r["route"]["timeout"] = "1s"  # a vendor slower than this never answers, as far as Envoy knows
    return b


class SpendGateway:
    def __init__(self, gw, workdir):
        self.gw = gw
        self.vendor = harness.Vendor()
        self.ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port(),
                          vendor=self.vendor.port)
        self.access_log = workdir / "access-spend.log"
        self.envoy = harness.Envoy(workdir, spend_bootstrap(self.ports, self.access_log), gw.env, name="envoy-spend", concurrency=2)
        self.url = f"http://127.0.0.1:{self.ports['hardened']}"
        harness.wait_until(lambda: requests.get(self.url + "/keyward/health", timeout=5).status_code == 200, timeout=15, what="ready")

    def token(self, spend=None, allow=("pay * /**", "payjson * /**", "fixed * /**"), **lim):
        if spend is not None:
            lim["spend"] = spend
        c = harness.claims(list(allow), sub="lambda/pay", run="sqs/m-1", ttl=600, **({"lim": lim} if lim else {}))
        return harness.mint(self.gw.k1, c), c["jti"]

    def pay(self, tok, body, headers=None, path="/pay/v1/payment_intents", **kw):
        h = {"Authorization": f"Bearer {tok}", "Connection": "close", **FORM, **(headers or {})}
        return requests.post(self.url + path, data=body, headers=h, timeout=15, **kw)

    def entries(self, jti):
        return access_entries(self, jti)

    def wait_entries(self, jti, n):
        harness.wait_until(lambda: len(self.entries(jti)) >= n, timeout=10, what=f"{n} access-log entries")
        return self.entries(jti)

    def stop(self):
        self.envoy.stop()
        self.vendor.stop()


@pytest.fixture(scope="module")
def sg(gw, workdir):
    assert PANIC_WASM.exists(), "make dist/test/keyward-panic.wasm"
    g = SpendGateway(gw, workdir)
    # Warm the secret so that only the reservations race.
    t, _ = g.token(allow=["pay GET /**"])
    assert requests.get(g.url + "/pay/v1/warm", headers={"Authorization": f"Bearer {t}"}, timeout=10).status_code == 200
    g.vendor.take()
    yield g
    assert_no_leaks(g.envoy.log_path.read_text(errors="replace") + (g.access_log.read_text() if g.access_log.exists() else ""), "the spend gateway's logs")
    g.stop()


def amounts(reqs):
    """The amounts the vendor received in form bodies."""
    out = []
    for r in reqs:
        fields = dict(p.split("=", 1) for p in r["body"].decode().split("&") if "=" in p)
        out.append(int(fields["amount"]))
    return out


def test_a_cap_of_100_usd_lets_no_more_than_100_usd_through(sg):
    t, jti = sg.token(spend=10000)
    r = sg.pay(t, "amount=6000&currency=usd&description=first")
    assert r.status_code == 200, r.text
    got = sg.vendor.take()
    assert len(got) == 1 and got[0]["body"] == b"amount=6000&currency=usd&description=first", "the body reaches the vendor intact"
    assert harness.header_values(got[0], "authorization") == [f"Bearer {sg.gw.s['stripe']}"]
    r = sg.pay(t, "amount=4001&currency=usd")
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "spend_exhausted" and r.headers["content-type"] == "application/json"
    assert 1 <= int(r.headers["retry-after"]) <= 660
    assert sg.vendor.take() == [], "refused before the vendor"
    assert sg.pay(t, "amount=4000&currency=usd").status_code == 200
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429
    assert sg.pay(t, "amount=0&currency=usd").status_code == 200, "a free request still fits"
    assert sum(amounts(sg.vendor.take())) == 4000
    es = sg.wait_entries(jti, 5)
    assert [(e["decision"], e["cost"], e["spend"]) for e in es] == [
        ("allow", "6000", "reserved"), ("spend_exhausted", "4001", None), ("allow", "4000", "reserved"),
        ("spend_exhausted", "1", None), ("allow", "0", "reserved")]
    # Reads are free: not buffered, not priced, still allowed once the cap is spent.
    r = requests.get(sg.url + "/pay/v1/payment_intents/pi_1", headers={"Authorization": f"Bearer {t}"}, timeout=10)
    assert r.status_code == 200
    sg.vendor.take()
    text = sg.envoy.prometheus()
    assert series(text, "keyward_spend_reserved_total").get(frozenset({("target", "pay")}), 0) >= 10000
    assert sg.envoy.stats().get("wasmcustom.keyward_requests_total;decision=spend_exhausted", 0) >= 2


BAD_FORMS = [
    ("currency=usd", "no amount"),
    ("amount=&currency=usd", "empty"),
    ("amount=-500&currency=usd", "negative"),
    ("amount=10.50&currency=usd", "not an integer"),
    ("amount=1e4&currency=usd", "exponent"),
    ("amount=99999999999999999999999&currency=usd", "huge"),
    ("amount=1000000000000001&currency=usd", "over 10^15"),
    ("amount=500&currency=gbp", "wrong currency"),
    ("amount=500", "no currency"),
    ("amount=1&amount=5000&currency=usd", "twice"),
    ("amount=1&am%6Funt=5000&currency=usd", "twice, once encoded"),
    ("amount[]=5000&currency=usd", "bracket form"),
]


@pytest.mark.parametrize("body,why", BAD_FORMS, ids=[w for _, w in BAD_FORMS])
def test_an_unreadable_amount_is_refused_and_holds_nothing(sg, body, why):
    t, jti = sg.token(spend=1000, total=1)
    r = sg.pay(t, body)
    assert r.status_code == 400, (why, r.status_code, r.text)
    assert r.json()["error"] == "bad_request" and r.headers["content-type"] == "application/json"
    assert sg.vendor.take() == []
    # Nothing was reserved or counted: the whole cap and the one request are still there.
    assert sg.pay(t, "amount=1000&currency=usd").status_code == 200
    assert sg.vendor.take()


@pytest.mark.parametrize("case", ["query amount", "json content type", "no content type", "gzip", "multipart"])
def test_requests_whose_cost_cannot_be_read_are_refused_at_their_headers(sg, case):
    t, _ = sg.token(spend=1000)
    path, body, headers = "/pay/v1/payment_intents", "amount=1&currency=usd", {}
    if case == "query amount":
        path += "?amount=900000"
    elif case == "json content type":
        headers = {"content-type": "application/json"}
        body = '{"amount": 1, "currency": "usd"}'
    elif case == "no content type":
        headers = {"content-type": ""}
    elif case == "gzip":
        headers = {"content-encoding": "gzip"}
    else:
        headers = {"content-type": "multipart/form-data; boundary=x"}
    r = sg.pay(t, body, headers, path=path)
    assert r.status_code == 400 and r.json()["error"] == "bad_request", (case, r.text)
    assert sg.vendor.take() == []


def test_json_bodies(sg):
    t, jti = sg.token(spend=500)
    h = {"content-type": "application/json; charset=utf-8"}
    assert sg.pay(t, json.dumps({"amount": 300, "model": "m"}), h, path="/payjson/v1/jobs").status_code == 200
    for body in ['{"amount": "100"}', '{"amount": 1.5}', '{"amount": -1}', '{"amount": 1, "amount": 2}', '[1]', '{"cost": 1}']:
        r = sg.pay(t, body, h, path="/payjson/v1/jobs")
        assert r.status_code == 400 and r.json()["error"] == "bad_request", (body, r.text)
    assert sg.pay(t, json.dumps({"amount": 201}), h, path="/payjson/v1/jobs").status_code == 429
    assert sg.pay(t, json.dumps({"amount": 200}), h, path="/payjson/v1/jobs").status_code == 200
    assert len(sg.vendor.take()) == 2


def chunked_post(url, path, headers, chunks):
    """A raw HTTP/1.1 request with a chunked body, the chunks sent apart; returns (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    s.sendall(head.encode())
    for c in chunks:
        s.sendall(f"{len(c):x}\r\n".encode() + c + b"\r\n")
        time.sleep(0.05)
    s.sendall(b"0\r\n\r\n")
    data = b""
    while True:
        try:
            b = s.recv(65536)
        except OSError:
            break
        if not b:
            break
        data += b
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_chunked_bodies_are_read_whole(sg):
    t, jti = sg.token(spend=1000)
    h = {"Authorization": f"Bearer {t}", **FORM}
    status, _ = chunked_post(sg.url, "/pay/v1/payment_intents", h, [b"descr", b"iption=x&amo", b"unt=90", b"0&currency=u", b"sd"])
    assert status == 200
    got = sg.vendor.take()
    assert [r["body"] for r in got] == [b"description=x&amount=900&currency=usd"]
    # An amount split across chunks is read whole, so this one does not fit.
    status, body = chunked_post(sg.url, "/pay/v1/payment_intents", h, [b"amount=1", b"01&currency=usd"])
    assert status == 429 and json.loads(body.split(b"\r\n")[1] if b"\r\n" in body else body)["error"] == "spend_exhausted", body
    assert sg.vendor.take() == []


def test_a_body_larger_than_the_bound_is_refused(sg):
    t, jti = sg.token(spend=1000)
    h = {"Authorization": f"Bearer {t}", **FORM}
    pad = b"description=" + b"x" * 3000
    status, body = chunked_post(sg.url, "/pay/v1/payment_intents", h, [pad, b"&x=" + b"y" * 1200, b"&amount=1&currency=usd"])
    assert status == 413, body
    assert b"body_too_large" in body
    r = sg.pay(t, "amount=1&currency=usd&description=" + "x" * 5000)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large", r.text
    assert sg.vendor.take() == []
    assert sg.pay(t, "amount=1000&currency=usd").status_code == 200, "nothing was reserved"
    sg.vendor.take()


def burst(fn, n):
    with ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(fn, range(n)))


def test_concurrent_reservations_never_overshoot_the_cap(sg):
    t, jti = sg.token(spend=10000)
    rs = burst(lambda i: sg.pay(t, "amount=300&currency=usd"), 50)
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 33 and codes.count(429) == 17, codes
    got = sg.vendor.take()
    assert sum(amounts(got)) == 9900 and len(got) == 33
    # Exactly at the boundary: fifty of 200 fit exactly; one cent more does not.
    t, jti = sg.token(spend=10000)
    rs = burst(lambda i: sg.pay(t, "amount=200&currency=usd"), 50)
    assert [r.status_code for r in rs] == [200] * 50
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429
    assert sum(amounts(sg.vendor.take())) == 10000


def test_requests_refused_for_other_reasons_reserve_nothing_under_concurrency(sg):
    t, jti = sg.token(spend=1000)
    bodies = ["amount=100&currency=usd"] * 10 + ["amount=-1&currency=usd", "amount=5&currency=gbp", "currency=usd"] * 10
    random.Random(7).shuffle(bodies)
    rs = burst(lambda i: sg.pay(t, bodies[i]), len(bodies))
    assert sorted(r.status_code for r in rs) == [200] * 10 + [400] * 30
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429, "the ten good ones spent it all, the bad ones nothing"
    assert sum(amounts(sg.vendor.take())) == 1000


def test_refunds_release_the_reservation_only_on_the_vendors_own_answer(sg):
    t, jti = sg.token(spend=1000)
    declined = sg.pay(t, "amount=1000&currency=usd", {"x-test-status": "402"})
    assert declined.status_code == 402 and declined.json() == {"vendor": "as asked"}
    assert sg.pay(t, "amount=1000&currency=usd").status_code == 200, "the declined charge was released"
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429
    es = sg.wait_entries(jti, 3)
    assert [(e["decision"], e["spend"], e["status"]) for e in es] == [
        ("allow", "refunded", 402), ("allow", "reserved", 200), ("spend_exhausted", None, 429)]
    # A status the target does not list keeps the reservation (the charge may have happened).
    t, jti = sg.token(spend=1000)
    assert sg.pay(t, "amount=1000&currency=usd", {"x-test-status": "500"}).status_code == 500
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429
    # A vendor that never answers: Envoy's own 504 is not the vendor's, so nothing is released
    # even though 504 is listed.
    t, jti = sg.token(spend=1000)
    r = sg.pay(t, "amount=1000&currency=usd", path="/pay/v1/slow")
    assert r.status_code == 504
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429
    es = sg.wait_entries(jti, 2)
    assert es[0]["spend"] == "reserved" and es[0]["status"] == 504
    sg.vendor.take()
    text = sg.envoy.prometheus()
    assert series(text, "keyward_spend_refunded_total").get(frozenset({("target", "pay")}), 0) >= 1000


def test_a_retry_with_the_same_idempotency_key_is_not_charged_again(sg):
    t, jti = sg.token(spend=10000)
    key = {"Idempotency-Key": "order-77"}
    assert sg.pay(t, "amount=8000&currency=usd", key).status_code == 200
    for _ in range(3):
        r = sg.pay(t, "amount=8000&currency=usd", key)
        assert r.status_code == 200, "a retry goes to the vendor, which deduplicates it"
    assert len(sg.vendor.take()) == 4
    assert sg.pay(t, "amount=8000&currency=usd", {"Idempotency-Key": "order-78"}).status_code == 429
    assert sg.pay(t, "amount=8001&currency=usd", key).status_code == 429, "the same key for another amount is another charge"
    assert sg.pay(t, "amount=2000&currency=usd", {"Idempotency-Key": "order-79"}).status_code == 200
    es = sg.wait_entries(jti, 7)
    assert [e["spend"] for e in es] == ["reserved", "retry", "retry", "retry", None, None, "reserved"]
    assert all(e["idempotency_key"] in ("order-77", "order-78", "order-79") for e in es)
    sg.vendor.take()


def test_concurrent_payments_and_retries_stay_within_the_cap(sg):
    """The issue's "done when": however many concurrent or retried requests try, no more than
    100.00 USD of payments gets past the gateway (retries counted once: the vendor deduplicates)."""
    t, jti = sg.token(spend=10000)
    rnd = random.Random(16)
    orders = [(f"o-{i}", rnd.randint(100, 900)) for i in range(30)]
    attempts = [o for o in orders for _ in range(rnd.randint(1, 3))]
    rnd.shuffle(attempts)
    rs = burst(lambda i: sg.pay(t, f"amount={attempts[i][1]}&currency=usd", {"Idempotency-Key": attempts[i][0]}), len(attempts))
    ok = [attempts[i] for i, r in enumerate(rs) if r.status_code == 200]
    assert all(r.status_code in (200, 429) for r in rs)
    distinct = dict(ok)
    assert sum(distinct.values()) <= 10000
    got = sg.vendor.take()
    charged = {}
    for r in got:
        key = harness.header_values(r, "idempotency-key")[0]
        charged[key] = amounts([r])[0]
    assert sum(charged.values()) <= 10000
    assert sum(charged.values()) > 10000 - 900, "the cap was used, not refused early"


def test_a_fixed_cost_per_request(sg):
    t, jti = sg.token(spend=60)
    h = {"Authorization": f"Bearer {t}"}
    codes = [requests.get(sg.url + "/fixed/v1/x", headers=h, timeout=10).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = requests.get(sg.url + "/fixed/v1/x", headers=h, timeout=10)
    assert r.json()["error"] == "spend_exhausted"
    # A declined one is refunded.
    t, jti = sg.token(spend=25)
    h = {"Authorization": f"Bearer {t}"}
    assert requests.get(sg.url + "/fixed/v1/x", headers={**h, "x-test-status": "402"}, timeout=10).status_code == 402
    assert requests.get(sg.url + "/fixed/v1/x", headers=h, timeout=10).status_code == 200
    es = sg.wait_entries(jti, 2)
    assert [(e["cost"], e["spend"]) for e in es] == [("25", "refunded"), ("25", "reserved")]
    sg.vendor.take()


def test_the_cap_survives_a_worker_restarting_its_vm(sg):
    t, jti = sg.token(spend=10000)
    assert sg.pay(t, "amount=6000&currency=usd").status_code == 200
    configured = sg.envoy.stats().get("wasmcustom.keyward_vm_configurations_total", 0)
    # Crash VMs: each panicking request is on a new connection, which lands on either worker.
    for _ in range(12):
        r = sg.pay(t, "amount=1&currency=usd", {"x-keyward-test-panic": "1"})
        assert r.status_code in (500, 503), r.text
    assert len(sg.vendor.take()) == 1, "nothing that panicked was forwarded"
    # A crashed VM is reloaded by the next request after its backoff (at most 1 s here).
    time.sleep(1.2)
    free = {"Authorization": f"Bearer {t}", "Connection": "close"}
    streak = []

    def healthy():
        streak.append(requests.get(sg.url + "/pay/v1/payment_intents/pi_1", headers=free, timeout=10).status_code)
        return streak[-10:] == [200] * 10
    harness.wait_until(healthy, timeout=15, what="ten requests in a row served after the reloads")
    assert sg.envoy.stats().get("wasmcustom.keyward_vm_configurations_total", 0) >= configured + 2, "the VMs were reloaded"
    sg.vendor.take()
    # Every worker's new VM still knows what was spent.
    rs = [sg.pay(t, "amount=4001&currency=usd") for _ in range(8)]
    assert [r.status_code for r in rs] == [429] * 8, [r.text for r in rs]
    assert sg.pay(t, "amount=4000&currency=usd").status_code == 200
    assert sum(amounts(sg.vendor.take())) == 4000


def test_check_envoy_requires_the_buffer_filter_on_body_priced_routes(sg, tmp_path):
    b = spend_bootstrap(sg.ports, tmp_path / "a.log")

    def problems(doc):
        p = tmp_path / "envoy.json"
        p.write_text(json.dumps(doc))
        r = harness.cli("check-envoy", str(p), "--no-env", "--json")
        return [x for x in json.loads(r.stdout)["problems"] if "prices requests from their body" in x]

    assert problems(b) == []
    unbuffered = json.loads(json.dumps(b))
    for lst in unbuffered["static_resources"]["listeners"]:
        for r in lst["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]:
            r.pop("typed_per_filter_config", None)
    found = problems(unbuffered)
    assert any("route pay:" in x for x in found) and any("route payjson:" in x for x in found), found
    assert not any("route fixed:" in x for x in found), "a fixed cost reads no body"


def test_the_cli_mints_spend_caps_and_reports_spend(sg):
    r = harness.cli("mint", "--kid=k1", "--key-env=KEYWARD_KEY_K1", "--sub=lambda/cli", "--allow=pay POST /**", "--spend=500",
                    "--run=batch-9", "--iss=https://issuer.test", "--json", env={"KEYWARD_KEY_K1": sg.gw.k1_b64})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    harness.TOKENS.add(out["token"])
    assert sg.pay(out["token"], "amount=300&currency=usd").status_code == 200
    assert sg.pay(out["token"], "amount=300&currency=usd").status_code == 429
    assert sg.pay(out["token"], "amount=200&currency=usd", {"x-test-status": "402"}).status_code == 402
    sg.vendor.take()
    sg.wait_entries(out["jti"], 3)
    r = harness.cli("report", str(sg.access_log), "--json")
    assert r.returncode == 0, r.stderr
    rows = [x for x in json.loads(r.stdout)["spend"] if x["subject"] == "lambda/cli"]
    assert rows == [{"subject": "lambda/cli", "run": "batch-9", "target": "pay", "requests": 2, "charged": 500, "refunded": 200,
                     "net": 300, "retries": 0}], rows
    bad = harness.cli("mint", "--kid=k1", "--key-env=KEYWARD_KEY_K1", "--sub=s", "--allow=pay POST /**", "--spend=-1",
                      env={"KEYWARD_KEY_K1": sg.gw.k1_b64})
    assert bad.returncode == 2 and "--spend" in bad.stderr


def test_a_client_that_leaves_mid_body_holds_nothing_on_any_worker(sg):
    t, jti = sg.token(spend=1000)
    host, port = sg.url.removeprefix("http://").split(":")
    for _ in range(4):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall((f"POST /pay/v1/payment_intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n"
                   "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "c\r\namount=1000&\r\n").encode())
        time.sleep(0.1)
        s.close()  # the body never ends
    time.sleep(0.3)
    assert sg.vendor.take() == [], "a payment whose body never ended was not forwarded"
    # Every worker still has the whole cap: each of these new connections may land on either.
    rs = [sg.pay(t, "amount=250&currency=usd") for _ in range(4)]
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    assert sg.pay(t, "amount=1&currency=usd").status_code == 429
    sg.vendor.take()
