"""Wire and file formats shared by the client kit, the registry server and inference nodes.

Everything here is pure pydantic + stdlib, so every role (including the torch-free server) can
import it. ``canonical_json`` is the only encoder ever used for bytes that are signed or hashed.
"""

from semla.schemas._canonical import canonical_json, strict_json_loads
from semla.schemas.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_FILES,
    MANIFEST_FILE,
    MANIFEST_SCHEMA_VERSION,
    NAME_PATTERN,
    SIGNATURE_FILE,
    SIGNING_CONTEXT,
    BaseModelRef,
    Centroids,
    FederatedProvenance,
    FileEntry,
    Manifest,
    Privacy,
    TrainingProvenance,
    revocation_payload,
    signing_payload,
)
from semla.schemas.api import (
    AdapterSummary,
    ErrorBody,
    ErrorResponse,
    KeyCreate,
    KeyPublic,
    RetrievedAdapter,
    RetrieveRequest,
    RetrieveResponse,
    RevokeRequest,
    UploadReceipt,
)

__all__ = [
    "canonical_json",
    "strict_json_loads",
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "BUNDLE_FILES",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA_VERSION",
    "NAME_PATTERN",
    "SIGNATURE_FILE",
    "SIGNING_CONTEXT",
    "BaseModelRef",
    "Centroids",
    "FederatedProvenance",
    "FileEntry",
    "Manifest",
    "Privacy",
    "TrainingProvenance",
    "signing_payload",
    "revocation_payload",
    "AdapterSummary",
    "ErrorBody",
    "ErrorResponse",
    "KeyCreate",
    "KeyPublic",
    "RetrievedAdapter",
    "RetrieveRequest",
    "RetrieveResponse",
    "RevokeRequest",
    "UploadReceipt",
]
