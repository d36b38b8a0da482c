"""Train the bundled ``semla-tiny`` base model (DESIGN §2), seeded and reproducible.

The paper's base model is trained on COCO-Stuff; ours is trained from scratch on a clean
synthetic source set: every scene type and class of :mod:`semla.registry.synth` in clear
appearance. Text and image towers train together, so that class names are the queries:

* dense loss: the MaskCLIP head's per-patch logits against the text embeddings of the class
  names (random prompt template per step), pixel cross-entropy;
* global loss: the pooled image embedding against the same text embeddings, multi-label
  (which classes are present), which keeps the retrieval embedding a real image embedding.

Usage::

    python -m semla.registry.train_base --out registry/weights/semla-tiny.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from semla.registry import synth
from semla.registry.model import PROMPT_TEMPLATES, TINY, TINY_WEIGHTS, load_base, state_dict_fingerprint
from semla.registry.train import batches, segmentation_loss
from semla.schemas import canonical_json

__all__ = ["source_domains", "train_base", "main"]


def source_domains() -> list[str]:
    """The clean source set: every registered domain whose appearance shift is ``none``."""
    return [d for d in synth.list_domains() if synth.get_domain(d).shifts in ((), ("none",))]


def _render_source(n: int, seed: int, size: int):
    """n images per clean source domain (one per scene type), with a shared class list."""
    classes: list[str] = []
    images, masks = [], []
    for domain in source_domains():
        scene_classes = synth.get_scene(synth.get_domain(domain).scene).classes
        remap = np.array([classes.index(c) if c in classes else classes.append(c) or len(classes) - 1
                          for c in scene_classes] + [255] * (256 - len(scene_classes)), dtype=np.uint8)
        for i in range(n):
            img, mask = synth.render(domain, seed, i, size)
            images.append(img)
            masks.append(remap[mask])
    return images, masks, classes


def train_base(out: Path, *, n_images: int = 3000, steps: int = 2500, batch_size: int = 32, lr: float = 1e-3,
               seed: int = 0, progress: bool = True, source=None) -> dict:
    """Train semla-tiny from scratch and write its weights to ``out``.

    ``source(n, seed, size) -> (images, masks, classes)`` renders the training set (default: the
    clean domains of :mod:`semla.registry.synth`); ``n_images`` is passed as ``n``.
    """
    torch.manual_seed(seed)
    model = load_base(TINY, "none")
    for p in model.parameters():
        p.requires_grad_(True)
    images, masks_np, classes = (source or _render_source)(n_images, seed=10_000 + seed, size=model.image_size)
    pixels = model.pixels(images)
    masks = torch.from_numpy(np.stack(masks_np)).long()
    present = torch.zeros(len(masks), len(classes))
    for i, m in enumerate(masks):
        present[i, m[m < len(classes)].unique()] = 1.0
    tokens = model.tokenizer([t.format(c) for t in PROMPT_TEMPLATES for c in classes])  # (T*C, L)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start = time.time()
    bar = tqdm(batches(len(pixels), batch_size, steps, seed), total=steps, desc="train semla-tiny",
               disable=not progress)
    for step, (idx, gen) in enumerate(bar):
        template = step % len(PROMPT_TEMPLATES)
        text = F.normalize(model.clip.encode_text(tokens.view(len(PROMPT_TEMPLATES), len(classes), -1)[template]), dim=-1)
        x, y = pixels[idx], masks[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        dense = segmentation_loss(model, x, y, text)
        glob = F.binary_cross_entropy_with_logits(10.0 * model.encode_image(x) @ text.T, present[idx])
        loss = dense + 0.5 * glob
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(dense=f"{dense.item():.3f}", glob=f"{glob.item():.3f}")
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.clip.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # one metadata key: safetensors writes several in hash order, and the file must be reproducible
    info = canonical_json({"classes": classes, "seed": seed, "steps": steps}).decode()
    save_file(state, str(tmp), metadata={"semla-tiny": info})
    tmp.replace(out)
    return {"out": str(out), "fingerprint": state_dict_fingerprint(model.clip), "classes": classes,
            "steps": steps, "seconds": round(time.time() - start, 1), "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semla.registry.train_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_WEIGHTS, help="where to write the safetensors weights")
    parser.add_argument("--images", type=int, default=3000, help="clear images per source domain")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = train_base(args.out, n_images=args.images, steps=args.steps, batch_size=args.batch, lr=args.lr,
                        seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
