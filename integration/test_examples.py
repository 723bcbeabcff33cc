"""The Lambda examples (issue 6) run against `make run`, as a new user would: the local gateway
(scripts/run-local.sh: OpenBao, the demo vendor, Envoy with keyward.wasm) and the vendors' own SDKs,
stripe and anthropic, in Python and in Node. The demo vendor echoes what it received, so the test
sees that each SDK call arrived with the real key and without the workload's credential."""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import openai
import pytest
import requests

import harness

ROOT = harness.ROOT
PORTS = (8200, 8081, 10000, 9901)
STRIPE_KEY = "sk_test_keyward_demo_stripe_0001"  # the demo values run-local.sh seeds
ANTHROPIC_KEY = "sk-ant-keyward-demo-0001"


def busy(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def local_gateway():
    if any(busy(p) for p in PORTS):
        pytest.skip("make run (or something else) already holds 127.0.0.1:8200/8081/10000/9901")
    try:
        proc, token, _ = harness.start_local()
    except RuntimeError as e:
        pytest.fail(f"make run did not come up: {e}")
    yield token
    # Ctrl-C: the whole process group gets SIGINT, as a terminal sends it; a clean stop exits 0.
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0, "Ctrl-C is how make run stops: not a failure"
    assert not any(busy(p) for p in PORTS), "run-local.sh left a server running"


def check(result, token):
    intent, message = result["payment_intent"], result["message"]
    assert intent["path"] == "/v1/payment_intents" and intent["method"] == "POST"
    assert intent["headers"]["authorization"] == f"Bearer {STRIPE_KEY}"
    assert intent["headers"]["idempotency-key"] == f"order-{result['order']}"
    assert message["path"] == "/v1/messages"
    assert message["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in message["headers"], "the workload credential reached the vendor"
    assert token not in json.dumps(result)


def run_example(cmd, token, cwd):
    env = dict(os.environ, KEYWARD_URL="http://127.0.0.1:10000", KEYWARD_TOKEN=token,
               EVENT=json.dumps({"order_id": "it-1", "model": "claude-example"}))
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_python_lambda_with_stripe_and_anthropic_sdks(local_gateway):
    result = run_example([str(harness.BIN / "python"), "-W", "ignore", "handler.py"], local_gateway,
                         ROOT / "examples" / "python")
    check(result, local_gateway)


def test_node_lambda_with_stripe_and_anthropic_sdks(local_gateway):
    node_dir = ROOT / "examples" / "node"
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js is not installed")
    if not (node_dir / "node_modules").exists():
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=node_dir,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    check(run_example(["node", "handler.mjs"], local_gateway, node_dir), local_gateway)


def test_examples_parse():
    subprocess.run([str(harness.BIN / "python"), "-m", "py_compile", str(ROOT / "examples" / "python" / "handler.py")],
                   check=True)
    if shutil.which("node"):
        subprocess.run(["node", "--check", str(ROOT / "examples" / "node" / "handler.mjs")], check=True)


def test_report_says_who_called_what(local_gateway):
    """`keyward report` on make run's access log."""
    log = ROOT / ".run" / "access.log"
    run_example([str(harness.BIN / "python"), "-W", "ignore", "handler.py"], local_gateway, ROOT / "examples" / "python")
    # One denial: a method the credential does not allow.
    import requests
    r = requests.delete("http://127.0.0.1:10000/stripe/v1/customers/cus_1",
                        headers={"Authorization": f"Bearer {local_gateway}"}, timeout=10)
    assert r.status_code == 403

    def summary():
        out = harness.cli("report", str(log), "--json")
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        by = {(c["subject"], c["target"]): c for c in s["callers"]}
        demo = by.get(("lambda/demo", "stripe"), {})
        return s if demo.get("allowed", 0) >= 1 and demo.get("denied", 0) >= 1 and ("lambda/demo", "anthropic") in by else None
    s = harness.wait_until(summary, timeout=15, what="the access log lines")
    assert s["skipped"] == 0, "make run's access log holds nothing but access log lines"
    # Envoy's own log interleaved (a `2>&1` of func-e's output): its lines are skipped, not errors.
    access = log.read_text()
    alone, mixed = ROOT / ".run" / "alone.log", ROOT / ".run" / "mixed.log"
    alone.write_text(access)
    mixed.write_text((ROOT / ".run" / "envoy.log").read_text(errors="replace") + access)
    a, m = (json.loads(harness.cli("report", str(p), "--json").stdout) for p in (alone, mixed))
    assert m["skipped"] > 0 and m["callers"] == a["callers"]
    assert {"decision": "forbidden", "count": 1} in s["top_denials"]
    assert s["latency_ms"]["p50"] is not None
    text = harness.cli("report", str(log)).stdout
    assert "who called what" in text and "lambda/demo" in text
    assert local_gateway not in text


def test_make_run_derives_a_narrower_credential(local_gateway):
    """The walk-through's `keyward token --attenuate` against make run's gateway (issue 14)."""
    r = harness.cli("token", "--attenuate", "--url", "http://127.0.0.1:10000", "--token-env", "KEYWARD_TOKEN",
                    "--allow", "stripe POST /v1/payment_intents", "--ttl", "300", "--total", "1", "--run", "order-1001", "--json",
                    env={"KEYWARD_TOKEN": local_gateway})
    assert r.returncode == 0, r.stdout + r.stderr
    child = json.loads(r.stdout)["token"]
    harness.TOKENS.add(child)
    h = {"Authorization": f"Bearer {child}", "Idempotency-Key": "order-1001", "content-type": "application/x-www-form-urlencoded"}
    first = requests.post("http://127.0.0.1:10000/stripe/v1/payment_intents", headers=h, data=b"amount=100&currency=usd", timeout=10)
    assert first.status_code == 200, first.text
    again = requests.post("http://127.0.0.1:10000/stripe/v1/payment_intents", headers=h, data=b"amount=100&currency=usd", timeout=10)
    assert again.status_code == 429 and again.json()["error"] == "quota_exhausted"
    other = requests.get("http://127.0.0.1:10000/stripe/v1/customers", headers={"Authorization": f"Bearer {child}"}, timeout=10)
    assert other.status_code == 403, "the parent may; the child may not"


def test_make_run_walk_through_caps_spend(local_gateway):
    """The walk-through's spend cap (issue 16), as run-local.sh prints it: 100.00 USD of
    PaymentIntents, a payment that does not fit refused before the vendor, a retry not charged
    twice, and `keyward report` showing what was spent."""
    script = (ROOT / "scripts" / "run-local.sh").read_text()
    mint_line = next(l for l in script.splitlines() if "--spend 10000" in l)
    assert '--allow "stripe POST /v1/payment_intents"' in mint_line
    key = (ROOT / ".run" / "k1.key")
    r = harness.cli("mint", "--kid", "k1", "--key-file", str(key), "--sub", "lambda/demo", "--allow", "stripe POST /v1/payment_intents",
                    "--spend", "10000", "--run", "walkthrough", "--json")
    assert r.returncode == 0, r.stderr
    capped = json.loads(r.stdout)["token"]
    harness.TOKENS.add(capped)
    url = "http://127.0.0.1:10000/stripe/v1/payment_intents"

    def pay(order, amount):
        return requests.post(url, headers={"Authorization": f"Bearer {capped}", "Idempotency-Key": order,
                                           "content-type": "application/x-www-form-urlencoded"},
                             data=f"amount={amount}&currency=usd", timeout=10)
    first = pay("order-2001", 6000)
    assert first.status_code == 200 and first.json()["headers"]["authorization"] == f"Bearer {STRIPE_KEY}", first.text
    over = pay("order-2002", 4001)
    assert over.status_code == 429 and over.json()["error"] == "spend_exhausted", over.text
    assert pay("order-2001", 6000).status_code == 200, "a retry is not charged twice"
    assert pay("order-2003", 4000).status_code == 200
    assert pay("order-2004", 1).status_code == 429

    def spent():
        out = json.loads(harness.cli("report", str(ROOT / ".run" / "access.log"), "--json").stdout)
        rows = [x for x in out["spend"] if x["run"] == "walkthrough"]
        return rows if rows and rows[0]["requests"] == 3 else None
    rows = harness.wait_until(spent, timeout=15, what="the access log lines")
    assert rows == [{"subject": "lambda/demo", "run": "walkthrough", "target": "stripe", "requests": 3, "charged": 10000,
                     "refunded": 0, "net": 10000, "retries": 1}], rows


def test_make_run_walk_through_caps_model_calls_at_5_usd(local_gateway):
    """The walk-through's AI cap, as run-local.sh prints it: 5.00 USD of o1-pro calls (prices in
    micro-dollars), the call that would cross the cap refused before the vendor, a smaller one
    still fitting, the same calls again with the unmodified OpenAI SDK, and `keyward report`."""
    script = (ROOT / "scripts" / "run-local.sh").read_text()
    mint_line = next(l for l in script.splitlines() if "export AGENT=" in l)
    assert '--allow "openai POST /v1/chat/completions"' in mint_line
    calls = [json.loads(l.split("-d '", 1)[1].split("'", 1)[0]) for l in script.splitlines() if "$AGENT" in l and "-d '" in l]
    assert [c["max_tokens"] for c in calls] == [4000, 4000, 1000]
    r = harness.cli("mint", "--kid", "k1", "--key-file", str(ROOT / ".run" / "k1.key"), "--sub", "agent/planner",
                    "--allow", "openai POST /v1/chat/completions", "--spend", "5000000", "--run", "ai-walkthrough", "--json")
    assert r.returncode == 0, r.stderr
    agent = json.loads(r.stdout)["token"]
    harness.TOKENS.add(agent)
    url = "http://127.0.0.1:10000/openai/v1/chat/completions"
    got = [requests.post(url, headers={"Authorization": f"Bearer {agent}"}, json=c, timeout=20) for c in calls]
    assert [g.status_code for g in got] == [200, 429, 200], [g.text[:200] for g in got]
    assert got[1].json()["error"] == "spend_exhausted"
    assert got[0].json()["headers"]["authorization"] == "Bearer sk-keyward-demo-openai-0001", "the demo vendor got the real key"
    # What the vendor reported, priced at o1-pro's 150 and 600 USD per million tokens.
    spent = sum(math.ceil((g.json()["usage"]["prompt_tokens"] * 150_000_000 + g.json()["usage"]["completion_tokens"] * 600_000_000) / 1e6)
                for g in (got[0], got[2]))
    assert 2_500_000 < spent <= 5_000_000
    # The same with the OpenAI SDK: one more 4000-token call does not fit what is left.
    oa = openai.OpenAI(api_key=agent, base_url="http://127.0.0.1:10000/openai/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(model="o1-pro", max_tokens=4000, messages=[{"role": "user", "content": "Plan a trip to Faro."}])
    small = oa.chat.completions.create(model="o1-pro", max_tokens=100, messages=[{"role": "user", "content": "Faro?"}])
    spent += math.ceil((small.usage.prompt_tokens * 150_000_000 + small.usage.completion_tokens * 600_000_000) / 1e6)

    def rows():
        out = json.loads(harness.cli("report", str(ROOT / ".run" / "access.log"), "--json").stdout)
        mine = [x for x in out["spend"] if x["run"] == "ai-walkthrough"]
        return mine if mine and mine[0]["requests"] == 3 else None
    (row,) = harness.wait_until(rows, timeout=15, what="the access log lines")
    assert row["net"] == spent <= 5_000_000, (row, spent)


REST_EVENT = {"resource": "/orders", "path": "/orders", "httpMethod": "POST",
              "headers": {"X-Amzn-Trace-Id": "Root=1-6751e0a0-rest0000000000000000001"},
              "requestContext": {"requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef", "stage": "prod", "apiId": "abc123"},
              "body": json.dumps({"order_id": "apigw-rest", "model": "claude-example"})}
HTTP_EVENT = {"version": "2.0", "routeKey": "POST /orders", "rawPath": "/orders",
              "headers": {"x-amzn-trace-id": "Root=1-6751e0a0-http0000000000000000002"},
              "requestContext": {"requestId": "JKJaXmPLvHcESHA=", "http": {"method": "POST", "path": "/orders"}},
              "body": json.dumps({"order_id": "apigw-http", "model": "claude-example"})}


def test_run_labels_and_trace_headers_from_api_gateway_events():
    """Python and Node helpers agree: the API request id of REST and HTTP API events, else
    Lambda's; the trace header from Lambda's environment first, else the event."""
    import sys
    sys.path.insert(0, str(ROOT / "examples" / "python"))
    from keyward_credentials import run_label, trace_headers

    class Ctx:
        aws_request_id = "8f5e3c2a-lambda"
    cases = [(REST_EVENT, None, "apigw/c6af9ac6-7b61-11e6-9a41-93e8deadbeef"), (HTTP_EVENT, Ctx(), "apigw/JKJaXmPLvHcESHA="),
             ({"Records": []}, Ctx(), "lambda/8f5e3c2a-lambda"), ({}, None, None),
             ({"requestContext": {"requestId": "a\nb" + "x" * 300}}, None, "apigw/ab" + "x" * 120),
             # At most 128 bytes, cut on a character boundary (what the gateway takes).
             ({"requestContext": {"requestId": "é" * 200}}, None, "apigw/" + "é" * 61)]
    env = {k: v for k, v in os.environ.items() if k != "_X_AMZN_TRACE_ID"}
    old = os.environ.pop("_X_AMZN_TRACE_ID", None)
    try:
        for event, ctx, want in cases:
            assert run_label(event, ctx) == want
        assert trace_headers(REST_EVENT) == {"X-Amzn-Trace-Id": REST_EVENT["headers"]["X-Amzn-Trace-Id"]}
        assert trace_headers(HTTP_EVENT) == {"X-Amzn-Trace-Id": HTTP_EVENT["headers"]["x-amzn-trace-id"]}
        assert trace_headers({}) == {}
        for bad in ("Root=1-☃", "x" * 300, "a\rb"):
            assert trace_headers({"headers": {"X-Amzn-Trace-Id": bad}}) == {}, bad
        os.environ["_X_AMZN_TRACE_ID"] = "Root=1-lambda"
        assert trace_headers(HTTP_EVENT) == {"X-Amzn-Trace-Id": "Root=1-lambda"}
    finally:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
        if old is not None:
            os.environ["_X_AMZN_TRACE_ID"] = old
    if shutil.which("node") is None:
        return
    script = ("import { runLabel, traceHeaders } from './keyward_credentials.mjs';"
              "const cases = JSON.parse(process.env.CASES);"
              "console.log(JSON.stringify(cases.map(([e, c]) => [runLabel(e, c) ?? null, traceHeaders(e)])));")
    node_cases = [[REST_EVENT, None], [HTTP_EVENT, {"awsRequestId": "8f5e3c2a-lambda"}], [{"Records": []}, {"awsRequestId": "8f5e3c2a-lambda"}], [{}, None],
                  [{"requestContext": {"requestId": "é" * 200}, "headers": {"x-amzn-trace-id": "Root=1-☃"}}, None]]
    r = subprocess.run(["node", "--input-type=module", "-e", script], cwd=ROOT / "examples" / "node", capture_output=True, text=True,
                       env=dict(env, CASES=json.dumps(node_cases)), timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        ["apigw/c6af9ac6-7b61-11e6-9a41-93e8deadbeef", {"X-Amzn-Trace-Id": REST_EVENT["headers"]["X-Amzn-Trace-Id"]}],
        ["apigw/JKJaXmPLvHcESHA=", {"X-Amzn-Trace-Id": HTTP_EVENT["headers"]["x-amzn-trace-id"]}],
        ["lambda/8f5e3c2a-lambda", {}], [None, {}], ["apigw/" + "é" * 61, {}]]


def access_lines(marker):
    lines = []
    for l in (ROOT / ".run" / "access.log").read_text(errors="replace").splitlines():
        try:
            e = json.loads(l)
        except ValueError:
            continue
        if e.get("run") == marker:
            lines.append(e)
    return lines


@pytest.mark.parametrize("event", [REST_EVENT, HTTP_EVENT], ids=["rest", "http"])
def test_api_gateway_handlers_join_the_access_log(local_gateway, event):
    """examples/python/apigw_handler.py and examples/node/apigw_handler.mjs behind a REST and an
    HTTP API event, against make run: each call of the invocation is in Keyward's access log
    under the API request id (`run`) and the trace id, with the real keys at the vendor."""
    runs = [([str(harness.BIN / "python"), "-W", "ignore", "-c",
              "import json, os, apigw_handler; print(json.dumps(apigw_handler.handler(json.loads(os.environ['EVENT']), None)))"],
             ROOT / "examples" / "python")]
    if shutil.which("node") is not None and (ROOT / "examples" / "node" / "node_modules").exists():
        runs.append((["node", "apigw_handler.mjs"], ROOT / "examples" / "node"))
    trace = next(v for k, v in event["headers"].items() if k.lower() == "x-amzn-trace-id")
    for cmd, cwd in runs:
        env = dict(os.environ, KEYWARD_URL="http://127.0.0.1:10000", KEYWARD_TOKEN=local_gateway, EVENT=json.dumps(event))
        env.pop("_X_AMZN_TRACE_ID", None)
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["statusCode"] == 200
        check(json.loads(out["body"]), local_gateway)
        run = "apigw/" + event["requestContext"]["requestId"]

        def logged():
            lines = access_lines(run)
            return lines if {e.get("target") for e in lines} >= {"stripe", "anthropic"} else None
        lines = harness.wait_until(logged, timeout=15, what="the invocation's access log lines")
        assert all(e["trace_id"] == trace for e in lines if e.get("target") in ("stripe", "anthropic")), lines
        assert local_gateway not in (ROOT / ".run" / "access.log").read_text(errors="replace")


def test_the_sam_example_passes_cfn_lint_and_runs_the_tested_handler():
    r = subprocess.run([str(harness.BIN / "cfn-lint"), str(ROOT / "examples" / "sam" / "template.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    t = yaml.load((ROOT / "examples" / "sam" / "template.yaml").read_text(), Loader=Loader)
    fn = t["Resources"]["OrdersFunction"]["Properties"]
    assert fn["Handler"] == "apigw_handler.handler" and (ROOT / "examples" / "sam" / fn["CodeUri"] / "apigw_handler.py").exists()
    assert set(fn["Environment"]["Variables"]) == {"KEYWARD_URL", "KEYWARD_TOKEN_PARAMETER"}
    assert t["Globals"]["Function"]["Tracing"] == "Active"
