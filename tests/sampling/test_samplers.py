"""Samplers on problems with known answers, and the KSampler glue (model sampling, CFG, noise, inpainting)."""

import json
import math
from pathlib import Path

import pytest
import torch

from comfy_serverless.sampling import samplers
from comfy_serverless.sampling.denoising import CFGDenoiser, ModelSampling, cfg_denoiser
from comfy_serverless.sampling.ksampler import (
    compute_sigmas,
    ksampler,
    ksampler_advanced,
    prepare_noise,
    prepare_noise_mask,
    run_sampler,
    slice_sigmas,
)
from comfy_serverless.sampling.samplers import (
    RANGE_ONLY_SAMPLERS,
    SAMPLER_NAMES,
    STOCHASTIC_SAMPLERS,
    ancestral_step,
    default_noise_sampler,
    linear_multistep_coefficients,
    sample,
)
from comfy_serverless.sampling.schedules import calculate_sigmas

DETERMINISTIC_SAMPLERS = [name for name in SAMPLER_NAMES if name not in STOCHASTIC_SAMPLERS]
FIRST_ORDER = {"euler", "ddim", "euler_cfg_pp", "heunpp2", "gradient_estimation", "gradient_estimation_cfg_pp"}
SDE_SAMPLERS = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                "dpmpp_3m_sde"]

# Data distribution N(MU, S²) per element.  Its exact denoiser is
# E[x0 | x_sigma] = (S² x + sigma² MU) / (S² + sigma²), and the probability-flow ODE maps
# x_T to MU + (x_T - MU) * sqrt(S² + sigma²) / sqrt(S² + sigma_T²).
MU, S = 1.5, 0.5


def gaussian_denoiser(x, sigma, model_options=None):
    """The exact denoiser; as a guider it reports itself as both the guided and the unguided prediction."""
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    denoised = (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)
    for hook in (model_options or {}).get("sampler_post_cfg_function", ()):
        denoised = hook({"denoised": denoised, "cond_denoised": denoised, "uncond_denoised": denoised,
                         "input": x, "sigma": sigma, "model_options": model_options})
    return denoised


def ode_solution(x_start, sigma_start, sigma_end):
    return MU + (x_start - MU) * math.sqrt(S * S + sigma_end ** 2) / math.sqrt(S * S + sigma_start ** 2)


@pytest.fixture(scope="module")
def model_sampling():
    return ModelSampling()


@pytest.fixture(scope="module")
def standard_normal():
    return torch.randn(4, 1, 100, 100, generator=torch.Generator().manual_seed(0))


def gaussian_start(z, sigmas):
    return MU + z * math.sqrt(S * S + float(sigmas[0]) ** 2)


# --------------------------------------------------------------------------------------------------------
# Sampler registry
# --------------------------------------------------------------------------------------------------------

def test_sampler_names_in_comfyui_order():
    reference = json.loads((Path(__file__).parents[2] / "docs" / "comfyui-0.3.64-nodes.json").read_text())
    assert SAMPLER_NAMES == reference["KSampler"]["input"]["required"]["sampler_name"][0]
    assert len(SAMPLER_NAMES) == 42


