"""ComfyUI's ModelPatcher hooks on MODEL objects, honoured by the sampler and the UNet (issue #9):
cfg / pre-cfg / post-cfg functions, the UNet function wrapper, block and attention patches, ControlNet residuals,
weight patches (add_patches / get_key_patches) and object patches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_serverless.models.loading import load_checkpoint
from comfy_serverless.sampling.denoising import CFGDenoiser, ModelSampling, calc_cond_batch

PACK = "comfy_style/model_hooks.py"


class ScaleUnet:
    """eps = x_in * mean(context): each conditioning value gives a distinct, predictable x_0."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, timesteps, context=None, transformer_options=None, **kwargs):
        self.calls.append({"batch": x_in.shape[0], "options": transformer_options, **kwargs})
        return x_in * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def cond(value):
    return [[torch.full((1, 77, 8), float(value)), {}]]


@pytest.fixture()
def noisy():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    return x, torch.full((1,), 2.0)


def denoiser(cfg=7.0, options=None, unet=None):
    return CFGDenoiser(unet or ScaleUnet(), cond(0.5), cond(-0.25), cfg, model_sampling=ModelSampling(),
                       model_options=options or {})


def plain_predictions(x, sigma):
    positive = CFGDenoiser(ScaleUnet(), cond(0.5), [], 1.0, model_sampling=ModelSampling())(x, sigma)
    negative = CFGDenoiser(ScaleUnet(), cond(-0.25), [], 1.0, model_sampling=ModelSampling())(x, sigma)
    return positive, negative


# -- guidance functions ---------------------------------------------------------------------------------------

def test_sampler_cfg_function_replaces_guidance_with_comfyuis_arguments(noisy):
    x, sigma = noisy
    positive, negative = plain_predictions(x, sigma)
    seen = {}

    def only_uncond(args):
        seen.update(args)
        return args["uncond"]  # ComfyUI's args carry x - prediction; returning it yields that prediction

    out = denoiser(options={"sampler_cfg_function": only_uncond})(x, sigma)
    torch.testing.assert_close(out, negative)
    torch.testing.assert_close(seen["cond_denoised"], positive)
    torch.testing.assert_close(seen["cond"], x - positive)
    assert seen["cond_scale"] == 7.0 and seen["input"] is x and torch.equal(seen["sigma"], sigma)
    assert {"timestep", "uncond_denoised", "model", "model_options"} <= set(seen)


def test_pre_and_post_cfg_functions_run_in_order(noisy):
    x, sigma = noisy
    positive, negative = plain_predictions(x, sigma)
    order = []

    def pre(args):
        order.append("pre")
        cond_out, uncond_out = args["conds_out"]
        return [cond_out, cond_out]  # no guidance left: result = positive

    def post_add(args):
        order.append("post1")
        return args["denoised"] + 1.0

    def post_double(args):
        order.append("post2")
        assert torch.equal(args["uncond_denoised"], args["cond_denoised"])
        return args["denoised"] * 2.0

    out = denoiser(options={"sampler_pre_cfg_function": [pre],
                            "sampler_post_cfg_function": [post_add, post_double]})(x, sigma)
    torch.testing.assert_close(out, (positive + 1.0) * 2.0)
    assert order == ["pre", "post1", "post2"]


def test_per_call_options_add_to_the_models(noisy):
    x, sigma = noisy
    positive, negative = plain_predictions(x, sigma)
    captured = []

    def model_post(args):
        return args["denoised"] + 1.0

    def capture(args):
        captured.append(args["uncond_denoised"])
        return args["denoised"]

    guided = denoiser(options={"sampler_post_cfg_function": [model_post]})
    out = guided(x, sigma, model_options={"sampler_post_cfg_function": [capture]})
    torch.testing.assert_close(out, negative + (positive - negative) * 7.0 + 1.0)
    torch.testing.assert_close(captured[0], negative)
    assert len(guided.model_options["sampler_post_cfg_function"]) == 1  # the model's list is not changed


def test_cfg1_skips_the_negative_unless_disabled(noisy):
    x, sigma = noisy
    unet = ScaleUnet()
    denoiser(cfg=1.0, unet=unet)(x, sigma)
    assert [call["batch"] for call in unet.calls] == [1]
    unet = ScaleUnet()
    denoiser(cfg=1.0, unet=unet, options={"disable_cfg1_optimization": True})(x, sigma)
    assert [call["batch"] for call in unet.calls] == [2]


