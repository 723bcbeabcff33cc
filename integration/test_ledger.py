"""One cap for the whole fleet: three Envoy gateways (two workers each) running keyward.wasm in
front of one ledger table in dynalite (DynamoDB on LevelDB, real conditional writes), with real
OpenBao for the vendor key. Envoy signs every ledger call (aws_request_signing on the ledger
cluster, environment credentials); the filter holds none.

What is shown: payments spread over the three at the cap boundary never pass the cap, and reach
it exactly when clients retry as told; a `total: 10` credential makes 10 calls in all; a retry that
lands on another gateway is not charged again; a gateway killed holding a slice never lets the
fleet past the cap; a ledger that is down, throttles, hangs or answers garbage makes the requests
that need it 503 within its timeout while unlimited credentials and live slices are served; a
budget over subjects holds across gateways; the drain gives everything back; and a steady stream
costs a handful of ledger calls per thousand requests."""
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import aws
import envoy_config
import executor
import harness
import ledger
from conftest import assert_no_leaks

FORM = {"content-type": "application/x-www-form-urlencoded"}
TABLE = "keyward-ledger"
LEASE_S = 3


def fleet_config(ledger_section) -> dict:
    cfg = envoy_config.filter_config()
    secret = {"store": "bao", "path": "it/stripe", "field": "api_key"}
    cfg["targets"]["pay"] = {"credential": "bearer", "secret": secret, "inject": {"type": "bearer"},
                             "cost": {"form_field": "amount", "currency_field": "currency", "currencies": ["usd"],
                                      "max_body_bytes": 4096, "free": ["GET /**"]},
                             "refund_on": [402]}
    cfg["ledger"] = ledger_section
    return cfg


class Fleet:
    def __init__(self, gw, workdir, n=3, lease_s=LEASE_S, timeout_ms=800):
        self.gw = gw
        self.db = ledger.Dynalite(workdir)
        self.creds = aws.credentials_env()
        self.ddb = ledger.client(self.db.url, self.creds)
        ledger.create_table(self.ddb, TABLE)
        # The ledger is reached through a relay the tests can break (down, slow, garbage, throttling).
        self.relay = harness.Relay(self.db.url)
        budgets = [{"name": "team-a", "match": "sub:lambda/team-a*", "spend": 3000, "window": "day", "targets": ["pay"]}]
        self.cfg = fleet_config(ledger.ledger_section(table=TABLE, lease_s=lease_s, timeout_ms=timeout_ms, budgets=budgets))
        env = ledger.env_for(gw.env, self.creds)
        self.gateways = [ledger.Gateway(workdir, f"envoy-fleet-{i}", self.cfg, env, self.relay.port, gw.ports) for i in range(n)]
        self.vendor = gw.vendor

    def token(self, sub="lambda/fleet", allow=("pay * /**",), **lim):
        c = harness.claims(list(allow), sub=sub, ttl=600, **({"lim": lim} if lim else {}))
        return harness.mint(self.gw.k1, c), c["jti"]

    def pay(self, i, tok, amount, headers=None, timeout=10):
        g = self.gateways[i % len(self.gateways)]
        h = {"Authorization": f"Bearer {tok}", "Connection": "close", **FORM, **(headers or {})}
        return requests.post(g.url + "/pay/v1/payment_intents", data=f"amount={amount}&currency=usd", headers=h, timeout=timeout)

    def get(self, i, tok, path="/stripe/v1/charges"):
        g = self.gateways[i % len(self.gateways)]
        return requests.get(g.url + path, headers={"Authorization": f"Bearer {tok}", "Connection": "close"}, timeout=10)

    def held(self, jti):
        return ledger.held(self.ddb, TABLE, ledger.credential_pk(self.gw.k1, jti))

    def charged(self, jti_marker):
        """Amounts the vendor received for payments tagged with this marker."""
        total = 0
        for r in self.vendor.history:
            if harness.header_values(r, "x-run") == [jti_marker]:
                fields = dict(p.split("=", 1) for p in r["body"].decode().split("&") if "=" in p)
                total += int(fields["amount"])
        return total

    def stop(self):
        for g in self.gateways:
            g.stop()
        self.relay.stop()
        self.db.close()


