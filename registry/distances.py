"""The registered distances between unit vectors, by name (torch-free; numpy and torch alike).

Each is computed from the cosine similarity of two unit vectors, so one matrix product serves
every distance. ``from_euclidean`` converts a euclidean distance (a published spread) into the
distance's own units. The names are :data:`~semla.schemas.api.DISTANCES` (a test checks they agree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from semla.registry.names import Registry

__all__ = ["Distance", "DISTANCE_FUNCTIONS", "distance_from_similarity"]


def _sqrt(x: Any) -> Any:
    return x.sqrt() if hasattr(x, "sqrt") else np.sqrt(x)  # a torch tensor, else numpy


@dataclasses.dataclass(frozen=True)
class Distance:
    """A distance between unit vectors ``a``, ``b`` with cosine similarity ``s = a·b``."""

    name: str
    formula: str
    #: similarity (array or tensor) → distance, elementwise.
    from_similarity: Callable[[Any], Any]
    #: euclidean distance → this distance (for unit vectors).
    from_euclidean: Callable[[Any], Any]


DISTANCE_FUNCTIONS: Registry[Distance] = Registry("distance")
DISTANCE_FUNCTIONS.register("euclidean", Distance("euclidean", "sqrt(max(0, 2 - 2s))",
                                                  lambda s: _sqrt((2.0 - 2.0 * s).clip(0.0)), lambda d: d))
DISTANCE_FUNCTIONS.register("cosine", Distance("cosine", "1 - s", lambda s: 1.0 - s, lambda d: d**2 / 2.0))


def distance_from_similarity(similarity: Any, distance: str) -> Any:
    """The named distance from cosine similarities (numpy array or torch tensor).

    Raises:
        UnknownNameError: an unregistered distance.
    """
    return DISTANCE_FUNCTIONS.lookup(distance).from_similarity(similarity)