def test_model_function_wrapper_sees_the_batch_and_can_change_it(noisy):
    x, sigma = noisy
    positive, negative = plain_predictions(x, sigma)
    seen = {}

    def wrapper(apply_model, args):
        seen.update(args)
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    out = denoiser(options={"model_function_wrapper": wrapper})(x, sigma)
    torch.testing.assert_close(out, (negative + (positive - negative) * 7.0) * 0.5)
    assert seen["cond_or_uncond"] == [0, 1] and seen["input"].shape[0] == 2
    assert seen["c"]["c_crossattn"].shape == (2, 77, 8) and "transformer_options" in seen["c"]


def test_a_post_cfg_function_can_run_the_model_again(noisy):
    """The way PerturbedAttentionGuidance-style patches work: calc_cond_batch on the function's "model"."""
    x, sigma = noisy
    positive, negative = plain_predictions(x, sigma)

    def again(args):
        (recomputed,) = calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                        args["model_options"])
        return args["denoised"] + (args["cond_denoised"] - recomputed)

    out = denoiser(options={"sampler_post_cfg_function": [again]})(x, sigma)
    torch.testing.assert_close(out, negative + (positive - negative) * 7.0)


# -- the UNet's patches, on a real tiny SD1.5 UNet -------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path_factory.mktemp("hooks") / "tiny-sd15.safetensors"
    make_test_checkpoint("sd15", "tiny", path, seed=2)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(str(checkpoint))[0]


def unet_inputs(model):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, model.network().config.context_dim, generator=generator)
    return x, torch.tensor([500.0, 500.0]), context


def run_unet(model, transformer_options=None, control=None):
    x, t, context = unet_inputs(model)
    options = {"cond_or_uncond": [0, 1], **(transformer_options or {})}
    return model.unet_apply(x, t, context=context, transformer_options=options, control=control)


def test_block_patches_see_where_they_are_and_change_the_output(model):
    plain = run_unet(model)
    blocks = []

    def record(h, options):
        blocks.append(options["block"])
        return h

    same = run_unet(model, {"patches": {"input_block_patch": [record]}})
    torch.testing.assert_close(same, plain)
    assert blocks == [("input", i) for i in range(len(model.network().input_blocks))]

    def scale_skips(h, skip, options):
        return h, skip * 1.5 if options["block"] == ("output", 0) else skip

    assert not torch.allclose(run_unet(model, {"patches": {"output_block_patch": [scale_skips]}}), plain)


def test_attention_replace_with_plain_attention_changes_nothing(model):
    plain = run_unet(model)
    unet = model.network()
    calls = []

    def same_attention(q, k, v, extra):
        calls.append(extra["block"])
        heads, dim = extra["n_heads"], extra["dim_head"]
        b, t, _ = q.shape
        split = [m.view(b, -1, heads, dim).transpose(1, 2) for m in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split)
        return out.transpose(1, 2).reshape(b, t, heads * dim)

    def identity(q, k, v, extra):  # PAG's perturbation: attention replaced by its values
        return v

    middle = ("middle", 0)
    replaced = run_unet(model, {"patches_replace": {"attn1": {middle: same_attention}}})
    torch.testing.assert_close(replaced, plain, rtol=1e-4, atol=1e-5)
    assert calls == [middle] * unet.config.transformer_depth_middle
    perturbed = run_unet(model, {"patches_replace": {"attn1": {(*middle, 0): identity}}})
    assert not torch.allclose(perturbed, plain)


def test_attn_patches_and_output_patches_run(model):
    plain = run_unet(model)
    seen = []

    def before(n, context, value, extra):
        seen.append(("attn2", extra["block"][0]))
        return n, context, value

    def after(n, extra):
        return n * 0.0

    torch.testing.assert_close(run_unet(model, {"patches": {"attn2_patch": [before]}}), plain)
    assert seen and all(kind == "attn2" for kind, _ in seen)
    assert not torch.allclose(run_unet(model, {"patches": {"attn1_output_patch": [after]}}), plain)


def test_control_residuals_are_added_where_comfyui_adds_them(model):
    plain = run_unet(model)
    # The shapes of the input blocks' outputs, to build residuals of the right size.
    record = []

    def grab(hidden, options):
        record.append(hidden.shape)
        return hidden

    run_unet(model, {"patches": {"input_block_patch": [grab]}})
    shapes = list(record)
    zeros = {"input": [], "middle": [torch.zeros(shapes[-1])], "output": [torch.zeros(s) for s in shapes]}
    torch.testing.assert_close(run_unet(model, control=zeros), plain)
    nudged = {"middle": [None], "output": [torch.zeros(s) for s in shapes[:-1]] + [torch.ones(shapes[-1])]}
    assert not torch.allclose(run_unet(model, control=nudged), plain)
    wrong = {"middle": [torch.zeros(1, 1, 1, 1)], "output": []}
    with pytest.raises(ValueError, match="ControlNet middle residual"):
        run_unet(model, control=wrong)


