"""Deployment artefacts (issue 6): the ECS task definition and service against botocore's ECS API
model, the IAM policies, the Kubernetes manifests against the official schemas (strict), the Istio
and Envoy Gateway resources for required fields, every embedded filter configuration through
`keyward check-config`, and the Dockerfiles against what they copy."""
import fnmatch
import json
import re
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
    # The fleet ledger: the two item calls the filter makes, on the table its configuration names.
    ledger = [st for st in task["Statement"] if any(a.startswith("dynamodb:") for a in st["Action"])]
    assert [(sorted(st["Action"]), st["Resource"]) for st in ledger] == [
        (["dynamodb:GetItem", "dynamodb:UpdateItem"], f"arn:aws:dynamodb:us-east-1:123456789012:table/{cfg['ledger']['table']}")]


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
    assert {e["name"] for e in c["env"]} - {"DRAIN_S", "LEDGER_DRAIN", "KEYWARD_EXECUTOR"} == host_env_keys(ROOT / "envoy" / "egress-gateway.yaml")
    # The executor is chosen in the pod spec (docs/executors.md); the shipped default is wasm.
    assert next(e["value"] for e in c["env"] if e["name"] == "KEYWARD_EXECUTOR") in ("wasm", "native")
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert c["args"][c["args"].index("--log-level") + 1] == "info"
    cms = {d["metadata"]["name"] for d in k8s_docs("envoy-configmap.yaml")}
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == cms == {"keyward-envoy", "keyward-filter"}
    assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == ["keyward-gateway-tls"]
    # Whole directories (a subPath mount never sees an update), the probe over TLS, the drain on loopback.
    assert all("subPath" not in m for m in c["volumeMounts"])
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    envoy = yaml.safe_load(next(d for d in k8s_docs("envoy-configmap.yaml") if d["metadata"]["name"] == "keyward-envoy")["data"]["envoy.yaml"])
    local = next(l for l in envoy["static_resources"]["listeners"] if l["name"] == "local")["address"]["socket_address"]
    assert next(e["value"] for e in c["env"] if e["name"] == "LEDGER_DRAIN") == f"{local['address']}:{local['port_value']}"


