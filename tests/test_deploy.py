"""deploy/: alerting rules (promtool check and unit tests), the Grafana dashboard, the
Kubernetes manifests (validated offline against Kubernetes' schemas) and the container
install script. The end-to-end run with a real Prometheus is in test_e2e_prometheus.py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from guard.service.metrics import GuardMetrics
from guard.service.settings import ServeSettings
from tests.certs import make_pki
from tests.prometheus_tools import DEPLOY, ROOT, promtool
from tests.serving import running_sidecar

PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = (PROMETHEUS / "rules.yaml", PROMETHEUS / "alerts.yaml")
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yaml"))
DASHBOARD = DEPLOY / "grafana" / "mps-guard.json"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
README = DEPLOY / "README.md"

# Oldest Kubernetes with gRPC probes GA (1.27) and the newest the schema package knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): K8S / "schemas" / "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S
    / "schemas"
    / "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): K8S
    / "schemas"
    / "prometheusrule-monitoring-v1.json",
    # Written for deploy/k8s/ray (its pod templates are checked as Kubernetes PodTemplates).
    ("ray.io/v1", "RayJob"): K8S / "schemas" / "rayjob-ray-v1.json",
}
# The guard's own settings, as environment variables (GUARD_METRICS_PORT, ...).
SETTINGS_ENV = {f"GUARD_{name.upper()}" for name in ServeSettings.model_fields}
METRIC_NAME = re.compile(r"(?<![:\w])guard_[a-z0-9_]+")


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _rule_expressions() -> list[str]:
    return [
        rule["expr"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def _exported_series_names() -> set[str]:
    """Every sample name the sidecar can export, from its own metric definitions."""
    names: set[str] = set()
    for family in GuardMetrics(CollectorRegistry()).registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "info": ("_info",),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


# --- Prometheus rules ------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", *RULE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS
    done = promtool("test", "rules", *RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def test_every_alert_has_a_summary_a_description_with_the_value_and_a_runbook() -> None:
    readme = README.read_text()
    headings = {
        "runbook-" + match.lower() for match in re.findall(r"^### Runbook: (\w+)$", readme, re.M)
    }
    for rule in _alerts():
        annotations, name = rule["annotations"], rule["alert"]
        assert annotations["summary"], name
        assert "$value" in annotations["description"], name
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        anchor = annotations["runbook"].removeprefix("deploy/README.md#")
        assert anchor == f"runbook-{name.lower()}", name
        assert anchor in headings, f"deploy/README.md has no '### Runbook: {name}'"


def test_rules_use_only_metrics_the_sidecar_exports() -> None:
    exported = _exported_series_names()
    used = {name for expr in _rule_expressions() for name in METRIC_NAME.findall(expr)}
    assert used
    assert used - exported == set()


def test_prometheus_operator_rule_manifest(tmp_path: Path) -> None:
    """deploy/scripts/prometheusrule.py wraps both rule files into a valid PrometheusRule."""
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "scripts" / "prometheusrule.py"), "--label", "release=x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    manifest = yaml.safe_load(done.stdout)
    _validate(manifest, "prometheusrule.py")
    assert manifest["metadata"]["labels"] == {"release": "x"}
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert manifest["spec"]["groups"] == groups
    # What the operator hands to Prometheus passes promtool too.
    path = tmp_path / "operator-rules.yaml"
    path.write_text(yaml.safe_dump(manifest["spec"]))
    checked = promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- Grafana dashboard -----------------------------------------------------------------------


def _dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [q for p in panels for q in [p, *walk(p.get("panels", []))]]

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_queries() -> dict[str, str]:
    """Every panel query, with Grafana's variables replaced so that PromQL tools can read it:
    {"panel <id> <refId>": expr}."""
    substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*"}
    queries = {}
    for panel in _dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown variable in panel {panel['id']}: {expr}"
            queries[f"panel {panel['id']} {target['refId']}"] = expr
    return queries


def test_dashboard_is_valid_json_with_a_sound_layout() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = _dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    for panel in panels:
        box = panel["gridPos"]
        assert 0 <= box["x"] and box["x"] + box["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and panel["description"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in (
        "requests",
        "flag rate",
        "alpha",
        "mps-area",
        "drift",
        "latency",
        "queue",
        "martingale",
    ):
        assert topic in titles


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": "dashboard:" + re.sub(r"\W", "_", key), "expr": expr}
        for key, expr in dashboard_queries().items()
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


def test_dashboard_uses_only_metrics_the_sidecar_exports() -> None:
    exported = _exported_series_names()
    used = {name for expr in dashboard_queries().values() for name in METRIC_NAME.findall(expr)}
    assert used - exported == set(), "not exported by guard/service/metrics.py"
    # Everything the sidecar exports has a panel (histograms through their buckets).
    shown = {n for n in exported if not n.endswith(("_bucket", "_sum", "_count"))}
    assert shown - used == set(), "metrics without a panel in deploy/grafana/mps-guard.json"


def test_the_flag_rate_panels_and_the_runbook_lead_to_the_flags_page() -> None:
    """The flag-rate panels link to the chosen replica's /flags page (served on its metrics
    port, the ``instance`` Prometheus scrapes), and the flag-rate runbook says to open it."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "guard_model_info" in variables["instance"]["definition"]
    assert ", instance)" in variables["instance"]["definition"]
    panels = [p for p in _dashboard_panels() if "flag" in p["title"].lower()]
    assert len(panels) == 3
    for panel in panels:
        urls = [link["url"] for link in panel["fieldConfig"]["defaults"]["links"]]
        assert urls and all(u.startswith("http://${instance}/flags?model=") for u in urls)
    assert any(link["url"] == "http://${instance}/flags" for link in dashboard["links"])
    runbook = README.read_text().split("### Runbook: GuardFlagRateHigh")[1].split("###")[0]
    assert "/flags" in runbook and "GUARD_KEEP_FLAGGED" in runbook
    assert "## The flagged predictions page" in README.read_text()


