"""Custom sampling nodes: schedulers and sigma tools by hand, guiders and SamplerCustom(Advanced) against KSampler
on a tiny random SD1.5 checkpoint, and the SamplerCustomAdvanced / SDXL-turbo workflows over the real server."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfy_serverless.nodes import custom_sampling as cs
from comfy_serverless.nodes import custom_sampling_samplers as css
from comfy_serverless.nodes import custom_sampling_schedulers as sch
from comfy_serverless.nodes.sampling_nodes import SAMPLER_NAMES, KSampler, KSamplerAdvanced
from comfy_serverless.sampling import samplers
from comfy_serverless.sampling.schedules import SCHEDULER_NAMES
from conftest import Server, server_context


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    folder = tmp_path_factory.mktemp("custom-sampling-models")
    files = {arch: folder / "models" / "checkpoints" / f"tiny-{arch}.safetensors" for arch in ("sd15", "sdxl")}
    for arch, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_test_checkpoint(arch, "tiny", path, seed=1)
    return folder, files


@pytest.fixture(scope="module")
def sd15(model_files):
    from comfy_serverless.models.loading import load_checkpoint
    from comfy_serverless.nodes.conditioning import CLIPTextEncode

    with server_context(force_fp32=True):
        model, clip, _vae = load_checkpoint(str(model_files[1]["sd15"]))[:3]
        positive = CLIPTextEncode().encode(clip, "a red fox")[0]
        other = CLIPTextEncode().encode(clip, "a blue bird")[0]
        negative = CLIPTextEncode().encode(clip, "blurry")[0]
        yield model, positive, other, negative


def empty_latent(size=16, batch=1):
    return {"samples": torch.zeros(batch, 4, size, size)}


def selected(name):
    return css.KSamplerSelect().get_sampler(name)[0]


def basic_sigmas(model, steps, scheduler="normal", denoise=1.0):
    return sch.BasicScheduler().get_sigmas(model, scheduler, steps, denoise)[0]


# --------------------------------------------------------------------------------------------------------
# Definitions and name lists
# --------------------------------------------------------------------------------------------------------

def test_node_lists_agree_with_the_sampling_modules():
    assert SAMPLER_NAMES == samplers.SAMPLER_NAMES and len(SAMPLER_NAMES) == 42
    assert css.KSamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0] == SAMPLER_NAMES
    assert sch.BasicScheduler.INPUT_TYPES()["required"]["scheduler"][0] == SCHEDULER_NAMES
    assert cs.SamplerCustom.RETURN_NAMES == ("output", "denoised_output")


def test_comfy_module_names_for_packs():
    """In a pack-loading process (comfy_modules installed): comfy.samplers / comfy_extras.nodes_custom_sampler."""
    code = """
from comfy_serverless.catalog import comfy_modules
comfy_modules.install()
import comfy.samplers
from comfy_extras import nodes_custom_sampler
from comfy_serverless.nodes import custom_sampling
assert len(comfy.samplers.KSampler.SAMPLERS) == 42
assert "uni_pc_bh2" not in comfy.samplers.KSAMPLER_NAMES and "dpm_adaptive" in comfy.samplers.KSAMPLER_NAMES
assert nodes_custom_sampler.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"] is custom_sampling.SamplerCustomAdvanced
assert nodes_custom_sampler.Noise_RandomNoise(5).seed == 5
sampler = comfy.samplers.ksampler("euler_ancestral", {"eta": 0.5})
assert isinstance(sampler, comfy.samplers.KSAMPLER) and sampler.extra_options == {"eta": 0.5}
assert comfy.samplers.sampler_object("ddim").inpaint_options == {"random": True}
from comfy_serverless.sampling.guiders import Guider as OurGuider
assert callable(comfy.samplers.calc_cond_batch) and issubclass(comfy.samplers.CFGGuider, OurGuider)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------
# Schedulers and sigma tools
# --------------------------------------------------------------------------------------------------------

