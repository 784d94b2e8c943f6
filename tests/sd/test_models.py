"""MODEL / CLIP / VAE wrappers, the loaded-model cache, the precision policy, embeddings and LoRA patching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from comfy_serverless import memory
from comfy_serverless.models import model_cache, precision
from comfy_serverless.models.diffusion_model import DiffusionModel
from comfy_serverless.models.embeddings import EmbeddingFinder, pick_vectors
from comfy_serverless.models.latent_preview import latent_to_rgb, preview_image
from comfy_serverless.models.loading import apply_lora_file, load_checkpoint, load_vae
from comfy_serverless.models.model_cache import LoadedModels
from comfy_serverless.models.patching import patched_module
from comfy_serverless.settings import default_settings


@pytest.fixture(scope="module")
def sd15(model_files):
    return load_checkpoint(str(model_files["sd15"]))


@pytest.fixture(scope="module")
def sdxl(model_files):
    return load_checkpoint(str(model_files["sdxl"]))


# -- precision ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, unet, text, vae", [
    ({"force_fp32": True}, torch.float32, torch.float32, torch.float32),
    ({"fp32_unet": True, "bf16_vae": True}, torch.float32, None, torch.bfloat16),
    ({"bf16_unet": True, "fp32_text_enc": True, "fp32_vae": True}, torch.bfloat16, torch.float32, torch.float32),
    ({"fp16_unet": True, "fp16_text_enc": True}, torch.float16, torch.float16, None),
    ({"force_fp16": True, "fp16_vae": True}, torch.float16, None, torch.float16),
    ({"bf16_text_enc": True}, None, torch.bfloat16, None),
])
def test_flags_decide_before_measurement(flags, unet, text, vae):
    settings = default_settings(**flags)
    measured = precision._measured_default()
    assert precision.unet_dtype(settings) == (unet or measured)
    assert precision.text_encoder_dtype(settings) == (text or measured)
    assert precision.vae_dtype(settings) == (vae or measured)


def test_measurement_runs_once_and_picks_bf16_only_when_clearly_faster():
    first = precision.measure_bf16()
    assert precision.measure_bf16() is first and first.fp32_ms > 0
    assert precision.Bf16Measurement(10.0, 5.0).bf16_is_faster
    assert not precision.Bf16Measurement(10.0, 9.0).bf16_is_faster
    # The default comes from the CPU's flags where they settle it, from this measurement otherwise.
    assert precision._measured_default() == (torch.bfloat16 if precision.default_decision().bf16 else torch.float32)


# -- loaded-model cache ------------------------------------------------------------------------------

def fake_network(megabytes: int):
    return lambda: torch.nn.Linear(megabytes * 2 ** 18, 1, bias=False)  # 4 bytes per weight


def test_handles_load_once_unload_and_reload():
    cache = LoadedModels(reserve_bytes=lambda: 0)
    handle = cache.handle("a", "network a", fake_network(1), 2 ** 20)
    assert cache.handle("a", "network a", fake_network(1), 2 ** 20) is handle
    first = handle.get()
    assert handle.get() is first and handle.loads == 1
    handle.state["lora"] = "something"
    cache.unload_all()
    assert not handle.is_loaded and handle.state == {}
    assert handle.get() is not first and handle.loads == 2


def test_budget_unloads_least_recently_used(monkeypatch):
    free = {"bytes": 10 * 2 ** 20}
    monkeypatch.setattr(model_cache, "available_ram", lambda: free["bytes"])
    cache = LoadedModels(reserve_bytes=lambda: 8 * 2 ** 20)
    a, b, c = (cache.handle(name, name, fake_network(1), 2 ** 20) for name in "abc")
    a.get()
    b.get()
    a.get()  # a is now the most recently used
    free["bytes"] = 9 * 2 ** 20  # loading 1 MB more would leave 8 MB: just enough
    c.get()
    assert a.is_loaded and b.is_loaded
    c.unload()
    free["bytes"] = 8 * 2 ** 20 + 1
    c.get()  # needs 1 MB more than is spare: b, the least recently used, goes
    assert not b.is_loaded and a.is_loaded and c.is_loaded
    c.unload()
    b.get()
    free["bytes"] = 7 * 2 ** 20
    c.get()  # needs 2 MB more: a and b both go
    assert not a.is_loaded and not b.is_loaded and c.is_loaded


def test_a_changed_file_replaces_its_stale_handle():
    cache = LoadedModels(reserve_bytes=lambda: 0)
    old = cache.handle(("file", 1), "old", fake_network(1), 0, family="file")
    old.get()
    new = cache.handle(("file", 2), "new", fake_network(1), 0, family="file")
    assert new is not old and not old.is_loaded and cache.loaded() == []


def test_free_unloads_checkpoint_networks(sd15):
    model, clip, vae = sd15
    model.network(), clip.handle.get(), vae.handle.get()
    assert {model.handle, clip.handle, vae.handle} <= set(model_cache.loaded_models().loaded())
    memory.unload_models()
    assert not (model.handle.is_loaded or clip.handle.is_loaded or vae.handle.is_loaded)


def test_conversion_copies_only_what_changes_dtype(tmp_path):
    from comfy_serverless.models.checkpoint_files import open_state_dict
    from comfy_serverless.models.loading import _converted

    path = tmp_path / "weights.safetensors"
    save_file({"half": torch.randn(1000, 300).half(), "single": torch.randn(3), "ids": torch.arange(4)}, path)
    expected = {key: value.clone() for key, value in open_state_dict(path).items()}
    mapped = open_state_dict(path)
    converted = _converted(str(path), mapped, torch.float32)
    assert converted["single"] is mapped["single"] and converted["ids"] is mapped["ids"]
    assert converted["half"].dtype == torch.float32 and torch.equal(converted["half"], expected["half"].float())
    # The released pages of the source come back from the file if it is read again.
    assert torch.equal(mapped["half"], expected["half"])


# -- MODEL -------------------------------------------------------------------------------------------

def test_model_clone_and_unet_apply(sd15):
    model = sd15[0]
    clone = model.clone()
    assert clone.handle is model.handle and clone.patches == () and clone is not model
    assert isinstance(clone, DiffusionModel) and model.latent_scale == 0.18215
    x = torch.randn(2, 4, 8, 8)
    out = model.unet_apply(x, torch.tensor([500.0, 10.0]), torch.randn(2, 77, 32))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(model.process_latent_out(model.process_latent_in(x)), x * 0.18215 / 0.18215)
    assert model.model_sampling.prediction_type == "eps"


def test_v_prediction_checkpoint_gets_v_sampling(model_files):
    model = load_checkpoint(str(model_files["sd2-v"]), want_clip=False, want_vae=False)[0]
    assert model.prediction == "v" and model.model_sampling.prediction_type == "v_prediction"


def test_sdxl_y_from_pooled_output_and_default_sizes(sdxl):
    model, clip, _ = sdxl
    cond, pooled = clip.encode("a photo")
    extra = model.encode_extra({"pooled_output": pooled}, torch.Size([1, 4, 16, 12]))
    assert extra["y"].shape == (1, model.adm_channels)
    assert torch.equal(extra["y"][:, :pooled.shape[1]], pooled)
    explicit = model.encode_extra({"pooled_output": pooled, "width": 96, "height": 128, "crop_w": 0, "crop_h": 0,
                                   "target_width": 96, "target_height": 128}, torch.Size([1, 4, 16, 12]))
    assert torch.equal(explicit["y"], extra["y"])  # defaults: latent size * 8, crop 0, target = original
    other = model.encode_extra({"pooled_output": pooled}, torch.Size([1, 4, 8, 8]))
    assert not torch.equal(other["y"], extra["y"])
    with pytest.raises(ValueError, match="pooled output of width"):
        model.encode_extra({"pooled_output": torch.zeros(1, 7)}, torch.Size([1, 4, 8, 8]))


# -- CLIP --------------------------------------------------------------------------------------------

def test_text_encoding_shapes_and_long_prompts(sd15, sdxl):
    clip = sd15[1]
    cond, pooled = clip.encode("a cat")
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 32) and cond.dtype == torch.float32
    long_cond, _ = clip.encode("a cat " * 60)
    assert long_cond.shape == (1, 154, 32)
    cond_xl, pooled_xl = sdxl[1].encode("a cat")
    assert cond_xl.shape == (1, 77, 64) and pooled_xl.shape == (1, 64)
    weighted, _ = clip.encode("a (cat:1.5)")
    assert not torch.equal(weighted, cond)


def test_set_last_layer(sd15):
    clip = sd15[1]
    last = clip.encode("a cat")[0]
    penultimate = clip.set_last_layer(-2)
    assert penultimate.last_layer == -2 and clip.last_layer is None
    assert not torch.equal(penultimate.encode("a cat")[0], last)
    assert torch.equal(clip.set_last_layer(-1).encode("a cat")[0], last)
    assert clip.set_last_layer(-24).last_layer == -1  # beyond the depth: the last layer, as ComfyUI


@pytest.mark.parametrize("layout", ["tensor", "emb_params", "string_to_param", "pt"])
def test_embedding_files_in_common_layouts(sd15, tmp_path, layout):
    vectors = torch.randn(2, 32)
    if layout == "pt":
        torch.save({"string_to_param": {"*": vectors}, "name": "thing", "step": 100}, tmp_path / "thing.pt")
    elif layout == "string_to_param":
        save_file({"string_to_param.*": vectors}, tmp_path / "thing.safetensors")  # flattened by some tools
    else:
        save_file({"emb_params" if layout == "emb_params" else "anything": vectors}, tmp_path / "thing.safetensors")
    finder = EmbeddingFinder(lambda name: str(tmp_path / name) if (tmp_path / name).is_file() else None)
    found = finder.find("thing", "clip_l")
    assert torch.equal(found, vectors)
    clip = dataclasses.replace(sd15[1], embeddings=finder)
    with_embedding = clip.encode("a embedding:thing cat")[0]
    assert not torch.equal(with_embedding, clip.encode("a thing cat")[0])
    assert torch.equal(clip.encode("a embedding:missing cat")[0], clip.encode("a cat")[0])


def test_sdxl_embedding_picks_the_tensor_per_encoder():
    data = {"clip_l": torch.ones(1, 768), "clip_g": torch.zeros(1, 1280)}
    assert pick_vectors(data, "clip_l").shape == (1, 768) and pick_vectors(data, "clip_g").shape == (1, 1280)
    assert pick_vectors({"string_to_param": {"*": torch.ones(3, 8)}}, "clip_g").shape == (3, 8)
    assert pick_vectors({"emb": torch.ones(8)}, "clip_l").shape == (1, 8)


# -- VAE ---------------------------------------------------------------------------------------------

def test_vae_decode_encode_and_crop(sd15):
    vae = sd15[2]
    latent = torch.randn(3, 4, 8, 8)
    image = vae.decode(latent)
    assert image.shape == (3, 16, 16, 3) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    odd = torch.rand(1, 17, 19, 4)
    assert vae.encode(odd).shape == (1, 4, 8, 9)
    eight = type(vae)(vae.handle, vae.dtype, downscale_ratio=8)
    cropped = eight.crop_to_multiple(torch.arange(67 * 70).reshape(1, 67, 70, 1))
    assert cropped.shape == (1, 64, 64, 1) and cropped[0, 0, 0, 0] == 1 * 70 + 3  # centred: offsets 1, 3


def test_tiled_vae_matches_shapes(sd15):
    vae = sd15[2]
    latent = torch.randn(1, 4, 48, 40)
    tiled = vae.decode_tiled(latent, tile_x=32, tile_y=32, overlap=8)  # ComfyUI's arguments: latent cells
    assert tiled.shape == (1, 96, 80, 3) and torch.isfinite(tiled).all()
    assert vae.encode_tiled(tiled, tile_x=32, tile_y=32, overlap=8).shape == (1, 4, 48, 40)  # pixels


def test_standalone_vae_file(model_files):
    vae = load_vae(str(model_files["vae"]))
    assert vae.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 8, 8, 3)


# -- LoRA ----------------------------------------------------------------------------------------------

def test_lora_clones_patch_shared_weights_lazily_and_undo(sd15, model_files):
    model, clip, _ = sd15
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 32)
    plain = model.unet_apply(x, t, context)
    original = dict(model.network().named_parameters())
    lora_model, lora_clip = apply_lora_file(str(model_files["sd15-lora"]), model, clip, 1.0, 0.5)
    assert model.patches == () and len(lora_model.patches) == 1 and lora_clip.patches[0].strength == 0.5
    patched = lora_model.unet_apply(x, t, context)
    assert not torch.equal(patched, plain)
    assert not torch.equal(lora_clip.encode("a cat")[0], clip.encode("a cat")[0])
    # Running the plain clone again takes the patches off: the very same tensors come back.
    assert torch.equal(model.unet_apply(x, t, context), plain)
    assert all(p is original[name] for name, p in model.network().named_parameters())
    twice = lora_model.with_patch(lora_model.patches[0])
    assert not torch.equal(twice.unet_apply(x, t, context), patched)
    assert torch.equal(patched_module(lora_model.handle, lora_model.patches)(x, t, context).float(), patched)


# -- previews ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_latent2rgb_preview(family):
    latent = torch.randn(2, 4, 6, 5)
    rgb = latent_to_rgb(latent[0], family)
    assert rgb.shape == (6, 5, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert preview_image(latent, family).size == (5, 6)
