"""Fusion weights from retrieval distances: a registry of named schemes, and the guard (DESIGN §4).

Retrieval (:mod:`semla.registry.retrieval`) finds each query's top-k adapters and their
distances ``d_1 <= ... <= d_k``; a *weighting scheme* turns those distances into fusion
weights. Every scheme is a softmax over per-adapter logits ``l_i``::

    w_i = exp(l_i) / sum_j exp(l_j)            (over the top-k)

Schemes (``T`` is the temperature; each scheme has its own default):

``neg-distance``
    ``l_i = -d_i / T`` (T 0.05). The formula this project used first. On unit vectors the gaps
    between the nearest distances are large against T, so it is one-hot in practice.
``paper``
    ``l_i = (1 / max(d_i, 1e-6)) / T`` (T 0.05): exactly the released SemLA code's score
    ``1 / euclidean(q, c)`` with ``softmax(score / T)`` over the top-5 (d = 0 is clamped so the
    score stays finite). The paper applies it to un-normalised CLIP ViT-L/14 features, whose
    distances are large, so 1/d is small and the weights spread; on our unit vectors
    (d <= 2) 1/d/T is in the tens to hundreds and the weights are nearly one-hot.
``calibrated`` (the default)
    Scale-free. Each adapter publishes the spread of its training embeddings around its
    centroid (signed manifest, schema 2): the quantiles ``q50_i``, ``q90_i``, ``q99_i`` of their
    distances to their nearest centroid. Distances are measured in the *library's* unit ``u``,
    the median over its adapters of ``q50_i`` (how far a typical training image lies from its
    own centroid)::

        u   = max(median_i q50_i, 1e-3)
        z_i = d_i / u
        l_i = -z_i / T                           (T 0.5, in units of u)

    Scaling every embedding distance by a constant leaves z, hence the weights, unchanged, and
    nothing in it comes from the query set or test images: only from the published library.
    The unit is one for the whole library, not one per adapter: with a per-adapter unit (and
    distances counted from each adapter's own median shell) a broad adapter, say one trained on
    four kinds of scene, looked near to every query it covered loosely and outweighed the
    specific adapter a query came from.

**The guard.** With ``guard=True`` the base model, a zero adapter, is weighed against the
*nearest* adapter, at position ``guard_z`` (units of u)::

    calibrated:     l_base = -guard_z / T
    other schemes:  l_base = the scheme's logit at d_base = guard_z * u
    w_base = sigmoid(l_base - max_i l_i)         (max_i l_i: the nearest adapter's logit)
    w_i    = (1 - w_base) * softmax(l)_i

The returned adapter weights then sum to ``1 - w_base``: fusing exactly with them *is* fusing
with the base at weight ``w_base`` (a zero adapter adds nothing). Whether the library covers a
query is a question about its nearest adapter, so ``w_base`` does not depend on how many
adapters share the rest: put into the softmax as one more candidate among twenty soft ones
instead, the base kept a twentieth of the weight for a query that none of them covered. For
``top_k`` 1 the two are the same. The default ``guard_z`` comes from the library:
``median_i(q99_i) / u + 1``, one unit beyond where nearly every training image of a typical
adapter lies. A query far from every centroid gives the base most of the weight; a query at a
centroid gives it ``sigmoid(-guard_z / T)``, under 0.01 at the default of a typical library
(guard_z about 2.5, T 0.5).

**Version-1 adapters** publish no spread; :func:`fill_spreads` gives them a documented default
from the library itself: the per-column median of the adapters that do publish one, or, when
none does, the centroids' geometry: with ``m`` the median distance from a centroid to the nearest
centroid of another adapter (1.0 for a one-adapter library), ``(q50, q90, q99) = (0.5 m, 0.75 m,
m)``: neighbouring clouds meet half-way, and nearly all of a cloud lies within reach of the next.

Spreads are stored in euclidean distance between unit vectors; for the cosine distance they are
converted exactly (``1 - cos = d^2 / 2``).

Numpy (the torch-free registry) and torch (the node) implement the same formulas; importing
this module loads no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from semla.registry.distances import DISTANCE_FUNCTIONS
from semla.schemas.api import DEFAULT_WEIGHTING, MAX_GUARD_Z
from semla.schemas.errors import InvalidInputError

__all__ = [
    "CALIBRATED_TEMPERATURE",
    "DEFAULT_WEIGHTING",
    "MAX_GUARD_Z",
    "MIN_SPREAD",
    "PAPER_MIN_DISTANCE",
    "Scheme",
    "Units",
    "WEIGHTINGS",
    "base_weight_of",
    "check_guard_z",
    "check_weighting",
    "default_guard_z",
    "default_temperature",
    "fill_spreads",
    "guard_base_distance",
    "library_units",
    "list_weightings",
    "spreads_for_distance",
    "weights_numpy",
    "weights_torch",
]

#: Temperature of ``calibrated``, in z units (spreads): one spread further costs a factor e^2.
CALIBRATED_TEMPERATURE = 0.5
#: Temperature of ``neg-distance`` and ``paper`` (the released SemLA configuration).
DISTANCE_TEMPERATURE = 0.05
#: Smallest library unit u (euclidean between unit vectors): a degenerate or DP-noised spread
#: of zero width cannot make z infinite.
MIN_SPREAD = 1e-3
#: ``paper`` clamps distances to at least this before 1/d (the released code divides by d).
PAPER_MIN_DISTANCE = 1e-6
#: At most this many centroids are used to measure the library's geometry for the v1 default.
GEOMETRY_SAMPLE = 1024


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A named weighting scheme: its default temperature and its logits in numpy and torch.

    ``logits(d, q50, s, T)`` maps distances (Q, k) and the matching adapters' median distance
    and spread unit (Q, k) to logits (Q, k).
    """

    name: str
    default_temperature: float
    formula: str
    logits_numpy: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    logits_torch: Callable[[Any, Any, Any, float], Any]
    #: True: the guard's position is ``-guard_z / T`` directly (the scheme works in z units).
    z_units: bool = False