def test_range_schedulers_by_hand():
    (karras,) = sch.KarrasScheduler().get_sigmas(4, 10.0, 0.1, 7.0)
    ramp = [(10.0 ** (1 / 7) + k / 3 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7 for k in range(4)] + [0.0]
    torch.testing.assert_close(karras, torch.tensor(ramp))
    (poly,) = sch.PolyexponentialScheduler().get_sigmas(5, 10.0, 0.1, 1.0)
    torch.testing.assert_close(poly, sch.ExponentialScheduler().get_sigmas(5, 10.0, 0.1)[0])
    (poly2,) = sch.PolyexponentialScheduler().get_sigmas(3, 10.0, 0.1, 2.0)
    torch.testing.assert_close(poly2[1], torch.tensor(math.exp(0.25 * math.log(100) + math.log(0.1))))
    (vp,) = sch.VPScheduler().get_sigmas(2, 19.9, 0.1, 0.001)
    expected = [math.sqrt(math.expm1(19.9 / 2 + 0.1)), math.sqrt(math.expm1(19.9 * 1e-6 / 2 + 1e-4)), 0.0]
    torch.testing.assert_close(vp, torch.tensor(expected))
    (laplace,) = sch.LaplaceScheduler().get_sigmas(9, 14.6, 0.03, 0.0, 0.5)
    assert len(laplace) == 9 and float(laplace[0]) == pytest.approx(14.6) and float(laplace[-1]) == pytest.approx(0.03)
    assert float(laplace[4]) == pytest.approx(math.exp(-0.5 * 0 * math.log(1 + 1e-5)))  # median: e^mu
    assert bool((laplace[1:] <= laplace[:-1]).all())
    with pytest.raises(ValueError, match="above 0"):
        sch.ExponentialScheduler().get_sigmas(5, 10.0, 0.0)


def test_model_schedulers(sd15):
    model = sd15[0]
    ms = model.model_sampling
    full = basic_sigmas(model, 10, "karras")
    half = basic_sigmas(model, 5, "karras", 0.5)
    torch.testing.assert_close(half, full[-6:])
    assert basic_sigmas(model, 5, "karras", 0.0).shape == (0,)
    (turbo,) = sch.SDTurboScheduler().get_sigmas(model, 1, 1.0)
    torch.testing.assert_close(turbo, torch.tensor([float(ms.sigma(torch.tensor(999))), 0.0]))
    (turbo2,) = sch.SDTurboScheduler().get_sigmas(model, 2, 0.5)
    torch.testing.assert_close(turbo2, torch.stack([ms.sigma(torch.tensor(499)), ms.sigma(torch.tensor(399)),
                                                    torch.tensor(0.0)]).float())
    (beta,) = sch.BetaSamplingScheduler().get_sigmas(model, 8, 0.6, 0.6)
    assert len(beta) == 9 and float(beta[0]) == pytest.approx(float(ms.sigma_max)) and float(beta[-1]) == 0
    (value,) = sch.SamplingPercentToSigma().get_sigma(model, 0.5, False)
    assert value == pytest.approx(ms.percent_to_sigma(0.5))
    assert sch.SamplingPercentToSigma().get_sigma(model, 0.0, False)[0] > 1e8
    assert sch.SamplingPercentToSigma().get_sigma(model, 0.0, True)[0] == pytest.approx(float(ms.sigma_max))
    assert sch.SamplingPercentToSigma().get_sigma(model, 1.0, True)[0] == pytest.approx(float(ms.sigma_min))


def test_align_your_steps():
    (ten,) = sch.AlignYourStepsScheduler().get_sigmas("SD1", 10, 1.0)
    assert len(ten) == 11 and float(ten[0]) == pytest.approx(14.6146412293) and float(ten[-1]) == 0.0
    (twenty,) = sch.AlignYourStepsScheduler().get_sigmas("SDXL", 20, 1.0)
    table = np.array([14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                      0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582])
    reference = np.exp(np.interp(np.linspace(0, 1, 21), np.linspace(0, 1, 11), np.log(table[::-1])))[::-1]
    np.testing.assert_allclose(twenty[:-1].numpy(), reference[:-1], rtol=1e-5)
    (partial,) = sch.AlignYourStepsScheduler().get_sigmas("SD1", 10, 0.5)
    torch.testing.assert_close(partial[:-1], ten[-6:-1])
    with pytest.raises(ValueError, match="unknown model_type"):
        sch.AlignYourStepsScheduler().get_sigmas("SD3", 10, 1.0)


def test_sigma_tools_by_hand():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    high, low = sch.SplitSigmas().get_sigmas(sigmas, 2)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = sch.SplitSigmasDenoise().get_sigmas(sigmas, 0.5)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]  # the last 2 of 4 steps
    assert sch.FlipSigmas().get_sigmas(sigmas)[0].tolist() == pytest.approx([0.0001, 1.0, 2.0, 5.0, 10.0])
    assert sch.SetFirstSigma().set_first_sigma(sigmas, 20.0)[0].tolist() == [20.0, 5.0, 2.0, 1.0, 0.0]
    assert sigmas[0] == 10.0  # not modified in place
    (extended,) = sch.ExtendIntermediateSigmas().extend(sigmas, 2, -1.0, 2.0, "linear")
    assert extended.tolist() == [10.0, 7.5, 5.0, 3.5, 2.0, 1.5, 1.0, 0.0]
    (cosine,) = sch.ExtendIntermediateSigmas().extend(torch.tensor([4.0, 0.0]), 2, -1.0, 0.0, "cosine")
    assert cosine.tolist() == pytest.approx([4.0, 4.0 - 4.0 * math.sin(math.pi / 4), 0.0])
    with pytest.raises(ValueError, match="empty"):
        sch.SetFirstSigma().set_first_sigma(torch.zeros(0), 1.0)


