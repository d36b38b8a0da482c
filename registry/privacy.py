"""Privacy of a published centroid: the minimum sample count and Gaussian differential privacy.

Torch-free (numpy and the standard library only): the client uses it while training, the
registry to enforce its sample floor, federated training to noise aggregated sums and counts.

**What is released.** A centroid is ``normalise(Σ xᵢ)`` over an owner's per-image embeddings,
and the manifest carries the sample count ``n``. With DP both are released through the
Gaussian mechanism:

1. each embedding is clipped to L2 norm ``clip_norm`` (``C``; CLIP embeddings are unit vectors
   already, they are clipped anyway so the bound holds whatever the caller hands in);
2. neighbouring data sets differ by adding or removing one image, so the sum moves by at most
   ``C`` in L2 and the count by exactly 1: sensitivities ``C`` and ``1``;
3. the budget (ε, δ) is split: a share ``sum_share`` (default 0.8) of both ε and δ goes to the
   sum, the rest to the count; by basic composition the pair is (ε, δ)-DP;
4. each part gets Gaussian noise whose σ is calibrated with the **analytic Gaussian mechanism**
   (Balle & Wang, ICML 2018, Theorem 8): the smallest σ with
   ``Φ(Δ/2σ − εσ/Δ) − e^ε·Φ(−Δ/2σ − εσ/Δ) ≤ δ``, found by bisection and rounded up. It is
   exact for every ε > 0 (the classic ``σ = Δ·√(2 ln(1.25/δ))/ε`` holds only for ε < 1 and is
   looser; :func:`classic_gaussian_sigma` is kept for comparison);
5. the published centroid is ``normalise(noisy sum)`` and the published count is the noisy
   count rounded and raised to the minimum sample count (post-processing costs no privacy).

**The spread (manifest schema 2).** Each adapter also publishes the quantiles 0.5/0.9/0.99 of
its training embeddings' distances to the published centroid. Under DP they come from a
histogram of those distances (``bins`` equal bins over [0, 2]; adding or removing one image
moves one bin by 1: L2 sensitivity 1) released with Gaussian noise calibrated the same way, then
post-processed (negative bins set to 0, quantiles read off the cumulative sum). The distances
are measured to the already released (noisy) centroid, so the histogram is a fresh query on
public parameters. Its budget is a share ``spread_share`` (default 0.2) of the (ε, δ) the owner
asked for; the centroid and count get the rest, so the manifest's ``privacy.epsilon`` (what the
registry's ledger charges) covers centroid, count and spread together
(:func:`split_for_spread`).

Only ``k = 1`` centroids get DP here: k-means assignments depend on every image, so their
sensitivity is not that of a sum, and training refuses DP together with k-means.

Caveats, stated plainly: the refusal below the minimum sample count is itself decided on the
true count (publishing at all reveals ``n ≥ min_samples``); the noise comes from numpy's PCG64
(seeded from the OS unless a seed is given; never derive it from a published seed such as
the manifest's training seed), and floating-point sampling is not hardened against the
side channels described by Mironov (CCS 2012). The ε here covers the centroid and the count
only, not the LoRA weights (federated training records its own DP on the updates).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from semla.schemas.errors import InvalidInputError, TooFewSamplesError

__all__ = [
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_DELTA",
    "DEFAULT_SUM_SHARE",
    "Budget",
    "NoisySumCount",
    "gaussian_delta",
    "smallest_passing",
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "split_budget",
    "compose",
    "clip_rows",
    "noisy_sum_count",
    "dp_centroid",
    "published_count",
    "check_min_samples",
    "DEFAULT_SPREAD_SHARE",
    "DEFAULT_SPREAD_BINS",
    "SpreadRelease",
    "split_for_spread",
    "exact_spread",
    "dp_spread",
    "histogram_quantiles",
]

#: Fewest images behind a published centroid (DESIGN §6); the registry has its own floor too.
DEFAULT_MIN_SAMPLES = 50
#: δ used when none is given: well below 1/n for any n a registry accepts.
DEFAULT_DELTA = 1e-5
#: Share of (ε, δ) spent on the sum; the rest goes to the count.
DEFAULT_SUM_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class Budget:
    """An (ε, δ) pair."""

    epsilon: float
    delta: float


def _check_budget(epsilon: float, delta: float) -> None:
    if not (epsilon > 0) or math.isnan(epsilon):
        raise InvalidInputError(f"DP epsilon must be > 0, got {epsilon!r}")
    if not 0 < delta < 1:
        raise InvalidInputError(f"DP delta must lie in (0, 1), got {delta!r}")


def _log_ndtr(x: float) -> float:
    """log Φ(x), accurate far into the lower tail (where Φ itself underflows)."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series of the Mills ratio: Φ(x) ≈ φ(x)/|x| · (1 − 1/x² + 3/x⁴)
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log1p(-1.0 / x**2 + 3.0 / x**4)


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The tight δ(ε) of the Gaussian mechanism with noise ``sigma`` (Balle & Wang 2018, Thm 8).

    ``Φ(Δ/2σ − εσ/Δ) − e^ε·Φ(−Δ/2σ − εσ/Δ)``: the mechanism is (ε, δ)-DP exactly when
    δ is at least this.
    """
    if sigma <= 0:
        return 1.0
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    first = math.exp(_log_ndtr(a - b))
    second = math.exp(min(epsilon + _log_ndtr(-a - b), 700.0))
    return max(0.0, first - second)


def smallest_passing(passes: Callable[[float], bool], *, start: float, rel_tol: float) -> float:
    """The smallest x > 0 with ``passes(x)``, for a test that fails below a threshold and passes above.

    Doubles ``start`` until the test passes, then bisects [0, x] for at most 200 steps or until
    the bracket is narrower than ``rel_tol`` of its upper end. Returns the upper end, which
    always passes: a noise scale or an ε found this way is never understated.
    """
    hi = start
    while not passes(hi):
        hi *= 2.0
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if passes(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= rel_tol * hi:
            break
    return hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest σ for which Gaussian noise on an L2-sensitivity-``sensitivity`` query is (ε, δ)-DP.

    The analytic Gaussian mechanism (Balle & Wang 2018): solves :func:`gaussian_delta` = δ by
    bisection on σ; the returned σ is the upper end of the final bracket, so it never
    undershoots. ``epsilon = inf`` gives 0 (no noise).

    Raises:
        InvalidInputError: ε ≤ 0, δ outside (0, 1), or sensitivity ≤ 0.
    """
    if sensitivity <= 0:
        raise InvalidInputError(f"sensitivity must be > 0, got {sensitivity!r}")
    if epsilon == math.inf:
        return 0.0
    _check_budget(epsilon, delta)
    return smallest_passing(lambda sigma: gaussian_delta(sigma, epsilon, sensitivity) <= delta,
                            start=sensitivity, rel_tol=1e-12)


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The classic bound σ = Δ·√(2 ln(1.25/δ))/ε (Dwork & Roth 2014, Thm A.1), valid for ε < 1.

    Raises:
        InvalidInputError: ε ≥ 1 (the bound does not hold there), ε ≤ 0 or δ outside (0, 1).
    """
    _check_budget(epsilon, delta)
    if epsilon >= 1:
        raise InvalidInputError("the classic Gaussian bound holds only for epsilon < 1; use the analytic one")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def split_budget(epsilon: float, delta: float, sum_share: float = DEFAULT_SUM_SHARE) -> tuple[Budget, Budget]:
    """(sum budget, count budget): ``sum_share`` of ε and of δ for the sum, the rest for the count.

    Raises:
        InvalidInputError: ``sum_share`` outside (0, 1).
    """
    if not 0 < sum_share < 1:
        raise InvalidInputError(f"sum_share must lie in (0, 1), got {sum_share!r}")
    return (Budget(epsilon * sum_share, delta * sum_share),
            Budget(epsilon * (1.0 - sum_share), delta * (1.0 - sum_share)))


def compose(*budgets: Budget) -> Budget:
    """Basic sequential composition: the ε and the δ of several releases add up."""
    return Budget(sum(b.epsilon for b in budgets), sum(b.delta for b in budgets))


def clip_rows(x: np.ndarray, clip_norm: float = 1.0) -> np.ndarray:
    """Scale every row of ``x`` (N, D) down to L2 norm at most ``clip_norm`` (float64 copy)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(1.0, norms / clip_norm)


