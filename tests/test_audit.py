"""``guard audit`` end to end on the committed shapes models and data: the report's figures
recomputed from its own per-item files, resuming, data formats, bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from scipy.spatial.distance import directed_hausdorff
from scipy.stats import kruskal
from typer.testing import CliRunner

from guard.cli import app
from scripts.onnx_export import (
    BATCH_DIM,
    INPUT_NAME,
    OUTPUT_NAME,
    cnn_body,
    make_model,
    read_cnn_weights,
    tensor_info,
)
from tests.fixtures.models import _resize_to_demo

runner = CliRunner()
MODELS = Path(__file__).resolve().parent.parent / "benchmarks" / "models"
NAMES = ("shapes_cnn", "shapes_gapcnn", "shapes_cnn_small")
FAST = ["--iters", "4"]
ITEMS = 40


def _model_args(names: tuple[str, ...] = NAMES) -> list[str]:
    return [arg for name in names for arg in ("--model", str(MODELS / f"{name}.onnx"))]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ITEMS held-out shapes, with their masks."""
    with np.load(MODELS / "shapes_heldout.npz", allow_pickle=False) as archive:
        x, y, masks = archive["x"][:ITEMS], archive["y"][:ITEMS], archive["masks"][:ITEMS]
    path = tmp_path_factory.mktemp("shapes") / "shapes.npz"
    np.savez(path, x=x, y=y, masks=masks)
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, shapes: Path) -> Path:
    report = tmp_path_factory.mktemp("audit") / "report"
    args = ["audit", *_model_args(), "--data", str(shapes), "--report", str(report), *FAST]
    result = runner.invoke(app, [*args, "--family", "cnn", "--family", "gap", "--family", "cnn"])
    assert result.exit_code == 0, result.output
    assert "report written" in result.output
    return report


def _rows(report: Path) -> list[dict[str, str]]:
    with (report / "records.csv").open() as handle:
        return list(csv.DictReader(handle))


def _value(text: str) -> float:
    return float("nan") if text == "" else float(text)


def test_per_model_tables_match_a_recomputation_from_records_csv(audited: Path) -> None:
    summary = json.loads((audited / "summary.json").read_text())
    rows = _rows(audited)
    assert [m["name"] for m in summary["models"]] == list(NAMES)
    for model in summary["models"]:
        mine = [r for r in rows if r["model"] == model["name"]]
        assert len(mine) == model["n_items"] == ITEMS
        correct = np.array([r["correct"] == "1" for r in mine])
        area = np.array([float(r["mps_area_fraction"]) for r in mine])
        assert model["accuracy"] == pytest.approx(correct.mean())
        assert model["mps_area_mean"] == pytest.approx(area.mean())
        assert model["mps_area_mean_correct"] == pytest.approx(area[correct].mean())
        assert model["mps_area_mean_incorrect"] == pytest.approx(area[~correct].mean())
        for metric in ("mps_precision_in_mask", "rra", "rma", "pointing_game"):
            values = np.array([_value(r[metric]) for r in mine])
            assert model[metric] == pytest.approx(np.nanmean(values)), metric
    groups = [[float(r["mps_area_fraction"]) for r in rows if r["model"] == n] for n in NAMES]
    assert summary["kruskal_wallis"]["statistic"] == pytest.approx(kruskal(*groups).statistic)
    assert summary["kruskal_wallis"]["p_value"] == pytest.approx(kruskal(*groups).pvalue)
    assert len(summary["pairwise"]) == 3
    # Two families of the given labels; only families of three models get a Friedman test.
    assert summary["friedman"] == []
    assert any("two models" in note for note in summary["notes"])
    assert summary["incorrect_effect"]["n_observations"] == 3 * ITEMS
    assert "Most accurate" in summary["ranking"] and "Fewest pixels" in summary["ranking"]
    report = (audited / "report.md").read_text()
    assert "Kruskal-Wallis" in report and "RRA" in report and "Dice" in report
    assert (audited / "mps_area_violin.png").stat().st_size > 0


