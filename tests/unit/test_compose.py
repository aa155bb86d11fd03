"""docker-compose.yml checked without a container runtime: valid against the Compose
Specification's JSON schema (tests/kit/compose_spec, Apache-2.0), and the deployment's own rules:
workers share no volume with the node (they reach the archive over DICOMweb), the GPU worker
runs the CUDA image, and every RADAI_* name a service sets is a real setting."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from db.audit_keys import PUBLIC_KEY_FILE, SIGNING_KEY_FILE
from radai.settings import Settings
from tests.kit.paths import REPO

SCHEMA = REPO / "tests" / "kit" / "compose_spec" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("command", [""])[0] == "worker"}


def test_the_file_follows_the_compose_specification(compose: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_malformed_service(compose: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["node"]["ports"] = {"11112": "11112"}  # a mapping where a list belongs
    broken["services"]["node"]["restartt"] = "always"
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 2


def test_workers_share_no_volume_and_read_the_archive_over_dicomweb(compose: dict) -> None:
    workers = _workers(compose)
    assert {"worker-inference", "worker-io"} <= set(workers)
    for name, service in workers.items():
        assert not service.get("volumes"), f"{name} mounts {service.get('volumes')}"
        env = _env(service)
        assert env["RADAI_ARCHIVE_URL"].endswith("/dicomweb"), name
        assert env["RADAI_ARCHIVE_URL"].startswith("http://node:"), name
        mounted = {f"/run/secrets/{x['target']}": x["source"] for x in service["secrets"]}
        assert mounted[env["RADAI_ARCHIVE_TOKEN_FILE"]] == "radai_worker_token", name
    node = compose["services"]["node"]
    port = _env(node)["RADAI_DICOMWEB_PORT"]
    assert f":{port}/dicomweb" in _env(workers["worker-io"])["RADAI_ARCHIVE_URL"]
    assert f"{port}:{port}" in node["ports"] and "11112:11112" in node["ports"]


def test_the_gpu_worker_runs_the_cuda_image_and_the_rest_the_cpu_one(compose: dict) -> None:
    services = compose["services"]
    gpu = [n for n, s in services.items() if "deploy" in s and _reserves_gpu(s)]
    assert gpu == ["worker-inference"]
    inference = services["worker-inference"]
    assert inference["image"] == "radai:cuda"
    assert inference["build"]["args"]["TORCH_INDEX"].startswith("cu")
    assert _env(inference)["RADAI_DEVICE"] == "cuda"
    for name, service in services.items():
        if "build" in service and name != "worker-inference":
            assert service["image"] == "radai:cpu", name
            assert service["build"]["args"]["TORCH_INDEX"] == "cpu", name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX" in dockerfile and "whl/${TORCH_INDEX}" in dockerfile


def _reserves_gpu(service: dict) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any("gpu" in d.get("capabilities", []) for d in devices)


def test_every_radai_name_is_a_setting(compose: dict) -> None:
    known = {f"RADAI_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith("RADAI_"):
                assert key in known, f"{name}: {key} is not a radai setting"


def test_audit_keys_are_secrets_where_the_settings_look_for_them(compose: dict) -> None:
    for name, secret in compose["secrets"].items():
        assert secret["file"].startswith("./secrets/"), name  # .gitignore keeps them out of git
    for name, service in compose["services"].items():
        env = _env(service)
        if "RADAI_AUDIT_KEY_FILE" not in env:
            continue
        # db.audit_keys reads the signing key and its public half beside the HMAC key.
        key = Path(env["RADAI_AUDIT_KEY_FILE"])
        targets = {Path("/run/secrets") / s["target"]: s["source"] for s in service["secrets"]}
        for path in (key, key.with_name(SIGNING_KEY_FILE), key.with_name(PUBLIC_KEY_FILE)):
            assert path in targets, f"{name}: {path} is not mounted"
        assert all(source in compose["secrets"] for source in targets.values()), name
