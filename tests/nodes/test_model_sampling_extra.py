"""ModelSamplingContinuousEDM / ModelSamplingContinuousV: the sampling objects against diffusers' EDM scheduler
and the formulas, the nodes, and a tiny SD 1.5 checkpoint sampled through the server."""

from __future__ import annotations

import io
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.continuous_sampling import (
    ContinuousSampling,
    ContinuousVSampling,
    CosmosRFlowSampling,
    PlaygroundLatentFormat,
    continuous_edm_sampling,
)
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes.model_sampling_extra import ModelSamplingContinuousEDM, ModelSamplingContinuousV
from comfy_serverless.sampling.denoising import CFGDenoiser
from comfy_serverless.sampling.schedules import karras_sigmas
from conftest import Server

SIGMAS = torch.tensor([0.01, 0.3, 1.0, 7.5, 80.0])


def _diffusers_edm(prediction_type: str, sigma_data: float):
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=sigma_data, prediction_type=prediction_type)


@pytest.mark.parametrize("ours, theirs, data", [("edm", "epsilon", 0.5), ("v_prediction", "v_prediction", 1.0)])
def test_preconditioning_matches_diffusers_edm(ours, theirs, data):
    scheduler = _diffusers_edm(theirs, data)
    sampling = continuous_edm_sampling(ours, 0.002, 80.0)
    assert sampling.sigma_data == data
    x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    for i, sigma in enumerate(SIGMAS):
        torch.testing.assert_close(sampling.calculate_input(sigma[None], x[i:i + 1]),
                                   scheduler.precondition_inputs(x[i:i + 1], sigma))
        torch.testing.assert_close(sampling.timestep(sigma), scheduler.precondition_noise(sigma).reshape(()))
        torch.testing.assert_close(sampling.calculate_denoised(sigma[None], out[i:i + 1], x[i:i + 1]),
                                   scheduler.precondition_outputs(x[i:i + 1], out[i:i + 1], sigma))


def test_karras_sigmas_over_the_range_match_diffusers():
    scheduler = _diffusers_edm("epsilon", 0.5)
    scheduler.set_timesteps(12)
    sampling = continuous_edm_sampling("edm", 0.002, 80.0)
    ours = karras_sigmas(12, float(sampling.sigma_min), float(sampling.sigma_max))
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_table_timesteps_and_percent():
    sampling = continuous_edm_sampling("eps", 0.002, 120.0)
    assert len(sampling.sigmas) == 1000
    assert float(sampling.sigma_min) == pytest.approx(0.002, rel=1e-6)
    assert float(sampling.sigma_max) == pytest.approx(120.0, rel=1e-6)
    ratios = sampling.sigmas[1:] / sampling.sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])), rtol=1e-4, atol=0)  # log-uniform
    torch.testing.assert_close(sampling.timestep(SIGMAS), 0.25 * SIGMAS.log())
    torch.testing.assert_close(sampling.sigma(sampling.timestep(SIGMAS)), SIGMAS)
    assert sampling.percent_to_sigma(0.0) > 1e8 and sampling.percent_to_sigma(1.0) == 0.0
    assert sampling.percent_to_sigma(0.5) == pytest.approx(math.sqrt(0.002 * 120.0), rel=1e-5)
    assert sampling.percent_to_sigma(0.25) == pytest.approx(0.002 * (120.0 / 0.002) ** 0.75, rel=1e-5)


