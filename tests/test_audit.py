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
from scipy.stats import kruskal, wilcoxon
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
SEEDS = (0, 1000)  # the default --seeds 2: the engine's seed, and seed + 1000
LOCALISATION = ("mask_share", "mps_precision_in_mask", "mask_coverage", "rra", "rma",
                "pointing_game", "dual_polarity_precision")  # fmt: skip


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


def _percentile_ci(values: np.ndarray, statistic: str = "mean") -> list[float] | None:
    """The report's documented bootstrap, written out: 2000 resamples of the items from
    numpy.random.default_rng(0), the statistic over each resample's defined (non-NaN) values,
    resamples with none dropped, the 2.5th and 97.5th percentiles."""
    n = len(values)
    index = np.random.default_rng(0).integers(0, n, size=(2000, n))
    replicates = []
    for row in index:
        chosen = values[row][~np.isnan(values[row])]
        if chosen.size:
            replicates.append(np.mean(chosen) if statistic == "mean" else np.median(chosen))
    return list(np.percentile(replicates, [2.5, 97.5])) if replicates else None


def _walsh(d: np.ndarray) -> np.ndarray:
    return np.sort([(d[i] + d[j]) / 2 for i in range(len(d)) for j in range(i, len(d))])


def _hodges_lehmann(d: np.ndarray) -> tuple[float, float, float]:
    """Estimate and 95% interval, written out: the null distribution of the signed-rank
    statistic as the polynomial prod_k (1 + x^k) / 2, the interval's depth a the largest
    with P(T+ <= a) <= 0.025."""
    distribution = np.array([1.0])
    for k in range(1, len(d) + 1):
        distribution = np.convolve(distribution, np.r_[1.0, np.zeros(k - 1), 1.0]) / 2
    depth = int(np.flatnonzero(np.cumsum(distribution) <= 0.025 * (1 + 1e-12))[-1])
    walsh = _walsh(d)
    return float(np.median(walsh)), float(walsh[depth]), float(walsh[-1 - depth])


