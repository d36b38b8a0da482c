"""Choosing the torch device, shared by training (the data owner) and inference (the node)."""

from __future__ import annotations

import torch

from semla.schemas.errors import InvalidInputError

__all__ = ["resolve_device"]


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None picks cuda when available.

    Raises:
        InvalidInputError: an unknown device, or cuda without a GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"unsupported device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device cuda requested but no CUDA GPU is available")
    return dev
