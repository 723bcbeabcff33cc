"""Configuration errors refuse to start, naming the offending path; shipped configs validate."""
import base64
import copy
import secrets

import pytest

import envoy_config
import harness
from shipped import ENV_ONLY, runnable_here  # noqa: F401 (used below)

ROOT = harness.ROOT


def env():
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    tok = "cfg-token-" + secrets.token_hex(6)
    harness.SECRETS.update({key, tok})
    return {"KEYWARD_KEY_K1": key, "VAULT_TOKEN": tok}


def bootstrap_with(cfg):
    ports = {k: harness.free_port() for k in ["admin", "hardened", "raw", "vendor", "bao", "dead", "hang", "rev"]}
    return envoy_config.bootstrap(ports, "/dev/null", cfg)


def broken(edit):
    cfg = copy.deepcopy(envoy_config.filter_config())
    edit(cfg)
    return cfg


CASES = [
    (lambda c: c["targets"]["stripe"]["secret"].update(store="bao2"), 'targets.stripe.secret.store: unknown store "bao2"'),
    (lambda c: c["targets"]["stripe"].update(colour="blue"), "targets.stripe.colour: unknown field `colour`"),
    (lambda c: c["targets"]["stripe"].update(allow=["GET /v1/**/x"]), "targets.stripe.allow[0]"),
    (lambda c: c["signing_keys"]["k1"].update(env="KEYWARD_KEY_SHORT"), "signing_keys.k1.env: key is 16 bytes"),
    (lambda c: c["signing_keys"]["k1"].update(env="NOT_SET_ANYWHERE"), "signing_keys.k1.env: environment variable NOT_SET_ANYWHERE is not set"),
    (lambda c: c["stores"]["bao"].update(token_env="NO_TOKEN_HERE"), "stores.bao.token_env"),
    (lambda c: c.update(audience=""), "audience"),
    (lambda c: c.pop("targets"), "missing field `targets`"),
]


@pytest.mark.parametrize("edit,message", CASES)
def test_broken_config_refuses_to_start(workdir, edit, message):
    e = env()
    e["KEYWARD_KEY_SHORT"] = base64.b64encode(b"only-16-bytes-xx").decode()
    b = bootstrap_with(broken(edit))
    # The short key's host_env_keys entry must be listed for the module to see it.
    for l in b["static_resources"]["listeners"]:
        f = l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
        f["typed_config"]["config"]["vm_config"]["environment_variables"]["host_env_keys"].append("KEYWARD_KEY_SHORT")
    code, log = harness.validate(workdir, b, e)
    assert code != 0, log[-2000:]
    assert message in log, log[-2000:]
    assert "configuration rejected" in log
    for v in e.values():
        assert v not in log, "a secret from the environment reached the log"


def test_not_json_refuses_to_start(workdir):
    b = bootstrap_with(envoy_config.filter_config())
    for l in b["static_resources"]["listeners"]:
        f = l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
        f["typed_config"]["config"]["configuration"]["value"] = '{"audience": "keyward",'
    code, log = harness.validate(workdir, b, env())
    assert code != 0 and "not valid JSON" in log


SHIPPED = sorted(p.name for p in (ROOT / "envoy").glob("*.yaml"))
def test_every_required_config_ships():
    assert {"local.yaml", "egress-gateway.yaml", "sidecar.yaml", "aws-secrets-manager.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_lint(workdir, name):
    import yaml
    doc = runnable_here(yaml.safe_load((ROOT / "envoy" / name).read_text()))
    lint_args = []
    if name == "aws-gateway.yaml":
        # Its filter comes by ECDS: the file config-sync writes from the stack's configuration.
        ecds = with_ecds_file(workdir, doc)
        lint_args = ["--ecds", str(ecds)]
    e = env()
    e.update({"VAULT_ROLE_ID": "cfg-role", "VAULT_SECRET_ID": "cfg-secret-" + secrets.token_hex(6)})
    code, log = harness.validate(workdir, doc, e, name=name.split(".")[0])
    assert code == 0, log[-3000:]
    # (Validation does not load an ECDS file; test_aws_only runs aws-gateway.yaml for real.)
    assert "configured: audience=keyward" in log or lint_args
    r = harness.cli("check-envoy", str(ROOT / "envoy" / name), "--no-env", *lint_args)
    assert r.returncode == 0, r.stdout + r.stderr


def with_ecds_file(workdir, doc):
    """Write the ECDS file of envoy/aws-gateway.yaml with `keyward config-sync` (the stack's
    configuration, the shipped template with the wasm from dist/) and point `doc` at it."""
    import json
    import test_aws_only
    # Its own directory: the AWS-only stack's entrypoint writes workdir/run (an equal file there
    # would make its first sync "unchanged").
    run = workdir / "run-check-config"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(test_aws_only.stack_config(test_aws_only.cfn()))
    template = json.loads((ROOT / "envoy" / "keyward-filter.template.json").read_text())
    template["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(ROOT / "dist" / "keyward.wasm")
    (run / "template.json").write_text(json.dumps(template))
    r = harness.cli("config-sync", "--source", f"file:{run / 'config.json'}", "--template", str(run / "template.json"),
                    "--out", str(run / "keyward-filter.json"), "--no-env")
    assert r.returncode == 0, r.stdout + r.stderr
    for l in doc["static_resources"]["listeners"]:
        for f in l["filter_chains"][0]["filters"][0]["typed_config"].get("http_filters", []):
            if "config_discovery" in f:
                src = f["config_discovery"]["config_source"]["path_config_source"]
                src["path"] = str(run / "keyward-filter.json")
                src["watched_directory"]["path"] = str(run)
    return run / "keyward-filter.json"


def test_check_envoy_refuses_logging_the_query_where_a_key_is_injected_there(tmp_path):
    """A key injected into the query is in `:path` once the filter has run: check-envoy refuses
    every format that prints `:path` with its query on such a config, and a router that would copy
    it into x-envoy-original-path. Envoy's default format prints x-envoy-original-path, which the
    filter sets to the path the workload sent: accepted."""
    local = (ROOT / "envoy" / "local.yaml").read_text()
    assert '"inject": {"type": "query", "name": "key"}' in local
    refused = {
        "%REQ(:PATH)%": local.replace('path: "%PATH(NQ:PATH)%"', 'path: "%REQ(:PATH)%"', 1),
        "the router copying the path": local.replace("suppress_envoy_headers: true", "suppress_envoy_headers: false", 1),
    }
    for what, text in refused.items():
        assert text != local, what
        f = tmp_path / "local.yaml"
        f.write_text(text)
        r = harness.cli("check-envoy", str(f), "--no-env")
        assert r.returncode != 0, what
    f = tmp_path / "local.yaml"
    f.write_text(local.replace('path: "%PATH(NQ:PATH)%"', 'path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"', 1))
    r = harness.cli("check-envoy", str(f), "--no-env")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.json"
    good.write_text((ROOT / "tests" / "fixtures" / "contract-config.json").read_text())
    r = harness.cli("check-config", str(good), "--no-env")
    assert r.returncode == 0 and "targets=[anthropic,maps,stripe,twilio]" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(good.read_text().replace('"store": "aws"', '"store": "aws2"'))
    r = harness.cli("check-config", str(bad), "--no-env")
    assert r.returncode != 0 and 'targets.anthropic.secret.store: unknown store "aws2"' in r.stderr