@dataclasses.dataclass(frozen=True)
class NoisySumCount:
    """One Gaussian release of a clipped sum and a count.

    Attributes:
        sum: the noisy sum (D,), float64.
        count: the noisy count (a float; see :func:`published_count`).
        sigma_sum / sigma_count: the noise standard deviations used (0 when ε is infinite).
        epsilon / delta: the whole release's budget (both parts together).
        clip_norm: the per-row L2 bound the sum's sensitivity assumes.
    """

    sum: np.ndarray
    count: float
    sigma_sum: float
    sigma_count: float
    epsilon: float
    delta: float
    clip_norm: float

    @property
    def centroid(self) -> np.ndarray:
        """``normalise(noisy sum)`` as float32 (D,), the vector to publish.

        Raises:
            InvalidInputError: the noisy sum is exactly zero.
        """
        norm = float(np.linalg.norm(self.sum))
        if norm == 0.0:
            raise InvalidInputError("the noisy sum is zero; no centroid direction to publish")
        return (self.sum / norm).astype(np.float32)


def noisy_sum_count(
    total: np.ndarray,
    count: float,
    epsilon: float,
    delta: float = DEFAULT_DELTA,
    *,
    clip_norm: float = 1.0,
    sum_share: float = DEFAULT_SUM_SHARE,
    rng: np.random.Generator | int | None = None,
) -> NoisySumCount:
    """Release ``total`` (a sum of rows each already clipped to ``clip_norm``) and ``count``
    with Gaussian noise, (ε, δ)-DP together under add/remove-one neighbours.

    The plain array form, for callers that sum elsewhere (federated aggregation); clipping
    each row before summing is the caller's duty here (:func:`dp_centroid` does it all).
    ``epsilon = inf`` releases both exactly.

    Args:
        rng: a numpy Generator, a seed (tests, benchmarks), or None for fresh OS entropy.

    Raises:
        InvalidInputError: ε ≤ 0, δ outside (0, 1), clip_norm ≤ 0 or sum_share outside (0, 1).
    """
    if not clip_norm > 0:
        raise InvalidInputError(f"clip_norm must be > 0, got {clip_norm!r}")
    total = np.asarray(total, dtype=np.float64)
    if epsilon == math.inf:
        return NoisySumCount(total.copy(), float(count), 0.0, 0.0, math.inf, 0.0, clip_norm)
    _check_budget(epsilon, delta)
    for_sum, for_count = split_budget(epsilon, delta, sum_share)
    sigma_sum = analytic_gaussian_sigma(for_sum.epsilon, for_sum.delta, clip_norm)
    sigma_count = analytic_gaussian_sigma(for_count.epsilon, for_count.delta, 1.0)
    gen = np.random.default_rng(rng)
    noisy = total + gen.normal(0.0, sigma_sum, size=total.shape)
    noisy_count = float(count) + float(gen.normal(0.0, sigma_count))
    return NoisySumCount(noisy, noisy_count, sigma_sum, sigma_count, epsilon, delta, clip_norm)


