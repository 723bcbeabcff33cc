#!/usr/bin/env python3
"""Write deploy/k8s/envoy-configmap.yaml from envoy/egress-gateway.yaml, so the two never drift
(`make test` fails if they disagree). Usage: .venv/bin/python deploy/k8s/sync-configmap.py [--check] (it needs PyYAML)

What Kubernetes changes in the egress gateway's bootstrap:
- TLS from the workloads: the egress listener (10000) takes TLS only, its certificate from the
  Secret `keyward-gateway-tls` (kubernetes.io/tls, e.g. from cert-manager) mounted at
  /etc/keyward-tls, by SDS from a file; a renewed certificate is served to new connections without
  a restart (Envoy watches the mount, which the kubelet swaps atomically).
- The filter configuration by ECDS from the ConfigMap `keyward-filter`, mounted at
  /etc/keyward-filter: an edit of it (`kubectl apply`) reaches every pod within the kubelet's sync
  period and applies to the next requests, with no restart; one the filter refuses is counted
  (extension_config_discovery.http_filter.keyward.update_rejected) and logged, and the last good one
  keeps serving.
- A plain listener on 127.0.0.1:10001 for the pod itself: the entrypoint's drain call
  (LEDGER_DRAIN) and nothing else.
"""
import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "envoy" / "egress-gateway.yaml"
TARGET = ROOT / "deploy" / "k8s" / "envoy-configmap.yaml"

FILTER_DIR = "/etc/keyward-filter"
TLS_DIR = "/etc/keyward-tls"
SDS_FILE = "/etc/keyward/sds.yaml"
TLS_SECRET = "keyward-gateway-tls"
LOCAL_PORT = 10001
WASM = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def hcm_of(listener):
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def ecds_filter():
    return {"name": "keyward", "config_discovery": {
        "config_source": {"path_config_source": {"path": f"{FILTER_DIR}/keyward-filter.yaml", "watched_directory": {"path": FILTER_DIR}}},
        "type_urls": [WASM]}}


def kubernetes(doc):
    """(envoy.yaml, sds.yaml, keyward-filter.yaml) for the pod."""
    doc = copy.deepcopy(doc)
    (egress,) = [l for l in doc["static_resources"]["listeners"] if l["name"] == "egress"]
    hcm = hcm_of(egress)
    filters = hcm["http_filters"]
    (i,) = [n for n, f in enumerate(filters) if f["name"] == "keyward"]
    resource = {"resources": [{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                               "name": "keyward", "typed_config": filters[i]["typed_config"]}]}
    filters[i] = ecds_filter()
    egress["filter_chains"][0]["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [{"name": TLS_SECRET, "sds_config": {
                "path_config_source": {"path": SDS_FILE, "watched_directory": {"path": "/etc/keyward"}}}}]}}}
    # The pod's own plain listener: the drain route (loopback peers only) and nothing else.
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (drain,) = [r for r in routes if r.get("name") == "keyward_drain"]
    local_hcm = {
        "@type": hcm["@type"], "stat_prefix": "local", "normalize_path": True, "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST", "max_request_headers_kb": 8, "request_headers_timeout": "5s",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST", "max_headers_count": 32, "idle_timeout": "10s"},
        "route_config": {"name": "local", "virtual_hosts": [{"name": "local", "domains": ["*"], "routes": [drain]}]},
        "http_filters": [f for f in copy.deepcopy(filters) if f["name"] in ("envoy.filters.http.rbac", "keyward", "envoy.filters.http.router")]}
    doc["static_resources"]["listeners"].append({
        "name": "local", "address": {"socket_address": {"address": "127.0.0.1", "port_value": LOCAL_PORT}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": local_hcm}]}]})
    sds = {"resources": [{"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "name": TLS_SECRET,
                          "tls_certificate": {"certificate_chain": {"filename": f"{TLS_DIR}/tls.crt"},
                                              "private_key": {"filename": f"{TLS_DIR}/tls.key"},
                                              "watched_directory": {"path": TLS_DIR}}}]}
    return doc, sds, resource


class Dumper(yaml.SafeDumper):
    """Multi-line strings (the filter configuration) as literal blocks, readable and editable."""


Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(v):
    return yaml.dump(v, Dumper=Dumper, sort_keys=False, width=140)


def block(text):
    return "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())


def render() -> str:
    doc, sds, resource = kubernetes(yaml.safe_load(SOURCE.read_text()))
    head = ("# Generated from envoy/egress-gateway.yaml by deploy/k8s/sync-configmap.py; do not edit (its\n"
            "# comments explain every setting). Kubernetes adds TLS on the egress listener, the filter by ECDS\n"
            "# from the keyward-filter ConfigMap, and a loopback listener for the drain.\n")
    envoy_cm = ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: keyward-envoy\n  namespace: keyward\n"
                "data:\n  envoy.yaml: |\n" + block(dump(doc)) + "  sds.yaml: |\n" + block(dump(sds)))
    filter_cm = ("# The filter configuration (docs/reference.md): edit and `kubectl apply` it; every pod applies\n"
                 "# it within the kubelet's sync period, without a restart. Check it first with\n"
                 "# `keyward check-config`.\n"
                 "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: keyward-filter\n  namespace: keyward\n"
                 "data:\n  keyward-filter.yaml: |\n" + block(dump(resource)))
    return head + envoy_cm + "---\n" + filter_cm


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            sys.exit(f"{TARGET} is out of date: run .venv/bin/python deploy/k8s/sync-configmap.py")
    else:
        TARGET.write_text(text)