def test_the_denoiser_asks_each_control_once_per_batch(model):
    class Control:
        def __init__(self):
            self.pre_runs, self.calls = 0, []

        def pre_run(self, model, percent_to_sigma):
            self.pre_runs += 1
            assert percent_to_sigma(0.0) > percent_to_sigma(1.0)

        def get_control(self, x, sigma, cond, batched_number, transformer_options):
            self.calls.append((x.shape[0], batched_number, sorted(cond)))
            return None

        def cleanup(self):
            self.cleanups = getattr(self, "cleanups", 0) + 1

    control = Control()
    own_text = torch.ones(1, 77, 32)  # CLIPTextEncodeControlnet's text for the ControlNet only
    positive = [[torch.zeros(1, 77, 32), {"control": control, "cross_attn_controlnet": own_text}]]
    negative = [[torch.zeros(1, 77, 32), {"control": control, "cross_attn_controlnet": own_text}]]
    guided = CFGDenoiser(model.unet_apply, positive, negative, 5.0, model_sampling=model.model_sampling)
    x = torch.randn(1, 4, 8, 8)
    guided(x, torch.full((1,), 3.0))
    guided(x, torch.full((1,), 2.0))
    assert control.pre_runs == 1
    assert control.calls == [(2, 2, ["c_crossattn", "crossattn_controlnet"])] * 2
    guided.end_sampling()
    assert control.cleanups == 1
    guided(x, torch.full((1,), 1.0))  # a new sampling run prepares the controls again
    assert control.pre_runs == 2


def test_sampling_context_reaches_the_extra_inputs_and_negative_is_marked(noisy):
    x, sigma = noisy
    seen = []

    def encode_extra(options, latent_shape, latent_image=None, seed=None):
        seen.append((options.get("prompt_type"), latent_image, seed))
        return {}

    guided = CFGDenoiser(ScaleUnet(), cond(0.5), cond(-0.25), 7.0, model_sampling=ModelSampling(),
                         encode_extra=encode_extra)
    latent = torch.ones(1, 4, 8, 8)
    guided.begin_sampling(latent, torch.ones(1, 4, 8, 8), 42)
    guided(x, sigma)
    assert [(kind, image is latent, seed) for kind, image, seed in seen] == [(None, True, 42), ("negative", True, 42)]


def test_a_denoise_mask_function_changes_the_mask_per_step(model, checkpoint):
    """DifferentialDiffusion's hook: model_options["denoise_mask_function"](sigma, mask, extra_options)."""
    from comfy_serverless.sampling.ksampler import ksampler

    calls = []

    def keep_everything(sigma, mask, extra_options):
        calls.append((float(sigma.reshape(-1)[0]), len(extra_options["sigmas"])))
        return torch.zeros_like(mask)  # regenerate nothing: the latent must come back unchanged

    patched = model.clone()
    patched.model_options["denoise_mask_function"] = keep_everything
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    positive = [[torch.zeros(1, 77, 32), {}]]
    out = ksampler(patched.unet_apply, patched.model_sampling, latent, seed=1, steps=3, cfg=5.0,
                   sampler_name="euler", scheduler="normal", positive=positive, negative=positive,
                   noise_mask=torch.ones(1, 8, 8), model_options=patched.model_options)
    torch.testing.assert_close(out, latent)
    assert len(calls) == 3 and calls[0][1] == 4 and calls[0][0] > calls[-1][0]


# -- weights and objects ------------------------------------------------------------------------------------------

def test_add_patches_merges_two_models_and_undoes(model, checkpoint, tmp_path):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    other_path = tmp_path / "other.safetensors"
    make_test_checkpoint("sd15", "tiny", other_path, seed=9)
    other = load_checkpoint(str(other_path))[0]
    key = "diffusion_model.input_blocks.0.0.weight"
    first = model.model_state_dict()[key].clone()
    second = other.model_state_dict()[key].clone()

    merged = model.clone()
    added = merged.add_patches(other.get_key_patches("diffusion_model."), 0.25, 0.75)  # ModelMergeSimple 0.75
    assert key in added and len(added) == len(model.model_state_dict())
    expected = (first.float() * 0.75 + second.float() * 0.25).to(first.dtype)  # float32 sum, stored dtype
    torch.testing.assert_close(merged.model_state_dict()[key], expected)
    torch.testing.assert_close(model.model_state_dict()[key], first)  # the original clone is untouched
    assert merged.add_patches({"diffusion_model.not_a_weight": (second,)}) == []
    replaced = model.clone()
    replaced.add_patches({key: ("set", (second,))})
    torch.testing.assert_close(replaced.model_state_dict()[key], second)
    scaled = model.clone()
    scaled.add_patches({key: (None,)}, 0.0, 0.5)  # ComfyUI's attention-multiply form: scale only
    torch.testing.assert_close(scaled.model_state_dict()[key], (first.float() * 0.5).to(first.dtype))
    with pytest.raises(NotImplementedError, match="loha"):
        model.clone().add_patches({key: ("loha", (second, second))})


