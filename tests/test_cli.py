"""The ``guard`` command line: ``guard explain`` end to end, in-process and as a real
subprocess; the options every command takes; ``guard serve``'s options and the environment."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from pydantic import Field
from typer.testing import CliRunner

from guard import demo
from guard.cli import app
from guard.cli.options import settings_options
from guard.errors import ConfigError
from guard.service.settings import ServeSettings
from guard.settings import EngineSettings, ModelOptions
from tests.serving import LOOPBACK, ServeProcess

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


# Every command that runs a model takes these, and audit takes its own, repeatable --model.
SHARED_OPTIONS = [
    "--model", "--preprocessing", "--scale", "--mean", "--std", "--color-mode", "--resize",
    "--layout", "--height", "--width", "--output", "--output-kind", "--provider",
    "--engine-settings", "--iters", "--seed", "--tree-depth", "--min-box-size", "--chunk-size",
    "--baseline", "--combination", "--max-batch-size", "--empty-mps", "--random-stream",
    "--classes",
]  # fmt: skip
WIDE = {"COLUMNS": "400"}  # one line per option in --help


def _lists(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


@pytest.mark.parametrize("command", ["explain", "calibrate", "audit"])
def test_every_model_running_command_takes_every_shared_option(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert [flag for flag in SHARED_OPTIONS if not _lists(flag, result.stdout)] == []
    assert "[counter|rex]" in result.stdout  # the choices of --random-stream
    for name in ("empty_mps", "random_stream"):  # help from the engine settings' descriptions
        assert " ".join(str(EngineSettings.model_fields[name].description).split()) in result.stdout


def test_the_data_argument_is_shown_as_DATA() -> None:
    result = runner.invoke(app, ["calibrate", "--help"], env=WIDE)
    assert "calibrate [OPTIONS] {DATA}" in " ".join(result.stdout.split())


@pytest.mark.parametrize("command", ["explain", "calibrate", "audit"])
def test_the_shared_options_reach_the_settings_of_every_command(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guard.runtime import MaskedClassifier

    seen: dict[str, object] = {}

    def classifier(path: Path, options: ModelOptions) -> MaskedClassifier:
        seen["model_options"] = options
        return MaskedClassifier(path, options)

    def engine(classifier: object, settings: EngineSettings) -> None:
        seen["engine"] = settings
        raise ConfigError("stopped after the settings")

    monkeypatch.setattr("guard.cli.common.MaskedClassifier", classifier)
    monkeypatch.setattr("guard.cli.common.MpsEngine", engine)
    given = {
        "explain": [str(IMAGES[0])],
        "calibrate": [str(demo.DEMO_HELDOUT), "--out", str(tmp_path / "c.json")],
        "audit": ["--model", str(demo.DEMO_MODEL), "--data", str(demo.DEMO_HELDOUT),
                  "--report", str(tmp_path / "report")],
    }[command]  # fmt: skip
    engine_flags = ["--iters", "3", "--seed", "7", "--tree-depth", "4", "--min-box-size", "2",
                    "--chunk-size", "5", "--baseline", "0.5", "--combination", "additive",
                    "--max-batch-size", "64", "--empty-mps", "--random-stream", "rex"]  # fmt: skip
    result = runner.invoke(app, [command, *given, *engine_flags, "--provider", "cpu"])
    assert result.exit_code == 2 and "stopped after the settings" in result.output, result.output
    settings = seen["engine"]
    assert isinstance(settings, EngineSettings)
    assert (settings.iters, settings.seed, settings.tree_depth, settings.min_box_size,
            settings.chunk_size, settings.combination, settings.max_batch_size) == (
        3, 7, 4, 2, 5, "additive", 64)  # fmt: skip
    assert settings.empty_mps is True and settings.random_stream == "rex"
    assert seen["model_options"] == ModelOptions(provider="cpu")


def test_engine_options_not_given_leave_the_settings_file_alone(tmp_path: Path) -> None:
    settings = tmp_path / "engine.json"
    settings.write_text(json.dumps({"empty_mps": True, "random_stream": "bogus"}))
    result = runner.invoke(app, ["explain", str(IMAGES[0]), "--engine-settings", str(settings)])
    assert result.exit_code == 2 and "random_stream" in result.output
    result = runner.invoke(app, ["explain", str(IMAGES[0]), "--random-stream", "sometimes"])
    assert result.exit_code == 2 and "invalid engine settings" in result.output


def test_serve_help_lists_every_setting_with_its_help_and_default() -> None:
    result = runner.invoke(app, ["serve", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert _lists(flag, result.stdout), flag
        if field.description:
            assert field.description in result.stdout, name
    assert "--log-verdicts --no-log-verdicts" in " ".join(result.stdout.split())
    assert "[default: 9464]" in result.stdout and "[sync|async]" in result.stdout


def test_serve_flags_win_over_the_environment_which_wins_over_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[ServeSettings] = []
    monkeypatch.setattr("guard.cli.serve._serve", served.append)
    monkeypatch.setenv("GUARD_PORT", "7000")
    monkeypatch.setenv("GUARD_MODE", "async")
    monkeypatch.setenv("GUARD_LOG_VERDICTS", "false")
    result = runner.invoke(app, ["serve", "--port", "50051", "--log-verdicts"])
    assert result.exit_code == 0, result.output
    settings = served[-1]
    # --port is given (with the default's value): it wins; --mode is not: the environment's.
    assert (settings.port, settings.mode, settings.log_verdicts) == (50051, "async", True)
    assert settings.metrics_port == 9464  # neither: the default
    assert (settings.model, settings.calibration) == (demo.DEMO_MODEL, demo.DEMO_CALIBRATION)
    result = runner.invoke(app, ["serve", "--sample-rate", "2"])
    assert result.exit_code == 2 and "sample_rate" in result.output


def test_serve_options_follow_the_settings_class() -> None:
    """A field added to the settings is an option, with its help and default, and is passed on
    only when given."""

    class Wider(ServeSettings):
        max_image_pixels: int = Field(default=4096, ge=1, description="largest image accepted")

    given: list[dict[str, object]] = []

    @settings_options(Wider)
    def command(options: dict[str, object]) -> None:
        given.append(options)

    wider = typer.Typer()
    wider.command()(command)
    result = runner.invoke(wider, ["--help"], env=WIDE)
    assert "--max-image-pixels" in result.stdout and "largest image accepted" in result.stdout
    assert "[default: 4096]" in result.stdout
    assert runner.invoke(wider, ["--max-image-pixels", "9", "--no-log-verdicts"]).exit_code == 0
    assert runner.invoke(wider, []).exit_code == 0
    assert given == [{"max_image_pixels": 9, "log_verdicts": False}, {}]


def test_the_installed_command_serves_with_flags_over_the_environment() -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        metrics_port = probe.getsockname()[1]
    server = ServeProcess(
        "--port", "0", "--model-name", "from-flag",
        env={"GUARD_MODEL_NAME": "from-env", "GUARD_METRICS_PORT": str(metrics_port)},
    )  # fmt: skip
    try:
        assert server.metrics_port == metrics_port  # from the environment
        assert any("serving from-flag on" in line for line in server.lines)  # the flag's
    finally:
        server.process.send_signal(signal.SIGTERM)
        code, log = server.finish()
    assert code == 0, log


def test_guard_help_loads_no_model_runtime_and_no_server() -> None:
    code = (
        "import sys; from guard.cli import app\n"
        "try:\n    app(['--help'], prog_name='guard')\nexcept SystemExit:\n    pass\n"
        "heavy = ('onnxruntime', 'grpc', 'sklearn', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]"
