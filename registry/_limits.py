"""The node's limits on one request (torch-free: the node service checks requests with them).

Tokenising a class name costs more than linearly in its length (one name of 16,000 letters held
a worker for 7 s), while CLIP reads only 77 tokens of it; masks are uint8 class indices.
"""

from __future__ import annotations

from collections.abc import Sequence

from semla.schemas.errors import InvalidInputError

__all__ = ["MAX_CLASSES", "MAX_CLASS_NAME_CHARS", "MAX_UPSAMPLE_ELEMENTS", "check_classes"]

#: Masks are uint8 class indices.
MAX_CLASSES = 255
#: Longest class name accepted (CLIP reads 77 tokens: about 300 characters of English).
MAX_CLASS_NAME_CHARS = 300
#: Largest float32 buffer of one image's upsampled logits (classes x pixels): classes are
#: upsampled in chunks of at most this many elements (256 MiB), whatever classes x pixels is.
MAX_UPSAMPLE_ELEMENTS = 1 << 26


def check_classes(classes: Sequence[str]) -> None:
    """1..255 class names of at most 300 characters each.

    Raises:
        InvalidInputError: ``empty_classes`` or ``bad_classes``.
    """
    if not classes:
        raise InvalidInputError("the class list is empty", code="empty_classes")
    if len(classes) > MAX_CLASSES:
        raise InvalidInputError(f"{len(classes)} classes; at most {MAX_CLASSES} (masks are uint8)", code="bad_classes")
    for name in classes:
        if not isinstance(name, str) or len(name) > MAX_CLASS_NAME_CHARS:
            raise InvalidInputError(f"a class name is longer than {MAX_CLASS_NAME_CHARS} characters "
                                    "(CLIP reads 77 tokens)", code="bad_classes")
