"""What the registry does, apart from HTTP: register keys, accept bundles, answer queries.

Routes in :mod:`semla.server.app` parse a request, call one method here and format the result.
Verification itself is :func:`semla.registry.bundle.check_bundle`; this module adds only the
registry's own rules (who owns a name, versions only go up) and the storage order that keeps
a refused upload from leaving anything behind:

1. verify the bundle against the active publisher keys, then against the card of the base it
   names (``unknown_base``, or a misfit such as ``shape_mismatch`` or ``effect_too_large``), then
   the registry's sample floor (``too_few_samples``; nothing written yet);
2. under the publish lock (a thread lock here, a PostgreSQL advisory lock across replicas),
   check the name/version rule and the publisher's privacy budget (``privacy_budget``);
3. write the four files as blobs (durable), then insert the rows and commit;
4. if the commit fails (a concurrent upload won the UNIQUE(name, version) race), delete the
   blobs this upload created that no row references, and answer ``stale_version``.

The privacy ledger is the adapters table itself: each row keeps its manifest's DP ε and δ on
the centroid, so the charge is committed in the same transaction as the adapter (one row, no
partial state) and checked under the same lock (concurrent uploads cannot overspend; on
SQLite the guarantee holds for one server process, the embedded deployment). A
publisher is a rotation chain of keys: a rotated key's spend carries to its successors.
Revoking a version refunds nothing (its centroid was public). DP on federated LoRA updates
(``training.federated.update_privacy``) is not charged: it protects the federation's owners,
whose data the publishing key's ledger does not describe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import timedelta
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from semla.registry import keys as _keys
from semla.registry.basecheck import card_for, verify_against_card
from semla.registry.bundle import check_bundle, sha256_bytes
from semla.registry.retrieval import CentroidTable, retrieve_numpy
from semla.registry.weighting import base_weight_of, check_weighting
from semla.schemas import (
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    MANIFEST_FILE,
    AdapterSummary,
    KeyCreate,
    KeyPublic,
    Manifest,
    PrivacyLedger,
    PrivacySpend,
    RetrievedAdapter,
    RetrieveRequest,
    RetrieveResponse,
    RootRotation,
    RotateRequest,
    UploadReceipt,
    INDEX_CONTEXT,
    IndexKey,
    IndexSignature,
    IndexSigned,
    SignedIndex,
    canonical_json,
    revocation_payload,
    rotation_payload,
    strict_json_loads,
)
from semla.registry.privacy import check_min_samples
from semla.schemas.basecard import BaseCard
from semla.schemas.errors import (
    ConflictError,
    GoneError,
    InvalidInputError,
    NotFoundError,
    PrivacyBudgetError,
    RateLimitedError,
    SignatureError,
    UnknownKeyError,
)
from semla.server.bases import BaseCardStore
from semla.server.blobs import BlobStore
from semla.server.db import Adapter, AdapterFile, Publisher, iso_utc, utcnow
from semla.server.settings import DEFAULT_EPSILON_BUDGET, DEFAULT_MIN_SAMPLES

logger = logging.getLogger(__name__)

__all__ = ["RegistryService", "index_version_expr", "live_adapter"]

#: pg_advisory_xact_lock key that serialises publishing across replicas ("SemLA" in ASCII).
_PUBLISH_LOCK_KEY = 0x53656D4C41
#: Rounding slack when a spend is compared with the budget (0.1 + 0.2 may reach a budget of 0.3).
_BUDGET_SLACK = 1e-9


def live_adapter() -> Any:
    """Where-clause of an adapter version that may be served: not revoked, its key active."""
    return Adapter.revoked_at.is_(None) & Adapter.publisher_key_id.in_(
        select(Publisher.key_id).where(Publisher.active.is_(True))
    )


def index_version_expr() -> Any:
    """The index version as one SQL expression (one round trip).

    It strictly increases with every change: a sum of counters that never decrease (adapters
    and keys are never deleted, revocations and rotations are permanent) and each change
    raises one.
    """
    return (
        select(func.coalesce(func.max(Adapter.id), 0)).scalar_subquery()
        + select(func.count()).where(Adapter.revoked_at.is_not(None)).scalar_subquery()
        + select(func.count()).select_from(Publisher).scalar_subquery()
        + select(func.count()).where(Publisher.active.is_(False)).scalar_subquery()
        + select(func.count()).where(Publisher.rotated_to.is_not(None)).scalar_subquery()
    )


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


def _owner_chains(rotations: Mapping[str, str | None]) -> dict[str, list[str]]:
    """key id → every key id of its publisher (its rotation chain), oldest first."""
    previous = {new: old for old, new in rotations.items() if new is not None}
    chains: dict[str, list[str]] = {}
    for key_id in rotations:
        first = key_id
        while first in previous and previous[first] != key_id:
            first = previous[first]
        chain = [first]
        while rotations.get(chain[-1]) is not None and rotations[chain[-1]] not in chain:
            chain.append(rotations[chain[-1]])
        chains[key_id] = chain
    return chains


def _summary(row: Adapter) -> AdapterSummary:
    return AdapterSummary(
        name=row.name,
        version=row.version,
        publisher=row.publisher_key_id,
        base_fingerprint=row.base_fingerprint,
        domain=row.domain,
        sample_count=row.sample_count,
        manifest_sha256=row.manifest_sha256,
        centroids=strict_json_loads(row.centroids, what="stored centroids"),
        spread=None if row.spread is None else strict_json_loads(row.spread, what="stored spread"),
        created_at=iso_utc(row.created_at),
        revoked=row.revoked_at is not None,
    )


def _retrievable(summaries: list[AdapterSummary], card: BaseCard | None) -> list[AdapterSummary]:
    """The adapters whose centroids retrieval can use: finite, non-zero, of the card's dimension
    (without a card: the most common one). Uploads are checked against the card, so this only
    leaves out rows stored before that check, or under another card; each is logged."""
    dims = Counter(len(c) for a in summaries for c in a.centroids)
    if not dims:
        return []
    dim = card.embedding.dim if card is not None else dims.most_common(1)[0][0]
    usable = []
    for a in summaries:
        vectors = np.asarray(a.centroids, dtype=np.float64) if all(len(c) == dim for c in a.centroids) else None
        if vectors is None or not np.isfinite(vectors).all() or not (np.linalg.norm(vectors, axis=1) > 0.5).all():
            logger.warning("retrieval leaves out %s v%d: its centroids are not %d-dimensional unit vectors",
                           a.name, a.version, dim)
            continue
        usable.append(a)
    return usable


class RegistryService:
    """The registry's operations over one database and one blob store.

    Args:
        sessions: Session factory bound to the registry database.
        blobs: Where bundle files are stored.
    """

    def __init__(
        self, sessions: sessionmaker[Session], blobs: BlobStore, registry_key: Ed25519PrivateKey | None = None,
        index_ttl_seconds: int = 86400, uploads_per_minute: int = 0, root_rotations: list[RootRotation] | None = None,
        min_samples: int = DEFAULT_MIN_SAMPLES, epsilon_budget: float | None = DEFAULT_EPSILON_BUDGET,
        base_cards: BaseCardStore | None = None,
    ) -> None:
        self._sessions = sessions
        self.base_cards = base_cards if base_cards is not None else BaseCardStore(None)
        self._min_samples = min_samples
        self._epsilon_budget = epsilon_budget
        self._blobs = blobs
        self._registry_key = registry_key
        self._root_rotations = list(root_rotations or [])
        self._index_ttl = index_ttl_seconds
        self._uploads_per_minute = uploads_per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # key id → (tokens, last refill)
        # Serialises "check version → write blobs → commit → clean up" inside one process,
        # so two uploads here never race; across replicas the UNIQUE constraint decides.
        self._publish_lock = threading.Lock()
        #: base fingerprint → (library version, centroid table, summaries, ANN index or None)
        self._tables: dict[str, tuple[int, CentroidTable, list[AdapterSummary], Any]] = {}

    @property
    def epsilon_budget(self) -> float | None:
        """The DP ε each publisher may spend on centroids; None: no limit."""
        return self._epsilon_budget

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
                session.commit()
            except IntegrityError:
                raise ConflictError(f"key {kid} is already registered", code="key_exists") from None
            return _key_public(row)

    def list_keys(self) -> list[KeyPublic]:
        """Every publisher key, oldest first, with the ε its publisher has spent."""
        with self._sessions() as session:
            rows = list(session.scalars(select(Publisher).order_by(Publisher.created_at, Publisher.key_id)))
            per_key = dict(session.execute(
                select(Adapter.publisher_key_id, func.sum(Adapter.privacy_epsilon))
                .where(Adapter.privacy_epsilon.is_not(None)).group_by(Adapter.publisher_key_id)
            ).all())
        chains = _owner_chains({row.key_id: row.rotated_to for row in rows})
        return [_key_public(row, float(sum(per_key.get(k, 0.0) for k in chains[row.key_id]))) for row in rows]

    def _trusted_keys(self) -> dict[str, bytes]:
        """Keys that may publish now: active and not rotated away."""
        with self._sessions() as session:
            rows = session.scalars(select(Publisher).where(Publisher.active.is_(True), Publisher.rotated_to.is_(None)))
            return {row.key_id: bytes.fromhex(row.public_key) for row in rows}

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, files: Mapping[str, bytes]) -> UploadReceipt:
        """Verify a bundle (file name → bytes) and store it as a new adapter version.

        Raises:
            VerificationError: any subclass from ``check_bundle`` (nothing is stored).
            UnknownBaseError: ``unknown_base``, the registry has no card of the adapter's base.
            IncompatibleAdapterError: the adapter does not fit its base card (shapes, rank, alpha,
                embedding space, values, effect; see :mod:`semla.registry.basecheck`).
            TooFewSamplesError: the centroid summarises fewer samples than the registry's floor.
            ConflictError: ``name_taken`` or ``stale_version`` (nothing is stored).
            PrivacyBudgetError: the manifest's DP ε would take its publisher above the budget.
        """
        report = check_bundle(files, self._trusted_keys())
        if isinstance(report.error, UnknownKeyError) and report.manifest is not None:
            self._explain_unknown_key(report.manifest.publisher)
        if report.error is not None:
            raise report.error
        manifest = report.manifest
        assert manifest is not None
        card = card_for(manifest.base_model.fingerprint, self.base_cards.cards())
        verify_against_card(card, manifest, files[ADAPTER_WEIGHTS_FILE])
        check_min_samples(manifest.sample_count, self._min_samples,
                          what=f"the centroid of {manifest.name} v{manifest.version}")
        self._take_upload_token(manifest.publisher)
        with self._publish_lock, self._sessions() as session:
            self._lock_publishing(session)
            self._check_version_rule(session, manifest)
            self._check_privacy_budget(session, manifest)
            digests = {name: sha256_bytes(files[name]) for name in BUNDLE_FILES}
            created: list[str] = []
            try:
                for name in BUNDLE_FILES:
                    if not self._blobs.exists(digests[name]):
                        self._blobs.put(files[name])
                        created.append(digests[name])
                session.add(self._adapter_row(manifest, files, digests))
                session.commit()
            except IntegrityError:
                session.rollback()
                self._discard_unreferenced(session, created)
                raise ConflictError(
                    f"{manifest.name} version {manifest.version} was published concurrently",
                    code="stale_version",
                ) from None
            except BaseException:
                session.rollback()
                self._discard_unreferenced(session, created)
                raise
        # Another replica may have discarded a blob it shared with us before our row existed;
        # now that the row is committed, make sure every blob is (still) there.
        for name in BUNDLE_FILES:
            if not self._blobs.exists(digests[name]):
                self._blobs.put(files[name])
        return UploadReceipt(
            name=manifest.name,
            version=manifest.version,
            publisher=manifest.publisher,
            manifest_sha256=digests[MANIFEST_FILE],
        )

    def _check_version_rule(self, session: Session, manifest: Manifest) -> None:
        latest = session.execute(
            select(Adapter.publisher_key_id, Adapter.version)
            .where(Adapter.name == manifest.name)
            .order_by(Adapter.version.desc())
            .limit(1)
        ).first()
        if latest is None:
            return
        owner, version = latest
        for _ in range(64):  # a name passes along its owner's rotation chain
            successor = session.scalar(select(Publisher.rotated_to).where(Publisher.key_id == owner))
            if owner == manifest.publisher or successor is None:
                break
            owner = successor
        if owner != manifest.publisher:
            raise ConflictError(
                f"adapter name {manifest.name!r} belongs to publisher {owner}", code="name_taken"
            )
        if manifest.version <= version:
            raise ConflictError(
                f"{manifest.name} version {manifest.version} is not newer than the stored version {version}",
                code="stale_version",
            )

    def _check_privacy_budget(self, session: Session, manifest: Manifest) -> None:
        """Refuse a DP centroid whose ε would take its publisher's total above the budget.

        Runs under the publish locks, in the transaction that inserts the adapter row.

        Raises:
            PrivacyBudgetError: ``privacy_budget``.
        """
        epsilon = manifest.privacy.epsilon
        if epsilon is None or self._epsilon_budget is None:
            return
        chain = self._owner_chain(session, manifest.publisher)
        spent = float(session.scalar(select(func.coalesce(func.sum(Adapter.privacy_epsilon), 0.0))
                                     .where(Adapter.publisher_key_id.in_(chain))))
        budget = self._epsilon_budget
        if spent + epsilon > budget + _BUDGET_SLACK:
            raise PrivacyBudgetError(
                f"{manifest.name} v{manifest.version} would spend epsilon {epsilon:g} on its centroid; publisher "
                f"{manifest.publisher} has spent {spent:g} of its budget {budget:g} "
                f"(remaining {max(0.0, budget - spent):g})"
            )

    @staticmethod
    def _owner_chain(session: Session, key_id: str) -> list[str]:
        """Every key of ``key_id``'s publisher (its rotation chain), oldest first."""
        rows = session.execute(select(Publisher.key_id, Publisher.rotated_to)).all()
        return _owner_chains(dict(rows)).get(key_id, [key_id])

    @staticmethod
    def _adapter_row(manifest: Manifest, files: Mapping[str, bytes], digests: Mapping[str, str]) -> Adapter:
        row = Adapter(
            name=manifest.name,
            version=manifest.version,
            publisher_key_id=manifest.publisher,
            manifest_sha256=digests[MANIFEST_FILE],
            base_fingerprint=manifest.base_model.fingerprint,
            domain=manifest.domain,
            sample_count=manifest.sample_count,
            centroids=canonical_json(manifest.centroids.vectors).decode("utf-8"),
            privacy_epsilon=manifest.privacy.epsilon,
            privacy_delta=manifest.privacy.delta,
            spread=None if manifest.spread is None else canonical_json(list(manifest.spread.quantiles)).decode("utf-8"),
        )
        row.files = [
            AdapterFile(filename=name, sha256=digests[name], size=len(files[name])) for name in BUNDLE_FILES
        ]
        return row

    def _explain_unknown_key(self, key_id: str) -> None:
        """A registered key that may not publish: say whether it was revoked or rotated.

        Raises:
            UnknownKeyError: ``key_revoked`` or ``key_rotated`` (nothing when the key is unknown).
        """
        with self._sessions() as session:
            row = session.get(Publisher, key_id)
        if row is not None and not row.active:
            raise UnknownKeyError(f"publisher key {key_id} was revoked", code="key_revoked")
        if row is not None and row.rotated_to is not None:
            raise UnknownKeyError(f"publisher key {key_id} was rotated to {row.rotated_to}; sign with the new key",
                                  code="key_rotated")

    def _take_upload_token(self, key_id: str) -> None:
        """Token bucket per publisher key: ``uploads_per_minute`` tokens, refilled continuously.

        Raises:
            RateLimitedError: the key has used up its uploads for now.
        """
        rate = self._uploads_per_minute
        if rate <= 0:
            return
        now = time.monotonic()
        with self._publish_lock:
            tokens, last = self._buckets.get(key_id, (float(rate), now))
            tokens = min(float(rate), tokens + (now - last) * rate / 60.0)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                raise RateLimitedError(f"key {key_id} may upload {rate} bundles a minute; retry in "
                                       f"{(1.0 - tokens) * 60.0 / rate:.0f} s")
            self._buckets[key_id] = (tokens - 1.0, now)

    @staticmethod
    def _lock_publishing(session: Session) -> None:
        """Serialise "reuse or write blobs → commit" and "discard unreferenced blobs" across
        replicas sharing one PostgreSQL database (held until the transaction ends). Without it a
        failing upload could delete a blob that a concurrent upload reused but had not committed
        yet. One process is already serialised by ``_publish_lock``."""
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PUBLISH_LOCK_KEY})

    def _discard_unreferenced(self, session: Session, digests: list[str]) -> None:
        self._lock_publishing(session)
        for digest in digests:
            referenced = session.scalar(select(func.count()).where(AdapterFile.sha256 == digest))
            if not referenced:
                self._blobs.delete(digest)
        session.commit()  # ends the transaction: releases the lock

    # -- signed index ---------------------------------------------------------------------------
    def registry_key(self) -> IndexKey:
        if self._registry_key is None:
            raise NotFoundError("this registry has no signing key")
        raw = _keys.public_bytes(self._registry_key)
        return IndexKey(key_id=_keys.key_id(raw), public_key=raw.hex())

    def _index_version(self, session: Session) -> int:
        return int(session.scalar(select(index_version_expr())))

    def signed_index(self) -> SignedIndex:
        """The library as a snapshot signed by the registry key, valid for the index TTL.

        Raises:
            NotFoundError: the registry has no signing key.
        """
        me = self.registry_key()
        with self._sessions() as session:
            version = self._index_version(session)
            keys = [IndexKey(key_id=r.key_id, public_key=r.public_key)
                    for r in session.scalars(select(Publisher).where(Publisher.active.is_(True))
                                             .order_by(Publisher.key_id))]
        expires = iso_utc(utcnow() + timedelta(seconds=self._index_ttl))
        signed = IndexSigned(version=version, expires=expires, adapters=self.list_adapters(), keys=keys)
        sig = _keys.sign(self._registry_key, INDEX_CONTEXT + canonical_json(signed.model_dump(mode="json")))
        return SignedIndex(signed=signed, signatures=[IndexSignature(keyid=me.key_id, sig=sig.hex())],
                           root_rotations=self._root_rotations)

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
            session.commit()
            return _summary(row)

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
            session.commit()
        return next(k for k in self.list_keys() if k.key_id == new_id)  # with the spend it carries

    def revoke_key(self, key_id: str) -> KeyPublic:
        """Deactivate a publisher key (admin): it can no longer publish and its adapters leave the index.

        Raises:
            NotFoundError: no such key.
        """
        with self._sessions() as session:
            row = session.get(Publisher, key_id)
            if row is None:
                raise NotFoundError(f"no publisher key {key_id}")
            row.active = False
            session.commit()
            return _key_public(row)

    def sweep_orphans(self, *, min_age_s: float = 3600.0) -> dict[str, int]:
        """Delete blobs no database row references, and temp files a crash left behind.

        Only files older than ``min_age_s`` go: an upload in flight writes its blobs before its
        row commits, so a young unreferenced blob may be about to be referenced (by this or
        another replica).

        Returns:
            Counts: ``blobs`` and ``temp_files`` deleted, ``kept_young`` skipped for their age.
        """
        with self._sessions() as session:
            referenced = set(session.scalars(select(AdapterFile.sha256).distinct()))
        now = time.time()
        counts = {"blobs": 0, "temp_files": 0, "kept_young": 0}
        for path, digest in self._blobs.files():
            if digest is not None and digest in referenced:
                continue
            if now - path.stat().st_mtime < min_age_s:
                counts["kept_young"] += 1
                continue
            if digest is None:
                path.unlink(missing_ok=True)
                counts["temp_files"] += 1
            else:
                with self._publish_lock, self._sessions() as session:  # re-check under the locks
                    self._lock_publishing(session)
                    if session.scalar(select(func.count()).where(AdapterFile.sha256 == digest)):
                        continue
                    self._blobs.delete(digest)
                counts["blobs"] += 1
        return counts

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

    # -- queries --------------------------------------------------------------------------------
    def list_adapters(self, *, name: str | None = None, domain: str | None = None) -> list[AdapterSummary]:
        """The newest live version of every adapter name, optionally filtered (domain: substring).

        Revoked versions and the adapters of revoked (inactive) publisher keys are left out, so
        they vanish from every node's retrieval at its next pull.
        """
        newest = select(Adapter.name, func.max(Adapter.version).label("version")).where(live_adapter())
        if name is not None:  # filter before grouping: one name must not group the whole table
            newest = newest.where(Adapter.name == name)
        newest = newest.group_by(Adapter.name).subquery()
        stmt = select(Adapter).join(
            newest, (Adapter.name == newest.c.name) & (Adapter.version == newest.c.version)
        )
        if domain:
            stmt = stmt.where(Adapter.domain.icontains(domain, autoescape=True))
        with self._sessions() as session:
            return [_summary(row) for row in session.scalars(stmt.order_by(Adapter.name))]

    def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        """Brute-force SemLA retrieval (numpy, the node's math) over the newest adapters of a base.

        Raises:
            NotFoundError: no adapter of this base model.
            InvalidInputError: the embedding's dimension differs from the centroids', or an
                unknown weighting scheme (``unknown_weighting``).
        """
        check_weighting(body.weighting)  # before any table is built: a bad name is the caller's 400
        table, summaries, index = self._centroid_table(body.base_fingerprint)
        dim = table.vectors.shape[1]
        if len(body.embedding) != dim:
            raise InvalidInputError(f"embedding has {len(body.embedding)} dimensions; "
                                    f"the centroids of this base have {dim}")
        query = np.asarray([body.embedding], dtype=np.float64)
        query /= np.abs(query).max()  # scaled, then normalised in float64: no overflow in float32
        query = (query / np.linalg.norm(query)).astype(np.float32)
        options = {"top_k": body.top_k, "temperature": body.temperature, "distance": body.distance,
                   "weighting": body.weighting, "guard": body.guard, "guard_z": body.guard_z}
        idx, dist, weights = index.search(query, **options) if index is not None else retrieve_numpy(query, table, **options)
        return RetrieveResponse(results=[
            RetrievedAdapter(name=summaries[i].name, version=summaries[i].version, publisher=summaries[i].publisher,
                             distance=float(d), weight=float(w))
            for i, d, w in zip(idx[0].tolist(), dist[0].tolist(), weights[0].tolist())
        ], base_weight=float(base_weight_of(weights)[0]), weighting=body.weighting)

    def _centroid_table(self, fingerprint: str) -> tuple[CentroidTable, list[AdapterSummary], Any]:
        """The centroid table of one base (with an ANN index above ``ann.ANN_THRESHOLD``
        centroids; brute force below), rebuilt only when the library has changed (checked on
        every call, so replicas sharing a database stay consistent)."""
        with self._sessions() as session:
            generation = self._index_version(session)  # changes with every publish or revocation
        cached = self._tables.get(fingerprint)
        if cached is not None and cached[0] == generation:
            return cached[1:]
        summaries = _retrievable([a for a in self.list_adapters() if a.base_fingerprint == fingerprint],
                                 self.base_cards.cards().get(fingerprint))
        if not summaries:
            raise NotFoundError(f"no adapter for base model {fingerprint[:12]}")
        table = CentroidTable.from_lists([a.centroids for a in summaries], [a.spread for a in summaries])
        from semla.server import ann  # faiss is imported with it: on the first retrieval only

        index = ann.CentroidIndex.build(table) if ann.choose(table) == "ann" else None
        if len(self._tables) >= 8:
            self._tables.pop(next(iter(self._tables)))
        self._tables[fingerprint] = (generation, table, summaries, index)
        return table, summaries, index

    def adapter_versions(self, name: str) -> list[AdapterSummary]:
        """Every stored version of ``name``, newest first.

        Raises:
            NotFoundError: no adapter has this name.
        """
        with self._sessions() as session:
            rows = session.scalars(select(Adapter).where(Adapter.name == name).order_by(Adapter.version.desc()))
            out = [_summary(row) for row in rows]
        if not out:
            raise NotFoundError(f"no adapter named {name!r}")
        return out

    def file_path(self, name: str, version: int, filename: str, *, include_revoked: bool = False) -> Path:
        """Path of the stored blob for one bundle file (looked up by sha from the database).

        Revoked versions are not served (``GoneError``) unless ``include_revoked`` (the
        registry's own pages show what was revoked and why).

        Raises:
            NotFoundError: unknown file name, adapter or version.
            GoneError: ``revoked``: the version, or its publisher key, was revoked.
            RuntimeError: the database names a blob the store does not hold (storage damage).
        """
        if filename not in BUNDLE_FILES:
            raise NotFoundError(f"no bundle file {filename!r}; bundle files are {', '.join(BUNDLE_FILES)}")
        with self._sessions() as session:
            found = session.execute(
                select(AdapterFile.sha256, Adapter.revoked_at, Publisher.active)
                .join(Adapter, AdapterFile.adapter_id == Adapter.id)
                .join(Publisher, Adapter.publisher_key_id == Publisher.key_id)
                .where(Adapter.name == name, Adapter.version == version, AdapterFile.filename == filename)
            ).first()
        if found is None:
            raise NotFoundError(f"no adapter {name!r} version {version}")
        digest, revoked_at, key_active = found
        if revoked_at is not None and not include_revoked:
            raise GoneError(f"{name} version {version} was revoked by its publisher")
        if not key_active and not include_revoked:
            raise GoneError(f"the publisher key of {name} version {version} was revoked")
        if not self._blobs.exists(digest):
            raise RuntimeError(f"blob {digest} of {name} v{version}/{filename} is missing from the store")
        return self._blobs.path(digest)

    def file_bytes(self, name: str, version: int, filename: str, *, include_revoked: bool = False) -> bytes:
        """Like :meth:`file_path`, returning the bytes."""
        return self.file_path(name, version, filename, include_revoked=include_revoked).read_bytes()
