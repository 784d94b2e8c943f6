"""The backend's life as the front manages it: boot policies, crash and restart, SIGTERM drain, failed boots."""

from __future__ import annotations

import os
import signal
import time

from conftest import simple_prompt, types_of, wait_until

from .conftest import backend_flags, broken_comfyui, prepared_front
from .test_backend_routing import backend_prompt, backend_state


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_background_boot_starts_after_listening_and_ready_does_not_wait(start_server, tmp_path, comfyui_dir):
    slow = broken_comfyui(tmp_path / "SlowComfyUI", f"""
        import os, sys, time
        time.sleep(5)  # a slow ComfyUI start
        os.execv(sys.executable, [sys.executable, {str(comfyui_dir / "main.py")!r}, *sys.argv[1:]])
    """)
    base = prepared_front(tmp_path / "front")
    srv = start_server(*backend_flags(slow), "--warmup", "background", base=base)
    assert srv.get("/ready").status_code == 200
    assert backend_state(srv)["state"] == "booting"  # started without any prompt, not waited for
    state = wait_until(lambda: (s := backend_state(srv))["state"] == "up" and s, 60, "backend up")
    startup = srv.get("/system_stats").json()["comfy_serverless"]["startup"]
    assert startup["listening"] < startup["backend_ready"]
    assert state["boot_seconds"] >= 5 and state["pid"] is not None
    assert 'comfy_backend_state{state="up"} 1' in srv.get("/metrics").text


def test_lazy_boot_on_the_first_prompt_that_needs_it(start_server, comfyui_dir):
    srv = start_server(*backend_flags(comfyui_dir))  # the fixture's default is --warmup lazy
    assert srv.run(simple_prompt(1))["status"]["status_str"] == "success"
    time.sleep(0.5)
    assert backend_state(srv)["state"] == "not started"
    entry = srv.run(backend_prompt(1.0))
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["4"]["values"] == [3.0]
    assert backend_state(srv)["state"] == "up" and backend_state(srv)["boots"] == 1


def test_a_crashed_backend_fails_its_prompt_and_is_restarted(start_server, comfyui_dir):
    srv = start_server(*backend_flags(comfyui_dir))
    ws = srv.ws()
    doomed = srv.queue_prompt(backend_prompt(1.0, steps=2000, step_seconds=0.02), client_id=ws.client_id)
    ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == doomed["prompt_id"])
    first_pid = backend_state(srv)["pid"]
    os.kill(first_pid, signal.SIGKILL)
    messages = ws.until_done(doomed["prompt_id"])
    error = [m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "execution_error"][0]
    assert error["exception_type"] == "BackendCrashed" and "status -9" in error["exception_message"]
    assert error["node_id"] == "3" and error["node_type"] == "BackendSteps"
    entry = srv.wait_history(doomed["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][1]["exception_type"] == "BackendCrashed"

    state = wait_until(lambda: (s := backend_state(srv))["state"] == "up" and s, 60, "backend restarted")
    assert state["restarts"] == 1 and state["pid"] != first_pid
    assert srv.run(backend_prompt(2.0))["outputs"]["4"]["values"] == [6.0]  # the new backend runs prompts
    assert srv.get("/health").status_code == 200 and srv.get("/ready").status_code == 200


def test_sigterm_drains_prompts_on_both_engines_then_stops_the_backend(start_server, comfyui_dir):
    srv = start_server(*backend_flags(comfyui_dir))
    assert srv.run(backend_prompt(1.0))["status"]["status_str"] == "success"  # backend up
    backend_pid = backend_state(srv)["pid"]
    ws = srv.ws()
    on_backend = srv.queue_prompt(backend_prompt(2.0, steps=20, step_seconds=0.05), client_id=ws.client_id)
    native = srv.queue_prompt(simple_prompt(5), client_id=ws.client_id)
    ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == on_backend["prompt_id"])
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in srv.log(), 15, "the drain to begin")  # the signal is handled async
    refused = srv.post("/prompt", {"prompt": simple_prompt(6)})
    assert refused.status_code == 503
    ws.until_done(native["prompt_id"])
    kinds = types_of(ws.messages)
    assert kinds.count("execution_success") == 2  # both finished during the drain
    assert srv.proc.wait(30) == 0
    wait_until(lambda: not pid_alive(backend_pid), 15, "the backend to stop")
    # the client's WebSocket was still open at exit: its connection ends without an asyncio error in the log
    assert "Exception in callback" not in srv.log() and "CancelledError" not in srv.log()


def running(pid: int) -> bool:
    """Alive and not a zombie (a child whose parent was killed waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_backend_ends_when_the_front_is_killed(start_server, comfyui_dir):
    """SIGKILL (the OOM killer, a platform's hard stop) runs nothing of ours: the kernel must end the child."""
    srv = start_server(*backend_flags(comfyui_dir))
    assert srv.run(backend_prompt(1.0))["status"]["status_str"] == "success"  # backend up
    backend_pid = backend_state(srv)["pid"]
    srv.proc.kill()
    srv.proc.wait(10)
    wait_until(lambda: not running(backend_pid), 15, "the backend to end with the front")


def test_a_backend_that_cannot_start_fails_its_prompt_with_its_log(start_server, tmp_path, comfyui_dir):
    broken = broken_comfyui(tmp_path / "BrokenComfyUI", """
        import sys
        print("ModuleNotFoundError: No module named 'torchvision'", flush=True)
        sys.exit(3)
    """)
    srv = start_server(*backend_flags(broken))
    # the stand-in's catalogue as the snapshot's backend part, so the prompt validates without a backend
    from comfy_serverless.catalog import snapshot

    info = __import__("json").loads((comfyui_dir / ".comfy-serverless" / "catalog.json").read_text())
    object_info = {name: entry["info"] for name, entry in info["nodes"].items()}
    srv.stop()
    snapshot.save(snapshot.backend_part("old", "0.3.64", object_info, 0.0),
                  snapshot.backend_path(str(srv.base / ".comfy-serverless" / "catalog.json")))
    srv = start_server(*backend_flags(broken), base=srv.base)
    entry = srv.run(backend_prompt(1.0))
    error = entry["status"]["messages"][-1][1]
    assert error["exception_type"] == "BackendUnavailable"
    assert "exited with status 3" in error["exception_message"] and "torchvision" in error["exception_message"]
    assert backend_state(srv)["state"] == "failed"
    assert srv.run(simple_prompt(2))["status"]["status_str"] == "success"  # native prompts are unaffected
    assert srv.get("/ready").status_code == 200
