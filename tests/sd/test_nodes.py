"""The SD node packs called directly: definitions, every sampler and scheduler, latents, conditioning, VAE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from comfy_serverless import paths
from comfy_serverless.nodes import conditioning, latents, loaders, sampling_nodes, vae_nodes
from comfy_serverless.nodes.conditioning import (
    CLIPSetLastLayer,
    CLIPTextEncode,
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetArea,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
    ConditioningZeroOut,
    InpaintModelConditioning,
)
from comfy_serverless.nodes.latents import (
    EmptyLatentImage,
    LatentBlend,
    LatentComposite,
    LatentCrop,
    LatentFlip,
    LatentFromBatch,
    LatentRotate,
    LatentUpscale,
    LatentUpscaleBy,
    LoadLatent,
    RepeatLatentBatch,
    SaveLatent,
    SetLatentNoiseMask,
)
from comfy_serverless.nodes.loaders import (
    CheckpointLoader,
    CheckpointLoaderSimple,
    LoraLoader,
    LoraLoaderModelOnly,
    VAELoader,
)
from comfy_serverless.nodes.sampling_nodes import KSampler, KSamplerAdvanced
from comfy_serverless.nodes.vae_nodes import VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeForInpaint
from comfy_serverless.sampling import samplers, schedules
from conftest import server_context

from .conftest import install_models

PACKS = (loaders, conditioning, latents, sampling_nodes, vae_nodes)


@pytest.fixture
def folders(tmp_path, model_files):
    with server_context(base_directory=str(install_models(tmp_path, model_files))) as server:
        (tmp_path / "input").mkdir()
        yield server.folders


@pytest.fixture(scope="module")
def sd15(model_files):
    """fp32 here: on tiny models bf16's one-off kernel set-up per shape costs more than the compute."""
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(force_fp32=True):
        loaded = load_checkpoint(str(model_files["sd15"]))
    yield loaded


@pytest.fixture(scope="module")
def prompts(sd15):
    clip = sd15[1]
    return CLIPTextEncode().encode(clip, "a red cat")[0], CLIPTextEncode().encode(clip, "blurry")[0]


# -- definitions ---------------------------------------------------------------------------------------

def test_combos_list_exactly_the_implemented_samplers_and_schedulers():
    assert sampling_nodes.SAMPLER_NAMES == samplers.SAMPLER_NAMES
    assert sampling_nodes.SCHEDULER_NAMES == schedules.SCHEDULER_NAMES
    required = KSampler.INPUT_TYPES()["required"]
    assert required["sampler_name"][0] == samplers.SAMPLER_NAMES
    assert required["scheduler"][0] == schedules.SCHEDULER_NAMES
    assert required["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF and required["cfg"][1]["round"] == 0.01
    assert list(required) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                              "latent_image", "denoise"]
    advanced = KSamplerAdvanced.INPUT_TYPES()["required"]
    assert advanced["add_noise"] == (["enable", "disable"],)
    assert advanced["return_with_leftover_noise"] == (["disable", "enable"],)
    assert advanced["end_at_step"][1] == {"default": 10000, "min": 0, "max": 10000}


