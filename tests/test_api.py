"""The library API: ``from guard import ...`` names, a light ``import guard``, and ``Guard``
giving the verdicts the sidecar serves."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import guard
from guard import demo
from guard.errors import GuardError, InvalidInputError, ModelLoadError
from guard.transport.grpc.client import GuardClient, unpack_mask
from guard.transport.grpc.server import Sidecar
from tests.serving import LOOPBACK, running_sidecar

REPO = Path(__file__).resolve().parents[1]
IMAGE = demo.DEMO_IMAGES / "digit3_45.png"
# The README's example, line for line.
README_EXAMPLE = """\
from guard import Guard
g = Guard.from_files("guard/demo/digits_cnn.onnx", "guard/demo/calibration.json")
c = g.check("guard/demo/images/digit3_45.png")
print(c.predicted_class, c.flagged, c.p_value)
"""


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    with running_sidecar() as server:
        yield server


@pytest.fixture(scope="module")
def client(sidecar: Sidecar) -> Iterator[GuardClient]:
    with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
        yield client


@pytest.fixture(scope="module")
def demo_guard() -> guard.Guard:
    return guard.Guard.from_files(demo.DEMO_MODEL, demo.DEMO_CALIBRATION)


def test_the_public_names_are_pinned() -> None:
    assert guard.__all__ == [
        "Check",
        "EngineSettings",
        "Guard",
        "GuardError",
        "MaskedClassifier",
        "ModelOptions",
        "MpsEngine",
        "MpsResult",
        "Preprocessing",
        "load_calibration",
    ]
    from guard.api import Guard
    from guard.engine import MpsEngine, MpsResult
    from guard.preprocess import Preprocessing
    from guard.runtime import MaskedClassifier
    from guard.service.guarded_model import Check
    from guard.settings import EngineSettings, ModelOptions
    from guard.verdict.artifact import load_artifact

    exported = {name: getattr(guard, name) for name in guard.__all__}
    assert exported == {
        "Check": Check,
        "EngineSettings": EngineSettings,
        "Guard": Guard,
        "GuardError": GuardError,
        "MaskedClassifier": MaskedClassifier,
        "ModelOptions": ModelOptions,
        "MpsEngine": MpsEngine,
        "MpsResult": MpsResult,
        "Preprocessing": Preprocessing,
        "load_calibration": load_artifact,
    }
    assert set(guard.__all__) <= set(dir(guard))
    with pytest.raises(AttributeError, match="no attribute 'Gaurd'"):
        guard.Gaurd  # noqa: B018


def test_import_guard_loads_neither_onnxruntime_nor_grpc() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import json, sys, guard; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    modules = set(json.loads(loaded))
    assert "guard" in modules
    assert not {"onnxruntime", "onnx", "grpc", "guard.api", "guard.engine"} & modules


def test_the_readme_example_gives_the_sidecars_verdict(client: GuardClient) -> None:
    run = subprocess.run(
        [sys.executable, "-c", README_EXAMPLE], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0, run.stderr
    predicted_class, flagged, p_value = run.stdout.split()
    served = client.explain(IMAGE.read_bytes())
    assert int(predicted_class) == served.predicted_class == 3
    assert flagged == str(served.flagged)
    assert float(p_value) == served.p_value


def _assert_same_verdict(check: guard.Check, served) -> None:
    # A batch's predictions may differ from one item's in the last bits: close, not equal.
    assert check.predicted_class == served.predicted_class
    assert check.predicted_name == served.predicted_name
    assert check.confidence == pytest.approx(served.confidence, rel=1e-6)
    assert check.mps_area_fraction == served.mps_area_fraction
    assert check.degenerate == served.degenerate
    assert check.score == pytest.approx(served.score, rel=1e-5)
    assert check.p_value == pytest.approx(served.p_value, rel=1e-5)
    assert check.flagged == served.flagged
    assert check.reason == (served.reason or "ok")
    assert check.model_evaluations == served.model_evaluations
    np.testing.assert_array_equal(check.mps_mask, unpack_mask(served.mask))


def test_every_input_form_gets_the_sidecars_verdict(
    demo_guard: guard.Guard, client: GuardClient
) -> None:
    served = client.explain(IMAGE.read_bytes(), include_mask=True)
    tensor = demo_guard.model.load(IMAGE)
    for given in (str(IMAGE), IMAGE, IMAGE.read_bytes(), tensor):
        _assert_same_verdict(demo_guard.check(given), served)


def test_a_batch_gets_each_items_own_verdict(
    demo_guard: guard.Guard, client: GuardClient, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0][:4]
    served = [client.explain(image, include_mask=True) for image in x]
    for checks in (demo_guard.check_batch(x), demo_guard.check_batch(list(x))):
        assert len(checks) == len(x)
        for check, answer in zip(checks, served, strict=True):
            _assert_same_verdict(check, answer)
    assert demo_guard.check_batch([]) == []


def test_bad_inputs_and_files_raise_guard_errors(demo_guard: guard.Guard, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"shape \[32, 32\]"):
        demo_guard.check(np.zeros((32, 32), np.float32))
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        demo_guard.check(np.full((1, 32, 32), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="does not exist"):
        demo_guard.check(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="cannot decode image"):
        demo_guard.check(b"not an image")
    with pytest.raises(ModelLoadError):
        guard.Guard.from_files(tmp_path / "missing.onnx", demo.DEMO_CALIBRATION)
