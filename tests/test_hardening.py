"""Hardening of the inputs and of the offline cache: pixel budget, every decodable image mode,
alpha, non-finite settings, one-line validation messages, torn cache lines, skipped-item
wording and one bad item in a batch."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError
from typer.testing import CliRunner

from guard import demo
from guard.cached_run import run_cached
from guard.datasets import LabelledData, open_labelled_data
from guard.errors import (
    ConfigError,
    GuardError,
    InvalidInputError,
    NonFiniteOutputError,
    describe_validation_error,
)
from guard.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    Preprocessing,
    input_from_bytes,
    load_input,
)
from guard.runtime.spec import ModelSpec
from guard.settings import EngineSettings

DEMO = Preprocessing.from_file(demo.DEMO_PREPROCESSING)
DIGIT3 = demo.DEMO_IMAGES / "digit3_45.png"


def _spec(channels: int, height: int = 24, width: int = 20, layout: str = "NCHW") -> ModelSpec:
    return ModelSpec(
        input_name="image", layout=layout, channels=channels, height=height, width=width,
        dtype=np.dtype(np.float32), output_name="logits", num_classes=10, fixed_batch=False,
    )  # fmt: skip


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# --- 1. pixel budget -------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A valid 9000x9000 RGB PNG (all black) of about 236 KB, written without building it."""
    width = height = 9000
    row = bytes(1 + 3 * width)  # filter byte 0, then black pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )  # fmt: skip


def test_a_huge_image_is_refused_from_its_header_without_decoding(
    huge_png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(huge_png) < 300_000
    with Image.open(io.BytesIO(huge_png)) as image:  # the bytes are a real, decodable PNG
        assert image.size == (9000, 9000) and image.mode == "RGB"
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self)
    )
    expected = (
        "image is 9000x9000 (81000000 pixels); the limit is 16777216 pixels (--max-image-pixels)"
    )
    assert DEFAULT_MAX_IMAGE_PIXELS == 4096 * 4096
    started = time.perf_counter()
    with pytest.raises(InvalidInputError) as refused:
        input_from_bytes(huge_png, _spec(3), Preprocessing())
    assert expected in str(refused.value)
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png)
    with pytest.raises(InvalidInputError, match=r"9000x9000 \(81000000 pixels\)") as refused:
        load_input(path, _spec(3), Preprocessing())
    assert str(refused.value).startswith(f"{path}: ")
    assert time.perf_counter() - started < 2.0
    assert loads == []  # refused from the header: nothing was decoded


def test_the_pixel_budget_is_a_parameter() -> None:
    data = _encode(Image.new("L", (40, 30), 7), "PNG")
    assert input_from_bytes(data, _spec(1), Preprocessing(), max_image_pixels=1200).shape == (
        1, 24, 20,
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match="40x30 \\(1200 pixels\\); the limit is 1199"):
        input_from_bytes(data, _spec(1), Preprocessing(), max_image_pixels=1199)


def test_a_refused_image_is_not_kept_alive_by_the_error() -> None:
    """The error's traceback holds no decoded image (the service keeps errors around)."""
    pixels = np.zeros((600, 600, 4), dtype=np.uint8)
    pixels[..., 3] = 10
    data = _encode(Image.fromarray(pixels), "PNG")
    with pytest.raises(InvalidInputError, match="transparent") as refused:
        input_from_bytes(data, _spec(1), Preprocessing(alpha="refuse"))
    error = refused.value
    assert error.__cause__ is None and error.__context__ is None
    frame = error.__traceback__
    while frame is not None:
        if "/guard/" in frame.tb_frame.f_code.co_filename:  # the guard's frames, not this test's
            for value in frame.tb_frame.f_locals.values():
                assert not isinstance(value, Image.Image | np.ndarray), value
        frame = frame.tb_next


# --- 2. every image mode, read as its 8-bit equivalent ----------------------------------------


