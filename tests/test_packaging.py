"""The project as a user installs it (`pip install .`, README): a clean venv, no dev-only extras.

Proves that the wheel carries its own data (the CLIP vocabulary) and declares every dependency the worker
needs to tokenize a prompt: the test venv has extras (open_clip_torch, transformers) that could hide a gap.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROBE = """
import importlib.util, json
from comfy_serverless.text.tokenizer import CLIPTokenizer, find_vocab_file
print(json.dumps({"vocab": find_vocab_file(), "ids": CLIPTokenizer().tokenize("a photo of a cat")[:7],
                  "open_clip": importlib.util.find_spec("open_clip") is not None}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from a copy of its sources; built once per test run."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    # A copy, so the build writes its build/ and egg-info there rather than into the working tree.
    shutil.copytree(REPO / "comfy_serverless", source / "comfy_serverless",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = root / "venv"
    subprocess.run([shutil.which("python3.11") or sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch==2.13.0 is pinned in pyproject.toml; that CPU build installs from local disk here.
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             str(source)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return python


def test_installed_wheel_tokenizes_with_its_own_vocabulary(installed, tmp_path):
    # Run outside the repository so that the checkout is not importable.
    result = subprocess.run([str(installed), "-c", PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]  # <start> a photo of a cat <end>
    vocab = Path(found["vocab"])
    assert vocab.is_relative_to(installed.parent.parent) and "site-packages" in vocab.parts  # the installed copy
    assert not found["open_clip"]  # the vocabulary did not come from a package that happened to be there
    notice = Path(found["vocab"]).with_name("NOTICE.txt").read_text()
    assert "MIT License" in notice and "Copyright (c) 2021 OpenAI" in notice
