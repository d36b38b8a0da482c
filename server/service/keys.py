"""Publisher keys: register, list, rotate and revoke them, and the privacy ledger of each
publisher (its rotation chain).
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from semla.registry import keys as _keys
from semla.schemas import KeyCreate, KeyPublic, PrivacyLedger, PrivacySpend, RotateRequest, rotation_payload
from semla.schemas.errors import ConflictError, InvalidInputError, NotFoundError
from semla.server.db import Adapter, Publisher, bump_library_version, iso_utc
from semla.server.paging import DEFAULT_LIMIT, Page, check_limit, decode_cursor, encode_cursor, rows_limit
from semla.server.service.core import ServiceCore, _owner_chains

__all__ = ["KeysPart"]


def _key_public(row: Publisher, epsilon_spent: float = 0.0) -> KeyPublic:
    return KeyPublic(
        key_id=row.key_id,
        public_key=row.public_key,
        label=row.label,
        active=row.active,
        created_at=iso_utc(row.created_at),
        rotated_to=row.rotated_to,
        epsilon_spent=epsilon_spent,
    )


class KeysPart(ServiceCore):
    """Publisher keys and their privacy ledgers."""

    # -- keys -----------------------------------------------------------------------------------
    def register_key(self, body: KeyCreate) -> KeyPublic:
        """Register a publisher key (active from now on).

        Raises:
            InvalidInputError: not a valid Ed25519 public key.
            ConflictError: ``key_exists``, the key is already registered.
        """
        try:
            public = _keys.public_key_from_hex(body.public_key)
        except ValueError:
            raise InvalidInputError("public_key is not a valid Ed25519 public key") from None
        raw = _keys.public_bytes(public)
        kid = _keys.key_id(raw)
        with self._sessions() as session:
            if session.get(Publisher, kid) is not None:
                raise ConflictError(f"key {kid} is already registered", code="key_exists")
            row = Publisher(key_id=kid, public_key=raw.hex(), label=body.label, active=True)
            session.add(row)
            try:
                session.flush()  # a concurrent registration of the same key fails here
                bump_library_version(session)
                session.commit()
            except IntegrityError:
                raise ConflictError(f"key {kid} is already registered", code="key_exists") from None
            public = _key_public(row)
        self._committed(keys=True)
        return public

    def list_keys(self, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT) -> Page[KeyPublic]:
        """One page of the publisher keys, oldest first, each with the ε its publisher has spent.

        Raises:
            InvalidInputError: ``bad_cursor`` or ``bad_limit``.
        """
        limit = check_limit(limit)
        after = decode_cursor(cursor, "keys") if cursor is not None else None
        stmt = select(Publisher).order_by(Publisher.created_at, Publisher.key_id).limit(rows_limit(limit))
        with self._sessions() as session:
            if after is not None:
                anchor = session.get(Publisher, after)
                if anchor is None:  # keys are never deleted: a real cursor names a stored key
                    raise InvalidInputError("invalid cursor for the keys list: it names no key", code="bad_cursor")
                stmt = stmt.where(or_(Publisher.created_at > anchor.created_at,
                                      and_(Publisher.created_at == anchor.created_at, Publisher.key_id > anchor.key_id)))
            rows = list(session.scalars(stmt))
            page, more = rows[:limit], len(rows) > limit
            keys = self._keys_with_spend(session, page)
        return Page(keys, encode_cursor("keys", page[-1].key_id) if more else None)

    def get_key(self, key_id: str) -> KeyPublic:
        """One publisher key with the ε its publisher has spent.

        Raises:
            NotFoundError: no such key.
        """
        with self._sessions() as session:
            return self._keys_with_spend(session, [self._publisher(session, key_id)])[0]

    @staticmethod
    def _publisher(session: Session, key_id: str) -> Publisher:
        """The key's row.

        Raises:
            NotFoundError: no such key.
        """
        row = session.get(Publisher, key_id)
        if row is None:
            raise NotFoundError(f"no publisher key {key_id}")
        return row

    @staticmethod
    def _keys_with_spend(session: Session, rows: list[Publisher]) -> list[KeyPublic]:
        """``rows`` as :class:`KeyPublic`, each with its publisher's ε (summed over its rotation chain)."""
        if not rows:
            return []
        chains = _owner_chains(dict(session.execute(select(Publisher.key_id, Publisher.rotated_to)).all()))
        wanted = sorted({k for row in rows for k in chains.get(row.key_id, [row.key_id])})
        per_key = dict(session.execute(
            select(Adapter.publisher_key_id, func.sum(Adapter.privacy_epsilon))
            .where(Adapter.privacy_epsilon.is_not(None), Adapter.publisher_key_id.in_(wanted))
            .group_by(Adapter.publisher_key_id)
        ).all())
        return [_key_public(row, float(sum(per_key.get(k, 0.0) for k in chains.get(row.key_id, [row.key_id]))))
                for row in rows]


    def rotate_key(self, body: RotateRequest) -> KeyPublic:
        """Register a publisher's new key, signed by its old one; the old key publishes no more,
        its adapters stay valid, and its names pass to the new key.

        Raises:
            NotFoundError: the old key is unknown.
            SignatureError: not signed by the old key.
            ConflictError: ``key_exists`` (new key already registered) or ``already_rotated``.
            InvalidInputError: the old key is revoked.
        """
        with self._sessions() as session:
            old = session.get(Publisher, body.old_key_id)
            if old is None:
                raise NotFoundError(f"no publisher key {body.old_key_id}")
            _keys.verify(bytes.fromhex(old.public_key), bytes.fromhex(body.signature),
                         rotation_payload(body.old_key_id, body.new_public_key), what="the rotate request")
            if not old.active:
                raise InvalidInputError(f"key {old.key_id} is revoked; a revoked key cannot hand over its names")
            if old.rotated_to is not None:
                raise ConflictError(f"key {old.key_id} was already rotated to {old.rotated_to}", code="already_rotated")
            raw = bytes.fromhex(body.new_public_key)
            new_id = _keys.key_id(raw)
            if session.get(Publisher, new_id) is not None:
                raise ConflictError(f"key {new_id} is already registered", code="key_exists")
            new = Publisher(key_id=new_id, public_key=raw.hex(), label=old.label, active=True)
            session.add(new)
            old.rotated_to = new_id
            session.flush()
            bump_library_version(session)
            session.commit()
        self._committed(keys=True)
        return self.get_key(new_id)  # with the spend it carries

    def revoke_key(self, key_id: str) -> KeyPublic:
        """Deactivate a publisher key (admin): it can no longer publish and its adapters leave the index.

        Raises:
            NotFoundError: no such key.
        """
        with self._sessions() as session:
            row = self._publisher(session, key_id)
            row.active = False
            bump_library_version(session, changed=Adapter.publisher_key_id == key_id)
            session.commit()
            public = _key_public(row)
        self._committed(keys=True, publisher=key_id)
        return public


    # -- privacy ledger -------------------------------------------------------------------------
    def privacy_ledger(self, key_id: str) -> PrivacyLedger:
        """The DP ε spent by ``key_id``'s publisher (its whole rotation chain) against the budget.

        Raises:
            NotFoundError: no such key.
        """
        with self._sessions() as session:
            if session.get(Publisher, key_id) is None:
                raise NotFoundError(f"no publisher key {key_id}")
            chain = self._owner_chain(session, key_id)
            rows = session.scalars(select(Adapter).where(Adapter.publisher_key_id.in_(chain),
                                                         Adapter.privacy_epsilon.is_not(None))
                                   .order_by(Adapter.created_at, Adapter.id))
            entries = [PrivacySpend(name=r.name, version=r.version, key_id=r.publisher_key_id,
                                    epsilon=r.privacy_epsilon, delta=r.privacy_delta or 0.0,
                                    created_at=iso_utc(r.created_at), revoked=r.revoked_at is not None)
                       for r in rows]
        spent = float(sum(e.epsilon for e in entries))
        budget = self._epsilon_budget
        return PrivacyLedger(
            key_id=key_id, keys=chain, budget=budget, spent=spent, delta_spent=float(sum(e.delta for e in entries)),
            remaining=None if budget is None else max(0.0, budget - spent), entries=entries,
        )
