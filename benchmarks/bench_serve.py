"""Load generator against a running sidecar: throughput, latency and memory by mode and sharing.

For each configuration (sync/async x shared model calls on/off) it starts ``guard serve`` on
the demo model as a child process, warms it up, then runs 1, 4 and 16 concurrent clients for
a fixed duration each, every client sending one-item ModelInfer requests (held-out digits)
back to back. It reports requests per second, p50/p99 latency, errors, checks completed per
second (from the server's own metrics), model evaluations per request, and the server's
resident memory before and after.

``--compare-explain`` instead measures what ``--explain flagged`` saves against ``--explain
all`` (sync mode, model-call sharing at its default, every request checked), side by side in
one run, at 1 and 4 clients unless ``--clients`` says otherwise.

``--model lite0 --calibration FILE`` serves the bundled ImageNet classifier (EfficientNet-Lite0,
224x224) on the bundled photos with a calibration (``make imagenet-views-calibration`` makes a
stand-in from views of the labelled photos, ``make imagenet-calibration DATA=...`` one from your
labelled images), and measures latency with ReX's default engine settings and with ``--fast``
(sync), then ``--fast`` in async mode and with ``--sample-rate 0.25``, side by side, at 1 and 4
clients unless ``--clients`` says otherwise (each is served over the calibration with
``--engine-settings`` and ``--allow-engine-mismatch`` where it differs from the calibration's:
that changes the verdicts' scores, not the work measured).

    python benchmarks/bench_serve.py [--duration 10] [--provider cuda] [--json out.json]
    python benchmarks/bench_serve.py --compare-explain [--duration 10]
    python benchmarks/bench_serve.py --model lite0 --calibration FILE [--duration 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard import demo, imagenet  # noqa: E402
from guard.service.metrics import SKIP_REASONS  # noqa: E402
from guard.settings import FAST_PRESET, EngineSettings  # noqa: E402
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from tests.serving import (  # noqa: E402
    LOOPBACK,
    ServeProcess,
    infer_request,
    scrape,
    value,
    wait_for,
)

MODEL = "digits_cnn"
CONFIGS = [("sync", True), ("sync", False), ("async", True), ("async", False)]
EXPLAIN_MODES = ("all", "flagged")
LITE0 = "efficientnet_lite0"
# Lite0: (engine settings, mode, extra serve flags); each a sidecar of its own.
LITE0_CONFIGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("default", "sync", ()),
    ("fast", "sync", ()),
    # A short queue: at ~1 s per check a full default queue (256) would lag minutes behind.
    ("fast", "async", ("--queue-size", "8")),
    ("fast", "sync", ("--sample-rate", "0.25")),
)
DEFAULT_ENGINE = {name: EngineSettings().model_dump()[name] for name in FAST_PRESET}


@dataclass
class Row:
    provider: str
    mode: str
    shared: bool | None  # None: the default (on with CUDA, off on CPU)
    explain: str
    clients: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    checks_per_s: float
    evaluations_per_request: float
    skipped: int
    rss_before_mb: float
    rss_after_mb: float
    model: str = MODEL
    engine: str = "calibrated"  # the calibration's engine settings, or "default" / "fast"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _settled(metrics_port: int, before: dict, model: str) -> bool:
    """Every prediction of ``model`` since ``before`` has been checked or skipped."""
    now = scrape(metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(now, name, 0.0, model=model, **labels) - value(
            before, name, 0.0, model=model, **labels
        )

    skipped = sum(delta("guard_skipped_checks_total", reason=reason) for reason in SKIP_REASONS)
    return delta("guard_predictions_total") == delta("guard_checked_predictions_total") + skipped


def _wait_settled(metrics_port: int, before: dict, model: str) -> None:
    wait_for(lambda: _settled(metrics_port, before, model), timeout=300, what="background checks")


def drive(
    port: int,
    input_name: str,
    images: np.ndarray,
    clients: int,
    duration: float,
    model: str = MODEL,
):
    """``clients`` threads sending one-item requests for ``duration`` s; latencies and errors."""
    channel = grpc.insecure_channel(f"{LOOPBACK}:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    requests = [infer_request(model, input_name, image[None]) for image in images]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    ends = time.monotonic() + duration

    def client(k: int) -> None:
        mine, i = [], k
        while time.monotonic() < ends:
            started = time.perf_counter()
            try:
                stub.ModelInfer(requests[i % len(requests)], timeout=300)
                mine.append(time.perf_counter() - started)
            except grpc.RpcError:
                with lock:
                    errors[0] += 1
            i += clients
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    return np.array(latencies), errors[0]


def bench_config(
    mode: str,
    shared: bool | None,
    levels: list[int],
    duration: float,
    provider: str,
    explain: str = "all",
    model_key: str = "demo",
    engine: str = "calibrated",
    workdir: Path | None = None,
    calibration: Path | None = None,
    extra: tuple[str, ...] = (),
) -> list[Row]:
    if model_key == "lite0":
        assert calibration is not None and workdir is not None
        model, x = LITE0, lite0_inputs()
        served = lite0_server_args(engine, calibration, workdir)
    else:
        model, x = MODEL, np.load(demo.DEMO_HELDOUT, allow_pickle=False)["x"][:200]
        served = []
    sharing = [] if shared is None else ["--share-model-calls" if shared else "--no-share-model-calls"]  # fmt: skip
    server = ServeProcess(
        "--port", "0", "--metrics-port", "0", "--mode", mode, "--no-log-verdicts",
        *sharing, "--provider", provider, "--explain", explain, *served, *extra,
    )  # fmt: skip
    rows = []
    try:
        import onnx

        path = imagenet.LITE0_MODEL if model_key == "lite0" else demo.DEMO_MODEL
        input_name = onnx.load(str(path)).graph.input[0].name
        before = scrape(server.metrics_port)
        running = dict(next(iter(before["guard_model_info"])))["provider"]
        warm_up = (1, len(x) * 1.0) if model_key == "lite0" else (4, 2.0)
        drive(server.port, input_name, x, *warm_up, model=model)
        _wait_settled(server.metrics_port, before, model)
        for clients in levels:
            metrics = before = scrape(server.metrics_port)
            checked0 = value(metrics, "guard_checked_predictions_total", 0.0, model=model)
            evaluations0 = value(metrics, "guard_model_evaluations_total", 0.0, model=model)
            skipped0 = value(
                metrics, "guard_skipped_checks_total", model=model, reason="queue_full"
            )
            rss_before = rss_mb(server.process.pid)
            started = time.perf_counter()
            latencies, errors = drive(server.port, input_name, x, clients, duration, model)
            if mode == "async":  # checks per second include finishing what the queue accepted
                _wait_settled(server.metrics_port, before, model)
            checking_seconds = time.perf_counter() - started
            metrics = scrape(server.metrics_port)
            checked = value(metrics, "guard_checked_predictions_total", 0.0, model=model) - checked0
            skipped = value(metrics, "guard_skipped_checks_total", model=model, reason="queue_full")
            evaluations = (
                value(metrics, "guard_model_evaluations_total", 0.0, model=model) - evaluations0
            )
            rows.append(
                Row(
                    provider=running,
                    mode=mode,
                    shared=shared,
                    explain=explain,
                    clients=clients,
                    requests_per_s=len(latencies) / duration,
                    p50_ms=float(np.percentile(latencies, 50) * 1000) if len(latencies) else 0,
                    p99_ms=float(np.percentile(latencies, 99) * 1000) if len(latencies) else 0,
                    errors=errors,
                    checks_per_s=checked / checking_seconds,
                    evaluations_per_request=evaluations / max(len(latencies), 1),
                    skipped=int(skipped - skipped0),
                    rss_before_mb=rss_before,
                    rss_after_mb=rss_mb(server.process.pid),
                    model=model,
                    engine=" ".join((engine, *extra)),
                )
            )
            print(
                f"  {model} {engine} {mode:5} shared={shared!s:5} explain={explain:7} clients={clients:2}: "
                f"{rows[-1].requests_per_s:7.1f} req/s",
                file=sys.stderr,
            )
    finally:
        server.process.terminate()
        server.finish()
    return rows


def lite0_inputs() -> np.ndarray:
    """The bundled photos as EfficientNet-Lite0 inputs (its preprocessing: 256, centre 224)."""
    import onnx

    from guard.preprocess import Preprocessing, load_input
    from guard.runtime.spec import inspect_model
    from guard.settings import ModelOptions

    spec = inspect_model(onnx.load(str(imagenet.LITE0_MODEL)), ModelOptions())
    preprocessing = Preprocessing.from_file(imagenet.LITE0_PREPROCESSING)
    photos = sorted(imagenet.IMAGENET_IMAGES.iterdir())
    return np.stack([load_input(path, spec, preprocessing) for path in photos])


def lite0_server_args(engine: str, calibration: Path, workdir: Path) -> list[str]:
    """The Lite0 sidecar's model and calibration, with ReX's default settings or the fast
    preset (over the calibration's own settings where they differ)."""
    args = ["--model", str(imagenet.LITE0_MODEL), "--calibration", str(calibration)]
    calibrated = EngineSettings.model_validate(json.loads(calibration.read_text())["engine"])
    wanted = calibrated.model_copy(update=FAST_PRESET if engine == "fast" else DEFAULT_ENGINE)
    if wanted != calibrated:
        settings = workdir / f"{engine}_engine.json"
        settings.write_text(wanted.model_dump_json())
        args += ["--engine-settings", str(settings), "--allow-engine-mismatch"]
    return args


def engine_table(rows: list[Row]) -> str:
    """Sync latency of one model with each engine setting, per client count."""
    lines = [
        "| model | engine | mode | clients | req/s | p50 ms | p99 ms | checks/s | "
        "evaluations / request | skipped (queue full) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.engine} | {r.mode} | {r.clients} | {r.requests_per_s:.2f} | "
            f"{r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.checks_per_s:.2f} | "
            f"{r.evaluations_per_request:.0f} | {r.skipped} | {r.errors} |"
        )
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    lines = [
        "| mode | shared calls | explain | clients | req/s | p50 ms | p99 ms | errors | checks/s | evaluations / request | skipped | RSS MB before -> after |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shared = "default" if r.shared is None else "yes" if r.shared else "no"
        lines.append(
            f"| {r.mode} | {shared} | {r.explain} | {r.clients} | {r.requests_per_s:.1f} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {r.checks_per_s:.1f} | "
            f"{r.evaluations_per_request:.0f} | {r.skipped} | "
            f"{r.rss_before_mb:.0f} -> {r.rss_after_mb:.0f} |"
        )
    return "\n".join(lines)


def explain_table(rows: list[Row]) -> str:
    """``--explain flagged`` beside ``--explain all``, per client count, from the same run."""
    by = {(r.explain, r.clients): r for r in rows}
    lines = [
        "| clients | checked req/s, all | checked req/s, flagged | flagged / all | p99 ms, all "
        "| p99 ms, flagged | evaluations / request, all | evaluations / request, flagged |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in sorted({r.clients for r in rows}):
        a, f = by.get(("all", clients)), by.get(("flagged", clients))
        if a is None or f is None:
            continue
        gain = f"{f.requests_per_s / a.requests_per_s:.1f}x" if a.requests_per_s else "-"
        lines.append(
            f"| {clients} | {a.requests_per_s:.1f} | {f.requests_per_s:.1f} | {gain} | "
            f"{a.p99_ms:.1f} | {f.p99_ms:.1f} | {a.evaluations_per_request:.0f} | "
            f"{f.evaluations_per_request:.0f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> str:
    """Shared over unshared throughput, per mode and client count, from the same run."""
    by = {(r.mode, r.shared, r.clients): r for r in rows}
    lines = [
        "| mode | clients | req/s shared / unshared | p99 shared / unshared |",
        "|---|---:|---:|---:|",
    ]
    for mode, _ in CONFIGS[::2]:
        for clients in sorted({r.clients for r in rows}):
            a, b = by.get((mode, True, clients)), by.get((mode, False, clients))
            if a and b and b.requests_per_s and b.p99_ms:
                lines.append(
                    f"| {mode} | {clients} | {a.requests_per_s / b.requests_per_s:.2f}x | "
                    f"{a.p99_ms / b.p99_ms:.2f}x |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument(
        "--clients", help="concurrency levels (default 1,4,16; 1,4 with --compare-explain)"
    )
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--compare-explain",
        action="store_true",
        help="--explain flagged against --explain all (sync, default sharing) instead",
    )
    parser.add_argument(
        "--model",
        choices=["demo", "lite0"],
        default="demo",
        help="lite0: EfficientNet-Lite0 (224x224) on the bundled photos, ReX's default engine "
        "settings against --fast (sync), --fast async and --fast --sample-rate 0.25",
    )
    parser.add_argument("--calibration", type=Path, help="with --model lite0: its calibration")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.model == "lite0" and args.calibration is None:
        parser.error(
            "--model lite0 needs --calibration FILE: make imagenet-views-calibration makes a "
            "stand-in, make imagenet-calibration DATA=... one from labelled ImageNet images"
        )
    short = args.compare_explain or args.model == "lite0"
    levels = [int(c) for c in (args.clients or ("1,4" if short else "1,4,16")).split(",")]
    if args.model == "lite0":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows = [
                row
                for engine, mode, extra in LITE0_CONFIGS
                for row in bench_config(
                    mode, None, levels, args.duration, args.provider,
                    model_key="lite0", engine=engine, workdir=Path(tmp),
                    calibration=args.calibration, extra=extra,
                )
            ]  # fmt: skip
        print(
            f"Sidecar load test: EfficientNet-Lite0 (224x224) on {rows[0].provider}, sync, "
            f"{args.duration:g} s per level, {os.cpu_count()} CPUs, {platform.machine()}"
        )
        print()
        print(engine_table(rows))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
        return
    if args.compare_explain:
        rows = [
            row
            for explain in EXPLAIN_MODES
            for row in bench_config("sync", None, levels, args.duration, args.provider, explain)
        ]
    else:
        rows = [
            row
            for mode, shared in CONFIGS
            for row in bench_config(mode, shared, levels, args.duration, args.provider)
        ]
    providers = ", ".join(sorted({r.provider for r in rows}))
    print(
        f"Sidecar load test: demo model on {providers}, {args.duration:g} s per level, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print()
    print(table(rows))
    print()
    print(explain_table(rows) if args.compare_explain else ratios(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
