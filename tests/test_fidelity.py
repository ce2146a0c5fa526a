"""The engine against the reference tool: rex-xai 0.4.1's MPSs, recorded as fixtures.

``benchmarks/record_rex_fixtures.py`` ran rex-xai (in its own venv) on a few held-out images of
two models and stored its MPSs in ``tests/fixtures/rex``; rex-xai itself is not needed here.
With ``random_stream="rex"`` the engine draws rex-xai's random streams and does its float32
arithmetic, so it must give the same MPS: the same area and the same pixels.

Why the float32 arithmetic matters: rex-xai sums each run's responsibility in float32 (adding
1, 0.5 or 0.33333334 per passing mutant, mutant after mutant) and combines runs by float32
multiplication with a renormalisation after each run, whereas the default engine counts in
exact twelfths and combines in float64 log space. Pixels whose exact products differ by less
than float32's accumulated rounding (about 1e-6 relative) come out tied or reversed in rex-xai
and not in exact arithmetic; ties are ranked by flat index, so where such pixels straddle a
tested prefix's boundary the prefixes hold different pixels. This bites deep in the ranking,
among the many low, nearly equal values of a large MPS: with exact arithmetic and rex-xai's
streams, 4 of 100 texture MPSs (0.83-0.89 of the image) came out 1-2 chunks smaller than
rex-xai's; with the float32 replay, 100 of 100 are identical.
The fixtures also hold rex-xai's float32 responsibility on both sides of its MPS boundary, which
the engine must reproduce to the bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from guard import demo
from guard.engine import MpsEngine
from guard.runtime import MaskedClassifier
from guard.settings import EngineSettings
from guard.verdict.artifact import SCHEMA_VERSION, load_artifact

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "rex"


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module", params=["digits_rgb", "textures"])
def reproduced(request) -> tuple[dict, list]:  # noqa: ANN001
    """A fixture and the engine's MPSs of the same images with rex-xai's random streams."""
    rex = _fixture(request.param)
    model = ROOT / str(rex["model"])
    assert hashlib.sha256(model.read_bytes()).hexdigest() == str(rex["model_sha256"]), (
        f"{model} changed since its rex-xai fixture was recorded: "
        "re-run benchmarks/record_rex_fixtures.py"
    )
    with np.load(ROOT / str(rex["data"]), allow_pickle=False) as held_out:
        images = held_out["x"][rex["indices"]].astype(np.float32)
    settings = EngineSettings(seed=int(rex["seed"]), random_stream="rex")
    return rex, MpsEngine(MaskedClassifier(model), settings).explain_batch(images)


def test_the_rex_stream_gives_rex_xais_predictions_and_mps_areas(reproduced) -> None:  # noqa: ANN001
    rex, results = reproduced
    assert [r.predicted_class for r in results] == rex["predicted_class"].tolist()
    areas = [r.mps_area_fraction for r in results]
    assert areas == rex["mps_area_fraction"].tolist()


def test_the_rex_stream_gives_rex_xais_mps_pixels_and_float32_responsibility(
    reproduced,
) -> None:  # noqa: ANN001
    rex, results = reproduced
    height, width = rex["shape"]
    masks = np.unpackbits(rex["mps_masks"], axis=1, count=height * width).astype(bool)
    inside, outside = rex["responsibility_inside_min"], rex["responsibility_outside_max"]
    for result, mask, low, high in zip(results, masks, inside, outside, strict=True):
        assert np.array_equal(result.mps_mask.ravel(), mask)
        values = result.responsibility.ravel()
        assert values[mask].min() == low
        if not mask.all():
            assert values[~mask].max() == high


def test_the_fixtures_hold_what_they_are_for() -> None:
    """One-chunk MPSs, large MPSs, and items whose all-baseline input keeps the class."""
    for name, baseline_class in (("digits_rgb", 4), ("textures", 5)):
        rex = _fixture(name)
        height, width = rex["shape"]
        chunks = rex["mps_area_fraction"] * height * width / EngineSettings().chunk_size
        assert (chunks == 1).sum() >= 2 and chunks.max() > 5
        # rex-xai never tests the empty set: these items get one chunk, not an empty MPS
        kept = rex["predicted_class"] == baseline_class
        assert kept.sum() >= 2 and (chunks[kept] >= 1).all()


def test_a_version_1_calibration_keeps_making_its_mpss_the_old_way(
    demo_classifier, heldout
) -> None:  # noqa: ANN001
    """Calibrations written before rex-xai's extraction became the default (schema version 1,
    the demo's until then) tested the empty set first: loading one says so in its engine
    settings, so serving still makes MPSs the way they were calibrated."""
    old = load_artifact(FIXTURES / "demo_calibration_v1.json")
    assert old.schema_version == SCHEMA_VERSION
    assert old.engine["empty_mps"] is True and old.engine["random_stream"] == "counter"
    fitted = EngineSettings.model_validate(old.engine).model_copy(update={"iters": 5})
    results = MpsEngine(demo_classifier, fitted).explain_batch(heldout[0][:40])
    kept = [r for r in results if r.baseline_keeps_class]
    assert kept and not any(r.mps_mask.any() for r in kept)
    assert all(r.mps_mask.any() for r in results if not r.baseline_keeps_class)


def test_a_new_calibration_records_both_settings() -> None:
    engine = load_artifact(demo.DEMO_CALIBRATION).engine
    assert engine["empty_mps"] is False and engine["random_stream"] == "counter"
