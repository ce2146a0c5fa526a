"""Settings of ``guard serve``: each one a CLI flag and a ``GUARD_`` environment variable.

The names are the flags' (``--metrics-port`` is ``metrics_port`` is ``GUARD_METRICS_PORT``);
a flag given on the command line wins over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Mode = Literal["sync", "async"]


class ServeSettings(BaseSettings):
    """What ``guard serve`` serves, where, and how it behaves under load."""

    model_config = SettingsConfigDict(env_prefix="GUARD_", extra="forbid", frozen=True)

    model: Path | None = Field(
        default=None, description="ONNX classifier (the CLI serves the bundled demo without one)"
    )
    calibration: Path | None = Field(
        default=None, description="calibration JSON from guard calibrate (required with --model)"
    )
    model_name: str | None = Field(
        default=None, min_length=1, description="name clients use (default: model file stem)"
    )
    engine_settings: Path | None = Field(
        default=None, description="JSON engine settings to use instead of the calibration's"
    )
    allow_engine_mismatch: bool = Field(
        default=False, description="serve engine settings that differ from the calibration's"
    )
    allow_model_mismatch: bool = Field(
        default=False, description="serve a model whose sha256 differs from the calibration's"
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="execution provider: cuda where available with auto (CPU otherwise), or forced",
    )

    host: str = Field(default="0.0.0.0", description="bind address of both ports")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0: any free one)")
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus /metrics port (0: any free one)"
    )

    mode: Mode = Field(
        default="sync", description="sync: verdict in the response; async: in the background"
    )
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0, description="share of items checked")
    explain: Literal["all", "flagged"] = Field(
        default="all",
        description="all: compute the MPS of every checked prediction; flagged: only of those "
        "the score flags, plus a random explain_sample_rate share of all checked ones. Only for "
        "scores that read no MPS feature (msp, confidence, class-confidence); with one that "
        "does, flagged behaves as all",
    )
    explain_sample_rate: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="with explain flagged: the random share of checked predictions whose MPS "
        "is computed whatever their verdict; the MPS-area histogram and drift use only these",
    )
    queue_size: int = Field(default=256, ge=1, description="background queue (async mode)")
    share_model_calls: bool | None = Field(
        default=None,
        description="compute concurrent requests' MPSs in shared model calls "
        "(default: on with CUDA, off on CPU, where it measured no faster)",
    )
    batch_wait_ms: float = Field(
        default=2.0, ge=0.0, le=1000.0, description="longest wait for requests to share a batch"
    )
    explain_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="MPS computations at once: threads computing shared batches, or requests "
        "computing their own when calls are not shared",
    )
    max_batch_items: int = Field(
        default=32, ge=1, description="most items whose MPSs are computed together"
    )
    max_concurrency: int = Field(
        default=64, ge=1, description="requests handled at once; more get RESOURCE_EXHAUSTED"
    )
    max_request_items: int = Field(default=64, ge=1, description="most items in one request")
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="largest request or response message"
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,  # guard.preprocess.DEFAULT_MAX_IMAGE_PIXELS (not imported for --help)
        ge=1,
        description="largest encoded image (width x height) Explain decodes; larger ones are "
        "refused from their header (default 4096x4096)",
    )
    grace_seconds: float = Field(
        default=30.0, ge=0.0, description="on SIGTERM, how long in-flight requests may finish"
    )
    drift_window: int = Field(default=500, ge=10, description="recent MPS areas compared for drift")

    keep_flagged: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="keep the last N flagged predictions in memory (input as the model saw "
        "it, MPS, responsibility map, figures) for the /flags page; 0 keeps none (inputs may "
        "be sensitive). Refused at start when N x the bytes of one item exceeds 1 GiB",
    )
    flagged_dir: Path | None = Field(
        default=None,
        description="also write each kept flagged prediction here as PNG + JSON, the newest "
        "keep_flagged of them (older ones are deleted); nothing is written without it",
    )
    ui_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve the /flags page on this port (0: any free one) instead of the "
        "metrics port; over TLS with tls_cert and tls_key (needed for keep_flagged with TLS)",
    )

    tls_cert: Path | None = Field(default=None, description="PEM server certificate chain")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA bundle: require client certificates (mutual TLS)"
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="level of the plain log lines (verdict lines are separate)"
    )
    log_verdicts: bool = Field(default=True, description="one JSON log line per verdict")

    @property
    def served_name(self) -> str:
        """The name clients use: ``model_name``, else the model file's stem ("" without one)."""
        return self.model_name or (self.model.stem if self.model is not None else "")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.model is not None and self.calibration is None:
            raise ValueError("a calibration is required with a model (guard calibrate makes one)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.flagged_dir is not None and self.keep_flagged == 0:
            raise ValueError("flagged_dir needs keep_flagged (how many flagged items to keep)")
        if self.keep_flagged and self.tls_cert is not None and self.ui_port is None:
            raise ValueError(
                "keep_flagged with TLS needs ui_port: the /flags page shows model inputs and "
                "is served over TLS on ui_port, never on the plain-HTTP metrics port"
            )
        return self
