"""Regressions from the second real-pack trial (issue #9, packs with binary dependencies): ComfyUI behaviour
those packs rely on, checked through a server running a test pack written the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

CHECKPOINT = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    folder = tmp_path_factory.mktemp("trial2-models")
    make_test_checkpoint("sd15", "tiny", folder / CHECKPOINT, seed=4)
    return folder


@pytest.fixture
def guider_server(start_server, tmp_path, model_folder):
    base = tmp_path / "trial2"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT).hardlink_to(model_folder / CHECKPOINT)
    return start_server(packs=("comfy_style/scheduled_guiders.py",), base=base)


def _base_prompt() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "e": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3,
                                                         "denoise": 1.0}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
    }


def _sample(prompt: dict, key: str, guider: dict) -> str:
    """Adds guider -> SamplerCustomAdvanced -> SaveLatent-free output (the LATENT is read through PreviewAny)."""
    prompt[f"{key}g"] = guider
    prompt[f"{key}s"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["6", 0], "guider": [f"{key}g", 0], "sampler": ["7", 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}}
    prompt[f"{key}d"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{key}s", 0], "vae": ["1", 2]}}
    prompt[f"{key}o"] = {"class_type": "SaveImage", "inputs": {"images": [f"{key}d", 0], "filename_prefix": key}}
    prompt[f"{key}l"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{key}s", 0],
                                                               "filename_prefix": f"latents/{key}"}}
    return key


def _scheduled(from_cfg: float, to_cfg: float, **perp_neg) -> dict:
    inputs = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "sigmas": ["5", 0],
              "from_cfg": from_cfg, "to_cfg": to_cfg, **perp_neg}
    return {"class_type": "ScheduledCFGGuiderTrial", "inputs": inputs}


def _core_cfg(cfg: float) -> dict:
    return {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "cfg": cfg}}


def _pixels(srv, key: str) -> np.ndarray:
    return np.asarray(Image.open(srv.base / "output" / f"{key}_00001_.png")).astype(np.int16)


def _latent(srv, entry: dict, key: str):
    """The sampled latent (tiny random models: a cfg change can stay under one 8-bit level in fp32 pixels)."""
    from safetensors.torch import load_file

    [info] = entry["outputs"][f"{key}l"]["latents"]
    return load_file(srv.base / "output" / info["subfolder"] / info["filename"])["latent_tensor"]


def test_cfg_guider_subclass_predict_noise_sets_cfg_per_step(guider_server):
    srv = guider_server
    prompt = _base_prompt()
    _sample(prompt, "sched5", _scheduled(5.0, 5.0))
    _sample(prompt, "core5", _core_cfg(5.0))
    _sample(prompt, "core1", _core_cfg(1.0))
    _sample(prompt, "ramp", _scheduled(6.0, 2.0))
    _sample(prompt, "core6", _core_cfg(6.0))
    prompt["log"] = {"class_type": "ScheduledGuiderLog", "inputs": {"guider": ["rampg", 0], "after": ["ramps", 0],
                                                                    "core_guider": ["core5g", 0]}}
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    # the override's cfg is the one sampled with (before the fix: the guider's initial cfg of 1.0)
    assert np.array_equal(_pixels(srv, "sched5"), _pixels(srv, "core5"))
    latents = {key: _latent(srv, entry, key) for key in ("sched5", "core5", "core1", "ramp", "core6")}
    assert torch.equal(latents["sched5"], latents["core5"])
    assert not torch.equal(latents["sched5"], latents["core1"])
    assert not torch.equal(latents["ramp"], latents["core6"]) and not torch.equal(latents["ramp"], latents["core1"])
    text, kinds = entry["outputs"]["log"]["text"][0].split("|", 1)
    steps = [step.split(":") for step in text.split(";")]
    # euler: one call per step, at the schedule's first three sigmas, with the noise seed
    assert [float(cfg) for _, cfg, _ in steps] == pytest.approx([6.0, 6.0 - 4 / 3, 6.0 - 8 / 3], abs=1e-3)
    assert [seed for _, _, seed in steps] == ["11"] * 3
    sigmas = [float(sigma) for sigma, _, _ in steps]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[-1] > 0
    assert kinds == "cfg_guider=True|perp_neg=False"


def test_perp_neg_guider_subclass_follows_its_schedule(guider_server):
    srv = guider_server
    prompt = _base_prompt()
    _sample(prompt, "spn", _scheduled(4.0, 4.0, empty=["e", 0], neg_scale=1.5))
    _sample(prompt, "pn", {"class_type": "PerpNegGuider", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "empty_conditioning": ["e", 0],
        "cfg": 4.0, "neg_scale": 1.5}})
    _sample(prompt, "pn1", {"class_type": "PerpNegGuider", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "empty_conditioning": ["e", 0],
        "cfg": 4.0, "neg_scale": 1.0}})
    prompt["log"] = {"class_type": "ScheduledGuiderLog", "inputs": {"guider": ["spng", 0], "after": ["spns", 0],
                                                                    "core_guider": ["png", 0]}}
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert np.array_equal(_pixels(srv, "spn"), _pixels(srv, "pn"))
    assert not np.array_equal(_pixels(srv, "spn"), _pixels(srv, "pn1"))  # its own neg_scale is used
    text, kinds = entry["outputs"]["log"]["text"][0].split("|", 1)
    assert [float(step.split(":")[1]) for step in text.split(";")] == [4.0, 4.0, 4.0]
    assert kinds == "cfg_guider=True|perp_neg=True"


def test_outputs_beyond_return_types_link_as_comfyui_allows(start_server, tmp_path):
    """Impact's / Inspire's ByPassTypeTuple: RETURN_TYPES answers any slot, so a link to output 2 of a node that
    declares one output validates (ComfyUI indexes the live tuple) and carries that slot's value."""
    srv = start_server(packs=("comfy_style/scheduled_guiders.py",), base=tmp_path / "slots")
    entry = srv.run({"1": {"class_type": "SplitNumbers", "inputs": {"count": 3}},
                     "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["2"]["text"] == ["12"]
    refused = srv.post("/prompt", {"prompt": {"1": {"class_type": "SplitNumbers", "inputs": {"count": 3}},
                                              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 1]}}}})
    assert refused.status_code == 400  # slot 1 is an INT, not an IMAGE
