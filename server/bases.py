"""The base cards a registry knows: those shipped with the package, plus those an admin added.

Added cards live as ``DATA_DIR/bases/<fingerprint>.json`` (written temp → fsync → rename), so
every replica sharing the data directory sees one set, and a card added while the server runs
applies to the next upload without a restart. An added card may replace a bundled one (e.g.
with tighter bounds).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from semla.registry.fs import fsync_dir, write_durable
from semla.registry.basecheck import bundled_cards
from semla.schemas.basecard import MAX_CARD_BYTES, BaseCard
from semla.schemas.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["BaseCardStore"]


class BaseCardStore:
    """Bundled cards and the cards under ``root`` (None: bundled only)."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self._bundled = bundled_cards()

    def _added(self) -> dict[str, BaseCard]:
        if self.root is None or not self.root.is_dir():
            return {}
        cards = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                card = BaseCard.parse(path.read_bytes()[: MAX_CARD_BYTES + 1], what=f"base card {path}")
            except (InvalidInputError, OSError) as exc:  # one damaged file must not refuse every upload
                logger.error("ignoring base card %s: %s", path, exc)
                continue
            cards[card.fingerprint] = card
        return cards

    def cards(self) -> dict[str, BaseCard]:
        """fingerprint → card; an added card wins over a bundled one."""
        return {**self._bundled, **self._added()}

    def listing(self) -> list[tuple[BaseCard, str]]:
        """Every card with where it comes from (``bundled`` or ``added``), by arch."""
        added = self._added()
        rows = [(c, "added") for c in added.values()]
        rows += [(c, "bundled") for fp, c in self._bundled.items() if fp not in added]
        return sorted(rows, key=lambda row: (row[0].arch, row[0].fingerprint))

    def add(self, data: bytes) -> BaseCard:
        """Validate a card's bytes and store it (replacing an earlier card of that fingerprint).

        Raises:
            InvalidInputError: ``bad_base_card`` (not a valid card), or no data directory.
        """
        card = BaseCard.parse(data)
        if self.root is None:
            raise InvalidInputError("this registry has no data directory to keep base cards in")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{card.fingerprint}.json.tmp"
        write_durable(tmp, card.to_json() + b"\n")
        os.replace(tmp, self.root / f"{card.fingerprint}.json")
        fsync_dir(self.root)
        return card
