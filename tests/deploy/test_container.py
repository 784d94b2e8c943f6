"""End to end: deploy/Dockerfile built with podman, run as users run it, checked from the outside.

The base image is made locally (no registry is reachable here) and the torch wheel comes from local disk;
pip inside the build reaches the package index for the rest (deploy/local_image.py). The first run makes the
base image (about a minute, kept for later runs); each run builds the `server`, `runpod` and `lambda` targets
and removes what it built, unless COMFY_CONTAINER_TEST_KEEP=1. scripts/container_tools.sh (called by
./test.sh) installs podman, runc and debootstrap.

A machine where podman cannot run a container fails these tests rather than skipping them: CI has to prove
the image works.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "deploy"))
import local_image  # noqa: E402

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1500)]

RUN_ID = f"{os.getpid()}-{int(time.time())}"
LABEL = f"comfy-serverless-test={RUN_ID}"
SERVER_TAG = f"localhost/comfy-serverless-test:{RUN_ID}"
RUNPOD_TAG = f"localhost/comfy-serverless-test-runpod:{RUN_ID}"
LAMBDA_TAG = f"localhost/comfy-serverless-test-lambda:{RUN_ID}"
LWA_STUB_TAG = f"localhost/comfy-serverless-test-lwa-stub:{RUN_ID}"
IMAGE_SIZE_LIMIT = 1_200_000_000  # measured 1.03 GB: torch's CPU libraries are 450 MB of it
KEEP = os.environ.get("COMFY_CONTAINER_TEST_KEEP") == "1"

SMALL_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16744448}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ComfyUI"}},
}
# About 2 s on this machine class: long enough to send SIGTERM while it runs.
SLOW_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 255}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
}

def podman(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=local_image.podman_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90, container: str | None = None) -> float:
    """Seconds until `url` answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.01)
    logs = podman("logs", container, check=False).stderr[-3000:] if container else ""
    raise AssertionError(f"{url} did not answer 200 within {timeout:.0f} s\n{logs}")


