"""Model merging and saving nodes (nodes/model_merging.py) on tiny random checkpoints: merged weights by hand,
block ratios, CLIP merges, saved files in each family's layout loading back unchanged, and a merge-save-reload
round trip through the server giving the same image."""

from __future__ import annotations

import json

import pytest
import torch

from comfy_serverless.models import clip_patcher_api
from comfy_serverless.models.checkpoint_files import open_state_dict, read_metadata
from comfy_serverless.models.loading import load_checkpoint
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes import model_merging as nodes
from conftest import server_context


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("merging")
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", checkpoints / "a.safetensors", seed=1)
    make_test_checkpoint("sd15", "tiny", checkpoints / "b.safetensors", seed=2)
    make_test_checkpoint("sdxl", "tiny", checkpoints / "xl.safetensors", seed=3)
    return root


@pytest.fixture(scope="module")
def ctx(base):
    with server_context(base_directory=str(base), force_fp32=True) as server:
        yield server


@pytest.fixture(scope="module")
def pair(ctx, base):
    return [load_checkpoint(str(base / "models" / "checkpoints" / name)) for name in ("a.safetensors", "b.safetensors")]


def unet(model) -> dict:
    return {k: v.clone() for k, v in model.model_state_dict().items()}


def test_merge_simple_ratios(pair):
    (a, _, _), (b, _, _) = pair
    wa, wb = unet(a), unet(b)
    one = unet(nodes.ModelMergeSimple().merge(a, b, 1.0)[0])
    zero = unet(nodes.ModelMergeSimple().merge(a, b, 0.0)[0])
    third = unet(nodes.ModelMergeSimple().merge(a, b, 0.3)[0])
    for key in wa:
        torch.testing.assert_close(one[key], wa[key])
        torch.testing.assert_close(zero[key], wb[key])
        torch.testing.assert_close(third[key], wa[key] * 0.3 + wb[key] * 0.7)
    assert all(torch.equal(wa[key], value) for key, value in unet(a).items())  # model1 itself is unchanged


def test_add_and_subtract(pair):
    (a, _, _), (b, _, _) = pair
    wa, wb = unet(a), unet(b)
    added = unet(nodes.ModelMergeAdd().merge(a, b)[0])
    diff = unet(nodes.ModelMergeSubtract().merge(a, b, 2.0)[0])
    for key in wa:
        torch.testing.assert_close(added[key], wa[key] + wb[key])
        torch.testing.assert_close(diff[key], (wa[key] - wb[key]) * 2.0)


def test_block_ratios_follow_the_longest_matching_name(pair):
    (a, _, _), (b, _, _) = pair
    wa, wb = unet(a), unet(b)
    merged = unet(nodes.ModelMergeBlocks().merge(a, b, input=1.0, middle=0.0, out=0.25)[0])

    def ratio_of(key):
        name = key[len("diffusion_model."):]
        if name.startswith("middle"):
            return 0.0
        if name.startswith("out"):  # output_blocks.* and out.*
            return 0.25
        return 1.0  # input_blocks.*, and time_embed.* takes the first ratio

    for key in wa:
        r = ratio_of(key)
        torch.testing.assert_close(merged[key], wa[key] * r + wb[key] * (1 - r))

    ratios = {name: 1.0 for name in nodes.ModelMergeSD1.BLOCKS}
    ratios.update({"input_blocks.1.": 0.0, "out.": 0.5})
    sd1 = unet(nodes.ModelMergeSD1().merge(a, b, **ratios)[0])
    for key in wa:
        name = key[len("diffusion_model."):]
        r = 0.0 if name.startswith("input_blocks.1.") else 0.5 if name.startswith("out.") else 1.0
        torch.testing.assert_close(sd1[key], wa[key] * r + wb[key] * (1 - r))
    assert "input_blocks.1" in nodes.ModelMergeSDXL.BLOCKS and "label_emb." in nodes.ModelMergeSD2.BLOCKS


def test_clip_merges(pair):
    (_, ca, _), (_, cb, _) = pair
    wa, wb = clip_patcher_api.model_state_dict(ca), clip_patcher_api.model_state_dict(cb)
    assert any(k.startswith("clip_l.transformer.text_model.encoder.layers.0.") for k in wa)
    quarter = clip_patcher_api.model_state_dict(nodes.CLIPMergeSimple().merge(ca, cb, 0.25)[0])
    added = clip_patcher_api.model_state_dict(nodes.CLIPMergeAdd().merge(ca, cb)[0])
    diff = clip_patcher_api.model_state_dict(nodes.CLIPMergeSubtract().merge(ca, cb, -1.5)[0])
    for key in wa:
        torch.testing.assert_close(quarter[key], wa[key] * 0.25 + wb[key] * 0.75)
        torch.testing.assert_close(added[key], wa[key] + wb[key])
        torch.testing.assert_close(diff[key], (wa[key] - wb[key]) * -1.5)
    merged = nodes.CLIPMergeSimple().merge(ca, cb, 0.0)[0]
    torch.testing.assert_close(merged.encode("a cat")[0], cb.encode("a cat")[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ca.encode("a cat")[0], cb.encode("a cat")[0])


def test_checkpoint_save_writes_comfyuis_layout_and_loads_back(ctx, base, pair):
    (a, ca, va), (b, _, _) = pair
    merged = nodes.ModelMergeSimple().merge(a, b, 0.5)[0]
    prompt = {"1": {"class_type": "CheckpointSave"}}
    nodes.CheckpointSave().save(merged, ca, va, "checkpoints/merged", prompt=prompt, extra_pnginfo={"workflow": [1]})
    path = base / "output" / "checkpoints" / "merged_00001_.safetensors"
    metadata = read_metadata(path)
    assert json.loads(metadata["prompt"]) == prompt and metadata["workflow"] == "[1]"
    assert metadata["modelspec.predict_key"] == "epsilon" and "modelspec.architecture" not in metadata
    keys = set(open_state_dict(path))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)

    model, clip, vae = load_checkpoint(str(path))
    for key, value in unet(merged).items():
        torch.testing.assert_close(model.model_state_dict()[key], value)
    for key, value in clip_patcher_api.model_state_dict(ca).items():
        torch.testing.assert_close(clip_patcher_api.model_state_dict(clip)[key], value)
    for key, value in va.handle.get().state_dict().items():
        torch.testing.assert_close(vae.handle.get().state_dict()[key], value)
    nodes.CheckpointSave().save(merged, ca, va, "checkpoints/merged")
    assert (path.parent / "merged_00002_.safetensors").exists()