# --- Kubernetes ------------------------------------------------------------------------------


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge for what the overlays here patch: maps merge key by key,
    lists of named items (containers, env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _strategic_merge(base[key], value) if key in base else value
        return merged
    named = (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in base + patch)
    )
    if named:
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = _strategic_merge(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """``kustomize build`` for the subset of kustomization fields used here (checked)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, directory
    assert kustomization["kind"] == "Kustomization"
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        documents += render_kustomization(path) if path.is_dir() else _load_documents(path)
    for patch_ref in kustomization.get("patches", []):
        assert set(patch_ref) == {"path"}, "only strategic-merge patch files are rendered"
        for patch in _load_documents(directory / patch_ref["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            index = [(d["kind"], d["metadata"]["name"]) for d in documents].index(key)
            documents[index] = _strategic_merge(documents[index], patch)
    return documents


def _validate(document: dict[str, Any], source: str) -> None:
    crd = CRD_SCHEMAS.get((document["apiVersion"], document["kind"]))
    if crd is not None:
        schema = json.loads(crd.read_text())
        jsonschema.Draft202012Validator(schema).validate(document)
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{source}: {document['kind']} invalid for Kubernetes {version}: {path}: {exc.message}")  # fmt: skip


def _guard_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "guard")


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_kustomizations_render_to_valid_manifests(variant: str) -> None:
    documents = render_kustomization(K8S / variant)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["Deployment", "PodMonitor", "Service"]
    for document in documents:
        _validate(document, f"deploy/k8s/{variant}")


def test_every_manifest_file_is_valid() -> None:
    """Files outside a kustomization (the ServiceMonitor alternative) are checked too."""
    files = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"]
    patches = {K8S / "gpu" / "deployment-gpu.yaml"}
    for path in sorted(set(files) - patches):
        for document in _load_documents(path):
            _validate(document, str(path.relative_to(ROOT)))


def test_validation_catches_mistakes() -> None:
    deployment = next(d for d in render_kustomization(K8S / "base") if d["kind"] == "Deployment")
    typo = json.loads(json.dumps(deployment))
    _guard_container(typo)["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[-1], strict=True)
    monitor = _load_documents(K8S / "base" / "podmonitor.yaml")[0]
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    schema = json.loads(CRD_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")].read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(monitor)


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_guard_sidecar_wiring(variant: str) -> None:
    documents = {d["kind"]: d for d in render_kustomization(K8S / variant)}
    deployment = documents["Deployment"]
    pod = deployment["spec"]["template"]
    guard = _guard_container(deployment)
    env = {item["name"]: item["value"] for item in guard["env"]}
    assert set(env) <= SETTINGS_ENV, "environment variables guard serve does not read"
    ports = {port["name"]: port["containerPort"] for port in guard["ports"]}
    assert ports["guard-grpc"] == int(env["GUARD_PORT"])
    assert ports["guard-metrics"] == int(env["GUARD_METRICS_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert guard[probe]["grpc"]["port"] == ports["guard-grpc"], probe
    # Model and calibration from a read-only volume, at the paths the settings name.
    mounts = {m["name"]: m for m in guard["volumeMounts"]}
    assert mounts["guard-model"]["readOnly"] is True
    model_dir = mounts["guard-model"]["mountPath"]
    assert env["GUARD_MODEL"] == f"{model_dir}/model.onnx"
    assert env["GUARD_CALIBRATION"] == f"{model_dir}/calibration.json"
    assert guard["resources"]["requests"]["cpu"] and guard["resources"]["requests"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["GUARD_GRACE_SECONDS"])
    # The PodMonitor scrapes the guard's metrics port of these pods.
    monitor = documents["PodMonitor"]["spec"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "guard-metrics"
    labels = pod["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    gpu = guard["resources"].get("limits", {}).get("nvidia.com/gpu")
    if variant == "gpu":
        assert gpu == "1" and env["GUARD_PROVIDER"] == "cuda"
        assert guard["image"].endswith("-cuda")
    else:
        assert gpu is None and env["GUARD_PROVIDER"] == "cpu"


def test_rayjob_calibration_example() -> None:
    """deploy/k8s/ray: the RayJob's pod templates are valid Kubernetes, its entrypoint parses
    as a ``guard calibrate --ray`` command, and its images, Ray version, CPUs and volume fit."""
    import shlex
    import tomllib

    import typer.main

    from guard.cli import app

    claim, job = _load_documents(K8S / "ray" / "rayjob-calibrate.yaml")
    assert (claim["kind"], job["kind"]) == ("PersistentVolumeClaim", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    head, groups = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    for template in [head["template"], *(group["template"] for group in groups)]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": "ray"}, "template": template}  # fmt: skip
        _validate(pod_template, "deploy/k8s/ray/rayjob-calibrate.yaml")

    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["guard", "calibrate"] and args[args.index("--ray") + 1] == "auto"
    command = typer.main.get_command(app).commands["calibrate"]  # type: ignore[attr-defined]
    options = command.make_context("calibrate", args[2:]).params  # every option exists, parses
    # The driver on the head (no Ray worker there) writes under its volume.
    assert head["rayStartParams"]["num-cpus"] == "0"
    [head_container] = head["template"]["spec"]["containers"]
    mount = head_container["volumeMounts"][0]
    [volume] = [v for v in head["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for path in (options["data"], options["model"], options["out"], options["report"]):
        assert str(path).startswith(mount["mountPath"] + "/"), path
    # Whole guard workers per worker pod: its CPU limit is a multiple of --ray-cpus.
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        assert container["image"] == head_container["image"]
        cpus = float(container["resources"]["limits"]["cpu"])
        assert cpus % options["ray_cpus"] == 0 and cpus >= options["ray_cpus"]
    # One image built from the Dockerfile beside it, on the Ray the RayJob names.
    dockerfile = (K8S / "ray" / "Dockerfile").read_text()
    assert f"-t {head_container['image']} ." in dockerfile
    version = cluster["rayVersion"]
    assert f"FROM rayproject/ray:{version}-py3" in dockerfile
    assert f'"ray[data]=={version}"' in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [ray_requirement] = project["optional-dependencies"]["ray"]  # mps-guard[ray]
    low = re.search(r">=([0-9.]+)", ray_requirement)
    assert low and tuple(map(int, version.split("."))) >= tuple(map(int, low.group(1).split(".")))
    # A mistake in the RayJob's own fields is caught.
    schema = json.loads(CRD_SCHEMAS[("ray.io/v1", "RayJob")].read_text())
    typo = json.loads(json.dumps(job))
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(typo)


# --- Container images ------------------------------------------------------------------------


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    text = _dockerfile(name)
    variant = name.rsplit(".", 1)[1]
    assert f"RUN /src/deploy/docker/install.sh /opt/guard {variant}" in text
    assert re.search(r"^USER 10001:10001$", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .* CMD \[\"guard-healthcheck\"\]$", text, re.M)
    assert 'ENTRYPOINT ["guard", "serve"]' in text
    assert 'VOLUME ["/models"]' in text
    copied = re.findall(r"^COPY (.+) /src/", text, re.M)
    assert not any(".onnx" in c or "calibration.json" in c for c in copied), "model baked in"
    env = set(re.findall(r"\b(GUARD_[A-Z_]+)=", text))
    assert env and env <= SETTINGS_ENV


def test_cuda_image_matches_onnxruntime_gpu() -> None:
    """The CUDA base image's CUDA and cuDNN majors are those onnxruntime-gpu is built for
    (read from its `cuda` and `cudnn` extras, e.g. nvidia-cuda-runtime~=13.0)."""
    try:
        requires = importlib.metadata.requires("onnxruntime-gpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed on this platform")

    def major(package: str) -> int:
        spec = next(r for r in requires if re.match(rf"{package}\b", r))
        return int(re.search(r"~=\s*(\d+)", spec)[1])

    image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", _dockerfile("Dockerfile.cuda"), re.M)[1]
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn(\d*)-runtime-ubuntu[\d.]+", image)
    assert tag, image
    assert int(tag[1]) == major("nvidia-cuda-runtime")
    # Unnumbered "cudnn" tags (CUDA 12.4 on) carry cuDNN 9.
    assert int(tag[2] or 9) == major(f"nvidia-cudnn-cu{tag[1]}")


def test_install_script_installs_a_working_guard(tmp_path: Path) -> None:
    """The install step of both Dockerfiles, for real: a fresh venv with the project, the
    ``guard`` command and the health probe (which reports an absent server as unhealthy)."""
    prefix = tmp_path / "guard"
    done = subprocess.run(
        ["bash", str(DOCKER / "install.sh"), str(prefix), "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed mps-guard cpu" in done.stdout
    serve_help = subprocess.run(
        [prefix / "bin" / "guard", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert serve_help.returncode == 0 and "--metrics-port" in serve_help.stdout
    probe = subprocess.run(
        [prefix / "bin" / "guard-healthcheck", "--address", "127.0.0.1:1", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 1 and "unhealthy" in probe.stderr


def _healthcheck_main() -> Any:
    spec = importlib.util.spec_from_file_location("guard_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_health_probe_plain_and_mutual_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = _healthcheck_main()
    with running_sidecar() as sidecar:
        assert probe(["--address", f"127.0.0.1:{sidecar.port}"]) == 0
        assert probe(["--address", f"127.0.0.1:{sidecar.port}", "--service", "inference.GRPCInferenceService"]) == 0  # fmt: skip
        assert capsys.readouterr().out.split() == ["serving", "serving"]
    assert probe(["--address", f"127.0.0.1:{sidecar.port}", "--timeout", "1"]) == 1
    pki = make_pki(tmp_path)
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with running_sidecar(**tls) as sidecar:
        address = ["--address", f"localhost:{sidecar.port}", "--tls-ca", str(pki.ca)]
        client = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        assert probe([*address, *client]) == 0
        assert probe([*address, "--timeout", "2"]) == 1  # no client certificate
    assert "unhealthy" in capsys.readouterr().err
