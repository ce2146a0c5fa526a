"""Settings of the engine and of model loading, as validated data (pydantic).

Defaults are the reference tool's (rex-xai 0.4.1). The same objects are written into
calibration artifacts, so a verdict is only ever scored against MPSs made the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from guard.algorithm.baselines import Baseline, BaselineSetting
from guard.algorithm.landscape import Combination, RandomStream, ResponsibilityForm


class EngineSettings(BaseModel):
    """How MPSs are computed. Every field is settable; the defaults are ReX's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iters: int = Field(default=20, ge=1, description="independent responsibility runs")
    tree_depth: int = Field(default=10, ge=1, description="deepest box level that is split")
    min_box_size: int = Field(
        default=10, ge=1, description="boxes smaller than this (px) stay whole"
    )
    chunk_size: int = Field(default=10, ge=1, description="pixels added per extraction step")
    seed: int = Field(
        default=0, description="run i uses a stream seeded from (seed, i), for every image"
    )
    baseline: BaselineSetting = Field(
        default_factory=Baseline, description="occluded pixels' value"
    )
    combination: Combination = Field(default="multiplicative", description="how runs' maps combine")
    responsibility_form: ResponsibilityForm = Field(
        default="simple", description="1/k (ReX) or 1/(k+1) (witness) per kept child"
    )
    empty_mps: bool = Field(
        default=False,
        description="test the empty set first: the MPS is empty when the all-baseline input "
        "keeps the class (Definition 1 read strictly; rex-xai never tests it and starts at "
        "the first chunk, the default)",
    )
    random_stream: RandomStream = Field(
        default="counter",
        description="counter: a stream per (seed, run), responsibility in exact sums; rex: "
        "rex-xai 0.4.1's per-run RandomState(seed + run + 1) and its float32 sums, so the same "
        "seed gives rex-xai's MPS (and, as in rex-xai, seeds s and s + 1 share 19 of 20 runs)",
    )
    confidence_filter: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="a mutant passes only with confidence >= this x the original confidence",
    )
    search_limit: int | None = Field(
        default=None, ge=1, description="stop a run after this many mutants (None: no limit)"
    )
    max_batch_size: int = Field(default=512, ge=1, description="most mutants in one model call")
    extraction_batch: int = Field(
        default=8, ge=1, description="prefixes tested in the first extraction call (doubles after)"
    )
    mutants: Literal["all", "monotone"] = Field(
        default="all",
        description="all: every mutant of a split box is evaluated (ReX); monotone: singles, "
        "then triples, then pairs, each only where the verdicts so far do not imply it (a "
        "superset of a passing mutant passes, a subset of a failing one fails): the same "
        "verdicts where the model is monotone on the box, in about half the evaluations",
    )
    extraction: Literal["blocks", "bisect"] = Field(
        default="blocks",
        description="blocks: consecutive prefixes from the first chunk, the first passing one "
        "(ReX); bisect: 1, 2, 4, ... chunks to the first passing prefix, then bisection to a "
        "passing prefix whose predecessor fails (the first passing one where passing is "
        "monotone in the prefix length), in about 2 log2(chunks) evaluations",
    )

    def preset(self) -> str | None:
        """The name of the preset these settings are (``"fast"``), or None."""
        fast = self.model_copy(update=FAST_PRESET)
        return "fast" if fast == self else None


FAST_PRESET: dict[str, Any] = {"iters": 6, "mutants": "monotone", "extraction": "bisect"}
"""``--fast``: 6 runs whose mutants are evaluated only where monotonicity does not imply their
verdict, and a bisected extraction: 11-15% of the default's model evaluations per MPS on average
(up to about 20% on single images; ``benchmarks/bench_engine.py``). On the small models its MPS
areas rank like the default's about as well as rex-xai's do across seeds; at 224x224 they agree
less and are larger (the README gives the figures). Every other setting keeps its value, and the
calibration records them like any others."""


class ModelOptions(BaseModel):
    """How to read a model whose graph leaves something open; ``auto`` detects it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Literal["auto", "NCHW", "NHWC"] = "auto"
    height: int | None = Field(
        default=None, ge=1, description="input height if the model leaves it dynamic"
    )
    width: int | None = Field(
        default=None, ge=1, description="input width if the model leaves it dynamic"
    )
    output: str | None = Field(default=None, description="output to read (default: the first)")
    output_kind: Literal["auto", "logits", "probabilities"] = "auto"
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    spin_threads: bool = Field(
        default=True,
        description="onnxruntime's worker threads spin between model calls: faster MPSs where "
        "the engine has the CPU to itself, less CPU for anything else in the process",
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="bind a request's images and baselines on the model's device once, so each "
        "model call sends only its masks (onnxruntime I/O binding): auto is on with CUDA, where "
        "host-to-device copies cost, and off on CPU, where the inputs are already in place",
    )
