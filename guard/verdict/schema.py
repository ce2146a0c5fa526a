"""Shared pieces of the calibration's JSON schema: strict models and derived arrays."""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Derived", "OptionalFloat", "Strict"]


class Strict(BaseModel):
    # Unknown fields are refused at every level, so a misspelt key cannot be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Derived:
    """numpy copies of a model's list fields, made once for cheap scoring.

    Derived from the fields, so never part of equality (pydantic compares private
    attributes, and arrays cannot be compared to a bool).
    """

    __slots__ = ("arrays",)

    def __init__(self, *arrays: NDArray[np.float64]) -> None:
        self.arrays = arrays

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Derived)

    __hash__ = None  # type: ignore[assignment]


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


# An undefined metric (NaN in Python) is stored as JSON null: strict JSON has no NaN.
OptionalFloat = Annotated[float | None, BeforeValidator(_nan_to_none)]
