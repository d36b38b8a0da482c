"""The signed spread (manifest schema 2) on the node and under DP; schema-1 adapters still work."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from semla.client import publish_bundle
from semla.registry import keys, privacy, synth
from semla.registry.http import RegistryClient
from semla.registry.node import Node
from semla.schemas import MANIFEST_FILE, Manifest, canonical_json
from semla.schemas.errors import VerificationError
from semla.server import ServerSettings, create_app

TOKEN = "spread-test-token"
CLASSES = list(synth.STREET_CLASSES)


def _as_schema_1(bundle, out):
    """A copy of a trained (schema 2) bundle whose manifest is rewritten as schema 1 (no spread)."""
    shutil.copytree(bundle, out)
    raw = json.loads((out / MANIFEST_FILE).read_bytes())
    raw.pop("spread")
    raw["schema_version"] = 1
    raw["name"] = "fog-v1"
    (out / MANIFEST_FILE).write_bytes(canonical_json(raw))
    return out


@pytest.fixture(scope="module")
def mixed_registry(tmp_path_factory, fog_night_library):
    """A registry with fog as a schema-1 adapter and night as trained (schema 2)."""
    root = tmp_path_factory.mktemp("spread")
    app = create_app(ServerSettings(data_dir=root / "registry", admin_token=TOKEN))
    client = RegistryClient("http://registry.test", client=TestClient(app, base_url="http://registry.test"))
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    publish_bundle(_as_schema_1(fog_night_library["fog"], root / "fog"), client, key=key)
    publish_bundle(shutil.copytree(fog_night_library["night"], root / "night"), client, key=key)
    return client


def test_trained_bundles_are_schema_2_with_exact_spread(fog_night_library):
    m = Manifest.parse((fog_night_library["night"] / MANIFEST_FILE).read_bytes())
    assert m.schema_version == 2 and m.spread is not None
    assert m.spread.mechanism == "none" and m.spread.count == m.sample_count
    assert 0.0 <= m.spread.q50 <= m.spread.q90 <= m.spread.q99 <= 2.0
    assert m.spread.q99 > 0.0


def test_v1_and_v2_adapters_verify_and_fuse_on_the_node(mixed_registry, fresh_base, tmp_path):
    node = Node(mixed_registry, base=fresh_base, cache_dir=tmp_path / "cache")
    node.pull()
    by_name = {a.name: a for a in node.library}
    assert by_name["fog-v1"].spread is None and by_name["night"].spread is not None
    table = node._table
    assert table.spread_known.tolist() == [a.spread is not None for a in node.library]
    assert np.allclose(table.spreads[[a.name for a in node.library].index("fog-v1")],
                       by_name["night"].spread)  # the default: the median of the published spreads
    for summary in node.library:  # each is downloaded and verified end to end (signature, files, card)
        assert node.adapter(summary).key
    assert not node.excluded
    images = [synth.render(d, 5, 0)[0] for d in ("fog", "night")]
    preds = node.segment(images, CLASSES, top_k=2, guard=True)
    for p in preds:
        assert 0.0 < p.base_weight < 1.0
        assert sum(c.weight for c in p.contributions) + p.base_weight == pytest.approx(1.0, abs=1e-5)
    plain = node.segment(images, CLASSES, top_k=2, weighting="paper")
    assert all(p.base_weight == pytest.approx(0.0, abs=1e-6) for p in plain)


def test_a_listed_spread_that_differs_from_the_signed_one_is_refused(mixed_registry, fresh_base, tmp_path):
    node = Node(mixed_registry, base=fresh_base, cache_dir=tmp_path / "cache")
    node.pull()
    night = next(a for a in node.library if a.name == "night")
    files = node._fetch(night)
    node._check_and_load(night, files)  # as listed: fine
    for forged in ([0.0, 0.0, 2.0], None):
        with pytest.raises(VerificationError, match="spread"):
            node._check_and_load(night.model_copy(update={"spread": forged}), files)
    fog = next(a for a in node.library if a.name == "fog-v1")
    with pytest.raises(VerificationError, match="spread"):
        node._check_and_load(fog.model_copy(update={"spread": [0.1, 0.2, 0.3]}), node._fetch(fog))


# -- DP -------------------------------------------------------------------------------------------
def test_dp_spread_is_a_noisy_histogram_of_its_budget_share():
    rng = np.random.default_rng(0)
    d = np.clip(rng.normal(0.5, 0.05, size=20000), 0, 2)
    exact = privacy.exact_spread(d)
    release = privacy.dp_spread(d, 1.0, 1e-6, count=20000, rng=1)
    assert release.sigma == pytest.approx(privacy.analytic_gaussian_sigma(1.0, 1e-6, 1.0))
    assert np.allclose(release.quantiles, exact.quantiles, atol=0.07)  # 32 bins of 0.0625 over [0, 2]
    assert release.manifest_block()["mechanism"] == "gaussian-histogram"
    again = privacy.dp_spread(d, 1.0, 1e-6, count=20000, rng=1)
    other = privacy.dp_spread(d, 1.0, 1e-6, count=20000, rng=2)
    assert again == release and other.quantiles != release.quantiles  # noise, reproducible by seed
    centroid_part, spread_part = privacy.split_for_spread(4.0, 1e-5)
    total = privacy.compose(centroid_part, spread_part)
    assert total.epsilon == pytest.approx(4.0) and total.delta == pytest.approx(1e-5)
    assert spread_part.epsilon == pytest.approx(4.0 * privacy.DEFAULT_SPREAD_SHARE)


def test_histogram_quantiles_by_hand():
    # 4 bins of width 0.5: half the mass in [0, 0.5), half in [0.5, 1.0)
    assert privacy.histogram_quantiles(np.array([5.0, 5.0, 0.0, 0.0])) == pytest.approx((0.5, 0.9, 0.99))
    assert privacy.histogram_quantiles(np.array([-3.0, 10.0, -1.0, 0.0])) == pytest.approx((0.75, 0.95, 0.995))
    assert privacy.histogram_quantiles(np.zeros(4)) == pytest.approx((1.0, 1.8, 1.98))  # nothing left: uniform


def test_dp_training_charges_the_spread_to_the_same_ledger(fog_data, tiny_base, tmp_path):
    from semla.registry.train import TrainConfig, train_adapter

    manifest = train_adapter(fog_data, tmp_path / "dp", "fog-dp", TrainConfig(steps=1, dp_epsilon=4.0, dp_seed=3),
                             base=tiny_base, progress=False)
    assert manifest.schema_version == 2
    assert manifest.privacy.epsilon == 4.0 and manifest.privacy.delta == 1e-5  # the whole release
    spread = manifest.spread
    assert spread.mechanism == "gaussian-histogram" and spread.bins == privacy.DEFAULT_SPREAD_BINS
    assert spread.epsilon == pytest.approx(4.0 * privacy.DEFAULT_SPREAD_SHARE)
    assert spread.delta == pytest.approx(1e-5 * privacy.DEFAULT_SPREAD_SHARE)
    assert spread.count == manifest.sample_count

    app = create_app(ServerSettings(data_dir=tmp_path / "registry", admin_token=TOKEN, epsilon_budget=5.0))
    client = RegistryClient("http://registry.test", client=TestClient(app, base_url="http://registry.test"))
    key = keys.generate_key()
    client.register_key(keys.public_bytes(key).hex(), TOKEN)
    publish_bundle(tmp_path / "dp", client, key=key)
    ledger = client._client.get(f"http://registry.test/v1/keys/{keys.key_id(key)}/privacy").json()
    assert ledger["spent"] == pytest.approx(4.0)  # centroid, count and spread: one charge
    assert [e["epsilon"] for e in ledger["entries"]] == [pytest.approx(4.0)]


def test_spread_block_is_dataclass_free_json():
    block = privacy.exact_spread(np.array([0.1, 0.2, 0.3])).manifest_block()
    assert json.loads(json.dumps(block)) == block
    assert not dataclasses.is_dataclass(block)


def test_the_audit_shows_the_spread(fog_night_library):
    from semla.client.audit import audit_files
    from semla.registry.bundle import read_bundle

    report = audit_files(read_bundle(fog_night_library["night"]))
    text = "\n".join(report.lines())
    spread = Manifest.parse((fog_night_library["night"] / MANIFEST_FILE).read_bytes()).spread
    assert f"spread: distances of the training embeddings to their nearest centroid q50={spread.q50:.4f}" in text
    assert "spread.q99 = " in text  # and among the manifest's listed fields
    assert report.to_json()["summary"]["spread"]["q90"] == spread.q90
