"""``guard explain`` end to end, in-process and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from guard import demo
from guard.cli import app

runner = CliRunner()
IMAGES = sorted(demo.DEMO_IMAGES.glob("*.png"))
FAST = ["--iters", "4"]


def _records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_json_masks_and_pictures_for_the_demo_images(tmp_path: Path) -> None:
    masks, pictures = tmp_path / "masks", tmp_path / "pictures"
    result = runner.invoke(
        app,
        [
            "explain",
            *map(str, IMAGES[:3]),
            *FAST,
            "--json",
            "--save-masks",
            str(masks),
            "--out",
            str(pictures),
        ],
    )
    assert result.exit_code == 0, result.output
    records = _records(result.stdout)
    assert len(records) == 3
    for image, record in zip(IMAGES, records, strict=False):
        for field in ("path", "predicted_class", "confidence", "mps_area_fraction", "degenerate",
                      "model_evaluations", "model_calls", "seconds"):  # fmt: skip
            assert field in record
        assert record["predicted_class"] == int(image.stem[5])  # file names carry the label
        mask = np.load(masks / f"{image.stem}.npy", allow_pickle=False)
        assert mask.dtype == bool and mask.shape == (32, 32)
        assert mask.mean() == pytest.approx(record["mps_area_fraction"], abs=1e-6)
        with Image.open(pictures / f"{image.stem}.png") as picture:
            assert picture.width > 3 * 32 and picture.width > 2.5 * picture.height


def test_table_output_names_the_classes_and_the_provider() -> None:
    result = runner.invoke(app, ["explain", str(IMAGES[0]), *FAST])
    assert result.exit_code == 0, result.output
    assert "Minimal sufficient pixel sets" in result.stdout and "provider: " in result.stdout


def test_npy_tensors_are_taken_in_the_models_layout(tmp_path: Path) -> None:
    x = np.load(demo.DEMO_HELDOUT, allow_pickle=False)["x"]
    good = tmp_path / "good.npy"
    np.save(good, x[0])
    result = runner.invoke(app, ["explain", str(good), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    assert _records(result.stdout)[0]["path"] == str(good)


def test_bad_inputs_are_reported_and_the_others_still_processed(tmp_path: Path) -> None:
    wrong_shape, non_finite, not_image = (
        tmp_path / "shape.npy",
        tmp_path / "nan.npy",
        tmp_path / "text.png",
    )
    np.save(wrong_shape, np.zeros((3, 32, 32), np.float32))
    np.save(non_finite, np.full((1, 32, 32), np.inf, np.float32))
    not_image.write_text("not an image")
    missing = tmp_path / "missing.png"
    args = [str(wrong_shape), str(IMAGES[0]), str(non_finite), str(not_image), str(missing)]
    result = runner.invoke(app, ["explain", *args, *FAST, "--json"])
    assert result.exit_code == 1
    records = {Path(r["path"]).name: r for r in _records(result.stdout)}
    assert "predicted_class" in records[IMAGES[0].name]
    assert "shape [3, 32, 32]" in records["shape.npy"]["error"]
    assert "NaN or Inf" in records["nan.npy"]["error"]
    assert "cannot decode image" in records["text.png"]["error"]
    assert "does not exist" in records["missing.png"]["error"]
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent.onnx", "does not exist"),
        (
            lambda d: (
                (d / "corrupt.onnx").write_bytes(b"\x00garbage\xff" * 50) and d / "corrupt.onnx"
            ),
            "not a valid ONNX model",
        ),
    ],
)
def test_a_missing_or_corrupt_model_is_one_clear_error(tmp_path: Path, make, message: str) -> None:  # noqa: ANN001
    model = make(tmp_path)
    result = runner.invoke(app, ["explain", str(IMAGES[0]), "--model", str(model)])
    assert result.exit_code == 2
    assert message in result.output and isinstance(result.exception, SystemExit)


def test_invalid_settings_are_one_clear_error() -> None:
    result = runner.invoke(app, ["explain", str(IMAGES[0]), "--iters", "0"])
    assert result.exit_code == 2 and "invalid engine settings" in result.output
    result = runner.invoke(app, ["explain", str(IMAGES[0]), "--baseline", "purple"])
    assert result.exit_code == 2 and "blur[:SIGMA]" in result.output


def test_the_installed_command_runs_as_a_subprocess(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "guard", "explain", str(IMAGES[1]), *FAST, "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1])["predicted_class"] == int(
        IMAGES[1].stem[5]
    )


def test_file_names_with_markup_and_a_settings_file_that_is_not_an_object(tmp_path: Path) -> None:
    odd = tmp_path / "x[bold]y.png"
    odd.write_bytes(IMAGES[0].read_bytes())
    result = runner.invoke(app, ["explain", str(odd), *FAST])
    assert result.exit_code == 0, result.output
    assert "x[bold]y.png" in result.stdout
    settings = tmp_path / "engine.json"
    settings.write_text("[1, 2]")
    result = runner.invoke(app, ["explain", str(IMAGES[0]), "--engine-settings", str(settings)])
    assert result.exit_code == 2 and "must hold a JSON object" in result.output


def test_an_unexpected_fault_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("guard.cli.common.MaskedClassifier", broken)
    result = runner.invoke(app, ["explain", str(IMAGES[0])])
    assert result.exit_code == 3
    assert "internal error (RuntimeError: disk on fire)" in result.output
    assert isinstance(result.exception, SystemExit)
