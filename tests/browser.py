"""A real browser for the page tests: headless Chromium (Debian's ``chromium`` package).

Where no Chromium is found it is installed with apt-get when the tests run as root (CI on a
fresh machine); elsewhere the browser tests are skipped with the command to install it.
In CI (CI set) a Chromium that cannot be found or installed fails the tests instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Names Debian and other distributions give the browser; GUARD_CHROMIUM names another one.
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Bounds on the set-up: the package lists, then the browser with its libraries (~100 MB).
_UPDATE_SECONDS = 300
_INSTALL_SECONDS = 600
# Headless, no sandbox (CI runs as root), nothing fetched beyond the page under test.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)


def _found() -> str | None:
    given = os.environ.get("GUARD_CHROMIUM")
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    return next((path for name in _NAMES if (path := shutil.which(name))), None)


def _apt(*args: str, timeout: float = _INSTALL_SECONDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


@functools.cache
def _install() -> tuple[str | None, str]:
    """The browser's path, installed with apt-get where missing and allowed; or why not."""
    found = _found()
    if found is not None:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, "no Chromium and no apt-get; install Chromium or set GUARD_CHROMIUM"
    if os.geteuid() != 0:
        return None, "no Chromium; install it with 'sudo apt-get install chromium'"
    try:
        done = _apt("install", "-y", "-q", "--no-install-recommends", "chromium")
        if done.returncode != 0:  # fresh machines have no package lists yet
            updated = _apt("update", "-q", timeout=_UPDATE_SECONDS)
            if updated.returncode != 0:
                return None, f"apt-get update failed: {updated.stderr.strip()[-2000:]}"
            done = _apt("install", "-y", "-q", "--no-install-recommends", "chromium")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"apt-get install chromium: {exc}"
    if done.returncode != 0:
        return None, f"apt-get install chromium failed: {done.stderr.strip()[-2000:]}"
    found = _found()
    return (found, "") if found else (None, "apt-get installed chromium, but it is not on PATH")


def chromium() -> str:
    """The headless browser's executable, installed on first use where needed (see above)."""
    path, problem = _install()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return path


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="guard-chromium-") as profile:
        return subprocess.run(
            [chromium(), *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "HOME": profile},
        )


def dump_dom(url: str, *, timeout: float = 120) -> str:
    """The page's DOM after loading, serialised by the browser (``--dump-dom``)."""
    done = _run("--virtual-time-budget=3000", "--dump-dom", url, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def screenshot(
    url: str, path: Path, *, width: int = 1280, height: int = 900, timeout: float = 120
) -> Path:
    """A PNG of the page as the browser draws it in a ``width`` x ``height`` window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _run(
        "--virtual-time-budget=3000",
        f"--window-size={width},{height}",
        f"--screenshot={path}",
        url,
        timeout=timeout,
    )
    assert done.returncode == 0 and path.is_file(), done.stderr[-4000:]
    return path
