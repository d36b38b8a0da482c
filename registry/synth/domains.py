"""The built-in scenes, shifts and domains, registered on import, and the benchmark's 20 domains."""

from __future__ import annotations

import zlib

from semla.registry.synth.registry import (
    Domain, Scene, Shift, get_domain, register_domain, register_scene, register_shift,
)
from semla.registry.synth.scenes import (
    FIELDS_CLASSES, HARBOUR_CLASSES, INDOOR_CLASSES, render_fields, render_harbour, render_indoor,
)
from semla.registry.synth.shifts import (
    _shift_bloom,
    _shift_blur,
    _shift_cast,
    _shift_dark,
    _shift_dusk,
    _shift_fog,
    _shift_haze,
    _shift_lowres,
    _shift_night,
    _shift_noise,
    _shift_none,
    _shift_rain,
    _shift_sepia,
    _shift_snow,
    _shift_tungsten,
)
from semla.registry.synth.street import STREET_CLASSES, render_street



# --------------------------------------------------------------------------------------
# Built-in registrations
# --------------------------------------------------------------------------------------

register_scene(Scene("street", STREET_CLASSES, render_street))

register_shift(Shift("none", "identity: no appearance change", _shift_none))
register_shift(Shift("fog", "heavy fog: contrast lost toward light grey, denser with height",
                     _shift_fog))
register_shift(Shift("night", "night: dark blue-tinted, sensor noise, glowing lamps/headlights",
                     _shift_night))
register_shift(Shift("rain", "rain: dark grey-blue cast, slight blur, diagonal streaks",
                     _shift_rain))
register_shift(Shift("snow", "snowfall: bright, desaturated, many white flakes", _shift_snow))
register_shift(Shift("sepia", "sepia photo: strong sepia colour matrix, low contrast",
                     _shift_sepia))

register_shift(Shift("blur", "motion blur: a camera panning during the exposure", _shift_blur))
register_shift(Shift("noise", "sensor noise: strong grain, colour speckle and row banding",
                     _shift_noise))
register_shift(Shift("lowres", "low resolution: 3-4.5x fewer pixels per side, shown blocky",
                     _shift_lowres))
register_shift(Shift("cast", "colour cast: green-teal white balance of fluorescent light",
                     _shift_cast))
register_shift(Shift("tungsten", "tungsten light: warm orange cast, brighter in the middle",
                     _shift_tungsten))
register_shift(Shift("dark", "dim light: underexposed, crushed shadows, no lamps", _shift_dark))
register_shift(Shift("dusk", "dusk: dim warm-pink light, orange glow low in the sky", _shift_dusk))
register_shift(Shift("bloom", "scattering air: wide halos around lamps, a light veil", _shift_bloom))
register_shift(Shift("haze", "summer haze: warm-white veil, thicker toward the horizon",
                     _shift_haze))

register_domain(Domain("clear", "street", ("none",), "street scenes on a clear day"))
register_domain(Domain("fog", "street", ("fog",), "the same streets in heavy fog"))
register_domain(Domain("night", "street", ("night",), "the same streets at night, lit by lamps"))
register_domain(Domain("rain", "street", ("rain",), "the same streets in heavy rain"))
register_domain(Domain("snow", "street", ("snow",), "the same streets during snowfall"))
register_domain(Domain("sepia", "street", ("sepia",), "the same streets as old sepia photos"))

register_scene(Scene("indoor", INDOOR_CLASSES, render_indoor))
register_scene(Scene("harbour", HARBOUR_CLASSES, render_harbour))
register_scene(Scene("fields", FIELDS_CLASSES, render_fields))

# street: weather x time of day, and camera shifts
register_domain(Domain("fog_night", "street", ("fog", "night", "bloom"), "streets on a foggy night"))
register_domain(Domain("rain_night", "street", ("night", "rain"), "streets on a rainy night"))
register_domain(Domain("snow_night", "street", ("snow", "night"), "streets on a snowy night"))
register_domain(Domain("blur", "street", ("blur",), "streets seen by a panning camera"))
register_domain(Domain("noise", "street", ("noise",), "streets seen by a noisy sensor"))
register_domain(Domain("lowres", "street", ("lowres",), "streets seen by a low-resolution camera"))
register_domain(Domain("cast", "street", ("cast",), "streets with a green-teal colour cast"))
# the clean source domains of the other scenes (the base model trains on these)
register_domain(Domain("indoor", "indoor", ("none",), "rooms in even light"))
register_domain(Domain("harbour", "harbour", ("none",), "harbours on a clear day"))
register_domain(Domain("fields", "fields", ("none",), "farmland on a clear day"))
# the other scenes under their own shifts
register_domain(Domain("indoor_dim", "indoor", ("dark", "noise"), "dim rooms seen by a noisy sensor"))
register_domain(Domain("indoor_warm", "indoor", ("tungsten",), "rooms lit by tungsten lamps"))
register_domain(Domain("indoor_blur", "indoor", ("blur",), "rooms seen by a panning camera"))
register_domain(Domain("harbour_fog", "harbour", ("fog",), "harbours in heavy fog"))
register_domain(Domain("harbour_dusk", "harbour", ("dusk",), "harbours at dusk"))
register_domain(Domain("harbour_rain", "harbour", ("rain",), "harbours in heavy rain"))
register_domain(Domain("fields_snow", "fields", ("snow",), "farmland during snowfall"))
register_domain(Domain("fields_haze", "fields", ("haze",), "farmland in summer haze"))

BENCHMARK_DOMAINS: tuple[str, ...] = (
    # 8 street domains: weather x time of day
    "clear", "night", "fog", "rain", "snow", "fog_night", "rain_night", "snow_night",
    # 4 street domains: camera shifts
    "blur", "noise", "lowres", "cast",
    # 8 domains with other layouts and class lists
    "indoor_dim", "indoor_warm", "indoor_blur", "harbour_fog", "harbour_dusk", "harbour_rain",
    "fields_snow", "fields_haze",
)


def benchmark_domains() -> list[str]:
    """The 20 benchmark domains in their fixed order.

    Built like the SemLA benchmark, whose 20 domains come from 10 datasets: 12 street
    domains (weather x time of day, camera shifts) and 8 with other layouts and class lists.
    The clean source domains of the other scenes are not among them; clear street is, as
    Cityscapes is in the paper.
    """
    return list(BENCHMARK_DOMAINS)


def split_seeds(domain: str) -> tuple[int, int]:
    """``(train_seed, test_seed)`` of a domain: distinct, and fixed by its name alone.

    Every domain draws its own layouts (two domains of one scene never share images) and its
    test set never overlaps its training set.

    Raises:
        UnknownNameError: Unknown domain.
    """
    base = 2 * zlib.crc32(get_domain(domain).name.encode("utf-8"))
    return base, base + 1
