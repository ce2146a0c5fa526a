"""Run the reference tool ReX (``rex-xai==0.4.1``) side by side with our engine.

ReX pins ``numpy==1.26.4`` and needs torch, so it lives in its own virtual environment
(``benchmarks/.rex-venv`` by default, git-ignored). This module runs in the *project* venv and
needs only the standard library and numpy: it builds the rex venv on demand, writes the inputs
and a ``rex.toml`` into a work directory, and runs ``benchmarks/rex_worker.py`` with the rex
venv's interpreter. The worker drives ReX through its Python API (the same calls its CLI makes
for one ONNX model on CPU, batch size 1), feeding the already-preprocessed float tensors directly.

Library use::

    from benchmarks.rex_reference import ensure_rex_venv, run_reference
    rows = run_reference(Path("m.onnx"), x[:5], seed=0, workdir=Path("out/rex"))

CLI::

    python benchmarks/rex_reference.py --model M.onnx --npz D.npz [--limit 5] [--seed 0] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".rex-venv"
WORKER = BENCH_DIR / "rex_worker.py"

REX_VERSION = "0.4.1"
# The CPU wheel of this torch release is available locally; pinning it on every pip call keeps
# the resolver from ever swapping in another (multi-GB CUDA) build.
TORCH_VERSION = "2.13.0"
_MARKER = ".rex-ready"

__all__ = ["ensure_rex_venv", "run_reference", "rex_python"]


def _log(msg: str) -> None:
    print(f"[rex-reference] {msg}", file=sys.stderr, flush=True)


def rex_python(venv_dir: Path = DEFAULT_VENV) -> Path:
    """Path of the interpreter inside the rex venv (whether or not it exists yet)."""
    venv_dir = Path(venv_dir)
    if os.name == "nt":
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def _run_logged(cmd: list[str], **kw) -> None:
    """Run a command, streaming its output to stderr; raise on failure."""
    _log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        **kw,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        sys.stderr.write("    " + line)
        tail = (tail + [line])[-40:]
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(
            f"command failed with exit status {rc}: {' '.join(map(str, cmd))}\n" + "".join(tail)
        )


def ensure_rex_venv(venv_dir: Path = DEFAULT_VENV) -> Path:
    """Create the rex venv if it is missing and return its python.

    Installs ``torch==2.13.0`` first (the CPU wheel), then ``rex-xai==0.4.1`` with torch pinned
    again. A marker file written after a successful import check makes later calls instant; a
    half-built venv (no marker) is removed and rebuilt.
    """
    venv_dir = Path(venv_dir)
    py = rex_python(venv_dir)
    marker = venv_dir / _MARKER
    if marker.is_file() and py.exists():
        return py

    t0 = time.perf_counter()
    if venv_dir.exists():
        _log(f"removing incomplete rex venv at {venv_dir}")
        shutil.rmtree(venv_dir)
    _log(f"creating rex venv at {venv_dir} (one-off, a few minutes)")
    base = shutil.which("python3") or sys.executable
    _run_logged([base, "-m", "venv", str(venv_dir)])
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    _run_logged(pip + [f"torch=={TORCH_VERSION}"])
    _run_logged(pip + [f"rex-xai=={REX_VERSION}", f"torch=={TORCH_VERSION}"])
    check = (
        "import importlib.metadata as m, torch, onnxruntime, numpy, rex_xai.explanation.rex;"
        "print('rex-xai', m.version('rex-xai'), 'torch', torch.__version__,"
        " 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
    )
    out = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("rex venv import check failed:\n" + out.stdout + out.stderr)
    versions = out.stdout.strip()
    marker.write_text(versions + "\n")
    _log(f"rex venv ready in {time.perf_counter() - t0:.0f}s: {versions}")
    return py


def _toml_number(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _write_rex_toml(
    path: Path,
    *,
    seed: int,
    iters: int,
    tree_depth: int,
    min_box_size: int,
    chunk_size: int,
    baseline: float,
) -> None:
    # Table names matter: rex reads [rex] (+ [rex.onnx], [rex.visual]), [causal] and
    # [explanation]; misplaced keys are skipped with a warning, unknown tables silently.
    text = f"""# written by benchmarks/rex_reference.py
[rex]
gpu = false
seed = {int(seed)}
batch_size = 1
mask_value = {_toml_number(baseline)}

[rex.onnx]
# inputs are fed already preprocessed, so no means/stds here

[rex.visual]
progress_bar = false

[causal]
tree_depth = {int(tree_depth)}
iters = {int(iters)}
min_box_size = {int(min_box_size)}
responsibility_style = "multiplicative"
queue_style = "area"
queue_len = 1

