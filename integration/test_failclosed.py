"""A panicking module fails closed (issue 5): with `fail_open: false`, a request that makes the
module panic gets a 5xx, never reaches the vendor, and neither do the requests after it while the
VM is down. The panic comes from a test-only build (`--features panic-test`, dist/test/); the
shipped module has no trigger."""
import json

import pytest
import requests

import envoy_config
import harness
from conftest import assert_no_leaks

PANIC_WASM = harness.ROOT / "dist" / "test" / "keyward-panic.wasm"


def test_the_shipped_module_has_no_panic_trigger():
    assert b"x-keyward-test-panic" not in harness.WASM.read_bytes()
    assert b"x-keyward-test-panic" in PANIC_WASM.read_bytes()


@pytest.fixture(scope="module")
def panicky(gw, workdir):
    vendor = harness.Vendor()
    ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port(), vendor=vendor.port)
    log = workdir / "access-panic.log"
    b = envoy_config.bootstrap(ports, log)
    text = json.dumps(b).replace('"dist/keyward.wasm"', json.dumps(str(PANIC_WASM)))
    e = harness.Envoy(workdir, json.loads(text), gw.env, name="envoy-panic", concurrency=1)
    e.url = f"http://127.0.0.1:{ports['hardened']}"
    e.vendor = vendor
    yield e
    assert_no_leaks(e.log_path.read_text(errors="replace") + (log.read_text() if log.exists() else ""), "the panicking Envoy's logs")
    e.stop()
    vendor.stop()


def test_a_panicking_module_fails_closed(gw, panicky):
    t = gw.token(["stripe * /**"])
    h = {"Authorization": f"Bearer {t}"}
    ok = requests.get(panicky.url + "/stripe/v1/customers", headers=h, timeout=10)
    assert ok.status_code == 200, ok.text
    assert len(panicky.vendor.take()) == 1
    boom = requests.get(panicky.url + "/stripe/v1/customers", headers={**h, "x-keyward-test-panic": "1"}, timeout=10)
    assert boom.status_code == 503, boom.text
    assert gw.s["stripe"] not in boom.text
    # The VM is down: every later request on this worker is refused too, none forwarded.
    after = [requests.get(panicky.url + "/stripe/v1/customers", headers=h, timeout=10) for _ in range(5)]
    assert [r.status_code for r in after] == [503] * 5
    assert panicky.vendor.take() == []
    text = panicky.log_path.read_text(errors="replace")
    assert "panicked at" in text and "proxy_on_request_headers failed" in text
