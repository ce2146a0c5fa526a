"""Writes the JSON schemas of the Prometheus Operator's PodMonitor, ServiceMonitor and
PrometheusRule into deploy/k8s/schemas/, for validating the manifests offline
(tests/test_deploy.py).

kubernetes-validate ships the schemas of Kubernetes' own kinds but none of custom resources.
These come from the PyPI package cloudcoil-models-prometheus-operator (pydantic models
generated from the operator's CRDs, v0.80.1), made strict like kubernetes-validate's
``--strict``: an object with declared properties rejects undeclared ones. Re-make them with

    python3 -m venv /tmp/crd && /tmp/crd/bin/pip install cloudcoil-models-prometheus-operator==0.80.1.0
    /tmp/crd/bin/python deploy/scripts/vendor_crd_schemas.py
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cloudcoil.models.prometheus_operator import v1

OUT = Path(__file__).resolve().parents[1] / "k8s" / "schemas"


def strict(node: Any) -> Any:
    """Forbid undeclared properties in every object schema that declares some."""
    if isinstance(node, dict):
        node = {key: strict(value) for key, value in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(item) for item in node]
    return node


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    source = (
        f"cloudcoil-models-prometheus-operator {version('cloudcoil.models.prometheus_operator')}"
    )
    for kind in (v1.PodMonitor, v1.ServiceMonitor, v1.PrometheusRule):
        schema = strict(kind.model_json_schema(by_alias=True))
        schema["$comment"] = f"{kind.__name__} monitoring.coreos.com/v1, from {source}, strict"
        path = OUT / f"{kind.__name__.lower()}-monitoring-v1.json"
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(path)


if __name__ == "__main__":
    main()