[explanation]
chunk_size = {int(chunk_size)}
"""
    path.write_text(text)


def run_reference(
    model: Path,
    inputs: np.ndarray,
    *,
    seed: int,
    iters: int = 20,
    tree_depth: int = 10,
    min_box_size: int = 10,
    chunk_size: int = 10,
    baseline: float = 0.0,
    workdir: Path,
    venv_dir: Path = DEFAULT_VENV,
) -> list[dict]:
    """Explain each input with ReX and return one dict per input.

    ``inputs``: float32 ``[N, 3, H, W]``, already preprocessed for the model (NCHW).

    Each dict has ``predicted_class`` (int), ``confidence`` (softmax of the target),
    ``mps_area_fraction`` (True pixels of the channel-reduced sufficiency mask over H*W),
    ``mps_mask`` (bool ``[H, W]``), ``seconds`` (wall time of responsibility + extraction, without
    start-up, model loading or the initial target prediction), ``model_calls`` /
    ``model_evaluations`` (prediction-function calls / images evaluated over the same two phases;
    exact, counted by wrapping rex's prediction function), plus the breakdowns
    ``responsibility_*`` / ``extraction_*``, ``target_prediction_calls``, ``phase1_seconds``,
    ``phase2_seconds``, ``sufficiency_confidence``, rex's ``run_stats``, and
    ``responsibility_inside_min`` / ``responsibility_outside_max``: rex's float32 responsibility
    at the MPS boundary (the smallest value inside the mask, the largest outside; None where a
    side is empty), to check a replay of its float32 arithmetic against.
    """
    model = Path(model).resolve()
    workdir = Path(workdir).resolve()
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"inputs must be float32 [N, 3, H, W], got shape {x.shape}")
    if not model.is_file():
        raise FileNotFoundError(model)

    py = ensure_rex_venv(venv_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    npz = workdir / "inputs.npz"
    np.savez(npz, x=x)
    _write_rex_toml(
        workdir / "rex.toml",
        seed=seed,
        iters=iters,
        tree_depth=tree_depth,
        min_box_size=min_box_size,
        chunk_size=chunk_size,
        baseline=baseline,
    )
    out = workdir / "results.jsonl"
    if out.exists():
        out.unlink()

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # keep the project venv's packages out of the rex venv
    env["TQDM_DISABLE"] = "1"  # rex's extraction bar ignores its own progress_bar setting
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [str(py), str(WORKER), "--model", str(model), "--npz", str(npz), "--out", str(out)]
    _log(f"explaining {len(x)} input(s) with rex-xai {REX_VERSION} (seed {seed}, iters {iters})")
    _run_logged(cmd, cwd=str(workdir), env=env)

    rows: list[dict] = []
    with out.open() as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            h, w = r.pop("mask_shape")
            mask = np.zeros(h * w, dtype=bool)
            mask[np.asarray(r.pop("mask_indices"), dtype=np.int64)] = True
            r["mps_mask"] = mask.reshape(h, w)
            rows.append(r)
    if len(rows) != len(x):
        raise RuntimeError(f"rex worker returned {len(rows)} results for {len(x)} inputs")
    return rows


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run the reference tool rex-xai on preprocessed inputs."
    )
    ap.add_argument("--model", type=Path, required=True, help="ONNX classifier (NCHW, 3 channels)")
    ap.add_argument(
        "--npz", type=Path, required=True, help=".npz with key x [N,3,H,W] (and optional y)"
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first LIMIT inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tree-depth", type=int, default=10)
    ap.add_argument("--min-box-size", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=10)
    ap.add_argument("--baseline", type=float, default=0.0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    a = ap.parse_args(argv)

    with np.load(a.npz) as d:
        x = d["x"]
        y = d["y"] if "y" in d.files else None
    if a.limit is not None:
        x = x[: a.limit]
        y = y[: a.limit] if y is not None else None

    import tempfile

    tmp = None
    workdir = a.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rex-ref-")
        workdir = Path(tmp.name)
    try:
        rows = run_reference(
            a.model,
            x,
            seed=a.seed,
            iters=a.iters,
            tree_depth=a.tree_depth,
            min_box_size=a.min_box_size,
            chunk_size=a.chunk_size,
            baseline=a.baseline,
            workdir=workdir,
            venv_dir=a.venv,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(
        f"{'i':>3} {'label':>5} {'pred':>5} {'conf':>6} {'area':>7} {'secs':>7} {'calls':>6} {'evals':>6}"
    )
    for i, r in enumerate(rows):
        label = "-" if y is None else str(int(y[i]))
        print(
            f"{i:>3} {label:>5} {r['predicted_class']:>5} {r['confidence']:>6.3f} "
            f"{r['mps_area_fraction']:>7.4f} {r['seconds']:>7.3f} "
            f"{r['model_calls']:>6} {r['model_evaluations']:>6}"
        )
    if rows:
        secs = [r["seconds"] for r in rows]
        areas = [r["mps_area_fraction"] for r in rows]
        calls = [r["model_calls"] for r in rows]
        print(
            f"mean: area {np.mean(areas):.4f}, {np.mean(secs):.3f} s/image, "
            f"{np.mean(calls):.0f} model calls/image"
        )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
