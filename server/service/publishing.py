"""Publishing: accept a bundle, and sweep the blobs no adapter references.

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

import time
from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from semla.registry.basecheck import card_for, verify_against_card
from semla.registry.bundle import check_bundle, sha256_bytes
from semla.schemas import (
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    MANIFEST_FILE,
    Manifest,
    UploadReceipt,
    canonical_json,
)
from semla.registry.privacy import check_min_samples
from semla.schemas.errors import ConflictError, PrivacyBudgetError, RateLimitedError, UnknownKeyError
from semla.server.db import Adapter, AdapterFile, Publisher, bump_library_version, utcnow
from semla.server.service.core import ServiceCore
from semla.server.service.library import compose_summary

__all__ = ["PublishingPart"]


#: Rounding slack when a spend is compared with the budget (0.1 + 0.2 may reach a budget of 0.3).
_BUDGET_SLACK = 1e-9


class PublishingPart(ServiceCore):
    """Accept bundles; sweep orphan blobs."""

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
                session.flush()  # the UNIQUE(name, version) race is lost here, before the counter's lock
                bump_library_version(session, changed=(Adapter.name == manifest.name) & (Adapter.version == manifest.version))
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
        self._committed([manifest.name])
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
            created_at=utcnow(),
            revoked_at=None,
        )
        row.summary = compose_summary(row)
        row.files = [
            AdapterFile(filename=name, sha256=digests[name], size=len(files[name])) for name in BUNDLE_FILES
        ]
        return row

    def _trusted_keys(self) -> dict[str, bytes]:
        """Keys that may publish now: active and not rotated away."""
        with self._sessions() as session:
            rows = session.scalars(select(Publisher).where(Publisher.active.is_(True), Publisher.rotated_to.is_(None)))
            return {row.key_id: bytes.fromhex(row.public_key) for row in rows}


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

    def _discard_unreferenced(self, session: Session, digests: list[str]) -> None:
        self._lock_publishing(session)
        for digest in digests:
            referenced = session.scalar(select(func.count()).where(AdapterFile.sha256 == digest))
            if not referenced:
                self._blobs.delete(digest)
        session.commit()  # ends the transaction: releases the lock


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
