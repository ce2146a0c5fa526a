"""The stock Open Inference Protocol client (tritonclient) against a real sidecar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from guard.transport.grpc.client import GuardClient
from tests.serving import LOOPBACK, running_sidecar

MODEL = "digits_cnn"


def test_tritonclient_reads_metadata_and_verdicts(
    tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0][:3]
    inputs = tmp_path / "x.npy"
    np.save(inputs, x)
    with running_sidecar() as sidecar:
        url = f"{LOOPBACK}:{sidecar.port}"
        run = subprocess.run(
            [sys.executable, "-m", "tests.clients.triton_infer", url, MODEL, str(inputs)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        with GuardClient(url) as client:
            expected = [client.explain(image) for image in x]
        scores = sidecar.models[0].classifier.predict(x).scores
        output_name = sidecar.models[0].classifier.spec.output_name
    answer = json.loads(run.stdout)
    assert answer["live"] and answer["ready"]
    assert answer["metadata"]["name"] == MODEL
    assert answer["metadata"]["inputs"][0]["shape"] == ["-1", "1", "32", "32"]

    one, batch = answer["answers"]
    assert one["id"] == "triton-1"
    np.testing.assert_allclose(one["outputs"][output_name], scores[:1], rtol=1e-6)
    parameters = one["parameters"]
    assert parameters["guard_status"] == {"string_param": "checked"}
    assert parameters["guard_flagged"].get("bool_param", False) == expected[0].flagged
    assert parameters["guard_p_value"]["double_param"] == expected[0].p_value

    np.testing.assert_allclose(batch["outputs"][output_name], scores, rtol=1e-6)
    assert batch["outputs"]["guard_flagged"] == [e.flagged for e in expected]
    np.testing.assert_allclose(
        batch["outputs"]["guard_score"], [e.score for e in expected], rtol=1e-6
    )
    np.testing.assert_allclose(
        batch["outputs"]["guard_mps_area"], [e.mps_area_fraction for e in expected]
    )
