"""One error tree for the whole project.

Library code raises these; only the edges turn them into something else (HTTP status codes in
``semla.server``, exit codes and one-line messages in the CLIs). Every error carries a short,
stable ``code`` that the registry returns in ``{"error": {"code": ..., "message": ...}}`` so a
client can tell refusals apart without parsing prose::

    SemlaError
    ├── InvalidInputError           bad argument, data directory or image (the caller's fault; also a ValueError)
    │   ├── UnknownNameError        unknown_name: no scene, backbone, scheme… of that name
    │   ├── UnprocessableError      a well-formed request whose content is refused (422)
    │   ├── RequestTooLarge         too_large: a body or a part over its limit (413)
    │   └── BodyTimeout             body_timeout: the body arrived too slowly (408)
    ├── VerificationError           a bundle or message failed verification (possible tampering)
    │   ├── ManifestError           manifest not valid JSON / wrong schema / unknown field
    │   ├── SignatureError          missing or invalid signature
    │   ├── UnknownKeyError         signed by a key the verifier does not trust
    │   ├── FileSetError            a file is missing or one too many
    │   ├── HashMismatchError       a file's sha256 or size differs from the manifest
    │   └── TensorFormatError       not safetensors, bad header, bad shapes, non-finite values
    ├── IncompatibleAdapterError    adapter does not fit its base card (shapes, rank, alpha, effect, space)
    │   └── UnknownBaseError        unknown_base: no base card for the fingerprint it names
    ├── ConflictError               stale/replayed version, name owned by another publisher
    ├── NotFoundError               no such adapter, version, file or key
    │   └── GoneError               revoked: the version or its publisher key was withdrawn
    ├── RateLimitedError            too many requests by one publisher key
    ├── PrivacyError                a release would break a privacy rule (nothing is published)
    │   ├── TooFewSamplesError      too_few_samples: fewer samples than the minimum
    │   └── PrivacyBudgetError      privacy_budget: the publisher's ε budget would be overspent
    ├── RegistryError               the registry refused a request or could not be reached
    ├── UnavailableError            the service cannot answer now (503)
    │   ├── ServiceBusyError        busy: the queue is full or the worker is not running
    │   └── IndexExpiredError       index_expired: no fresh signed index can be had (freeze refused)
    └── StorageError                the server's own storage is damaged (500, logged with its traceback)
        └── SchemaError             schema_revision: the database is not at this code's schema revision
"""

from __future__ import annotations

__all__ = [
    "SemlaError",
    "InvalidInputError",
    "VerificationError",
    "ManifestError",
    "SignatureError",
    "UnknownKeyError",
    "FileSetError",
    "HashMismatchError",
    "TensorFormatError",
    "IncompatibleAdapterError",
    "UnknownBaseError",
    "ConflictError",
    "NotFoundError",
    "GoneError",
    "RateLimitedError",
    "PrivacyError",
    "TooFewSamplesError",
    "PrivacyBudgetError",
    "RegistryError",
    "UnknownNameError",
    "UnprocessableError",
    "RequestTooLarge",
    "BodyTimeout",
    "UnavailableError",
    "ServiceBusyError",
    "IndexExpiredError",
    "StorageError",
    "SchemaError",
]


class SemlaError(Exception):
    """Base of every error this project raises on purpose."""

    code = "semla_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidInputError(SemlaError, ValueError):
    """The caller's input is wrong. Also a ``ValueError``, so pydantic validators and callers
    that catch ``ValueError`` see it as one."""

    code = "invalid_input"


class UnknownNameError(InvalidInputError):
    """A name that selects behaviour (scene, backbone, importer, scheme…) is not registered."""

    code = "unknown_name"


class UnprocessableError(InvalidInputError):
    """A well-formed request whose content is refused (answered 422 with its own code)."""

    code = "invalid_request"


class RequestTooLarge(InvalidInputError):
    """A request body, or one part of it, is larger than its limit (declared or actually sent)."""

    code = "too_large"


class BodyTimeout(InvalidInputError):
    """The request body arrived too slowly (answered 408; the connection is closed)."""

    code = "body_timeout"


class VerificationError(SemlaError):
    code = "verification_failed"


class ManifestError(VerificationError):
    code = "manifest_invalid"


class SignatureError(VerificationError):
    code = "bad_signature"


class UnknownKeyError(VerificationError):
    code = "unknown_key"


class FileSetError(VerificationError):
    code = "file_set"


class HashMismatchError(VerificationError):
    code = "hash_mismatch"


class TensorFormatError(VerificationError):
    code = "tensor_format"


class IncompatibleAdapterError(SemlaError):
    code = "incompatible_adapter"


class UnknownBaseError(IncompatibleAdapterError):
    code = "unknown_base"


class ConflictError(SemlaError):
    code = "conflict"


class NotFoundError(SemlaError):
    code = "not_found"


class GoneError(NotFoundError):
    """The adapter version existed but was revoked (by its publisher or with its key)."""

    code = "revoked"


class RateLimitedError(SemlaError):
    code = "rate_limited"


class PrivacyError(SemlaError):
    code = "privacy"


class TooFewSamplesError(PrivacyError):
    code = "too_few_samples"


class PrivacyBudgetError(PrivacyError):
    code = "privacy_budget"


class RegistryError(SemlaError):
    """The registry answered with an error, or could not be reached.

    Attributes:
        status: HTTP status code, or ``None`` when no answer came back.
    """

    code = "registry_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class UnavailableError(SemlaError):
    """The service cannot answer now; the same request may succeed later (503)."""

    code = "unavailable"


class ServiceBusyError(UnavailableError):
    """The queue is full or the worker is not running."""

    code = "busy"


class IndexExpiredError(UnavailableError):
    """No signed index fresher than the node's limit can be had: serving is refused (freeze)."""

    code = "index_expired"


class StorageError(SemlaError):
    """The server's own storage is damaged or inconsistent: a fault of the operator, never the caller."""

    code = "storage_error"


class SchemaError(StorageError):
    """The database's schema revision is not the one this code needs (message: one line)."""

    code = "schema_revision"