def test_unknown_sampler_rejected(model_sampling):
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("euler_a", gaussian_denoiser, torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown sampler"):
        compute_sigmas(model_sampling, "karras", "dpm_faster", 10)
    with pytest.raises(ValueError, match="unknown scheduler"):
        compute_sigmas(model_sampling, "karras_v2", "euler", 10)


# --------------------------------------------------------------------------------------------------------
# Convergence on analytic problems
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_reaches_a_fixed_point(model_sampling, name):
    target = torch.linspace(-2, 2, 32).reshape(1, 2, 4, 4)
    sigmas = calculate_sigmas(model_sampling, "karras", 10)
    x = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]

    def constant(x, sigma, model_options=None):
        for hook in (model_options or {}).get("sampler_post_cfg_function", ()):
            hook({"denoised": target.expand_as(x), "uncond_denoised": target.expand_as(x)})
        return target.expand_as(x)

    out = sample(name, constant, x, sigmas, seed=3)
    if name in RANGE_ONLY_SAMPLERS:  # they stop at the smallest non-zero level, on the exact ray towards target
        target = target + (x - target) * sigmas[-2] / sigmas[0]
    tolerance = 5e-3 if name.startswith("uni_pc") else 1e-4  # uni_pc stops at sigma 0.001 (residual 0.001 * noise)
    torch.testing.assert_close(out, target, atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", DETERMINISTIC_SAMPLERS)
def test_deterministic_samplers_follow_the_gaussian_ode(model_sampling, standard_normal, name):
    sigmas = calculate_sigmas(model_sampling, "karras", 30)
    x = gaussian_start(standard_normal, sigmas)
    out = sample(name, gaussian_denoiser, x, sigmas)
    exact = ode_solution(x, float(sigmas[0]), float(sigmas[-2]) if name in RANGE_ONLY_SAMPLERS else 0.0)
    tolerance = 0.2 if name in FIRST_ORDER else 0.1 if name == "dpm_adaptive" else 0.02
    assert (out - exact).abs().max().item() < tolerance
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.03)


def test_higher_order_samplers_are_more_accurate_and_converge(model_sampling, standard_normal):
    def error(name, steps):
        sigmas = calculate_sigmas(model_sampling, "karras", steps)
        x = gaussian_start(standard_normal, sigmas)
        return (sample(name, gaussian_denoiser, x, sigmas) - ode_solution(x, float(sigmas[0]), 0.0)).abs().max().item()

    euler = error("euler", 30)
    for name in ("heun", "dpm_2", "lms", "dpmpp_2m", "uni_pc"):
        assert error(name, 30) < euler / 5, name
    # second order: tripling the steps cuts the error roughly ninefold
    assert error("dpmpp_2m", 10) / error("dpmpp_2m", 30) > 6
    assert error("euler", 10) / euler < 4
    assert error("uni_pc", 30) < error("dpmpp_2m", 30)


@pytest.mark.parametrize("name", SDE_SAMPLERS + ["ddpm"])
def test_stochastic_samplers_reproduce_the_data_distribution(model_sampling, standard_normal, name):
    sigmas = calculate_sigmas(model_sampling, "karras", 60)
    out = sample(name, gaussian_denoiser, gaussian_start(standard_normal, sigmas), sigmas, seed=7)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.05)


def test_lcm_lands_on_the_mean(model_sampling, standard_normal):
    # LCM assumes a consistency model; with a plain denoiser it keeps the mean but not the spread.
    sigmas = calculate_sigmas(model_sampling, "karras", 8)
    out = sample("lcm", gaussian_denoiser, gaussian_start(standard_normal, sigmas), sigmas, seed=7)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_sde_samplers_without_noise_solve_the_ode(model_sampling, standard_normal, name):
    sigmas = calculate_sigmas(model_sampling, "karras", 30)
    x = gaussian_start(standard_normal, sigmas)
    out = sample(name, gaussian_denoiser, x, sigmas, seed=7, eta=0.0)
    tolerance = 0.2 if name == "euler_ancestral" else 0.02
    assert (out - ode_solution(x, float(sigmas[0]), 0.0)).abs().max().item() < tolerance


def test_samplers_stop_at_a_nonzero_final_sigma(model_sampling, standard_normal):
    sigmas = calculate_sigmas(model_sampling, "karras", 40)[:21]  # half-way, noise left in
    x = gaussian_start(standard_normal, sigmas)
    for name in ("euler", "heun", "dpmpp_2m", "lms", "uni_pc"):
        out = sample(name, gaussian_denoiser, x, sigmas)
        exact = ode_solution(x, float(sigmas[0]), float(sigmas[-1]))
        assert (out - exact).abs().max().item() < 0.05 * float(sigmas[-1]) + 0.01, name