def test_continuous_v_time_is_arctan():
    sampling = ContinuousVSampling(0.03, 500.0)
    torch.testing.assert_close(sampling.timestep(SIGMAS), torch.atan(SIGMAS) * 2 / math.pi)
    torch.testing.assert_close(sampling.sigma(sampling.timestep(SIGMAS)), SIGMAS, rtol=1e-4, atol=1e-5)
    assert sampling.prediction_type == "v_prediction" and sampling.sigma_data == 1.0


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "edm", "cosmos_rflow"])
def test_exact_model_outputs_recover_the_clean_latent(kind):
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    sigma = torch.tensor([0.7, 4.0])
    sampling = continuous_edm_sampling(kind, 0.002, 120.0)
    noisy = sampling.noise_scaling(sigma, noise, x0)
    s = sigma.view(-1, 1, 1, 1)
    if kind == "cosmos_rflow":
        # Rectified flow in the VE scale: x / (1 + sigma) = (1 - t) x0 + t noise, the model predicts noise - x0.
        t = s / (1 + s)
        torch.testing.assert_close(sampling.calculate_input(sigma, noisy), (1 - t) * x0 + t * noise)
        output = noise - x0
    else:
        torch.testing.assert_close(noisy, x0 + s * noise)
        d = sampling.sigma_data
        total = s ** 2 + d ** 2
        if kind == "eps":
            output = noise
        elif kind == "v_prediction":  # v in the unit-variance scale
            output = (d * noise - s * x0 / d) * d / total ** 0.5
        else:  # EDM's F = (x0 - c_skip x) / c_out
            c_skip, c_out = d ** 2 / total, s * d / total ** 0.5
            output = (x0 - c_skip * noisy) / c_out
    torch.testing.assert_close(sampling.calculate_denoised(sigma, output, noisy), x0, rtol=1e-4, atol=1e-4)


def test_cosmos_time_and_its_cap():
    sampling = CosmosRFlowSampling(0.002, 80.0)
    torch.testing.assert_close(sampling.timestep(SIGMAS), SIGMAS / (SIGMAS + 1))
    torch.testing.assert_close(sampling.sigma(torch.tensor([0.5, 0.999])), torch.tensor([1.0, 80.0]), rtol=1e-4,
                               atol=1e-4)


def test_bad_parameters_give_clear_errors():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        continuous_edm_sampling("edm", 10.0, 1.0)
    with pytest.raises(ValueError, match="unknown sampling"):
        continuous_edm_sampling("x0", 0.002, 1.0)
    with pytest.raises(ValueError, match="4 channels"):
        PlaygroundLatentFormat().process_in(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="v_prediction"):
        ModelSamplingContinuousV().patch(None, "eps", 1.0, 0.1)


# Playground v2.5's published configs: the VAE's latents_mean / latents_std / scaling_factor and the EDM scheduler.
PLAYGROUND_VAE = {"latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299],
                  "scaling_factor": 0.5}


def test_playground_latent_format_matches_the_diffusers_pipeline_formulas():
    latent = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mean = torch.tensor(PLAYGROUND_VAE["latents_mean"], dtype=torch.float64).reshape(1, 4, 1, 1)
    std = torch.tensor(PLAYGROUND_VAE["latents_std"], dtype=torch.float64).reshape(1, 4, 1, 1)
    scale = PLAYGROUND_VAE["scaling_factor"]
    fmt = PlaygroundLatentFormat()
    # diffusers' SDXL pipeline: encode (x - mean) * scale / std, decode x * std / scale + mean
    torch.testing.assert_close(fmt.process_in(latent), (latent - mean) * scale / std)
    torch.testing.assert_close(fmt.process_out(latent), latent * std / scale + mean)
    torch.testing.assert_close(fmt.process_out(fmt.process_in(latent)), latent)
    assert fmt.process_in(mean.expand(1, 4, 2, 2)).abs().max() < 1e-12  # the mean latent maps to zero