def test_configmap_is_the_shipped_gateway_config():
    r = subprocess.run([sys.executable, str(K8S / "sync-configmap.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    docs = {d["metadata"]["name"]: d["data"] for d in k8s_docs("envoy-configmap.yaml")}
    envoy = yaml.safe_load(docs["keyward-envoy"]["envoy.yaml"])
    source = yaml.safe_load((ROOT / "envoy" / "egress-gateway.yaml").read_text())
    # The same clusters and routes; the filter itself is the keyward-filter ConfigMap's resource.
    assert envoy["static_resources"]["clusters"] == source["static_resources"]["clusters"]
    eg = lambda d: next(l for l in d["static_resources"]["listeners"] if l["name"] == "egress")["filter_chains"][0]  # noqa: E731
    assert eg(envoy)["filters"][0]["typed_config"]["route_config"] == eg(source)["filters"][0]["typed_config"]["route_config"]
    (kw,) = [f for f in eg(source)["filters"][0]["typed_config"]["http_filters"] if f["name"] == "keyward"]
    resource = yaml.safe_load(docs["keyward-filter"]["keyward-filter.yaml"])
    assert resource["resources"][0]["typed_config"] == kw["typed_config"]
    assert eg(envoy)["transport_socket"]["name"] == "envoy.transport_sockets.tls"


def filter_configs():
    for name in ("istio-wasmplugin.yaml", "envoy-gateway-extension-policy.yaml"):
        for d in k8s_docs(name):
            if d["kind"] == "WasmPlugin":
                yield name, d["spec"]["pluginConfig"]
            if d["kind"] == "EnvoyExtensionPolicy":
                for w in d["spec"]["wasm"]:
                    yield name, w["config"]


MESH = ["istio-wasmplugin.yaml", "envoy-gateway-extension-policy.yaml"]


@pytest.mark.parametrize("name", MESH)
def test_mesh_resources_match_their_crd_schemas_strictly(name):
    import jsonschema
    import crds
    docs = k8s_docs(name)
    assert docs
    for d in docs:
        assert crds.known(d["apiVersion"], d["kind"]), f"no CRD schema for {d['apiVersion']} {d['kind']}"
        crds.validate(d)
    # Strict: a misspelt field is an error, not silently pruned as the API server would.
    typo = dict(docs[-1], spec=dict(docs[-1]["spec"], tragetRef={}))
    with pytest.raises(jsonschema.ValidationError):
        crds.validate(typo)


def by_kind(name):
    out = {}
    for d in k8s_docs(name):
        out.setdefault(d["kind"], []).append(d)
    return out


def test_envoy_gateway_wiring_is_complete():
    """Every cluster and route the filter relies on exists once Envoy Gateway has translated the
    resources: the vault cluster is added by the patch policy under the name the filter config
    uses; every HTTPRoute rule gets keyward metadata on the route name Envoy Gateway generates;
    the proxy pods carry the filter's environment; the module is pinned and pullable."""
    k = by_kind("envoy-gateway-extension-policy.yaml")
    (ext,) = k["EnvoyExtensionPolicy"]
    (wasm,) = ext["spec"]["wasm"]
    assert wasm["failOpen"] is False and wasm["code"]["type"] == "Image"
    assert re.fullmatch(r"[0-9a-f]{64}", wasm["code"]["image"]["sha256"]) and wasm["code"]["image"]["pullSecretRef"]["name"]
    assert ext["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "egress"}]
    (patch,) = k["EnvoyPatchPolicy"]
    added = {p["name"] for p in patch["spec"]["jsonPatches"] if p["type"].endswith("cluster.v3.Cluster") and p["operation"]["op"] == "add"}
    assert {st["cluster"] for st in wasm["config"]["stores"].values()} <= added
    (gateway,) = k["Gateway"]
    listeners = {l["name"] for l in gateway["spec"]["listeners"]}
    metadata_on = {}
    for p in patch["spec"]["jsonPatches"]:
        if p["type"].endswith("RouteConfiguration"):
            ns, gw_name, listener = p["name"].split("/")
            assert (ns, gw_name) == (gateway["metadata"]["namespace"], gateway["metadata"]["name"]) and listener in listeners
            m = re.fullmatch(r"\.\.routes\[\?\(@\.name=='(.+)'\)\]", p["operation"]["jsonPath"])
            assert m and p["operation"]["path"] == "/metadata", p
            metadata_on[m.group(1)] = p["operation"]["value"]["filter_metadata"]["keyward"]
    for route in k["HTTPRoute"]:
        for i, rule in enumerate(route["spec"]["rules"]):
            for j, match in enumerate(rule["matches"]):
                generated = f"httproute/{route['metadata']['namespace']}/{route['metadata']['name']}/rule/{i}/match/{j}/*"
                meta = metadata_on.get(generated)
                assert meta, f"no keyward metadata for {generated}"
                if "target" in meta:
                    assert meta["target"] in wasm["config"]["targets"]
                    assert match["path"]["value"] == meta["prefix"] + "/"
                else:
                    assert meta == {"endpoint": "health"} and match["path"] == {"type": "Exact", "value": "/keyward/health"}
    for b in k["Backend"]:
        (ep,) = b["spec"]["endpoints"]
        assert b["spec"]["tls"]["sni"] == ep["fqdn"]["hostname"] and ep["fqdn"]["port"] == 443
    (proxy,) = k["EnvoyProxy"]
    env = {e["name"] for e in proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]}
    assert set(wasm["env"]["hostKeys"]) <= env
    assert proxy["spec"]["shutdown"]["drainTimeout"] and proxy["spec"]["provider"]["kubernetes"]["envoyPDB"]["minAvailable"] >= 1
    assert yaml.safe_load(proxy["spec"]["bootstrap"]["value"])["stats_config"] == yaml.safe_load((ROOT / "envoy" / "egress-gateway.yaml").read_text())["stats_config"]


def test_istio_wiring_is_complete():
    k = by_kind("istio-wasmplugin.yaml")
    (plugin,) = k["WasmPlugin"]
    spec = plugin["spec"]
    assert spec["failStrategy"] == "FAIL_RELOAD" and spec["url"].startswith("oci://")
    assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"]) and spec["imagePullSecret"]
    entries = {(h, p["number"]): se for se in k["ServiceEntry"] for h in se["spec"]["hosts"] for p in se["spec"]["ports"]}
    rules = {dr["spec"]["host"]: dr for dr in k["DestinationRule"]}

    def tls_for(host, port):
        tp = rules[host]["spec"]["trafficPolicy"]
        for pl in tp.get("portLevelSettings", []):
            if pl["port"]["number"] == port:
                return pl["tls"]
        return tp["tls"]

    # The vault: the cluster Istio generates for its ServiceEntry, with TLS origination.
    for st in spec["pluginConfig"]["stores"].values():
        m = re.fullmatch(r"outbound\|(\d+)\|\|(.+)", st["cluster"])
        assert m, st["cluster"]
        host, port = m.group(2), int(m.group(1))
        assert (host, port) in entries and st["authority"] == host
        assert tls_for(host, port)["mode"] == "SIMPLE" and tls_for(host, port)["sni"] == host
    # Every vendor route: a ServiceEntry, TLS origination, and keyward metadata by route name.
    (vs,) = k["VirtualService"]
    (ef,) = k["EnvoyFilter"]
    patched = {p["match"]["routeConfiguration"]["vhost"]["route"]["name"]: p["patch"]["value"]["metadata"]["filter_metadata"]["keyward"]
               for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_ROUTE"}
    for route in vs["spec"]["http"]:
        meta = patched[route["name"]]
        if "endpoint" in meta:
            assert meta == {"endpoint": "health"} and route["directResponse"]["status"] == 503
            continue
        assert meta["target"] in spec["pluginConfig"]["targets"] and route["match"][0]["uri"]["prefix"] == meta["prefix"] + "/"
        (dest,) = route["route"]
        host, port = dest["destination"]["host"], dest["destination"]["port"]["number"]
        assert (host, port) in entries and route["rewrite"]["authority"] == host
        assert tls_for(host, port) == {"mode": "SIMPLE", "sni": host, "subjectAltNames": [host]}
    boot = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "BOOTSTRAP"]
    assert boot[0]["patch"]["value"]["stats_config"] == yaml.safe_load((ROOT / "envoy" / "egress-gateway.yaml").read_text())["stats_config"]


def test_kubernetes_gateway_drains_probes_health_and_allows_pod_identity():
    docs = by_kind("gateway.yaml")
    (dep,) = docs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "command" not in c, "the image's entrypoint (keyward-envoy) drains on SIGTERM"
    drain = int(next(e["value"] for e in c["env"] if e["name"] == "DRAIN_S"))
    assert pod["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + drain
    assert c["readinessProbe"]["httpGet"] == {"path": "/keyward/health", "port": "egress", "scheme": "HTTPS"}
    (pdb,) = docs["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] >= 1 and pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert dep["spec"]["replicas"] > pdb["spec"]["minAvailable"]
    (np,) = docs["NetworkPolicy"]
    blocks = {p["ipBlock"]["cidr"]: r["ports"] for r in np["spec"]["egress"] for p in r.get("to", []) if "ipBlock" in p}
    assert blocks["169.254.170.23/32"] == [{"protocol": "TCP", "port": 80}], "EKS Pod Identity agent"
    assert "fd00:ec2::23/128" in blocks
    assert any({"protocol": "TCP", "port": 443} in r["ports"] and "to" not in r for r in np["spec"]["egress"]), "STS for IRSA, vendors"


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
    # The gateway image builds the CLI in a Rust stage (its glibc is the image's), then is Envoy's.
    assert froms in (["rust:1.95-bookworm", "envoyproxy/envoy:v1.40.0"], ["scratch"])
    copied = {}
    for l in lines:
        if l[0] == "COPY":
            *srcs, dst = [a for a in l[1:] if not a.startswith("--")]
            if any(a.startswith("--from=") for a in l[1:]):
                copied[dst] = "stage:" + srcs[0]
                continue
            for src in srcs:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not produced by make build"
                copied[dst] = src
    if dockerfile.name == "Dockerfile":
        assert copied["/usr/local/bin/keyward"] == "stage:/src/target/release/keyward"
        # The native module, built in the same stage as the CLI (the image's glibc and architecture).
        assert copied["/usr/local/lib/keyward/libkeyward.so"] == "stage:/src/target/native/libkeyward.so"
        assert copied["/usr/local/bin/keyward-envoy"] == "deploy/keyward-envoy.sh"
        assert copied["/etc/envoy/api-gateway.yaml"] == "envoy/api-gateway.yaml"
        entry = next(l for l in lines if l[0] == "ENTRYPOINT")
        assert json.loads(" ".join(entry[1:])) == ["/usr/local/bin/keyward-envoy"]


def test_ratelimit_service_manifest_matches_the_schemas_and_the_shipped_limits():
    import kubernetes_validate
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "ratelimit" / "ratelimit.yaml").read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["keyward.yaml"]) == yaml.safe_load((ROOT / "deploy" / "ratelimit" / "config.yaml").read_text())
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "ratelimit")
    gw_doc = yaml.safe_load((ROOT / "envoy" / "global-ratelimit.yaml").read_text())
    (cl,) = [c for c in gw_doc["static_resources"]["clusters"] if c["name"] == "ratelimit"]
    addr = cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr["address"] == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert addr["port_value"] == svc["spec"]["ports"][0]["port"]


def test_one_version_everywhere():
    """The crates, `keyward version`, the changelog's latest entry and every image tag the
    deployment files name agree."""
    import tomllib
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert harness.cli("version").stdout.strip() == f"keyward {version}"
    first = next(l for l in (ROOT / "CHANGELOG.md").read_text().splitlines() if l.startswith("- 0."))
    assert first.startswith(f"- {version} "), first
    tags = set()
    for p in [*(ROOT / "deploy").rglob("*.yaml"), *(ROOT / "deploy").rglob("*.json"), *(ROOT / "deploy").rglob("Dockerfile*"), ROOT / "docs" / "deploying.md"]:
        tags |= set(re.findall(r"keyward-(?:gateway|wasm):(\d+\.\d+\.\d+)", p.read_text()))
    assert tags == {version}, tags


def test_the_image_build_context_leaves_out_the_tool_chain():
    """`docker build ... .` sends the repository: .dockerignore keeps target/, .venv/ and the like
    out (gigabytes after make test) and nothing a COPY needs."""
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert {"target", ".venv", ".tools", "node_modules"} <= set(patterns)
    lines = [l.split() for l in (ECS / "Dockerfile").read_text().splitlines() if l.startswith("COPY") and "--from=" not in l]
    for l in lines:
        for src in [a for a in l[1:-1] if not a.startswith("--")]:
            first = src.split("/")[0]
            assert not any(fnmatch.fnmatch(first, p) or fnmatch.fnmatch(src, p) for p in patterns), src
