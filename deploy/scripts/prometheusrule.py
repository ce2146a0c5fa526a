"""Prints deploy/prometheus's recording rules and alerts as one PrometheusRule manifest, for
clusters whose Prometheus is run by the Prometheus Operator:

    python deploy/scripts/prometheusrule.py --label release=prometheus | kubectl apply -f -

(needs PyYAML, which the project's dev environment has). The rule files stay the single
source; plain Prometheus loads them directly (rule_files in prometheus.yml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

RULE_FILES = [Path(__file__).resolve().parents[1] / "prometheus" / f for f in ("rules.yaml", "alerts.yaml")]  # fmt: skip


def prometheus_rule(name: str, labels: dict[str, str]) -> dict[str, Any]:
    groups = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": {"groups": groups},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="mps-guard", help="metadata.name (default mps-guard)")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata label, e.g. release=prometheus for kube-prometheus-stack's selector",
    )
    args = parser.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.label)
    yaml.safe_dump(prometheus_rule(args.name, labels), sys.stdout, sort_keys=False, width=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