@pytest.fixture(scope="module")
def fleet(gw, workdir):
    f = Fleet(gw, workdir)
    # Warm each gateway's secret cache (both workers), so that only the ledger is asked below.
    t, _ = f.token(allow=("pay GET /**", "stripe GET /**"))
    for i in range(12):
        assert f.get(i, t, "/pay/v1/warm").status_code == 200
    yield f
    for g in f.gateways:
        logs = g.envoy.log_path.read_text(errors="replace") + (g.access_log.read_text() if g.access_log.exists() else "")
        assert_no_leaks(logs, f"{g.name}'s logs")
    f.stop()


def spread(fleet, tok, amounts, tag, headers=None, workers=12, retry_429=False, via=None):
    """Pay each amount, request i through gateway i % 3, concurrently. With `retry_429`, a client
    told 429 waits its Retry-After (when it is short: another gateway's lease ends) and tries
    again; a long one means the cap is reached. Returns the statuses and the amounts paid."""
    paid, statuses = [], []
    lock = threading.Lock()

    def one(i):
        h = {"x-run": tag, **(headers(i) if headers else {})}
        hop = i
        for _ in range(20):
            r = fleet.pay(via[hop % len(via)] if via else hop, tok, amounts[i], h)
            ra = int(r.headers.get("retry-after", "0") or 0)
            if retry_429 and r.status_code == 429 and ra <= LEASE_S + 3:
                time.sleep(ra)
                hop += 1  # and through the next gateway
                continue
            break
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 200:
                paid.append(amounts[i])
        return r.status_code

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, range(len(amounts))))
    return statuses, paid


def test_payments_spread_over_three_gateways_never_pass_the_cap(fleet):
    tok, jti = fleet.token(spend=10000)
    amounts = [random.choice([100, 250, 400, 600, 900]) for _ in range(60)]  # about 30,000 asked for
    statuses, paid = spread(fleet, tok, amounts, "cap-1")
    assert set(statuses) <= {200, 429}, statuses
    assert sum(paid) <= 10000, sum(paid)
    assert fleet.charged("cap-1") == sum(paid), "the vendor received exactly the payments that were allowed"
    spend, _ = fleet.held(jti)
    assert sum(paid) <= spend <= 10000, (sum(paid), spend)


def test_clients_that_retry_as_told_reach_the_cap_exactly(fleet):
    """100 payments of 100 cents against 100.00 USD, spread over the three: once the slices other
    gateways held come back (their lease ends), every cent is spendable, and none more."""
    tok, jti = fleet.token(spend=10000)
    statuses, paid = spread(fleet, tok, [100] * 110, "cap-2", retry_429=True)
    assert sum(paid) == 10000, (sum(paid), statuses.count(200), statuses.count(429),
                                ledger.item(fleet.ddb, TABLE, ledger.credential_pk(fleet.gw.k1, jti)))
    assert fleet.charged("cap-2") == 10000
    assert statuses.count(429) == 10


def test_a_total_10_credential_makes_10_calls_in_all(fleet):
    tok, jti = fleet.token(allow=("stripe GET /**",), total=10)
    codes = [fleet.get(i, tok).status_code for i in range(30)]
    assert codes.count(200) <= 10 and set(codes) <= {200, 429}, codes
    # Retried after the other gateways' leases end: exactly 10.
    time.sleep(LEASE_S + 0.5)
    codes += [fleet.get(i, tok).status_code for i in range(9)]
    assert codes.count(200) == 10, codes
    assert fleet.held(jti)[1] == 10


def test_a_retry_landing_on_another_gateway_is_not_charged_again(fleet):
    tok, jti = fleet.token(spend=10000)
    key = {"Idempotency-Key": "order-fleet-1"}
    assert fleet.pay(0, tok, 6000, {**key, "x-run": "retry-1"}).status_code == 200
    # The client did not hear back and retries: the request lands on another gateway.
    r = fleet.pay(1, tok, 6000, {**key, "x-run": "retry-1"})
    assert r.status_code == 200, r.text
    assert fleet.held(jti)[0] == 6000, "charged once, fleet-wide"
    # Had the retry been charged again, this would not fit.
    assert fleet.pay(2, tok, 4000, {"x-run": "retry-1"}).status_code == 200
    assert fleet.pay(0, tok, 1, {"x-run": "retry-1"}).status_code == 429