# --------------------------------------------------------------------------------------------------------
# Samplers, guiders, SamplerCustom(Advanced) on a tiny SD1.5 model
# --------------------------------------------------------------------------------------------------------

def test_sampler_nodes_build_the_sampler_comfyui_would():
    assert css.SamplerDPMPP_2M_SDE().get_sampler("heun", 0.5, 1.0, "cpu")[0].name == "dpmpp_2m_sde"
    gpu = css.SamplerDPMPP_2M_SDE().get_sampler("heun", 0.5, 1.0, "gpu")[0]
    assert gpu.name == "dpmpp_2m_sde_gpu" and gpu.extra_options == {"eta": 0.5, "s_noise": 1.0, "solver_type": "heun"}
    assert css.SamplerLMS().get_sampler(3)[0].extra_options == {"order": 3}
    assert css.SamplerEulerCFGpp().get_sampler("regular")[0].name == "euler_cfg_pp"
    ode = css.SamplerER_SDE().get_sampler("ODE", 2, 1.0, 1.0)[0].extra_options
    assert ode["s_noise"] == 0.0 and ode["noise_scaler"](torch.tensor(3.0)) == 3.0
    assert css.SamplerER_SDE().get_sampler("ER-SDE", 3, 1.0, 1.0)[0].extra_options["noise_scaler"] is None
    with pytest.raises(ValueError, match="unknown sampler"):
        css.KSamplerSelect().get_sampler("euler_turbo")
    with pytest.raises(ValueError, match="solver_type"):
        css.SamplerER_SDE().get_sampler("SDE", 3, 1.0, 1.0)
    with pytest.raises(ValueError, match="upscale_method"):
        css.SamplerLCMUpscale().get_sampler(1.5, -1, "lanczos")


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m_sde", "uni_pc"])
def test_ksampler_equals_sampler_custom_with_ksamplerselect_and_basicscheduler(sd15, name):
    model, positive, _, negative = sd15
    latent = empty_latent()
    (expected,) = KSampler().sample(model, 3, 3, 7.0, name, "normal", positive, negative, latent)
    sigmas = basic_sigmas(model, 3 + (name == "uni_pc"))
    if name == "uni_pc":  # KSampler drops the next-to-last level for uni_pc; SamplerCustom takes sigmas as given
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    output, _ = cs.SamplerCustom().sample(model, True, 3, 7.0, positive, negative, selected(name), sigmas, latent)
    assert torch.equal(output["samples"], expected["samples"])
    noise = cs.RandomNoise().get_noise(3)[0]
    guider = cs.CFGGuider().get_guider(model, positive, negative, 7.0)[0]
    advanced, _ = cs.SamplerCustomAdvanced().sample(noise, guider, selected(name), sigmas, latent)
    assert torch.equal(advanced["samples"], expected["samples"])


def test_split_sampling_and_denoised_output(sd15):
    model, positive, _, negative = sd15
    latent = empty_latent()
    sigmas = basic_sigmas(model, 4)
    full, full_denoised = cs.SamplerCustom().sample(model, True, 9, 5.0, positive, negative, selected("euler"),
                                                    sigmas, latent)
    # Euler's last step lands on the x_0 estimate: the two outputs agree at the end of a full run.
    torch.testing.assert_close(full_denoised["samples"], full["samples"], atol=1e-5, rtol=1e-5)
    high, low = sch.SplitSigmas().get_sigmas(sigmas, 2)
    first, first_denoised = cs.SamplerCustom().sample(model, True, 9, 5.0, positive, negative, selected("euler"),
                                                      high, latent)
    assert not torch.allclose(first["samples"], first_denoised["samples"], atol=1e-3)
    second, _ = cs.SamplerCustom().sample(model, False, 9, 5.0, positive, negative, selected("euler"), low, first)
    torch.testing.assert_close(second["samples"], full["samples"], atol=1e-4, rtol=1e-4)
    # The same split with KSamplerAdvanced's leftover noise.
    (part,) = KSamplerAdvanced().sample(model, "enable", 9, 4, 5.0, "euler", "normal", positive, negative, latent,
                                        0, 2, "enable")
    torch.testing.assert_close(part["samples"], first["samples"], atol=1e-5, rtol=1e-5)


