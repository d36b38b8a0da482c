"""Revoking one adapter version at its publisher's signed request.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from semla.registry import keys as _keys
from semla.schemas import AdapterSummary, revocation_payload
from semla.schemas.errors import ConflictError, NotFoundError, SignatureError, UnknownKeyError
from semla.server.db import Adapter, Publisher, bump_library_version, utcnow
from semla.server.service.core import ServiceCore
from semla.server.service.library import _summary, compose_summary

__all__ = ["RevocationPart"]


class RevocationPart(ServiceCore):
    """Revoke adapter versions."""

    # -- revocation -----------------------------------------------------------------------------
    def revoke_version(self, name: str, version: int, signature: bytes) -> AdapterSummary:
        """Revoke one adapter version at its publisher's signed request.

        The signature covers ``b"semla-revoke-v1\n" + canonical_json({"name", "version"})`` and
        must be by the publisher's current key: the key that published the version or, after a
        rotation, its successor. A key rotated away can no longer revoke anything.

        Raises:
            NotFoundError: no such version.
            UnknownKeyError: ``key_rotated`` (signed by a key of the chain that was rotated away)
                or ``key_revoked`` (the publisher's current key was revoked).
            SignatureError: the signature is not the publisher's.
            ConflictError: ``already_revoked``.
        """
        payload = revocation_payload(name, version)
        with self._sessions() as session:
            row = session.scalar(select(Adapter).where(Adapter.name == name, Adapter.version == version))
            if row is None:
                raise NotFoundError(f"no adapter {name!r} version {version}")
            chain = self._owner_chain(session, row.publisher_key_id)
            current = session.get(Publisher, chain[-1])
            try:
                _keys.verify(bytes.fromhex(current.public_key), signature, payload, what="the revoke request")
            except SignatureError:
                self._explain_rotated_signer(session, chain[:-1], signature, payload, current.key_id)
                raise
            if not current.active:
                raise UnknownKeyError(f"publisher key {current.key_id} was revoked", code="key_revoked")
            if row.revoked_at is not None:
                raise ConflictError(f"{name} version {version} is already revoked", code="already_revoked")
            row.revoked_at = utcnow()
            row.summary = compose_summary(row)
            bump_library_version(session, changed=Adapter.id == row.id)
            session.commit()
            revoked = _summary(row)
        self._committed([name])
        return revoked

    @staticmethod
    def _explain_rotated_signer(session: Session, rotated: list[str], signature: bytes, payload: bytes,
                                current: str) -> None:
        """A request that the current key did not sign: was it signed by a key rotated away?

        Raises:
            UnknownKeyError: ``key_rotated`` when one of ``rotated`` signed it (nothing otherwise).
        """
        for key_id in rotated:
            try:
                _keys.verify(bytes.fromhex(session.get(Publisher, key_id).public_key), signature, payload,
                             what="the revoke request")
            except SignatureError:
                continue
            raise UnknownKeyError(f"key {key_id} was rotated away; its publisher now signs with {current}",
                                  code="key_rotated")
