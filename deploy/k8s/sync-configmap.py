#!/usr/bin/env python3
"""Write deploy/k8s/envoy-configmap.yaml from envoy/egress-gateway.yaml, so the two never drift
(`make test` fails if they disagree). Usage: python3 deploy/k8s/sync-configmap.py [--check]"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "envoy" / "egress-gateway.yaml"
TARGET = ROOT / "deploy" / "k8s" / "envoy-configmap.yaml"


def render() -> str:
    body = "".join(f"    {line}\n" if line else "\n" for line in SOURCE.read_text().splitlines())
    return ("# Generated from envoy/egress-gateway.yaml by deploy/k8s/sync-configmap.py; do not edit.\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: keyward-envoy\n  namespace: keyward\n"
            "data:\n  envoy.yaml: |\n" + body)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            sys.exit(f"{TARGET} is out of date: run python3 deploy/k8s/sync-configmap.py")
    else:
        TARGET.write_text(text)
