"""The data owner's kit: keys, synthetic data, training, signing and publishing.

Nothing but adapter weights, the adapter config, centroids and metadata ever leaves the
owner's machine; ``semla-client publish --dry-run`` lists every byte that would.
"""

from semla.client.publish import describe_payload, publish_bundle

__all__ = ["describe_payload", "publish_bundle"]
