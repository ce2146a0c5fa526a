"""The sidecar's store of flagged predictions and its /flags page: a real browser (headless
Chromium) loads the page from a running sidecar that flagged noise images, the downloads and
the JSON listing; client-controlled text stays text; the memory bound holds under a burst;
off by default; files on disk rotated; the page over TLS on its own port."""

from __future__ import annotations

import io
import json
import ssl
import threading
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from guard import demo
from guard.cli import app
from guard.errors import ConfigError
from guard.service import flag_store
from guard.service.flag_store import (
    ITEM_OVERHEAD_BYTES,
    MAX_REQUEST_ID_CHARS,
    FlagStore,
    item_bytes,
)
from guard.service.guarded_model import Check
from guard.service.settings import ServeSettings
from guard.transport.grpc.client import GuardClient
from guard.transport.grpc.server import Sidecar
from tests.browser import dump_dom, screenshot
from tests.certs import make_pki
from tests.prometheus_tools import ROOT
from tests.serving import LOOPBACK, infer_request, inference_stub, running_sidecar

MODEL = "digits_cnn"
SCREENSHOT = ROOT / "out" / "flags.png"
# Plain HTTP to loopback, never through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
HOSTILE = '"><img src=x onerror=alert(1)><script>alert("id")</script>'


def _noise(count: int, seed: int = 0) -> np.ndarray:
    """Uniform noise, which the demo's msp calibration flags most of the time."""
    return np.random.default_rng(seed).random((count, 1, 32, 32), dtype=np.float32)


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = (
        _HTTP
        if context is None
        else urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    )
    try:
        with opener.open(url, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _infer(sidecar: Sidecar, images: np.ndarray, request_id: str) -> np.ndarray:
    """ModelInfer ``images``; which items were flagged."""
    stub = inference_stub(sidecar)
    response = stub.ModelInfer(infer_request(MODEL, "image", images, id=request_id))
    names = [o.name for o in response.outputs]
    flagged = response.raw_output_contents[names.index("guard_flagged")]
    return np.frombuffer(flagged, dtype=np.bool_)


class Dom(HTMLParser):
    """Elements of a serialised DOM: (tag, attributes), and the text of each element class."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def tags(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if t == tag
            and all(a.get(k, "").split() and v in a[k].split() for k, v in attrs.items())
        ]

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


@pytest.fixture(scope="module")
def flagging_sidecar(
    heldout: tuple[np.ndarray, np.ndarray],
) -> Iterator[tuple[Sidecar, list[int]]]:
    """A sidecar keeping 50 flagged predictions, that has flagged noise and held-out digits it
    is unsure of through ModelInfer, and noise through Explain; with the ids it kept."""
    with running_sidecar(keep_flagged=50, explain="flagged", explain_sample_rate=0.0) as sidecar:
        flagged = _infer(sidecar, _noise(12), "noise-batch")
        assert _infer(sidecar, heldout[0][:64], "digits-batch").any()
        with GuardClient(f"{LOOPBACK}:{sidecar.port}") as client:
            explained = client.explain(_noise(1, seed=5)[0], request_id="explained-noise")
        assert flagged.sum() >= 4 and explained.flagged
        store = sidecar.plane.flags
        assert store is not None
        yield sidecar, [f.id for f in store.items()]


def test_a_browser_shows_the_flagged_predictions_newest_first_with_their_figures(
    flagging_sidecar: tuple[Sidecar, list[int]],
) -> None:
    sidecar, ids = flagging_sidecar
    base = f"http://{LOOPBACK}:{sidecar.metrics_port}"
    dom = Dom(dump_dom(f"{base}/flags"))
    cards = dom.tags("article", **{"class": "card"})
    assert len(cards) == len(ids) >= 5
    # Newest first: the Explain request came last.
    links = [a["href"] for a in dom.tags("a") if a.get("href", "").startswith("flags/")]
    assert links == [f"flags/{i}" for i in ids] and ids == sorted(ids, reverse=True)
    text = dom.all_text
    assert text.count("low_confidence") >= len(ids)  # every card's badge (and the filter)
    for label in ("confidence", "score", "p-value", "MPS area", "evidence", "request"):
        assert text.count(label) >= len(ids), label
    for request in ("explained-noise item 0", "noise-batch item", "digits-batch item"):
        assert request in text
    # Three pictures per card (input, responsibility, MPS), all inline PNGs.
    images = dom.tags("img")
    assert len(images) == 3 * len(ids)
    assert all(i["src"].startswith("data:image/png;base64,") for i in images)
    assert {i["alt"] for i in images} >= {"input", "responsibility"}
    assert not dom.tags("script") and not dom.tags("link")  # self-contained
    assert dom.tags("meta", **{"http-equiv": "refresh"})  # reloads itself
    shot = screenshot(f"{base}/flags", SCREENSHOT, width=1280, height=900)
    with Image.open(shot) as picture:
        assert picture.size == (1280, 900)
        colours = np.asarray(picture.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 50  # drawn, not blank


def test_one_item_large_with_its_downloads(flagging_sidecar: tuple[Sidecar, list[int]]) -> None:
    sidecar, ids = flagging_sidecar
    base = f"http://{LOOPBACK}:{sidecar.metrics_port}"
    item = next(f for f in sidecar.plane.flags.items() if f.request_id == "noise-batch")
    dom = Dom(dump_dom(f"{base}/flags/{item.id}"))
    assert len(dom.tags("article", **{"class": "large"})) == 1
    assert [i["width"] for i in dom.tags("img")] == ["320", "320", "320"]
    hrefs = {a["href"] for a in dom.tags("a")}
    assert {f"{item.id}.png", f"{item.id}.json", "../flags"} <= hrefs
    assert "inference request" in dom.all_text and "32 x 32 x 1" in dom.all_text

    status, headers, png = _get(f"{base}/flags/{item.id}.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert "attachment" in headers["Content-Disposition"]
    with Image.open(io.BytesIO(png)) as picture:
        pixels = np.asarray(picture)
    model = sidecar.models[0]
    assert np.array_equal(pixels, item.pixels[..., 0])
    # The input as the model saw it: the request's tensor, the preprocessing undone.
    expected = model.display(_noise(12)[item.item])
    assert np.array_equal(pixels, expected[..., 0])

    status, headers, raw = _get(f"{base}/flags/{item.id}.json")
    bundle = json.loads(raw)
    assert status == 200 and bundle["id"] == item.id and bundle["png"] == f"{item.id}.png"
    assert bundle["reason"] == "low_confidence" and bundle["flagged"] is True
    rows = bundle["mps_mask"]["rows"]
    mask = np.array([[c == "1" for c in row] for row in rows])
    assert mask.shape == (32, 32) and np.array_equal(mask, item.mps_mask)
    assert bundle["mps_area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    grid = np.array(bundle["responsibility"]["values"])
    assert grid.shape == (32, 32) and 0 <= grid.min() and grid.max() <= 1


def test_filters_and_the_json_listing(flagging_sidecar: tuple[Sidecar, list[int]]) -> None:
    sidecar, ids = flagging_sidecar
    base = f"http://{LOOPBACK}:{sidecar.metrics_port}"
    listing = json.loads(_get(f"{base}/flags.json")[2])
    assert listing["enabled"] and listing["kept"] == len(ids) and listing["capacity"] == 50
    assert [i["id"] for i in listing["items"]] == ids
    first = listing["items"][0]
    assert {"request_id", "predicted_class", "confidence", "score", "p_value", "reason",
            "evidence", "mps_area_fraction", "time", "png", "json"} <= set(first)  # fmt: skip
    some_class = str(listing["items"][-1]["predicted_class"])
    same = [i["id"] for i in listing["items"] if str(i["predicted_class"]) == some_class]
    by_class = json.loads(_get(f"{base}/flags.json?class={some_class}")[2])
    assert [i["id"] for i in by_class["items"]] == same
    dom = Dom(_get(f"{base}/flags?class={some_class}&reason=low_confidence")[2].decode())
    assert len(dom.tags("article", **{"class": "card"})) == len(same)
    assert len(dom.tags("a", **{"class": "on"})) == 2  # both filters shown as chosen
    nothing = Dom(_get(f"{base}/flags?reason=myopic_mps")[2].decode())
    assert not nothing.tags("article")
    assert "No kept flagged prediction matches" in nothing.all_text
    paged = json.loads(_get(f"{base}/flags.json?limit=2")[2])
    assert [i["id"] for i in paged["items"]] == ids[:2] and paged["older"] == ids[1]
    rest = json.loads(_get(f"{base}/flags.json?before={paged['older']}")[2])
    assert [i["id"] for i in rest["items"]] == ids[2:]
    status, headers, _ = _get(f"{base}/flags")
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert _get(f"{base}/flags/999999")[0] == 404
    assert _get(f"{base}/flags/{ids[0]}x")[0] == 404
    # The metrics are where they were.
    assert b"guard_flagged_predictions_total" in _get(f"{base}/metrics")[2]


def test_client_controlled_text_renders_as_text(tmp_path: Path) -> None:
    """A request id and a class name holding markup are shown as the characters they are:
    the DOM holds no element they would inject."""
    calibration = json.loads(demo.DEMO_CALIBRATION.read_text())
    calibration["class_names"] = [f"{HOSTILE}{i}" for i in range(10)]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    with running_sidecar(
        calibration=path, keep_flagged=10, explain="flagged", explain_sample_rate=0.0
    ) as sidecar:
        assert _infer(sidecar, _noise(8), HOSTILE).any()
        base = f"http://{LOOPBACK}:{sidecar.metrics_port}"
        item = sidecar.plane.flags.items()[0]
        chosen = urllib.parse.quote(item.predicted_name)
        for url in (f"{base}/flags", f"{base}/flags/{item.id}", f"{base}/flags?class={chosen}"):
            dom = Dom(dump_dom(url))
            assert not dom.tags("script"), url
            images = dom.tags("img")
            assert images and all(i["src"].startswith("data:image/png;base64,") for i in images)
            assert not any("onerror" in attrs for _, attrs in dom.elements), url
        page = Dom(dump_dom(f"{base}/flags"))
        assert HOSTILE in page.all_text  # the request id, as text
        assert f"{HOSTILE}{item.predicted_class}" in page.all_text  # the class name
        listing = json.loads(_get(f"{base}/flags.json")[2])
        assert listing["items"][0]["request_id"] == HOSTILE


def test_off_by_default_nothing_is_kept_and_the_page_says_how_to_turn_it_on() -> None:
    assert ServeSettings().keep_flagged == 0 and ServeSettings().flagged_dir is None
    with running_sidecar(explain="flagged", explain_sample_rate=0.0) as sidecar:
        assert _infer(sidecar, _noise(8), "off").any()
        assert sidecar.plane.flags is None
        base = f"http://{LOOPBACK}:{sidecar.metrics_port}"
        dom = Dom(dump_dom(f"{base}/flags"))
        assert "--keep-flagged N" in dom.all_text and not dom.tags("article")
        listing = json.loads(_get(f"{base}/flags.json")[2])
        assert listing == {"enabled": False, "message": listing["message"], "items": []}
        assert "--keep-flagged" in listing["message"]
        assert _get(f"{base}/flags/1")[0] == 404 and _get(f"{base}/flags/1.png")[0] == 404


def _check(rng: np.random.Generator, side: int) -> Check:
    return Check(
        predicted_class=3,
        predicted_name="three",
        confidence=0.4,
        mps_area_fraction=0.2,
        degenerate=False,
        score=0.6,
        p_value=0.01,
        flagged=True,
        reason="low_confidence",
        model_evaluations=100,
        model_calls=2,
        mps_mask=rng.random((side, side)) < 0.2,
        evidence=(("msp", 0.4), ("margin", 0.1), ("class=3", 0.05)),
        responsibility=rng.random((side, side)),
    )


@pytest.mark.parametrize("side", [32, 224])
def test_the_memory_bound_holds_for_a_burst_of_1000(side: int) -> None:
    """2500 flagged items into a store of 1000, with the longest request ids of characters
    outside ASCII: the memory the store holds (traced) stays within its documented bound."""
    rng = np.random.default_rng(0)
    channels = 1 if side == 32 else 3
    checks = [_check(rng, side) for _ in range(8)]
    pixels = [rng.integers(0, 256, (side, side, channels), dtype=np.uint8) for _ in range(8)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = FlagStore(1000, [(side, side, channels)])
        for k in range(2500):
            request_id = f"{k}-" + "é" * (2 * MAX_REQUEST_ID_CHARS)  # cut to the limit
            store.add(MODEL, pixels[k % 8], checks[k % 8], request_id, k % 64, "infer")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store) == 1000 and store.items()[0].id == 2500
    assert len(store.items()[0].request_id) == MAX_REQUEST_ID_CHARS
    assert store.bound_bytes == 1000 * item_bytes(side, side, channels)
    assert store.nbytes <= store.bound_bytes
    assert held <= store.bound_bytes, (held, store.bound_bytes)
    # The bound is not loose by more than the documented overhead per item.
    assert held >= store.bound_bytes - 1000 * ITEM_OVERHEAD_BYTES


def test_the_sidecar_keeps_at_most_its_bound_under_a_burst_of_requests() -> None:
    with running_sidecar(keep_flagged=1000, explain="flagged", explain_sample_rate=0.0) as sidecar:
        store = sidecar.plane.flags
        assert store is not None and store.bound_bytes == 1000 * item_bytes(32, 32, 1)
        flagged: list[int] = []

        def burst(seed: int) -> None:
            for k in range(2):
                flagged.append(
                    int(_infer(sidecar, _noise(32, seed * 10 + k), f"burst-{seed}").sum())
                )

        threads = [threading.Thread(target=burst, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert len(flagged) == 8
        assert len(store) == sum(flagged) > 0
        assert store.nbytes <= len(store) * (store.item_bound - ITEM_OVERHEAD_BYTES)
        ids = [f.id for f in store.items()]  # newest first, numbered in the order kept
        assert ids == list(range(len(store), 0, -1))


def test_a_store_whose_bound_exceeds_the_limit_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    most = flag_store.MAX_STORE_BYTES // item_bytes(224, 224, 3)
    with pytest.raises(ConfigError, match=f"the limit is 1024.0 MiB: keep at most {most}$"):
        FlagStore(100_000, [(224, 224, 3)])
    FlagStore(most, [(224, 224, 3)])
    FlagStore(100_000, [(32, 32, 1)])  # 0.7 GiB of the demo's inputs
    # The sidecar refuses at start, before it binds a port.
    monkeypatch.setattr(flag_store, "MAX_STORE_BYTES", 1 << 20)
    settings = ServeSettings(
        model=demo.DEMO_MODEL, calibration=demo.DEMO_CALIBRATION, keep_flagged=1000
    )
    with pytest.raises(ConfigError, match=r"keep_flagged 1000 would keep up to 7\.0 MiB"):
        Sidecar(settings)


def test_flagged_dir_holds_the_newest_items_as_png_and_json(tmp_path: Path) -> None:
    directory = tmp_path / "flagged"
    directory.mkdir()
    for name in (
        "flag-20000101T000000000000Z-000001.png",
        "flag-20000101T000000000000Z-000001.json",
    ):
        (directory / name).write_bytes(b"an earlier run's")
    (directory / "notes.txt").write_text("not the store's")
    with running_sidecar(
        keep_flagged=3, flagged_dir=directory, explain="flagged", explain_sample_rate=0.0
    ) as sidecar:
        assert _infer(sidecar, _noise(16), "to-disk").sum() > 3
        kept = sidecar.plane.flags.items()
    stems = sorted(p.stem for p in directory.glob("flag-*.json"))
    assert len(stems) == 3 and sorted(p.stem for p in directory.glob("flag-*.png")) == stems
    assert (directory / "notes.txt").exists() and not list(directory.glob(".*"))
    assert [int(s.rsplit("-", 1)[1]) for s in stems] == sorted(f.id for f in kept)
    for stem in stems:
        bundle = json.loads((directory / f"{stem}.json").read_text())
        assert bundle["png"] == f"{stem}.png" and bundle["request_id"] == "to-disk"
        with Image.open(directory / f"{stem}.png") as picture:
            assert picture.size == (32, 32)
        assert len(bundle["mps_mask"]["rows"]) == 32


def test_nothing_is_written_without_flagged_dir_and_it_needs_keep_flagged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flagged_dir needs keep_flagged"):
        ServeSettings(flagged_dir=tmp_path)
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for option in ("--keep-flagged", "--flagged-dir", "--ui-port"):
        assert option in help_text


def _tls_client(pki: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def test_with_tls_the_page_is_served_over_tls_on_its_own_port(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with pytest.raises(ValueError, match="keep_flagged with TLS needs ui_port"):
        ServeSettings(keep_flagged=5, **tls)
    with running_sidecar(keep_flagged=5, ui_port=0, **tls) as sidecar:
        assert sidecar.ui_port not in (0, sidecar.metrics_port)
        url = f"https://localhost:{sidecar.ui_port}/flags"
        status, headers, body = _get(url, _tls_client(pki))
        assert status == 200 and b"Flagged predictions" in body
        # Mutual TLS, as on the gRPC port: no client certificate, no page.
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(url, ssl.create_default_context(cafile=str(pki.ca)))
        # The plain-HTTP metrics port never shows it.
        status, _, body = _get(f"http://{LOOPBACK}:{sidecar.metrics_port}/flags")
        assert status == 404 and b"--ui-port" in body
        assert _get(f"http://{LOOPBACK}:{sidecar.metrics_port}/metrics")[0] == 200


def test_the_page_port_refuses_plain_http_under_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    with running_sidecar(keep_flagged=5, ui_port=0, **tls) as sidecar:
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _HTTP.open(f"http://{LOOPBACK}:{sidecar.ui_port}/flags", timeout=10).read()
        context = ssl.create_default_context(cafile=str(pki.ca))
        assert _get(f"https://localhost:{sidecar.ui_port}/flags", context)[0] == 200
