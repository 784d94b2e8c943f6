"""Model patch nodes (nodes/model_patches.py) on a tiny random SD1.5 model: each node's effect checked numerically
against hand-written formulas, diffusers' zero-SNR schedule or scipy, and a patched workflow through the server."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_serverless.models import model_patch_functions as functions
from comfy_serverless.nodes import model_patches as nodes
from comfy_serverless.sampling.denoising import CFGDenoiser, ModelSampling
from conftest import server_context


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path_factory.mktemp("patch-nodes") / "tiny-sd15.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=4)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(force_fp32=True):
        yield load_checkpoint(str(checkpoint))


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


class ScaleUnet:
    """eps = x_in * mean(context): a fake UNet whose predictions are easy to compute by hand."""

    def __call__(self, x_in, timesteps, context=None, transformer_options=None, **kwargs):
        return x_in * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def cond(value, width=8):
    return [[torch.full((1, 77, width), float(value)), {}]]


@pytest.fixture()
def noisy():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3, torch.full((1,), 2.5)


def fake_denoiser(options, cfg=7.0):
    return CFGDenoiser(ScaleUnet(), cond(0.5), cond(-0.25), cfg, model_sampling=ModelSampling(), model_options=options)


def real_denoiser(model, cfg=5.0, options=None, positive=None):
    width = model.network().config.context_dim
    generator = torch.Generator().manual_seed(7)
    pos = positive or [[torch.randn(1, 77, width, generator=generator), {}]]
    neg = [[torch.randn(1, 77, width, generator=generator), {}]]
    return CFGDenoiser(model.unet_apply, pos, neg, cfg, model_sampling=ModelSampling(),
                      model_options=model.model_options if options is None else options)


# -- ModelSamplingDiscrete -------------------------------------------------------------------------------------

def test_zsnr_table_matches_diffusers_rescaled_betas(model):
    from diffusers import DDPMScheduler

    patched = nodes.ModelSamplingDiscrete().patch(model, "eps", True)[0]
    sampling = patched.model_sampling
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              rescale_betas_zero_snr=True)
    alphas = scheduler.alphas_cumprod.double()
    expected = ((1 - alphas) / alphas).sqrt()
    torch.testing.assert_close(sampling.sigmas[:-1].double(), expected[:-1], rtol=1e-4, atol=1e-6)
    assert math.isfinite(float(sampling.sigma_max)) and float(sampling.sigma_max) > 4000  # the terminal step
    assert model.model_sampling is not sampling  # the input model keeps its own schedule


def test_v_prediction_on_an_eps_model_changes_the_denoised_output(model, noisy):
    x, sigma = noisy
    patched = nodes.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    s = 2.5
    expected = x / (s * s + 1) - out * s / math.sqrt(s * s + 1)  # x0 = alpha * x_vp - sigma_vp * v
    torch.testing.assert_close(patched.model_sampling.calculate_denoised(sigma, out, x), expected)
    plain = real_denoiser(model)(x, sigma)
    v_model = real_denoiser(patched)
    v_model.model_sampling = patched.model_sampling
    assert not torch.allclose(v_model(x, sigma), plain)


def test_lcm_uses_every_twentieth_timestep_and_consistency_boundary(model, noisy):
    x, _ = noisy
    sampling = nodes.ModelSamplingDiscrete().patch(model, "lcm", False)[0].model_sampling
    full = ModelSampling()
    assert sampling.sigmas.shape == (50,)
    torch.testing.assert_close(sampling.sigmas, full.sigmas[19::20])
    sigma = sampling.sigmas[[10]]
    assert int(sampling.timestep(sigma)) == 10 * 20 + 19
    torch.testing.assert_close(sampling.sigma(torch.tensor(219.0)), sigma[0])
    out = torch.randn_like(x)
    t = 219 * 10.0
    c_skip, c_out = 0.25 / (t * t + 0.25), t / math.sqrt(t * t + 0.25)
    expected = c_out * (x - out * sigma) + c_skip * x
    torch.testing.assert_close(sampling.calculate_denoised(sigma, out, x), expected)


def test_x0_and_img_to_img_parameterisations(model, noisy):
    x, sigma = noisy
    out = torch.randn_like(x)
    x0 = nodes.ModelSamplingDiscrete().patch(model, "x0", False)[0].model_sampling
    img = nodes.ModelSamplingDiscrete().patch(model, "img_to_img", False)[0].model_sampling
    assert torch.equal(x0.calculate_denoised(sigma, out, x), out)
    torch.testing.assert_close(x0.calculate_input(sigma, x), x / math.sqrt(2.5 ** 2 + 1))
    assert torch.equal(img.calculate_input(sigma, x), x)


def test_unknown_sampling_is_refused(model):
    with pytest.raises(ValueError, match="unknown sampling"):
        nodes.ModelSamplingDiscrete().patch(model, "flow", False)


# -- guidance functions -------------------------------------------------------------------------------------

def test_rescale_cfg_zero_is_plain_guidance_and_one_matches_the_formula(model, noisy):
    x, sigma = noisy
    plain = fake_denoiser({})(x, sigma)
    zero = nodes.RescaleCFG().patch(model, 0.0)[0]
    torch.testing.assert_close(fake_denoiser(zero.model_options)(x, sigma), plain)

    positive = CFGDenoiser(ScaleUnet(), cond(0.5), [], 1.0)(x, sigma)
    negative = CFGDenoiser(ScaleUnet(), cond(-0.25), [], 1.0)(x, sigma)
    s = 2.5
    alpha, sigma_vp = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)

    def v_of(x0):
        return alpha * (x - x0) / s - sigma_vp * x0

    v_pos, v_neg = v_of(positive), v_of(negative)
    v_cfg = v_neg + 7.0 * (v_pos - v_neg)
    v_final = v_cfg * v_pos.std() / v_cfg.std()
    expected = alpha * x / math.sqrt(1 + s * s) - sigma_vp * v_final
    one = nodes.RescaleCFG().patch(model, 1.0)[0]
    torch.testing.assert_close(fake_denoiser(one.model_options)(x, sigma), expected, rtol=1e-4, atol=1e-5)


def test_epsilon_scaling_cfg_zero_star_and_cfg_norm_by_hand(model, noisy):
    x, sigma = noisy
    plain = fake_denoiser({})(x, sigma)
    positive = CFGDenoiser(ScaleUnet(), cond(0.5), [], 1.0)(x, sigma)
    negative = CFGDenoiser(ScaleUnet(), cond(-0.25), [], 1.0)(x, sigma)

    one = nodes.EpsilonScaling().patch(model, 1.0)[0]
    torch.testing.assert_close(fake_denoiser(one.model_options)(x, sigma), plain)
    scaled = nodes.EpsilonScaling().patch(model, 1.25)[0]
    torch.testing.assert_close(fake_denoiser(scaled.model_options)(x, sigma), x - (x - plain) / 1.25)

    star = nodes.CFGZeroStar().patch(model)[0]
    eps_pos, eps_neg = (x - positive).flatten(), (x - negative).flatten()
    alpha = float(eps_pos @ eps_neg / (eps_neg @ eps_neg))
    expected = plain + negative * (alpha - 1) + 7.0 * negative * (1 - alpha)
    torch.testing.assert_close(fake_denoiser(star.model_options)(x, sigma), expected, rtol=1e-4, atol=1e-5)

    norm = nodes.CFGNorm().patch(model, 1.0)[0]
    cap = (positive.norm(dim=1, keepdim=True) / plain.norm(dim=1, keepdim=True)).clamp(max=1.0)
    torch.testing.assert_close(fake_denoiser(norm.model_options)(x, sigma), plain * cap, rtol=1e-4, atol=1e-5)
    assert nodes.CFGNorm.RETURN_NAMES == ("patched_model",)


# -- UNet patches -----------------------------------------------------------------------------------------

def test_freeu_with_unit_factors_changes_nothing(model, noisy):
    x, sigma = noisy
    plain = real_denoiser(model)(x, sigma)
    for node in (nodes.FreeU(), nodes.FreeU_V2()):
        same = node.patch(model, 1.0, 1.0, 1.0, 1.0)[0]
        torch.testing.assert_close(real_denoiser(same)(x, sigma), plain, rtol=1e-4, atol=1e-4)
        default = node.patch(model, *type(node).DEFAULTS)[0]
        assert not torch.allclose(real_denoiser(default)(x, sigma), plain, atol=1e-3)


def test_fourier_filter_scales_the_lowest_frequencies():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 5.0
    torch.testing.assert_close(functions.fourier_filter(x, 1, 1.0), x, rtol=1e-5, atol=1e-5)
    no_dc = functions.fourier_filter(x, 1, 0.0)
    assert no_dc.mean(dim=(-2, -1)).abs().max() < 1e-4


def test_pag_scale_zero_is_plain_and_otherwise_pushes_from_the_perturbed_prediction(model, noisy):
    x, sigma = noisy
    plain = real_denoiser(model)(x, sigma)
    zero = nodes.PerturbedAttentionGuidance().patch(model, 0.0)[0]
    torch.testing.assert_close(real_denoiser(zero)(x, sigma), plain)

    pag = real_denoiser(nodes.PerturbedAttentionGuidance().patch(model, 3.0)[0])
    positive = CFGDenoiser(model.unet_apply, pag.positive, [], 1.0)(x, sigma)
    identity = {"transformer_options": {"patches_replace": {"attn1": {("middle", 0): lambda q, k, v, e: v}}}}
    perturbed = CFGDenoiser(model.unet_apply, pag.positive, [], 1.0, model_options=identity)(x, sigma)
    torch.testing.assert_close(pag(x, sigma), plain + 3.0 * (positive - perturbed), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(perturbed, positive)


def test_sag_scale_zero_is_plain_and_blur_matches_scipy(model, noisy):
    from scipy.ndimage import gaussian_filter

    x, sigma = noisy
    plain = real_denoiser(model)(x, sigma)
    zero = nodes.SelfAttentionGuidance().patch(model, 0.0, 2.0)[0]
    torch.testing.assert_close(real_denoiser(zero)(x, sigma), plain, rtol=1e-4, atol=1e-4)
    guided = real_denoiser(nodes.SelfAttentionGuidance().patch(model, 1.0, 2.0)[0])(x, sigma)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-4)

    image = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = functions.gaussian_blur(image, 9, 1.5).numpy()
    theirs = gaussian_filter(image.numpy(), sigma=(0, 0, 1.5, 1.5), truncate=4 / 1.5, mode="mirror")
    assert abs(ours - theirs).max() < 1e-6  # the kernel is computed in float32, as in ComfyUI


def test_sag_blur_map_blurs_only_where_attention_concentrates():
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    attention = torch.zeros(2, 16, 16)  # 2 heads, a 4x4 grid: every query looks at token 5 only
    attention[:, :, 5] = 1.0
    mapped = functions.blur_map(x0, attention, 2.0)
    blurred = functions.gaussian_blur(x0, 9, 2.0)
    torch.testing.assert_close(mapped[..., 2:4, 2:4], blurred[..., 2:4, 2:4])  # token 5 = row 1, column 1
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = False
    assert torch.equal(mapped[..., mask], x0[..., mask])


def test_downscale_patch_works_inside_its_sigma_range_only(model, noisy):
    x, sigma = noisy
    plain = real_denoiser(model)(x, sigma)
    node = nodes.PatchModelAddDownscale()
    active = node.patch(model, 1, 2.0, 0.0, 1.0, True, "bicubic", "bicubic")[0]
    shapes = []
    active.set_model_output_block_patch(lambda h, skip, o: (shapes.append(h.shape[-1]), (h, skip))[1])
    out = real_denoiser(active)(x, sigma)
    assert out.shape == plain.shape and not torch.allclose(out, plain, atol=1e-4)
    assert 2 in shapes  # after block 1 the 8x8 features were halved: a deeper block ran at a lower resolution
    sampling = model.model_sampling
    late = node.patch(model, 1, 2.0, 0.9, 1.0, False, "bislerp", "area")[0]  # sigma 2.5 is before 90 %
    assert sampling.percent_to_sigma(0.9) < 2.5
    torch.testing.assert_close(real_denoiser(late)(x, sigma), plain)
    with pytest.raises(ValueError, match="unknown method"):
        node.patch(model, 1, 2.0, 0.0, 1.0, True, "lanczos", "bicubic")


def test_hypertile_tiles_and_untiles_queries(model, noisy):
    tile, untile = functions.hypertile_patches(1, 1, 0, False)
    n = torch.randn(2, 64, 16)
    options = {"original_shape": [2, 4, 8, 8]}
    tiled, context, value = tile(n, n, n, options)
    assert tiled.shape == (8, 16, 16) and context is n and value is n
    torch.testing.assert_close(tiled[1].reshape(4, 4, 16), n[0].reshape(8, 8, 16)[:4, 4:])  # top-right tile
    assert torch.equal(untile(tiled, options), n)
    assert tile(n[:, :16], n, n, options)[0].shape == (2, 16, 16)  # not a tiled level

    x, sigma = noisy
    plain = real_denoiser(model)(x, sigma)
    big_tiles = nodes.HyperTile().patch(model, 2048, 1, 0, False)[0]
    torch.testing.assert_close(real_denoiser(big_tiles)(x, sigma), plain)
    small_tiles = real_denoiser(nodes.HyperTile().patch(model, 1, 1, 0, False)[0])(x, sigma)
    assert torch.isfinite(small_tiles).all() and not torch.allclose(small_tiles, plain, atol=1e-4)


def test_attention_multiply_scales_the_projection_weights(model, loaded):
    from comfy_serverless.models import clip_patcher_api

    weights = model.model_state_dict()
    patched = nodes.UNetSelfAttentionMultiply().patch(model, 0.5, 1.0, 2.0, 1.0)[0].model_state_dict()
    key = next(k for k in weights if k.endswith("attn1.to_q.weight"))
    torch.testing.assert_close(patched[key], weights[key] * 0.5)
    torch.testing.assert_close(patched[key.replace("to_q", "to_v")], weights[key.replace("to_q", "to_v")] * 2.0)
    cross = key.replace("attn1", "attn2")
    torch.testing.assert_close(patched[cross], weights[cross])
    cross_patched = nodes.UNetCrossAttentionMultiply().patch(model, 1.0, 1.0, 1.0, 3.0)[0].model_state_dict()
    out_key = cross.replace("to_q", "to_out.0")
    torch.testing.assert_close(cross_patched[out_key], weights[out_key] * 3.0)

    clip = loaded[1]
    before = clip_patcher_api.model_state_dict(clip)
    scaled = clip_patcher_api.model_state_dict(nodes.CLIPAttentionMultiply().patch(clip, 2.0, 1.0, 1.0, 1.0)[0])
    q_key = next(k for k in before if k.endswith("self_attn.q_proj.bias"))
    torch.testing.assert_close(scaled[q_key], before[q_key] * 2.0)
    k_key = q_key.replace("q_proj", "k_proj")
    torch.testing.assert_close(scaled[k_key], before[k_key])
    torch.testing.assert_close(clip_patcher_api.model_state_dict(clip)[q_key], before[q_key])  # input untouched


# -- through the server -----------------------------------------------------------------------------------------

def test_patch_nodes_through_the_server(start_server, tmp_path, checkpoint):
    from PIL import Image

    base = tmp_path / "patches"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).hardlink_to(checkpoint)
    srv = start_server("--force-fp32", base=base)

    def txt2img(prefix: str, patches: list[tuple[str, dict]]):
        prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}}}
        model = ["4", 0]
        for index, (node, inputs) in enumerate(patches):
            prompt[f"p{index}"] = {"class_type": node, "inputs": {"model": model, **inputs}}
            model = [f"p{index}", 0]
        prompt.update({
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        })
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        pixels = Image.open(srv.base / "output" / f"{prefix}_00001_.png").tobytes()
        return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).int()

    plain = txt2img("plain", [])
    neutral = txt2img("neutral", [("FreeU_V2", {"b1": 1.0, "b2": 1.0, "s1": 1.0, "s2": 1.0}),
                                  ("PerturbedAttentionGuidance", {"scale": 0.0}),
                                  ("RescaleCFG", {"multiplier": 0.0}),
                                  ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": False})])
    assert (neutral - plain).abs().max() <= 1
    patched = txt2img("patched", [("FreeU", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}),
                                  ("PerturbedAttentionGuidance", {"scale": 3.0}),
                                  ("RescaleCFG", {"multiplier": 0.7}),
                                  ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True})])
    assert (patched - plain).abs().float().mean() > 2


def test_perp_neg_by_hand(model, noisy):
    x, sigma = noisy
    positive = CFGDenoiser(ScaleUnet(), cond(0.5), [], 1.0)(x, sigma)
    negative = CFGDenoiser(ScaleUnet(), cond(-0.25), [], 1.0)(x, sigma)
    empty = CFGDenoiser(ScaleUnet(), cond(0.1), [], 1.0)(x, sigma)
    pos, neg = positive - empty, negative - empty
    perpendicular = neg - (neg * pos).sum() / (pos * pos).sum() * pos
    patched = nodes.PerpNeg().patch(model, cond(0.1), 0.5)[0]
    expected = empty + 7.0 * (pos - 0.5 * perpendicular)
    torch.testing.assert_close(fake_denoiser(patched.model_options)(x, sigma), expected, rtol=1e-4, atol=1e-5)
