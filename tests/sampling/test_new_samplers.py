"""The samplers added for ComfyUI 0.3.64's full list, checked against analytic answers and hand-computed steps.

The data distribution is N(MU, S²) per element (see test_samplers.py): its exact denoiser is known, and so is
the probability-flow ODE's solution, so an ODE solver's error and its order of convergence can be measured.
"""

import math

import pytest
import torch

from comfy_serverless.sampling import samplers
from comfy_serverless.sampling.denoising import ModelSampling
from comfy_serverless.sampling.sampler_common import BrownianTree, BrownianTreeNoiseSampler, UncondCapture
from comfy_serverless.sampling.samplers import SAMPLER_ENTRIES, make_noise_sampler, sample
from comfy_serverless.sampling.samplers_dpm_solver import PIDStepSizeController
from comfy_serverless.sampling.samplers_multistep import deis_coefficients
from comfy_serverless.sampling.samplers_sde import stochastic_adams_coefficients, tau_interval
from comfy_serverless.sampling.schedules import calculate_sigmas

MU, S = 1.5, 0.5


def exact_denoiser(x, sigma, model_options=None):
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    denoised = (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)
    for hook in (model_options or {}).get("sampler_post_cfg_function", ()):
        denoised = hook({"denoised": denoised, "uncond_denoised": denoised, "cond_denoised": denoised})
    return denoised


def ode_solution(x_start, sigma_start, sigma_end):
    return MU + (x_start - MU) * math.sqrt(S * S + sigma_end ** 2) / math.sqrt(S * S + sigma_start ** 2)


@pytest.fixture(scope="module")
def model_sampling():
    return ModelSampling()


@pytest.fixture(scope="module")
def z():
    return torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def ode_error(model_sampling, z, name, steps, **options):
    sigmas = calculate_sigmas(model_sampling, "exponential", steps).double()
    x = MU + z * math.sqrt(S * S + float(sigmas[0]) ** 2)
    out = sample(name, exact_denoiser, x, sigmas, seed=1, **options)
    end = float(sigmas[-2]) if name in samplers.RANGE_ONLY_SAMPLERS else 0.0
    return (out - ode_solution(x, float(sigmas[0]), end)).abs().max().item()


