"""Regressions from the real-pack trial (issue #9): ComfyUI module surface that popular packs use, checked through
a server running tests/packs/comfy_style/pack_trial.py, a pack written the way those packs are."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

PACK = "comfy_style/pack_trial.py"
CHECKPOINT = "tiny-sd15.safetensors"
LORA = "tiny-lora.safetensors"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_lora

    folder = tmp_path_factory.mktemp("trial-models")
    make_test_checkpoint("sd15", "tiny", folder / CHECKPOINT, seed=2)
    make_test_lora("sd15", folder / LORA, seed=3)
    return folder


@pytest.fixture
def trial_server(start_server, tmp_path, model_files):
    base = tmp_path / "trial"
    for kind, name in (("checkpoints", CHECKPOINT), ("loras", LORA)):
        (base / "models" / kind).mkdir(parents=True)
        (base / "models" / kind / name).hardlink_to(model_files / name)
    (base / "input").mkdir()
    pixels = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(base / "input" / "noise.png")
    return start_server(packs=(PACK,), base=base)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_core_node_class_lists_feed_a_packs_combos(trial_server):
    srv = trial_server
    required = srv.get("/object_info/TrialImageResize").json()["TrialImageResize"]["input"]["required"]
    assert required["method"] == [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]]
    assert required["crop"] == [["disabled", "center"]]
    assert required["latent_method"] == [["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]]
    load = {"class_type": "LoadImage", "inputs": {"image": "noise.png"}}
    entry = srv.run({
        "1": load,
        "2": {"class_type": "TrialImageResize", "inputs": {"image": ["1", 0], "width": 32, "method": "bilinear",
                                                           "crop": "disabled", "latent_method": "bislerp"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pack"}},
        "4": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 32,
                                                     "height": 24, "crop": "disabled"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "core"}},
    })
    assert entry["status"]["status_str"] == "success", entry["status"]
    ours, core = _pixels(srv.base / "output" / "pack_00001_.png"), _pixels(srv.base / "output" / "core_00001_.png")
    assert ours.shape == (24, 32, 3) and np.array_equal(ours, core)


def test_save_image_subclass_saves_where_its_init_says(trial_server):
    srv = trial_server
    entry = srv.run({
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.6, "width": 20, "height": 12}},
        "2": {"class_type": "TrialMaskPreview", "inputs": {"mask": ["1", 0]}},
    })
    assert entry["status"]["status_str"] == "success", entry["status"]
    (saved,) = entry["outputs"]["2"]["images"]
    assert saved["type"] == "temp" and saved["filename"].startswith("ComfyUI_temp_")
    path = srv.base / "temp" / saved["filename"]
    assert not (srv.base / "output" / saved["filename"]).exists()
    pixels = _pixels(path)
    assert pixels.shape == (12, 20, 3) and np.all(pixels == round(0.6 * 255))
    assert srv.get("/view", params={"filename": saved["filename"], "type": "temp"}).status_code == 200


def test_save_image_subclass_with_a_foreign_folder_fails_clearly(trial_server):
    srv = trial_server
    entry = srv.run({
        "1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
        "2": {"class_type": "TrialSaveToUserFolder", "inputs": {"mask": ["1", 0]}},
    })
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_id"] == "2" and "is not this server's output, temp or input directory" in \
        error["exception_message"]


def _txt2img(lora_nodes: dict, model: list, clip: list, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        **lora_nodes,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


@pytest.mark.parametrize("which, strength_clip", [("both", 0.5), ("model only", 0.0), ("clip only", 0.5)])
def test_load_lora_for_models_matches_lora_loader(trial_server, which, strength_clip):
    srv = trial_server
    strength_model = 0.0 if which == "clip only" else 1.0
    pack = {"2": {"class_type": "TrialLoraFromStateDict", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": 1.0, "strength_clip": 0.5,
        "which": which}}, "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}
    core = {"2": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": strength_model,
        "strength_clip": strength_clip}}}
    images = {}
    for name, nodes in (("pack", pack), ("core", core), ("plain", {})):
        model, clip = (["2", 0], ["2", 1]) if nodes else (["1", 0], ["1", 1])
        entry = srv.run(_txt2img(nodes, model, clip, f"{name}-{which}"))
        assert entry["status"]["status_str"] == "success", entry["status"]
        images[name] = _pixels(srv.base / "output" / f"{name}-{which}_00001_.png")
        if name == "pack":
            given = {"both": "model=True clip=True", "model only": "model=True clip=False",
                     "clip only": "model=False clip=True"}[which]
            assert entry["outputs"]["9"]["text"] == [given]
    assert np.array_equal(images["pack"], images["core"])
    assert not np.array_equal(images["pack"], images["plain"])  # the LoRA changed the picture


def test_flexible_optional_inputs_reach_the_node(trial_server):
    entry = trial_server.run({"1": {"class_type": "TrialFlexibleLoras", "inputs": {
        "lora_1": {"on": True, "lora": "a.safetensors", "strength": 1.0},
        "lora_2": {"on": False, "lora": "b.safetensors", "strength": 0.5}}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["1"]["text"] == ["lora_1:a.safetensors,lora_2:b.safetensors"]


def test_align_your_steps_from_comfy_extras(trial_server):
    from comfy_serverless.sampling.sigma_schedules import align_your_steps_sigmas

    entry = trial_server.run({"1": {"class_type": "TrialAlignYourSteps", "inputs": {"steps": 7}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    sigmas = entry["outputs"]["1"]["sigmas"]
    assert sigmas == [round(float(value), 3) for value in align_your_steps_sigmas("SD1", 7, 1.0)]
    assert len(sigmas) == 8 and sigmas[0] == 14.615 and sigmas[-1] == 0.0  # AYS's SD1 start, then the final 0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