def run_prompt(url: str, workflow: dict, timeout: float = 120) -> dict:
    reply = requests.post(f"{url}/prompt", json={"prompt": workflow}, timeout=10)
    assert reply.status_code == 200, reply.text
    prompt_id = reply.json()["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = requests.get(f"{url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def report(request, text: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[container] {text}")


# -- images ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def podman_works(request):
    if shutil.which("podman") is None or shutil.which("debootstrap") is None:
        pytest.fail("podman/debootstrap are not installed: run scripts/container_tools.sh (./test.sh does)")
    before = set(podman("images", "-a", "-q", "--no-trunc").stdout.split())
    made = local_image.ensure_base_image(log=lambda m: report(request, m))
    if made:
        report(request, f"base image {local_image.BASE_TAG} made in {made:.0f} s (kept for later runs)")
        before.add(podman("image", "inspect", "--format", "{{.Id}}", local_image.BASE_TAG).stdout.strip())
    probe = podman("run", "--rm", local_image.BASE_TAG, "python3", "-c", "import sys; print(sys.version_info[:2])",
                   check=False, timeout=120)
    if probe.returncode != 0 or "(3, 11)" not in probe.stdout:
        pytest.fail("podman cannot run a container here (runc, the containers.conf from "
                    f"scripts/container_tools.sh, CONTAINERS_CONF={local_image.podman_env().get('CONTAINERS_CONF')}):"
                    f"\n{probe.stdout}\n{probe.stderr[-3000:]}")
    yield
    for container in podman("ps", "-a", "-q", "--filter", f"label={LABEL}", check=False).stdout.split():
        podman("rm", "-f", "-v", container, check=False)
    if KEEP:
        return
    for tag in (SERVER_TAG, RUNPOD_TAG, LAMBDA_TAG, LWA_STUB_TAG):
        podman("rmi", "-f", tag, check=False)
    # Intermediate stages this run built (build caches of other runs and the base image stay).
    for _ in range(3):  # removing one image can remove its untagged parents under our feet: list again
        listing = podman("images", "-a", "-q", "--no-trunc", check=False)
        leftovers = [i for i in listing.stdout.split() if i not in before]
        if listing.returncode == 0 and not leftovers:
            break
        for image_id in leftovers:
            podman("rmi", "-f", image_id, check=False)


def build(request, tag: str, target: str, **build_args) -> str:
    wheel = local_image.find_torch_wheel()
    ca = local_image.HOST_CA_BUNDLE if os.path.exists(local_image.HOST_CA_BUNDLE) else None
    seconds = local_image.build_image(tag, target=target, torch_wheel=wheel, ca_bundle=ca, log=lambda m: None,
                                      extra_build_args=build_args)
    size = local_image.image_size_bytes(tag)
    report(request, f"built target {target} in {seconds:.0f} s: {size / 1e6:.0f} MB")
    return tag


@pytest.fixture(scope="module")
def server_image(request, podman_works):
    return build(request, SERVER_TAG, "server")


@pytest.fixture(scope="module")
def running(request, server_image, tmp_path_factory):
    """The image run as the seed runs it: -p 8188:8188 -e CUDA_VISIBLE_DEVICES="" (on a free host port)."""
    output = tmp_path_factory.mktemp("container-output")
    os.chown(output, 1000, 1000)
    port = free_port()
    name = f"comfy-test-run-{RUN_ID}"
    started = time.monotonic()
    podman("run", "-d", "--name", name, "--label", LABEL, "-p", f"{port}:8188", "-e", "CUDA_VISIBLE_DEVICES=",
           "-v", f"{output}:/app/output", server_image)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/system_stats", container=name)
    total = time.monotonic() - started
    report(request, f"podman run -> first 200 on /system_stats: {total:.2f} s")
    yield {"name": name, "url": url, "output": output}
    podman("rm", "-f", "-v", name, check=False)


# -- the image ------------------------------------------------------------------------------------------
def test_image_metadata_user_port_healthcheck_signal_volumes_and_size(request, server_image):
    inspected = json.loads(podman("image", "inspect", server_image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "1000:1000"
    assert "8188/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    healthcheck = config.get("Healthcheck") or inspected.get("Healthcheck")  # where podman puts it
    assert "/health" in " ".join(healthcheck["Test"])
    assert set(config["Volumes"]) == {"/app/models", "/app/input", "/app/output"}
    assert config["Entrypoint"] == ["comfy-serverless", "serve"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["COMFY_LISTEN"] == "0.0.0.0" and env["COMFY_PORT"] == "8188"
    size = local_image.image_size_bytes(server_image)
    assert size < IMAGE_SIZE_LIMIT, f"image grew to {size / 1e6:.0f} MB"


def test_final_stage_has_no_compilers_caches_or_build_inputs_and_has_bytecode(server_image):
    script = r"""
for tool in gcc cc c++ g++ make apt-get-never; do command -v $tool >/dev/null 2>&1 && echo "tool:$tool"; done
for path in /root/.cache /app/.cache /tmp/build-extras /src /opt/venv/lib/python3.11/site-packages/torch/include; do
  [ -e $path ] && echo "path:$path"
done
find / -xdev -name "torch-*.whl" 2>/dev/null  # the base keeps ensurepip's own wheels | sed 's/^/wheel:/'
python - <<'EOF'
import importlib.util, os
for module in ("comfy_serverless.cli", "comfy_serverless.server.app", "torch", "numpy"):
    spec = importlib.util.find_spec(module)
    cached = spec.cached
    print(("bytecode:" if cached and os.path.exists(cached) else "nobytecode:") + module)
print("catalog:" + str(os.path.getsize("/app/.comfy-serverless/catalog.json")))
EOF
"""
    out = podman("run", "--rm", "--entrypoint", "sh", server_image, "-c", script).stdout.split()
    assert not [line for line in out if line.startswith(("tool:", "path:", "wheel:", "nobytecode:"))], out
    assert {"bytecode:comfy_serverless.cli", "bytecode:torch"} <= set(out)
    assert any(line.startswith("catalog:") and int(line.split(":")[1]) > 1000 for line in out)


# -- running it -----------------------------------------------------------------------------------------
def test_container_answers_health_system_stats_and_no_frontend(running):
    url = running["url"]
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    wait_http(f"{url}/ready", timeout=60)
    stats = requests.get(f"{url}/system_stats", timeout=5).json()
    assert stats["system"]["python_version"].startswith("3.11")
    assert stats["system"]["pytorch_version"].startswith("2.13.0")
    assert stats["devices"][0]["type"] == "cpu"
    index = requests.get(f"{url}/", timeout=5)
    assert index.headers["Content-Type"].startswith("application/json")  # no web frontend
    assert "SaveImage" in requests.get(f"{url}/object_info/SaveImage", timeout=5).json()


def test_container_runs_a_workflow_into_the_output_volume(running):
    url = running["url"]
    entry = run_prompt(url, SMALL_WORKFLOW)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["3"]["images"][0]
    view = requests.get(f"{url}/view", params={"filename": image["filename"], "type": "output"}, timeout=10)
    assert view.content.startswith(b"\x89PNG")
    saved = running["output"] / image["filename"]
    assert saved.read_bytes() == view.content
    assert saved.stat().st_uid == 1000
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'comfy_prompts_total{outcome="success"} 1' in metrics


def test_server_process_is_not_root_and_the_healthcheck_passes(running):
    name = running["name"]
    assert podman("exec", name, "id", "-u").stdout.strip() == "1000"
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["1000"] * 4
    cmdline = podman("exec", name, "cat", "/proc/1/cmdline").stdout
    assert "comfy-serverless" in cmdline, "the server must be PID 1 to receive SIGTERM"
    assert podman("healthcheck", "run", name, check=False).returncode == 0


def test_sigterm_drains_queued_and_running_prompts_then_exits_0(request, server_image):
    port = free_port()
    name = f"comfy-test-drain-{RUN_ID}"
    podman("run", "-d", "--name", name, "--label", LABEL, "-p", f"{port}:8188", server_image)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ready", container=name)
        run_prompt(url, SMALL_WORKFLOW)  # warm: torch is imported, so the drain below times real work
        for sigma in (10.0, 9.0):  # two different prompts: an identical one would come from the cache
            slow = json.loads(json.dumps(SLOW_WORKFLOW))
            slow["2"]["inputs"]["sigma"] = sigma
            assert requests.post(f"{url}/prompt", json={"prompt": slow}, timeout=10).status_code == 200
        accepted = 3
        time.sleep(0.3)
        stop_started = time.monotonic()
        stopper = threading.Thread(target=podman, args=("stop", "--time", "90", name), daemon=True)
        stopper.start()  # podman stop sends the image's STOPSIGNAL, then waits
        refused = ready_503 = False
        while stopper.is_alive() and not (refused and ready_503):
            try:
                status = requests.post(f"{url}/prompt", json={"prompt": SMALL_WORKFLOW}, timeout=5).status_code
                accepted += status == 200  # until the signal lands, prompts are still taken
                refused = refused or status == 503
                ready_503 = ready_503 or requests.get(f"{url}/ready", timeout=5).status_code == 503
            except requests.RequestException:
                break
            time.sleep(0.05)
        stopper.join(120)
        stop_seconds = time.monotonic() - stop_started
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        report(request, f"SIGTERM with 2 blur prompts queued: stopped in {stop_seconds:.1f} s")
        assert refused and ready_503, "while draining, POST /prompt and /ready must answer 503"
        assert state["ExitCode"] == 0, logs[-3000:]
        assert logs.count("prompt finished: success") == accepted, logs[-3000:]
        assert "grace period over" not in logs and "stopped" in logs
        assert stop_seconds < 80, "finished by the drain, not killed at podman's timeout"
    finally:
        podman("rm", "-f", "-v", name, check=False)


# -- serverless variants --------------------------------------------------------------------------------
def test_runpod_image_runs_a_job_in_the_sdk_local_test_mode(request, podman_works):
    image = build(request, RUNPOD_TAG, "runpod")
    job = {"input": {"workflow": SMALL_WORKFLOW}}
    result = podman("run", "--rm", "--label", LABEL, image, "python", "-m", "comfy_serverless.adapters.runpod_handler",
                    "--test_input", json.dumps(job), check=False, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Local testing complete" in log
    payload = log.split("Job result: ", 1)[1].splitlines()[0]
    assert "'type': 'base64'" in payload and "'filename': 'ComfyUI_00001_.png'" in payload
    data = payload.split("'data': '", 1)[1].split("'", 1)[0]
    assert base64.b64decode(data).startswith(b"\x89PNG")


def lambda_adapter_stub() -> str:
    """Stands in for public.ecr.aws/awsguru/aws-lambda-adapter, which no registry here serves."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        script = b"#!/bin/sh\n# stub: the real adapter is a Lambda extension binary\nexit 0\n"
        info = tarfile.TarInfo("lambda-adapter")
        info.size, info.mode = len(script), 0o755
        tar.addfile(info, io.BytesIO(script))
    result = subprocess.run(["podman", "import", "-", LWA_STUB_TAG], input=buffer.getvalue(),
                            env=local_image.podman_env(), capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    return LWA_STUB_TAG


def test_lambda_image_serves_on_a_read_only_file_system_as_an_arbitrary_user(request, podman_works):
    image = build(request, LAMBDA_TAG, "lambda", LAMBDA_ADAPTER_IMAGE=lambda_adapter_stub())
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["AWS_LWA_PORT"] == "8080" and env["AWS_LWA_READINESS_CHECK_PATH"] == "/health"
    assert podman("run", "--rm", "--entrypoint", "test", image, "-x", "/opt/extensions/lambda-adapter",
                  check=False).returncode == 0
    port = free_port()
    name = f"comfy-test-lambda-{RUN_ID}"
    # As Lambda runs it: read-only root, writable /tmp, a user id the image does not know. The Web Adapter
    # would forward invocations to port 8080; here the test is the client.
    started = time.monotonic()
    podman("run", "-d", "--name", name, "--label", LABEL, "--read-only", "--tmpfs", "/tmp:rw,mode=1777",
           "--user", "993:990", "-p", f"{port}:8080", image)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=120, container=name)  # the adapter's readiness check
        report(request, "lambda image (eager warm-up): podman run -> /health 200 in "
                        f"{time.monotonic() - started:.2f} s")
        entry = run_prompt(url, SMALL_WORKFLOW)  # the ComfyUI API, passed through
        assert entry["status"]["status_str"] == "success", entry["status"]
        listing = podman("exec", name, "ls", "/tmp/comfy/output").stdout.split()
        assert entry["outputs"]["3"]["images"][0]["filename"] in listing
        started = time.monotonic()
        reply = requests.post(f"{url}/run", json={"workflow": SMALL_WORKFLOW}, timeout=120)  # one invocation
        assert reply.status_code == 200, reply.text
        images = reply.json()["images"]
        assert len(images) == 1 and base64.b64decode(images[0]["data"]).startswith(b"\x89PNG")
        report(request, f"lambda image: POST /run of the small workflow answered in {time.monotonic() - started:.2f} s")
    finally:
        podman("rm", "-f", "-v", name, check=False)


def test_compose_file_runs_the_image_with_its_limits_and_health_check(request, server_image, tmp_path):
    compose = shutil.which("podman-compose", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if compose is None:
        pytest.fail("podman-compose is in the test extra: scripts/setup.sh --test")
    for sub in ("models", "input", "output"):
        (tmp_path / sub).mkdir()
        os.chown(tmp_path / sub, 1000, 1000)
    port = free_port()
    project = f"comfy-test-compose-{RUN_ID}".replace("-", "_")
    env = {**local_image.podman_env(), "COMFY_IMAGE": server_image, "COMFY_HOST_PORT": str(port),
           "COMFY_MODELS_DIR": str(tmp_path / "models"), "COMFY_INPUT_DIR": str(tmp_path / "input"),
           "COMFY_OUTPUT_DIR": str(tmp_path / "output")}
    base = [compose, "-p", project, "-f", str(REPO / "deploy" / "docker-compose.yml")]
    up = subprocess.run([*base, "up", "-d", "--no-build"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        name = f"{project}_comfy-serverless_1"
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ready", container=name)
        host = json.loads(podman("inspect", name).stdout)[0]["HostConfig"]
        assert host["Memory"] == 6 * 1024 ** 3 and host["NanoCpus"] == 2_000_000_000
        assert host["ReadonlyRootfs"] is True
        entry = run_prompt(url, SMALL_WORKFLOW)
        assert (tmp_path / "output" / entry["outputs"]["3"]["images"][0]["filename"]).exists()
        assert podman("healthcheck", "run", name, check=False).returncode == 0
    finally:
        subprocess.run([*base, "down", "-v"], env=env, capture_output=True, timeout=300)