def _np_neg(d, q50, s, t):
    return -d / t


def _np_paper(d, q50, s, t):
    return (1.0 / np.maximum(d, PAPER_MIN_DISTANCE)) / t


def _np_calibrated(d, q50, s, t):
    return -(np.maximum(d - q50, 0.0) / s) / t


def _t_neg(d, q50, s, t):
    return -d / t


def _t_paper(d, q50, s, t):
    return (1.0 / d.clamp(min=PAPER_MIN_DISTANCE)) / t


def _t_calibrated(d, q50, s, t):
    return -((d - q50).clamp(min=0.0) / s) / t


#: The registered schemes by name.
WEIGHTINGS: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("calibrated", CALIBRATED_TEMPERATURE, "softmax(-(d / u) / T), u = max(median_i q50_i, 1e-3)",
               _np_calibrated, _t_calibrated, z_units=True),
        Scheme("neg-distance", DISTANCE_TEMPERATURE, "softmax(-d / T)", _np_neg, _t_neg),
        Scheme("paper", DISTANCE_TEMPERATURE, "softmax((1 / max(d, 1e-6)) / T)", _np_paper, _t_paper),
    )
}


def list_weightings() -> list[str]:
    """The registered scheme names, the default first."""
    return [DEFAULT_WEIGHTING] + sorted(n for n in WEIGHTINGS if n != DEFAULT_WEIGHTING)


def check_weighting(name: str) -> Scheme:
    """The scheme called ``name``.

    Raises:
        InvalidInputError: no such scheme (the message lists the valid names).
    """
    scheme = WEIGHTINGS.get(name) if isinstance(name, str) else None
    if scheme is None:
        raise InvalidInputError(f"unknown weighting {name!r}; valid: {', '.join(list_weightings())}",
                                code="unknown_weighting")
    return scheme


def default_temperature(name: str) -> float:
    """The temperature ``name`` uses when none is given."""
    return check_weighting(name).default_temperature


def check_guard_z(guard_z: float | None) -> None:
    """Raises InvalidInputError unless ``guard_z`` is None or a number in [0, MAX_GUARD_Z]."""
    if guard_z is None:
        return
    if isinstance(guard_z, bool) or not isinstance(guard_z, (int, float)) or not 0.0 <= guard_z <= MAX_GUARD_Z:
        raise InvalidInputError(f"guard_z must be a number in [0, {MAX_GUARD_Z:g}], got {guard_z!r}")


