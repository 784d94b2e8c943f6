"""The ComfyUI child's command line and folders, found wrong by the hand check against a real ComfyUI 0.3.64:

- ComfyUI lists the input folder while it loads its nodes; started before that folder existed (a fresh base
  directory, e.g. `comfy-serverless snapshot` at image build time) it dropped nodes_video's four nodes and
  LoadImage from its /object_info (474 nodes instead of 478).
- ComfyUI's default --preview-method is none, so a front started with --preview-method latent2rgb relayed no
  previews from backend prompts.
- ComfyUI empties its temp directory whenever it starts: sharing the front's, a lazy boot (or a restart) deleted
  the previews of native prompts that ran before it (/view answered 404).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from comfy_serverless.backend.process import ComfyUIProcess, forwarded_flags
from comfy_serverless.paths import Folders
from comfy_serverless.settings import default_settings

from .conftest import backend_flags, broken_comfyui
from .test_backend_routing import backend_prompt, backend_state

RECORDER = """
    import json, os, sys
    args = sys.argv[1:]
    def after(flag):
        return args[args.index(flag) + 1]
    folders = {"input": after("--input-directory"), "output": after("--output-directory"),
               "temp": os.path.join(after("--temp-directory"), "temp")}
    report = {"argv": args, "exists": {k: os.path.isdir(v) for k, v in folders.items()}}
    with open(os.environ["RECORD_TO"], "w") as fh:
        json.dump(report, fh)
"""


def run_child(tmp_path: Path, monkeypatch, **settings_overrides) -> dict:
    comfyui = broken_comfyui(tmp_path / "RecordingComfyUI", RECORDER)
    record = tmp_path / "record.json"
    monkeypatch.setenv("RECORD_TO", str(record))
    base = tmp_path / "fresh-base"  # nothing in it yet: no input/, output/ or temp/
    settings = default_settings(base_directory=str(base), comfyui=str(comfyui), comfyui_python=sys.executable,
                                **settings_overrides)
    exited = threading.Event()
    codes: list[int] = []
    process = ComfyUIProcess(settings, Folders.from_settings(settings), lambda _p, code: (codes.append(code),
                                                                                        exited.set()))
    process.start()
    assert exited.wait(60), "the recording ComfyUI did not exit"
    assert codes == [0], list(process.log_tail)
    return json.loads(record.read_text())


def test_the_shared_folders_exist_before_comfyui_starts(tmp_path, monkeypatch):
    report = run_child(tmp_path, monkeypatch)
    assert report["exists"] == {"input": True, "output": True, "temp": True}


def test_preview_and_metadata_flags_reach_comfyui(tmp_path, monkeypatch):
    plain = run_child(tmp_path / "plain", monkeypatch)["argv"]
    assert "--preview-method" not in plain and "--disable-metadata" not in plain  # ComfyUI's defaults apply

    argv = run_child(tmp_path / "previews", monkeypatch, preview_method="latent2rgb", preview_size=256,
                     disable_metadata=True, comfyui_args="--cpu")["argv"]
    assert argv[argv.index("--preview-method") + 1] == "latent2rgb"
    assert argv[argv.index("--preview-size") + 1] == "256"
    assert "--disable-metadata" in argv and argv[-1] == "--cpu"


def test_comfyui_args_win_over_forwarded_flags():
    settings = default_settings(preview_method="auto", preview_size=300)
    assert forwarded_flags(settings, ["--preview-method", "taesd"]) == ["--preview-size", "300"]
    assert forwarded_flags(settings, ["--preview-method=none", "--preview-size=128"]) == []
    assert forwarded_flags(default_settings(), []) == []


def preview_prompt(color: int, on_backend: bool) -> dict:
    """EmptyImage -> PreviewImage (both engines have them), with the backend-only chain too when `on_backend`."""
    prompt = backend_prompt(1.0) if on_backend else {}
    prompt.update({"10": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                 "color": color}},
                   "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}})
    return prompt


def test_a_lazy_boot_keeps_the_fronts_previews_and_backend_previews_are_viewable(start_server, comfyui_dir):
    srv = start_server(*backend_flags(comfyui_dir))  # lazy: the backend starts with the second prompt
    native = srv.run(preview_prompt(0x112233, on_backend=False))["outputs"]["11"]["images"][0]
    assert srv.get("/view", params=native).status_code == 200

    ws = srv.ws()
    queued = srv.queue_prompt(preview_prompt(0x445566, on_backend=True), client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    assert backend_state(srv)["boots"] == 1
    assert srv.get("/view", params=native).status_code == 200  # still there after ComfyUI emptied its temp
    executed = [m["data"]["output"] for m in messages
                if not isinstance(m, bytes) and m["type"] == "executed" and m["data"]["node"] == "11"]
    on_backend = srv.wait_history(queued["prompt_id"])["outputs"]["11"]["images"][0]
    assert executed == [{"images": [on_backend]}]  # the event and the history name the same file
    assert on_backend["type"] == "temp" and on_backend["subfolder"] == "comfyui/temp"
    assert srv.get("/view", params=on_backend).status_code == 200


def test_a_comfyui_url_backend_keeps_its_own_temp_names(start_server, comfyui_dir, tmp_path):
    """--comfyui-url: a ComfyUI the front did not start has its own folders, so its file names pass unchanged."""
    import shutil

    standin = tmp_path / "RunningComfyUI"
    shutil.copytree(comfyui_dir, standin, ignore=shutil.ignore_patterns("server-*.log", "temp"))
    backend = start_server(base=standin, packs=())  # the stand-in, already running, with the backend pack
    srv = start_server("--comfyui-url", backend.url)
    entry = srv.run(preview_prompt(0x778899, on_backend=True))
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["4"]["values"] == [3.0]
    image = entry["outputs"]["11"]["images"][0]
    assert image["type"] == "temp" and image["subfolder"] == ""
    assert backend.get("/view", params=image).status_code == 200  # where that ComfyUI wrote it
