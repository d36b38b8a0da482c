"""Federated LoRA training without pooling images (DESIGN §5, §7): the math, free of Flower.

Every owner and the coordinator run these functions; :mod:`semla.client.flower_app` only moves
their inputs and outputs over Flower, and :func:`train_federated` runs the same rounds in one
process (benchmarks, tests).

One round, with θ the global LoRA tensors (round 1: :func:`initial_lora`, one seeded init that
every owner shares):

* owner i trains θᵢ = θ + Δᵢ with ``local_steps`` AdamW steps on its own images
  (:func:`local_update`) and sends one :class:`Contribution`: ``wᵢ·Δᵢ`` per LoRA tensor, ``wᵢ``,
  the sum of its frozen-base unit embeddings and its image count ``nᵢ``. Never an image, an
  individual embedding, or anything else;
* the coordinator sums the contributions (in the clear, or masked by SecAgg+ so that only the
  sum is ever visible) and sets θ ← θ + Σ wᵢΔᵢ / Σ wᵢ (:func:`aggregate`). With ``wᵢ = nᵢ`` this
  is FedAvg weighted by sample count over A and B separately, which is valid here and nowhere
  else: all owners start each round from the same θ and move little in one round (DESIGN §5);
* the retrieval centroid is ``normalise(Σ sums / Σ counts)`` (:func:`centroid_from`), exactly
  the normalised mean of the pooled embeddings.

Differential privacy on the updates (:class:`UpdateDP`, optional): each owner clips its Δᵢ to
L2 norm ``clip_norm`` C over all its LoRA tensors together and weighs it ``wᵢ = 1`` (a
sample-count weight would scale one owner's influence beyond C); Gaussian noise
N(0, (σ·C)²) per coordinate, σ = ``noise_multiplier``, is added to the sum. Without secure
aggregation the coordinator adds it (central DP) and also clips every update it receives. With
secure aggregation the coordinator never sees an update to clip or noise, so each of the n
participants of a round adds N(0, (σ·C)²/n) to its own clipped update (distributed noise) and
the sum carries the full noise; the calibration assumes all n answer, so a dropout in a
DP + secure round aborts it.

Accountant (:func:`gdp_epsilon`): the unit of privacy is one owner (adding or removing one
owner's whole update changes the noised sum by at most C). R rounds of the Gaussian mechanism
with noise multiplier σ compose exactly into one Gaussian mechanism with noise multiplier
σ/√R (Gaussian differential privacy, μ = √R/σ; Dong, Roth & Su 2022, Cor. 3.3), whose tight
(ε, δ) curve is that of Balle & Wang 2018 (:func:`semla.registry.privacy.gaussian_delta`). The
sampling rate is taken as 1: no amplification by subsampling is claimed, which is an upper
bound whoever takes part in each round. Only the LoRA weights are covered: the centroid sum
and the sample count are aggregated exactly (secure aggregation hides each owner's own), and
the published centroid has the manifest's usual privacy block.

Torch is imported only by the functions that train (:func:`initial_lora`, :func:`load_owner`,
:func:`local_update`, :func:`build_federated_bundle`, :func:`train_federated`): the aggregation
math is numpy, so the SecAgg+ key-exchange stages of a round start without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semla.registry import privacy
from semla.registry.config import LoraSettings
from semla.schemas.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

    from semla.registry.model import DenseClip
    from semla.schemas import Manifest

__all__ = [
    "ACCOUNTANT",
    "Contribution",
    "FederatedConfig",
    "OwnerData",
    "UpdateDP",
    "aggregate",
    "build_federated_bundle",
    "centroid_from",
    "clip_update",
    "contribute",
    "gdp_epsilon",
    "initial_lora",
    "load_owner",
    "local_seed",
    "local_update",
    "participants_per_round",
    "sum_contributions",
    "train_federated",
    "update_norm",
]

#: Name recorded in the manifest's ``update_privacy.accountant``.
ACCOUNTANT = "gdp-gaussian-composition-rate-1"

Tensors = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class UpdateDP:
    """Gaussian DP on the LoRA updates: clip each owner's update to ``clip_norm`` (L2 over all its
    tensors), add noise of std ``noise_multiplier * clip_norm`` to the sum; report (ε, ``delta``)."""

    clip_norm: float
    noise_multiplier: float
    delta: float = privacy.DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise InvalidInputError(f"DP clip norm must be > 0 and finite, got {self.clip_norm!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise InvalidInputError(f"DP noise multiplier must be >= 0 and finite, got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise InvalidInputError(f"DP delta must lie in (0, 1), got {self.delta!r}")

    @property
    def noise_std(self) -> float:
        """Std of the noise on the aggregated sum, per coordinate."""
        return self.noise_multiplier * self.clip_norm

    def record(self, rounds: int) -> dict:
        """The manifest's ``training.federated.update_privacy`` block after ``rounds`` rounds."""
        eps = gdp_epsilon(self.noise_multiplier, rounds, self.delta) if self.noise_multiplier > 0 else None
        return {"clip_norm": float(self.clip_norm), "noise_multiplier": float(self.noise_multiplier),
                "epsilon": eps, "delta": float(self.delta), "accountant": ACCOUNTANT}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FederatedConfig(LoraSettings):
    """Settings of one federated training; the coordinator sends them to every owner.

    ``local_steps`` optimiser steps per owner per round; ``rounds × local_steps`` steps of the
    global model in all (the manifest's ``training.steps``). Each round ``fraction`` of the
    connected owners take part, never fewer than ``min_clients``; the last round asks every
    connected owner, so the published centroid and sample count cover all of them. The LoRA,
    optimiser and publishing settings and their defaults are central training's
    (:class:`semla.registry.config.LoraSettings`).
    """

    rounds: int = 3
    local_steps: int = 20
    min_clients: int = 2
    fraction: float = 1.0
    secure_aggregation: bool = False
    dp: UpdateDP | None = None

    def __post_init__(self) -> None:
        self._refuse_bad("federated", {
            "rounds": self.rounds >= 1, "local_steps": self.local_steps >= 1, "min_clients": self.min_clients >= 1,
            "fraction": 0 < self.fraction <= 1,
        }, "fraction must lie in (0, 1]")
        if self.secure_aggregation and self.min_clients < 2:
            raise InvalidInputError("secure aggregation needs at least 2 owners per round (min_clients >= 2)")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps


# -- one owner --------------------------------------------------------------------------------------
@dataclasses.dataclass
class OwnerData:
    """One owner's training tensors and the aggregate of its retrieval embeddings (all private)."""

    pixels: torch.Tensor  # (N, 3, S, S)
    masks: torch.Tensor  # (N, S, S)
    text: torch.Tensor  # (C, E) class-name embeddings
    classes: list[str]
    centroid_sum: np.ndarray  # (D,) sum of the frozen-base unit embeddings, float64

    @property
    def count(self) -> int:
        return len(self.pixels)


def load_owner(
    model: DenseClip, data_dir: Path, *, classes: Sequence[str] | None = None,
    min_samples: int = privacy.DEFAULT_MIN_SAMPLES,
) -> OwnerData:
    """Load and check one owner's folder, embed its images with the frozen base.

    Args:
        classes: the federation's vocabulary; the owner's ``classes.txt`` must list exactly
            these names in this order (the masks hold indices into it).

    Raises:
        InvalidInputError: bad folder, fewer than ``min_samples`` images, other classes.
    """
    import torch

    from semla.registry.data import load_dataset
    from semla.registry.train import embed_images, prepare_tensors

    data = load_dataset(Path(data_dir), min_samples=min_samples)
    if classes is not None and list(classes) != data.classes:
        raise InvalidInputError(
            f"{data_dir}/classes.txt lists {', '.join(data.classes)}; this federation trains on "
            f"{', '.join(classes)} (same names, same order)"
        )
    embeddings = embed_images(model, data.images)  # frozen base, no LoRA
    with torch.no_grad():
        text = model.encode_classes(data.classes)
    pixels, masks = prepare_tensors(model, data)
    return OwnerData(pixels, masks, text, data.classes, embeddings.double().sum(0).numpy())