def ode_error_to_level(model_sampling, z, name, steps, **options):
    """Error of ``steps`` steps on an exponential schedule that stops at sigma_min (no final jump to 0, whose
    x_0 error does not shrink with more steps and would hide the rate)."""
    sigmas = calculate_sigmas(model_sampling, "exponential", steps + 1).double()[:-1]
    x = MU + z * math.sqrt(S * S + float(sigmas[0]) ** 2)
    out = sample(name, exact_denoiser, x, sigmas, seed=1, **options)
    return (out - ode_solution(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item()


ODE_OPTIONS = {
    "seeds_2": {"eta": 0.0}, "seeds_3": {"eta": 0.0},
    "er_sde": {"s_noise": 0.0, "noise_scaler": lambda x: x},  # the ODE variant (SamplerER_SDE "ODE")
    "sa_solver": {"tau_func": tau_interval(0, 0, eta=0.0)},
}


@pytest.mark.parametrize("name", ["ipndm", "ipndm_v", "deis", "res_multistep", "seeds_2", "seeds_3", "er_sde",
                                  "sa_solver", "dpm_fast"])
def test_ode_solvers_are_higher_order(model_sampling, z, name):
    """Doubling the steps (16 -> 32) cuts the error more than fourfold-ish (second order or better: rate > 2.5,
    Euler's is 2), and the error is far below Euler's."""
    options = ODE_OPTIONS.get(name, {})
    coarse = ode_error_to_level(model_sampling, z, name, 16, **options)
    fine = ode_error_to_level(model_sampling, z, name, 32, **options)
    assert coarse / fine > 2.5, (coarse, fine)
    assert fine < ode_error_to_level(model_sampling, z, "euler", 32) / 8, fine


def test_euler_like_samplers_are_first_order(model_sampling, z):
    for name in ("euler", "heunpp2"):
        coarse = ode_error_to_level(model_sampling, z, name, 16)
        fine = ode_error_to_level(model_sampling, z, name, 32)
        assert 1.6 < coarse / fine < 2.5, (name, coarse, fine)


def test_gradient_estimation_steps_by_hand():
    """Second step: x + d * dt + (gamma - 1) * (d - d_previous) * dt."""
    target = torch.full((1, 1, 1, 1), 0.5)
    sigmas = torch.tensor([4.0, 2.0, 1.0])
    seen = []
    sample("gradient_estimation", lambda x, s: target.expand_as(x), torch.full((1, 1, 1, 1), 6.0), sigmas[:2],
           callback=lambda i, x, d, n: seen.append(x))
    first = seen[-1]
    torch.testing.assert_close(first, torch.full_like(first, 6.0 + (6.0 - 0.5) / 4.0 * -2.0))
    out = sample("gradient_estimation", lambda x, s: target.expand_as(x), torch.full((1, 1, 1, 1), 6.0), sigmas)
    d0, d1 = (6.0 - 0.5) / 4.0, (float(first) - 0.5) / 2.0
    expected = float(first) + d1 * -1.0 + (2.0 - 1.0) * (d1 - d0) * -1.0
    torch.testing.assert_close(out, torch.full_like(out, expected))


def test_dpm_adaptive_error_follows_its_tolerance(model_sampling, z):
    loose = ode_error(model_sampling, z, "dpm_adaptive", 10, rtol=0.1, atol=0.01)
    tight = ode_error(model_sampling, z, "dpm_adaptive", 10, rtol=0.001, atol=0.0001)
    assert tight < loose / 5, (tight, loose)


def test_dpm_fast_spends_exactly_the_step_count_in_model_calls(model_sampling):
    for steps in (1, 2, 3, 7, 9):
        calls = []
        sigmas = calculate_sigmas(model_sampling, "karras", steps)

        def counting(x, sigma):
            calls.append(float(sigma[0]))
            return exact_denoiser(x, sigma)

        sample("dpm_fast", counting, torch.zeros(1, 1, 2, 2), sigmas)
        assert len(calls) == steps
        assert calls[0] == pytest.approx(float(sigmas[0]), rel=1e-5)


def test_pid_controller_grows_the_step_after_small_errors_and_rejects_large_ones():
    controller = PIDStepSizeController(0.1, 0.0, 1.0, 0.0, order=3)
    assert controller.propose_step(0.01) and controller.h > 0.1
    h = controller.h
    assert not controller.propose_step(100.0) and controller.h < h


def test_deis_weights_integrate_polynomials_in_vp_time_exactly():
    sigmas = torch.tensor([14.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    coefficients = deis_coefficients(sigmas, 3)
    assert coefficients[0] == []
    for i in (1, 2, 4):
        # a constant slope integrates to the step in sigma
        assert sum(coefficients[i]) == pytest.approx(float(sigmas[i + 1] - sigmas[i]), rel=1e-6)
    assert len(coefficients[1]) == 2 and len(coefficients[2]) == 3


def test_stochastic_adams_coefficients_reduce_to_ddim_and_integrate_constants():
    lam_s, lam_t = 0.0, 0.7
    # order 1, no noise: the DDIM step weight 1 - sigma_t / sigma_s = 1 - e^-h
    assert stochastic_adams_coefficients([lam_s], lam_s, lam_t, 0.0) == pytest.approx([-math.expm1(-0.7)])
    for tau in (0.0, 1.0):
        weights = stochastic_adams_coefficients([-0.6, -0.3, 0.0], lam_s, lam_t, tau)
        assert sum(weights) == pytest.approx(-math.expm1(-(1 + tau ** 2) * 0.7))
    simple = stochastic_adams_coefficients([-0.3, 0.0], lam_s, lam_t, 0.0, simple_order_2=True)
    assert sum(simple) == pytest.approx(-math.expm1(-0.7))


# --------------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------------

def test_brownian_tree_is_consistent_and_has_brownian_increments():
    like = torch.zeros(20000)
    tree = BrownianTree(like, 0.0, 10.0, seed=3)
    a, b, c = tree.value(1.0), tree.value(2.5), tree.value(7.0)
    assert torch.equal(tree.value(2.5), b)  # queried again, same value
    assert torch.allclose(tree(1.0, 7.0), (b - a) + (c - b))
    increments = [tree(0.0, 1.0), tree(1.0, 2.5), tree(2.5, 7.0)]
    for increment, width in zip(increments, (1.0, 1.5, 4.5)):
        assert increment.var().item() == pytest.approx(width, rel=0.05)
    correlation = torch.corrcoef(torch.stack([increments[0], increments[1]]))[0, 1].item()
    assert abs(correlation) < 0.03
    again = BrownianTree(like, 0.0, 10.0, seed=3)
    assert torch.equal(again.value(7.0), c) and not torch.equal(BrownianTree(like, 0.0, 10.0, seed=4).value(7.0), c)


def test_brownian_noise_sampler_gives_unit_noise_for_any_step():
    x = torch.zeros(1, 4, 64, 64)
    sampler = BrownianTreeNoiseSampler.for_sigmas(x, torch.tensor([14.6, 3.0, 0.5, 0.0]), seed=5)
    for s, t in ((14.6, 3.0), (3.0, 0.5), (0.9, 0.8)):
        noise = sampler(torch.tensor(s), torch.tensor(t))
        assert noise.shape == x.shape and noise.std().item() == pytest.approx(1.0, rel=0.05)


def test_each_sampler_gets_comfyuis_kind_of_noise():
    brownian = {name for name, entry in SAMPLER_ENTRIES.items() if entry.noise == "brownian"}
    assert brownian == {"dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
                        "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"}
    x, sigmas = torch.zeros(1, 1, 4, 4), torch.tensor([2.0, 1.0, 0.0])
    assert isinstance(make_noise_sampler("brownian", x, sigmas, seed=1), BrownianTreeNoiseSampler)
    default = make_noise_sampler("default", x, sigmas, seed=1)
    assert torch.equal(default(2.0, 1.0), torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))


def test_gpu_names_are_the_same_algorithms_on_cpu(model_sampling):
    sigmas = calculate_sigmas(model_sampling, "karras", 6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        assert torch.equal(sample(name, exact_denoiser, x, sigmas, seed=4),
                           sample(name + "_gpu", exact_denoiser, x, sigmas, seed=4))
    assert not torch.equal(sample("dpmpp_2m_sde", exact_denoiser, x, sigmas, seed=4),
                           sample("dpmpp_2m_sde_heun", exact_denoiser, x, sigmas, seed=4))


@pytest.mark.parametrize("name", ["res_multistep_ancestral", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                                  "sa_solver_pece", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                                  "dpmpp_sde_gpu"])
def test_stochastic_samplers_keep_the_data_distribution(model_sampling, name):
    z = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    sigmas = calculate_sigmas(model_sampling, "karras", 40)
    out = sample(name, exact_denoiser, MU + z * math.sqrt(S * S + float(sigmas[0]) ** 2), sigmas, seed=7)
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(S, abs=0.05)


# --------------------------------------------------------------------------------------------------------
# CFG++: the step uses the unguided prediction, the guided one is kept
# --------------------------------------------------------------------------------------------------------

def guided_pair(cond_shift=0.3, uncond_shift=-0.2):
    """A fake guider: cond and uncond predictions a constant apart, reported through the post-CFG hook."""
    calls = []

    def denoise(x, sigma, model_options=None):
        cond, uncond = torch.full_like(x, cond_shift), torch.full_like(x, uncond_shift)
        guided = uncond + 2.0 * (cond - uncond)
        calls.append(model_options)
        for hook in (model_options or {}).get("sampler_post_cfg_function", ()):
            guided = hook({"denoised": guided, "cond_denoised": cond, "uncond_denoised": uncond})
        return guided

    return denoise, calls


def test_euler_cfg_pp_step_by_hand():
    denoise, calls = guided_pair()
    x, sigmas = torch.full((1, 1, 2, 2), 3.0), torch.tensor([2.0, 1.0])
    out = sample("euler_cfg_pp", denoise, x, sigmas)
    guided, uncond = -0.2 + 2.0 * 0.5, -0.2
    torch.testing.assert_close(out, torch.full_like(x, guided + 1.0 * (3.0 - uncond) / 2.0))
    assert calls[0]["disable_cfg1_optimization"] is True
    alternative = samplers.SamplerEntry(samplers.cfgpp.sample_euler_cfg_pp_alternative, cfg_pp=True)
    out = samplers.run_entry(alternative, denoise, x, sigmas)
    torch.testing.assert_close(out, torch.full_like(x, 3.0 + (3.0 - 2 * guided + uncond) / 2.0 * (1.0 - 2.0)))


def test_cfg_pp_samplers_equal_their_plain_versions_without_guidance(model_sampling):
    sigmas = calculate_sigmas(model_sampling, "karras", 8)
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    for plain, cfg_pp in (("euler", "euler_cfg_pp"), ("dpmpp_2m", "dpmpp_2m_cfg_pp"),
                          ("euler_ancestral", "euler_ancestral_cfg_pp"), ("res_multistep", "res_multistep_cfg_pp"),
                          ("gradient_estimation", "gradient_estimation_cfg_pp")):
        torch.testing.assert_close(sample(cfg_pp, exact_denoiser, x, sigmas, seed=2),
                                   sample(plain, exact_denoiser, x, sigmas, seed=2), atol=1e-4, rtol=1e-4)


def test_cfg_pp_needs_a_guider_that_reports_the_negative():
    with pytest.raises(RuntimeError, match="negative prediction"):
        UncondCapture(lambda x, sigma, model_options=None: x)(torch.zeros(1), torch.ones(1))


def test_lcm_upscale_grows_the_latent_in_steps():
    from comfy_serverless.sampling.sampler_object import KSamplerObject
    from comfy_serverless.sampling.samplers_multistep import sample_lcm_upscale

    sizes = []
    entry = samplers.SamplerEntry(sample_lcm_upscale, noise="global")
    sampler = KSamplerObject(entry, {"total_upscale": 2.0, "upscale_steps": 2, "upscale_method": "bilinear"})
    model_sampling = ModelSampling()
    sigmas = calculate_sigmas(model_sampling, "karras", 4)
    out = sampler.run(lambda x, s: (sizes.append(tuple(x.shape[-2:])), torch.zeros_like(x))[1], model_sampling,
                      torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), sigmas, seed=1)
    assert sizes == [(8, 8), (12, 12), (16, 16), (16, 16)] and out.shape == (1, 4, 16, 16)
