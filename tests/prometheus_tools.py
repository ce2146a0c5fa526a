"""Locating the Prometheus binaries (Debian's package, put in .tools/ by the deploy script)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
INSTALL_SCRIPT = DEPLOY / "scripts" / "install-prometheus.sh"


@functools.cache
def _install() -> tuple[Path | None, str]:
    try:
        done = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if done.returncode != 0:
        return None, done.stderr.strip()
    return Path(done.stdout.strip().splitlines()[-1]), ""


def prometheus_bin() -> Path:
    """The directory holding ``promtool`` and ``prometheus``, installed on first use.

    Where they cannot be installed, the test fails in CI (CI=true) and is skipped elsewhere.
    """
    bin_dir, problem = _install()
    if bin_dir is None:
        message = f"could not install Prometheus with {INSTALL_SCRIPT.name}: {problem}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


def promtool(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(prometheus_bin() / "promtool"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
