"""The SemLA registry server: stores signed LoRA adapter bundles, verifies every upload, and
serves the index (with centroids, so nodes retrieve locally) and the files.

Torch-free by design (DESIGN §1): it imports only the torch-free parts of ``semla.registry``,
so the registry host needs no GPU stack. Build the app with ``create_app(ServerSettings())``
or run ``semla-server``.
"""

from semla.server.app import create_app
from semla.server.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