def test_sdxl_checkpoint_save_fuses_openclip_attention_and_marks_modelspec(ctx, base):
    original = load_checkpoint(str(base / "models" / "checkpoints" / "xl.safetensors"))
    nodes.CheckpointSave().save(*original, "xl/again")
    path = base / "output" / "xl" / "again_00001_.safetensors"
    metadata = read_metadata(path)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.title"] == "again 1" and metadata["prompt"] == ""
    assert any(k.endswith("attn.in_proj_weight") and k.startswith("conditioner.embedders.1.model.")
               for k in open_state_dict(path))
    reloaded = load_checkpoint(str(path))
    for key, value in original[0].model_state_dict().items():
        torch.testing.assert_close(reloaded[0].model_state_dict()[key], value)
    for key, value in clip_patcher_api.model_state_dict(original[1]).items():
        torch.testing.assert_close(clip_patcher_api.model_state_dict(reloaded[1])[key], value)


def test_model_vae_and_clip_save(ctx, base, pair):
    from comfy_serverless.models.checkpoint_files import TEST_CHECKPOINT_METADATA_KEY, split_vae
    from comfy_serverless.models.component_files import text_encoder_weights, unet_weights

    (a, ca, va), _ = pair
    nodes.ModelSave().save(a, "diffusion_models/unet")
    saved = unet_weights(open_state_dict(base / "output" / "diffusion_models" / "unet_00001_.safetensors"))
    for key, value in a.model_state_dict().items():
        torch.testing.assert_close(saved[key[len("diffusion_model."):]], value)

    nodes.VAESave().save(va, "vae/v")
    weights, _ = split_vae(open_state_dict(base / "output" / "vae" / "v_00001_.safetensors"))
    for key, value in va.handle.get().state_dict().items():
        torch.testing.assert_close(weights[key], value)

    nodes.CLIPSave().save(ca, "clip/c", prompt={"x": 1})
    path = base / "output" / "clip" / "c_clip_l_00001_.safetensors"
    assert read_metadata(path)["format"] == "pt"
    stated = {TEST_CHECKPOINT_METADATA_KEY: "text-encoder-clip_l"}  # tiny widths say which encoder they are
    kind, weights, _ = text_encoder_weights(open_state_dict(path), stated)
    assert kind == "clip_l"
    for key, value in clip_patcher_api.model_state_dict(ca).items():
        torch.testing.assert_close(weights[key[len("clip_l.transformer.text_model."):]], value)


def test_merge_save_reload_gives_the_same_image_through_the_server(start_server, tmp_path, base):
    from PIL import Image

    srv = start_server("--force-fp32", base=tmp_path / "srv")
    models = srv.base / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    for name in ("a.safetensors", "b.safetensors"):
        (models / name).hardlink_to(base / "models" / "checkpoints" / name)

    def sample(model, clip, vae, prefix, extra=None):
        prompt = {
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": clip}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
            **(extra or {}),
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return Image.open(srv.base / "output" / f"{prefix}_00001_.png").tobytes()

    merge = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.4}},
        "11": {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.6}},
        "12": {"class_type": "CheckpointSave", "inputs": {"model": ["10", 0], "clip": ["11", 0], "vae": ["1", 2],
                                                          "filename_prefix": "checkpoints/merged"}},
    }
    merged_image = sample(["10", 0], ["11", 0], ["1", 2], "merged", merge)
    saved = srv.base / "output" / "checkpoints" / "merged_00001_.safetensors"
    assert json.loads(read_metadata(saved)["prompt"])["12"]["class_type"] == "CheckpointSave"
    (models / "merged.safetensors").hardlink_to(saved)
    loader = {"20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "merged.safetensors"}}}
    reloaded_image = sample(["20", 0], ["20", 1], ["20", 2], "reloaded", loader)
    plain_image = sample(["1", 0], ["1", 1], ["1", 2], "plain", {"1": merge["1"]})
    assert reloaded_image == merged_image
    assert plain_image != merged_image
