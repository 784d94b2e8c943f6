"""Extra guidance nodes (nodes/guidance_extra.py): APG, TCFG, FreSca, Mahiro and the Perp-Neg guider checked by
hand (and against numpy) on a fake UNet, ToMe's merge/unmerge on crafted tokens, neutral settings reproducing the
plain result on a tiny random SD1.5 model, bad inputs, and a workflow through the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_serverless.models import guidance_functions as gf
from comfy_serverless.nodes import custom_sampling as cs
from comfy_serverless.nodes import custom_sampling_samplers as css
from comfy_serverless.nodes import custom_sampling_schedulers as sch
from comfy_serverless.nodes import guidance_extra as nodes
from comfy_serverless.nodes.model_patches import PerpNeg
from comfy_serverless.sampling.denoising import CFGDenoiser, ModelSampling
from conftest import server_context


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path_factory.mktemp("guidance-extra") / "tiny-sd15.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=5)
    return path


@pytest.fixture(scope="module")
def sd15(checkpoint):
    from comfy_serverless.models.loading import load_checkpoint
    from comfy_serverless.nodes.conditioning import CLIPTextEncode

    with server_context(force_fp32=True):
        model, clip = load_checkpoint(str(checkpoint))[:2]
        texts = {name: CLIPTextEncode().encode(clip, text)[0]
                 for name, text in (("positive", "a red fox"), ("negative", "blurry"), ("empty", ""))}
        yield model, texts


class ScaleUnet:
    """eps = x_in * mean(context) (+ a fixed pattern for variety): predictions easy to compute by hand."""

    def __init__(self):
        self.pattern = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def __call__(self, x_in, timesteps, context=None, transformer_options=None, **kwargs):
        level = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return x_in * level + self.pattern * level ** 2


def cond(value, width=8):
    return [[torch.full((1, 77, width), float(value)), {}]]


POSITIVE, NEGATIVE, EMPTY = 0.5, -0.25, 0.1


@pytest.fixture()
def noisy():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3, torch.full((1,), 2.5)


def fake_denoiser(options=None, cfg=7.0, unet=None):
    return CFGDenoiser(unet or ScaleUnet(), cond(POSITIVE), cond(NEGATIVE), cfg, model_sampling=ModelSampling(),
                       model_options=options or {})


def predictions(x, sigma, unet):
    """x_0 of the positive, negative and empty prompts alone."""
    return [CFGDenoiser(unet, cond(value), [], 1.0)(x, sigma) for value in (POSITIVE, NEGATIVE, EMPTY)]


# -- APG ---------------------------------------------------------------------------------------------------------

def apg_by_hand(cond_pred, uncond_pred, cfg, eta, threshold, average=None, momentum=0.0):
    guidance = cond_pred - uncond_pred
    if momentum:
        guidance = guidance if average is None else momentum * average + guidance
    average = guidance
    if threshold > 0:
        guidance = guidance * min(1.0, threshold / float(guidance.flatten().norm()))
    unit = cond_pred / cond_pred.flatten().norm()
    parallel = (guidance * unit).sum() * unit
    modified = guidance - parallel + eta * parallel
    new_cond = uncond_pred + modified + (cond_pred - uncond_pred) / cfg
    return uncond_pred + cfg * (new_cond - uncond_pred), average


def test_apg_without_projection_or_threshold_is_cfg_plus_one():
    x, sigma = torch.randn(1, 4, 8, 8) * 3, torch.full((1,), 2.5)
    unet = ScaleUnet()
    patched = {"sampler_pre_cfg_function": [gf.apg_pre_cfg_function(1.0, 0.0, 0.0)]}
    expected = fake_denoiser(cfg=8.0, unet=unet)(x, sigma)
    torch.testing.assert_close(fake_denoiser(patched, cfg=7.0, unet=unet)(x, sigma), expected, rtol=1e-5, atol=1e-5)


def test_apg_by_hand_with_momentum_threshold_and_reset(noisy):
    x, sigma = noisy
    unet = ScaleUnet()
    pos, neg, _ = predictions(x, sigma, unet)
    function = gf.apg_pre_cfg_function(0.3, 2.0, 0.5)
    denoiser = fake_denoiser({"sampler_pre_cfg_function": [function]}, cfg=6.0, unet=unet)
    first, average = apg_by_hand(pos, neg, 6.0, 0.3, 2.0, momentum=0.5)
    torch.testing.assert_close(denoiser(x, sigma), first, rtol=1e-4, atol=1e-5)
    lower = torch.full((1,), 1.5)
    pos2, neg2, _ = predictions(x, lower, unet)
    second, _ = apg_by_hand(pos2, neg2, 6.0, 0.3, 2.0, average, momentum=0.5)
    torch.testing.assert_close(denoiser(x, lower), second, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(second, apg_by_hand(pos2, neg2, 6.0, 0.3, 2.0, momentum=0.5)[0])
    # A higher sigma starts a new run: the running average is dropped.
    torch.testing.assert_close(denoiser(x, sigma), first, rtol=1e-4, atol=1e-5)


def test_apg_node_clones_and_checks_ranges(sd15):
    model = sd15[0]
    (patched,) = nodes.APG().patch(model, 1.0, 5.0, 0.0)
    assert len(patched.model_options["sampler_pre_cfg_function"]) == 1
    assert "sampler_pre_cfg_function" not in model.model_options
    with pytest.raises(ValueError, match="momentum must be between -5.0 and 1.0"):
        nodes.APG().patch(model, 1.0, 5.0, 1.5)
    with pytest.raises(ValueError, match="norm_threshold"):
        nodes.APG().patch(model, 1.0, -1.0, 0.0)


# -- TCFG --------------------------------------------------------------------------------------------------------

def test_tangential_damping_against_numpy_svd():
    generator = torch.Generator().manual_seed(5)
    cond_score, uncond_score = torch.randn(2, 4, 6, 6, generator=generator), torch.randn(2, 4, 6, 6,
                                                                                          generator=generator)
    damped = gf.tangential_damping(cond_score, uncond_score)
    for item in range(2):
        u, c = uncond_score[item].flatten().double().numpy(), cond_score[item].flatten().double().numpy()
        _, _, vh = np.linalg.svd(np.stack([u, c]), full_matrices=False)
        expected = (u @ vh[0]) * vh[0]  # the sign of the singular vector cancels
        np.testing.assert_allclose(damped[item].flatten().numpy(), expected, rtol=1e-4, atol=1e-5)
    # An unconditional score along the conditional one has no tangential part: it is kept.
    torch.testing.assert_close(gf.tangential_damping(cond_score, -0.5 * cond_score), -0.5 * cond_score,
                               rtol=1e-4, atol=1e-5)


def test_tcfg_through_the_denoiser(noisy, sd15):
    x, sigma = noisy
    unet = ScaleUnet()
    pos, neg, _ = predictions(x, sigma, unet)
    (patched,) = nodes.TCFG().patch(sd15[0])
    options = {"sampler_pre_cfg_function": patched.model_options["sampler_pre_cfg_function"]}
    uncond_td = x - gf.tangential_damping(x - pos, x - neg)
    expected = uncond_td + 7.0 * (pos - uncond_td)
    torch.testing.assert_close(fake_denoiser(options, unet=unet)(x, sigma), expected, rtol=1e-4, atol=1e-4)
    # At cfg 1 there is no negative prediction to damp: the plain result.
    plain = fake_denoiser(cfg=1.0, unet=unet)(x, sigma)
    assert torch.equal(fake_denoiser(options, cfg=1.0, unet=unet)(x, sigma), plain)


# -- FreSca ------------------------------------------------------------------------------------------------------

def test_frequency_scale_against_numpy_fft():
    x = torch.randn(1, 2, 12, 10, generator=torch.Generator().manual_seed(8))
    out = gf.frequency_scale(x, 0.5, 2.0, 3)
    spectrum = np.fft.fftshift(np.fft.fft2(x.double().numpy()), axes=(-2, -1))
    mask = np.full(spectrum.shape, 2.0)
    mask[..., 6 - 3:6 + 3, 5 - 3:5 + 3] = 0.5
    expected = np.fft.ifft2(np.fft.ifftshift(spectrum * mask, axes=(-2, -1))).real
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gf.frequency_scale(x, 1.0, 1.0, 3), x, rtol=1e-5, atol=1e-5)
    # Scaling everything alike is a plain multiplication.
    torch.testing.assert_close(gf.frequency_scale(x, 3.0, 3.0, 2), 3.0 * x, rtol=1e-5, atol=1e-5)


def test_fresca_scales_the_guidance_only(noisy, sd15):
    x, sigma = noisy
    unet = ScaleUnet()
    pos, neg, _ = predictions(x, sigma, unet)
    (patched,) = nodes.FreSca().patch(sd15[0], 1.0, 1.5, 2)
    options = {"sampler_pre_cfg_function": patched.model_options["sampler_pre_cfg_function"]}
    expected = neg + 7.0 * gf.frequency_scale(pos - neg, 1.0, 1.5, 2)
    torch.testing.assert_close(fake_denoiser(options, unet=unet)(x, sigma), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="freq_cutoff"):
        nodes.FreSca().patch(sd15[0], 1.0, 1.5, 0)


# -- Mahiro ------------------------------------------------------------------------------------------------------

def test_mahiro_by_hand(noisy, sd15):
    x, sigma = noisy
    unet = ScaleUnet()
    pos, neg, _ = predictions(x, sigma, unet)
    cfg = 5.0
    guided = neg + cfg * (pos - neg)
    leap, uncond_leap = pos * cfg, neg * cfg
    a = uncond_leap.abs().sqrt() * uncond_leap.sign()
    merged = (leap + guided) / 2
    b = merged.abs().sqrt() * merged.sign()
    cosine = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))  # over channels, per pixel
    weight = 2 * (float(cosine.mean()) + 1)
    expected = (weight * guided + (4 - weight) * leap) / 4
    (patched,) = nodes.Mahiro().patch(sd15[0])
    options = {"sampler_post_cfg_function": patched.model_options["sampler_post_cfg_function"]}
    torch.testing.assert_close(fake_denoiser(options, cfg=cfg, unet=unet)(x, sigma), expected, rtol=1e-4, atol=1e-4)


# -- ToMe --------------------------------------------------------------------------------------------------------

def cell_tokens():
    """A 4x4 grid of 2-d tokens: every 2x2 cell points one way (0, 45, 90, 135 degrees), with varied lengths."""
    angles = torch.tensor([[0.0, 45.0], [90.0, 135.0]]).deg2rad()
    grid = torch.zeros(4, 4, 2)
    lengths = torch.arange(1.0, 17.0).view(4, 4)
    for y in range(4):
        for x in range(4):
            angle = angles[y // 2, x // 2]
            grid[y, x] = lengths[y, x] * torch.stack([angle.cos(), angle.sin()])
    return grid.view(1, 16, 2)


def test_tome_merges_each_cell_into_its_mean():
    tokens = cell_tokens()
    merge, unmerge = gf.bipartite_merge(tokens, 4, 4, 12, torch.Generator().manual_seed(0))
    merged = merge(tokens)
    assert merged.shape == (1, 4, 2)
    cell_means = tokens.view(2, 2, 2, 2, 2).permute(0, 2, 1, 3, 4).reshape(4, 4, 2).mean(dim=1)
    torch.testing.assert_close(merged[0].sort(dim=0).values, cell_means.sort(dim=0).values)
    restored = unmerge(merged).view(2, 2, 2, 2, 2).permute(0, 2, 1, 3, 4).reshape(4, 4, 2)
    torch.testing.assert_close(restored, cell_means.unsqueeze(1).expand(-1, 4, -1))


def test_tome_keeps_unmerged_tokens_and_skips_lower_resolutions():
    tokens = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(2))
    merge, unmerge = gf.tome_functions(tokens, 0.25, [2, 4, 8, 8], torch.Generator().manual_seed(1))
    merged = merge(tokens)
    assert merged.shape == (2, 64 - 16, 8)
    restored = unmerge(merged)
    unchanged = (restored == tokens).all(dim=-1).sum(dim=1)
    assert int(unchanged.min()) >= 64 - 16 - 16  # at most the 16 merged sources and 16 destinations change
    for item in range(2):  # a merged source comes back as a copy of its destination: 48 distinct tokens
        assert torch.unique(restored[item], dim=0).shape[0] == 48
        assert torch.unique(merged[item], dim=0).shape[0] == 48
    lower = tokens[:, :16]  # the 4x4 level of an 8x8 latent
    identity_merge, _ = gf.tome_functions(lower, 0.5, [2, 4, 8, 8])
    assert identity_merge(lower) is lower
    nothing, _ = gf.bipartite_merge(tokens, 8, 8, 0)
    assert nothing(tokens) is tokens


def test_tome_node_on_the_tiny_model(sd15, noisy):
    model, texts = sd15
    x, sigma = noisy
    plain = CFGDenoiser(model.unet_apply, texts["positive"], texts["negative"], 5.0, model_options=model.model_options)
    expected = plain(x, sigma)
    (zero,) = nodes.TomePatchModel().patch(model, 0.0)
    neutral = CFGDenoiser(model.unet_apply, texts["positive"], texts["negative"], 5.0, model_options=zero.model_options)
    torch.testing.assert_close(neutral(x, sigma), expected, rtol=1e-5, atol=1e-5)
    (half,) = nodes.TomePatchModel().patch(model, 0.5)
    patches = half.model_options["transformer_options"]["patches"]
    (merge_queries,), (unmerge_output,) = patches["attn1_patch"], patches["attn1_output_patch"]
    seen = []

    def recording_merge(n, context, value, extra):
        merged_n, context, value = merge_queries(n, context, value, extra)
        seen.append((n.shape[1], merged_n.shape[1], context.shape[1]))
        return merged_n, context, value

    patches["attn1_patch"], patches["attn1_output_patch"] = [recording_merge], [unmerge_output]
    merged = CFGDenoiser(model.unet_apply, texts["positive"], texts["negative"], 5.0, model_options=half.model_options)
    out = merged(x, sigma)
    assert torch.isfinite(out).all() and not torch.equal(out, expected)
    # Queries merged to half at the 8x8 level (keys and values keep every token), lower levels untouched.
    assert (64, 32, 64) in seen and (16, 16, 16) in seen
    assert all(merged_count == (tokens // 2 if tokens == 64 else tokens) for tokens, merged_count, _ in seen)
    assert "patches" not in model.model_options["transformer_options"]
    with pytest.raises(ValueError, match="ratio"):
        nodes.TomePatchModel().patch(model, 1.5)


# -- Perp-Neg guider ---------------------------------------------------------------------------------------------

def test_perp_neg_denoiser_by_hand_and_its_hooks(noisy):
    x, sigma = noisy
    unet = ScaleUnet()
    pos, neg, empty = predictions(x, sigma, unet)
    seen = {}

    def pre(args):
        seen["pre"] = len(args["conds_out"])
        return args["conds_out"]

    def post(args):
        seen["post"] = args["empty_cond_denoised"]
        return args["denoised"]

    options = {"sampler_pre_cfg_function": [pre], "sampler_post_cfg_function": [post]}
    denoiser = gf.PerpNegDenoiser(fake_denoiser(options, cfg=6.0, unet=unet), cond(EMPTY), 0.7)
    p, n = pos - empty, neg - empty
    perpendicular = n - (n * p).sum() / (p * p).sum() * p
    torch.testing.assert_close(denoiser(x, sigma), empty + 6.0 * (p - 0.7 * perpendicular), rtol=1e-4, atol=1e-4)
    assert seen["pre"] == 3
    torch.testing.assert_close(seen["post"], empty, rtol=1e-5, atol=1e-5)
    # neg_scale 0 and cfg 1: only the positive prompt runs.
    lone = gf.PerpNegDenoiser(fake_denoiser(cfg=1.0, unet=unet), cond(EMPTY), 0.0)
    torch.testing.assert_close(lone(x, sigma), pos, rtol=1e-5, atol=1e-5)


def run_guider(model, guider):
    sigmas = sch.BasicScheduler().get_sigmas(model, "normal", 3, 1.0)[0]
    noise = cs.RandomNoise().get_noise(4)[0]
    sampler = css.KSamplerSelect().get_sampler("euler")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


def test_perp_neg_guider_samples_as_cfg_and_as_the_old_patch(sd15):
    model, texts = sd15
    pos, neg, empty = texts["positive"], texts["negative"], texts["empty"]
    (no_negative,) = nodes.PerpNegGuider().get_guider(model, pos, neg, empty, 6.0, 0.0)
    (cfg_on_empty,) = cs.CFGGuider().get_guider(model, pos, empty, 6.0)
    torch.testing.assert_close(run_guider(model, no_negative), run_guider(model, cfg_on_empty), rtol=1e-5, atol=1e-5)
    (guider,) = nodes.PerpNegGuider().get_guider(model, pos, neg, empty, 6.0, 0.8)
    (old_patch,) = PerpNeg().patch(model, empty, 0.8)
    (old,) = cs.CFGGuider().get_guider(old_patch, pos, neg, 6.0)
    result = run_guider(model, guider)
    # The two run the UNet at different batch sizes, for which oneDNN may sum in another order (AMX CPUs: 4e-4
    # apart on latents up to 240 after three steps): fp32 rounding, so the tolerance follows the latents' scale.
    tolerance = 1e-5 * result.abs().max().item()
    torch.testing.assert_close(result, run_guider(old_patch, old), rtol=1e-4, atol=tolerance)
    assert (result - run_guider(model, no_negative)).abs().max() > 10 * tolerance


# -- through the server ------------------------------------------------------------------------------------------

def test_guidance_nodes_through_the_server(start_server, tmp_path, checkpoint):
    from PIL import Image

    base = tmp_path / "guidance"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).hardlink_to(checkpoint)
    srv = start_server("--force-fp32", base=base)

    def run(prefix: str, patches: list, cfg: float = 30.0, guider: dict | None = None):
        prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}}}
        model = ["4", 0]
        for index, (node, inputs) in enumerate(patches):
            prompt[f"p{index}"] = {"class_type": node, "inputs": {"model": model, **inputs}}
            model = [f"p{index}", 0]
        prompt.update({
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
            # A zeroed negative: this tiny random model hardly tells two texts apart, but text from no text.
            "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
            "e": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "g": guider or {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["6", 0],
                                                                    "negative": ["7", 0], "cfg": cfg}},
            "n": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
            "s": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "t": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "normal", "steps": 2,
                                                              "denoise": 1.0}},
            "3": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["n", 0], "guider": ["g", 0],
                                                                     "sampler": ["s", 0], "sigmas": ["t", 0],
                                                                     "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        })
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        pixels = Image.open(srv.base / "output" / f"{prefix}_00001_.png").tobytes()
        return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).int()

    plain = run("plain", [])
    neutral = run("neutral", [("TomePatchModel", {"ratio": 0.0}),
                              ("FreSca", {"scale_low": 1.0, "scale_high": 1.0, "freq_cutoff": 20})])
    assert (neutral - plain).abs().max() <= 1
    apg = run("apg", [("APG", {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0})], cfg=29.0)
    assert (apg - plain).abs().max() <= 1  # APG without projection or threshold is CFG at cfg + 1
    # Each guidance change shows in the pixels; ToMe's and Mahiro's effects on this tiny random model stay below
    # 8-bit rounding (their math is checked above), so they run in the chain only.
    for name, node in [("tcfg", ("TCFG", {})), ("apg_projected", ("APG", {"eta": 0.5, "norm_threshold": 2.0,
                                                                          "momentum": 0.3})),
                       ("fresca", ("FreSca", {"scale_low": 1.0, "scale_high": 1.5, "freq_cutoff": 2}))]:
        assert (run(name, [node]) - plain).abs().float().mean() > 0.5, name
    chained = run("chained", [("TomePatchModel", {"ratio": 0.5}), ("TCFG", {}), ("Mahiro", {}),
                              ("APG", {"eta": 0.5, "norm_threshold": 2.0, "momentum": 0.3}),
                              ("FreSca", {"scale_low": 1.0, "scale_high": 1.5, "freq_cutoff": 2})])
    assert (chained - plain).abs().float().mean() > 0.3
    empty_cfg = run("empty_cfg", [], guider={"class_type": "CFGGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["e", 0], "cfg": 5.0}})
    perp_neg = run("perp_neg", [], guider={"class_type": "PerpNegGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "empty_conditioning": ["e", 0],
        "cfg": 5.0, "neg_scale": 0.0}})
    assert (perp_neg - empty_cfg).abs().max() <= 1
    refused = srv.post("/prompt", {"prompt": {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
        "1": {"class_type": "APG", "inputs": {"model": ["4", 0], "eta": 1.0, "norm_threshold": 5.0,
                                               "momentum": 2.0}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}})
    assert refused.status_code == 400
    assert refused.json()["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
