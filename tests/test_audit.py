"""semla-client audit: the listing is exactly what publish sends, and what should not be there is flagged."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bundle_factory
import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as save_safetensors

from semla.client.audit import EXIT_FLAGGED, Identity, audit_bundle, audit_files, local_identity
from semla.client.cli import main
from semla.client.publish import publish_bundle
from semla.registry import keys
from semla.registry.bundle import sign_bundle
from semla.registry.http import RegistryClient
from semla.schemas import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE
from semla.schemas.errors import TooFewSamplesError
from semla.server import ServerSettings, create_app
from semla.server.local import serve_in_thread

ADMIN = "audit-admin-token"
#: A stand-in for this machine, so the tests do not depend on the real user and host names.
ME = Identity(users=("alice",), homes=("/home/alice",), hosts=("build-host-7",))


class Recorder(httpx.BaseTransport):
    """Wraps a real transport and keeps every request exactly as it goes on the wire."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str, httpx.Headers, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.requests.append((request.method, request.url.path, request.headers, body))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def codes(report) -> set[str]:
    return {f.code for f in report.flags}


def flag(report, code: str):
    return next(f for f in report.flags if f.code == code)


@pytest.fixture()
def key():
    return keys.generate_key()


@pytest.fixture()
def files(tmp_path, key) -> dict[str, bytes]:
    return bundle_factory.make_bundle_files(tmp_path, key)


# -- what leaves is what is listed ----------------------------------------------------------------
def test_publish_sends_exactly_the_bytes_the_audit_lists(tmp_path, trained_bundle, key):
    bundle_factory.install_base_card(tmp_path / "registry")
    app = create_app(ServerSettings(data_dir=tmp_path / "registry", admin_token=ADMIN))
    bundle = shutil.copytree(trained_bundle, tmp_path / "fog")
    sign_bundle(bundle, key)
    report = audit_bundle(bundle)
    recorder = Recorder(httpx.HTTPTransport())
    with serve_in_thread(app) as url:
        registered = httpx.post(url + "/v1/keys", json={"public_key": keys.public_bytes(key).hex()},
                                headers={"Authorization": f"Bearer {ADMIN}"})
        assert registered.status_code == 201, registered.text
        with RegistryClient(url, client=httpx.Client(transport=recorder)) as client:
            dry = publish_bundle(bundle, client, dry_run=True)
            recorder.requests.clear()  # the dry run asked for the registry's keys and sent nothing else
            receipt = publish_bundle(bundle, client)
    assert receipt.name == "fog" and dry.lines() == report.lines()

    # Prepare: one GET without a body (the registry's keys), one POST carrying the bundle
    assert [(m, p, len(b)) for m, p, _, b in recorder.requests[:1]] == [("GET", "/v1/keys", 0)]
    [(method, path, headers, body)] = recorder.requests[1:]
    assert (method, path) == ("POST", "/v1/adapters")
    boundary = re.fullmatch(r"multipart/form-data; boundary=(\S+)", headers["content-type"]).group(1)

    # Execute: rebuild the body from the audit's listing alone (names and the bytes whose sha256 it lists)
    on_disk = {p.name: p.read_bytes() for p in bundle.iterdir()}
    framed = b""
    for entry in report.files:
        data = on_disk[entry.name]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)
        framed += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{entry.name}\"; "
                   f"filename=\"{entry.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    framed += f"--{boundary}--\r\n".encode()

    # Assert: the body is exactly those parts in multipart framing, nothing more, nothing less
    assert body == framed
    parts = body.split(f"--{boundary}".encode())[1:-1]
    sent = []
    for part in parts:
        head, _, data = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]+)"', head).group(1).decode()
        data = data[:-2]  # the CRLF before the next boundary
        sent.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    assert sent == report.to_json()["files"]
    assert int(headers["content-length"]) == len(body)
    # and the headers carry nothing of this machine (httpx's defaults and the body's framing only)
    assert set(headers) <= {"host", "accept", "accept-encoding", "connection", "user-agent", "content-length",
                            "content-type"}