def _reference(height: int = 36, width: int = 40) -> np.ndarray:
    """A smooth 8-bit RGB picture (JPEG keeps it close), with a bright and a dark corner."""
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = 127.5 + 127.5 * np.sin(x / 6.0) * np.cos(y / 7.0)
    return np.rint(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def _alpha(height: int = 36, width: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    alpha = np.rint(255 * (x + y) / (height + width - 2)).astype(np.uint8)
    alpha[:, :8] = 0  # a fully transparent band over bright colour: must not show
    alpha[:, -8:] = 255
    return alpha


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _over_black(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255 if pixels.ndim == 3 else alpha / 255
    return np.rint(pixels * a).astype(np.uint8)


def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG (Pillow reads them, but does not write them)."""
    height, width, channels = samples.shape
    rows = samples.astype(">u2").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )  # fmt: skip


@pytest.mark.parametrize("alpha", [False, True], ids=["RGB", "RGBA"])
def test_16_bit_colour_pngs_read_as_their_8_bit_equivalent(alpha: bool) -> None:
    rgb, opacity = _reference(), _alpha()
    samples = rgb.astype(np.uint16) * 257
    if alpha:
        samples = np.concatenate([samples, opacity[..., None].astype(np.uint16) * 257], axis=-1)
    equivalent = _over_black(rgb, opacity) if alpha else rgb
    for channels in (1, 3):
        got = input_from_bytes(_png16(samples), _spec(channels), Preprocessing())
        want = input_from_bytes(_encode(Image.fromarray(equivalent), "PNG"), _spec(channels),
                                Preprocessing())  # fmt: skip
        np.testing.assert_allclose(got, want, atol=1.01 / 255, rtol=0)


def _case(name: str) -> tuple[Image.Image, str, Image.Image | None]:
    """(an image in some mode, the format that stores it, its 8-bit L or RGB equivalent;
    None: the RGB that libjpeg decodes the file to)."""
    rgb, alpha = _reference(), _alpha()
    grey = _grey(rgb)
    if name == "1":
        image = Image.fromarray(grey).convert("1")
        return image, "PNG", image.convert("L")
    if name == "L":
        return Image.fromarray(grey), "PNG", Image.fromarray(grey)
    if name == "LA":
        image = Image.fromarray(np.stack([grey, alpha], axis=-1))
        return image, "PNG", Image.fromarray(_over_black(grey, alpha))
    if name == "P":
        image = Image.fromarray(rgb).convert("P")
        return image, "PNG", image.convert("RGB")
    if name == "P+tRNS":  # a palette with a transparent entry (GIF, PNG tRNS)
        image = Image.fromarray(rgb).convert("P")
        index = np.asarray(image)[0, 0]
        image.info["transparency"] = int(index)
        opaque = np.asarray(image.convert("RGB")).copy()
        opaque[np.asarray(image) == index] = 0
        return image, "PNG", Image.fromarray(opaque)
    if name == "PA":
        palette = Image.fromarray(rgb).convert("P")
        image = palette.convert("PA")
        image.putalpha(Image.fromarray(alpha))
        equivalent = _over_black(np.asarray(palette.convert("RGB")), alpha)
        return image, "TIFF", Image.fromarray(equivalent)
    if name == "RGB":
        return Image.fromarray(rgb), "PNG", Image.fromarray(rgb)
    if name == "RGBA":
        image = Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1))
        return image, "PNG", Image.fromarray(_over_black(rgb, alpha))
    if name == "CMYK":
        image = Image.fromarray(rgb).convert("CMYK")
        return image, "TIFF", image.convert("RGB")
    if name == "YCbCr":
        image = Image.fromarray(rgb).convert("YCbCr")
        return image, "TIFF", image.convert("RGB")
    if name == "JPEG":  # stored as YCbCr (lossy), decoded to RGB by libjpeg
        return Image.fromarray(rgb), "JPEG", None
    if name in ("I;16 PNG", "I;16 TIFF", "I;16B TIFF", "I TIFF", "I PGM"):
        wide = grey.astype(np.uint16) * 257  # the same picture on the 16-bit scale
        mode, fmt = name.split()
        image = Image.fromarray(wide)  # I;16
        if mode == "I;16B":
            image = Image.frombytes("I;16B", image.size, wide.astype(">u2").tobytes())
        elif mode == "I":
            image = Image.fromarray(wide.astype(np.int32))
        return image, "PPM" if fmt == "PGM" else fmt, Image.fromarray(grey)
    if name == "F TIFF":
        return Image.fromarray(grey.astype(np.float32) / 255), "TIFF", Image.fromarray(grey)
    raise AssertionError(name)


MODES = ["1", "L", "LA", "P", "P+tRNS", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "JPEG",
         "I;16 PNG", "I;16 TIFF", "I;16B TIFF", "I TIFF", "I PGM", "F TIFF"]  # fmt: skip


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", MODES)
def test_every_image_mode_reads_as_its_8_bit_equivalent(name: str, channels: int) -> None:
    image, fmt, equivalent = _case(name)
    data = _encode(image, fmt)
    with Image.open(io.BytesIO(data)) as stored:  # the file really holds that mode
        expected_mode = {"P+tRNS": "P", "JPEG": "RGB", "I PGM": "I"}.get(name, name.split()[0])
        assert stored.mode == expected_mode
        if equivalent is None:
            equivalent = stored.convert("RGB")
    spec = _spec(channels)
    got = input_from_bytes(data, spec, Preprocessing())
    want = input_from_bytes(_encode(equivalent, "PNG"), spec, Preprocessing())
    tolerance = 1.01 / 255  # rounding to 8 bits, once
    assert got.shape == want.shape == (channels, 24, 20)
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)
    assert got.max() > 0.5  # not clipped to black


def test_a_16_bit_demo_digit_is_still_a_3(demo_classifier) -> None:  # noqa: ANN001
    with Image.open(DIGIT3) as digit:
        grey = np.asarray(digit.convert("L"))
    wide = _encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    with Image.open(io.BytesIO(wide)) as stored:
        assert stored.mode == "I;16"
    tensor = input_from_bytes(wide, demo_classifier.spec, DEMO)
    np.testing.assert_allclose(tensor, load_input(DIGIT3, demo_classifier.spec, DEMO), atol=1e-6)
    assert int(demo_classifier.predict(tensor[None]).classes[0]) == 3
    # The same digit drawn in the alpha channel (white ink of varying opacity).
    ink = np.stack([np.full_like(grey, 255), grey], axis=-1)
    tensor = input_from_bytes(_encode(Image.fromarray(ink), "PNG"), demo_classifier.spec, DEMO)
    assert int(demo_classifier.predict(tensor[None]).classes[0]) == 3


def test_alpha_is_a_preprocessing_setting() -> None:
    rgb, alpha = _reference(), _alpha()
    rgba = _encode(Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1)), "PNG")
    spec = _spec(3)
    ignored = input_from_bytes(rgba, spec, Preprocessing(alpha="ignore"))
    np.testing.assert_array_equal(
        ignored, input_from_bytes(_encode(Image.fromarray(rgb), "PNG"), spec, Preprocessing())
    )
    with pytest.raises(InvalidInputError, match="transparent pixels.*alpha"):
        input_from_bytes(rgba, spec, Preprocessing(alpha="refuse"))
    opaque = np.concatenate([rgb, np.full_like(alpha, 255)[..., None]], axis=-1)
    assert input_from_bytes(_encode(Image.fromarray(opaque), "PNG"), spec, Preprocessing(alpha="refuse")).shape == (3, 24, 20)  # fmt: skip
    # Black ink on a transparent page reads as black on white with a white background.
    ink = np.stack([np.zeros_like(alpha), alpha], axis=-1)
    on_white = input_from_bytes(
        _encode(Image.fromarray(ink), "PNG"), _spec(1), Preprocessing(alpha_background=255)
    )
    expected = 255 - alpha.astype(np.float64)
    want = input_from_bytes(
        _encode(Image.fromarray(np.rint(expected).astype(np.uint8)), "PNG"), _spec(1),
        Preprocessing(),
    )  # fmt: skip
    np.testing.assert_allclose(on_white, want, atol=1.01 / 255)
    # A four-channel model takes the alpha channel as it is.
    four = input_from_bytes(rgba, _spec(4, 36, 40, "NHWC"), Preprocessing())
    np.testing.assert_allclose(four[..., 3], alpha / 255, atol=1e-6)


def test_images_beyond_their_nominal_range_are_refused_not_clipped() -> None:
    spec = _spec(1)
    bright = Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32))
    with pytest.raises(InvalidInputError, match=r"0\.\.1.*200"):
        input_from_bytes(_encode(bright, "TIFF"), spec, Preprocessing())
    wide = Image.fromarray(np.full((8, 8), 70000, dtype=np.int32))
    with pytest.raises(InvalidInputError, match=r"0\.\.65535.*70000"):
        input_from_bytes(_encode(wide, "TIFF"), spec, Preprocessing())


def test_calibrations_without_the_new_settings_still_load() -> None:
    calibration = json.loads((demo.DEMO_DIR / "calibration.json").read_text())
    loaded = Preprocessing.model_validate(calibration["preprocessing"])
    assert loaded.alpha == "composite" and loaded.alpha_background == 0
    assert Preprocessing.model_validate(json.loads(demo.DEMO_PREPROCESSING.read_text())) == DEMO


# --- 3. settings that would poison every request ----------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"scale": float("inf")}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean"),
        ({"std": [float("inf")]}, "std"),
        ({"std": [0.0]}, "std"),
        ({"scale": 1e38}, "scale"),  # 255 x scale overflows float32
        ({"std": [1e-45]}, "std"),  # so does dividing by it
    ],
)
def test_preprocessing_refuses_settings_that_make_non_finite_inputs(
    settings: dict, field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Preprocessing.model_validate(settings)
    line = describe_validation_error(refused.value, "preprocessing")
    assert line.startswith(f"preprocessing: {field}") and "\n" not in line


def test_a_preprocessing_file_with_infinity_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "preprocessing.json"
    path.write_text('{"scale": Infinity, "color_mode": "L"}')
    with pytest.raises(ConfigError, match=r"scale: must be a finite number \(got inf\)"):
        Preprocessing.from_file(path)


def test_validation_errors_are_described_on_one_line() -> None:
    with pytest.raises(ValidationError) as refused:
        EngineSettings(iters=0)
    assert describe_validation_error(refused.value, "engine settings") == (
        "engine settings: iters: must be >= 1 (got 0)"
    )
    with pytest.raises(ValidationError) as refused:
        EngineSettings.model_validate(
            {"iters": 0, "chunk_size": "many", "confidence_filter": 2, "colour": "red"}
        )
    line = describe_validation_error(refused.value, "engine settings")
    assert "\n" not in line
    for part in (
        "iters: must be >= 1 (got 0)",
        "chunk_size: must be an integer (got 'many')",
        "confidence_filter: must be <= 1.0 (got 2)",
        "colour: unknown setting",
    ):
        assert part in line
    with pytest.raises(ValidationError) as refused:
        Preprocessing.model_validate({"resize": "lanczos"})
    assert describe_validation_error(refused.value, "preprocessing") == (
        "preprocessing: resize: must be one of 'nearest', 'bilinear' or 'bicubic' (got 'lanczos')"
    )


# --- 4-6. the cached run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    key: str
    value: float

    def to_json_line(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def parse(cls, line: str) -> Record:
        return cls(**json.loads(line))


def _data(n: int = 20, bad: tuple[int, ...] = ()) -> LabelledData:
    rng = np.random.default_rng(1)
    x = rng.random((n, 1, 4, 4)).astype(np.float32)
    for i in bad:
        x[i, 0, 0, 0] = np.nan
    return LabelledData(
        Path("stub.npz"), [str(c) for c in range(10)], [f"npz:{i}" for i in range(n)],
        [i % 10 for i in range(n)], _spec(1, 4, 4), Preprocessing(), _tensors=x,
    )  # fmt: skip


class Explainer:
    """A stub ``explain`` that counts the items it computes and can fail on some keys."""

    def __init__(self, fail_on: tuple[str, ...] = ()) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, items: list) -> list[Record]:  # noqa: ANN001
        keys = [item.key for item in items]
        self.calls.append(keys)
        if any(key in self.fail_on for key in keys):
            raise NonFiniteOutputError()
        return [Record(item.key, float(item.tensor.sum())) for item in items]

    @property
    def computed(self) -> list[str]:
        return [key for keys in self.calls for key in keys]


EXPECTED = {"fingerprint": {"test": 1}}


def _run(data: LabelledData, cache: Path, explain: Explainer, **kwargs):  # noqa: ANN003, ANN202
    return run_cached(data, cache, EXPECTED["fingerprint"], explain, Record.parse, **kwargs)


def test_a_cache_cut_mid_line_is_repaired_and_nothing_is_computed_twice(tmp_path: Path) -> None:
    data = _data()
    whole = _run(data, tmp_path / "whole.jsonl", Explainer(), batch_items=4)
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    assert len(lines) == 21
    cache = tmp_path / "cut.jsonl"  # header and 9 records, then half of the 10th
    cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][: len(lines[10]) // 2])

    explain = Explainer()
    resumed = _run(data, cache, explain, batch_items=4)
    assert resumed.records == whole.records and resumed.resumed == 9
    assert sorted(explain.computed) == sorted(data.keys[9:])
    assert any("cut short" in note and str(cache) in note for note in resumed.notes)
    assert all(json.loads(line) for line in cache.read_text().splitlines())

    again = Explainer()
    rerun = _run(data, cache, again, batch_items=4)
    assert again.computed == [] and rerun.records == whole.records and rerun.notes == []


@pytest.mark.parametrize("content", ["", '{"fingerprint": {"te'], ids=["empty", "half a header"])
def test_an_empty_or_cut_cache_is_called_damaged(tmp_path: Path, content: str) -> None:
    cache = tmp_path / "cache.jsonl"
    cache.write_text(content)
    with pytest.raises(ConfigError, match="damaged") as refused:
        _run(_data(), cache, Explainer())
    assert "--restart" in str(refused.value) and "other settings" not in str(refused.value)
    assert len(_run(_data(), cache, Explainer(), restart=True).records) == 20


def test_another_fingerprint_is_still_other_settings(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    _run(_data(), cache, Explainer())
    with pytest.raises(ConfigError, match="other settings"):
        run_cached(_data(), cache, {"test": 2}, Explainer(), Record.parse)


def test_a_batch_that_fails_on_one_item_skips_only_that_item(tmp_path: Path) -> None:
    data = _data()
    explain = Explainer(fail_on=("npz:5",))
    run = _run(data, tmp_path / "cache.jsonl", explain, batch_items=8)
    assert [r.key for r in run.records] == [k for k in data.keys if k != "npz:5"]
    assert run.skipped == [("npz:5", "the model produced non-finite outputs for this input")]
    assert explain.computed.count("npz:5") == 2  # once in its batch, once alone
    resumed = Explainer()
    again = _run(data, tmp_path / "cache.jsonl", resumed)
    assert resumed.computed == [] and again.skipped == run.skipped


def test_faults_that_are_not_guard_errors_still_stop_the_run(tmp_path: Path) -> None:
    def broken(items: list) -> list:  # noqa: ANN001
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cached(_data(), tmp_path / "c.jsonl", {"test": 1}, broken, Record.parse)


def test_non_finite_outputs_are_invalid_input() -> None:
    from guard.transport.grpc.status import status_of

    error = NonFiniteOutputError()
    assert isinstance(error, InvalidInputError) and isinstance(error, GuardError)
    assert str(error) == "the model produced non-finite outputs for this input"
    assert status_of(error).name == "INVALID_ARGUMENT"


# --- 5. skipped items name their key once -----------------------------------------------------


def test_skipped_reasons_do_not_repeat_the_key(tmp_path: Path) -> None:
    run = _run(_data(bad=(3,)), tmp_path / "cache.jsonl", Explainer())
    assert run.skipped == [("npz:3", "input contains NaN or Inf values")]

    root = tmp_path / "folder"
    (root / "3").mkdir(parents=True)
    Image.new("L", (32, 32)).save(root / "3" / "fine.png")
    (root / "3" / "broken.png").write_bytes(b"not a png")
    data = open_labelled_data(root, _spec(1, 32, 32), DEMO, [str(i) for i in range(10)])
    errors = {item.key: item.error for item in data.items()}
    assert errors["3/fine.png"] is None
    reason = errors["3/broken.png"]
    assert reason == "cannot decode image (not a known image format)"


def test_calibrate_lists_a_skipped_item_with_its_key_once(tmp_path: Path, heldout) -> None:  # noqa: ANN001
    x, y = heldout
    x = x[:60].copy()
    x[3, 0, 0, 0] = np.nan
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y[:60])
    from guard.cli import app

    result = CliRunner().invoke(
        app, ["calibrate", str(path), "--out", str(tmp_path / "cal.json"), "--iters", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "npz:3: input contains NaN or Inf values" in result.output
    assert result.output.count("npz:3") == 1
