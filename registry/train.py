"""Training a LoRA adapter on a data owner's private folder (peft), and its retrieval centroid.

One flat function, :func:`train_adapter`: load and validate the data, embed every image with
the frozen base (no LoRA) for the centroid, train LoRA on the dense head against the text
embeddings of the owner's class names, write an unsigned bundle atomically.

Privacy of the centroid (DESIGN §6): fewer images than ``min_samples`` (default 50) are refused
before anything is computed. With ``dp_epsilon`` set, the centroid and the published sample
count come from :func:`semla.registry.privacy.dp_centroid` (unit-norm clipping, Gaussian noise
on sum and count, analytic calibration) and the manifest's privacy block records mechanism
``gaussian``, ε, δ and the clip norm. The noise seed (``dp_seed``, default fresh OS entropy) is
never the published training seed: whoever knows the seed can subtract the noise.

The manifest (schema 2) also carries the ``spread`` of the training embeddings around their
nearest centroid (:func:`compute_spread`: quantiles 0.5/0.9/0.99 of the distances). Under DP it
is a Gaussian-noised histogram (:func:`semla.registry.privacy.dp_spread`) whose share of the
owner's (ε, δ) is taken from the same budget: the manifest's ``privacy.epsilon`` is the whole
release (centroid, count and spread), which is what the registry's ledger charges.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from semla.registry.bundle import write_bundle
from semla.registry.config import TrainConfig  # re-exported: defined without torch
from semla.registry.data import IGNORE_INDEX, Dataset, load_dataset
from semla.registry import privacy
from semla.registry.model import DenseClip, load_base, lora_target_modules
from semla.schemas import Manifest
from semla.schemas.errors import InvalidInputError

__all__ = [
    "TrainConfig",
    "train_adapter",
    "embed_images",
    "compute_centroids",
    "compute_spread",
    "nearest_centroid_distances",
    "segmentation_loss",
    "batches",
    "prepare_tensors",
    "lora_config",
    "adapter_config_json",
    "lora_state",
    "fit_lora",
    "write_adapter",
]


@torch.no_grad()
def embed_images(model: DenseClip, images: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """Frozen-base retrieval embeddings (B, D), L2-normalised, on the CPU."""
    out = [model.embed(model.pixels(images[i : i + batch_size])).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def compute_centroids(embeddings: torch.Tensor, k: int = 1, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Normalised mean (k = 1) or spherical k-means centroids (k ≤ 8) of unit embeddings: (k, E)."""
    x = F.normalize(embeddings.double(), dim=1)
    if k == 1:
        return F.normalize(x.mean(0, keepdim=True), dim=1).float().numpy()
    if len(x) < k:
        raise InvalidInputError(f"cannot form {k} centroids from {len(x)} images")
    gen = torch.Generator().manual_seed(seed)
    cents = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = (x @ cents.T).argmax(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                cents[j] = F.normalize(members.mean(0), dim=0)
    return cents.float().numpy()


def nearest_centroid_distances(embeddings: torch.Tensor | np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Euclidean distance (N,) of each unit embedding to its nearest centroid (unit vectors)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return np.sqrt(np.clip(2.0 - 2.0 * (x @ c.T).max(axis=1), 0.0, None))


def compute_spread(embeddings: torch.Tensor | np.ndarray, centroids: np.ndarray, *,
                   dp: privacy.Budget | None = None, count: int | None = None,
                   rng: np.random.Generator | int | None = None) -> dict[str, Any]:
    """The manifest's ``spread`` block: quantiles 0.5/0.9/0.99 of the distances of the training
    embeddings to their nearest (published) centroid; with ``dp``, a Gaussian histogram release
    of that budget, recorded with the published ``count``."""
    distances = nearest_centroid_distances(embeddings, centroids)
    if dp is None:
        return privacy.exact_spread(distances).manifest_block()
    return privacy.dp_spread(distances, dp.epsilon, dp.delta, count=count if count is not None else len(distances),
                             rng=rng).manifest_block()


def batches(n: int, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` index batches, reshuffling each epoch, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos : pos + batch_size], gen
        pos += batch_size


def segmentation_loss(model: DenseClip, pixels: torch.Tensor, masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy of the dense head's upsampled logits against class-index masks.

    Pixels marked ``IGNORE_INDEX`` (255) count for nothing; a batch with no labelled pixel at all
    (imported data can have such images) gives a zero loss, not the NaN of an empty mean.
    """
    logits = model(pixels, text, size=masks.shape[-2:])
    if not bool((masks != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def prepare_tensors(model: DenseClip, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels (N, 3, S, S) and class-index masks (N, S, S) at the model's input size."""
    pixels = torch.cat([model.pixels(data.images[i : i + 256]) for i in range(0, len(data), 256)])
    size = (model.image_size, model.image_size)
    masks = torch.stack([
        F.interpolate(torch.from_numpy(m)[None, None].float(), size=size, mode="nearest")[0, 0].long()
        for m in data.masks
    ]).to(model.device)
    return pixels, masks


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_json_safe(v) for v in value]
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def lora_config(model: DenseClip, rank: int, alpha: float) -> peft.LoraConfig:
    """The peft LoRA configuration every adapter uses: every LoRA target of the image encoder."""
    return peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=lora_target_modules(model.clip), lora_dropout=0.0, bias="none"
    )


def adapter_config_json(model: DenseClip, config: peft.LoraConfig) -> dict[str, Any]:
    """``adapter_config.json`` content: the peft config, JSON-safe, target modules in model order."""
    out = _json_safe(config.to_dict())
    out["target_modules"] = lora_target_modules(model.clip)  # peft keeps them as an unordered set
    return out


def lora_state(peft_model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA A/B tensors of a peft model (peft names), detached, contiguous, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in peft.get_peft_model_state_dict(peft_model).items()}


def fit_lora(
    model: DenseClip,
    peft_model: peft.PeftModel,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    text: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    start: int = 0,
    total: int | None = None,
    progress: bool = False,
    desc: str = "train",
) -> None:
    """Run ``steps`` AdamW steps on the LoRA parameters of ``peft_model`` (random horizontal flips).

    The learning rate follows one cosine from ``lr`` to 0 over ``total`` steps (default
    ``steps``), entered at step ``start``: a federated round continues the schedule where the
    previous round stopped. The model is left in eval mode.
    """
    total = steps if total is None else total
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * (start + s) / total)))
    model.train()
    bar = tqdm(batches(len(pixels), min(batch_size, len(pixels)), steps, seed), total=steps, desc=desc,
               unit="step", disable=not progress, leave=False, mininterval=1.0)
    try:
        for idx, gen in bar:
            x, y = pixels[idx], masks[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1).to(y.device), y.flip(-1), y)
            loss = segmentation_loss(model, x, y, text)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        model.eval()


def write_adapter(
    out: Path,
    model: DenseClip,
    state: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    *,
    name: str,
    version: int,
    vocabulary: list[str],
    domain: str,
    centroids: np.ndarray,
    sample_count: int,
    privacy: dict[str, Any],
    training: dict[str, Any],
    spread: dict[str, Any] | None = None,
) -> Manifest:
    """Write LoRA tensors as an unsigned bundle with the manifest fields every adapter carries.

    Args:
        centroids: (k, E) unit vectors in the base model's retrieval space.
        privacy / training: the manifest's privacy and training blocks.
        spread: the ``spread`` block (:func:`compute_spread`): a schema-2 manifest; None writes
            schema 1 (no spread; nodes use the library's default for it).

    Raises:
        InvalidInputError: ``out`` exists, or the fields do not form a valid manifest.
    """
    fields = {
        "schema_version": 1 if spread is None else 2,
        "name": name,
        "version": version,
        "base_model": model.ref.model_dump(mode="json"),
        "target_modules": adapter_config["target_modules"],
        "rank": adapter_config["r"],
        "alpha": float(adapter_config["lora_alpha"]),
        "vocabulary": list(vocabulary),
        "domain": domain,
        "centroids": {
            "embedding_model": model.embedding_model,
            "vectors": [[float(v) for v in row] for row in centroids],
        },
        "sample_count": sample_count,
        "privacy": privacy,
        "training": training,
        "created_at": _utc_now(),
    }
    if spread is not None:
        fields["spread"] = spread
    weights = save_safetensors(state, metadata={"format": "pt"})
    return write_bundle(out, weights=weights, adapter_config=adapter_config, manifest_fields=fields)


def train_adapter(
    data_dir: Path,
    out: Path,
    name: str,
    config: TrainConfig = TrainConfig(),
    *,
    base: DenseClip | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Manifest:
    """Train one LoRA adapter and write it as an unsigned bundle at ``out``.

    Args:
        base: a loaded base model to reuse (it is left unchanged); default: semla-tiny.

    Raises:
        InvalidInputError: bad data folder, bad settings, or ``out`` already exists.
    """
    out = Path(out)
    if out.exists():
        raise InvalidInputError(f"{out} already exists; choose a new --out")
    data = load_dataset(Path(data_dir), min_samples=config.min_samples)
    model = base if base is not None else load_base(device=device)
    domain = config.domain
    if domain is None:
        info = Path(data_dir) / "domain.json"
        domain = json.loads(info.read_text()).get("domain", name) if info.is_file() else name

    torch.manual_seed(config.seed)
    embeddings = embed_images(model, data.images)  # frozen base, before any LoRA exists
    privacy_block: dict[str, Any] = {"mechanism": "none", "min_samples": config.min_samples}
    sample_count = len(data)
    if config.dp_epsilon is None:
        centroids = compute_centroids(embeddings, k=config.centroids, seed=config.seed)
        spread = compute_spread(embeddings, centroids)
    else:
        # one budget for the whole release: the spread's share first, the centroid and count the rest
        for_centroid, for_spread = privacy.split_for_spread(config.dp_epsilon, config.dp_delta)
        rng = np.random.default_rng(config.dp_seed)
        release = privacy.dp_centroid(embeddings.double().numpy(), for_centroid.epsilon, for_centroid.delta, rng=rng)
        centroids = release.centroid[None]  # (1, E)
        sample_count = privacy.published_count(release.count, config.min_samples)
        spread = compute_spread(embeddings, centroids, dp=for_spread, count=sample_count, rng=rng)
        privacy_block.update(mechanism="gaussian", epsilon=float(config.dp_epsilon), delta=float(config.dp_delta),
                             clip_norm=release.clip_norm)
    with torch.no_grad():
        text = model.encode_classes(data.classes)
    pixels, masks = prepare_tensors(model, data)

    lora = lora_config(model, config.rank, config.alpha)
    peft_model = peft.get_peft_model(model.clip, lora)
    try:
        fit_lora(model, peft_model, pixels, masks, text, steps=config.steps, lr=config.lr,
                 batch_size=config.batch_size, seed=config.seed, progress=progress, desc=f"train {name}")
        state = lora_state(peft_model)
    finally:
        peft_model.unload()  # leave the caller's base model exactly as it was
        model.eval()
    return write_adapter(
        out, model, state, adapter_config_json(model, lora), name=name, version=config.version, vocabulary=data.classes,
        domain=domain, centroids=centroids, sample_count=sample_count, privacy=privacy_block, spread=spread,
        training={"steps": config.steps, "lr": float(config.lr), "batch_size": config.batch_size, "seed": config.seed},
    )