def test_categories_and_display_names_follow_comfyui():
    expected = {
        "CheckpointLoaderSimple": ("loaders", "Load Checkpoint"), "VAELoader": ("loaders", "Load VAE"),
        "CheckpointLoader": ("advanced/loaders", "Load Checkpoint With Config (DEPRECATED)"),
        "LoraLoader": ("loaders", "Load LoRA"), "LoraLoaderModelOnly": ("loaders", None),
        "UNETLoader": ("advanced/loaders", "Load Diffusion Model"), "CLIPLoader": ("advanced/loaders", "Load CLIP"),
        "DualCLIPLoader": ("advanced/loaders", "DualCLIPLoader"),
        "CLIPTextEncode": ("conditioning", "CLIP Text Encode (Prompt)"),
        "CLIPSetLastLayer": ("conditioning", "CLIP Set Last Layer"), "ConditioningAverage": ("conditioning", None),
        "ConditioningZeroOut": ("advanced/conditioning", None),
        "ConditioningSetTimestepRange": ("advanced/conditioning", None),
        "InpaintModelConditioning": ("conditioning/inpaint", None),
        "EmptyLatentImage": ("latent", "Empty Latent Image"), "LatentUpscale": ("latent", "Upscale Latent"),
        "LatentFromBatch": ("latent/batch", "Latent From Batch"), "LatentRotate": ("latent/transform", "Rotate Latent"),
        "LatentBlend": ("_for_testing", "Latent Blend"),
        "SetLatentNoiseMask": ("latent/inpaint", "Set Latent Noise Mask"),
        "SaveLatent": ("_for_testing", None), "LoadLatent": ("_for_testing", None),
        "KSampler": ("sampling", "KSampler"), "KSamplerAdvanced": ("sampling", "KSampler (Advanced)"),
        "VAEDecode": ("latent", "VAE Decode"), "VAEEncodeForInpaint": ("latent/inpaint", "VAE Encode (for Inpainting)"),
        "VAEDecodeTiled": ("_for_testing", "VAE Decode (Tiled)"),
    }
    classes = {name: cls for pack in PACKS for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    names = {name: display for pack in PACKS for name, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items()}
    assert set(expected) <= set(classes)  # other nodes of these modules are checked elsewhere
    for name, (category, display) in expected.items():
        assert classes[name].CATEGORY == category, name
        assert names.get(name) == display, name
    assert CheckpointLoader.DEPRECATED is True and SaveLatent.OUTPUT_NODE is True
    assert InpaintModelConditioning.RETURN_NAMES == ("positive", "negative", "latent")


def test_input_types_do_not_import_torch(tmp_path):
    code = (
        "import json, sys\n"
        "from comfy_serverless import paths, settings\n"
        f"paths.configure(settings.default_settings(base_directory={str(tmp_path)!r}))\n"
        "from comfy_serverless.nodes import loaders, conditioning, latents, sampling_nodes, vae_nodes\n"
        "for pack in (loaders, conditioning, latents, sampling_nodes, vae_nodes):\n"
        "    for cls in pack.NODE_CLASS_MAPPINGS.values():\n"
        "        cls.INPUT_TYPES()\n"
        "print(json.dumps(sorted(m for m in ('torch', 'numpy', 'PIL', 'safetensors') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


# -- sampling ------------------------------------------------------------------------------------------

# dpm_adaptive picks its own step count (hundreds of UNet calls on a random model); tests/sampling checks it.
@pytest.mark.parametrize("sampler, scheduler", [(name, "normal") for name in samplers.SAMPLER_NAMES
                                                if name != "dpm_adaptive"]
                         + [("euler", name) for name in schedules.SCHEDULER_NAMES if name != "normal"]
                         + [("dpmpp_2m", "karras"), ("uni_pc", "sgm_uniform")])
def test_every_sampler_and_scheduler_runs_two_steps(sd15, prompts, sampler, scheduler):
    latent = EmptyLatentImage().generate(32, 32, 1)[0]
    out = KSampler().sample(sd15[0], 3, 2, 5.0, sampler, scheduler, *prompts, latent)[0]["samples"]
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_ksampler_is_deterministic_and_reports_each_step(sd15, prompts):
    from comfy_serverless import progress

    reports = []
    token = progress.set_reporter(lambda value, total, preview: reports.append((value, total, preview)))
    try:
        latent = EmptyLatentImage().generate(32, 32, 2)[0]
        first = KSampler().sample(sd15[0], 7, 3, 6.0, "euler_ancestral", "karras", *prompts, latent)[0]["samples"]
        again = KSampler().sample(sd15[0], 7, 3, 6.0, "euler_ancestral", "karras", *prompts, latent)[0]["samples"]
        other = KSampler().sample(sd15[0], 8, 3, 6.0, "euler_ancestral", "karras", *prompts, latent)[0]["samples"]
    finally:
        progress.reset_reporter(token)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])
    assert [(v, t) for v, t, _ in reports[:3]] == [(1, 3), (2, 3), (3, 3)]
    assert all(preview is None for _, _, preview in reports)  # --preview-method none