def initial_lora(model: DenseClip, rank: int, alpha: float, seed: int) -> tuple[Tensors, dict]:
    """The shared starting point of every owner: peft's LoRA init under ``torch.manual_seed(seed)``
    (A random, B zero) as float32 arrays, and the adapter config. The global RNG is left as it was.

    The same seed gives :func:`~semla.registry.train.train_adapter` the same init.
    """
    import peft
    import torch

    from semla.registry.train import adapter_config_json, lora_config, lora_state

    config = lora_config(model, rank, alpha)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model.clip, config)
    try:
        return {k: v.numpy() for k, v in lora_state(peft_model).items()}, adapter_config_json(model, config)
    finally:
        peft_model.unload()
        model.eval()


def local_seed(seed: int, round_: int, owner: int | str) -> int:
    """Batch-order seed of one owner in one round (not a secret: it orders batches and flips)."""
    return zlib.crc32(f"{seed}:{round_}:{owner}".encode())


def local_update(
    model: DenseClip, owner: OwnerData, global_state: Mapping[str, Any], config: FederatedConfig, *,
    round_: int, seed: int,
) -> tuple[Tensors, int]:
    """Start from the global LoRA tensors, run ``config.local_steps`` steps on the owner's data.

    The learning rate follows the cosine of ``config.total_steps`` steps, entered where round
    ``round_`` (1-based) begins. The base model is left unchanged.

    Returns:
        The updated LoRA tensors (peft names, float32 arrays) and the owner's sample count.
    """
    import peft
    import torch

    from semla.registry.train import fit_lora, lora_config, lora_state

    peft_model = peft.get_peft_model(model.clip, lora_config(model, config.rank, config.alpha))
    try:
        start = {k: torch.as_tensor(v).to(model.device) for k, v in global_state.items()}
        result = peft.set_peft_model_state_dict(peft_model, start)
        if result.unexpected_keys:
            raise InvalidInputError(f"global LoRA tensors hold unexpected names: {sorted(result.unexpected_keys)[:3]}")
        fit_lora(model, peft_model, owner.pixels, owner.masks, owner.text, steps=config.local_steps, lr=config.lr,
                 batch_size=config.batch_size, seed=seed, start=(round_ - 1) * config.local_steps,
                 total=config.total_steps)
        return {k: v.numpy() for k, v in lora_state(peft_model).items()}, owner.count
    finally:
        peft_model.unload()
        model.eval()


# -- what an owner sends, and what the coordinator does with the sum ---------------------------------
@dataclasses.dataclass
class Contribution:
    """What one owner sends in a round, or the sum over several owners.

    Attributes:
        lora: LoRA tensor name → ``w·Δ`` (the weighted change of that tensor), float64.
        weight: ``w`` (the sample count, or 1 with DP).
        centroid_sum: sum of the owner's frozen-base unit embeddings (D,).
        count: number of images.
    """

    lora: Tensors
    weight: float
    centroid_sum: np.ndarray
    count: float


def _as_numpy(state: Mapping[str, Any]) -> Tensors:
    """float64 copies of arrays or tensors."""
    return {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, np.float64) for k, v in state.items()}


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of an update over all its tensors together."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))


def clip_update(delta: Mapping[str, np.ndarray], clip_norm: float) -> Tensors:
    """Scale an update down to L2 norm at most ``clip_norm`` (over all tensors together)."""
    scale = min(1.0, clip_norm / max(update_norm(delta), 1e-300))
    return {k: np.asarray(v, np.float64) * scale for k, v in delta.items()}


def contribute(
    global_state: Mapping[str, Any],
    local_state: Mapping[str, Any],
    centroid_sum: np.ndarray,
    count: int,
    *,
    dp: UpdateDP | None = None,
    noise_share: int | None = None,
    rng: np.random.Generator | None = None,
) -> Contribution:
    """One owner's contribution to a round.

    Args:
        dp: clip the update to ``dp.clip_norm`` and weigh it 1; otherwise weigh it ``count``.
        noise_share: with DP under secure aggregation, the number n of participants of the
            round: add this owner's share N(0, (σC)²/n) of the noise. None: the coordinator adds it.
        rng: noise source; default fresh OS entropy (never a published seed).
    """
    glob, local = _as_numpy(global_state), _as_numpy(local_state)
    if set(glob) != set(local):
        raise InvalidInputError("local and global LoRA tensors have different names")
    delta = {k: local[k] - glob[k] for k in sorted(glob)}
    if dp is None:
        return Contribution({k: count * v for k, v in delta.items()}, float(count),
                            np.asarray(centroid_sum, np.float64), float(count))
    delta = clip_update(delta, dp.clip_norm)
    if noise_share is not None and dp.noise_multiplier > 0:
        gen = np.random.default_rng(rng)
        std = dp.noise_std / math.sqrt(noise_share)
        delta = {k: v + gen.normal(0.0, std, size=v.shape) for k, v in delta.items()}
    return Contribution(delta, 1.0, np.asarray(centroid_sum, np.float64), float(count))


