"""What the registry does, apart from HTTP: register keys, accept bundles, answer queries.

Routes in :mod:`semla.server.app` parse a request, call one method of :class:`RegistryService`
and format the result. The service is composed of one part per concern, each a module here:

* :mod:`.core`: the shared state (database sessions, blob store, settings), the publish locks,
  and re-signing the TUF metadata after a committed change;
* :mod:`.library`: which rows are live, the newest live version of each name, a row as a summary;
* :mod:`.keys`: publisher keys (register, list, rotate, revoke) and each publisher's privacy ledger;
* :mod:`.publishing`: accepting a bundle (the storage order that leaves nothing behind a refused
  upload) and sweeping orphan blobs;
* :mod:`.revocation`: revoking a version at its publisher's signed request;
* :mod:`.reading`: the paged listing, an adapter's versions, the stored files;
* :mod:`.retrieval`: server-side retrieval over a centroid table cached by the library counter.
"""

from __future__ import annotations

from semla.server.service.core import ServiceCore
from semla.server.service.keys import KeysPart
from semla.server.service.library import _summary, live_adapter, newest_summaries
from semla.server.service.publishing import PublishingPart
from semla.server.service.reading import ReadingPart
from semla.server.service.retrieval import RetrievalPart
from semla.server.service.revocation import RevocationPart

__all__ = ["RegistryService", "ServiceCore", "live_adapter", "newest_summaries", "_summary"]


class RegistryService(KeysPart, PublishingPart, RevocationPart, ReadingPart, RetrievalPart):
    """The registry's operations over one database and one blob store (see the parts' modules).

    Args:
        sessions: Session factory bound to the registry database.
        blobs: Where bundle files are stored.
    """
