"""Training settings, without torch: one definition of the defaults for central and federated training.

:class:`LoraSettings` holds what every way of training an adapter shares (LoRA rank and alpha,
optimiser, seed, the published version, the sample floor, the domain). :class:`TrainConfig`
adds central training's own settings; :class:`semla.client.federated.FederatedConfig` adds the
federation's. Command lines can build and check a config before importing torch, so a bad
setting is refused in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import math

from semla.registry import privacy
from semla.schemas.errors import InvalidInputError

__all__ = ["LoraSettings", "TrainConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """What central and federated training share; subclasses add theirs and call :meth:`_refuse_bad`."""

    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    version: int = 1
    min_samples: int = privacy.DEFAULT_MIN_SAMPLES
    domain: str | None = None

    def _refuse_bad(self, kind: str, checks: dict[str, bool], hint: str) -> None:
        """Raise one :class:`InvalidInputError` naming every shared or ``checks`` setting that fails."""
        shared = {
            "rank": self.rank >= 1, "alpha": self.alpha > 0, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
            "version": self.version >= 1, "min_samples": self.min_samples >= 1,
        }
        bad = [k for k, ok in {**checks, **shared}.items() if not ok]
        if bad:
            raise InvalidInputError(f"invalid {kind} setting(s): {', '.join(bad)} ({hint})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(LoraSettings):
    """Hyper-parameters of one adapter; the defaults train semla-tiny in well under a minute on 2 cores."""

    steps: int = 300
    centroids: int = 1
    #: Gaussian DP on the centroid and sample count: None publishes them exactly.
    dp_epsilon: float | None = None
    dp_delta: float = privacy.DEFAULT_DELTA
    #: Seed of the DP noise only (tests); None draws fresh OS entropy. Never published.
    dp_seed: int | None = None

    def __post_init__(self) -> None:
        self._refuse_bad("training", {
            "steps": self.steps >= 1, "centroids": 1 <= self.centroids <= 8,
            "dp_epsilon": self.dp_epsilon is None or 0 < self.dp_epsilon < math.inf,
            "dp_delta": 0 < self.dp_delta < 1,
        }, "centroids must be 1..8, dp_epsilon > 0 and finite, dp_delta in (0, 1)")
        if self.dp_epsilon is not None and self.centroids != 1:
            raise InvalidInputError("DP applies to a single centroid (the noised mean); k-means centroids "
                                    "cannot be released with DP here: use centroids=1 or no dp_epsilon")