def test_previews_when_enabled(sd15, prompts):
    from comfy_serverless import progress

    reports = []
    token = progress.set_reporter(lambda value, total, preview: reports.append(preview))
    try:
        with server_context(preview_method="auto"):
            KSampler().sample(sd15[0], 1, 2, 6.0, "euler", "normal", *prompts,
                              EmptyLatentImage().generate(32, 32, 1)[0])
    finally:
        progress.reset_reporter(token)
    assert [p[0] for p in reports] == ["JPEG", "JPEG"] and reports[0][1].size == (4, 4) and reports[0][2] == 512


def test_advanced_sampler_in_two_passes_equals_one_pass(sd15, prompts):
    latent = EmptyLatentImage().generate(32, 32, 1)[0]
    whole = KSampler().sample(sd15[0], 5, 4, 6.0, "euler", "normal", *prompts, latent)[0]["samples"]
    advanced = KSamplerAdvanced()
    half = advanced.sample(sd15[0], "enable", 5, 4, 6.0, "euler", "normal", *prompts, latent, 0, 2, "enable")[0]
    rest = advanced.sample(sd15[0], "disable", 5, 4, 6.0, "euler", "normal", *prompts, half, 2, 10000, "disable")[0]
    assert torch.allclose(rest["samples"], whole, atol=1e-4)


def test_img2img_denoise_keeps_noise_mask_and_batch_index(sd15, prompts):
    samples = torch.randn(2, 4, 4, 4)
    latent = {"samples": samples, "noise_mask": torch.ones(1, 1, 4, 4), "batch_index": [4, 5]}
    out = KSampler().sample(sd15[0], 1, 2, 6.0, "euler", "normal", *prompts, latent, denoise=0.5)[0]
    assert out["noise_mask"] is latent["noise_mask"] and out["batch_index"] == [4, 5]
    unchanged = KSampler().sample(sd15[0], 1, 2, 6.0, "euler", "normal", *prompts, latent, denoise=0.0)[0]
    assert torch.equal(unchanged["samples"], samples)


# -- conditioning --------------------------------------------------------------------------------------

def test_conditioning_edits(prompts):
    positive, negative = prompts
    assert len(ConditioningCombine().combine(positive, negative)[0]) == 2
    averaged = ConditioningAverage().addWeighted(positive, negative, 0.25)[0][0]
    assert torch.allclose(averaged[0], positive[0][0] * 0.25 + negative[0][0] * 0.75)
    assert torch.allclose(averaged[1]["pooled_output"],
                          positive[0][1]["pooled_output"] * 0.25 + negative[0][1]["pooled_output"] * 0.75)
    assert ConditioningConcat().concat(positive, negative)[0][0][0].shape == (1, 154, 32)
    area = ConditioningSetArea().append(positive, 64, 128, 8, 16, 0.5)[0][0][1]
    assert area["area"] == (16, 8, 2, 1) and area["strength"] == 0.5 and area["set_area_to_bounds"] is False
    masked = ConditioningSetMask().append(positive, torch.ones(8, 8), "mask bounds", 0.7)[0][0][1]
    assert masked["mask"].shape == (1, 8, 8) and masked["set_area_to_bounds"] and masked["mask_strength"] == 0.7
    zero = ConditioningZeroOut().zero_out(positive)[0][0]
    assert not zero[0].any() and not zero[1]["pooled_output"].any()
    ranged = ConditioningSetTimestepRange().set_range(positive, 0.2, 0.8)[0][0][1]
    assert (ranged["start_percent"], ranged["end_percent"]) == (0.2, 0.8)
    assert "area" not in positive[0][1]  # the input is never modified


def test_set_last_layer_node(sd15):
    clip = CLIPSetLastLayer().set_last_layer(sd15[1], -2)[0]
    assert clip.last_layer == -2 and sd15[1].last_layer is None


def test_inpaint_model_conditioning(sd15, prompts):
    pixels, mask = torch.rand(1, 20, 18, 3), torch.zeros(1, 20, 18)
    mask[:, 5:15, 5:15] = 1
    positive, negative, latent = InpaintModelConditioning().encode(*prompts, pixels, sd15[2], mask, True)
    assert latent["samples"].shape == (1, 4, 10, 9) and latent["noise_mask"].shape == (1, 1, 20, 18)
    assert positive[0][1]["concat_latent_image"].shape == (1, 4, 10, 9)
    assert "noise_mask" not in InpaintModelConditioning().encode(*prompts, pixels, sd15[2], mask, False)[2]