def test_playground_sampling_is_edm_with_the_diffusers_scheduler_preconditioning():
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")
    sampling = continuous_edm_sampling("edm_playground_v2.5", 0.002, 80.0)
    assert sampling.prediction_type == "edm" and sampling.sigma_data == 0.5
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    out = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    for sigma in SIGMAS:
        torch.testing.assert_close(sampling.calculate_input(sigma[None], x), scheduler.precondition_inputs(x, sigma))
        torch.testing.assert_close(sampling.calculate_denoised(sigma[None], out, x),
                                   scheduler.precondition_outputs(x, out, sigma))
    scheduler.set_timesteps(10)
    torch.testing.assert_close(karras_sigmas(10, float(sampling.sigma_min), float(sampling.sigma_max)),
                               scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_playground_node_sets_the_latent_format_on_the_clone_only(tmp_path):
    from comfy_serverless.models.loading import load_checkpoint

    path = tmp_path / "tiny.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=2)
    model = load_checkpoint(str(path), want_clip=False, want_vae=False)[0]
    (patched,) = ModelSamplingContinuousEDM().patch(model, "edm_playground_v2.5", 80.0, 0.002)
    latent = torch.randn(1, 4, 2, 2)
    expected = PlaygroundLatentFormat().process_in(latent)
    torch.testing.assert_close(patched.process_latent_in(latent), expected)
    torch.testing.assert_close(patched.process_latent_out(expected), latent)
    torch.testing.assert_close(model.process_latent_in(latent), latent * model.latent_scale)
    assert patched.model_sampling.prediction_type == "edm"
    assert patched.get_model_object("latent_format").scale_factor == 0.5


def test_nodes_patch_a_clone_and_the_sampler_feeds_the_continuous_time(tmp_path):
    from comfy_serverless.models.loading import load_checkpoint

    path = tmp_path / "tiny.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=2)
    model = load_checkpoint(str(path), want_clip=False, want_vae=False)[0]
    (edm,) = ModelSamplingContinuousEDM().patch(model, "edm", 80.0, 0.002)
    (v,) = ModelSamplingContinuousV().patch(model, "v_prediction", 500.0, 0.03)
    assert isinstance(edm.model_sampling, ContinuousSampling) and edm.model_sampling.prediction_type == "edm"
    assert isinstance(v.model_sampling, ContinuousVSampling)
    assert not isinstance(model.model_sampling, ContinuousSampling)  # the input MODEL is untouched
    seen = []

    def unet(x, t, **_):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    x = torch.randn(1, 4, 4, 4)
    sigma = torch.tensor([3.0])
    denoiser = CFGDenoiser(unet, [[torch.zeros(1, 2, 32), {}]], [], 1.0, model_sampling=edm.model_sampling)
    denoised = denoiser(x, sigma)
    torch.testing.assert_close(seen[0][1], torch.tensor([0.25 * math.log(3.0)]))
    torch.testing.assert_close(seen[0][0], x / math.sqrt(9.0 + 0.25))
    torch.testing.assert_close(denoised, x * 0.25 / 9.25)  # zero F: c_skip * x


def _workflow(patch: dict | None, seed: int = 3) -> dict:
    model = ["1", 0]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "edm", "images": ["6", 0]}},
    }
    if patch is not None:
        prompt["8"] = {"class_type": patch.pop("class_type"), "inputs": {"model": ["1", 0], **patch}}
        model = ["8", 0]
    prompt["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "karras",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return prompt


def _pixels(srv: Server, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["7"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_continuous_sampling_through_the_server(tmp_path):
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", checkpoints / "tiny.safetensors", seed=2)
    srv = Server(tmp_path, args=("--force-fp32",), packs=())
    try:
        plain = _pixels(srv, srv.run(_workflow(None)))
        edm = dict(class_type="ModelSamplingContinuousEDM", sampling="edm", sigma_max=80.0, sigma_min=0.002)
        first = _pixels(srv, srv.run(_workflow(dict(edm))))
        assert np.array_equal(first, _pixels(srv, srv.run(_workflow(dict(edm)))))
        assert np.abs(first - plain).max() > 0
        v = dict(class_type="ModelSamplingContinuousV", sampling="v_prediction", sigma_max=500.0, sigma_min=0.03)
        assert np.abs(_pixels(srv, srv.run(_workflow(v))) - first).max() > 0
        playground = _pixels(srv, srv.run(_workflow(dict(edm, sampling="edm_playground_v2.5"))))
        assert np.abs(playground - first).max() > 0  # same schedule, other latent scaling
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "output", ignore_errors=True)
