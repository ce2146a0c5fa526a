from __future__ import annotations

import numpy as np
import pytest

from guard import demo
from guard.runtime import MaskedClassifier


@pytest.fixture(scope="session")
def demo_classifier() -> MaskedClassifier:
    return MaskedClassifier(demo.DEMO_MODEL)


@pytest.fixture(scope="session")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(demo.DEMO_HELDOUT, allow_pickle=False)
    return data["x"], data["y"]
