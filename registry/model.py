"""The base model (DESIGN §2): an open_clip CLIP made LoRA-ready, with a MaskCLIP dense head.

* Backbones are looked up in ``BACKBONES`` (``list_backbones()``): ``semla-tiny`` ships its
  config and weights inside this package; any other open_clip architecture loads a tag
  (``openai``) through open_clip or a local checkpoint (a file path or ``local-dir:DIR``).
* ``nn.MultiheadAttention`` never calls ``out_proj.forward``, so LoRA on it would be silently
  ignored. :func:`swap_attention` replaces it by :class:`SplitAttention`, numerically the same,
  whose q/k/v/out projections are plain ``nn.Linear`` layers.
* Dense head (MaskCLIP): the last vision block's value path → out proj → ln_post → proj gives a
  per-patch embedding in text space; cosine similarity with class-name text embeddings times
  the logit scale gives per-patch logits, upsampled bilinearly. Class names are queries.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from semla.registry.names import Registry
from semla.schemas import BaseModelRef, canonical_json
from semla.schemas.errors import InvalidInputError

__all__ = [
    "TINY",
    "BACKBONES",
    "PROMPT_TEMPLATES",
    "DenseClip",
    "SplitAttention",
    "register_backbone",
    "list_backbones",
    "load_base",
    "swap_attention",
    "lora_target_modules",
    "state_dict_fingerprint",
]

TINY = "semla-tiny"
_PACKAGE_DIR = Path(__file__).resolve().parent
TINY_WEIGHTS = _PACKAGE_DIR / "weights" / f"{TINY}.safetensors"
open_clip.add_model_config(_PACKAGE_DIR / "model_configs")

PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "there is a {} in the scene.",
    "a cropped photo of {}.",
)
LORA_LEAVES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class SplitAttention(nn.Module):
    """Multi-head attention with separate ``nn.Linear`` q/k/v/out, over scaled dot-product
    attention; a drop-in for a batch-first ``nn.MultiheadAttention`` in open_clip blocks."""

    def __init__(self, dim: int, heads: int, batch_first: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise InvalidInputError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SplitAttention":
        if mha.in_proj_weight is None or mha.bias_k is not None or not mha._qkv_same_embed_dim:
            raise InvalidInputError("only packed-qkv MultiheadAttention without bias_k/v is supported")
        dim = mha.embed_dim
        new = cls(dim, mha.num_heads, batch_first=mha.batch_first).to(mha.in_proj_weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * dim : (i + 1) * dim])
                proj.bias.copy_(mha.in_proj_bias[i * dim : (i + 1) * dim])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.in_proj_weight.device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        mask = attn_mask
        if key_padding_mask is not None:
            pad = torch.zeros_like(key_padding_mask, dtype=query.dtype).masked_fill(key_padding_mask, float("-inf"))
            pad = pad[:, None, None, :]
            mask = pad if mask is None else mask + pad
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(query.shape)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def swap_attention(module: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` under ``module`` by :class:`SplitAttention`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, SplitAttention.from_mha(child))
        else:
            swap_attention(child)
    return module


def lora_target_modules(clip: nn.Module) -> list[str]:
    """Full names of every LoRA target in the image encoder: attention q/k/v/out and MLP."""
    blocks = clip.visual.transformer.resblocks
    return [f"visual.transformer.resblocks.{i}.{leaf}" for i in range(len(blocks)) for leaf in LORA_LEAVES]


def state_dict_fingerprint(module: nn.Module) -> str:
    """sha256 over the canonical state dict: sorted names, then shapes/dtypes, then bytes."""
    state = module.state_dict()
    names = sorted(state)
    h = hashlib.sha256()
    h.update(canonical_json({n: [str(state[n].dtype), list(state[n].shape)] for n in names}))
    for n in names:
        t = state[n].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class DenseClip(nn.Module):
    """A LoRA-ready CLIP with a global image embedding (retrieval) and a dense head (segmentation).

    Attributes:
        clip: the open_clip CLIP model, attention swapped.
        ref: the base-model reference recorded in every adapter manifest.
    """

    def __init__(self, clip: nn.Module, arch: str, tag: str, embedding: str = "clip-global") -> None:
        super().__init__()
        if embedding not in RETRIEVAL_EMBEDDINGS:
            raise InvalidInputError(f"unknown retrieval embedding {embedding!r}; valid: {', '.join(RETRIEVAL_EMBEDDINGS)}")
        self.embedding = embedding
        self.clip = swap_attention(clip)
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise InvalidInputError(f"{arch}: only plain ViT image towers with a projection are supported")
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.tokenizer = open_clip.get_tokenizer(arch)
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.ref = BaseModelRef(
            arch=arch, tag=tag, open_clip_version=open_clip.__version__, fingerprint=state_dict_fingerprint(self.clip)
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # -- images -----------------------------------------------------------------------------
    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) arrays → normalised (B, 3, S, S) at the model's input size."""
        batch = []
        for img in images:
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
            if t.shape[1:] != (self.image_size, self.image_size):
                t = F.interpolate(t[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)[0]
            batch.append(t)
        x = torch.stack(batch).to(self.device)
        return (x - self.pixel_mean) / self.pixel_std

    def _trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = visual._embeds(pixels)  # (B, 1 + N, D)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        return x

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global image embedding, L2-normalised: (B, E). Equals open_clip's ``encode_image``."""
        visual = self.clip.visual
        x = visual.transformer.resblocks[-1](self._trunk(pixels))
        pooled, _ = visual._pool(x)
        return F.normalize(pooled @ visual.proj, dim=-1)

    def encode_patch_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens entering the last block, L2-normalised: (B, D)."""
        return F.normalize(self._trunk(pixels)[:, 1:].mean(dim=1), dim=-1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The retrieval key of each image (frozen base, no LoRA), L2-normalised: (B, D)."""
        return RETRIEVAL_EMBEDDINGS[self.embedding](self, pixels)

    @property
    def embedding_model(self) -> str:
        """Names the retrieval embedding space in every manifest: arch, base fingerprint, kind."""
        return f"{self.ref.arch}:{self.ref.fingerprint[:16]}:{self.embedding}"

    def encode_dense(self, pixels: torch.Tensor) -> torch.Tensor:
        """MaskCLIP per-patch embeddings, L2-normalised: (B, g, g, E)."""
        visual = self.clip.visual
        last = visual.transformer.resblocks[-1]
        x = self._trunk(pixels)[:, 1:]  # (B, N, D) patch tokens
        v = last.attn.out_proj(last.attn.v_proj(last.ln_1(x)))  # value path, no q/k mixing
        dense = visual.ln_post(v) @ visual.proj  # (B, N, E)
        g = int(round(dense.shape[1] ** 0.5))
        return F.normalize(dense, dim=-1).view(dense.shape[0], g, g, -1)

    # -- text ---------------------------------------------------------------------------------
    def encode_classes(self, classes: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> torch.Tensor:
        """Text embedding per class name, averaged over prompt templates: (C, E), normalised."""
        if not classes:
            raise InvalidInputError("the class list is empty")
        prompts = [t.format(c) for c in classes for t in templates]
        tokens = self.tokenizer(prompts).to(self.device)
        emb = F.normalize(self.clip.encode_text(tokens), dim=-1).view(len(classes), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1)

    # -- segmentation -------------------------------------------------------------------------
    def dense_logits(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-patch class logits: (B, C, g, g)."""
        dense = self.encode_dense(pixels)
        return self.clip.logit_scale.exp() * torch.einsum("bhwe,ce->bchw", dense, text)

    def forward(self, pixels: torch.Tensor, text: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class logits upsampled to ``size`` (default: the input size): (B, C, H, W)."""
        logits = self.dense_logits(pixels, text)
        return F.interpolate(logits, size=size or pixels.shape[-2:], mode="bilinear", align_corners=False)


#: Retrieval embeddings by name. ``clip-global`` is CLIP's own image embedding, the paper's key
#: for web-pretrained CLIP. ``patch-mean`` (mean patch token entering the last block) is the
#: key for semla-tiny: trained only for clear-weather segmentation, its global embedding keeps
#: little appearance information, while its patch features separate domains (DESIGN §4 note).
RETRIEVAL_EMBEDDINGS: dict[str, Callable[[DenseClip, torch.Tensor], torch.Tensor]] = {
    "clip-global": DenseClip.encode_image,
    "patch-mean": DenseClip.encode_patch_mean,
}

# -- backbones ------------------------------------------------------------------------------------
Builder = Callable[[str, "str | None"], tuple[nn.Module, str]]
BACKBONES: Registry[Builder] = Registry("backbone")


def register_backbone(name: str, builder: Builder) -> None:
    """Register a builder ``(arch, pretrained) -> (open_clip CLIP, tag)`` under ``name``."""
    BACKBONES.register(name, builder)


def list_backbones() -> list[str]:
    return BACKBONES.names()


@contextlib.contextmanager
def _no_random_init_warning():
    """open_clip warns on the root logger that a model without ``pretrained`` is random."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _build_tiny(arch: str, pretrained: str | None) -> tuple[nn.Module, str]:
    from safetensors.torch import load_file

    with _no_random_init_warning():  # the weights are loaded right below
        clip = open_clip.create_model(arch, pretrained=None)
    swap_attention(clip)
    tag = pretrained or "bundled"
    if tag == "none":
        return clip, tag
    path = TINY_WEIGHTS if tag == "bundled" else Path(tag)
    if not path.is_file():
        raise InvalidInputError(f"{arch} weights not found at {path}; run `python -m semla.registry.train_base`")
    clip.load_state_dict(load_file(str(path)), strict=True)
    return clip, "bundled" if tag == "bundled" else f"file:{path.name}"


def _build_open_clip(arch: str, pretrained: str | None) -> tuple[nn.Module, str]:
    if pretrained in (None, "none"):
        return open_clip.create_model(arch, pretrained=None), "none"
    local = pretrained[len("local-dir:") :] if pretrained.startswith("local-dir:") else None
    if local is None and not os.path.exists(pretrained) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InvalidInputError(
            f"pretrained weights {pretrained!r} for {arch} need a download but HF_HUB_OFFLINE=1; "
            "give a local checkpoint path instead (--pretrained PATH or local-dir:DIR)"
        )
    try:
        if local is not None:
            clip = open_clip.create_model(arch, pretrained=os.path.join(local, "open_clip_model.safetensors")
                                          if os.path.isdir(local) else local)
        else:
            clip = open_clip.create_model(arch, pretrained=pretrained, require_pretrained=True)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"cannot load pretrained weights {pretrained!r} for {arch}: {exc}") from None
    tag = pretrained if local is None and not os.path.exists(pretrained) else f"file:{Path(local or pretrained).name}"
    return clip, tag


register_backbone(TINY, _build_tiny)
for _arch in ("ViT-B-16", "ViT-B-32", "ViT-L-14"):
    register_backbone(_arch, _build_open_clip)


def load_base(arch: str = TINY, pretrained: str | None = None, device: str | torch.device = "cpu") -> DenseClip:
    """Build the frozen, LoRA-ready base model.

    Args:
        arch: a registered backbone (see :func:`list_backbones`).
        pretrained: for ``semla-tiny``: None/"bundled" (the shipped weights), "none" (random
            init) or a safetensors path; otherwise an open_clip tag (``openai``), a checkpoint
            path, ``local-dir:DIR`` or "none".

    Raises:
        InvalidInputError: unknown backbone, missing weights, or a download that cannot happen.
    """
    clip, tag = BACKBONES.lookup(arch)(arch, pretrained)
    model = DenseClip(clip, arch, tag, embedding="patch-mean" if arch == TINY else "clip-global").to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