def test_overlap_matrices_match_a_recomputation_from_the_saved_masks(audited: Path) -> None:
    summary = json.loads((audited / "summary.json").read_text())
    rows = _rows(audited)
    with np.load(audited / "mps_masks.npz", allow_pickle=False) as archive:
        masks = {name: archive[name] for name in NAMES}
        assert list(archive[f"{NAMES[0]}__keys"]) == [f"npz:{i}" for i in range(ITEMS)]
    correct = {n: np.array([r["correct"] == "1" for r in rows if r["model"] == n]) for n in NAMES}
    for i, a in enumerate(NAMES):
        area = np.array([float(r["mps_area_fraction"]) for r in rows if r["model"] == a])
        assert np.allclose(masks[a].mean(axis=(1, 2)), area)
        for j, b in enumerate(NAMES):
            both = correct[a] & correct[b]
            dices, dists = [], []
            for m, n in zip(masks[a][both], masks[b][both], strict=True):
                size = m.sum() + n.sum()
                dices.append(1.0 if size == 0 else 2 * (m & n).sum() / size)
                if m.any() and n.any():
                    pm, pn = np.argwhere(m), np.argwhere(n)
                    dists.append(max(directed_hausdorff(pm, pn)[0], directed_hausdorff(pn, pm)[0]))
            assert summary["dice"][i][j] == pytest.approx(np.mean(dices))
            assert summary["hausdorff"][i][j] == pytest.approx(np.mean(dists))


def test_an_interrupted_audit_resumes_to_the_same_report(tmp_path: Path, shapes: Path, audited: Path) -> None:  # fmt: skip
    report = tmp_path / "report"
    cache = report / "cache"
    cache.mkdir(parents=True)
    for name in NAMES:  # a run cut off after 10 items, the last line half written
        lines = (audited / "cache" / f"{name}.jsonl").read_text().splitlines()
        (cache / f"{name}.jsonl").write_text("\n".join(lines[:11]) + "\n" + lines[11][:30])
    args = ["audit", *_model_args(), "--data", str(shapes), "--report", str(report), *FAST]
    result = runner.invoke(app, [*args, "--family", "cnn", "--family", "gap", "--family", "cnn"])
    assert result.exit_code == 0, result.output
    assert (report / "records.csv").read_text() == (audited / "records.csv").read_text()
    summary = json.loads((report / "summary.json").read_text())
    assert [m["n_resumed"] for m in summary["models"]] == [10, 10, 10]
    # Other engine settings are never mixed into the same cache.
    result = runner.invoke(app, ["audit", *_model_args(), "--data", str(shapes), "--report",
                                 str(report), "--iters", "5"])  # fmt: skip
    assert result.exit_code == 2 and "--restart" in result.output


def test_image_folder_with_a_mask_folder_and_models_of_another_input_size(
    tmp_path: Path, shapes: Path, audited: Path
) -> None:
    with np.load(shapes, allow_pickle=False) as archive:
        x, y, truth = archive["x"][:12], archive["y"][:12], archive["masks"][:12]
    classes = json.loads((MODELS / "shapes_classes.json").read_text())
    images, masks = tmp_path / "images", tmp_path / "masks"
    keys = []
    for i, (pixels, label, mask) in enumerate(zip(x, y, truth, strict=True)):
        relative = Path(classes[label]) / f"item{i:02d}.png"
        for root, picture in ((images, pixels[0]), (masks, mask.astype(np.uint8) * 255)):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(root / relative)
        keys.append(str(relative))
    # The shapes CNN behind a bilinear resize: it takes 48x48 inputs.
    body = cnn_body(read_cnn_weights(MODELS / "shapes_cnn.onnx"), "resized")
    resize = _resize_to_demo(INPUT_NAME)
    big = tmp_path / "shapes_cnn48.onnx"
    onnx.save_model(make_model([*resize.nodes, *body.nodes], [*resize.initializers, *body.initializers],
                               [tensor_info(INPUT_NAME, [BATCH_DIM, 1, 48, 48])],
                               [tensor_info(OUTPUT_NAME, [BATCH_DIM, 4])]), str(big))  # fmt: skip
    report = tmp_path / "report"
    result = runner.invoke(app, [
        "audit", "--model", str(MODELS / "shapes_cnn.onnx"), "--model", str(big), "--data", str(images),
        "--masks", str(masks), "--report", str(report), "--preprocessing",
        str(MODELS / "shapes_preprocessing.json"), *FAST,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "summary.json").read_text())
    assert summary["overlap_grid"] == [48, 48]
    assert [m["input_size"] for m in summary["models"]] == [[32, 32], [48, 48]]
    assert summary["kruskal_wallis"] is not None and summary["friedman"] == []
    # PNGs hold the exact pixels and masks: the 32x32 model's records equal the npz run's.
    folder = {r["key"]: r for r in _rows(report) if r["model"] == "shapes_cnn"}
    npz = {r["key"]: r for r in _rows(audited) if r["model"] == "shapes_cnn"}
    for i, key in enumerate(keys):
        mine, theirs = folder[key], npz[f"npz:{i}"]
        for column in ("predicted_class", "mps_area_fraction", "rra", "rma", "pointing_game"):
            assert mine[column] == theirs[column], column


