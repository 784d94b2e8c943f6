"""The cold-start design: a light front, the catalogue as data, warm-up policies, custom node loading."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import COMMAND, PACKS, REPO, Server


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError


def diagnostics(srv):
    return srv.get("/system_stats").json()["comfy_serverless"]


def slow(value):
    """A prompt that runs for 50 s unless interrupted."""
    return {"1": {"class_type": "Number", "inputs": {"value": value}},
            "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 1000, "step_seconds": 0.05}},
            "3": {"class_type": "Record", "inputs": {"value": ["2", 0]}}}


def test_lazy_front_serves_everything_without_heavy_modules(start_server):
    srv = start_server("--warmup", "lazy")
    assert srv.get("/object_info").status_code == 200
    assert srv.get("/queue").status_code == 200 and srv.get("/history").status_code == 200
    (srv.base / "input").mkdir(exist_ok=True)
    invalid = srv.post("/prompt", {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
                                              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})
    assert invalid.status_code == 400  # validated, including LoadImage's VALIDATE_INPUTS
    assert invalid.json()["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"
    info = diagnostics(srv)
    assert info["heavy_modules_loaded"] == []
    assert "packs_imported" not in info["startup"]


def test_lazy_mode_imports_packs_on_the_first_prompt(start_server):
    srv = start_server("--warmup", "lazy")
    entry = srv.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                   "color": 0}},
                     "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert entry["status"]["status_str"] == "success"
    assert "torch" in diagnostics(srv)["heavy_modules_loaded"]


def test_background_warmup_imports_after_listening(start_server):
    srv = start_server("--warmup", "background")
    info = wait_for(lambda: (d := diagnostics(srv))["warmup"]["state"] == "done" and d)
    assert info["startup"]["listening"] < info["startup"]["packs_imported"]
    assert "torch" in info["heavy_modules_loaded"]


def test_eager_warmup_imports_before_listening(start_server):
    srv = start_server("--warmup", "eager")
    startup = diagnostics(srv)["startup"]
    assert startup["packs_imported"] < startup["listening"]


def test_snapshot_is_reused_and_rebuilt_when_a_pack_changes(tmp_path):
    base = tmp_path / "base"
    first = Server(base)
    try:
        assert "NewNode" not in first.get("/object_info").json()
    finally:
        first.stop()
    second = Server(base)
    try:
        assert "stale" not in second.log() and "building it" not in second.log()
        assert not diagnostics(second)["catalog"]["stale"]
    finally:
        second.stop()
    extra = base / "custom_nodes" / "new_pack.py"
    extra.write_text((PACKS / "new_pack_template.py").read_text())
    third = Server(base)
    try:
        assert "stale" in third.log()
        wait_for(lambda: "NewNode" in third.get("/object_info").json())
        assert not diagnostics(third)["catalog"]["stale"]
    finally:
        third.stop()


def test_snapshot_command_writes_the_catalogue(tmp_path):
    result = subprocess.run([*COMMAND, "snapshot", "--base-directory", str(tmp_path)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".comfy-serverless" / "catalog.json").is_file()


def test_broken_custom_node_is_logged_and_skipped(start_server):
    srv = start_server(packs=("engine_test_nodes.py", "broken_pack.py"))
    info = srv.get("/object_info").json()
    assert "Add" in info and "LoadImage" in info
    assert "broken_pack" in srv.log() and "Traceback" in srv.log()


def test_disable_all_custom_nodes(start_server):
    srv = start_server("--disable-all-custom-nodes")
    info = srv.get("/object_info").json()
    assert "Add" not in info and "SaveImage" in info


def test_custom_node_cannot_override_builtin(start_server):
    srv = start_server(packs=("engine_test_nodes.py", "override_pack.py"))
    assert srv.get("/object_info/SaveImage").json()["SaveImage"]["python_module"] == "nodes"
    assert "ignored" in srv.log()


def test_extra_model_paths_yaml(start_server, tmp_path):
    other = tmp_path / "other"
    (other / "ckpts").mkdir(parents=True)
    (other / "ckpts" / "shared.safetensors").write_bytes(b"x")
    (other / "nodes").mkdir()
    (other / "nodes" / "new_pack.py").write_text((PACKS / "new_pack_template.py").read_text())
    config = tmp_path / "extra.yaml"
    config.write_text(f"mine:\n  base_path: {other}\n  checkpoints: ckpts\n  custom_nodes: nodes\n")
    srv = start_server("--extra-model-paths-config", str(config))
    assert "shared.safetensors" in srv.get("/models/checkpoints").json()
    wait_for(lambda: "NewNode" in srv.get("/object_info").json())


def test_environment_variables_configure_the_server(start_server):
    srv = start_server(env={"COMFY_CACHE_NONE": "1", "COMFY_MAX_QUEUE_SIZE": "7"})
    assert diagnostics(srv)["cache_mode"] == "none"
    # COMFY_MAX_QUEUE_SIZE=7 (default 100): with one prompt running, 7 more may wait and the 8th is refused.
    srv.queue_prompt(slow(0))
    wait_for(lambda: srv.get("/queue").json()["queue_running"], timeout=30)
    for value in range(1, 8):
        srv.queue_prompt(slow(value))
    refused = srv.post("/prompt", {"prompt": slow(8)})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "queue_full"
    assert len(srv.get("/queue").json()["queue_pending"]) == 7
    assert srv.post("/queue", {"clear": True}).status_code == 200
    assert srv.post("/interrupt").status_code == 200


def test_comfyui_launch_flags_are_accepted(start_server, server):
    srv = start_server("--cpu", "--cpu-vae", "--fp16-vae", "--force-fp16", "--fast", "--disable-smart-memory",
                       "--disable-xformers", "--dont-print-server", "--listen", "127.0.0.1,127.0.0.2", "--highvram",
                       "--preview-method", "auto", "--some-future-flag")
    stats = srv.get("/system_stats").json()
    log = srv.log()
    # Every flag but the made-up one was recognised: the unknown-argument warning names that one alone.
    unknown = [line for line in log.splitlines() if "ignoring unknown arguments" in line]
    assert unknown and all(line.endswith("ignoring unknown arguments: --some-future-flag") for line in unknown)
    # Each flag's effect here.  (Those that act only when a model runs are checked where one does:
    # --fp16-vae and --force-fp16 pick the loaded dtypes and --disable-smart-memory unloads after each prompt in
    # tests/sd/test_e2e.py; --preview-method auto sends latent2rgb previews in tests/sd/test_nodes.py.)
    # --listen: also on 127.0.0.2 (the harness talks to 127.0.0.1; the default listens there alone)
    second = re.search(r"listening on http://127\.0\.0\.2:(\d+)", log)
    assert second and requests.get(f"http://127.0.0.2:{second.group(1)}/system_stats", timeout=10).ok
    assert [device["type"] for device in stats["devices"]] == ["cpu"]  # --cpu (always true here)
    for flag in ("--cpu-vae", "--fast", "--disable-xformers", "--highvram"):  # GPU-only: said to be ignored
        assert f"{flag}: not applicable on this CPU-only server; ignored" in log
    # --dont-print-server: no access log, where a server without the flag logs every request.
    assert "GET /system_stats" not in log
    server.get("/system_stats")
    wait_for(lambda: "GET /system_stats 200" in server.log(), timeout=10)


def test_help_lists_flags_and_environment_variables():
    result = subprocess.run([*COMMAND, "serve", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for text in ("--listen", "--warmup", "COMFY_PORT", "--cache-lru", "--max-queue-size", "/ready"):
        assert text in result.stdout


def test_installed_command_exists():
    # The README set-up (scripts/setup.sh, run by ./test.sh) installs the command; without it this fails.
    assert os.access(Path(REPO, ".venv", "bin", "comfy-serverless"), os.X_OK)
    result = subprocess.run([str(Path(REPO, ".venv", "bin", "comfy-serverless")), "--version"],
                            capture_output=True, text=True)
    assert result.stdout.startswith("comfy-serverless")


def test_front_modules_import_no_heavy_library():
    code = ("import sys, comfy_serverless.cli, comfy_serverless.server.app, comfy_serverless.server.routes, "
            "comfy_serverless.engine.executor, comfy_serverless.engine.validation, comfy_serverless.catalog.snapshot;"
            "bad = [m for m in ('torch', 'numpy', 'PIL', 'aiohttp') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