def test_guiders(sd15):
    model, positive, other, negative = sd15
    latent = empty_latent()
    sigmas = basic_sigmas(model, 3)
    noise = cs.RandomNoise().get_noise(4)[0]
    sampler = selected("dpmpp_2m")

    def run(guider):
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]

    basic = run(cs.BasicGuider().get_guider(model, positive)[0])
    assert torch.equal(basic, run(cs.CFGGuider().get_guider(model, positive, negative, 1.0)[0]))
    cfg = run(cs.CFGGuider().get_guider(model, positive, negative, 6.0)[0])
    # With cond1 == cond2 both styles reduce to plain CFG between cond and negative at cfg_cond2_negative.
    for style in ("regular", "nested"):
        dual = run(cs.DualCFGGuider().get_guider(model, positive, positive, negative, 3.0, 6.0, style)[0])
        torch.testing.assert_close(dual, cfg, atol=1e-4, rtol=1e-4)
    regular = run(cs.DualCFGGuider().get_guider(model, positive, other, negative, 3.0, 6.0, "regular")[0])
    nested = run(cs.DualCFGGuider().get_guider(model, positive, other, negative, 3.0, 6.0, "nested")[0])
    assert not torch.allclose(regular, nested, atol=1e-3) and not torch.allclose(regular, cfg, atol=1e-3)


def test_add_noise_and_disable_noise(sd15):
    model = sd15[0]
    latent = empty_latent()
    noise = cs.RandomNoise().get_noise(11)[0]
    sigmas = torch.tensor([6.0, 1.0, 0.0])
    (noisy,) = cs.AddNoise().add_noise(model, noise, sigmas, latent)
    expected = noise.generate_noise(latent) * 6.0 / model.latent_scale
    torch.testing.assert_close(noisy["samples"], expected)
    (unchanged,) = cs.AddNoise().add_noise(model, noise, torch.zeros(0), latent)
    assert unchanged is latent
    (empty,) = cs.DisableNoise().get_noise()
    assert empty.seed == 0 and torch.equal(empty.generate_noise(latent), torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="SIGMAS"):
        cs.SamplerCustom().sample(model, True, 0, 1.0, [], [], selected("euler"), [1.0, 0.0], latent)


def test_sampler_custom_with_cfg_pp_and_a_model_patch(sd15):
    model, positive, _, negative = sd15
    latent = empty_latent()
    sigmas = basic_sigmas(model, 3)
    out, _ = cs.SamplerCustom().sample(model, True, 2, 1.0, positive, negative, selected("euler_cfg_pp"), sigmas,
                                       latent)
    assert torch.isfinite(out["samples"]).all()
    seen = []
    patched = model.clone()
    patched.model_options["sampler_post_cfg_function"] = [lambda args: seen.append(1) or args["denoised"]]
    cs.SamplerCustom().sample(patched, True, 2, 3.0, positive, negative, selected("euler"), sigmas, latent)
    assert len(seen) == 3  # the MODEL's own patches run inside the custom sampler too


# --------------------------------------------------------------------------------------------------------
# Through the real server
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_files):
    srv = Server(model_files[0], packs=())
    yield srv
    srv.stop()


def encode(node, text):
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [node, 1]}}


def test_sampler_custom_advanced_workflow_over_http(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": encode("1", "a lighthouse"),
        "3": encode("1", "fog"),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "6": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 5.0}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m_sde"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 3,
                                                          "denoise": 1.0}},
        "9": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["5", 0], "guider": ["6", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["4", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 1], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "advanced"}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["11"]["images"][0]["filename"] == "advanced_00001_.png"
    # A sampler name ComfyUI does not have is refused at validation.
    prompt["7"]["inputs"]["sampler_name"] = "euler_turbo"
    refused = server.post("/prompt", {"prompt": prompt})
    assert refused.status_code == 400
    assert refused.json()["node_errors"]["7"]["errors"][0]["type"] == "value_not_in_list"


def test_sdxl_turbo_template_over_http(server):
    """ComfyUI's SDXL-turbo example: SamplerCustom + KSamplerSelect(euler_ancestral) + SDTurboScheduler, cfg 1."""
    prompt = {
        "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "6": encode("20", "a cinematic photo of a fox"),
        "7": encode("20", "text, watermark"),
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "14": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        "22": {"class_type": "SDTurboScheduler", "inputs": {"model": ["20", 0], "steps": 1, "denoise": 1.0}},
        "13": {"class_type": "SamplerCustom", "inputs": {
            "model": ["20", 0], "add_noise": True, "noise_seed": 0, "cfg": 1.0, "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["14", 0], "sigmas": ["22", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["20", 2]}},
        "27": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "turbo"}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["27"]["images"][0]["filename"] == "turbo_00001_.png"


def test_bad_sigmas_give_a_clear_error_over_http(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SD3", "steps": 4, "denoise": 1.0}},
        "3": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 0, "cfg": 1.0, "positive": ["4", 0],
            "negative": ["4", 0], "sampler": ["5", 0], "sigmas": ["2", 0], "latent_image": ["6", 0]}},
        "4": encode("1", "x"),
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    error = next(data for name, data in entry["status"]["messages"] if name == "execution_error")
    assert error["node_type"] == "AlignYourStepsScheduler" and "unknown model_type" in error["exception_message"]
