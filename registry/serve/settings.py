"""What a node service is configured with: :class:`ServeSettings` and the request bounds."""

from __future__ import annotations

import dataclasses


from semla.registry.asgi import (
    BodyLimits,
)
from semla.registry.retrieval import (
    DEFAULT_DISTANCE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DISTANCES,
    TEMPERATURE_RANGE,
    temperature_ok,
)
from semla.schemas.errors import InvalidInputError
from semla.registry.weighting import MAX_GUARD_Z, WEIGHTINGS, check_guard_z, list_weightings
from semla.schemas.api import DEFAULT_WEIGHTING


#: Largest decoded image accepted (pixels); larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TOP_K = 64
FORMATS = ("png", "rle")
#: How often an idle worker refreshes the health snapshot (seconds).
HEALTH_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How the service batches, what it accepts and how often it refreshes the index.

    Attributes:
        max_batch: most images in one ``node.segment`` call.
        max_wait_ms: longest a queued image waits for others to join its batch.
        max_upload_bytes: largest request body (all parts together).
        max_images: most images in one request.
        max_queue: most images waiting; beyond it requests get 503 ``busy``.
        refresh_seconds: period of the background ``node.pull()``; 0 disables it.
        top_k, temperature, distance, weighting, guard, guard_z: retrieval defaults when a request
            gives none (temperature None: the weighting scheme's own).
        body_limits: how fast a request body must arrive (slower ones get 408 and are cut off).
        metrics: serve Prometheus metrics at ``/metrics`` (and count requests and batches).
    """

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_images: int = 32
    max_queue: int = 1024
    refresh_seconds: float = 60.0
    top_k: int = DEFAULT_TOP_K
    temperature: float | None = DEFAULT_TEMPERATURE
    distance: str = DEFAULT_DISTANCE
    weighting: str = DEFAULT_WEIGHTING
    guard: bool = False
    guard_z: float | None = None
    body_limits: BodyLimits = BodyLimits()
    metrics: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch", "max_upload_bytes", "max_images", "max_queue"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0 <= self.max_wait_ms <= 10_000:
            problems.append("max_wait_ms must be in [0, 10000]")
        if not self.refresh_seconds >= 0:
            problems.append("refresh_seconds must be >= 0 (0 disables refresh)")
        if not 1 <= self.top_k <= MAX_TOP_K:
            problems.append(f"top_k must be in [1, {MAX_TOP_K}]")
        if not temperature_ok(self.temperature):
            problems.append(f"temperature must lie in {TEMPERATURE_RANGE}")
        if self.distance not in DISTANCES:
            problems.append(f"distance must be one of {', '.join(DISTANCES)}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {', '.join(list_weightings())}")
        if self.guard_z is not None and not guard_z_ok(self.guard_z):
            problems.append(f"guard_z must lie in [0, {MAX_GUARD_Z:g}]")
        if problems:
            raise InvalidInputError("invalid serve settings: " + "; ".join(problems))

def guard_z_ok(value: float) -> bool:
    try:
        check_guard_z(value)
    except InvalidInputError:
        return False
    return True
