"""DifferentialDiffusion: the mask schedule by hand (timesteps from SD's beta schedule in numpy), its use by the
sampler on a tiny SD1.5, and an inpainting workflow with a soft mask through the real server."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.nodes.differential_diffusion import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    DifferentialDiffusion,
    DifferentialMask,
    progress_threshold,
)
from comfy_serverless.sampling.denoising import ModelSampling
from conftest import server_context

SIGMAS = torch.tensor([10.0, 3.0, 1.0, 0.2, 0.0])


def reference_timestep(sigma: float) -> float:
    """SD's discrete schedule (scaled_linear betas 0.00085..0.012, 1000 steps): sigma -> the timestep whose
    log sigma is nearest (whole steps, as the UNet is fed)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    log_sigmas = np.log(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    return float(np.abs(log_sigmas - np.log(sigma)).argmin())


def reference_threshold(sigma: float, sigmas=SIGMAS) -> float:
    sigma_min = float(np.exp(np.log(((1 - 0.99915) / 0.99915) ** 0.5)))  # first level of the schedule
    end = max(float(sigmas[-1]), sigma_min)
    start, stop = reference_timestep(float(sigmas[0])), reference_timestep(end)
    return (reference_timestep(sigma) - stop) / (start - stop)


def test_definition():
    assert NODE_CLASS_MAPPINGS == {"DifferentialDiffusion": DifferentialDiffusion}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"DifferentialDiffusion": "Differential Diffusion"}
    assert DifferentialDiffusion.CATEGORY == "_for_testing" and DifferentialDiffusion.EXPERIMENTAL
    assert DifferentialDiffusion.INPUT_TYPES()["optional"]["strength"][1] == {
        "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}


def test_threshold_runs_from_one_to_zero_in_timesteps():
    sampling = ModelSampling("eps")
    assert float(sampling.sigma_min) == pytest.approx(((1 - 0.99915) / 0.99915) ** 0.5, rel=1e-4)
    found = [progress_threshold(sampling, SIGMAS, torch.tensor([sigma])) for sigma in SIGMAS[:-1].tolist()]
    expected = [reference_threshold(sigma) for sigma in SIGMAS[:-1].tolist()]
    assert found == pytest.approx(expected, abs=1e-6)
    assert found[0] == pytest.approx(1.0) and found == sorted(found, reverse=True) and found[-1] > 0
    # A schedule that stops above sigma_min ends there: its last level is threshold 0.
    partial = torch.tensor([3.0, 1.0, 0.5])
    assert progress_threshold(sampling, partial, torch.tensor([0.5])) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("holder", ["guider", "denoiser"])
def test_mask_is_thresholded_and_blended_by_strength(holder):
    sampling = ModelSampling("eps")
    model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling)) if holder == "guider" \
        else SimpleNamespace(model_sampling=sampling)
    options = {"model": model, "sigmas": SIGMAS}
    mask = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11)
    sigma = torch.tensor([1.0])
    threshold = reference_threshold(1.0)
    binary = (mask >= threshold).float()
    assert 0 < binary.sum() < 11  # the threshold falls inside the mask's range
    torch.testing.assert_close(DifferentialMask(1.0)(sigma, mask, options), binary)
    torch.testing.assert_close(DifferentialMask(0.25)(sigma, mask, options), 0.25 * binary + 0.75 * mask)
    torch.testing.assert_close(DifferentialMask(0.0)(sigma, mask, options), binary)  # 0 counts as unset


def test_a_model_without_a_schedule_is_refused():
    with pytest.raises(TypeError, match="has no model_sampling"):
        DifferentialMask()(torch.tensor([1.0]), torch.ones(1, 1, 2, 2), {"model": object(), "sigmas": SIGMAS})


# -- in the sampler -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path_factory.mktemp("dd") / "tiny-sd15.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=1)
    return path


def test_sampler_applies_the_hand_computed_schedule(checkpoint):
    from comfy_serverless.models.loading import load_checkpoint
    from comfy_serverless.sampling.ksampler import ksampler

    with server_context(force_fp32=True):
        model = load_checkpoint(str(checkpoint), want_clip=False, want_vae=False)[0]
        patched = DifferentialDiffusion().apply(model, 1.0)[0]
        assert "denoise_mask_function" not in model.model_options  # the input model is left alone
        seen = []

        def by_hand(sigma, mask, extra_options):
            value = float(sigma.reshape(-1)[0])
            seen.append(value)
            return (mask >= reference_threshold(value, extra_options["sigmas"])).to(mask.dtype)

        hand = model.clone()
        hand.model_options["denoise_mask_function"] = by_hand
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        mask = torch.linspace(0, 1, 8).reshape(1, 1, 8).expand(1, 8, 8).contiguous()
        positive = [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2)), {}]]
        negative = [[torch.zeros(1, 77, 32), {}]]

        def run(patched_model):
            return ksampler(patched_model.unet_apply, patched_model.model_sampling, latent, seed=1, steps=4, cfg=5.0,
                            sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                            noise_mask=mask, model_options=patched_model.model_options)

        differential = run(patched)
        torch.testing.assert_close(differential, run(hand), atol=1e-5, rtol=1e-5)
        assert len(seen) == 4
        assert not torch.allclose(differential, run(model), atol=1e-3)  # plain soft-mask inpainting differs


# -- through the server ------------------------------------------------------------------------------------

def _prompt(strength: float | None, prefix: str) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "soft.png"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["3", 0], "mask": ["2", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red door", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }
    if strength is not None:
        prompt["10"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["1", 0], "strength": strength}}
        prompt["7"]["inputs"]["model"] = ["10", 0]
    return prompt


def _pixels(srv, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["9"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_soft_mask_inpainting_through_the_server(start_server, tmp_path, checkpoint):
    base = tmp_path / "dd-server"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).hardlink_to(checkpoint)
    (base / "input").mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]  # LoadImage's mask is 1 - alpha: a ramp
    Image.fromarray(rgba, "RGBA").save(base / "input" / "soft.png")
    srv = start_server("--force-fp32", packs=(), base=base)

    info = srv.get("/object_info/DifferentialDiffusion").json()["DifferentialDiffusion"]
    assert info["category"] == "_for_testing" and info["experimental"] is True
    plain = _pixels(srv, srv.run(_prompt(None, "plain")))
    full = _pixels(srv, srv.run(_prompt(1.0, "full")))
    half = _pixels(srv, srv.run(_prompt(0.5, "half")))
    again = _pixels(srv, srv.run(_prompt(1.0, "again")))
    assert plain.shape == full.shape == (64, 64, 3)
    assert not np.array_equal(plain, full) and not np.array_equal(full, half)
    assert np.array_equal(full, again)

    bad = _prompt(1.0, "bad")
    bad["10"]["inputs"]["strength"] = 1.5
    response = srv.post("/prompt", {"prompt": bad})
    assert response.status_code == 400 and "strength" in response.text
