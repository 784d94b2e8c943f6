"""The ComfyUI child process: its command line, a private loopback port, its log, its exit.

ComfyUI is started as `python main.py --listen 127.0.0.1 --port N` with this server's input and output
directories, a temp directory inside this server's (ComfyUI empties its temp directory whenever it starts, which
would delete the front's previews at every lazy boot or restart), and an extra_model_paths file naming this
server's model folders, so both engines read the same models and write where `/view` looks. Only loopback is
bound: the backend is never reachable from outside.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

from ..child_process import ends_with_parent
from ..paths import MODEL_FOLDERS

log = logging.getLogger("comfy_serverless.backend")

LOG_LINES_KEPT = 40
TEMP_SUBFOLDER = "comfyui/temp"  # ComfyUI's temp directory, relative to the front's: what /view's subfolder gets


def backend_temp_dir(folders) -> str:
    return os.path.join(folders.temp, *TEMP_SUBFOLDER.split("/"))


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comfyui_python(settings) -> str:
    """--comfyui-python, else the checkout's own virtual environment, else python3 on PATH."""
    if settings.comfyui_python:
        return settings.comfyui_python
    for venv in (".venv", "venv"):
        candidate = os.path.join(settings.comfyui, venv, "bin", "python")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("python3") or sys.executable


def extra_model_paths_yaml(folders) -> str:
    """ComfyUI's extra_model_paths.yaml text naming every model folder of this server (absolute paths, so no
    base_path; custom_nodes left out: the backend loads only its own packs)."""
    lines = ["comfy_serverless:"]
    for name in MODEL_FOLDERS:
        if name == "custom_nodes":
            continue
        dirs = [d for d in folders.model_dirs(name) if "\n" not in d]
        if dirs:
            lines.append(f"  {name}: |")
            lines += [f"    {d}" for d in dirs]
    return "\n".join(lines) + "\n"


def forwarded_flags(settings, own_args: list[str]) -> list[str]:
    """This server's flags that shape what clients receive (previews, saved files' metadata), passed to ComfyUI
    so a prompt's results look the same on either engine; --comfyui-args naming the flag wins."""
    def given(flag: str) -> bool:
        return any(arg == flag or arg.startswith(flag + "=") for arg in own_args)

    flags: list[str] = []
    if settings.preview_method != "none" and not given("--preview-method"):
        flags += ["--preview-method", settings.preview_method]
    if settings.preview_size != 512 and not given("--preview-size"):
        flags += ["--preview-size", str(settings.preview_size)]
    if settings.disable_metadata and not given("--disable-metadata"):
        flags.append("--disable-metadata")
    return flags


class ComfyUIProcess:
    """One run of the child; `on_exit(returncode)` is called from a watcher thread when it ends."""

    def __init__(self, settings, folders, on_exit):
        self.settings = settings
        self.folders = folders
        self.on_exit = on_exit
        self.port = free_loopback_port()
        self.proc: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.stopping = False
        self._config_dir: str | None = None

    def command(self, config_path: str) -> list[str]:
        s = self.settings
        own_args = shlex.split(s.comfyui_args or "")
        return [comfyui_python(s), os.path.join(os.path.abspath(s.comfyui), "main.py"),
                "--listen", "127.0.0.1", "--port", str(self.port),
                "--input-directory", self.folders.input, "--output-directory", self.folders.output,
                "--temp-directory", os.path.dirname(backend_temp_dir(self.folders)),  # ComfyUI appends "temp"
                "--extra-model-paths-config", config_path, *forwarded_flags(s, own_args), *own_args]

    def start(self) -> None:
        # ComfyUI lists the input folder while loading nodes: missing, it drops LoadImage's file list and
        # whole modules (nodes_video) from its catalogue
        for directory in (self.folders.input, self.folders.output, backend_temp_dir(self.folders)):
            os.makedirs(directory, exist_ok=True)
        self._config_dir = tempfile.mkdtemp(prefix="comfy-serverless-backend-")
        config_path = os.path.join(self._config_dir, "extra_model_paths.yaml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(extra_model_paths_yaml(self.folders))
        command = self.command(config_path)
        log.info("starting ComfyUI: %s", shlex.join(command))
        self.proc = subprocess.Popen(command, cwd=os.path.abspath(self.settings.comfyui), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=ends_with_parent())  # SIGTERM if the front is killed
        threading.Thread(target=self._watch, name="comfyui-log", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _watch(self) -> None:
        """Copies the child's output into our log (and keeps the tail for error messages), then reports its exit."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log_tail.append(line)
            log.info("comfyui: %s", line)
        returncode = proc.wait()
        shutil.rmtree(self._config_dir or "", ignore_errors=True)
        self.on_exit(self, returncode)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` (the child's whole process group: ComfyUI may fork)."""
        self.stopping = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        except ProcessLookupError:
            pass