# -- spreads --------------------------------------------------------------------------------------
def _geometry_scale(vectors: np.ndarray, owner: np.ndarray) -> float:
    """Median distance from a centroid to the nearest centroid of another adapter (a sample of at
    most GEOMETRY_SAMPLE evenly spaced centroids); 1.0 when there is no other adapter."""
    n = len(vectors)
    pick = np.unique(np.linspace(0, n - 1, min(n, GEOMETRY_SAMPLE)).astype(np.int64)) if n else np.zeros(0, int)
    v = np.asarray(vectors[pick], dtype=np.float64)
    o = np.asarray(owner[pick])
    if len(np.unique(o)) < 2:
        return 1.0
    d = np.sqrt(np.clip(2.0 - 2.0 * (v @ v.T), 0.0, None))
    d[o[:, None] == o[None, :]] = np.inf
    return float(np.median(d.min(axis=1)))


def fill_spreads(spread: np.ndarray | None, vectors: np.ndarray, owner: np.ndarray, n_adapters: int) -> np.ndarray:
    """Per-adapter (q50, q90, q99), (A, 3) float64, with rows of NaN (version-1 adapters) filled.

    The default for a missing row: the per-column median of the published rows; when no
    adapter publishes one, ``(0.5, 0.75, 1.0) * m`` with ``m`` the library's median distance
    from a centroid to the nearest centroid of another adapter (1.0 with one adapter).
    """
    out = np.full((n_adapters, 3), np.nan) if spread is None else np.array(spread, dtype=np.float64, copy=True)
    if out.shape != (n_adapters, 3):
        raise InvalidInputError(f"spread must be ({n_adapters}, 3), got {out.shape}")
    missing = ~np.isfinite(out).all(axis=1)
    if missing.any():
        known = out[~missing]
        if len(known):
            default = np.median(known, axis=0)
        else:
            default = np.array([0.5, 0.75, 1.0]) * _geometry_scale(vectors, owner)
        out[missing] = default
    return out


def spreads_for_distance(spread: np.ndarray, distance: str) -> np.ndarray:
    """Euclidean spreads (unit vectors) in the units of ``distance``: cosine = d^2 / 2."""
    return DISTANCE_FUNCTIONS.lookup(distance).from_euclidean(spread)


def library_unit(spread: np.ndarray) -> float:
    """The library's distance unit u = max(median_i q50_i, MIN_SPREAD) (in the spread's own units)."""
    return float(max(np.median(spread[:, 0]), MIN_SPREAD)) if len(spread) else 1.0


def _units(spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offset, unit) per adapter as the logits take them: no offset, the library's unit for all."""
    return np.zeros(len(spread)), np.full(len(spread), library_unit(spread))


def default_guard_z(spread: np.ndarray) -> float:
    """The library's default guard position, in units of u: median_i(q99_i) / u + 1."""
    return float(np.median(spread[:, 2]) / library_unit(spread) + 1.0) if len(spread) else 1.0


def guard_base_distance(spread: np.ndarray, guard_z: float) -> float:
    """Where the base sits for schemes that work in distances: guard_z * u."""
    return float(guard_z * library_unit(spread))


@dataclasses.dataclass(frozen=True)
class Units:
    """What the weights need of a library's spreads, in one distance's units: computed once per
    library and distance (:meth:`~semla.registry.retrieval.CentroidTable.units`), not per query."""

    spread: np.ndarray  # (A, 3) in the distance's units
    q50: np.ndarray  # (A,) offsets the logits take
    s: np.ndarray  # (A,) units the logits take
    default_guard_z: float


def library_units(spread: np.ndarray, distance: str) -> Units:
    """:class:`Units` of filled euclidean spreads (A, 3) for ``distance``."""
    spread_d = spreads_for_distance(np.asarray(spread, dtype=np.float64), distance)
    q50, s = _units(spread_d)
    return Units(spread_d, q50, s, default_guard_z(spread_d))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    scheme: Scheme
    temperature: float
    q50: np.ndarray  # (A,)
    s: np.ndarray  # (A,)
    base_logit: float | None


