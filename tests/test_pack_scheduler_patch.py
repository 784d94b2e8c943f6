"""A scheduler a pack adds by patching comfy.samplers (efficiency-nodes' AYS/GITS pattern) reaches the core
KSampler: the pack's sigma function is used for its names, ours for the built-in ones."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path_factory.mktemp("schedpatch") / "tiny-sd15.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=4)
    return path


def test_a_patched_scheduler_samples_through_the_core_ksampler(start_server, tmp_path, checkpoint):
    base = tmp_path / "sched"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).hardlink_to(checkpoint)
    srv = start_server("--force-fp32", packs=("comfy_style/scheduler_patch.py",), base=base)
    listed = srv.get("/object_info/PatchedSchedulerSampler").json()["PatchedSchedulerSampler"]
    assert "Halved karras" in listed["input"]["required"]["scheduler"][0]

    def sample(scheduler: str, prefix: str):
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "PatchedSchedulerSampler", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
                "scheduler": scheduler}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        from safetensors.torch import load_file

        return load_file(str(next((srv.base / "output").glob(f"{prefix}_*.latent"))))["latent_tensor"]

    halved, karras = sample("Halved karras", "halved"), sample("karras", "karras")
    assert halved.shape == karras.shape == (1, 4, 8, 8)
    assert not torch.allclose(halved, karras)  # the pack's sigmas were used, not refused or replaced
