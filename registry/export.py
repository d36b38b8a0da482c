"""``semla-node fuse``: the SemLA adapter for some images, as ONE standard peft LoRA adapter.

The node fuses inside its own forward pass. A consumer with its own stack wants the fused
adapter itself. For fusion weights ``w_i`` (the mean over the images of each image's retrieval
weights, or given by hand) the exported adapter holds exactly

    ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ,   sᵢ = alphaᵢ / rᵢ

per module, as peft's ``cat`` combination does: ``A = [A_1; A_2; …]`` (rows concatenated),
``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]`` (columns concatenated), so adapters of different ranks
fuse exactly. The factors ``wᵢ sᵢ`` are folded into B and ``adapter_config.json`` has
``lora_alpha = r`` (peft's scale alpha / r is 1; where modules differ in total rank,
``rank_pattern`` / ``alpha_pattern`` keep the scale 1 for each). ``manifest.json`` is not a
signed bundle manifest: it says ``"derived": true`` and records each contributing adapter
(name, version, publisher, manifest sha256, rank, alpha) and its weight, and how the weights
were obtained (image count and retrieval settings; never the images or their paths).

Python API::

    node = Node(URL); node.pull()
    weights = retrieval_weights(node, ["a.png", "b.png"])       # [(AdapterSummary, w), ...]
    fuse_adapters(node, weights, "./fused")                    # or {"fog": 0.7, "night@2": 0.3}

Every adapter is verified by the node before its tensors are used (the node's cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semla.registry.cli_common import EXIT_OK, add_node_arguments, add_retrieval_arguments, build_node
from semla.registry._outdir import check_out_dir, write_out_dir
from semla.registry.bundle import sha256_bytes
from semla.registry.pull import find_adapter, parse_ref
from semla.registry.retrieval import (DEFAULT_DISTANCE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_WEIGHTING,
                                      TEMPERATURE_RANGE, temperature_ok)
from semla.registry.weighting import check_guard_z, check_weighting
from semla.schemas import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, AdapterSummary
from semla.schemas.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

    from semla.registry.fusion import LoraAdapter
    from semla.registry.node import Node

__all__ = [
    "EXPORT_FILES",
    "MAX_WEIGHT",
    "FusedExport",
    "retrieval_weights",
    "parse_weights",
    "resolve_weights",
    "fused_lora",
    "fuse_adapters",
    "add_parser",
]

EXPORT_FILES = (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, MANIFEST_FILE)
#: Largest |weight| accepted by hand (retrieval weights lie in [0, 1] and sum to 1).
MAX_WEIGHT = 1000.0
EXPORT_KIND = "semla-fused-lora"


@dataclasses.dataclass(frozen=True)
class FusedExport:
    """What :func:`fuse_adapters` wrote: the contributors and weights, and the total rank per module."""

    out: Path
    contributions: list[tuple[AdapterSummary, float]]
    ranks: dict[str, int]
    manifest: dict[str, Any]


# -- the weights ----------------------------------------------------------------------------------
def retrieval_weights(
    node: "Node",
    images: Sequence[str | Path | np.ndarray],
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float | None = DEFAULT_TEMPERATURE,
    distance: str = DEFAULT_DISTANCE,
    batch_size: int = 16,
    weighting: str = DEFAULT_WEIGHTING,
    guard: bool = False,
    guard_z: float | None = None,
) -> list[tuple[AdapterSummary, float]]:
    """Each adapter's fusion weight averaged over ``images`` (its weight is 0 for an image that
    did not retrieve it), nearest-first order of the total weight. The one place ``fuse`` retrieves.
    With ``guard`` the weights sum to less than 1: the rest is the base's share (a zero adapter).

    Raises:
        InvalidInputError: no image, an unreadable image, bad retrieval settings.
    """
    import torch

    from semla.registry.data import read_image

    if not images:
        raise InvalidInputError("give at least one image to retrieve the adapters for")
    if top_k < 1 or not temperature_ok(temperature):
        raise InvalidInputError(f"top-k must be >= 1 and temperature within {TEMPERATURE_RANGE}")
    check_weighting(weighting)
    check_guard_z(guard_z)
    arrays = [read_image(Path(i)) if isinstance(i, (str, Path)) else np.asarray(i, dtype=np.uint8) for i in images]
    total: torch.Tensor | None = None
    for start in range(0, len(arrays), batch_size):
        _, query = node.embed(arrays[start : start + batch_size])
        r = node.retrieve(query, top_k=top_k, temperature=temperature, distance=distance, weighting=weighting,
                          guard=guard, guard_z=guard_z)
        dense = torch.zeros(len(query), len(node.library), dtype=torch.float64, device=r.idx.device)
        dense.scatter_(1, r.idx, r.weights.to(torch.float64))
        total = dense.sum(0) if total is None else total + dense.sum(0)
    assert total is not None
    mean = (total / len(arrays)).cpu()
    order = [int(i) for i in torch.argsort(mean, descending=True, stable=True) if mean[i] > 0]
    return [(node.library[i], float(mean[i])) for i in order]


def parse_weights(text: str) -> list[tuple[str, int | None, float]]:
    """``NAME=W,NAME@VERSION=W,...`` → [(name, version or None, weight)].

    Raises:
        InvalidInputError: malformed, a repeated name, a weight that is not finite, larger than
            :data:`MAX_WEIGHT` in size, or all weights zero.
    """
    out: list[tuple[str, int | None, float]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        ref, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"--weights item {item!r} is not NAME=W or NAME@VERSION=W")
        name, version = parse_ref(ref)
        try:
            weight = float(value)
        except ValueError:
            raise InvalidInputError(f"--weights: {value.strip()!r} is not a number (in {item!r})") from None
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise InvalidInputError(f"--weights: weight of {ref.strip()} must be finite and at most {MAX_WEIGHT:g} in size")
        if any(n == name for n, _, _ in out):
            raise InvalidInputError(f"--weights names {name!r} twice")
        out.append((name, version, weight))
    if not out or all(w == 0 for _, _, w in out):
        raise InvalidInputError("--weights gives no non-zero weight")
    return out


def resolve_weights(node: "Node", weights: Mapping[str, float] | str) -> list[tuple[AdapterSummary, float]]:
    """Hand-given weights (``{"fog": 0.7, "night@2": 0.3}`` or the ``--weights`` text) against
    the node's signed index; zero weights are dropped.

    Raises:
        InvalidInputError: malformed weights. NotFoundError: a name or version not listed.
    """
    if not isinstance(weights, str):
        weights = ",".join(f"{k}={float(v)!r}" for k, v in weights.items())
    if not node.library:
        node.pull()
    return [(find_adapter(node.library, name, version), w) for name, version, w in parse_weights(weights) if w != 0]


# -- the math -------------------------------------------------------------------------------------
def fused_lora(adapters: Sequence["LoraAdapter"], weights: Sequence[float]) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """Per module, (A (R, in), B (out, R)) with ``B @ A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ`` over the adapters that
    target it, ranks concatenated in the given order (peft ``cat``); float32 on the CPU."""
    import torch

    if len(adapters) != len(weights):
        raise InvalidInputError(f"{len(adapters)} adapters but {len(weights)} weights")
    modules: list[str] = []
    for a in adapters:
        modules += [m for m in a.A if m not in modules]
    out = {}
    for module in modules:
        pairs = [(a, float(w)) for a, w in zip(adapters, weights) if module in a.A]
        A = torch.cat([a.A[module].detach().float().cpu() for a, _ in pairs])  # (R, in)
        B = torch.cat([a.B[module].detach().float().cpu() * (w * a.scale) for a, w in pairs], dim=1)  # (out, R)
        out[module] = (A.contiguous(), B.contiguous())
    return out


def _adapter_config(base: Any, modules: list[str], ranks: dict[str, int]) -> dict[str, Any]:
    """peft ``LoraConfig`` JSON with scale ``lora_alpha / r`` = 1 for every module."""
    import re

    import peft

    from semla.registry.train import adapter_config_json

    r = max(ranks.values())
    odd = {re.escape(m): ranks[m] for m in modules if ranks[m] != r}
    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=modules, lora_dropout=0.0, bias="none",
                             rank_pattern=odd, alpha_pattern=dict(odd))
    return {**adapter_config_json(base, config), "target_modules": list(modules)}  # only the fused modules


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fuse_adapters(
    node: "Node",
    weights: Sequence[tuple[AdapterSummary, float]] | Mapping[str, float] | str,
    out: Path | str,
    *,
    force: bool = False,
    source: Mapping[str, Any] | None = None,
) -> FusedExport:
    """Write the exact weighted sum of the adapters' deltas as one peft LoRA adapter at ``out``.

    Args:
        weights: (index entry, weight) pairs (e.g. from :func:`retrieval_weights`), or by name:
            ``{"fog": 0.7, "night@2": 0.3}`` / ``"fog=0.7,night@2=0.3"`` (latest version when
            none is given). Used as given: nothing is renormalised.
        force: replace an existing folder of export files at ``out``.
        source: how the weights were obtained, recorded in the manifest (default: given by hand).

    Raises:
        InvalidInputError: bad weights, or ``out`` cannot be written (checked first).
        NotFoundError: an adapter is not in the signed index for this base.
        VerificationError, IncompatibleAdapterError: an adapter failed verification; nothing is written.
    """
    from safetensors.torch import save as save_safetensors

    out = Path(out)
    check_out_dir(out, force=force, replaceable=EXPORT_FILES)
    pairs = resolve_weights(node, weights) if isinstance(weights, (Mapping, str)) else list(weights)
    pairs = [(s, float(w)) for s, w in pairs if w != 0]
    if not pairs:
        raise InvalidInputError("no adapter has a non-zero weight")
    if len({(s.name, s.version) for s, _ in pairs}) != len(pairs):
        raise InvalidInputError("an adapter is given twice")
    adapters = node.cache.get_many([s for s, _ in pairs])  # verified by the node before use
    tensors = fused_lora(adapters, [w for _, w in pairs])
    modules = list(tensors)
    ranks = {m: int(tensors[m][0].shape[0]) for m in modules}
    state = {}
    for m, (A, B) in tensors.items():
        state[f"base_model.model.{m}.lora_A.weight"] = A
        state[f"base_model.model.{m}.lora_B.weight"] = B
    weight_bytes = save_safetensors(state, metadata={"format": "pt"})
    config_bytes = json.dumps(_adapter_config(node.base, modules, ranks), indent=2, sort_keys=True).encode() + b"\n"
    manifest = {
        "derived": True,
        "kind": EXPORT_KIND,
        "schema_version": 1,
        "signed": False,
        "formula": "delta_W = sum_i weight_i * (alpha_i / rank_i) * B_i @ A_i; ranks concatenated (peft cat); "
                   "weight_i * alpha_i / rank_i folded into lora_B; peft scale lora_alpha / r = 1",
        "base_model": node.base.ref.model_dump(mode="json"),
        "rank": max(ranks.values()),
        "ranks": ranks,
        "weights": dict(source) if source is not None else {"source": "given"},
        "adapters": [
            {"name": s.name, "version": s.version, "publisher": s.publisher, "manifest_sha256": s.manifest_sha256,
             "weight": w, "rank": int(a.A[next(iter(a.A))].shape[0]), "scale": a.scale}
            for (s, w), a in zip(pairs, adapters)
        ],
        "files": {
            ADAPTER_WEIGHTS_FILE: {"sha256": sha256_bytes(weight_bytes), "size": len(weight_bytes)},
            ADAPTER_CONFIG_FILE: {"sha256": sha256_bytes(config_bytes), "size": len(config_bytes)},
        },
        "created_at": _utc_now(),
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    write_out_dir(out, {ADAPTER_WEIGHTS_FILE: weight_bytes, ADAPTER_CONFIG_FILE: config_bytes,
                        MANIFEST_FILE: manifest_bytes}, force=force)
    return FusedExport(out=out, contributions=pairs, ranks=ranks, manifest=manifest)


# -- the command ----------------------------------------------------------------------------------
def _fuse_command(args: argparse.Namespace) -> int:
    from semla.registry.data import read_image

    if bool(args.images) == (args.weights is not None):
        raise InvalidInputError("give IMAGE... (weights from retrieval) or --weights NAME=W,..., not both or neither")
    if args.weights is not None:
        parse_weights(args.weights)  # fail on bad text before the base model loads
    for path in args.images:
        read_image(path)
    check_out_dir(args.out, force=args.force, replaceable=EXPORT_FILES)
    node = build_node(args)
    if args.weights is not None:
        pairs, source = resolve_weights(node, args.weights), {"source": "given"}
    else:
        pairs = retrieval_weights(node, args.images, top_k=args.top_k, temperature=args.temperature,
                                  distance=args.distance, weighting=args.weighting, guard=args.guard,
                                  guard_z=args.guard_z)
        source = {"source": "retrieval", "images": len(args.images), "top_k": args.top_k,
                  "temperature": args.temperature, "distance": args.distance, "weighting": args.weighting,
                  "guard": args.guard, "guard_z": args.guard_z, "aggregate": "mean over images"}
    export = fuse_adapters(node, pairs, args.out, force=args.force, source=source)
    if args.json:
        print(json.dumps(export.manifest["adapters"]))
    else:
        parts = ", ".join(f"{s.name} v{s.version} {w:.3f}" for s, w in export.contributions)
        print(f"wrote fused adapter {args.out} (rank {max(export.ranks.values())}, scale 1): {parts}")
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``semla-node fuse`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "fuse", help="export the fused adapter for some images (or given weights) as one peft LoRA adapter",
        description="Write ONE standard peft LoRA adapter equal to the exact weighted sum "
                    "sum_i w_i (alpha_i/r_i) B_i A_i of published adapters (ranks concatenated like peft's "
                    "'cat', so different ranks work; the weights are folded into lora_B and the config's "
                    "lora_alpha equals r, so peft's scale is 1). The weights are each adapter's retrieval "
                    "weight averaged over IMAGE... (computed here; the images never leave this machine), or "
                    "given with --weights. DIR gets adapter_model.safetensors, adapter_config.json and an "
                    "unsigned manifest.json marked derived, listing every contributing adapter and its weight. "
                    "Load it with peft.PeftModel.from_pretrained on the base model.")
    p.add_argument("images", nargs="*", type=Path, help="image files (PNG/JPEG) to retrieve the adapters for")
    p.add_argument("--weights", metavar="NAME=W,...",
                   help="fuse these adapters with these weights instead (NAME or NAME@VERSION; used as given)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds only files fuse writes")
    p.add_argument("--json", action="store_true", help="print the contributing adapters as JSON")
    add_retrieval_arguments(p, top_k=DEFAULT_TOP_K, temperature=DEFAULT_TEMPERATURE)
    add_node_arguments(p)
    p.set_defaults(func=_fuse_command)
    return p