# -- latents -------------------------------------------------------------------------------------------

def test_latent_nodes():
    empty = EmptyLatentImage().generate(72, 40, 3)[0]
    assert empty["samples"].shape == (3, 4, 5, 9) and not empty["samples"].any()
    samples = {"samples": torch.randn(3, 4, 8, 12)}
    assert LatentUpscale().upscale(samples, "bilinear", 0, 128, "disabled")[0]["samples"].shape == (3, 4, 16, 24)
    assert LatentUpscale().upscale(samples, "nearest-exact", 32, 32, "center")[0]["samples"].shape == (3, 4, 8, 8)
    assert LatentUpscale().upscale(samples, "area", 0, 0, "disabled")[0] is samples
    assert LatentUpscaleBy().upscale(samples, "bislerp", 1.5)[0]["samples"].shape == (3, 4, 12, 18)
    picked = LatentFromBatch().frombatch(samples, 1, 5)[0]
    assert picked["batch_index"] == [1, 2] and torch.equal(picked["samples"], samples["samples"][1:])
    assert LatentFromBatch().frombatch(picked, 1, 1)[0]["batch_index"] == [2]
    repeated = RepeatLatentBatch().repeat(picked, 2)[0]
    assert repeated["samples"].shape[0] == 4 and repeated["batch_index"] == [1, 2, 3, 4]
    rotated = LatentRotate().rotate(samples, "90 degrees")[0]["samples"]
    assert rotated.shape == (3, 4, 12, 8) and torch.equal(rotated[..., 0, :], samples["samples"][..., :, 0].flip(-1))
    flipped = LatentFlip().flip(samples, "y-axis: horizontally")[0]["samples"]
    assert torch.equal(flipped, samples["samples"].flip(3))
    cropped = LatentCrop().crop(samples, 64, 64, 80, 0)[0]["samples"]
    assert cropped.shape == (3, 4, 8, 8) and torch.equal(cropped, samples["samples"][..., 0:8, 4:12])
    masked = SetLatentNoiseMask().set_mask(samples, torch.ones(16, 24))[0]
    assert masked["noise_mask"].shape == (1, 1, 16, 24) and "noise_mask" not in samples


def test_bislerp_keeps_vector_lengths_where_bilinear_shrinks_them():
    samples = torch.zeros(1, 4, 1, 2)
    samples[0, 0, 0, 0] = samples[0, 1, 0, 1] = 1.0  # two orthogonal unit vectors side by side
    resized = LatentUpscaleBy().upscale({"samples": samples}, "bislerp", 2.0)[0]["samples"]
    assert resized.shape == (1, 4, 2, 4)
    assert torch.allclose(resized.norm(dim=1), torch.ones(1, 2, 4))
    assert torch.allclose(resized[0, :2, 0, 1], torch.tensor([0.9239, 0.3827]), atol=1e-4)  # 1/4 of the way
    bilinear = LatentUpscaleBy().upscale({"samples": samples}, "bilinear", 2.0)[0]["samples"]
    assert bilinear.norm(dim=1).min() < 0.8


def test_latent_composite_and_blend():
    to = {"samples": torch.zeros(1, 4, 8, 8)}
    source = {"samples": torch.ones(1, 4, 4, 4)}
    pasted = LatentComposite().composite(to, source, 16, 8, 0)[0]["samples"]
    assert pasted[0, 0, 1:5, 2:6].eq(1).all() and pasted.sum() == 4 * 16 and not to["samples"].any()
    feathered = LatentComposite().composite(to, source, 16, 8, 16)[0]["samples"]
    assert feathered[0, 0, 1, 2] == pytest.approx(0.25) and feathered[0, 0, 3, 3] == pytest.approx(1.0)
    blended = LatentBlend().blend(to, {"samples": torch.ones(1, 4, 8, 8)}, 0.25)[0]["samples"]
    assert torch.allclose(blended, torch.full_like(blended, 0.75))
    resized = LatentBlend().blend(to, source, 0.5)[0]["samples"]
    assert resized.shape == (1, 4, 8, 8)


