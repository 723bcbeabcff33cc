"""Revocation at scale (issue 13): 10,000 live entries end to end, in the compact list form that
`keyward revoke` writes (two JSON strings, within OpenBao's request limits), with the figures
printed: list size, revoke-to-deny time through the CLI, and Envoy's memory for the list."""
import json
import time

import requests

import harness
from test_revocation import time_to_revoked, vault_env

N = 10_000


def rss_kb(pid) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_ten_thousand_revocations_end_to_end(gw):
    now = int(time.time())
    ok = gw.token(["stripe GET /v1/**"], sub="lambda/scale-ok")
    assert gw.get("/stripe/v1/scale", ok).status_code == 200
    rss_before = rss_kb(gw.envoy.proc.pid)
    # 10,000 live entries, and 100 of credentials that expired an hour ago.
    live = [f"jti:scale-{i:05}\t{now + 3600}\tleaked in a log [2026-12-02T00:00:00Z]" for i in range(N)]
    dead = [f"jti:expired-{i:03}\t{now - 3600}\told" for i in range(100)]
    body = {"data": {"format": "keyward-revocations/2", "entries": "\n".join(live + dead) + "\n",
                     "jti:seed-entry": "kept so the list is never empty"}}
    r = requests.post(f"{gw.bao.addr}/v1/secret/data/it/revoked", json=body, headers={"X-Vault-Token": gw.bao.token}, timeout=10)
    r.raise_for_status()
    size = len(json.dumps(body))
    listed = harness.mint(gw.k1, {**harness.claims(["stripe GET /v1/**"], sub="lambda/scale"), "jti": "scale-04242"})
    harness.wait_until(lambda: gw.get("/stripe/v1/scale", listed).status_code == 401, timeout=10, what="the 10,000-entry list in force")
    assert gw.get("/stripe/v1/scale", ok).status_code == 200, "a credential not on the list is served"
    rss_after = rss_kb(gw.envoy.proc.pid)

    # keyward revoke on a 10,000-entry list: read, add, check-and-set write; then every worker denies.
    c = harness.claims(["stripe GET /v1/**"], sub="lambda/scale-new")
    t = harness.mint(gw.k1, c)
    assert gw.get("/stripe/v1/scale", t).status_code == 200
    at = time.time()
    out = harness.cli("revoke", "--jti", c["jti"], "--expires-at", str(c["exp"]), "--reason", "scale test", "--path", "it/revoked", env=vault_env(gw))
    assert out.returncode == 0, out.stderr
    cli_s = time.time() - at
    took = time_to_revoked(gw, t, "/stripe/v1/scale", at, limit=8)
    # --prune drops the expired entries and keeps the live ones.
    out = harness.cli("revoke", "--prune", "--path", "it/revoked", env=vault_env(gw))
    assert out.returncode == 0, out.stderr
    assert "pruned 100 entries" in out.stdout, out.stdout
    listing = json.loads(harness.cli("revoked", "--path", "it/revoked", "--json", env=vault_env(gw)).stdout)
    assert len(listing["entries"]) == N + 2, len(listing["entries"])  # the live ones, the seed, the new one
    assert gw.get("/stripe/v1/scale", listed).status_code == 401
    print(f"\n10,000 revocations: list {size / 1024:.0f} KiB in one KV version; keyward revoke {cli_s:.2f}s; "
          f"revoke -> deny on every worker {took:.2f}s (refresh_s=1); Envoy RSS +{(rss_after - rss_before) / 1024:.1f} MiB "
          f"for the list (main thread and 2 workers each hold a copy, plus shared data)")
    assert took <= 3.0, took
    # Back to a small list for the other tests.
    gw.bao.put("it/revoked", {"jti:seed-entry": "kept so the list is never empty"})
    harness.wait_until(lambda: gw.get("/stripe/v1/scale", listed).status_code == 200, timeout=10, what="the small list again")
    gw.vendor.take()