def test_one_model_gives_the_per_model_tables_and_says_so(tmp_path: Path, shapes: Path) -> None:
    report = tmp_path / "one"
    result = runner.invoke(app, ["audit", *_model_args(NAMES[:1]), "--data", str(shapes),
                                 "--report", str(report), *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "summary.json").read_text())
    assert "kruskal_wallis" not in summary and len(summary["models"]) == 1
    assert "One model only" in summary["notes"][0] and "One model only" in result.output
    assert "Across models" not in (report / "report.md").read_text()


def test_bad_inputs_are_one_clear_message(tmp_path: Path, shapes: Path) -> None:
    base = ["audit", *_model_args(NAMES[:2]), "--report", str(tmp_path / "r"), *FAST]

    def fails(*extra: str) -> str:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return " ".join(result.output.split())

    # Masks missing for some images.
    folder = tmp_path / "masks"
    folder.mkdir()
    np.save(folder / "0.npy", np.zeros((32, 32), bool))
    assert "no mask for 39 of 40 items" in fails("--data", str(shapes), "--masks", str(folder))
    short = tmp_path / "short.npz"
    np.savez(short, masks=np.zeros((3, 32, 32), bool))
    assert "3 masks for 40 items" in fails("--data", str(shapes), "--masks", str(short))
    # Data the models cannot take (the demo digits are 10-class inputs of another kind).
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, int))
    assert "expected [N, 1, 32, 32]" in fails("--data", str(wrong))
    assert "one per model" in fails("--data", str(shapes), "--name", "only")
    assert "must differ" in fails("--data", str(shapes), "--name", "a", "--name", "a")
    assert "--level" in fails("--data", str(shapes), "--level", "1.5")
    assert "does not exist" in fails("--data", str(tmp_path / "missing.npz"))


def test_localisation_records_match_the_engine_run_directly(audited: Path, shapes: Path) -> None:
    from guard.engine import MpsEngine
    from guard.runtime import MaskedClassifier
    from guard.settings import EngineSettings

    with np.load(shapes, allow_pickle=False) as archive:
        x, truth = archive["x"][:6].astype(np.float32), archive["masks"][:6]
    engine = MpsEngine(MaskedClassifier(MODELS / "shapes_gapcnn.onnx"), EngineSettings(iters=4))
    rows = {r["key"]: r for r in _rows(audited) if r["model"] == "shapes_gapcnn"}
    for i, result in enumerate(engine.explain_batch(x)):
        row, mask, r = rows[f"npz:{i}"], truth[i], result.responsibility
        # ReX's order: sorted((value, flat index), reverse=True).
        order = [
            p for _, p in sorted(zip(r.ravel().tolist(), range(r.size), strict=True), reverse=True)
        ]
        k = int(mask.sum())
        assert float(row["rra"]) == pytest.approx(mask.ravel()[order[:k]].sum() / k)
        relevance = r - r.min()
        assert float(row["rma"]) == pytest.approx(relevance[mask].sum() / relevance.sum())
        assert float(row["pointing_game"]) == float(mask.ravel()[order[0]])
        mps = result.mps_mask
        if mps.any():
            assert float(row["mps_precision_in_mask"]) == pytest.approx(
                (mps & mask).sum() / mps.sum()
            )
        assert float(row["mps_area_fraction"]) == pytest.approx(mps.mean())
