"""The data owner's kit: keys, synthetic data, training, signing and publishing.

Nothing but adapter weights, the adapter config, centroids and metadata ever leaves the
owner's machine; ``semla-client audit BUNDLE`` and ``semla-client publish --dry-run`` list
every byte that would, and flag what should not be there.
"""

from semla.client.audit import AuditReport, audit_bundle, audit_files, describe_payload
from semla.client.publish import publish_bundle

__all__ = ["AuditReport", "audit_bundle", "audit_files", "describe_payload", "publish_bundle"]