def test_save_and_load_latent(folders):
    samples = {"samples": torch.randn(2, 4, 3, 5)}
    ui = SaveLatent().save(samples, "latents/test", prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    [info] = ui["ui"]["latents"]
    assert info == {"filename": "test_00001_.latent", "subfolder": "latents", "type": "output"}
    saved = os.path.join(folders.output, "latents", "test_00001_.latent")
    shutil.copy(saved, os.path.join(folders.input, "mine.latent"))
    assert LoadLatent.INPUT_TYPES()["required"]["latent"][0] == ["mine.latent"]
    assert LoadLatent.VALIDATE_INPUTS("mine.latent") is True
    assert LoadLatent.VALIDATE_INPUTS("missing.latent") == "Invalid latent file: missing.latent"
    assert torch.equal(LoadLatent().load("mine.latent")[0]["samples"], samples["samples"])
    assert LoadLatent.IS_CHANGED("mine.latent") == LoadLatent.IS_CHANGED("mine.latent")


# -- VAE -----------------------------------------------------------------------------------------------

def test_vae_nodes(sd15):
    vae = sd15[2]
    image = VAEDecode().decode(vae, {"samples": torch.randn(1, 4, 6, 6)})[0]
    assert image.shape == (1, 12, 12, 3)
    assert VAEEncode().encode(vae, image)[0]["samples"].shape == (1, 4, 6, 6)
    tiled = VAEDecodeTiled().decode(vae, {"samples": torch.randn(1, 4, 40, 40)}, 64, 64)[0]
    assert tiled.shape == (1, 80, 80, 3)


def test_vae_encode_for_inpaint_greys_the_masked_pixels(sd15):
    vae = sd15[2]
    pixels, mask = torch.rand(1, 16, 16, 3), torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    grey = pixels.clone()
    grey[:, 4:8, 4:8] = 0.5
    latent = VAEEncodeForInpaint().encode(vae, pixels, mask, 0)[0]
    assert torch.equal(latent["samples"], vae.encode(grey)) and latent["noise_mask"].shape == (1, 1, 16, 16)
    grown = VAEEncodeForInpaint().encode(vae, pixels, mask, 6)[0]["noise_mask"]
    assert grown.sum() > latent["noise_mask"].sum() and set(grown.unique().tolist()) <= {0.0, 1.0}


# -- loaders -------------------------------------------------------------------------------------------

def test_loader_nodes(folders, prompts):
    ckpt_names = CheckpointLoaderSimple.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert "tiny-sd15.safetensors" in ckpt_names and isinstance(ckpt_names, paths.FileList)
    model, clip, vae = CheckpointLoaderSimple().load_checkpoint("tiny-sd15.safetensors")
    assert model.family == "sd15" and clip.family == "sd15" and vae.downscale_ratio == 2
    assert CheckpointLoader().load_checkpoint("whatever.yaml", "tiny-sd2.safetensors")[0].family == "sd2"
    assert VAELoader().load_vae("tiny-vae.safetensors")[0].latent_channels == 4
    with pytest.raises(FileNotFoundError, match="not found in models/checkpoints"):
        CheckpointLoaderSimple().load_checkpoint("nope.safetensors")
    lora = "tiny-sd15-lora.safetensors"
    assert LoraLoader().load_lora(model, clip, lora, 0, 0) == (model, clip)
    only = LoraLoaderModelOnly().load_lora_model_only(model, lora, 0.8)[0]
    assert only.patches[0].strength == 0.8 and model.patches == ()
    both = LoraLoader().load_lora(model, clip, lora, 0, 1.0)
    assert both[0] is model and len(both[1].patches) == 1


def test_text_embeddings_from_the_embeddings_folder(folders):
    embeddings = folders.model_dirs("embeddings")[0]
    os.makedirs(embeddings, exist_ok=True)
    save_file({"emb_params": torch.randn(1, 32)}, os.path.join(embeddings, "style.safetensors"))
    clip = CheckpointLoaderSimple().load_checkpoint("tiny-sd15.safetensors")[1]
    with_style = CLIPTextEncode().encode(clip, "a cat, embedding:style")[0][0][0]
    assert not torch.equal(with_style, CLIPTextEncode().encode(clip, "a cat, style")[0][0][0])