def dp_centroid(
    embeddings: np.ndarray,
    epsilon: float,
    delta: float = DEFAULT_DELTA,
    *,
    clip_norm: float = 1.0,
    sum_share: float = DEFAULT_SUM_SHARE,
    rng: np.random.Generator | int | None = None,
) -> NoisySumCount:
    """Clip each embedding (N, D) to ``clip_norm``, sum, count and release with Gaussian noise.

    ``result.centroid`` is the unit vector to publish, ``published_count(result.count, floor)``
    the sample count. ``epsilon = inf`` gives the exact normalised mean.

    Raises:
        InvalidInputError: no embeddings, or a bad budget (see :func:`noisy_sum_count`).
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) == 0:
        raise InvalidInputError(f"embeddings must be a non-empty (N, D) array, got shape {x.shape}")
    clipped = clip_rows(x, clip_norm)
    return noisy_sum_count(clipped.sum(axis=0), len(x), epsilon, delta, clip_norm=clip_norm,
                           sum_share=sum_share, rng=rng)


def published_count(noisy_count: float, floor: int) -> int:
    """The sample count to publish from a noisy count: rounded, at least ``floor``."""
    return max(int(floor), round(noisy_count))


def check_min_samples(sample_count: int, floor: int, *, what: str = "the centroid") -> None:
    """Refuse to release a centroid of fewer than ``floor`` samples.

    Raises:
        TooFewSamplesError: ``sample_count < floor``.
    """
    if sample_count < floor:
        raise TooFewSamplesError(
            f"{what} summarises {sample_count} samples; at least {floor} are required before a centroid "
            "may be published"
        )


# -- the spread (manifest schema 2) ---------------------------------------------------------------
#: Share of the owner's (ε, δ) that the spread's histogram gets (the centroid and count the rest).
DEFAULT_SPREAD_SHARE = 0.2
#: Equal histogram bins over [0, 2] (euclidean distances between unit vectors).
DEFAULT_SPREAD_BINS = 32
#: The quantiles a spread publishes (as in :data:`semla.schemas.manifest.SPREAD_QUANTILES`).
_QUANTILES = (0.5, 0.9, 0.99)


@dataclasses.dataclass(frozen=True)
class SpreadRelease:
    """One spread release: the quantiles (q50, q90, q99) and how they were made.

    ``epsilon``/``delta``/``bins``/``sigma`` are None (0 for sigma) for the exact quantiles.
    """

    quantiles: tuple[float, float, float]
    count: int
    epsilon: float | None = None
    delta: float | None = None
    bins: int | None = None
    sigma: float = 0.0

    def manifest_block(self) -> dict:
        """The manifest's ``spread`` object (schema 2)."""
        q50, q90, q99 = (min(2.0, max(0.0, float(q))) for q in self.quantiles)
        block = {"distance": "euclidean", "q50": q50, "q90": max(q50, q90), "q99": max(q50, q90, q99),
                 "count": int(self.count), "mechanism": "none", "epsilon": None, "delta": None, "bins": None}
        if self.epsilon is not None:
            block.update(mechanism="gaussian-histogram", epsilon=float(self.epsilon), delta=float(self.delta),
                         bins=int(self.bins))
        return block