# --------------------------------------------------------------------------------------------------------
# Randomness, callbacks, helpers
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_same_seed_same_result(model_sampling, name):
    sigmas = calculate_sigmas(model_sampling, "normal", 6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    first = sample(name, gaussian_denoiser, x.clone(), sigmas, seed=11)
    assert torch.equal(first, sample(name, gaussian_denoiser, x.clone(), sigmas, seed=11))
    other = sample(name, gaussian_denoiser, x.clone(), sigmas, seed=12)
    assert torch.equal(first, other) == (name not in STOCHASTIC_SAMPLERS)


def test_default_noise_sampler_seeds_like_comfyui():
    x = torch.zeros(2, 4, 8, 8)
    draw = default_noise_sampler(x, seed=42)
    generator = torch.Generator().manual_seed(43)  # ComfyUI uses seed + 1 on CPU
    assert torch.equal(draw(1.0, 0.5), torch.randn(x.shape, generator=generator))
    assert torch.equal(draw(0.5, 0.1), torch.randn(x.shape, generator=generator))


def test_euler_ancestral_step_uses_the_seeded_noise():
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    x = torch.zeros(1, 1, 3, 3)
    out = sample("euler_ancestral", lambda x, s: torch.zeros_like(x), x, sigmas, seed=5)
    # First step: deterministic part shrinks 0 to 0, then noise of std sigma_up; last step lands on denoised = 0.
    assert torch.equal(out, torch.zeros_like(x))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    sigma_down, sigma_up = ancestral_step(sigmas[0], sigmas[1])
    seen = []
    sample("euler_ancestral", lambda x, s: torch.zeros_like(x), x, sigmas, seed=5,
           callback=lambda i, x, d, n: seen.append(x.clone()))
    torch.testing.assert_close(seen[0], noise * sigma_up)


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n not in RANGE_ONLY_SAMPLERS])
def test_callback_reports_every_step(model_sampling, name):
    sigmas = calculate_sigmas(model_sampling, "karras", 7)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    reports = []
    out = sample(name, gaussian_denoiser, x, sigmas, seed=1,
                 callback=lambda i, x, denoised, total: reports.append((i, x.shape, denoised.shape, total)))
    assert [r[0] for r in reports] == list(range(7))
    assert all(r[1] == out.shape and r[2] == out.shape and r[3] == 7 for r in reports)


def test_raising_from_the_callback_interrupts():
    class Interrupted(Exception):
        pass

    def stop_at_step_2(i, x, denoised, total):
        if i == 2:
            raise Interrupted

    calls = []

    def counting_denoiser(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    sigmas = torch.linspace(10, 0, 11)
    with pytest.raises(Interrupted):
        sample("euler", counting_denoiser, torch.zeros(1, 1, 2, 2), sigmas, callback=stop_at_step_2)
    assert len(calls) == 3


def test_linear_multistep_coefficients():
    times = [10.0, 7.0, 5.0, 2.5, 1.0]
    assert linear_multistep_coefficients(1, times, 0) == pytest.approx([-3.0])
    for order, i in ((2, 1), (3, 2), (4, 3)):
        weights = linear_multistep_coefficients(order, times, i)
        assert sum(weights) == pytest.approx(times[i + 1] - times[i])  # constant slopes integrate exactly
        # so do polynomial slopes of degree < order: integrate f(t) = t^(order-1)
        values = [times[i - j] ** (order - 1) for j in range(order)]
        exact = (times[i + 1] ** order - times[i] ** order) / order
        assert sum(w * v for w, v in zip(weights, values)) == pytest.approx(exact)
    with pytest.raises(ValueError):
        linear_multistep_coefficients(3, times, 1)


def test_ancestral_step_splits_the_variance():
    sigma_down, sigma_up = ancestral_step(torch.tensor(3.0), torch.tensor(2.0))
    assert (sigma_down ** 2 + sigma_up ** 2).item() == pytest.approx(4.0)
    assert sigma_up.item() == pytest.approx((4 * (9 - 4) / 9) ** 0.5)
    assert ancestral_step(3.0, 2.0, eta=0.0) == (2.0, 0.0)
    assert ancestral_step(torch.tensor(3.0), torch.tensor(0.0))[0].item() == 0.0


# --------------------------------------------------------------------------------------------------------
# Model sampling (eps / v)
# --------------------------------------------------------------------------------------------------------

def test_eps_and_v_prediction_recover_x0():
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 7.0])
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps  # variance-exploding noisy sample
    eps_model, v_model = ModelSampling("eps"), ModelSampling("v_prediction")
    torch.testing.assert_close(eps_model.calculate_denoised(sigma, eps, x), x0)
    alpha, sigma_vp = 1 / (s ** 2 + 1) ** 0.5, s / (s ** 2 + 1) ** 0.5
    v_target = alpha * eps - sigma_vp * x0
    torch.testing.assert_close(v_model.calculate_denoised(sigma, v_target, x), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_model.calculate_input(sigma, x), x / (s ** 2 + 1) ** 0.5)
    assert ModelSampling("v").prediction_type == "v_prediction"
    with pytest.raises(ValueError):
        ModelSampling("flow")