def test_a_gateway_killed_holding_a_slice_never_lets_the_fleet_past_the_cap(fleet, workdir):
    """SIGKILL gives nothing back: the slice it held stays counted as spent (the ledger cannot know
    what it forwarded before it died), so the fleet may stop short of the cap, never pass it. The
    other gateways serve the rest at once, and the gateway started again leases anew."""
    tok, jti = fleet.token(spend=10000)
    victim = fleet.gateways[2]
    assert requests.post(victim.url + "/pay/v1/payment_intents", data="amount=100&currency=usd",
                         headers={"Authorization": f"Bearer {tok}", **FORM, "x-run": "kill-1"}, timeout=10).status_code == 200
    slice_held, _ = fleet.held(jti)
    assert 100 < slice_held < 10000, "the gateway holds a slice beyond its one payment"
    victim.kill()
    try:
        # The two others spend what the dead one does not hold.
        statuses, paid = spread(fleet, tok, [100] * 150, "kill-1", retry_429=True, via=[0, 1])
        assert sum(paid) + 100 <= 10000
        assert sum(paid) + 100 >= 10000 - (slice_held - 100), (sum(paid), slice_held)
        assert fleet.charged("kill-1") == sum(paid) + 100
        # Long after the dead lease's end nothing comes back (it may have been spent): still refused,
        # and told to come back when the credential ends, not in a moment.
        time.sleep(LEASE_S + 7)
        r = fleet.pay(0, tok, 100, {"x-run": "kill-1"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > LEASE_S, (r.status_code, r.headers)
    finally:
        victim.start()
    # Started again (a new process, a new id in the ledger), it serves other credentials at once.
    t2, _ = fleet.token(spend=500)
    assert fleet.pay(2, t2, 100).status_code == 200
    assert fleet.held(jti)[0] <= 10000


@pytest.mark.parametrize("mode", ["down", "throttled", "slow", "garbage", "error"])
def test_a_failing_ledger_is_503_within_its_timeout_and_unlimited_credentials_are_untouched(fleet, mode):
    limited, _ = fleet.token(allow=("stripe GET /**",), total=100)
    unlimited, _ = fleet.token(allow=("stripe GET /**",))
    relay = fleet.relay
    try:
        if mode == "down":
            relay.mode = "canned"
            relay.canned = (503, b"")
            fleet.db.stop()
            relay.mode = "pass"
        elif mode == "throttled":
            relay.mode, relay.canned = "canned", (400, b'{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"slow down"}')
        elif mode == "slow":
            relay.mode, relay.delay = "slow", 3.0
        elif mode == "garbage":
            relay.mode = "garbage"
        else:
            relay.mode = "error"
        for i in range(6):
            t0 = time.time()
            r = fleet.get(i, limited)
            took = time.time() - t0
            assert r.status_code == 503 and r.json()["error"] == "secret_unavailable" and "retry-after" in r.headers, (mode, r.status_code, r.text)
            assert took < 0.8 + 1.5, (mode, took)
            assert fleet.get(i, unlimited).status_code == 200, "credentials without limits never ask the ledger"
    finally:
        relay.mode = "pass"
        if mode == "down":
            fleet.db.start()
    # Back: served again within a moment, on every gateway.
    for i in range(6):
        harness.wait_until(lambda: fleet.get(i, limited).status_code == 200, timeout=5, what=f"recovery on gateway {i % 3}")
    stats = sum(g.stats().get("wasmcustom.keyward_ledger_unavailable_total", 0) for g in fleet.gateways)
    assert stats > 0



def test_a_budget_covers_every_credential_it_matches_across_gateways(fleet):
    """`sub:lambda/team-a*`, 30.00 USD a day on `pay`: two credentials of the team, each with a cap
    of its own far above it, share the team's 3000 across the three gateways."""
    a, _ = fleet.token(sub="lambda/team-a-checkout", spend=100000)
    b, _ = fleet.token(sub="lambda/team-a-refunds")
    other, _ = fleet.token(sub="lambda/team-b", spend=100000)
    statuses, paid = spread(fleet, a, [250] * 8, "budget-1")
    statuses2, paid2 = spread(fleet, b, [250] * 8, "budget-1", retry_429=True)
    assert sum(paid) + sum(paid2) <= 3000
    r = fleet.pay(0, a, 250, {"x-run": "budget-1"})
    assert r.status_code == 429 and r.json()["error"] == "spend_exhausted"
    assert "budget" in r.json()["message"]
    assert fleet.pay(1, other, 250).status_code == 200, "another team is not covered"
    held = ledger.held(fleet.ddb, TABLE, "b/team-a/" + time.strftime("%Y-%m-%d", time.gmtime()))[0]
    assert sum(paid) + sum(paid2) <= held <= 3000
    # `keyward report` over the three gateways' logs: the team's spend, fleet-wide.
    logs = [str(g.access_log) for g in fleet.gateways]

    def budget():
        out = json.loads(harness.cli("report", *logs, "--json").stdout)
        b = out["budgets"].get("team-a", {})
        return out if b.get("net") == sum(paid) + sum(paid2) else None
    out = harness.wait_until(budget, timeout=10, what="the access log lines")
    mine = [c for c in out["credentials"] if c["subject"] == "lambda/team-a-checkout"]
    assert len(mine) == 1 and mine[0]["net"] == sum(paid), mine


def test_the_drain_gives_back_what_a_gateway_holds(fleet):
    tok, jti = fleet.token(spend=100000)
    for i in range(3):
        assert fleet.pay(i, tok, 10, {"x-run": "drain-1"}).status_code == 200
    held_before, _ = fleet.held(jti)
    assert held_before > 30, "slices were granted"
    for g in fleet.gateways:
        out = g.drain()
        assert out["held"] == 0, out
    assert fleet.held(jti)[0] == 30, "only what was spent stays held"
    it = ledger.item(fleet.ddb, TABLE, ledger.credential_pk(fleet.gw.k1, jti))
    assert ledger.live_leases(it) == [], "no lease is left: only end marks, which hold nothing"


def test_only_the_gateway_itself_can_drain(fleet):
    """Envoy's RBAC admits loopback peers by their own address: a client elsewhere (127.0.0.2
    here) saying X-Forwarded-For: 127.0.0.1 is refused before the filter; the filter takes POST
    only."""
    import http.client
    g = fleet.gateways[0]
    port = g.ports["hardened"]
    for method in ("POST", "GET"):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.2", 0))
        c.request(method, "/keyward/drain", headers={"x-forwarded-for": "127.0.0.1", "content-length": "0"})
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 403 and "returning" not in body, (method, r.status, body)
        c.close()
    r = requests.get(g.url + "/keyward/drain", timeout=5)
    assert r.status_code == 403 and "POST" in r.json()["message"]
    assert requests.post(g.url + "/keyward/drain", timeout=5).status_code == 200


def test_a_steady_stream_through_three_gateways_costs_few_ledger_calls(fleet):
    tok, jti = fleet.token(allow=("stripe GET /**",), total=1_000_000)
    before = fleet.relay.served["pass"]
    n = 900
    with ThreadPoolExecutor(6) as ex:
        codes = list(ex.map(lambda i: fleet.get(i, tok).status_code, range(n)))
    assert codes.count(200) == n
    calls = fleet.relay.served["pass"] - before
    print(f"ledger calls for {n} requests through 3 gateways: {calls}")
    assert calls * 1000 / n <= 10 * 1.5, calls


def test_without_a_ledger_each_gateway_holds_its_own_cap(gw, workdir):
    """The per-instance default, unchanged: two gateways without a ledger each let a credential
    spend its whole cap (the README says so; a ledger is what shares it)."""
    cfg = fleet_config(None)
    cfg.pop("ledger")
    env = ledger.env_for(gw.env, aws.credentials_env())
    gws = [ledger.Gateway(workdir, f"envoy-solo-{i}", cfg, env, harness.free_port(), gw.ports) for i in range(2)]
    try:
        c = harness.claims(["pay * /**"], sub="lambda/solo", ttl=600, lim={"spend": 1000})
        tok = harness.mint(gw.k1, c)
        for g in gws:
            r = requests.post(g.url + "/pay/v1/payment_intents", data="amount=1000&currency=usd",
                              headers={"Authorization": f"Bearer {tok}", **FORM}, timeout=10)
            assert r.status_code == 200, r.text
            r = requests.post(g.url + "/pay/v1/payment_intents", data="amount=1&currency=usd",
                              headers={"Authorization": f"Bearer {tok}", **FORM}, timeout=10)
            assert r.status_code == 429
    finally:
        for g in gws:
            g.stop()


def test_the_alerts_and_the_dashboard_read_what_fleet_gateways_export(fleet):
    """The ledger's metrics as Prometheus gets them (labels from the shipped stats_tags)."""
    team, _ = fleet.token(sub="lambda/team-a-metrics", spend=100000)
    limited, _ = fleet.token(allow=("stripe GET /**",), total=100)
    for i in range(3):
        # The team's budget may be spent already (the budget test above): a refusal is fine here.
        assert fleet.pay(i, team, 10).status_code in (200, 429)
        assert fleet.get(i, limited).status_code == 200
    relay = fleet.relay
    relay.mode = "garbage"
    try:
        fresh, _ = fleet.token(allow=("stripe GET /**",), total=100)
        assert fleet.get(0, fresh).status_code == 503
    finally:
        relay.mode = "pass"
    texts = [g.envoy.prometheus() for g in fleet.gateways]
    assert any(re.search(r'^keyward_ledger_calls_total\{(?=[^}]*op="grant")(?=[^}]*result="ok")', t, re.M) for t in texts), texts
    assert any(re.search(r'^keyward_budget_spend_total\{[^}]*budget="team-a"', t, re.M) for t in texts)
    obs = harness.ROOT / "deploy" / "observability"
    used = set(re.findall(r"\b(keyward_(?:ledger|budget)_[a-z_]+)", (obs / "alerts.yaml").read_text() + (obs / "grafana-dashboard.json").read_text()))
    exported = {m.group(1) for t in texts for m in re.finditer(r"^(keyward_\w+?)(?:\{| )", t, re.M)}
    assert used and used <= exported, used - exported


def entrypoint_gateway(fleet, workdir, name, **env_extra):
    """A gateway run by the image's entrypoint (deploy/keyward-envoy.sh), ready, with a slice of a
    fresh credential beyond its two payments: (process, log file, jti)."""
    ports = dict(fleet.gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port())
    bootstrap = ledger.gateway_bootstrap(ports, workdir / f"access-{name}.log", fleet.cfg, fleet.relay.port)
    cfg = workdir / f"{name}.json"
    cfg.write_text(json.dumps(bootstrap))
    env = dict(os.environ, **ledger.env_for(fleet.gw.env, fleet.creds), ADMIN=f"127.0.0.1:{ports['admin']}", DRAIN_S="10",
               ENVOY=str(harness.BIN / "envoy"), LEDGER_DRAIN=f"127.0.0.1:{ports['hardened']}", **env_extra)
    log = open(workdir / f"{name}.log", "w")
    proc = subprocess.Popen([str(harness.ROOT / "deploy" / "keyward-envoy.sh"), "-c", str(cfg), "--concurrency", "2",
                             "--base-id", str(harness.free_port())], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=harness.ROOT)
    harness.SPAWNED.append(proc)
    url = f"http://127.0.0.1:{ports['hardened']}"
    try:
        harness.wait_until(lambda: requests.get(url + "/keyward/health", timeout=2).status_code == 200, timeout=40, what="ready")
        tok, jti = fleet.token(spend=100000)
        for _ in range(2):
            r = requests.post(url + "/pay/v1/payment_intents", data="amount=10&currency=usd",
                              headers={"Authorization": f"Bearer {tok}", **FORM}, timeout=10)
            assert r.status_code == 200, r.text
        assert fleet.held(jti)[0] > 20, "a slice beyond the two payments"
    except Exception:
        proc.kill()
        log.close()
        raise
    return proc, log, jti


def entrypoint_said(workdir, name):
    return [l for l in (workdir / f"{name}.log").read_text().splitlines() if l.startswith("keyward-envoy:")]


def test_sigterm_through_the_image_entrypoint_gives_every_slice_back(fleet, workdir):
    """ECS or Kubernetes stopping a gateway: the entrypoint (deploy/keyward-envoy.sh) drains Envoy,
    then asks the filter to give its slices back before Envoy stops. The ledger then holds exactly
    what was spent: nothing of the stopped gateway stays counted."""
    proc, log, jti = entrypoint_gateway(fleet, workdir, "entrypoint")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert fleet.held(jti)[0] == 20, "only what was spent stays held"
    assert ledger.live_leases(ledger.item(fleet.ddb, TABLE, ledger.credential_pk(fleet.gw.k1, jti))) == []
    said = entrypoint_said(workdir, "entrypoint")
    assert "keyward-envoy: the ledger slices are given back" in said, said


def test_a_ledger_that_hangs_at_sigterm_holds_the_stop_to_its_budget(fleet, workdir):
    """The ledger hangs when the gateway stops: each drain call waits for its return until the
    ledger's deadline, then says the slice is still held. The entrypoint gives back for at most
    GIVE_BACK_S seconds in all (not 25 calls' worth), says what stays counted, and Envoy stops
    well within the orchestrator's limit."""
    proc, log, jti = entrypoint_gateway(fleet, workdir, "entrypoint-hang", GIVE_BACK_S="3")
    try:
        with fleet.relay.failing("hang"):
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert took < 3 + 6, f"the stop took {took:.1f} s"
    said = entrypoint_said(workdir, "entrypoint-hang")
    assert "keyward-envoy: some ledger slices are still held; they stay counted as spent" in said, said
    assert fleet.held(jti)[0] > 20, "its slice stays counted: over-counted, never under"


def test_moto_with_sigv4_checked_holds_the_cap_across_three_gateways(gw, workdir):
    """The same ledger on moto's DynamoDB, which checks every request's SigV4 signature against its
    IAM users: Envoy signs with the gateway's credentials (the filter has none). Three gateways
    never let a spend:10000 credential pass the cap, a retry on another gateway is not charged
    twice, and a gateway signing with a wrong secret gets nothing from the ledger (503)."""
    proc, url, creds, log = ledger.moto_dynamodb(workdir)
    gws = []
    try:
        ddb = ledger.client(url, creds)
        ledger.create_table(ddb, TABLE)
        port = int(url.rsplit(":", 1)[1])
        cfg = fleet_config(ledger.ledger_section(table=TABLE, lease_s=LEASE_S))
        env = ledger.env_for(gw.env, dict(creds, AWS_DEFAULT_REGION="us-east-1"))
        gws = [ledger.Gateway(workdir, f"envoy-moto-{i}", cfg, env, port, gw.ports) for i in range(3)]
        c = harness.claims(["pay * /**", "stripe GET /**"], sub="lambda/moto", ttl=600, lim={"spend": 10000})
        tok = harness.mint(gw.k1, c)
        key = {"Idempotency-Key": "order-moto-1"}

        def pay(i, amount, headers=None):
            return requests.post(gws[i % 3].url + "/pay/v1/payment_intents", data=f"amount={amount}&currency=usd",
                                 headers={"Authorization": f"Bearer {tok}", "Connection": "close", **FORM, **(headers or {})}, timeout=10)
        assert pay(0, 2000, key).status_code == 200
        assert pay(1, 2000, key).status_code == 200, "the retry, on another gateway"
        with ThreadPoolExecutor(9) as ex:
            codes = list(ex.map(lambda i: pay(i, 500).status_code, range(30)))
        assert set(codes) <= {200, 429}, codes
        paid = 2000 + 500 * codes.count(200)
        # What the ledger holds says whose fault an overspend would be: more than the cap is the
        # ledger's (its conditions), less than what was paid is the gateways'.
        spend, _ = ledger.held(ddb, TABLE, ledger.credential_pk(gw.k1, c["jti"]))
        assert paid <= spend <= 10000, (paid, spend)
        # A gateway whose signature moto refuses: no slice, no payment.
        bad_env = dict(env, AWS_SECRET_ACCESS_KEY="wrong-secret-" + harness.secrets.token_hex(8))
        bad = ledger.Gateway(workdir, "envoy-moto-bad", cfg, bad_env, port, gw.ports)
        gws.append(bad)
        c2 = harness.claims(["pay * /**"], sub="lambda/moto", ttl=600, lim={"spend": 10000})
        r = requests.post(bad.url + "/pay/v1/payment_intents", data="amount=1&currency=usd",
                          headers={"Authorization": f"Bearer {harness.mint(gw.k1, c2)}", **FORM}, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "secret_unavailable", r.text
        assert ledger.held(ddb, TABLE, ledger.credential_pk(gw.k1, c2["jti"])) == (0, 0)
    finally:
        for g in gws:
            g.stop()
        harness.stop_process(proc, 5)
        log.close()
