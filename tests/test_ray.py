"""``--ray`` on a real Ray cluster: two nodes on loopback (a head and one more node, one CPU
each, started with ``ray start`` and stopped with it), driven by the ``guard`` command in a
process of its own. A calibration and an audit through the cluster give the records of the
same runs on this machine, a worker killed mid-run is replaced and its batches sent again
(and the report says so), and an interrupted driver resumes from its cache.

Workers are found through the cluster itself: they are named actors (guard.scaleout.NAMESPACE)
whose ``info`` gives their process id. Pausing them (SIGSTOP) while the driver or a worker is
interrupted makes "mid-run" certain on a machine of any speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from guard import demo
from guard.cli import app

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'mps-guard[ray]')")

from guard.scaleout import NAMESPACE  # noqa: E402 - after the extra is known to be there

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"
RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = "127.0.0.1"
CALIBRATE = ["--iters", "2", "--batch-items", "2"]
AUDIT = ["--iters", "2", "--batch-items", "2", "--seeds", "2"]
ITEMS = 24
BAD_ITEM = 5  # NaN pixels: skipped and listed, by the workers as here
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 120
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class Cluster:
    """A head node and one more node on loopback, each a ``ray start --block`` process (in a
    process group of its own) that stops its node's processes when terminated."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths
        self.port = _free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        # No token: the module's own cluster, on loopback, for the minute the module runs (a
        # token would have to be set before this process first imported Ray).
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes: list[subprocess.Popen[bytes]] = []

    def _start_node(self, *args: str) -> None:
        common = ["--block", "--node-ip-address", LOOPBACK, "--num-cpus", "1",
                  "--object-store-memory", str(80 * 2**20), "--disable-usage-stats",
                  "--dashboard-agent-listen-port", str(_free_port()),
                  "--metrics-export-port", str(_free_port()),
                  "--runtime-env-agent-port", str(_free_port())]  # fmt: skip
        with (self.temp / f"node{len(self.nodes)}.log").open("wb") as log:
            self.nodes.append(
                subprocess.Popen(
                    [RAY, "start", *args, *common],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def start(self) -> None:
        self._start_node("--head", "--port", str(self.port), "--include-dashboard", "false",
                         "--temp-dir", str(self.temp),
                         "--ray-client-server-port", str(_free_port()))  # fmt: skip
        self._wait(lambda: _connectable(self.port), "the head node")
        self._start_node("--address", self.address)
        self.saved = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE")}
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        self._wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, "two nodes")

    def _wait(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():  # type: ignore[operator]
            if any(node.poll() is not None for node in self.nodes):
                pytest.fail(f"Ray could not start {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"Ray did not start {what} in {START_TIMEOUT_S} s:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.temp.glob("*.log"))

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in getattr(self, "saved", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)  # the group this test started
        for node in self.nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(self.temp, ignore_errors=True)

    def names(self) -> set[str]:
        """The named workers alive in the cluster."""
        actors = ray.util.list_named_actors(all_namespaces=True)
        return {a["name"] for a in actors if a["namespace"] == NAMESPACE}

    def workers(self, count: int, known: set[str]) -> list[int]:
        """The process ids of the first ``count`` workers of the run in progress (not among
        ``known``), once they have loaded the model (their info answers while they explain)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(names := sorted(self.names() - known)) < count:
            assert time.monotonic() < deadline, "the run's Ray workers did not appear"
            time.sleep(0.05)
        handles = [ray.get_actor(name, namespace=NAMESPACE) for name in names[:count]]
        infos = ray.get([h.info.options(concurrency_group="control").remote() for h in handles])
        return [info["pid"] for info in infos]


def _connectable(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((LOOPBACK, port)) == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    running = Cluster()
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with np.load(demo.DEMO_HELDOUT, allow_pickle=False) as archive:
        x, y = archive["x"][:ITEMS].copy(), archive["y"][:ITEMS]
    x[BAD_ITEM, 0, 3, 3] = np.nan
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out shapes with their object masks (the audit's localisation needs them)."""
    with np.load(MODELS / "shapes_heldout.npz", allow_pickle=False) as archive:
        x, y, masks = archive["x"][:ITEMS], archive["y"][:ITEMS], archive["masks"][:ITEMS]
    path = tmp_path_factory.mktemp("shapes") / "shapes.npz"
    np.savez(path, x=x, y=y, masks=masks)
    return path


def _audit_args(shapes: Path, report: Path) -> list[str]:
    models = [a for n in ("shapes_cnn", "shapes_gapcnn") for a in ("--model", str(MODELS / f"{n}.onnx"))]  # fmt: skip
    return ["audit", *models, "--data", str(shapes), "--report", str(report), *AUDIT,
            "--preprocessing", str(MODELS / "shapes_preprocessing.json"),
            "--classes", str(MODELS / "shapes_classes.json")]  # fmt: skip


def _records(cache: Path) -> dict[str, str]:
    """A cache's lines by item key (records and skipped items), its fingerprint apart."""
    lines = cache.read_text().splitlines()[1:]
    return {json.loads(line)["key"]: line for line in lines}


def _guard(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    """The ``guard`` command in a process of its own, as a user runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "guard", *args], cwd=ROOT, env=cluster.env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"guard ran past {RUN_TIMEOUT_S} s:\n{out}\n{err}")
    return process.returncode, out + err


def _signal_all(pids: list[int], which: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, which)
        except ProcessLookupError:  # gone already (the driver's exit stops its workers)
            pass


def test_calibration_on_ray_equals_the_local_run_and_survives_a_killed_worker(
    cluster: Cluster, digits: Path, tmp_path: Path
) -> None:
    local = runner.invoke(app, ["calibrate", str(digits), "--out", str(tmp_path / "local.json"),
                                *CALIBRATE])  # fmt: skip
    assert local.exit_code == 0, local.output

    out = tmp_path / "ray.json"
    known = cluster.names()
    process = _guard(cluster, "calibrate", str(digits), "--out", str(out), *CALIBRATE,
                     "--ray", cluster.address, "--ray-workers", "2")  # fmt: skip
    pids = cluster.workers(2, known)
    # Both workers paused, one killed: it held batches that had not finished (12 batches
    # for 2 workers, 2 sent ahead to each), which must go to a new worker.
    _signal_all(pids, signal.SIGSTOP)
    os.kill(pids[0], signal.SIGKILL)
    _signal_all(pids[1:], signal.SIGCONT)
    code, output = _finish(process)
    assert code == 0, output

    assert _records(out.with_name("ray.json.cache.jsonl")) == _records(
        tmp_path / "local.json.cache.jsonl"
    )
    assert f"ray: {ITEMS} items in {ITEMS // 2} batches on 2 workers (2 nodes)" in output
    assert "1 worker failure;" in output and "sent again and completed" in output
    assert f"npz:{BAD_ITEM}: input contains NaN or Inf values" in output  # listed as locally
    local_artifact = json.loads((tmp_path / "local.json").read_text())
    ray_artifact = json.loads(out.read_text())
    for artifact in (local_artifact, ray_artifact):
        artifact.pop("created_at")
    assert ray_artifact == local_artifact


def test_audit_on_ray_resumes_after_an_interrupted_driver_with_the_local_records(
    cluster: Cluster, shapes: Path, tmp_path: Path
) -> None:
    local = runner.invoke(app, _audit_args(shapes, tmp_path / "local"))
    assert local.exit_code == 0, local.output

    report = tmp_path / "ray"
    args = [*_audit_args(shapes, report), "--ray", cluster.address]
    known = cluster.names()
    process = _guard(cluster, *args)
    pids = cluster.workers(2, known)
    cache = report / "cache" / "shapes_cnn.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (cache.exists() and len(cache.read_text().splitlines()) > 1):
        assert process.poll() is None and time.monotonic() < deadline, "no record arrived"
        time.sleep(0.01)
    _signal_all(pids, signal.SIGSTOP)  # nothing more completes: the run is cut mid-way
    process.send_signal(signal.SIGINT)
    code, output = _finish(process)
    _signal_all(pids, signal.SIGCONT)
    assert code == 130, output
    assert "run the same command again to resume" in " ".join(output.split())
    done = len(_records(cache))
    assert 0 < done < ITEMS

    code, output = _finish(_guard(cluster, *args))
    assert code == 0, output
    for name in ("shapes_cnn", "shapes_gapcnn"):
        assert _records(report / "cache" / f"{name}.jsonl") == _records(
            tmp_path / "local" / "cache" / f"{name}.jsonl"
        ), name
    summary = json.loads((report / "summary.json").read_text())
    assert [m["n_resumed"] for m in summary["models"]] == [done, 0]
    assert f"ray: {2 * ITEMS - done} items" in output


def test_ray_without_the_extra_is_one_clear_message(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    result = runner.invoke(app, ["calibrate", str(digits), "--out", str(tmp_path / "c.json"),
                                 "--ray", "local"])  # fmt: skip
    assert result.exit_code == 2
    assert "pip install 'mps-guard[ray]'" in result.output
    result = runner.invoke(app, ["calibrate", str(digits), "--ray-workers", "2"])
    assert result.exit_code == 2 and "need --ray" in result.output
