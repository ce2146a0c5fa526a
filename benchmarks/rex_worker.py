"""ReX worker: runs INSIDE the rex venv (rex-xai==0.4.1), started by ``rex_reference.py``.

It does what ``rex <image> --model M.onnx`` does on CPU with the ``rex.toml`` in the working
directory (load config, validate it, build rex's ONNX prediction function, then for each input:
target prediction, responsibility maps, global sufficiency extraction), except that the inputs
are the already-preprocessed float tensors from an .npz instead of image files (rex's image
preprocessing would resize and rescale them). The prediction function is wrapped to count model
calls and evaluated images.

Usage (cwd must hold rex.toml)::

    python rex_worker.py --model M.onnx --npz inputs.npz --out results.jsonl

Each output line is a JSON object; the mask is given as flat indices into ``mask_shape`` (H, W).
Progress goes to stderr; rex's own logger writes to stdout and is silenced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch as tt  # noqa: E402
from rex_xai.explanation.explanation import Explanation  # noqa: E402
from rex_xai.explanation.rex import (  # noqa: E402
    calculate_responsibility,
    get_prediction_func_from_args,
    predict_target,
    validate_shape,
)
from rex_xai.input.config import load_config, validate_args  # noqa: E402
from rex_xai.input.input_data import Data  # noqa: E402
from rex_xai.utils._utils import Strategy, get_device  # noqa: E402
from rex_xai.utils.logger import logger, set_log_level  # noqa: E402


def _err(msg: str) -> None:
    print(f"[rex-worker] {msg}", file=sys.stderr, flush=True)


class CountingPredictor:
    """Wraps rex's prediction function; counts calls and the images they evaluate."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.evaluations = 0

    def __call__(self, tensors, *args, **kwargs):
        self.calls += 1
        if isinstance(tensors, (list, tuple)):
            self.evaluations += len(tensors)
        else:
            self.evaluations += int(tensors.shape[0]) if tensors.ndim >= 4 else 1
        return self.fn(tensors, *args, **kwargs)

    def snapshot(self) -> tuple[int, int]:
        return self.calls, self.evaluations


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--npz", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=None, help="default: rex.toml in the working directory")
    ap.add_argument("--verbosity", type=int, default=0, help="rex log level, 0 = errors only")
    a = ap.parse_args()

    # --- what rex_wrapper.main() does, minus argv parsing --------------------------------
    args = load_config(a.config)  # finds ./rex.toml like the CLI
    if args.config_location is None:
        raise SystemExit("rex.toml not found in the working directory")
    args.model = a.model
    args.path = a.npz  # only checked for existence by validate_args; never read by rex here
    args.mode = "RGB"
    args.strategy = Strategy.Global
    args.verbosity = a.verbosity
    validate_args(args)
    set_log_level(args.verbosity, logger)
    device = get_device(args.gpu)
    if args.gpu or str(device) != "cpu":
        raise SystemExit(f"expected a CPU run (gpu=false in rex.toml), got device {device}")

    raw_predict, model_shape = get_prediction_func_from_args(args)
    if isinstance(model_shape[0], int) and model_shape[0] < args.batch_size:
        args.batch_size = model_shape[0]
    predict = CountingPredictor(raw_predict)

    with np.load(a.npz) as d:
        xs = np.asarray(d["x"], dtype=np.float32)
    _err(
        f"model input {list(model_shape)}, {len(xs)} input(s) {list(xs.shape[1:])}, seed {args.seed}, "
        f"iters {args.iters}, tree_depth {args.tree_depth}, min_box_size {args.min_box_size}, "
        f"chunk_size {args.chunk_size}, mask_value {args.mask_value}, batch_size {args.batch_size}"
    )

    with open(a.out, "w") as out:
        for idx, x in enumerate(xs):
            # Data as try_preprocess() would build it for an RGB image, but with our tensor.
            data = Data(x, model_shape, device, mode="RGB")
            if data.model_channels != 3 or (data.model_height, data.model_width) != x.shape[1:]:
                raise SystemExit(
                    f"rex needs a 3-channel model with static H, W matching the inputs; model "
                    f"input {list(model_shape)}, input {list(x.shape)}"
                )
            if data.model_order == "first":
                arr = x  # [3, H, W]
                data.transposed = True
            else:
                arr = np.ascontiguousarray(x.transpose(1, 2, 0))  # model wants [H, W, 3]
            data.data = tt.from_numpy(np.ascontiguousarray(arr)[None].copy()).to(device)
            data.set_mask_value(args.mask_value)
            data = validate_shape(data, model_shape)

            c0 = predict.snapshot()
            data.target = predict_target(data, args, predict)
            c1 = predict.snapshot()

            t0 = time.perf_counter()
            maps, run_stats = calculate_responsibility(data, args, predict)
            if args.negative_responsibility:
                maps.negative_responsibility(data.target.classification)
            t1 = time.perf_counter()
            c2 = predict.snapshot()
            exp = Explanation(maps, predict, data, args, run_stats)
            exp.extract()
            t2 = time.perf_counter()
            c3 = predict.snapshot()

            m = exp.sufficiency_mask.detach().cpu().numpy().astype(bool)
            # [3, H, W] (or [H, W, 3]) -> [H, W]: a pixel is in the MPS if any channel is.
            while m.ndim > 3:
                m = m[0]
            m2 = m.any(axis=0) if data.model_order == "first" else m.any(axis=-1)
            h, w = m2.shape
            # rex-xai's own ranking values (float32) on both sides of the MPS boundary, to check
            # a replay of its float32 arithmetic against (exact sums order near-ties otherwise).
            r_map = np.asarray(exp.target_map.detach().cpu().numpy(), dtype=np.float64)
            r_map = r_map.reshape(h, w)
            inside = float(r_map[m2].min()) if m2.any() else None
            outside = float(r_map[~m2].max()) if (~m2).any() else None
            row = {
                "index": idx,
                "predicted_class": int(data.target.classification),
                "confidence": float(data.target.confidence),
                "mps_area_fraction": float(m2.sum()) / float(h * w),
                "mask_shape": [int(h), int(w)],
                "mask_indices": np.flatnonzero(m2.ravel()).astype(int).tolist(),
                "seconds": t2 - t0,
                "phase1_seconds": t1 - t0,
                "phase2_seconds": t2 - t1,
                "model_calls": c3[0] - c1[0],
                "model_evaluations": c3[1] - c1[1],
                "responsibility_calls": c2[0] - c1[0],
                "responsibility_evaluations": c2[1] - c1[1],
                "extraction_calls": c3[0] - c2[0],
                "extraction_evaluations": c3[1] - c2[1],
                "target_prediction_calls": c1[0] - c0[0],
                "sufficiency_confidence": (
                    None
                    if exp.sufficiency_confidence is None
                    else float(exp.sufficiency_confidence)
                ),
                "run_stats": {k: float(v) for k, v in run_stats.items()},
                "responsibility_inside_min": inside,
                "responsibility_outside_max": outside,
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            _err(
                f"{idx + 1}/{len(xs)}: class {row['predicted_class']} "
                f"area {row['mps_area_fraction']:.4f} {row['seconds']:.2f}s "
                f"({row['phase1_seconds']:.2f}+{row['phase2_seconds']:.2f}) "
                f"calls {row['model_calls']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
