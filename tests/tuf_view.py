"""What a node sees of a registry, read through its TUF metadata (tests' helper)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from semla.registry.tufindex import TufIndex


def snapshot_version(http: httpx.Client, base: str = "") -> int:
    """The snapshot version the registry's timestamp names (rises with every change of the library)."""
    timestamp = json.loads(http.get(base + "/tuf/metadata/timestamp.json").content)
    return timestamp["signed"]["meta"]["snapshot.json"]["version"]


def tuf_view(http: httpx.Client, url: str, directory: Path) -> TufIndex:
    """A fresh node's verified view (``.version``, ``.library()``, ``.keys``) after one refresh,
    its trusted metadata kept in ``directory`` (which must not exist yet or be empty)."""
    index = TufIndex(http, url, Path(directory))
    index.refresh()
    return index
