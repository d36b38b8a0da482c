"""The three registries of the synthetic data: scenes, shifts and domains (see :mod:`semla.registry.synth`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from semla.registry.names import Registry
from semla.schemas.errors import InvalidInputError


RenderFn = Callable[[np.random.Generator, int], "tuple[np.ndarray, np.ndarray]"]
ShiftFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]

MIN_SIZE = 16


# --------------------------------------------------------------------------------------
# Registry types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A scene layout generator.

    Attributes:
        name: Registry key.
        classes: Class names; value ``i`` in a mask means ``classes[i]``.
        render: ``(rng, size) -> (rgb, mask)`` with ``rgb`` float32 ``(size, size, 3)`` in
            ``[0, 1]`` and ``mask`` uint8 ``(size, size)`` with values ``< len(classes)``.
    """

    name: str
    classes: tuple[str, ...]
    render: RenderFn = field(repr=False, compare=False)


@dataclass(frozen=True)
class Shift:
    """An appearance shift; it changes pixels only, never the mask.

    Attributes:
        name: Registry key.
        description: One-line human description.
        apply: ``(rgb, rng) -> rgb`` on float32 ``(H, W, 3)`` images in ``[0, 1]``.
    """

    name: str
    description: str
    apply: ShiftFn = field(repr=False, compare=False)


@dataclass(frozen=True)
class Domain:
    """A named scene seen through an ordered chain of shifts.

    Attributes:
        name: Registry key.
        scene: Name of a registered :class:`Scene`.
        shifts: Names of registered :class:`Shift` objects, applied in order.
        description: One-line human description.
    """

    name: str
    scene: str
    shifts: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if isinstance(self.shifts, str):
            object.__setattr__(self, "shifts", (self.shifts,))
        else:
            object.__setattr__(self, "shifts", tuple(self.shifts))


SCENES: Registry[Scene] = Registry("scene")
SHIFTS: Registry[Shift] = Registry("shift")
DOMAINS: Registry[Domain] = Registry("domain")


def register_scene(scene: Scene) -> Scene:
    """Add a scene to :data:`SCENES`.

    Args:
        scene: The scene to register.

    Returns:
        The same scene (so the call can be used as an expression).

    Raises:
        InvalidInputError: If the name is taken, or the class list is empty or has duplicates
            or more than 256 entries.
    """
    classes = tuple(scene.classes)
    if not classes or len(set(classes)) != len(classes) or len(classes) > 256:
        raise InvalidInputError(f"scene {scene.name!r}: classes must be 1-256 unique names")
    return SCENES.register(scene.name, scene)


def register_shift(shift: Shift) -> Shift:
    """Add a shift to :data:`SHIFTS`.

    Args:
        shift: The shift to register.

    Returns:
        The same shift.

    Raises:
        InvalidInputError: If the name is taken.
    """
    return SHIFTS.register(shift.name, shift)


def register_domain(domain: Domain) -> Domain:
    """Add a domain to :data:`DOMAINS`; its scene and shifts must already be registered.

    Args:
        domain: The domain to register.

    Returns:
        The same domain.

    Raises:
        InvalidInputError: If the name is taken or it refers to an unknown scene or shift.
    """
    if domain.scene not in SCENES:
        raise InvalidInputError(f"domain {domain.name!r}: unknown scene {domain.scene!r}")
    missing = [s for s in domain.shifts if s not in SHIFTS]
    if missing:
        raise InvalidInputError(f"domain {domain.name!r}: unknown shift(s) {missing}")
    return DOMAINS.register(domain.name, domain)


def list_scenes() -> list[str]:
    """Return the sorted names of registered scenes."""
    return SCENES.names()


def list_shifts() -> list[str]:
    """Return the sorted names of registered shifts."""
    return SHIFTS.names()


def list_domains() -> list[str]:
    """Return the sorted names of registered domains."""
    return DOMAINS.names()


def get_scene(name: str) -> Scene:
    """Return a registered scene.

    Raises:
        UnknownNameError: If unknown; the message lists the valid names.
    """
    return SCENES.lookup(name)


def get_shift(name: str) -> Shift:
    """Return a registered shift.

    Raises:
        UnknownNameError: If unknown; the message lists the valid names.
    """
    return SHIFTS.lookup(name)


def get_domain(name: str) -> Domain:
    """Return a registered domain.

    Raises:
        UnknownNameError: If unknown; the message lists the valid names.
    """
    return DOMAINS.lookup(name)