def test_object_patch_replaces_model_sampling_for_that_clone_only(model):
    own = ModelSampling("v_prediction")
    patched = model.clone()
    patched.add_object_patch("model_sampling", own)
    assert patched.model_sampling is own and patched.get_model_object("model_sampling") is own
    assert model.model_sampling is not own and patched.clone().model_sampling is own
    with pytest.raises(NotImplementedError):
        patched.add_object_patch("diffusion_model", object())


def test_object_patch_replaces_the_latent_format(model):
    class Shifted:
        def process_in(self, latent):
            return latent * 0.5 + 1.0

        def process_out(self, latent):
            return (latent - 1.0) / 0.5

    latent = torch.randn(1, 4, 8, 8)
    default = model.get_model_object("latent_format")
    torch.testing.assert_close(default.process_in(latent), model.process_latent_in(latent))
    patched = model.clone()
    patched.add_object_patch("latent_format", Shifted())
    torch.testing.assert_close(patched.process_latent_in(latent), latent * 0.5 + 1.0)
    torch.testing.assert_close(patched.process_latent_out(patched.process_latent_in(latent)), latent)
    torch.testing.assert_close(model.process_latent_in(latent), latent * model.latent_scale)


def test_clones_keep_their_own_patch_lists(model):
    first = model.clone()
    first.set_model_attn1_patch(lambda n, c, v, e: (n, c, v))
    second = first.clone()
    second.set_model_attn1_patch(lambda n, c, v, e: (n, c, v))
    second.set_model_attn2_replace(lambda q, k, v, e: v, "middle", 0)
    assert len(first.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert len(second.model_options["transformer_options"]["patches"]["attn1_patch"]) == 2
    assert "patches_replace" not in first.model_options["transformer_options"]
    assert ("middle", 0) in second.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert "patches" not in model.model_options["transformer_options"]


# -- through the server ----------------------------------------------------------------------------------------

def test_a_pack_patches_guidance_through_the_server(start_server, tmp_path, checkpoint):
    """A pack's cfg function: the positive prediction alone equals plain cfg 1; half its noise differs."""
    from PIL import Image

    base = tmp_path / "hooks"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).hardlink_to(checkpoint)
    srv = start_server("--force-fp32", packs=(PACK,), base=base)  # bf16 rounding would amplify float noise

    def txt2img(cfg: float, factor, prefix: str):
        model = ["10", 0] if factor is not None else ["4", 0]
        prompt = {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
            "10": {"class_type": "ScaledNoisePrediction", "inputs": {"model": ["4", 0], "factor": factor or 1.0}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        pixels = Image.open(srv.base / "output" / f"{prefix}_00001_.png").tobytes()
        return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).int()

    # The same prediction up to float rounding (x - (x - prediction)); cfg 7 is ignored by the patch.
    assert (txt2img(7.0, 1.0, "positive-only") - txt2img(1.0, None, "plain-cfg1")).abs().max() <= 1
    assert (txt2img(7.0, 0.5, "half-noise") - txt2img(1.0, None, "plain-cfg1")).abs().float().mean() > 2


def test_attention_patches_on_blocks_whose_attn1_reads_the_text(tmp_path):
    """The x4 upscaler's outer blocks attend to the text in attn1 (ComfyUI's disable_self_attn): a replacement
    that computes plain attention there changes nothing, so patches see the same k/v the block uses."""
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    path = tmp_path / "tiny-x4.safetensors"
    make_test_checkpoint("sd_x4_upscaler", "tiny", path, seed=3)
    upscaler = load_checkpoint(str(path))[0]
    unet = upscaler.network()
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.context_dim, generator=generator)
    t = torch.tensor([500.0])
    label = torch.tensor([20])
    plain = upscaler.unet_apply(x, t, context=context, y=label, transformer_options={})
    keys = []

    def same_attention(q, k, v, extra):
        keys.append(k.shape[1])
        heads, dim = extra["n_heads"], extra["dim_head"]
        b, tokens, _ = q.shape
        split = [m.view(b, -1, heads, dim).transpose(1, 2) for m in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split)
        return out.transpose(1, 2).reshape(b, tokens, heads * dim)

    replaced = upscaler.unet_apply(x, t, context=context, y=label,
                                   transformer_options={"patches_replace": {"attn1": {("input", 3): same_attention}}})
    torch.testing.assert_close(replaced, plain, rtol=1e-4, atol=1e-5)
    assert keys and all(count == 77 for count in keys)  # attn1 of that block attends to the 77 text tokens