def test_the_listing_names_every_file_tensor_and_field(files):
    report = audit_files(files, identity=ME)
    assert report.ok, report.flags
    listed = {f.name: (f.size, f.sha256) for f in report.files}
    assert listed == {n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()}
    assert {t.name for t in report.tensors} == {
        f"base_model.model.{m}.lora_{ab}.weight" for m in bundle_factory.MODULES for ab in "AB"}
    assert all(t.lora and t.dtype == "F32" for t in report.tensors)
    text = "\n".join(report.lines())
    manifest = json.loads(files[MANIFEST_FILE])
    for field in ("sample_count = 64", "privacy.mechanism = \"none\"", "domain = \"urban street scenes\"",
                  "centroids.vectors = 1 unit vector(s) x 8 floats", f"publisher = \"{manifest['publisher']}\""):
        assert field in text
    assert "summary: 1 centroid(s) of 8 floats from 64 samples (minimum 50)" in text
    assert "spread: none (manifest schema 1;" in text  # the factory's bundles are schema 1
    assert "flags: none" in text
    as_json = report.to_json()
    assert as_json["manifest"] == manifest and as_json["adapter_config"] == json.loads(files[ADAPTER_CONFIG_FILE])
    assert as_json["ok"] is True and as_json["summary"]["privacy"]["mechanism"] == "none"


# -- flags ----------------------------------------------------------------------------------------
def _config_with(files, key, **extra) -> dict[str, bytes]:
    config = {**json.loads(files[ADAPTER_CONFIG_FILE]), **extra}
    return bundle_factory.replace_file(files, ADAPTER_CONFIG_FILE, json.dumps(config).encode(), key=key)


def _weights_with(files, key, *, metadata=None, extra_tensors=None) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    tensors = {}
    for module, (fan_in, fan_out) in bundle_factory.MODULES.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((4, fan_in)).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((fan_out, 4)).astype(np.float32)
    tensors.update(extra_tensors or {})
    return bundle_factory.replace_file(files, ADAPTER_WEIGHTS_FILE, save_safetensors(tensors, metadata=metadata), key=key)


def test_a_home_path_in_adapter_config_is_flagged(files, key):
    report = audit_files(_config_with(files, key, base_model_name_or_path="/home/alice/models/clip-vit"), identity=ME)
    assert {"absolute_path", "home_dir", "user_name"} <= codes(report)
    assert flag(report, "absolute_path").where == f"{ADAPTER_CONFIG_FILE} base_model_name_or_path"
    assert "/home/alice/models/clip-vit" in flag(report, "absolute_path").message
    for path in ("~/data/owner", "C:\\Users\\bob\\clip.pt", "file:///srv/x"):
        assert "absolute_path" in codes(audit_files(_config_with(files, key, base_model_name_or_path=path), identity=ME))


def test_this_machines_real_home_and_host_are_found_with_the_default_identity(files, key):
    import socket

    mine = local_identity()
    home, host = str(Path.home()), socket.gethostname()
    assert home in mine.homes or len(home) < 3  # a name shorter than 3 characters is not searched for
    assert host in mine.hosts or len(host) < 3
    report = audit_files(_config_with(files, key, note=f"trained in {Path.home() / 'private'} on {host}"))
    assert "absolute_path" in codes(report)
    assert ("home_dir" in codes(report)) == (home in mine.homes)
    assert ("host_name" in codes(report)) == (host in mine.hosts)


def test_a_host_name_in_safetensors_metadata_is_flagged(files, key):
    report = audit_files(_weights_with(files, key, metadata={"format": "pt", "host": "build-host-7"}), identity=ME)
    assert {"host_name", "unexpected_metadata"} <= codes(report)
    assert flag(report, "host_name").where == f"{ADAPTER_WEIGHTS_FILE} __metadata__.host"
    assert report.metadata == {"format": "pt", "host": "build-host-7"}
    assert "header metadata: format=\"pt\", host=\"build-host-7\"" in "\n".join(report.lines())


