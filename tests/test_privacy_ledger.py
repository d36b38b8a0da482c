"""The registry's privacy rules: its own minimum sample count and the per-publisher DP ε ledger.

Every refusal leaves nothing stored; concurrent uploads never overspend (one process on SQLite,
two app instances on one PostgreSQL database); a rotated key's spend carries to its successor.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import bundle_factory
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import inspect, text
from test_server import _rotate, assert_error, make_client, register, snapshot, upload

from semla.registry import keys
from semla.registry.http import RegistryClient
from semla.server import ServerSettings, create_app
from semla.server.db import alembic_config, current_revision, head_revision, make_engine, upgrade


def dp(epsilon: float, delta: float = 1e-5) -> dict:
    return {"privacy": {"mechanism": "gaussian", "epsilon": epsilon, "delta": delta, "clip_norm": 1.0,
                        "min_samples": 50}}


def ledger(client: TestClient, key) -> dict:
    resp = client.get(f"/v1/keys/{keys.key_id(key)}/privacy")
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture()
def data_dir(tmp_path):
    return tmp_path / "data"


# -- the sample floor -----------------------------------------------------------------------------
def test_the_registry_enforces_its_own_sample_floor(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLA_MIN_SAMPLES", "40")
    assert ServerSettings().min_samples == 40
    few = {"sample_count": 30, "privacy": {"mechanism": "none", "min_samples": 10}}  # valid by its own rule
    with make_client(data_dir) as client:
        key = keys.generate_key()
        register(client, key)
        before = snapshot(client, data_dir)
        resp = upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="few", **few))
        assert_error(resp, 422, "too_few_samples")
        assert "30 samples; at least 40" in resp.json()["error"]["message"]
        assert snapshot(client, data_dir) == before
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="enough", **{**few, "sample_count": 40})).status_code == 201
    with make_client(tmp_path / "lenient", min_samples=10) as client:  # a registry may lower it, on purpose
        register(client, key)
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="few", **few)).status_code == 201


# -- the budget -----------------------------------------------------------------------------------
def test_budget_edge_is_exact_and_a_refusal_stores_nothing(data_dir, tmp_path):
    with make_client(data_dir, epsilon_budget=10.0) as client:
        key = keys.generate_key()
        register(client, key)
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="a", **dp(4.0))).status_code == 201
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="b", **dp(6.0))).status_code == 201
        before = snapshot(client, data_dir)

        resp = upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="c", **dp(0.5)))

        assert_error(resp, 403, "privacy_budget")
        assert "spent 10 of its budget 10" in resp.json()["error"]["message"]
        assert snapshot(client, data_dir) == before
        assert client.get("/v1/adapters/c").status_code == 404
        # a centroid without DP carries no epsilon: not charged, not refused
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="plain")).status_code == 201

        spend = ledger(client, key)
        assert (spend["budget"], spend["spent"], spend["remaining"]) == (10.0, 10.0, 0.0)
        assert spend["delta_spent"] == pytest.approx(2e-5)
        assert spend["keys"] == [keys.key_id(key)]
        assert [(e["name"], e["version"], e["epsilon"], e["key_id"]) for e in spend["entries"]] == [
            ("a", 1, 4.0, keys.key_id(key)), ("b", 1, 6.0, keys.key_id(key))]
        assert [k["epsilon_spent"] for k in client.get("/v1/keys").json()] == [10.0]
        with RegistryClient("http://testserver", client=client) as registry:  # the client kit's call
            typed = registry.privacy_ledger(keys.key_id(key))
        assert typed.spent == 10.0 and [e.name for e in typed.entries] == ["a", "b"]


def test_a_budget_reached_by_rounding_is_not_overspent(data_dir, tmp_path):
    with make_client(data_dir, epsilon_budget=0.3) as client:
        key = keys.generate_key()
        register(client, key)
        for name, epsilon in (("a", 0.1), ("b", 0.2)):  # 0.1 + 0.2 = 0.30000000000000004
            assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name=name, **dp(epsilon))).status_code == 201
        assert_error(upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="c", **dp(1e-6))),
                     403, "privacy_budget")


def test_revoking_refunds_nothing_and_budgets_are_per_publisher(data_dir, tmp_path):
    from semla.schemas import revocation_payload

    with make_client(data_dir, epsilon_budget=5.0) as client:
        one, two = keys.generate_key(), keys.generate_key()
        register(client, one)
        register(client, two)
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, one, name="a", **dp(5.0))).status_code == 201
        sig = keys.sign(one, revocation_payload("a", 1)).hex()
        assert client.post("/v1/adapters/a/1/revoke", json={"signature": sig}).status_code == 200
        assert_error(upload(client, bundle_factory.make_bundle_files(tmp_path, one, name="a", version=2, **dp(1.0))),
                     403, "privacy_budget")
        assert [e["revoked"] for e in ledger(client, one)["entries"]] == [True]
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, two, name="b", **dp(5.0))).status_code == 201
        assert_error(client.get(f"/v1/keys/{'0' * 16}/privacy"), 404, "not_found")
        assert_error(client.get("/v1/keys/not-a-key/privacy"), 422, "invalid_request")


def test_a_rotated_keys_spend_carries_to_the_new_key(data_dir, tmp_path):
    with make_client(data_dir, epsilon_budget=10.0) as client:
        old, new = keys.generate_key(), keys.generate_key()
        register(client, old)
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, old, name="a", **dp(6.0))).status_code == 201
        rotated = _rotate(client, old, new)
        assert rotated.status_code == 201 and rotated.json()["epsilon_spent"] == 6.0
        before = snapshot(client, data_dir)
        assert_error(upload(client, bundle_factory.make_bundle_files(tmp_path, new, name="b", **dp(5.0))),
                     403, "privacy_budget")
        assert snapshot(client, data_dir) == before
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, new, name="b", **dp(4.0))).status_code == 201
        for key in (old, new):  # one publisher, one ledger, whichever key is asked
            spend = ledger(client, key)
            assert spend["keys"] == [keys.key_id(old), keys.key_id(new)]
            assert (spend["spent"], spend["remaining"]) == (10.0, 0.0)
            assert [e["key_id"] for e in spend["entries"]] == [keys.key_id(old), keys.key_id(new)]
        assert {k["key_id"]: k["epsilon_spent"] for k in client.get("/v1/keys").json()} == {
            keys.key_id(old): 10.0, keys.key_id(new): 10.0}
        page = client.get("/keys")
        assert page.status_code == 200 and "\u03b5 10 of 10 spent (0 left)" in page.text
        assert f"rotated to <a href=\"#{keys.key_id(new)}\">" in page.text
        assert "publisher&#x27;s spend" in client.get("/adapters/b").text


def test_concurrent_dp_uploads_never_overspend(data_dir, tmp_path):
    with make_client(data_dir, epsilon_budget=10.0, uploads_per_minute=0) as client:
        key = keys.generate_key()
        register(client, key)
        bundles = [bundle_factory.make_bundle_files(tmp_path, key, name=f"n{i}", seed=i, **dp(3.0)) for i in range(8)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            codes = sorted(r.status_code for r in pool.map(lambda files: upload(client, files), bundles))
        assert codes == [201] * 3 + [403] * 5
        assert ledger(client, key)["spent"] == 9.0
        assert snapshot(client, data_dir)["rows"]["adapters"] == 3


@pytest.mark.parametrize(("env", "budget"), [("", None), ("none", None), ("inf", None), ("2.5", 2.5), ("0", 0.0)])
def test_budget_setting_from_the_environment(env, budget, monkeypatch):
    monkeypatch.setenv("SEMLA_EPSILON_BUDGET", env)
    assert ServerSettings().epsilon_budget == budget


def test_budget_setting_refuses_a_negative_value(monkeypatch):
    monkeypatch.setenv("SEMLA_EPSILON_BUDGET", "-1")
    with pytest.raises(ValidationError):
        ServerSettings()


def test_no_limit_records_spend_and_zero_refuses_every_dp_upload(tmp_path):
    key = keys.generate_key()
    with make_client(tmp_path / "open", epsilon_budget=None) as client:
        register(client, key)
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="a", **dp(50.0))).status_code == 201
        spend = ledger(client, key)
        assert (spend["budget"], spend["spent"], spend["remaining"]) == (None, 50.0, None)
        assert "\u03b5 50 spent (no limit)" in client.get("/keys").text
    with make_client(tmp_path / "closed", epsilon_budget=0.0) as client:
        register(client, key)
        assert_error(upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="a", **dp(0.01))),
                     403, "privacy_budget")
        assert upload(client, bundle_factory.make_bundle_files(tmp_path, key, name="b")).status_code == 201


# -- migration 0004 -------------------------------------------------------------------------------
def test_migration_0004_keeps_existing_adapters_at_zero_spend(tmp_path):
    from alembic import command

    data_dir = tmp_path / "d"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'registry.db'}"
    engine = make_engine(url)
    command.upgrade(alembic_config(url), "0003")
    kid = "0123456789abcdef"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO publishers (key_id, public_key, label, active, created_at) "
                          "VALUES (:k, :p, '', 1, '2026-01-01 00:00:00')"), {"k": kid, "p": "00" * 32})
        conn.execute(text("INSERT INTO adapters (name, version, publisher_key_id, manifest_sha256, base_fingerprint, "
                          "domain, sample_count, centroids, created_at) VALUES ('old', 1, :k, :s, :s, '', 60, '[]', "
                          "'2026-01-01 00:00:00')"), {"k": kid, "s": "0" * 64})
    assert current_revision(engine) == "0003"
    assert upgrade(engine) == head_revision() == "0005"
    columns = {c["name"] for c in inspect(engine).get_columns("adapters")}
    assert {"privacy_epsilon", "privacy_delta"} <= columns
    engine.dispose()
    with TestClient(create_app(ServerSettings(data_dir=data_dir))) as client:
        resp = client.get(f"/v1/keys/{kid}/privacy")
        assert resp.status_code == 200 and resp.json()["spent"] == 0.0 and resp.json()["entries"] == []
    engine = make_engine(url)
    command.downgrade(alembic_config(url), "0003")  # and back, on SQLite's batch mode
    assert "privacy_epsilon" not in {c["name"] for c in inspect(engine).get_columns("adapters")}
    engine.dispose()


# -- PostgreSQL: two app instances, one database --------------------------------------------------
def test_two_replicas_on_postgres_never_overspend(pg_url, tmp_path):
    upgrade(pg_url)
    bundle_factory.install_base_card(tmp_path / "shared")
    settings = ServerSettings(data_dir=tmp_path / "shared", database_url=pg_url, admin_token="pg-admin-token",
                              epsilon_budget=10.0, uploads_per_minute=0)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        key = keys.generate_key()
        resp = a.post("/v1/keys", json={"public_key": keys.public_bytes(key).hex()},
                      headers={"Authorization": "Bearer pg-admin-token"})
        assert resp.status_code == 201, resp.text
        bundles = [bundle_factory.make_bundle_files(tmp_path, key, name=f"n{i}", seed=i, **dp(3.0)) for i in range(8)]
        gate = threading.Barrier(len(bundles))

        def send(i: int):
            gate.wait(timeout=30)
            return upload((a, b)[i % 2], bundles[i])

        with ThreadPoolExecutor(len(bundles)) as pool:
            responses = list(pool.map(send, range(len(bundles))))
        assert sorted(r.status_code for r in responses) == [201] * 3 + [403] * 5, [r.text for r in responses]
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 403} == {"privacy_budget"}
        for client in (a, b):
            assert ledger(client, key)["spent"] == 9.0
            assert len(client.get("/v1/adapters").json()) == 3

