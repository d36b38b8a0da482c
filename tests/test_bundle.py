"""Bundle format: canonical bytes, round trip, signatures, and the verifier's tamper matrix."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest

import bundle_factory as bf
from semla.registry import keys
from semla.registry.bundle import check_bundle, read_bundle, sign_bundle, verify_bundle, write_bundle
from semla.schemas import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE, Manifest, canonical_json, signing_payload
from semla.schemas.errors import (
    FileSetError,
    HashMismatchError,
    InvalidInputError,
    ManifestError,
    SignatureError,
    TensorFormatError,
    UnknownKeyError,
)

GOLDEN_OBJECT = {"b": [1, 2.5, -0.0, 1e-7], "a": {"z": "é", "y": None, "x": True}, "c": "line\nbreak"}


def test_canonical_json_golden_bytes(update_goldens):
    from conftest import GOLDEN_DIR

    data = canonical_json(GOLDEN_OBJECT)
    path = GOLDEN_DIR / "canonical.json"
    if update_goldens:
        path.write_bytes(data)
    assert data == path.read_bytes()
    assert canonical_json(json.loads(data)) == data  # stable under a round trip
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_manifest_signing_payload_golden(update_goldens):
    from conftest import GOLDEN_DIR

    fields = bf.manifest_fields()
    fields["publisher"] = "0123456789abcdef"
    fields["files"] = {
        "adapter_model.safetensors": {"sha256": "1" * 64, "size": 10},
        "adapter_config.json": {"sha256": "2" * 64, "size": 20},
    }
    digest = hashlib.sha256(signing_payload(Manifest.model_validate(fields))).hexdigest()
    path = GOLDEN_DIR / "manifest_payload.sha256"
    if update_goldens:
        path.write_text(digest + "\n")
    assert digest == path.read_text().strip()


@pytest.fixture
def key():
    return keys.generate_key()


@pytest.fixture
def trusted(key):
    return {keys.key_id(key): keys.public_bytes(key)}


def test_round_trip_and_verify(tmp_path, key, trusted):
    out = bf.make_bundle(tmp_path / "b", key)
    files = read_bundle(out)
    assert sorted(files) == sorted(["adapter_model.safetensors", "adapter_config.json", "manifest.json", "manifest.sig"])
    manifest = verify_bundle(files, trusted)
    assert manifest.publisher == keys.key_id(key)
    assert files[MANIFEST_FILE] == manifest.to_canonical()
    assert Manifest.parse(manifest.to_canonical()) == manifest


def test_write_bundle_refuses_existing_and_leaves_nothing_on_bad_fields(tmp_path):
    with pytest.raises(InvalidInputError):
        write_bundle(tmp_path / "x", weights=bf.lora_weights(), adapter_config=bf.adapter_config(),
                     manifest_fields=bf.manifest_fields(rank=-1))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "y").mkdir()
    with pytest.raises(InvalidInputError, match="exists"):
        write_bundle(tmp_path / "y", weights=b"", adapter_config={}, manifest_fields={})


def test_sign_refuses_a_bundle_whose_files_do_not_match(tmp_path, key):
    out = bf.make_bundle(tmp_path / "b", key)
    (out / ADAPTER_WEIGHTS_FILE).write_bytes(b"changed")
    with pytest.raises(HashMismatchError):
        sign_bundle(out, key)


def _pickle_bytes() -> bytes:
    return pickle.dumps({"base_model.model.x.lora_A.weight": [1.0, 2.0]})


def _nan_weights() -> bytes:
    from safetensors.numpy import load, save

    tensors = load(bf.lora_weights())
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    return save(tensors)


TAMPERS = {
    "weight_byte_flipped": (lambda f, k, o: bf.flip_byte(f), HashMismatchError, "hash_mismatch"),
    "centroid_changed": (
        lambda f, k, o: bf.edit_manifest(f, lambda m: m["centroids"]["vectors"][0].reverse()),
        SignatureError, "bad_signature"),
    "unregistered_key": (lambda f, k, o: bf.edit_manifest(
        f, lambda m: m.update(publisher=keys.key_id(o)), resign_with=o), UnknownKeyError, "unknown_key"),
    "pickle_as_safetensors": (lambda f, k, o: bf.replace_file(f, ADAPTER_WEIGHTS_FILE, _pickle_bytes(), key=k),
                              TensorFormatError, "tensor_format"),
    "missing_file": (lambda f, k, o: {n: d for n, d in f.items() if n != SIGNATURE_FILE}, FileSetError, "missing_file"),
    "extra_file": (lambda f, k, o: {**f, "notes.txt": b"hi"}, FileSetError, "extra_file"),
    "unknown_manifest_field": (lambda f, k, o: bf.edit_manifest(f, lambda m: m.update(comment="x"), resign_with=k),
                               ManifestError, "manifest_invalid"),
    "manifest_not_canonical": (
        lambda f, k, o: {**f, MANIFEST_FILE: json.dumps(json.loads(f[MANIFEST_FILE]), indent=1).encode()},
        ManifestError, "manifest_not_canonical"),
    "signature_truncated": (lambda f, k, o: {**f, SIGNATURE_FILE: f[SIGNATURE_FILE][:10]}, SignatureError,
                            "bad_signature"),
    "nan_weights": (lambda f, k, o: bf.replace_file(f, ADAPTER_WEIGHTS_FILE, _nan_weights(), key=k),
                    TensorFormatError, "tensor_format"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_verifier_refuses_every_tamper_with_its_own_error(tmp_path, key, trusted, case):
    make, error, code = TAMPERS[case]
    files = bf.make_bundle_files(tmp_path, key)
    verify_bundle(files, trusted)  # the untampered bundle passes
    bad = make(files, key, keys.generate_key())
    report = check_bundle(bad, trusted)
    assert not report.ok
    assert type(report.error) is error and report.error.code == code
    with pytest.raises(error):
        verify_bundle(bad, trusted)


def test_rank_mismatch_between_weights_and_manifest_is_refused(tmp_path, key, trusted):
    files = bf.make_bundle_files(tmp_path, key)
    bad = bf.replace_file(files, ADAPTER_WEIGHTS_FILE, bf.lora_weights(rank=2), key=key)
    with pytest.raises(TensorFormatError, match="rank"):
        verify_bundle(bad, trusted)