def test_a_short_user_name_that_tensor_bytes_spell_by_chance_is_not_flagged(files, key):
    # " bob " spelled by the bytes of a LoRA tensor: chance, not a leak (3-letter names do occur
    # in megabytes of random floats); the same name in the header is still found
    chance = np.frombuffer(b" bob  bob  bob  bob ", dtype=np.float32).reshape(1, 5)
    module = next(iter(bundle_factory.MODULES))
    fan_in = bundle_factory.MODULES[module][0]
    a = np.zeros((4, fan_in), dtype=np.float32)
    a[0, :5] = chance
    bob = Identity(users=("bob",), homes=(), hosts=())
    clean = _weights_with(files, key, extra_tensors={f"base_model.model.{module}.lora_A.weight": a})
    assert b" bob " in clean[ADAPTER_WEIGHTS_FILE]
    assert "user_name" not in codes(audit_files(clean, identity=bob))
    named = _weights_with(files, key, metadata={"format": "pt", "owner": "bob"})
    assert "user_name" in codes(audit_files(named, identity=bob))


def test_a_png_is_flagged_inside_any_file_raw_or_base64(files, key, tmp_path):
    png = png_bytes()
    in_config = audit_files(_config_with(files, key, notes=base64.b64encode(png).decode()), identity=ME)
    assert flag(in_config, "image_data").where == f"{ADAPTER_CONFIG_FILE} notes"
    as_uri = audit_files(_config_with(files, key, icon="data:image/png;base64,iVBORw0KGgo="), identity=ME)
    assert "image_data" in codes(as_uri)
    padded = png + b"\x00" * (-len(png) % 4)
    thumbnail = np.frombuffer(padded, dtype=np.float32).reshape(1, -1)
    in_tensor = audit_files(_weights_with(files, key, extra_tensors={"thumbnail": thumbnail}), identity=ME)
    assert {"image_data", "non_lora_tensor"} <= codes(in_tensor)
    assert "PNG signature at byte" in flag(in_tensor, "image_data").message
    extra = audit_files({**files, "preview.png": png}, identity=ME)
    assert {"extra_file", "image_data"} <= codes(extra)
    assert "preview.png" in [f.name for f in extra.files]  # listed: a publish would send it
    exif = b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00*\x00\x00\x00\x08"
    assert "image_data" in codes(audit_files({**files, "notes.bin": exif}, identity=ME))


def test_a_non_lora_tensor_and_half_pairs_are_flagged(files, key):
    report = audit_files(_weights_with(files, key, extra_tensors={
        "base_model.model.visual.proj": np.zeros((16, 8), dtype=np.float32),
        "base_model.model.visual.ln_post.lora_A.weight": np.zeros((4, 16), dtype=np.float32),
    }), identity=ME)
    messages = [f.message for f in report.flags if f.code == "non_lora_tensor"]
    assert any("'base_model.model.visual.proj' [16, 8] is not a LoRA A/B weight" in m for m in messages)
    assert any("visual.ln_post' has lora_A only" in m for m in messages)
    assert [t.lora for t in report.tensors if t.name == "base_model.model.visual.proj"] == [False]


def test_a_long_base64_blob_is_flagged(files, key):
    blob = base64.b64encode(os.urandom(300)).decode()
    report = audit_files(bundle_factory.edit_manifest(files, lambda m: m.update(domain=blob), resign_with=key),
                         identity=ME)
    assert flag(report, "base64_blob").where == f"{MANIFEST_FILE} domain"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"sample_count": 20, "privacy": {"mechanism": "none", "min_samples": 10}}, {"too_few_samples"}),
    ({"sample_count": 1, "privacy": {"mechanism": "none", "min_samples": 1}}, {"too_few_samples", "single_image"}),
    ({"k": 2, "sample_count": 64}, {"small_cluster"}),
    ({"k": 2, "sample_count": 120, "privacy": {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5,
                                               "clip_norm": 1.0, "min_samples": 50}}, {"dp_with_kmeans"}),
    ({"k": 2, "sample_count": 100}, set()),
])
def test_centroids_of_too_few_samples_are_flagged(tmp_path, key, fields, expected):
    report = audit_files(bundle_factory.make_bundle_files(tmp_path, key, **fields), identity=ME)
    assert codes(report) == expected


