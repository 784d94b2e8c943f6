"""Noise schedule, sigma/timestep conversion and ComfyUI scheduler placement."""

import math

import diffusers
import pytest
import torch

from comfy_serverless.sampling import schedules
from comfy_serverless.sampling.schedules import (
    SCHEDULER_NAMES,
    DiscreteSchedule,
    beta_ppf,
    calculate_sigmas,
    regularized_incomplete_beta,
)

# diffusers' EulerDiscreteScheduler trips a numpy 2 deprecation warning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def table():
    return DiscreteSchedule()


def _diffusers_euler(**options):
    return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            **options)


def test_alphas_cumprod_and_sigmas_match_diffusers(table):
    reference = _diffusers_euler()
    torch.testing.assert_close(table.alphas_cumprod.float(), reference.alphas_cumprod, rtol=1e-5, atol=1e-6)
    reference_sigmas = ((1 - reference.alphas_cumprod) / reference.alphas_cumprod) ** 0.5
    torch.testing.assert_close(table.sigmas, reference_sigmas, rtol=1e-4, atol=0)
    assert table.sigma_min.item() == pytest.approx(0.0291675, rel=1e-4)
    assert table.sigma_max.item() == pytest.approx(14.614642, rel=1e-5)


def test_sigma_timestep_round_trip_and_log_interpolation(table):
    for t in (0, 1, 250, 500, 998, 999):
        assert int(table.timestep(table.sigma(torch.tensor(float(t))))) == t
    midway = table.sigma(torch.tensor(10.5))
    expected = math.exp(0.5 * (math.log(float(table.sigmas[10])) + math.log(float(table.sigmas[11]))))
    assert midway.item() == pytest.approx(expected, rel=1e-6)
    # nearest entry in log-sigma, vectorised over a batch
    batch = torch.stack([table.sigmas[3] * 1.0001, table.sigmas[700]])
    assert table.timestep(batch).tolist() == [3, 700]
    assert table.sigma(torch.tensor(-5.0)).item() == pytest.approx(table.sigmas[0].item(), rel=1e-6)


def test_percent_to_sigma(table):
    assert table.percent_to_sigma(0.0) > 1e8
    assert table.percent_to_sigma(1.0) == 0.0
    assert table.percent_to_sigma(0.5) == pytest.approx(table.sigma(torch.tensor(499.5)).item())
    assert table.percent_to_sigma(0.2) > table.percent_to_sigma(0.8)


def test_scheduler_names_in_comfyui_order():
    assert SCHEDULER_NAMES == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                               "normal", "linear_quadratic", "kl_optimal"]


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_every_scheduler_decreases_to_zero(table, name, steps):
    sigmas = calculate_sigmas(table, name, steps)
    assert sigmas.dtype == torch.float32
    assert sigmas[-1].item() == 0.0
    assert bool(torch.isfinite(sigmas).all())
    assert bool((sigmas[:-1] > sigmas[1:]).all()), sigmas
    assert sigmas[0].item() <= table.sigma_max.item() * (1 + 1e-5)
    if name != "ddim_uniform" or 1000 % steps == 0:  # ComfyUI's ddim_uniform rounds the stride down
        assert len(sigmas) == steps + 1


def test_unknown_scheduler_and_bad_steps_rejected(table):
    with pytest.raises(ValueError, match="unknown scheduler"):
        calculate_sigmas(table, "uniform", 10)
    with pytest.raises(ValueError):
        calculate_sigmas(table, "normal", 0)


def test_normal_matches_diffusers_linspace(table):
    # With 10 steps diffusers' linspace timesteps (999, 888, ...) are integers, so interpolation cannot differ.
    reference = _diffusers_euler(timestep_spacing="linspace")
    reference.set_timesteps(10)
    torch.testing.assert_close(calculate_sigmas(table, "normal", 10), reference.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_karras_and_exponential_match_diffusers(table):
    for options, name in (({"use_karras_sigmas": True}, "karras"), ({"use_exponential_sigmas": True}, "exponential")):
        reference = _diffusers_euler(**options)
        reference.set_timesteps(20)
        torch.testing.assert_close(calculate_sigmas(table, name, 20), reference.sigmas.float(), rtol=1e-5,
                                   atol=1e-6)


def test_karras_ramp_is_uniform_in_sigma_to_one_over_rho(table):
    sigmas = calculate_sigmas(table, "karras", 12)[:-1].double()
    spacing = (sigmas ** (1 / 7)).diff()
    torch.testing.assert_close(spacing, spacing[:1].expand_as(spacing), rtol=1e-4, atol=0)
    assert sigmas[-1].item() == pytest.approx(table.sigma_min.item(), rel=1e-5)


def test_sgm_uniform_drops_the_last_of_steps_plus_one_timesteps(table):
    sigmas = calculate_sigmas(table, "sgm_uniform", 4)
    expected = [table.sigma(torch.tensor(t)).item() for t in (999.0, 749.25, 499.5, 249.75)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=1e-6, atol=0)


def test_simple_picks_every_nth_table_entry_from_the_end(table):
    sigmas = calculate_sigmas(table, "simple", 8)
    expected = [table.sigmas[-(1 + int(i * 1000 / 8))].item() for i in range(8)] + [0.0]
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-7)
    assert sigmas[0].item() == table.sigma_max.item()


