"""What operators watch (issue 15): labelled Prometheus metrics from real Envoy (target, code,
store as labels through the shipped tag extraction), the two latency histograms, and the shipped
dashboard and alert rules checked by real tools (promtool, the dashboard's JSON schema)."""
import json
import re
import subprocess

import pytest
import yaml

import executor
import harness

ROOT = harness.ROOT
SHIPPED = sorted(p.name for p in (ROOT / "envoy").glob("*.yaml"))


def series(text, name):
    """{frozenset(labels): value} of one metric family in Prometheus text."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out[labels] = float(m.group(2))
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_bootstrap_extracts_the_same_labels(name):
    ref = yaml.safe_load((ROOT / "envoy" / "egress-gateway.yaml").read_text())["stats_config"]
    assert yaml.safe_load((ROOT / "envoy" / name).read_text())["stats_config"] == ref


def test_metrics_carry_target_code_and_store_labels(gw):
    t = gw.token(allow=["stripe GET /v1/**"])
    tag = harness.secrets.token_hex(3)
    for _ in range(3):
        assert gw.get(f"/stripe/v1/obs-{tag}", t).status_code == 200
    assert gw.get(f"/stripe/v1/obs-{tag}", None).status_code == 401
    assert gw.get(f"/stripe/v1/obs-{tag}", t, method="DELETE").status_code == 403
    gw.vendor.take()
    text = gw.envoy.prometheus()
    reqs = series(text, "keyward_target_requests_total")
    allow = reqs.get(frozenset({("target", "stripe"), ("code", "allow")}), 0)
    assert allow >= 3, sorted(reqs)
    assert reqs.get(frozenset({("target", "stripe"), ("code", "missing_credential")}), 0) >= 1
    assert reqs.get(frozenset({("target", "stripe"), ("code", "forbidden")}), 0) >= 1
    assert all(dict(k).keys() == {"target", "code"} for k in reqs), "no label left in a metric name"
    fetches = series(text, "keyward_store_fetches_total")
    assert any(dict(k).get("result") == "ok" and dict(k).get("store") for k in fetches), sorted(fetches)
    # Histograms: the filter's own added time (hit and denied) and the store's answer time.
    # Envoy merges histograms into the admin's view at its stats flush (every 5 s).
    harness.wait_until(lambda: series(gw.envoy.prometheus(), "keyward_added_microseconds_count").get(frozenset({("outcome", "hit")}), 0) >= 1,
                       timeout=12, what="the histograms' flush")
    text = gw.envoy.prometheus()
    added = series(text, "keyward_added_microseconds_count")
    assert added.get(frozenset({("outcome", "hit")}), 0) >= 1 and added.get(frozenset({("outcome", "denied")}), 0) >= 2, sorted(added)
    assert series(text, "keyward_added_microseconds_bucket"), "a real histogram, with buckets"
    assert any(dict(k).get("store") for k in series(text, "keyward_store_fetch_microseconds_count"))
    # Prometheus's conventions: counters end in _total, histograms name their unit, codes and
    # outcomes are labels; no code is left inside a metric name.
    decided = series(text, "keyward_requests_total")
    assert decided.get(frozenset({("decision", "allow")}), 0) >= 3 and decided.get(frozenset({("decision", "forbidden")}), 0) >= 1, sorted(decided)
    lookups = series(text, "keyward_cache_lookups_total")
    assert {dict(k)["outcome"] for k in lookups} == {"hit", "miss", "stale"}, "defined up front"
    names = {m.group(1) for m in re.finditer(r"^# TYPE (keyward_\w+) (\w+)$", text, re.M)}
    types = dict(re.findall(r"^# TYPE (keyward_\w+) (\w+)$", text, re.M))
    assert names and all(n.endswith("_total") for n, t in types.items() if t == "counter"), types
    assert all(n.endswith(("_microseconds", "_bytes")) for n, t in types.items() if t in ("histogram", "gauge")), types
    assert not any(re.search(r"_(denied|allowed|ok|error|hit|miss)(_|$)", n) for n in names), names
    # The buckets are the documented ones (microseconds, up to 30 s), not Envoy's defaults.
    les = {dict(k).get("le") for k in series(text, "keyward_added_microseconds_bucket")}
    assert {"100", "1000", "10000", "100000", "1000000", "30000000"} <= les, sorted(les)


def promtool():
    return harness.ROOT / ".tools" / "bin" / "promtool"


def test_alert_rules_pass_promtool_and_their_unit_tests():
    obs = ROOT / "deploy" / "observability"
    r = subprocess.run([str(promtool()), "check", "rules", str(obs / "alerts.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(promtool()), "test", "rules", str(obs / "alerts.test.yaml")], capture_output=True, text=True, cwd=obs)
    assert r.returncode == 0, r.stdout + r.stderr
    names = {rule["alert"] for g in yaml.safe_load((obs / "alerts.yaml").read_text())["groups"] for rule in g["rules"] if "alert" in rule}
    assert {"KeywardRevocationRefreshFailing", "KeywardServingStaleSecrets", "KeywardDenialsSpiking",
            "KeywardStoreErrors", "KeywardWasmVmDead"} <= names


def test_every_alert_has_a_runbook_section():
    obs = ROOT / "deploy" / "observability"
    rules = [r for g in yaml.safe_load((obs / "alerts.yaml").read_text())["groups"] for r in g["rules"] if "alert" in r]
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    sections = set(re.findall(r"^## (\w+)$", runbook, re.M))
    for r in rules:
        url = r["annotations"].get("runbook_url", "")
        assert url == "{{ $externalLabels.runbooks }}/docs/runbook.md#" + r["alert"].lower(), r["alert"]
        assert r["alert"] in sections, f"docs/runbook.md has no section for {r['alert']}"
    assert {"KeywardVaultAuthFailing", "KeywardLimitTableFull", "KeywardMetricsAbsent"} <= {r["alert"] for r in rules}


def test_alerts_and_dashboard_only_use_metrics_the_gateway_exports(gw):
    """Every keyward_* name in the rules and the dashboard is one real Envoy exports."""
    text = gw.envoy.prometheus()
    exported = {m.group(1) for m in re.finditer(r"^(keyward_\w+?)(?:\{| )", text, re.M)}
    exported |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported}
    obs = ROOT / "deploy" / "observability"
    used = set(re.findall(r"\b(keyward_[a-z_]+)", (obs / "alerts.yaml").read_text() + (obs / "grafana-dashboard.json").read_text()))
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    # The fleet ledger's are exported by gateways with a ledger (checked in test_ledger.py).
    used = {n for n in used if not n.startswith(("keyward_ledger_", "keyward_budget_"))}
    assert used and used <= exported, used - exported


def test_dashboard_matches_the_grafana_schema(tmp_path):
    import jsonschema
    obs = ROOT / "deploy" / "observability"
    schema = json.loads((obs / "grafana-dashboard.schema.json").read_text())
    doc = json.loads((obs / "grafana-dashboard.json").read_text())
    jsonschema.validate(doc, schema)
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    # Every query parses: promtool checks them as recording rules.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"keyward:panel_{i}", "expr": e.replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}
    f = tmp_path / "dashboard-rules.yaml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run([str(promtool()), "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert any("keyward_added_microseconds_bucket" in e and "histogram_quantile" in e for e in exprs)
    assert any("keyward_target_requests_total" in e and "code" in e for e in exprs)


def test_memory_gauge_is_the_serving_vms_linear_memory(gw):
    """`keyward_wasm_memory_bytes` (issue 17) is a VM's linear memory: a whole number of 64 KiB wasm
    pages, at least the module's data and configured tables, and set once the VM has served."""
    if executor.is_native():
        pytest.skip("the native module has no VM (docs/executors.md)")
    assert gw.get("/stripe/v1/gauge", gw.token(allow=["stripe GET /v1/**"])).status_code == 200
    gw.vendor.take()
    value = gw.envoy.stats().get("wasmcustom.keyward_wasm_memory_bytes", 0)
    assert value > 0 and value % 65536 == 0, value
    assert 256 * 1024 <= value <= 64 * 1024 * 1024, value