# -- the commands ---------------------------------------------------------------------------------
def test_audit_command_exit_codes_and_json(tmp_path, key, capsys):
    clean = bundle_factory.make_bundle(tmp_path / "clean", key)
    assert main(["audit", str(clean)]) == 0
    assert "flags: none" in capsys.readouterr().out
    small = bundle_factory.make_bundle(tmp_path / "small", key, k=2, sample_count=64,
                                       privacy={"mechanism": "none", "min_samples": 30})
    assert main(["audit", str(small), "--json"]) == EXIT_FLAGGED
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and [f["code"] for f in out["flags"]] == ["small_cluster"]
    assert main(["audit", str(small), "--min-samples", "30"]) == 0  # the floor is the caller's to set
    assert main(["audit", str(tmp_path / "nothing")]) == 2
    assert "not a bundle directory" in capsys.readouterr().err


def test_dry_run_prints_the_audit_listing_and_its_exit_code(tmp_path, key, capsys):
    key_file = tmp_path / "owner.key"
    keys.save_keypair(key, key_file)
    bundle = bundle_factory.make_bundle(tmp_path / "b", key, k=2, sample_count=64)
    rc = main(["publish", str(bundle), "--registry", "http://127.0.0.1:9", "--key", str(key_file), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert rc == EXIT_FLAGGED  # nothing was sent: the registry address does not even answer
    assert out[0] == "dry run: nothing was sent. An upload would send exactly:"
    assert out[1:] == audit_bundle(bundle).lines()


def test_publish_refuses_a_small_centroid_before_anything_is_sent(tmp_path, key):
    bundle = bundle_factory.make_bundle(tmp_path / "b", key, sample_count=20,
                                        privacy={"mechanism": "none", "min_samples": 10})
    sent: list[str] = []

    def registry(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url.path}")
        public = keys.public_bytes(key).hex()
        return httpx.Response(200, json=[{"key_id": keys.key_id(key), "public_key": public, "label": "",
                                          "active": True, "created_at": "2026-01-01T00:00:00Z"}])

    with RegistryClient("http://registry.test", client=httpx.Client(transport=httpx.MockTransport(registry))) as c:
        with pytest.raises(TooFewSamplesError, match="20 samples; at least 50"):
            publish_bundle(bundle, c, min_samples=50)
        with pytest.raises(TooFewSamplesError):
            publish_bundle(bundle, c, key=key, min_samples=50)  # refused before signing, too
    assert sent == ["GET /v1/keys"]  # the key list was read; no upload left


@pytest.mark.slow
@pytest.mark.ci_slow  # two CLI processes training with DP (~10 s): CI runs it in make test-slow
def test_train_with_dp_then_audit_on_the_command_line(tmp_path, fog_data):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "fog-dp"
    train = subprocess.run([str(bin_dir / "semla-client"), "train", "--data", str(fog_data), "--out", str(out),
                            "--name", "fog", "--steps", "2", "--dp-epsilon", "4"],
                           capture_output=True, text=True, timeout=300, env=env, check=False)
    assert train.returncode == 0, train.stderr
    assert "DP epsilon 4 delta 1e-05" in train.stdout
    audit = subprocess.run([str(bin_dir / "semla-client"), "audit", str(out), "--json"],
                           capture_output=True, text=True, timeout=120, env=env, check=False)
    report = json.loads(audit.stdout)
    assert report["summary"]["privacy"] == {"mechanism": "gaussian", "epsilon": 4.0, "delta": 1e-5,
                                            "clip_norm": 1.0, "min_samples": 50}
    spread = report["summary"]["spread"]  # schema 2: the spread, released under the same DP budget
    assert report["summary"]["schema_version"] == 2
    assert spread["mechanism"] == "gaussian-histogram" and spread["epsilon"] == pytest.approx(0.8)
    assert 0.0 <= spread["q50"] <= spread["q90"] <= spread["q99"] <= 2.0
    assert report["ok"], report["flags"]  # a freshly trained bundle carries nothing to flag
    assert audit.returncode == 0
    refused = subprocess.run([str(bin_dir / "semla-client"), "train", "--data", str(fog_data), "--out",
                              str(tmp_path / "km"), "--name", "fog", "--dp-epsilon", "4", "--centroids", "2"],
                             capture_output=True, text=True, timeout=300, env=env, check=False)
    assert refused.returncode == 2 and "k-means" in refused.stderr and not (tmp_path / "km").exists()
