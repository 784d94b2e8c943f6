"""networks/fast_paths.py: channels_last activations give the plain path's results (fp32 to rounding, bf16 to
bf16 tolerance), step aside for model patches, keep ControlNet residuals working, and a server gives the same
image with it on or off."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.random_checkpoints import make_test_checkpoint, tiny_unet_config, tiny_vae_config
from comfy_serverless.networks import fast_paths
from comfy_serverless.networks.build import build_from_state_dict, random_state_dict
from comfy_serverless.networks.unet import UNetModel
from comfy_serverless.networks.vae import AutoencoderKL


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet():
    config = tiny_unet_config("sd15")
    weights = random_state_dict(lambda: UNetModel(config), generator=torch.Generator().manual_seed(1),
                                std=0.1, affine_std=0.1)
    return build_from_state_dict(lambda: UNetModel(config), weights)


@pytest.fixture(scope="module")
def vae():
    weights = random_state_dict(lambda: AutoencoderKL(tiny_vae_config()), generator=torch.Generator().manual_seed(2),
                                std=0.1, affine_std=0.1)
    return build_from_state_dict(lambda: AutoencoderKL(tiny_vae_config()), weights)


def both(monkeypatch, run):
    """run() with channels_last off, then on."""
    monkeypatch.setenv(fast_paths.ENV, "0")
    plain = run()
    monkeypatch.setenv(fast_paths.ENV, "1")
    return plain, run()


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_conv_input_layout(monkeypatch):
    x = seeded(2, 4, 8, 8)
    monkeypatch.setenv(fast_paths.ENV, "1")
    fast = fast_paths.conv_input(x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and torch.equal(fast, x)
    flat = seeded(4, 8)
    assert fast_paths.conv_input(flat) is flat
    monkeypatch.setenv(fast_paths.ENV, "off")
    assert fast_paths.conv_input(x) is x


def test_default_policy_follows_the_measurements(monkeypatch):
    monkeypatch.setenv(fast_paths.ENV, "auto")
    monkeypatch.setattr(fast_paths, "_cpu_has_avx512", lambda: True)
    assert fast_paths.channels_last_enabled("vae") and not fast_paths.channels_last_enabled("unet")
    x = seeded(1, 4, 8, 8)
    assert fast_paths.conv_input(x, "unet") is x
    assert fast_paths.conv_input(x, "vae").is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(fast_paths, "_cpu_has_avx512", lambda: False)  # AVX2-only: the UNet gains too
    assert fast_paths.channels_last_enabled("vae") and fast_paths.channels_last_enabled("unet")
    monkeypatch.setenv(fast_paths.ENV, "unet")
    assert fast_paths.channels_last_enabled("unet") and not fast_paths.channels_last_enabled("vae")
    monkeypatch.setenv(fast_paths.ENV, "none")
    assert not fast_paths.channels_last_enabled("unet") and not fast_paths.channels_last_enabled("vae")


def test_avx512_counts_only_as_far_as_onednn_may_use_it(monkeypatch):
    from comfy_serverless.models import precision

    monkeypatch.setattr(precision, "read_cpu_flags", lambda: ("test CPU", frozenset({"avx2", "avx512f"})))
    monkeypatch.setenv(fast_paths.ENV, "auto")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap, unet_channels_last in (("", False), ("AVX512_CORE_VNNI", False), ("AVX2", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        fast_paths._cpu_has_avx512.cache_clear()
        assert fast_paths.channels_last_enabled("unet") is unet_channels_last
        assert fast_paths.channels_last_enabled("vae")
    fast_paths._cpu_has_avx512.cache_clear()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_unet_same_result(monkeypatch, unet, dtype, tolerance):
    model = copy.deepcopy(unet).to(dtype)
    x, context = seeded(2, 4, 16, 16), seeded(2, 7, 32, seed=1)
    with torch.inference_mode():
        plain, fast = both(monkeypatch, lambda: model(x, torch.tensor([10.0, 700.0]), context))
    assert fast.is_contiguous() and fast.dtype == dtype
    assert relative_error(fast, plain) < tolerance
    assert not torch.equal(plain, torch.zeros_like(plain))


def test_block_patches_see_plain_tensors_and_an_identity_patch_changes_nothing(monkeypatch, unet):
    seen = []

    def patch(h, options):
        seen.append(h.view(h.shape[0], -1).shape)  # .view fails on channels_last strides
        return h

    def output_patch(h, skip, options):
        seen.append((h.view(-1).shape, skip.view(-1).shape))
        return h, skip

    x, context, t = seeded(1, 4, 16, 16), seeded(1, 7, 32, seed=1), torch.tensor([500.0])
    options = {"patches": {"input_block_patch": [patch], "input_block_patch_after_skip": [patch],
                           "output_block_patch": [output_patch]}}
    model = copy.deepcopy(unet).to(torch.bfloat16)  # where the two layouts round differently
    monkeypatch.setenv(fast_paths.ENV, "1")
    with torch.inference_mode():
        patched = model(x, t, context, transformer_options=options)
        plain = model(x, t, context)
    assert len(seen) == 3 * len(model.input_blocks)
    assert torch.equal(patched, plain)

    def double_skip(h, skip, options):
        return h, skip * 2

    with torch.inference_mode():
        changed, reference = both(monkeypatch, lambda: model(
            x, t, context, transformer_options={"patches": {"output_block_patch": [double_skip]}}))
    assert relative_error(changed, reference) < 3e-2 and relative_error(changed, plain) > 3e-2


def test_controlnet_residuals_still_add(monkeypatch, unet):
    shapes = []
    hooks = [block.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for block in unet.input_blocks]
    hooks.append(unet.middle_block.register_forward_hook(lambda m, i, o: shapes.append(o.shape)))
    x, context, t = seeded(1, 4, 16, 16), seeded(1, 7, 32, seed=1), torch.tensor([300.0])
    with torch.inference_mode():
        unet(x, t, context)
    for hook in hooks:
        hook.remove()
    inputs, middle = shapes[:-1], shapes[-1]

    def control():
        return {"input": [seeded(*s, seed=i) for i, s in reversed(list(enumerate(inputs)))],
                "middle": [seeded(*middle, seed=99)],
                "output": [seeded(*s, seed=50 + i) for i, s in enumerate(inputs)]}

    with torch.inference_mode():
        plain, fast = both(monkeypatch, lambda: unet(x, t, context, control=control()))
        without = unet(x, t, context)
    assert relative_error(fast, plain) < 1e-5
    assert relative_error(without, plain) > 1e-2  # the residuals did change the result


def test_vae_same_result(monkeypatch, vae):
    latents, pixels = seeded(1, 4, 8, 8), seeded(1, 3, 32, 32).tanh()
    with torch.inference_mode():
        plain, fast = both(monkeypatch, lambda: vae.decode(latents))
        plain_enc, fast_enc = both(monkeypatch, lambda: vae.encode(pixels))
    assert fast.shape == (1, 3, 16, 16) and fast.is_contiguous()  # the tiny VAE downscales by 2
    assert relative_error(fast, plain) < 1e-5 and relative_error(fast_enc, plain_enc) < 1e-5


def _txt2img() -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "fog", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 11, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fast", "images": ["8", 0]}},
    }


def server_images(start_server, base, precision: str, environments: list[dict], prompts: list[dict]) -> list:
    """For each environment, a server on a tiny SD1.5 checkpoint runs `prompts`; the last one's image."""
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    make_test_checkpoint("sd15", "tiny", base / "models" / "checkpoints" / "tiny.safetensors", seed=4)
    images = []
    for env in environments:
        srv = start_server(precision, env=env, base=base)
        for prompt in prompts:
            entry = srv.wait_history(srv.queue_prompt(prompt)["prompt_id"], timeout=300)  # a loaded machine
            assert entry["status"]["status_str"] == "success", entry["status"]
        png = srv.get("/view", params=entry["outputs"]["9"]["images"][0]).content
        images.append(np.asarray(Image.open(io.BytesIO(png))).astype(int))
        srv.stop()
    assert images[0].std() > 0
    return images


def test_server_image_same_with_and_without(tmp_path, start_server):
    images = server_images(start_server, tmp_path, "--force-fp32", [{fast_paths.ENV: "0"}, {fast_paths.ENV: "1"}],
                           [_txt2img()])
    assert np.abs(images[0] - images[1]).max() <= 1
