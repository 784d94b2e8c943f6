"""Two servers in one process share nothing but imported modules: settings, folders, interrupts, start-up
stages and model caches belong to each server's context."""

import asyncio
import shutil
import threading
import time

import requests
from PIL import Image

from comfy_serverless import cli, context, paths
from comfy_serverless.server.app import App
from conftest import PACKS


class InProcessServer:
    """An App serving from a thread of this process, the way cli.serve runs it."""

    def __init__(self, base, *flags):
        (base / "custom_nodes").mkdir(parents=True)
        shutil.copy2(PACKS / "engine_test_nodes.py", base / "custom_nodes" / "engine_test_nodes.py")
        settings = cli.parse("serve", ["--base-directory", str(base), "--port", "0", "--warmup", "eager", *flags])
        self.app = App(settings, [])
        self.app.prepare_directories()
        self.app.load_catalog_snapshot()
        self.app.warm_up_now()
        self.stop = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while (self.app.http is None or not self.app.http.bound_ports) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.app.http.bound_ports[0]}"

    async def _serve(self):
        self.stop = asyncio.Event()
        await self.app.serve_forever(self.stop)

    def run(self, prompt, timeout=60):
        prompt_id = requests.post(self.url + "/prompt", json={"prompt": prompt}).json()["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = requests.get(f"{self.url}/history/{prompt_id}").json()
            if prompt_id in entry:
                return entry[prompt_id]
            time.sleep(0.02)
        raise TimeoutError(prompt_id)

    def close(self):
        self.app.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def save_prompt(prefix):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def test_two_servers_in_one_process_keep_their_own_state(tmp_path):
    fallback_before = paths.current()
    first = InProcessServer(tmp_path / "first")
    second = InProcessServer(tmp_path / "second", "--disable-metadata")
    try:
        assert first.app.context is not second.app.context

        # Each SaveImage writes under its own server's output folder, with its own settings.
        first.run(save_prompt("one"))
        second.run(save_prompt("two"))
        assert [p.name for p in (tmp_path / "first" / "output").iterdir()] == ["one_00001_.png"]
        assert [p.name for p in (tmp_path / "second" / "output").iterdir()] == ["two_00001_.png"]
        with Image.open(tmp_path / "first" / "output" / "one_00001_.png") as png:
            assert "prompt" in png.text
        with Image.open(tmp_path / "second" / "output" / "two_00001_.png") as png:
            assert "prompt" not in png.text  # --disable-metadata is the second server's alone

        # An interrupt sent to one server does not reach the other's running prompt.
        slow = {"1": {"class_type": "Number", "inputs": {"value": 1}},
                "2": {"class_type": "SlowSteps", "inputs": {"value": ["1", 0], "steps": 20, "step_seconds": 0.05}},
                "3": {"class_type": "Record", "inputs": {"value": ["2", 0]}}}
        result = {}
        runner = threading.Thread(target=lambda: result.update(entry=first.run(slow)))
        runner.start()
        deadline = time.monotonic() + 10
        while not requests.get(first.url + "/queue").json()["queue_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(5):
            assert requests.post(second.url + "/interrupt", json={}).status_code == 200
            time.sleep(0.05)
        runner.join(30)
        assert result["entry"]["status"]["status_str"] == "success"
        assert second.app.context.interrupt.is_set() and not first.app.context.interrupt.is_set()

        # Start-up stages are each server's own.
        assert "first_prompt_done" in first.app.context.timeline.stages()
        assert requests.get(second.url + "/system_stats").json()["comfy_serverless"]["startup"] == \
            second.app.context.timeline.stages()
    finally:
        first.close()
        second.close()
    # Code outside both servers still sees the process fallback, untouched by either.
    assert paths.current() is fallback_before
    assert context.current().folders is fallback_before
