"""The README states what the shipped files hold."""

from __future__ import annotations

from pathlib import Path

from guard import demo
from guard.verdict.artifact import load_artifact
from scripts.demo_calibration_summary import BEGIN, END, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_states_the_shipped_demo_calibration() -> None:
    content = README.read_text()
    block = content[content.index(BEGIN) : content.index(END) + len(END)]
    expected = render(load_artifact(demo.DEMO_CALIBRATION))
    assert block == expected, "run: python scripts/demo_calibration_summary.py --write"
