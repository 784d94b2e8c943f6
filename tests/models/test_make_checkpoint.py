"""The random-weight file writers and the `make-test-checkpoint` command."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from comfy_serverless.models.checkpoint_files import open_checkpoint, read_metadata
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.tools import make_test_checkpoint_command

PREFIXES = {
    "sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
    "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
             "conditioner.embedders.1.model."),
}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_original_single_file_layout(tmp_path, arch):
    path = tmp_path / "model.safetensors"
    make_test_checkpoint(arch, "tiny", path)
    assert path.stat().st_size < 15_000_000
    with safe_open(str(path), "pt") as file:
        keys = list(file.keys())
        assert file.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    for prefix in PREFIXES[arch]:
        assert any(key.startswith(prefix) for key in keys), prefix
    assert all(key.startswith(PREFIXES[arch]) for key in keys)
    metadata = read_metadata(path)
    assert metadata["comfy_serverless.test_checkpoint"] == arch
    assert metadata["modelspec.prediction_type"] == "epsilon"


def test_same_seed_same_file(tmp_path):
    first, again, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    make_test_checkpoint("sd15", "tiny", first, seed=3)
    make_test_checkpoint("sd15", "tiny", again, seed=3)
    make_test_checkpoint("sd15", "tiny", other, seed=4)
    assert digest(first) == digest(again) != digest(other)
    assert not list(tmp_path.glob("*.partial"))


def test_sd2_v_metadata_and_fp32(tmp_path):
    path = tmp_path / "v.safetensors"
    make_test_checkpoint("sd2-v", "tiny", path, dtype=torch.float32)
    assert read_metadata(path)["modelspec.prediction_type"] == "v"
    parts = open_checkpoint(path)
    assert parts.architecture.prediction == "v_prediction"
    assert parts.unet["out.2.weight"].dtype == torch.float32


def test_command_line_writes_a_tiny_checkpoint(tmp_path):
    out = tmp_path / "out.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "comfy_serverless", "make-test-checkpoint", "--arch", "sd15", "--size", "tiny",
         str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert open_checkpoint(out).architecture.description == "SD1.x (eps, custom size)"


def test_command_line_rejects_bad_arguments(tmp_path, capsys):
    for argv in (["--arch", "sd3", str(tmp_path / "x.safetensors")],
                 ["--arch", "sd15", "--size", "huge", str(tmp_path / "x.safetensors")],
                 ["--arch", "sd15", str(tmp_path / "x.ckpt")]):
        with pytest.raises(SystemExit) as caught:
            make_test_checkpoint_command(argv)
        assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