def test_ddim_uniform_uses_entries_one_plus_multiples_of_the_stride(table):
    sigmas = calculate_sigmas(table, "ddim_uniform", 20)
    expected = [table.sigmas[i].item() for i in range(951, 0, -50)] + [0.0]
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-7)
    assert len(calculate_sigmas(table, "ddim_uniform", 30)) == 32  # stride 33 fits 31 entries in 1..999


def test_linear_quadratic_shape(table):
    steps, threshold = 10, 0.025
    sigmas = calculate_sigmas(table, "linear_quadratic", steps)
    sigma_max = table.sigma_max.item()
    progress = [1 - s / sigma_max for s in sigmas.tolist()]
    for i in range(5):  # linear part
        assert progress[i] == pytest.approx(i * threshold / 5, abs=1e-6)
    assert progress[5] == pytest.approx(threshold, abs=1e-6)  # continuous at the switch
    assert progress[-1] == 1.0
    second_differences = [progress[i + 1] - 2 * progress[i] + progress[i - 1] for i in range(6, steps)]
    assert max(second_differences) - min(second_differences) < 1e-5  # constant curvature in the quadratic part


def test_kl_optimal_is_uniform_in_arctan(table):
    sigmas = calculate_sigmas(table, "kl_optimal", 9)[:-1].double()
    angles = sigmas.atan()
    spacing = angles.diff()
    torch.testing.assert_close(spacing, spacing[:1].expand_as(spacing), rtol=1e-4, atol=0)
    assert sigmas[0].item() == pytest.approx(table.sigma_max.item(), rel=1e-5)
    assert sigmas[-1].item() == pytest.approx(table.sigma_min.item(), rel=1e-5)


def test_regularized_incomplete_beta_closed_forms():
    for x in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999):
        assert regularized_incomplete_beta(x, 1.0, 1.0) == pytest.approx(x, rel=1e-12)
        assert regularized_incomplete_beta(x, 3.0, 1.0) == pytest.approx(x ** 3, rel=1e-12)
        # I_x(2, 2) = 3x² - 2x³
        assert regularized_incomplete_beta(x, 2.0, 2.0) == pytest.approx(3 * x * x - 2 * x ** 3, rel=1e-11)
        # arcsine distribution
        assert regularized_incomplete_beta(x, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)),
                                                                         rel=1e-11)
    assert regularized_incomplete_beta(0.0, 0.6, 0.6) == 0.0
    assert regularized_incomplete_beta(1.0, 0.6, 0.6) == 1.0


def test_incomplete_beta_matches_numerical_integration_at_alpha_beta_0_6():
    # Substituting u = x^a turns x^(a-1) dx into du/a, leaving the smooth integrand (1 - u^(1/a))^(b-1) / a.
    a = b = 0.6
    norm = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    u = torch.linspace(0, 0.3 ** a, 200001, dtype=torch.float64)
    integrand = (1 - u ** (1 / a)) ** (b - 1) / (a * norm)
    numeric = torch.trapezoid(integrand, u).item()
    assert regularized_incomplete_beta(0.3, a, b) == pytest.approx(numeric, rel=1e-7)


def test_beta_ppf_inverts_the_cdf_and_is_symmetric():
    for q in (1e-9, 0.001, 0.05, 0.25, 0.5, 0.8, 0.999, 1 - 1e-9):
        x = beta_ppf(q, 0.6, 0.6)
        assert regularized_incomplete_beta(x, 0.6, 0.6) == pytest.approx(q, rel=1e-10, abs=1e-14)
        assert beta_ppf(1 - q, 0.6, 0.6) == pytest.approx(1 - x, abs=1e-10)
    assert beta_ppf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-14)
    assert beta_ppf(0.0, 0.6, 0.6) == 0.0 and beta_ppf(1.0, 0.6, 0.6) == 1.0


def test_beta_scheduler_uses_rounded_quantile_timesteps(table):
    steps = 10
    sigmas = calculate_sigmas(table, "beta", steps)
    indices = [round(beta_ppf(1 - i / steps, 0.6, 0.6) * 999) for i in range(steps)]
    assert indices[0] == 999
    assert sigmas.tolist() == pytest.approx([table.sigmas[i].item() for i in indices] + [0.0], rel=1e-7)
    # Beta(0.6, 0.6) crowds steps at both ends: the middle gap in timestep is the largest
    gaps = [indices[i] - indices[i + 1] for i in range(steps - 1)]
    assert gaps[len(gaps) // 2] == max(gaps)
    # ComfyUI merges steps that round to the same timestep, so very many steps come out shorter
    assert len(calculate_sigmas(table, "beta", 500)) < 501


def test_schedulers_are_deterministic(table):
    for name in SCHEDULER_NAMES:
        assert torch.equal(calculate_sigmas(table, name, 13), calculate_sigmas(table, name, 13))


def test_custom_betas():
    betas = torch.full((10,), 0.1, dtype=torch.float64)
    small = DiscreteSchedule(betas=betas)
    assert small.num_timesteps == 10
    expected = ((1 - 0.9 ** 10) / 0.9 ** 10) ** 0.5
    assert small.sigma_max.item() == pytest.approx(expected, rel=1e-6)
    assert len(calculate_sigmas(small, "simple", 5)) == 6
    assert schedules.scaled_linear_betas(0.00085, 0.012, 1000)[0].item() == pytest.approx(0.00085)
