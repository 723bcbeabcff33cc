"""The AWS deployment: every CloudFormation template in deploy/aws/ passes cfn-lint, and the
template agrees with what it runs: the bootstrap and ECDS file in the image, the path without the
stage, TLS at the ALB, the health route, exactly the secrets, parameter and table the task may
read, and a drain that ends before ECS kills the task. The ECS health-check command itself is run
against real Envoy."""
import json
import re
import subprocess

import pytest
import requests
import yaml

import harness

ROOT = harness.ROOT
AWS = ROOT / "deploy" / "aws"
TEMPLATES = sorted(AWS.glob("*.yaml"))


def template(path):
    from cfnlint.decode import decode
    t, errors = decode(str(path))
    assert not errors, errors
    return t


def envoy_doc(name):
    return yaml.safe_load((ROOT / "envoy" / name).read_text())


def filter_config(doc):
    for l in doc["static_resources"]["listeners"]:
        for f in l["filter_chains"][0]["filters"]:
            for h in f["typed_config"].get("http_filters", []):
                if h["name"] == "keyward":
                    c = h["typed_config"]["config"]
                    return json.loads(c["configuration"]["value"]), c["vm_config"]["environment_variables"]["host_env_keys"], f["typed_config"]


def test_templates_exist_and_pass_cfn_lint():
    assert TEMPLATES
    r = subprocess.run([str(harness.BIN / "cfn-lint"), *map(str, TEMPLATES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cfn_lint_would_catch_a_broken_template(tmp_path):
    broken = tmp_path / "broken.yaml"
    text = (AWS / "keyward-gateway.yaml").read_text()
    for good, bad, what in [("IntegrationUri: !Ref Listener", "IntegrationUri: !Ref Listner", "Listner"),
                            ("Scheme: internal", "Scheme: private", "private"),
                            ("LaunchType: FARGATE", "LaunchType: FARGATEX", "FARGATEX")]:
        assert good in text
        broken.write_text(text.replace(good, bad))
        r = subprocess.run([str(harness.BIN / "cfn-lint"), str(broken)], capture_output=True, text=True)
        assert r.returncode != 0 and what in r.stdout, (bad, r.stdout)


def test_the_template_agrees_with_the_envoy_config_it_runs():
    """Both topologies run envoy/aws-gateway.yaml, its filter configuration from the stack's SSM
    parameter (test_aws_only runs them together against moto)."""
    t = template(AWS / "keyward-gateway.yaml")
    res = t["Resources"]
    (c,) = res["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert c["Command"][:2] == ["-c", "/etc/envoy/aws-gateway.yaml"]
    dockerfile = (ROOT / "deploy" / "ecs" / "Dockerfile").read_text()
    assert "COPY envoy/aws-gateway.yaml /etc/envoy/aws-gateway.yaml" in dockerfile
    assert "COPY envoy/keyward-filter.template.json /etc/envoy/keyward-filter.template.json" in dockerfile
    doc = envoy_doc("aws-gateway.yaml")
    (egress,) = [l for l in doc["static_resources"]["listeners"] if l["name"] == "egress"]
    hcm = egress["filter_chains"][0]["filters"][0]["typed_config"]
    (kw,) = [f for f in hcm["http_filters"] if f["name"] == "keyward"]
    ecds = kw["config_discovery"]["config_source"]["path_config_source"]
    # The entrypoint writes the ECDS file in the volume mounted at its directory.
    (mount,) = c["MountPoints"]
    assert ecds["path"].startswith(mount["ContainerPath"] + "/") and ecds["watched_directory"]["path"] == mount["ContainerPath"]
    assert mount["ReadOnly"] is False and c["ReadonlyRootFilesystem"] is True
    assert [v["Name"] for v in res["TaskDefinition"]["Properties"]["Volumes"]] == [mount["SourceVolume"]]
    env = {e["Name"]: e["Value"] for e in c["Environment"]}
    assert env["KEYWARD_CONFIG_SOURCE"] == {"Fn::Sub": "ssm:${FilterConfig}"} and env["AWS_REGION"] == {"Ref": "AWS::Region"}
    assert "Secrets" not in c, "no secret goes through the task definition"
    # The API's path reaches Envoy without the stage: the routes are /<vendor>/.
    assert res["Integration"]["Properties"]["RequestParameters"] == {"overwrite:path": "/$request.path.proxy"}
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    vendor_routes = [r for r in routes if "target" in r.get("metadata", {}).get("filter_metadata", {}).get("keyward", {})]
    assert vendor_routes and all(r["match"]["prefix"] == f"/{r['metadata']['filter_metadata']['keyward']['target']}/" for r in vendor_routes)
    # TLS: the ALB listens HTTPS only, with the operator's certificate; API Gateway checks its name.
    listener = res["Listener"]["Properties"]
    assert listener["Protocol"] == "HTTPS" and listener["Port"] == 443 and listener["Certificates"] == [{"CertificateArn": {"Ref": "CertificateArn"}}]
    assert res["Integration"]["Properties"]["TlsConfig"] == {"ServerNameToVerify": {"Ref": "DomainName"}}
    alb_in = res["AlbSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [(r["FromPort"], r["ToPort"]) for r in alb_in] == [(443, 443)]
    # Health: the ALB and the container check the route the filter answers.
    health = next(r for r in routes if r.get("name") == "keyward_health")
    assert res["TargetGroup"]["Properties"]["HealthCheckPath"] == health["match"]["path"]
    assert health["match"]["path"] in c["HealthCheck"]["Command"][1]
    assert hcm["use_remote_address"] is True
    # Drain: the entrypoint drains for DRAIN_S, ECS waits longer, the ALB deregisters first.
    assert c["EntryPoint"] == ["/usr/local/bin/keyward-envoy"] and c["StopTimeout"] > int(env["DRAIN_S"])
    # Least privilege: the task reads the stack's five secrets, its one parameter, its one table.
    policies = {p["PolicyName"]: p["PolicyDocument"]["Statement"] for p in res["TaskRole"]["Properties"]["Policies"]}
    (sm,) = policies["keyward-vendor-keys"]
    assert sm["Action"] == "secretsmanager:GetSecretValue"
    secrets = {n for n, r in res.items() if r["Type"] == "AWS::SecretsManager::Secret"}
    assert sorted(r["Ref"] for r in sm["Resource"]) == sorted(secrets) and len(secrets) == 5
    (ssm,) = policies["keyward-filter-config"]
    assert ssm["Action"] == "ssm:GetParameter" and ssm["Resource"]["Fn::Sub"].endswith(":parameter/keyward/${AWS::StackName}/filter-config")
    assert res["FilterConfig"]["Properties"]["Name"]["Fn::Sub"] == "/keyward/${AWS::StackName}/filter-config"
    (ddb,) = policies["keyward-fleet-ledger"]
    assert ddb["Resource"] == {"Fn::GetAtt": ["LedgerTable", "Arn"]}
    assert "Policies" not in res["ExecutionRole"]["Properties"]
    # IAM authorization on every route of the API.
    assert res["ProxyRoute"]["Properties"]["AuthorizationType"] == "AWS_IAM"
    assert res["Service"]["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
    assert res["LoadBalancer"]["Properties"]["Scheme"] == "internal"


@pytest.mark.parametrize("source", ["template", "task-definition"])
def test_the_ecs_health_check_command_works_against_real_envoy(gw, source):
    """The container health check (bash /dev/tcp, no curl in Envoy's image) passes on a healthy
    gateway and fails where nothing answers 200."""
    if source == "template":
        (c,) = template(AWS / "keyward-gateway.yaml")["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
        cmd = c["HealthCheck"]["Command"]
    else:
        (c,) = json.loads((ROOT / "deploy" / "ecs" / "task-definition.json").read_text())["containerDefinitions"]
        cmd = c["healthCheck"]["command"]
    assert cmd[0] == "CMD-SHELL"
    harness.wait_until(lambda: requests.get(gw.url + "/keyward/health", timeout=5).status_code == 200, timeout=10, what="ready")
    port = gw.url.rsplit(":", 1)[1]
    ok = subprocess.run(["sh", "-c", cmd[1].replace("/10000", f"/{port}")], timeout=10)
    assert ok.returncode == 0
    # The raw listener's routes have no health endpoint with direct_response... a port with no
    # Envoy at all fails the check.
    dead = subprocess.run(["sh", "-c", cmd[1].replace("/10000", f"/{harness.free_port()}")], timeout=10, capture_output=True)
    assert dead.returncode != 0


def ledger_of(name):
    return filter_config(envoy_doc(name))[0]["ledger"]


@pytest.mark.parametrize("name", ["keyward-gateway.yaml", "keyward-ledger.yaml"])
def test_the_ledger_table_is_on_demand_expires_old_accounts_and_is_granted_two_calls_only(name):
    t = template(AWS / name)
    res = t["Resources"]
    table = res["LedgerTable"]
    p = table["Properties"]
    # The table the configurations name, keyed as the filter writes it, with TTL on what it writes.
    if name == "keyward-ledger.yaml":
        # For the vault-based configs, which name keyward-ledger.
        assert t["Parameters"]["LedgerTableName"]["Default"] == ledger_of("egress-gateway.yaml")["table"] == ledger_of("api-gateway.yaml")["table"]
        assert p["TableName"] == {"Ref": "LedgerTableName"}
    else:
        # The AWS-only stack: named after the stack unless given a name (stacks and redeploys never
        # collide), and its configuration names whichever it is.
        assert t["Parameters"]["LedgerTableName"]["Default"] == ""
        assert p["TableName"] == {"Fn::If": ["NamedTable", {"Ref": "LedgerTableName"}, {"Ref": "AWS::NoValue"}]}
        assert '"table": "${LedgerTable}"' in res["FilterConfig"]["Properties"]["Value"]["Fn::Sub"][0]
    assert p["BillingMode"] == "PAY_PER_REQUEST" and "ProvisionedThroughput" not in p
    assert p["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert p["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"}]
    assert p["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    assert table["DeletionPolicy"] == "Retain", "a spend ledger outlives a stack"
    # Least privilege: exactly UpdateItem and GetItem, on that table only, in every policy that
    # mentions DynamoDB.
    grants = []

    def walk(node):
        if isinstance(node, dict):
            if "Action" in node and "Resource" in node:
                actions = node["Action"] if isinstance(node["Action"], list) else [node["Action"]]
                if any(str(a).startswith("dynamodb:") for a in actions):
                    grants.append((sorted(actions), node["Resource"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(res)
    assert grants == [(["dynamodb:GetItem", "dynamodb:UpdateItem"], {"Fn::GetAtt": ["LedgerTable", "Arn"]})], grants


def test_pod_identity_gets_the_ledger_policy_for_the_gateway_service_account():
    t = template(AWS / "keyward-ledger.yaml")
    res = t["Resources"]
    assoc = res["PodIdentity"]["Properties"]
    assert assoc["RoleArn"] == {"Fn::GetAtt": ["GatewayRole", "Arn"]}
    k8s = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()))
    sa = next(d for d in k8s if d and d["kind"] == "ServiceAccount")
    assert (t["Parameters"]["Namespace"]["Default"], t["Parameters"]["ServiceAccount"]["Default"]) == (sa["metadata"]["namespace"], sa["metadata"]["name"])
    trust = res["GatewayRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Principal"] == {"Service": "pods.eks.amazonaws.com"} and sorted(trust["Action"]) == ["sts:AssumeRole", "sts:TagSession"]
    assert res["GatewayRole"]["Properties"]["ManagedPolicyArns"] == [{"Ref": "LedgerPolicy"}]
