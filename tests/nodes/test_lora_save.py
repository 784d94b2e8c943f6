"""LoraSave: SVD extraction against numpy, the file's kohya layout, full_diff / bias_diff values by hand, the
round trip through our LoraLoader (a full-rank extraction gives back the tuned weights up to ComfyUI's 0.99
quantile clamp), and a subtract -> extract -> load workflow over HTTP."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from comfy_serverless.models.loading import apply_lora_file, load_checkpoint
from comfy_serverless.models.lora_extract import extract_pair
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes.lora_extract_nodes import LoraSave
from comfy_serverless.nodes.model_merging import CLIPMergeSubtract, ModelMergeSubtract
from conftest import Server, server_context


def _numpy_pair(diff: np.ndarray, rank: int, ours_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ComfyUI's recipe in numpy; SVD signs aligned to ours (each component's sign is arbitrary)."""
    matrix = diff.reshape(diff.shape[0], -1).astype(np.float64)
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    signs = np.sign(np.sum(up * ours_up.reshape(up.shape), axis=0))
    up, down = up * signs, down * signs[:, None]
    high = np.quantile(np.concatenate([up.ravel(), down.ravel()]), 0.99)
    return np.clip(up, -high, high), np.clip(down, -high, high)


@pytest.mark.parametrize("shape, rank", [((12, 9), 4), ((8, 5, 3, 3), 6), ((6, 7, 1, 1), 100)])
def test_extraction_matches_numpy_svd_with_the_quantile_clamp(shape, rank):
    diff = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    up, down = extract_pair(diff, rank)
    kept = min(rank, shape[0], shape[1])
    if len(shape) == 4:
        assert up.shape == (shape[0], kept, 1, 1) and down.shape == (kept, shape[1], *shape[2:])
    else:
        assert up.shape == (shape[0], kept) and down.shape == (kept, shape[1])
    ref_up, ref_down = _numpy_pair(diff.numpy(), kept, up.numpy())
    np.testing.assert_allclose(up.reshape(ref_up.shape).numpy(), ref_up, atol=2e-5)
    np.testing.assert_allclose(down.reshape(ref_down.shape).numpy(), ref_down, atol=2e-5)


def test_a_low_rank_difference_is_recovered_closely_and_rank_matters():
    g = torch.Generator().manual_seed(1)
    diff = torch.randn(32, 3, generator=g) @ torch.randn(3, 24, generator=g)
    up, down = extract_pair(diff, 3)
    error = (up @ down - diff).norm() / diff.norm()
    assert error < 0.3  # only the clamped 1% of factor entries differ (all in the larger up factor)
    up1, down1 = extract_pair(diff, 1)
    assert (up1 @ down1 - diff).norm() / diff.norm() > 2 * error
    with pytest.raises(ValueError, match="2-D or 4-D"):
        extract_pair(torch.zeros(5), 2)


@pytest.fixture
def two_models(tmp_path):
    make_test_checkpoint("sd15", "tiny", tmp_path / "base.safetensors", seed=1, dtype=torch.float32)
    make_test_checkpoint("sd15", "tiny", tmp_path / "tuned.safetensors", seed=2, dtype=torch.float32)
    with server_context(base_directory=str(tmp_path), force_fp32=True):
        base = load_checkpoint(str(tmp_path / "base.safetensors"), want_vae=False)
        tuned = load_checkpoint(str(tmp_path / "tuned.safetensors"), want_vae=False)
        yield base, tuned


def _save(tmp_path, model_diff, clip_diff, lora_type, rank=4096, bias_diff=True) -> dict:
    assert LoraSave().save("loras/extracted", rank, lora_type, bias_diff, model_diff=model_diff,
                           text_encoder_diff=clip_diff) == {}
    [path] = (tmp_path / "output" / "loras").glob("extracted_*_.safetensors")
    tensors = load_file(str(path))
    path.rename(tmp_path / f"{lora_type}.safetensors")
    return tensors


def _layers(module: nn.Module) -> dict:
    return {name: child.weight.detach().float().clone() for name, child in module.named_modules()
            if isinstance(child, (nn.Linear, nn.Conv2d))}


