"""Graceful drain (issue 15): the image's entrypoint (deploy/keyward-envoy.sh) turns SIGTERM into
Envoy's graceful drain, so that a request in flight when ECS or Kubernetes stops the gateway is
finished, not cut; plain Envoy cuts it (shown here too). Real Envoy with keyward.wasm, real
OpenBao; the vendor takes 2 s to answer."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import requests

import envoy_config
import harness

SCRIPT = harness.ROOT / "deploy" / "keyward-envoy.sh"


def start(gw, workdir, name, wrapped):
    vendor = harness.Vendor()
    vendor.slow_s = 2.0
    ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port(), vendor=vendor.port)
    cfg = workdir / f"{name}.json"
    cfg.write_text(json.dumps(envoy_config.bootstrap(ports, workdir / f"access-{name}.log")))
    env = dict(os.environ, **gw.env, ADMIN=f"127.0.0.1:{ports['admin']}", DRAIN_S="10", ENVOY=str(harness.BIN / "envoy"))
    cmd = ([str(SCRIPT)] if wrapped else [str(harness.BIN / "envoy")]) + ["-c", str(cfg), "--concurrency", "1", "--base-id", str(harness.free_port())]
    log = open(workdir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=harness.ROOT)
    url = f"http://127.0.0.1:{ports['hardened']}"
    harness.wait_until(lambda: requests.get(url + "/keyward/health", timeout=2).status_code == 200, timeout=40, what="ready")
    return proc, url, vendor, log


def in_flight(url, token, out):
    try:
        out["r"] = requests.get(url + "/stripe/v1/slow", headers={"Authorization": f"Bearer {token}"}, timeout=15)
    except requests.RequestException as e:
        out["error"] = e


@pytest.mark.parametrize("wrapped", [True, False], ids=["keyward-envoy", "plain-envoy"])
def test_sigterm_finishes_requests_in_flight(gw, workdir, wrapped):
    proc, url, vendor, log = start(gw, workdir, f"drain-{wrapped}", wrapped)
    try:
        t = gw.token(["stripe GET /v1/**"])
        out = {}
        th = threading.Thread(target=in_flight, args=(url, t, out))
        th.start()
        harness.wait_until(lambda: len(vendor.requests) == 1, timeout=5, what="the slow call at the vendor")
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        th.join(timeout=20)
        if wrapped:
            assert "r" in out and out["r"].status_code == 200, out
            code = proc.wait(timeout=15)
            took = time.monotonic() - stopped
            assert code == 0 and took < 8, f"exited {code} after {took:.1f} s: done when nothing is in flight, not after DRAIN_S"
            text = (workdir / f"drain-{wrapped}.log").read_text()
            assert "draining for up to 10s" in text
        else:
            assert "error" in out or out["r"].status_code >= 500, "plain Envoy cuts the request in flight"
            proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        vendor.stop()