def sum_contributions(parts: Sequence[Contribution], *, clip_norm: float | None = None) -> Contribution:
    """Field-wise sum (what the coordinator needs, and all that secure aggregation reveals).

    Args:
        clip_norm: clip every part's update to this norm first: a coordinator that sees the
            individual updates (no secure aggregation) enforces the DP bound itself.
    """
    if not parts:
        raise InvalidInputError("no contribution to aggregate")
    names = sorted(parts[0].lora)
    if any(sorted(p.lora) != names for p in parts):
        raise InvalidInputError("contributions carry different LoRA tensors")
    loras = [p.lora if clip_norm is None else clip_update(p.lora, clip_norm) for p in parts]
    return Contribution(
        {k: np.sum([lora[k] for lora in loras], axis=0) for k in names},
        float(sum(p.weight for p in parts)),
        np.sum([p.centroid_sum for p in parts], axis=0),
        float(sum(p.count for p in parts)),
    )


def aggregate(
    global_state: Mapping[str, Any],
    total: Contribution,
    *,
    dp: UpdateDP | None = None,
    add_noise: bool = False,
    rng: np.random.Generator | None = None,
) -> Tensors:
    """The next global LoRA tensors (float32 arrays): θ + (Σ wΔ + noise) / Σ w.

    Args:
        add_noise: with ``dp``, add N(0, (σC)²) to the sum here (central DP); False when the
            owners added their shares already (secure aggregation).
    """
    if total.weight <= 0:
        raise InvalidInputError("the aggregated weight is zero")
    glob = _as_numpy(global_state)
    lora = dict(total.lora)
    if dp is not None and add_noise and dp.noise_multiplier > 0:
        gen = np.random.default_rng(rng)
        lora = {k: v + gen.normal(0.0, dp.noise_std, size=v.shape) for k, v in lora.items()}
    return {k: (glob[k] + lora[k] / total.weight).astype(np.float32) for k in sorted(glob)}


def centroid_from(total: Contribution) -> np.ndarray:
    """The retrieval centroid, (1, D): the normalised mean of every owner's embeddings."""
    if total.count <= 0:
        raise InvalidInputError("no embedding was aggregated")
    mean = np.asarray(total.centroid_sum, np.float64) / total.count
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        raise InvalidInputError("the aggregated embeddings sum to zero; no centroid direction")
    return (mean / norm)[None].astype(np.float32)


def participants_per_round(available: int, config: FederatedConfig, round_: int) -> int:
    """How many of ``available`` owners take part in round ``round_``: ``fraction`` of them,
    at least ``min_clients``; every one in the last round.

    Raises:
        InvalidInputError: fewer than ``min_clients`` owners are available.
    """
    if available < config.min_clients:
        raise InvalidInputError(f"{available} owner(s) available; the federation needs at least {config.min_clients}")
    if round_ >= config.rounds:
        return available
    return min(available, max(config.min_clients, math.ceil(config.fraction * available)))


def gdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` Gaussian mechanisms of noise multiplier σ composed, at ``delta``.

    Their composition is exactly one Gaussian mechanism with noise multiplier σ/√rounds (μ-GDP
    with μ = √rounds/σ); its tight δ(ε) (Balle & Wang 2018) is inverted by bisection, and the
    upper end of the final bracket is returned, so ε is never understated. Sampling rate 1.

    Raises:
        InvalidInputError: σ ≤ 0 (no finite ε), rounds < 1 or δ outside (0, 1).
    """
    if not noise_multiplier > 0:
        raise InvalidInputError("no finite epsilon without noise (noise multiplier 0)")
    if rounds < 1 or not 0 < delta < 1:
        raise InvalidInputError(f"need rounds >= 1 and delta in (0, 1), got {rounds}, {delta}")
    sigma = noise_multiplier / math.sqrt(rounds)
    return privacy.smallest_passing(lambda eps: privacy.gaussian_delta(sigma, eps) <= delta, start=1.0, rel_tol=1e-10)


# -- the result -------------------------------------------------------------------------------------
def build_federated_bundle(
    out: Path,
    *,
    model: DenseClip,
    state: Mapping[str, np.ndarray],
    adapter_config: dict,
    name: str,
    config: FederatedConfig,
    classes: Sequence[str],
    total: Contribution,
    participants: int,
) -> Manifest:
    """Write the federated adapter as an unsigned bundle (same fields as a central one).

    ``training.federated`` records rounds, distinct participants, secure aggregation, local
    steps, min clients and the DP on the updates; ``training.steps`` is rounds × local steps.
    ``total`` is the last round's aggregate (centroid sum and sample count of every owner).

    Raises:
        InvalidInputError: ``out`` exists, or the aggregate is below ``config.min_samples``.
    """
    import torch

    from semla.registry.train import write_adapter

    count = round(total.count)
    federated = {
        "rounds": config.rounds, "participants": participants, "secure_aggregation": config.secure_aggregation,
        "local_steps": config.local_steps, "min_clients": config.min_clients,
        "update_privacy": config.dp.record(config.rounds) if config.dp is not None else None,
    }
    return write_adapter(
        Path(out), model, {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()},
        adapter_config, name=name,
        version=config.version, vocabulary=list(classes), domain=config.domain or name,
        centroids=centroid_from(total), sample_count=count,
        privacy={"mechanism": "none", "min_samples": config.min_samples},
        training={"steps": config.total_steps, "lr": float(config.lr), "batch_size": config.batch_size,
                  "seed": config.seed, "federated": federated},
    )


def train_federated(
    owner_dirs: Sequence[Path],
    out: Path,
    name: str,
    config: FederatedConfig = FederatedConfig(),
    *,
    base: DenseClip | None = None,
    classes: Sequence[str] | None = None,
    rng: np.random.Generator | int | None = None,
    progress: bool = False,
) -> Manifest:
    """Run a whole federated training in one process, no network: every owner's folder is
    read only by its own :func:`local_update`, and only :class:`Contribution` sums reach the
    aggregation, as on Flower's Deployment Engine.

    Args:
        classes: the vocabulary; default the first owner's ``classes.txt``.
        rng: participant sampling and DP noise (a seed for reproducible benchmarks).

    Raises:
        InvalidInputError: bad folders or settings, fewer owners than ``config.min_clients``,
            or ``out`` exists.
    """
    from tqdm.auto import tqdm

    from semla.registry.model import load_base

    out = Path(out)
    if out.exists():
        raise InvalidInputError(f"{out} already exists; choose a new --out")
    model = base if base is not None else load_base()
    owners = []
    for d in owner_dirs:
        owners.append(load_owner(model, d, classes=classes, min_samples=config.min_samples))
        classes = owners[-1].classes
    participants_per_round(len(owners), config, 1)  # enough owners?
    gen = np.random.default_rng(rng)
    state, adapter_config = initial_lora(model, config.rank, config.alpha, config.seed)
    seen: set[int] = set()
    total = None
    for round_ in tqdm(range(1, config.rounds + 1), desc=f"federated {name}", disable=not progress, leave=False):
        k = participants_per_round(len(owners), config, round_)
        chosen = sorted(gen.choice(len(owners), size=k, replace=False).tolist())
        parts = []
        for i in chosen:
            local, n = local_update(model, owners[i], state, config, round_=round_,
                                    seed=local_seed(config.seed, round_, i))
            noise_share = k if config.secure_aggregation else None
            parts.append(contribute(state, local, owners[i].centroid_sum, n, dp=config.dp, noise_share=noise_share,
                                    rng=gen))
        central = config.dp is not None and not config.secure_aggregation
        total = sum_contributions(parts, clip_norm=config.dp.clip_norm if central else None)
        state = aggregate(state, total, dp=config.dp, add_noise=not config.secure_aggregation, rng=gen)
        seen.update(chosen)
    assert total is not None
    return build_federated_bundle(out, model=model, state=state, adapter_config=adapter_config, name=name,
                                  config=config, classes=classes, total=total, participants=len(seen))