def _prepare(spread: np.ndarray, weighting: str, temperature: float | None, guard: bool,
             guard_z: float | None, distance: str, units: Units | None) -> _Prepared:
    scheme = check_weighting(weighting)
    check_guard_z(guard_z)
    t = scheme.default_temperature if temperature is None else float(temperature)
    u = library_units(spread, distance) if units is None else units
    base_logit = None
    if guard:
        g = u.default_guard_z if guard_z is None else float(guard_z)
        if scheme.z_units:
            base_logit = -g / t
        else:
            d_base = np.array([[guard_base_distance(u.spread, g)]])
            base_logit = float(scheme.logits_numpy(d_base, np.zeros_like(d_base), np.ones_like(d_base), t)[0, 0])
    return _Prepared(scheme, t, u.q50, u.s, base_logit)


def weights_numpy(dist: np.ndarray, idx: np.ndarray, spread: np.ndarray, *, weighting: str = DEFAULT_WEIGHTING,
                  temperature: float | None = None, guard: bool = False, guard_z: float | None = None,
                  distance: str = "euclidean", units: Units | None = None) -> np.ndarray:
    """Fusion weights (Q, k) for the top-k adapters ``idx`` (Q, k) at distances ``dist`` (Q, k).

    Args:
        spread: (A, 3) filled euclidean spreads of every adapter (:func:`fill_spreads`).
        units: ``library_units(spread, distance)`` already computed (a cache; computed when None).
        temperature: None: the scheme's default.
        guard, guard_z: weigh the base against the nearest adapter (default position from the library).

    Returns:
        weights in ``dist``'s float dtype; each row sums to 1, or to ``1 - base weight`` with the guard.
    """
    p = _prepare(spread, weighting, temperature, guard, guard_z, distance, units)
    d = np.asarray(dist, dtype=np.float64)
    idx = np.asarray(idx, dtype=np.int64)
    logits = p.scheme.logits_numpy(d, p.q50[idx], p.s[idx], p.temperature)
    if logits.shape[1] == 0:
        return np.zeros_like(np.asarray(dist))
    nearest = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - nearest)
    w = e / e.sum(axis=1, keepdims=True)
    if p.base_logit is not None:  # 1 - w_base = sigmoid(nearest - l_base), without overflow
        w = w * np.exp(-np.logaddexp(0.0, p.base_logit - nearest))
    dtype = np.asarray(dist).dtype if np.issubdtype(np.asarray(dist).dtype, np.floating) else np.float64
    return w.astype(dtype)


def weights_torch(dist: Any, idx: Any, spread: np.ndarray, *, weighting: str = DEFAULT_WEIGHTING,
                  temperature: float | None = None, guard: bool = False, guard_z: float | None = None,
                  distance: str = "euclidean", spread_tensors: tuple[Any, Any] | None = None,
                  units: Units | None = None) -> Any:
    """Torch twin of :func:`weights_numpy` (same formulas), on ``dist``'s device and dtype.

    Args:
        spread_tensors: (q50, s) of every adapter already on the device, in ``distance``'s units
            (a cache; computed from ``spread`` when None).
    """
    import torch

    p = _prepare(spread, weighting, temperature, guard, guard_z, distance, units)
    if spread_tensors is None:
        spread_tensors = (torch.as_tensor(p.q50, dtype=torch.float32, device=dist.device),
                          torch.as_tensor(p.s, dtype=torch.float32, device=dist.device))
    q50_all, s_all = spread_tensors
    logits = p.scheme.logits_torch(dist, q50_all[idx], s_all[idx], p.temperature)
    if logits.shape[1] == 0:
        return torch.zeros_like(dist)
    w = torch.softmax(logits, dim=1)
    if p.base_logit is not None:  # 1 - w_base = sigmoid(nearest - l_base)
        w = w * torch.sigmoid(logits.max(dim=1, keepdim=True).values - p.base_logit)
    return w.to(dist.dtype)


def base_weight_of(weights: np.ndarray) -> np.ndarray:
    """The base's weight per query (the mass the adapter weights leave): 1 - sum, at least 0."""
    w = np.asarray(weights, dtype=np.float64)
    return np.clip(1.0 - w.sum(axis=1), 0.0, 1.0)