def test_noise_scaling_at_full_and_partial_denoise(model_sampling):
    noise, latent = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.25)
    sigma = torch.tensor(3.0)
    torch.testing.assert_close(model_sampling.noise_scaling(sigma, noise, latent), noise * 3 + latent)
    torch.testing.assert_close(model_sampling.noise_scaling(sigma, noise, latent, max_denoise=True),
                               noise * 10 ** 0.5 + latent)


def test_apply_model_feeds_scaled_input_and_table_timesteps(model_sampling):
    seen = {}

    def unet(x_in, timesteps, context=None):
        seen.update(x_in=x_in, timesteps=timesteps, context=context)
        return torch.zeros_like(x_in)

    x = torch.full((2, 4, 2, 2), 3.0)
    sigma = torch.stack([model_sampling.sigmas[999], model_sampling.sigmas[10]])
    context = torch.ones(2, 5, 8)
    out = model_sampling.apply_model(unet, x, sigma, context=context)
    assert seen["timesteps"].tolist() == [999.0, 10.0]
    assert seen["timesteps"].dtype == torch.float32
    torch.testing.assert_close(seen["x_in"], model_sampling.calculate_input(sigma, x))
    assert seen["context"] is context
    torch.testing.assert_close(out, x)  # zero predicted noise: x_0 = x


# --------------------------------------------------------------------------------------------------------
# Classifier-free guidance over conditioning lists
# --------------------------------------------------------------------------------------------------------