def split_for_spread(epsilon: float, delta: float, spread_share: float = DEFAULT_SPREAD_SHARE) -> tuple[Budget, Budget]:
    """(centroid + count budget, spread budget) of an owner's (ε, δ); they compose back to it.

    Raises:
        InvalidInputError: ``spread_share`` outside (0, 1) or a bad budget.
    """
    _check_budget(epsilon, delta)
    if not 0 < spread_share < 1:
        raise InvalidInputError(f"spread_share must lie in (0, 1), got {spread_share!r}")
    return (Budget(epsilon * (1.0 - spread_share), delta * (1.0 - spread_share)),
            Budget(epsilon * spread_share, delta * spread_share))


def _check_distances(distances: np.ndarray) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64).ravel()
    if len(d) == 0 or not np.isfinite(d).all():
        raise InvalidInputError("the spread needs at least one finite distance")
    return np.clip(d, 0.0, 2.0)


def exact_spread(distances: np.ndarray) -> SpreadRelease:
    """The exact quantiles 0.5/0.9/0.99 of the distances (no DP)."""
    d = _check_distances(distances)
    q = np.quantile(d, _QUANTILES)
    return SpreadRelease((float(q[0]), float(q[1]), float(q[2])), count=len(d))


def histogram_quantiles(counts: np.ndarray, upper: float = 2.0) -> tuple[float, float, float]:
    """Quantiles 0.5/0.9/0.99 of a (noisy) histogram of equal bins over [0, upper].

    Negative bins count as 0; the quantile is interpolated linearly inside its bin. A histogram
    with nothing left (all bins <= 0) is read as uniform.
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    if c.sum() <= 0:
        c = np.ones_like(c)
    edges = np.linspace(0.0, upper, len(c) + 1)
    cum = np.concatenate([[0.0], np.cumsum(c)]) / c.sum()
    out = []
    for q in _QUANTILES:
        i = int(np.searchsorted(cum, q, side="left"))  # cum[i-1] < q <= cum[i]
        i = min(max(i, 1), len(c))
        lo, hi = cum[i - 1], cum[i]
        frac = 0.0 if hi <= lo else (q - lo) / (hi - lo)
        out.append(float(edges[i - 1] + frac * (edges[i] - edges[i - 1])))
    return out[0], out[1], out[2]


def dp_spread(
    distances: np.ndarray,
    epsilon: float,
    delta: float,
    *,
    count: int,
    bins: int = DEFAULT_SPREAD_BINS,
    rng: np.random.Generator | int | None = None,
) -> SpreadRelease:
    """Quantiles of a Gaussian-noised histogram of the distances, (ε, δ)-DP (add/remove one image).

    Args:
        distances: each training image's distance to the published centroid, in [0, 2].
        count: the published (already noised) sample count, recorded with the spread.
        rng: a numpy Generator, a seed, or None for fresh OS entropy.

    Raises:
        InvalidInputError: no distances, a bad budget or bins < 1.
    """
    d = _check_distances(distances)
    _check_budget(epsilon, delta)
    if bins < 1:
        raise InvalidInputError(f"bins must be >= 1, got {bins}")
    hist, _ = np.histogram(d, bins=bins, range=(0.0, 2.0))
    sigma = analytic_gaussian_sigma(epsilon, delta, 1.0)
    noisy = hist + np.random.default_rng(rng).normal(0.0, sigma, size=bins)
    return SpreadRelease(histogram_quantiles(noisy), count=max(1, int(count)), epsilon=float(epsilon),
                         delta=float(delta), bins=int(bins), sigma=sigma)
