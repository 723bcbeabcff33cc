"""Deployment artefacts (issue 6): the ECS task definition and service against botocore's ECS API
model, the IAM policies, the Kubernetes manifests against the official schemas (strict), the Istio
and Envoy Gateway resources for required fields, every embedded filter configuration through
`keyward check-config`, and the Dockerfiles against what they copy."""
import fnmatch
import json
import subprocess
import sys

import pytest
import yaml

import harness

ROOT = harness.ROOT
ECS = ROOT / "deploy" / "ecs"
K8S = ROOT / "deploy" / "k8s"


def host_env_keys(envoy_yaml):
    doc = yaml.safe_load(envoy_yaml.read_text())
    keys = set()
    for l in doc["static_resources"]["listeners"]:
        for f in l["filter_chains"][0]["filters"]:
            for h in f["typed_config"].get("http_filters", []):
                vm = h["typed_config"].get("config", {}).get("vm_config")
                if vm:
                    keys |= set(vm["environment_variables"]["host_env_keys"])
    return keys


@pytest.mark.parametrize("name,operation", [("task-definition.json", "RegisterTaskDefinition"),
                                            ("service.json", "CreateService")])
def test_ecs_json_matches_the_ecs_api(name, operation):
    import botocore.session
    from botocore.validate import ParamValidator
    model = botocore.session.get_session().get_service_model("ecs")
    report = ParamValidator().validate(json.loads((ECS / name).read_text()), model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


def test_task_definition_wires_what_the_gateway_config_needs():
    td = json.loads((ECS / "task-definition.json").read_text())
    (c,) = td["containerDefinitions"]
    assert {s["name"] for s in c["secrets"]} == host_env_keys(ROOT / "envoy" / "egress-gateway.yaml")
    assert "--log-level" in c["command"] and c["command"][c["command"].index("--log-level") + 1] in ("info", "warn", "error")
    assert {p["containerPort"] for p in c["portMappings"]} == {10000, 9902}
    assert c["readonlyRootFilesystem"] is True and c["user"] != "0"
    # The execution role may read exactly the secrets the task definition injects.
    exec_policy = json.loads((ECS / "iam-execution-role-policy.json").read_text())
    allowed = [r for st in exec_policy["Statement"] if "secretsmanager:GetSecretValue" in st["Action"] for r in st["Resource"]]
    for s in c["secrets"]:
        arn = s["valueFrom"].split(":role_id")[0].split(":secret_id")[0]
        assert any(fnmatch.fnmatchcase(arn, pat) for pat in allowed), arn


def test_iam_policies_grant_least_privilege():
    for name in ("iam-task-role-policy.json", "iam-execution-role-policy.json"):
        p = json.loads((ECS / name).read_text())
        assert p["Version"] == "2012-10-17"
        for st in p["Statement"]:
            assert st["Effect"] == "Allow" and st["Action"] and st["Resource"]
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any(a == "*" or a.endswith(":*") for a in actions), st
            if "secretsmanager:GetSecretValue" in actions:
                resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
                assert all(":secret:keyward/" in r for r in resources), "Secrets Manager read is limited to keyward/*"
    task = json.loads((ECS / "iam-task-role-policy.json").read_text())
    reads = [r for st in task["Statement"] if "secretsmanager:GetSecretValue" in st["Action"] for r in st["Resource"]]
    # Exactly the Secrets Manager paths the gateway's filter configuration reads.
    doc = yaml.safe_load((ROOT / "envoy" / "egress-gateway.yaml").read_text())
    cfg = json.loads(next(h["typed_config"]["config"]["configuration"]["value"]
                          for l in doc["static_resources"]["listeners"] for f in l["filter_chains"][0]["filters"]
                          for h in f["typed_config"].get("http_filters", []) if h["name"] == "keyward"))
    aws_paths = {t["secret"]["path"] for t in cfg["targets"].values() if cfg["stores"][t["secret"]["store"]]["type"] == "aws_secrets_manager"}
    assert {r.split(":secret:")[1].removesuffix("-??????") for r in reads} == aws_paths


def k8s_docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.parametrize("name", ["gateway.yaml", "envoy-configmap.yaml"])
def test_kubernetes_manifests_match_the_schemas(name):
    import kubernetes_validate
    for d in k8s_docs(name):
        kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_gateway_manifest_has_the_required_kinds_and_wiring():
    docs = {d["kind"]: d for d in k8s_docs("gateway.yaml")}
    assert {"Deployment", "Service", "NetworkPolicy"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert {e["name"] for e in c["env"]} == host_env_keys(ROOT / "envoy" / "egress-gateway.yaml")
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert c["args"][c["args"].index("--log-level") + 1] == "info"
    cm = k8s_docs("envoy-configmap.yaml")[0]
    assert {v["configMap"]["name"] for v in pod["volumes"]} == {cm["metadata"]["name"]}


def test_configmap_is_the_shipped_gateway_config():
    r = subprocess.run([sys.executable, str(K8S / "sync-configmap.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cm = k8s_docs("envoy-configmap.yaml")[0]
    assert cm["data"]["envoy.yaml"] == (ROOT / "envoy" / "egress-gateway.yaml").read_text()


REQUIRED = {
    "WasmPlugin": [("spec", "url"), ("spec", "pluginConfig"), ("spec", "failStrategy")],
    "EnvoyFilter": [("spec", "configPatches")],
    "EnvoyExtensionPolicy": [("spec", "targetRefs"), ("spec", "wasm")],
    "EnvoyPatchPolicy": [("spec", "targetRef"), ("spec", "jsonPatches"), ("spec", "type")],
    "HTTPRoute": [("spec", "parentRefs"), ("spec", "rules")],
}


def filter_configs():
    for name in ("istio-wasmplugin.yaml", "envoy-gateway-extension-policy.yaml"):
        for d in k8s_docs(name):
            if d["kind"] == "WasmPlugin":
                yield name, d["spec"]["pluginConfig"]
            if d["kind"] == "EnvoyExtensionPolicy":
                for w in d["spec"]["wasm"]:
                    yield name, w["config"]


@pytest.mark.parametrize("name", ["istio-wasmplugin.yaml", "envoy-gateway-extension-policy.yaml"])
def test_mesh_resources_have_their_required_fields(name):
    docs = k8s_docs(name)
    assert docs
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"], d
        for path in REQUIRED[d["kind"]]:
            node = d
            for k in path:
                assert k in node, f"{d['kind']} {d['metadata']['name']}: {'.'.join(path)} is required"
                node = node[k]
        if d["kind"] == "WasmPlugin":
            assert d["spec"]["failStrategy"] == "FAIL_RELOAD" and d["spec"]["url"].startswith("oci://")
        if d["kind"] == "EnvoyExtensionPolicy":
            assert all(w["failOpen"] is False and w["code"]["type"] == "Image" for w in d["spec"]["wasm"])


@pytest.mark.parametrize("source,cfg", list(filter_configs()), ids=lambda v: v if isinstance(v, str) else "config")
def test_embedded_filter_configs_compile(tmp_path, source, cfg):
    p = tmp_path / "filter.json"
    p.write_text(json.dumps(cfg))
    r = harness.cli("check-config", str(p), "--no-env")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", [ECS / "Dockerfile", K8S / "Dockerfile.wasm"])
def test_dockerfiles_copy_what_the_build_makes(dockerfile):
    lines = [l.split() for l in dockerfile.read_text().splitlines() if l and not l.startswith("#")]
    froms = [l[1] for l in lines if l[0] == "FROM"]
    assert froms in (["envoyproxy/envoy:v1.40.0"], ["scratch"])
    for l in lines:
        if l[0] == "COPY":
            assert (ROOT / l[1]).exists(), f"{dockerfile.name}: COPY {l[1]}: not produced by make build"
