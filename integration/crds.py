"""Strict validation of custom resources against the CRD schemas in tests/schemas/ (see its
README): the served version's openAPIV3Schema, with every object that lists its properties closed
to others unless the schema says `x-kubernetes-preserve-unknown-fields`."""
import copy
import gzip
from pathlib import Path

import yaml

SCHEMAS = Path(__file__).resolve().parent.parent / "tests" / "schemas"


def _load():
    out = {}
    for f in sorted(SCHEMAS.glob("*.yaml.gz")):
        with gzip.open(f, "rt") as fh:
            for d in yaml.safe_load_all(fh):
                if not d or d.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = d["spec"]["group"], d["spec"]["names"]["kind"]
                for v in d["spec"]["versions"]:
                    if v.get("served"):
                        out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


_CRDS = None


def _strict(node):
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def known(api_version, kind):
    global _CRDS
    if _CRDS is None:
        _CRDS = _load()
    return (api_version, kind) in _CRDS


def validate(doc):
    """Raise jsonschema.ValidationError when `doc` does not match its CRD; KeyError when no CRD here defines it."""
    import jsonschema
    global _CRDS
    if _CRDS is None:
        _CRDS = _load()
    schema = _strict(copy.deepcopy(_CRDS[(doc["apiVersion"], doc["kind"])]))
    # metadata is the API server's ObjectMeta, which the CRD leaves open.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
