"""Deterministic synthetic segmentation data: four scene types in many appearance domains.

The data trains a tiny CLIP-like segmenter and one LoRA adapter per domain, so it has to
be cheap (numpy + Pillow only), fully deterministic and structured so that the *same*
scene can be seen under different conditions.

Why three registries
--------------------
A *domain* is a scene layout seen through an ordered chain of appearance *shifts*:

* :class:`Scene` owns the geometry and the class list (what is where, and the mask).
* :class:`Shift` owns the appearance change (fog, night, ...). Shifts never touch the mask.
* :class:`Domain` only names a scene plus a tuple of shift names.

Keeping the three apart means new scene types and new shifts are added with one
``register_*`` call each and compose freely: ``fog_night`` is just
``Domain("fog_night", "street", ("fog", "night"), ...)``. The street scene lives here; the
indoor, harbour and fields scenes in ``scenes.py``, the drawing primitives they
share in ``drawing.py``.

The benchmark
-------------
:func:`benchmark_domains` lists 20 domains built like the SemLA benchmark's (whose 20 come
from 10 datasets): street scenes under weather x time of day and camera shifts, and rooms,
harbours and farmland under their own shifts. Class lists overlap between scenes where the
same thing appears. Each scene also has a clean domain (shift ``none``): the base model's
source set. :func:`split_seeds` gives every domain its own train and test seeds.

Determinism
-----------
The layout RNG is derived from ``(seed, index)`` only and each shift's RNG from
``(seed, index, shift name)``. Hence the same ``(seed, index)`` yields the identical mask in
every domain of a scene; only the appearance differs.

Modules: :mod:`.registry` (the three registries), :mod:`.drawing` (primitives), :mod:`.street`
and :mod:`.scenes` (scene renderers), :mod:`.shifts`, :mod:`.domains` (the built-in
registrations and the benchmark's domains) and :mod:`.writer` (render, write, contact sheets).
"""

from semla.registry.synth.domains import BENCHMARK_DOMAINS, benchmark_domains, split_seeds
from semla.registry.synth.registry import (
    DOMAINS,
    MIN_SIZE,
    SCENES,
    SHIFTS,
    Domain,
    Scene,
    Shift,
    get_domain,
    get_scene,
    get_shift,
    list_domains,
    list_scenes,
    list_shifts,
    register_domain,
    register_scene,
    register_shift,
)
from semla.registry.synth.scenes import FIELDS_CLASSES, HARBOUR_CLASSES, INDOOR_CLASSES
from semla.registry.synth.street import STREET_CLASSES
from semla.registry.synth.writer import contact_sheet, main, render, write_dataset

__all__ = [
    "Scene",
    "Shift",
    "Domain",
    "SCENES",
    "SHIFTS",
    "DOMAINS",
    "MIN_SIZE",
    "STREET_CLASSES",
    "INDOOR_CLASSES",
    "HARBOUR_CLASSES",
    "FIELDS_CLASSES",
    "BENCHMARK_DOMAINS",
    "register_scene",
    "register_shift",
    "register_domain",
    "list_scenes",
    "list_shifts",
    "list_domains",
    "get_scene",
    "get_shift",
    "get_domain",
    "render",
    "write_dataset",
    "benchmark_domains",
    "split_seeds",
    "contact_sheet",
    "main",
]