def _masks(report: Path) -> dict[str, np.ndarray]:
    with np.load(report / "mps_masks.npz", allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


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
        for metric in LOCALISATION:
            values = np.array([_value(r[metric]) for r in mine])
            assert model[metric] == pytest.approx(np.nanmean(values)), metric
            assert model[f"{metric}_ci"] == pytest.approx(_percentile_ci(values)), metric
        # Every Table-1 figure's bootstrap interval, recomputed.
        nan = np.nan
        table_one = {
            "accuracy": (correct.astype(float), "mean"),
            "mps_area_mean": (area, "mean"),
            "mps_area_median": (area, "median"),
            "mps_area_mean_correct": (np.where(correct, area, nan), "mean"),
            "mps_area_median_correct": (np.where(correct, area, nan), "median"),
            "mps_area_mean_incorrect": (np.where(correct, nan, area), "mean"),
            "mps_area_median_incorrect": (np.where(correct, nan, area), "median"),
            "degenerate_fraction": (np.array([float(r["degenerate"]) for r in mine]), "mean"),
            "baseline_class_fraction": (
                np.array(
                    [float(int(r["baseline_class"]) == model["baseline_class"]) for r in mine]
                ),
                "mean",
            ),
        }
        for figure, (values, statistic) in table_one.items():
            assert model[f"{figure}_ci"] == pytest.approx(_percentile_ci(values, statistic)), figure
            low, high = model[f"{figure}_ci"]
            assert low <= model[figure] <= high, figure
        # Dual-polarity precision no longer ties with the mask's share of the image.
        share = model["mask_share"]
        assert share == pytest.approx(0.115, abs=0.01)
        assert model["dual_polarity_precision_ci"][0] > share + 0.2
    groups = [[float(r["mps_area_fraction"]) for r in rows if r["model"] == n] for n in NAMES]
    assert summary["kruskal_wallis"]["statistic"] == pytest.approx(kruskal(*groups).statistic)
    assert summary["kruskal_wallis"]["p_value"] == pytest.approx(kruskal(*groups).pvalue)
    assert len(summary["pairwise"]) == 3
    # The pairwise tables' Hodges-Lehmann estimates and intervals, recomputed.
    for key, column in (("pairwise", "mps_area_fraction"), ("pairwise_rra", "rra"),
                        ("pairwise_dual_polarity", "dual_polarity_precision")):  # fmt: skip
        assert len(summary[key]) == 3, key
        for row in summary[key]:
            a = np.array([_value(r[column]) for r in rows if r["model"] == row["model_a"]])
            b = np.array([_value(r[column]) for r in rows if r["model"] == row["model_b"]])
            estimate, low, high = _hodges_lehmann(a - b)
            hl = row["hodges_lehmann"]
            assert (hl["estimate"], hl["low"], hl["high"]) == pytest.approx((estimate, low, high))
            assert row["median_difference"] == pytest.approx(np.median(a - b))
    # Two families of the given labels; only families of three models get a Friedman test.
    assert summary["friedman"] == []
    assert any("two models" in note for note in summary["notes"])
    assert summary["incorrect_effect"]["n_observations"] == 3 * ITEMS
    assert "Most accurate" in summary["ranking"] and "Fewest pixels" in summary["ranking"]
    report = (audited / "report.md").read_text()
    assert "Kruskal-Wallis" in report and "RRA" in report and "Dice" in report
    assert "Noise floor" in report and "Different places?" in report and "HL (a - b)" in report
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


def _dice(m: np.ndarray, n: np.ndarray) -> float:
    size = m.sum() + n.sum()
    return 1.0 if size == 0 else 2 * (m & n).sum() / size


def _hausdorff(m: np.ndarray, n: np.ndarray) -> float:
    pm, pn = np.argwhere(m), np.argwhere(n)
    return max(directed_hausdorff(pm, pn)[0], directed_hausdorff(pn, pm)[0])


def test_noise_floor_and_location_tests_match_a_recomputation_from_the_saved_masks(
    audited: Path,
) -> None:
    summary = json.loads((audited / "summary.json").read_text())
    rows = _rows(audited)
    masks = _masks(audited)
    assert summary["seeds"] == list(SEEDS)
    first = {n: masks[n] for n in NAMES}
    second = {n: masks[f"{n}__seed{SEEDS[1]}"] for n in NAMES}
    correct = {n: np.array([r["correct"] == "1" for r in rows if r["model"] == n]) for n in NAMES}
    for n in NAMES:  # records.csv holds the second seed's MPS area
        area = [float(r[f"mps_area_fraction_seed{SEEDS[1]}"]) for r in rows if r["model"] == n]
        assert np.allclose(second[n].mean(axis=(1, 2)), area)
    # Each model's seed-to-seed Dice and Hausdorff on the images it gets right (no MPS is empty).
    within_d, within_h = {}, {}
    for n, floor in zip(NAMES, summary["noise_floor"], strict=True):
        d = np.array([_dice(a, b) if ok else np.nan
                      for a, b, ok in zip(first[n], second[n], correct[n], strict=True)])  # fmt: skip
        h = np.array([_hausdorff(a, b) if ok else np.nan
                      for a, b, ok in zip(first[n], second[n], correct[n], strict=True)])  # fmt: skip
        within_d[n], within_h[n] = d, h
        assert floor["name"] == n and floor["dice_n"] == correct[n].sum()
        assert floor["dice_mean"] == pytest.approx(np.nanmean(d))
        assert floor["dice_median"] == pytest.approx(np.nanmedian(d))
        assert floor["dice_mean_ci"] == pytest.approx(_percentile_ci(d))
        assert floor["hausdorff_mean"] == pytest.approx(np.nanmean(h))
        assert floor["hausdorff_mean_ci"] == pytest.approx(_percentile_ci(h))
    # Between models across seeds, against both within-model values: one-sided signed-rank
    # tests, the larger p, Bonferroni over the three pairs.
    different = []
    for what, alternative, overlap, within in (
        ("dice", "less", _dice, within_d), ("hausdorff", "greater", _hausdorff, within_h)
    ):  # fmt: skip
        for row in summary["location_tests"][what]:
            a, b = row["model_a"], row["model_b"]
            both = correct[a] & correct[b]
            between = np.array([(overlap(first[a][i], second[b][i]) + overlap(second[a][i], first[b][i])) / 2
                                for i in np.flatnonzero(both)])  # fmt: skip
            wa, wb = within[a][both], within[b][both]
            assert row["n_items"] == both.sum()
            assert row["between_mean"] == pytest.approx(between.mean())
            assert (row["within_a_mean"], row["within_b_mean"]) == pytest.approx(
                (wa.mean(), wb.mean())
            )
            p = max(wilcoxon(between, w, alternative=alternative).pvalue for w in (wa, wb))
            assert row["p_value"] == pytest.approx(p)
            assert row["p_bonferroni"] == pytest.approx(min(1.0, 3 * p))
            assert row["different"] == (min(1.0, 3 * p) <= summary["level"])
            estimate, low, high = _hodges_lehmann(between - wa)
            hl = row["hodges_lehmann_a"]
            assert (hl["estimate"], hl["low"], hl["high"]) == pytest.approx((estimate, low, high))
            if what == "dice" and row["different"]:
                different.append(f"{a} and {b} (")
    # The ranking calls two models' places different exactly where the test says so.
    ranking = summary["ranking"]
    assert "MPS locations" in ranking
    if different:
        located = ranking.split("different places: ")[1].split("; not distinguishable")[0]
        assert all(pair in located for pair in different)
    else:
        assert "no two models' MPSs differ in place" in ranking


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
    # The cache holds the second seed's MPS: the resumed run's are those of the whole run.
    resumed, whole = _masks(report), _masks(audited)
    assert sorted(resumed) == sorted(whole) and f"{NAMES[0]}__seed1000" in resumed
    assert all(np.array_equal(resumed[k], whole[k]) for k in whole)
    summary = json.loads((report / "summary.json").read_text())
    assert [m["n_resumed"] for m in summary["models"]] == [10, 10, 10]
    assert (
        summary["noise_floor"] == json.loads((audited / "summary.json").read_text())["noise_floor"]
    )
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


def test_one_seed_keeps_the_first_seeds_records_and_says_there_is_no_noise_floor(
    tmp_path: Path, shapes: Path, audited: Path
) -> None:
    report = tmp_path / "one-seed"
    args = ["audit", *_model_args(), "--data", str(shapes), "--report", str(report), *FAST]
    result = runner.invoke(app, [*args, "--seeds", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "summary.json").read_text())
    assert summary["seeds"] == [0] and summary["noise_floor"] is None
    assert "location_tests" not in summary
    assert any("--seeds 1" in note for note in summary["notes"])
    assert "no within-model noise floor" in summary["ranking"]
    assert sorted(_masks(report)) == sorted(f"{n}{s}" for n in NAMES for s in ("", "__keys"))
    # The first seed's records are those of the two-seed run, less the second seed's column.
    two = {(r["model"], r["key"]): r for r in _rows(audited)}
    for row in _rows(report):
        assert row == {k: v for k, v in two[row["model"], row["key"]].items() if "seed" not in k}
    for name in NAMES:
        cached = (report / "cache" / f"{name}.jsonl").read_text().splitlines()[1]
        assert json.loads(cached)["other_seeds_bits"] == []
    # A cache made with one seed is never completed with two.
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--restart" in result.output


def test_one_model_gives_the_per_model_tables_and_says_so(tmp_path: Path, shapes: Path) -> None:
    report = tmp_path / "one"
    result = runner.invoke(app, ["audit", *_model_args(NAMES[:1]), "--data", str(shapes),
                                 "--report", str(report), *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "summary.json").read_text())
    assert "kruskal_wallis" not in summary and len(summary["models"]) == 1
    assert "One model only" in summary["notes"][0] and "One model only" in result.output
    assert "Across models" not in (report / "report.md").read_text()
    assert summary["noise_floor"][0]["name"] == NAMES[0]  # its own seed-to-seed overlap


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
    assert "--seeds must be at least 1" in fails("--data", str(shapes), "--seeds", "0")
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
        # Signed relevance: log r (the multiplicative map's runs' evidence) about its median.
        signed = np.log(r) - np.median(np.log(r))
        agreeing = signed[mask & (signed > 0)].sum() - signed[~mask & (signed < 0)].sum()
        assert float(row["dual_polarity_precision"]) == pytest.approx(
            agreeing / np.abs(signed).sum()
        )
        assert float(row["mask_share"]) == pytest.approx(mask.mean())
        assert float(row["pointing_game"]) == float(mask.ravel()[order[0]])
        mps = result.mps_mask
        if mps.any():
            assert float(row["mps_precision_in_mask"]) == pytest.approx(
                (mps & mask).sum() / mps.sum()
            )
        assert float(row["mps_area_fraction"]) == pytest.approx(mps.mean())


def test_the_report_gallery_shows_the_images_the_models_disagree_on_most(audited: Path) -> None:
    """gallery.html: the images all models explained, those with the most different
    predicted classes first, then the least mean MPS overlap (from records.csv and the
    saved masks), each with the input and every model's MPS."""
    from guard.audit.localisation import dice
    from guard.audit.report import GALLERY_ITEMS

    page = (audited / "gallery.html").read_text()
    assert "gallery.html" in (audited / "report.md").read_text()
    assert "<script" not in page
    rows = _rows(audited)
    saved = np.load(audited / "mps_masks.npz")
    masks = {
        name: dict(zip(saved[f"{name}__keys"].tolist(), saved[name], strict=True)) for name in NAMES
    }
    keys = [r["key"] for r in rows if r["model"] == NAMES[0]]
    classes = {(r["model"], r["key"]): r["predicted_class"] for r in rows}

    def disagreement(key: str) -> tuple[int, float]:
        distinct = len({classes[(name, key)] for name in NAMES}) - 1
        shaped = [masks[name][key] for name in NAMES]
        overlaps = [dice(a, b) for i, a in enumerate(shaped) for b in shaped[i + 1 :]
                    if a.shape == b.shape]  # fmt: skip
        return distinct, 1 - float(np.mean(overlaps))

    expected = sorted(keys, key=disagreement, reverse=True)[:GALLERY_ITEMS]
    cards = page.split('<article class="card">')[1:]
    assert len(cards) == len(expected) == GALLERY_ITEMS
    for card, key in zip(cards, expected, strict=True):
        assert card.startswith(f"<h2>{key}: label ")
        assert card.count('src="data:image/png;base64,') == 1 + len(NAMES)
        differ = disagreement(key)[0] > 0
        assert ("predictions differ" if differ else "MPSs differ") in card