def test_full_rank_round_trip_through_our_lora_loader(tmp_path, two_models):
    (base_model, base_clip, _), (tuned_model, tuned_clip, _) = two_models
    (model_diff,) = ModelMergeSubtract().merge(tuned_model, base_model, 1.0)
    (clip_diff,) = CLIPMergeSubtract().merge(tuned_clip, base_clip, 1.0)
    tensors = _save(tmp_path, model_diff, clip_diff, "standard")
    assert "lora_unet_input_blocks_1_1_proj_in.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert all(t.dtype == torch.float16 for t in tensors.values()) and not any(k.endswith("alpha") for k in tensors)
    # bias_diff: biases and 1-D weights kept whole, exactly tuned - base (in float16)
    base_unet, tuned_unet = base_model.network(), tuned_model.network()
    expected = tuned_unet.out[0].bias.detach() - base_unet.out[0].bias.detach()
    torch.testing.assert_close(tensors["lora_unet_out_0.diff_b"].float(), expected.half().float())
    expected = tuned_unet.out[0].weight.detach() - base_unet.out[0].weight.detach()
    torch.testing.assert_close(tensors["lora_unet_out_0.diff"].float(), expected.half().float())

    from comfy_serverless.models.patching import patched_module

    def encoder_layers(clip):
        return _layers(patched_module(clip.handle, clip.patches).clip_l.encoder)

    before, want = _layers(base_unet), _layers(tuned_unet)  # copies: network() patches one shared module
    clip_before, clip_want = encoder_layers(base_clip), encoder_layers(tuned_clip)
    patched_model, patched_clip = apply_lora_file(str(tmp_path / "standard.safetensors"), base_model, base_clip,
                                                  1.0, 1.0)
    got = _layers(patched_model.network())
    assert set(got) == set(want)
    for name in want:  # every pair in the file is read back: base + up @ down exactly
        up = tensors[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"].float().flatten(1)
        down = tensors[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"].float().flatten(1)
        torch.testing.assert_close(got[name], before[name] + (up @ down).reshape(before[name].shape),
                                   atol=1e-5, rtol=1e-5)
    errors = {name: float((got[name] - want[name]).norm() / (want[name] - before[name]).norm()) for name in want}
    # conv_in's 3x3 kernel over 4 channels: ComfyUI caps the rank at the 4 input channels, not 36
    assert errors.pop("input_blocks.0.0") > 0.5
    # what remains is ComfyUI's clamp of the factors' top 1%: small for most layers (the few 4-channel
    # convolutions, whose up factor holds all the large values, lose more)
    assert float(np.median(list(errors.values()))) < 0.15, errors
    assert sum(error < 0.25 for error in errors.values()) > 0.75 * len(errors), errors
    got = encoder_layers(patched_clip)
    errors = [float((got[n] - clip_want[n]).norm() / (clip_want[n] - clip_before[n]).norm()) for n in clip_want]
    assert got.keys() == clip_want.keys() and float(np.median(errors)) < 0.15, errors


def test_full_diff_and_low_rank_files(tmp_path, two_models):
    (base_model, _, _), (tuned_model, _, _) = two_models
    (model_diff,) = ModelMergeSubtract().merge(tuned_model, base_model, 1.0)
    full = _save(tmp_path, model_diff, None, "full_diff", bias_diff=False)
    assert full and all(key.endswith(".diff") for key in full)
    base_unet, tuned_unet = base_model.network(), tuned_model.network()
    expected = tuned_unet.input_blocks[0][0].weight.detach() - base_unet.input_blocks[0][0].weight.detach()
    torch.testing.assert_close(full["lora_unet_input_blocks_0_0.diff"].float(), expected.half().float())
    low = _save(tmp_path, model_diff, None, "standard", rank=2, bias_diff=False)
    ups = [t for k, t in low.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.shape[1] <= 2 for t in ups) and not any(".diff" in k for k in low)
    assert LoraSave().save("loras/none", 8, "standard", True) == {}  # nothing given: no file
    with pytest.raises(ValueError, match="lora_type"):
        LoraSave().save("loras/x", 8, "lokr", True, model_diff=model_diff)
    assert not list((tmp_path / "output" / "loras").glob("none_*"))


def test_subtract_extract_and_load_over_http(tmp_path):
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "models" / "loras").mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", checkpoints / "base.safetensors", seed=1)
    make_test_checkpoint("sd15", "tiny", checkpoints / "tuned.safetensors", seed=2)
    srv = Server(tmp_path, args=("--force-fp32",), packs=())
    try:
        extract = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tuned.safetensors"}},
            "3": {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["2", 0], "model2": ["1", 0],
                                                                 "multiplier": 1.0}},
            "4": {"class_type": "CLIPMergeSubtract", "inputs": {"clip1": ["2", 1], "clip2": ["1", 1],
                                                                "multiplier": 1.0}},
            "5": {"class_type": "LoraSave", "inputs": {"filename_prefix": "loras/extracted", "rank": 16,
                                                       "lora_type": "standard", "bias_diff": True,
                                                       "model_diff": ["3", 0], "text_encoder_diff": ["4", 0]}},
        }
        entry = srv.run(extract)
        assert entry["status"]["status_str"] == "success", entry["status"]
        [saved] = (tmp_path / "output" / "loras").glob("extracted_00001_.safetensors")
        shutil.copy(saved, tmp_path / "models" / "loras" / "extracted.safetensors")

        def image(use_lora: bool) -> dict:
            model, clip = ["1", 0], ["1", 1]
            prompt = {"1": extract["1"]}
            if use_lora:
                prompt["9"] = {"class_type": "LoraLoader", "inputs": {
                    "model": model, "clip": clip, "lora_name": "extracted.safetensors", "strength_model": 1.0,
                    "strength_clip": 1.0}}
                model, clip = ["9", 0], ["9", 1]
            prompt.update({
                "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a cube"}},
                "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "8": {"class_type": "KSampler", "inputs": {
                    "model": model, "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                    "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
                "10": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "l"}},
            })
            result = srv.run(prompt)
            assert result["status"]["status_str"] == "success", result["status"]
            return result

        image(False)
        image(True)
        latents = sorted((tmp_path / "output").glob("l_*.latent"))
        assert len(latents) == 2
        first, second = (load_file(str(p))["latent_tensor"] for p in latents)
        assert (first - second).abs().max() > 0  # the extracted LoRA changes the base model's output
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "output", ignore_errors=True)
