"""A stand-in ComfyUI for the backend tests: CI cannot install ComfyUI, so `standin_comfyui/main.py` runs
comfy-serverless with ComfyUI's arguments, loading `backend_pack` (which the front does not load).

tests/backend is a package so this conftest does not shadow tests/conftest.py (imported as `conftest`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import COMMAND, REPO

HERE = Path(__file__).resolve().parent


def make_comfyui_dir(root: Path) -> Path:
    """A ComfyUI-shaped folder: main.py, comfyui_version.py, custom_nodes/backend_pack."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("main.py", "comfyui_version.py"):
        shutil.copy2(HERE / "standin_comfyui" / name, root / name)
    shutil.copytree(HERE / "backend_pack", root / "custom_nodes" / "backend_pack",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return root


@pytest.fixture(scope="session")
def comfyui_dir(tmp_path_factory) -> Path:
    """One stand-in ComfyUI for the session, its own catalogue built once (as a ComfyUI install has its nodes)."""
    root = make_comfyui_dir(tmp_path_factory.mktemp("standin") / "ComfyUI")
    subprocess.run([*COMMAND, "snapshot", "--base-directory", str(root)], check=True, cwd=str(REPO),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return root


def backend_flags(comfyui: Path) -> tuple[str, ...]:
    return ("--comfyui", str(comfyui), "--comfyui-python", sys.executable)


def broken_comfyui(root: Path, body: str) -> Path:
    """A ComfyUI folder whose main.py runs `body` (a failing or slow start)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "main.py").write_text(textwrap.dedent(body))
    return root


@pytest.fixture
def ws_timeout_30():
    """websocket-client sockets that client libraries create (no timeout of their own) give up after 30 s."""
    import websocket

    previous = websocket.getdefaulttimeout()
    websocket.setdefaulttimeout(30)
    yield
    websocket.setdefaulttimeout(previous)


def prepared_front(base: Path, *flags: str) -> Path:
    """A front base directory with the test pack and its catalogue snapshot built (ready at once when started)."""
    from conftest import PACKS

    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    shutil.copy2(PACKS / "engine_test_nodes.py", base / "custom_nodes" / "engine_test_nodes.py")
    subprocess.run([*COMMAND, "snapshot", "--base-directory", str(base), *flags], check=True, cwd=str(REPO),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return base