class RecordingUnet:
    """eps = x_in * context-mean: each conditioning gives a distinct, easily predicted denoised value."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x_in, timesteps, context=None, **kwargs):
        self.batch_sizes.append(x_in.shape[0])
        scale = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        extra = kwargs["y"].view(-1, 1, 1, 1) if "y" in kwargs else 0.0
        return x_in * scale + extra


def conditioning(value, tokens=77, **options):
    return [torch.full((1, tokens, 8), float(value)), options]


def single_denoised(model_sampling, value, x, sigma):
    """Denoised from the RecordingUnet with one plain conditioning of the given value."""
    return CFGDenoiser(RecordingUnet(), [conditioning(value)], [], 1.0, model_sampling=model_sampling)(x, sigma)


@pytest.fixture()
def noisy(model_sampling):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.full((2,), 3.0)
    return x, sigma


def test_cfg_one_equals_positive_only_in_one_call(model_sampling, noisy):
    x, sigma = noisy
    unet = RecordingUnet()
    out = cfg_denoiser(unet, [conditioning(0.2)], [conditioning(-0.4)], 1.0, model_sampling=model_sampling)(x, sigma)
    assert unet.batch_sizes == [2]  # the negative is skipped entirely
    torch.testing.assert_close(out, single_denoised(model_sampling, 0.2, x, sigma))


def test_cfg_batches_positive_and_negative_in_one_call(model_sampling, noisy):
    x, sigma = noisy
    unet = RecordingUnet()
    out = cfg_denoiser(unet, [conditioning(0.2)], [conditioning(-0.4)], 7.5, model_sampling=model_sampling)(x, sigma)
    assert unet.batch_sizes == [4]
    positive = single_denoised(model_sampling, 0.2, x, sigma)
    negative = single_denoised(model_sampling, -0.4, x, sigma)
    torch.testing.assert_close(out, negative + 7.5 * (positive - negative))


def test_conditionings_of_different_lengths_are_batched(model_sampling, noisy):
    x, sigma = noisy
    unet = RecordingUnet()
    denoiser = cfg_denoiser(unet, [conditioning(0.2, tokens=154)], [conditioning(-0.4, tokens=77)], 2.0,
                            model_sampling=model_sampling)
    out = denoiser(x, sigma)
    assert unet.batch_sizes == [4]
    positive = single_denoised(model_sampling, 0.2, x, sigma)
    negative = single_denoised(model_sampling, -0.4, x, sigma)
    torch.testing.assert_close(out, negative + 2.0 * (positive - negative))


def test_strength_weights_entries(model_sampling, noisy):
    x, sigma = noisy
    out = cfg_denoiser(RecordingUnet(), [conditioning(0.2), conditioning(0.6, strength=3.0)], [], 1.0,
                       model_sampling=model_sampling)(x, sigma)
    expected = (single_denoised(model_sampling, 0.2, x, sigma) + 3 * single_denoised(model_sampling, 0.6, x, sigma)) / 4
    torch.testing.assert_close(out, expected)


def test_timestep_range_switches_entries(model_sampling):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    positive = [conditioning(0.2, start_percent=0.0, end_percent=0.5),
                conditioning(0.6, start_percent=0.5, end_percent=1.0)]
    denoiser = cfg_denoiser(RecordingUnet(), positive, [], 1.0, model_sampling=model_sampling)
    switch = model_sampling.percent_to_sigma(0.5)
    early, late = torch.tensor([switch * 2]), torch.tensor([switch / 2])
    torch.testing.assert_close(denoiser(x, early), single_denoised(model_sampling, 0.2, x, early))
    torch.testing.assert_close(denoiser(x, late), single_denoised(model_sampling, 0.6, x, late))


def test_area_entry_only_affects_its_region(model_sampling):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([3.0])
    unet = RecordingUnet()
    positive = [conditioning(0.2), conditioning(0.6, area=(16, 16, 0, 0), strength=1.0)]
    out = cfg_denoiser(unet, positive, [conditioning(-0.4)], 1.0, model_sampling=model_sampling)(x, sigma)
    background = single_denoised(model_sampling, 0.2, x, sigma)
    area_only = single_denoised(model_sampling, 0.6, x, sigma)
    # outside the area only the global entry counts; deep inside both are averaged (no feathering there)
    torch.testing.assert_close(out[..., 16:, :], background[..., 16:, :])
    torch.testing.assert_close(out[..., :8, :8], (background[..., :8, :8] + area_only[..., :8, :8]) / 2)
    # the inner edge fades: the area's weight on its last row is 1/8
    row = 15
    expected_edge = (background[..., row, :8] + area_only[..., row, :8] / 8) / (1 + 1 / 8)
    torch.testing.assert_close(out[..., row, :8], expected_edge)
    assert unet.batch_sizes == [1, 1]  # different input shapes cannot share a call


def test_negative_gets_a_matching_area_entry(model_sampling):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 3
    unet = RecordingUnet()
    denoiser = cfg_denoiser(unet, [conditioning(0.6, area=("percentage", 0.5, 0.5, 0.5, 0.5))],
                            [conditioning(-0.4)], 5.0, model_sampling=model_sampling)
    out = denoiser(x, torch.tensor([3.0]))
    assert sorted(unet.batch_sizes) == [1, 2]  # full-size negative, then the area-sized positive + negative copy
    assert bool(torch.isfinite(out).all())


def test_mask_entry(model_sampling):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([3.0])
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0  # left half, at pixel-ish resolution: resized to the latent
    positive = [conditioning(0.2), conditioning(0.6, mask=mask, mask_strength=1.0)]
    out = cfg_denoiser(RecordingUnet(), positive, [], 1.0, model_sampling=model_sampling)(x, sigma)
    background = single_denoised(model_sampling, 0.2, x, sigma)
    masked = single_denoised(model_sampling, 0.6, x, sigma)
    torch.testing.assert_close(out[..., 9:], background[..., 9:])
    torch.testing.assert_close(out[..., :7], (background[..., :7] + masked[..., :7]) / 2)


def test_model_kwargs_are_batched(model_sampling, noisy):
    x, sigma = noisy
    unet = RecordingUnet()
    positive = [[torch.full((1, 77, 8), 0.2), {"model_kwargs": {"y": torch.full((1,), 0.5)}}]]
    negative = [[torch.full((1, 77, 8), 0.2), {"model_kwargs": {"y": torch.full((1,), -0.5)}}]]
    out = cfg_denoiser(unet, positive, negative, 2.0, model_sampling=model_sampling)(x, sigma)
    assert unet.batch_sizes == [4]
    s = sigma.view(-1, 1, 1, 1)
    x_in = x / (s ** 2 + 1) ** 0.5
    positive_denoised = x - (x_in * 0.2 + 0.5) * s
    negative_denoised = x - (x_in * 0.2 - 0.5) * s
    torch.testing.assert_close(out, negative_denoised + 2.0 * (positive_denoised - negative_denoised))


# --------------------------------------------------------------------------------------------------------
# Noise, sigmas and the KSampler entry points
# --------------------------------------------------------------------------------------------------------

COMFYUI_FACTS = json.loads((Path(__file__).parents[1] / "fixtures" / "comfyui_facts.json").read_text())


@pytest.mark.parametrize("fact", COMFYUI_FACTS["noise"],
                         ids=lambda f: f"seed{f['seed']}-{'x'.join(map(str, f['latent_shape']))}-{f['batch_index']}")
def test_prepare_noise_matches_values_observed_from_comfyui(fact):
    """Initial noise must be ComfyUI's to the bit, so a seed gives the same image (values observed by running
    ComfyUI's own prepare_noise: see the fixture's "source")."""
    noise = prepare_noise(torch.zeros(fact["latent_shape"]), fact["seed"], fact["batch_index"])
    assert noise.dtype == getattr(torch, fact["dtype"])
    assert list(noise.shape) == fact["noise_shape"]
    for item, expected in zip(noise, fact["first_values_per_item"], strict=True):
        assert torch.equal(item.flatten()[:len(expected)], torch.tensor(expected, dtype=torch.float32))
    assert noise.flatten()[-1].item() == fact["last_value"]
    assert noise.double().sum().item() == pytest.approx(fact["sum"], rel=1e-12, abs=1e-9)
    assert (noise.double() ** 2).sum().item() == pytest.approx(fact["sum_of_squares"], rel=1e-12)


def test_prepare_noise_mask_shapes():
    mask = torch.zeros(64, 64)
    mask[:32] = 1
    resized = prepare_noise_mask(mask, (2, 4, 8, 8))
    assert resized.shape == (2, 4, 8, 8)
    assert resized[:, :, :3].eq(1).all() and resized[:, :, 5:].eq(0).all()


def test_compute_sigmas_denoise_and_discarded_penultimate(model_sampling):
    full = calculate_sigmas(model_sampling, "normal", 20)
    assert torch.equal(compute_sigmas(model_sampling, "normal", "euler", 20), full)
    assert torch.equal(compute_sigmas(model_sampling, "normal", "euler", 10, denoise=0.5), full[-11:])
    assert torch.equal(compute_sigmas(model_sampling, "normal", "euler", 10, denoise=0.3),
                       calculate_sigmas(model_sampling, "normal", 33)[-11:])
    assert compute_sigmas(model_sampling, "normal", "euler", 10, denoise=0.0).numel() == 0
    longer = calculate_sigmas(model_sampling, "karras", 21)
    for name in ("dpm_2", "dpm_2_ancestral", "uni_pc"):
        sigmas = compute_sigmas(model_sampling, "karras", name, 20)
        assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))


def test_slice_sigmas():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    assert slice_sigmas(sigmas, last_step=3).tolist() == [8.0, 4.0, 2.0, 1.0]
    assert slice_sigmas(sigmas, last_step=3, force_full_denoise=True).tolist() == [8.0, 4.0, 2.0, 0.0]
    assert slice_sigmas(sigmas, start_step=2).tolist() == [2.0, 1.0, 0.5, 0.0]
    assert slice_sigmas(sigmas, start_step=2, last_step=4).tolist() == [2.0, 1.0, 0.5]
    assert slice_sigmas(sigmas, last_step=99, force_full_denoise=True).tolist() == sigmas.tolist()
    assert slice_sigmas(sigmas, start_step=5) is None
    assert sigmas.tolist() == [8.0, 4.0, 2.0, 1.0, 0.5, 0.0]  # not modified in place


def test_run_sampler_starts_from_comfyui_noise_scaling(model_sampling):
    sigmas = calculate_sigmas(model_sampling, "karras", 5)
    noise, latent = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    starts = []

    def denoiser(x, sigma):
        starts.append(x.clone())
        return torch.zeros_like(x)

    run_sampler(denoiser, model_sampling, "euler", noise, latent, sigmas)
    sigma_max = float(sigmas[0])
    torch.testing.assert_close(starts[0], noise * math.sqrt(1 + sigma_max ** 2) + latent)
    starts.clear()
    run_sampler(denoiser, model_sampling, "euler", noise, latent, sigmas[2:])
    torch.testing.assert_close(starts[0], noise * sigmas[2] + latent)


class TargetEpsUnet:
    """An eps model whose data is a single latent: eps = (x - target) / sigma (sigma read from the timestep)."""

    def __init__(self, model_sampling, target):
        self.model_sampling, self.target, self.calls = model_sampling, target, 0

    def __call__(self, x_in, timesteps, context=None):
        self.calls += 1
        sigma = self.model_sampling.sigma(timesteps).view(-1, 1, 1, 1)
        x = x_in * (sigma ** 2 + 1) ** 0.5
        shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (x - (self.target + shift)) / sigma


@pytest.fixture(scope="module")
def target():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))


POSITIVE = [[torch.zeros(1, 77, 8), {}]]
NEGATIVE = [[torch.ones(1, 77, 8), {}]]


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_ksampler_end_to_end(model_sampling, target, name):
    unet = TargetEpsUnet(model_sampling, target)
    reports = []
    out = ksampler(unet, model_sampling, torch.zeros(1, 4, 8, 8), seed=5, steps=12, cfg=1.0, sampler_name=name,
                   scheduler="karras", positive=POSITIVE, negative=NEGATIVE,
                   callback=lambda i, x, d, total: reports.append((i, total)))
    if name in RANGE_ONLY_SAMPLERS:  # stop at sigma_min = 0.029 with that much noise left
        torch.testing.assert_close(out, target, atol=0.15, rtol=0)
        assert reports and all(total == 12 for _, total in reports)
        return
    torch.testing.assert_close(out, target, atol=0.05, rtol=0)
    assert reports == [(i, 12) for i in range(12)]


def test_ksampler_cfg_extrapolates(model_sampling, target):
    unet = TargetEpsUnet(model_sampling, target)
    out = ksampler(unet, model_sampling, torch.zeros(1, 4, 8, 8), seed=5, steps=10, cfg=3.0, sampler_name="euler",
                   scheduler="normal", positive=POSITIVE, negative=NEGATIVE)
    # positive data = target, negative data = target + 1: guidance gives target + 1 + 3 * (0 - 1)
    torch.testing.assert_close(out, target - 2.0, atol=1e-3, rtol=0)


def test_ksampler_denoise_is_img2img(model_sampling, target):
    latent = torch.full((1, 4, 8, 8), 0.3)
    unet = TargetEpsUnet(model_sampling, target)
    seen = []
    out = ksampler(unet, model_sampling, latent, seed=1, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal",
                   positive=POSITIVE, negative=NEGATIVE, denoise=0.5, callback=lambda i, x, d, n: seen.append(n))
    assert seen == [4] * 4 and unet.calls == 4
    torch.testing.assert_close(out, target, atol=1e-3, rtol=0)
    unchanged = ksampler(unet, model_sampling, latent, seed=1, steps=4, cfg=1.0, sampler_name="euler",
                         scheduler="normal", positive=POSITIVE, negative=NEGATIVE, denoise=0.0)
    assert torch.equal(unchanged, latent)


def test_ksampler_advanced_split_equals_one_run(model_sampling, target):
    unet = TargetEpsUnet(model_sampling, target)
    common = dict(steps=10, cfg=2.0, sampler_name="euler", scheduler="karras", positive=POSITIVE, negative=NEGATIVE)
    latent = torch.zeros(1, 4, 8, 8)
    whole = ksampler_advanced(unet, model_sampling, latent, noise_seed=3, **common)
    first = ksampler_advanced(unet, model_sampling, latent, noise_seed=3, end_at_step=6,
                              return_with_leftover_noise=True, **common)
    assert (first - whole).abs().mean().item() > 0.1  # still noisy
    second = ksampler_advanced(unet, model_sampling, first, noise_seed=99, add_noise=False, start_at_step=6,
                               **common)
    torch.testing.assert_close(second, whole, atol=1e-5, rtol=1e-5)
    # ending early without leftover noise denoises fully at the last step
    finished = ksampler_advanced(unet, model_sampling, latent, noise_seed=3, end_at_step=6, **common)
    assert (finished - whole).abs().mean().item() < (first - whole).abs().mean().item() / 5
    # starting at or after the last step passes the latent through untouched
    assert torch.equal(ksampler_advanced(unet, model_sampling, first, noise_seed=3, start_at_step=10, **common), first)


def test_ksampler_noise_mask_keeps_the_unmasked_region(model_sampling, target):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 64)
    mask[..., 32:] = 1.0  # regenerate the right half only
    for name in ("euler", "ddim", "dpmpp_2m"):
        unet = TargetEpsUnet(model_sampling, target)
        out = ksampler(unet, model_sampling, latent, seed=4, steps=10, cfg=1.0, sampler_name=name, scheduler="karras",
                       positive=POSITIVE, negative=NEGATIVE, noise_mask=mask)
        torch.testing.assert_close(out[..., :4], latent[..., :4], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[..., 5:], target[..., 5:], atol=1e-2, rtol=0)


def test_ksampler_latent_space_mapping_and_batch_index(model_sampling, target):
    unet = TargetEpsUnet(model_sampling, target)
    mapped_in = []

    def latent_in(latent):
        mapped_in.append(latent)
        return latent * 2

    common = dict(steps=6, cfg=1.0, sampler_name="euler", scheduler="karras", positive=POSITIVE, negative=NEGATIVE)
    out = ksampler(unet, model_sampling, torch.zeros(2, 4, 8, 8), seed=1, process_latent_in=latent_in,
                   process_latent_out=lambda latent: latent / 4, **common)
    assert mapped_in == []  # an empty latent is not mapped in, as in ComfyUI
    torch.testing.assert_close(out, (target / 4).expand(2, -1, -1, -1), atol=1e-3, rtol=0)
    ksampler(unet, model_sampling, torch.ones(1, 4, 8, 8), seed=1, denoise=0.5, process_latent_in=latent_in, **common)
    assert len(mapped_in) == 1

    seen = []

    def first_x(i, x, denoised, total):
        if i == 0:
            seen.append(x)

    ksampler(unet, model_sampling, torch.zeros(2, 4, 8, 8), seed=1, batch_index=[1, 0], callback=first_x, **common)
    ksampler(unet, model_sampling, torch.zeros(2, 4, 8, 8), seed=1, callback=first_x, **common)
    torch.testing.assert_close(seen[0], seen[1].flip(0))


def test_ksampler_rejects_unknown_names(model_sampling, target):
    unet = TargetEpsUnet(model_sampling, target)
    with pytest.raises(ValueError, match="unknown sampler"):
        ksampler(unet, model_sampling, torch.zeros(1, 4, 8, 8), seed=1, steps=2, cfg=1.0, sampler_name="nope",
                 scheduler="karras", positive=POSITIVE, negative=NEGATIVE)
    with pytest.raises(ValueError, match="unknown scheduler"):
        ksampler(unet, model_sampling, torch.zeros(1, 4, 8, 8), seed=1, steps=2, cfg=1.0, sampler_name="euler",
                 scheduler="nope", positive=POSITIVE, negative=NEGATIVE)
    assert unet.calls == 0


def test_module_exports():
    assert samplers.SAMPLERS["ddim"] is samplers.sample_euler
    assert set(STOCHASTIC_SAMPLERS) <= set(SAMPLER_NAMES)
