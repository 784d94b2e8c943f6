"""Hook nodes (nodes/hook_nodes.py, hook_conditioning.py, models/hooks.py) on tiny random SD1.5 checkpoints and
LoRAs: a hooked entry's contribution equals running it with a separately patched model, keyframes switch strength
at the right step, strength 0 equals no hook, SetClipHooks equals a LoRA-loaded CLIP, default conds fill what
the others leave, and ComfyUI's hooks example shape runs through the server."""

from __future__ import annotations

import pytest
import torch

from comfy_serverless.models.hooks import HookKeyframe, HookKeyframeGroup, KeyframeTracker, interpolated
from comfy_serverless.models.loading import apply_lora_file, load_checkpoint
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_lora
from comfy_serverless.nodes import hook_conditioning as cond_nodes
from comfy_serverless.nodes import hook_nodes as nodes
from comfy_serverless.sampling.denoising import cfg_denoiser
from conftest import server_context


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", root / "models" / "checkpoints" / "a.safetensors", seed=1)
    make_test_checkpoint("sd15", "tiny", root / "models" / "checkpoints" / "b.safetensors", seed=2)
    make_test_lora("sd15", root / "models" / "loras" / "l.safetensors", seed=3)
    return root


@pytest.fixture(scope="module")
def ctx(base):
    with server_context(base_directory=str(base), force_fp32=True) as server:
        yield server


@pytest.fixture(scope="module")
def checkpoint(ctx, base):
    return load_checkpoint(str(base / "models" / "checkpoints" / "a.safetensors"))


def lora_path(base):
    return str(base / "models" / "loras" / "l.safetensors")


def inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = model.network().config.context_dim
    x = torch.randn(1, 4, 8, 8, generator=generator)
    return x, torch.randn(1, 77, width, generator=generator), torch.randn(1, 77, width, generator=generator)


def denoise(model, positive, x, sigma):
    denoiser = cfg_denoiser(model.unet_apply, positive, None, 1.0, model_sampling=model.model_sampling)
    return denoiser.calc_cond_batch([positive], x, torch.tensor([sigma]))[0]


def test_lora_hook_changes_only_its_entry(checkpoint, base):
    model = checkpoint[0]
    x, first, second = inputs(model)
    hooks = nodes.CreateHookLora().create_hook("l.safetensors", 0.7, 1.0)[0]
    hooked = cond_nodes.ConditioningSetPropertiesAndCombine().set_properties(
        [[first, {}]], [[second, {}]], 1.0, "default", hooks=hooks)[0]
    assert "hooks" not in hooked[0][1] and hooked[1][1]["hooks"] is hooks
    lora_model = apply_lora_file(lora_path(base), model, None, 0.7, 0)[0]
    expected = (denoise(model, [[first, {}]], x, 3.0) + denoise(lora_model, [[second, {}]], x, 3.0)) / 2
    result = denoise(model, hooked, x, 3.0)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    unhooked = (denoise(model, [[first, {}]], x, 3.0) + denoise(model, [[second, {}]], x, 3.0)) / 2
    assert (result - unhooked).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(model.unet_apply(x, torch.tensor([500.0]), first),  # the model itself is unpatched
                               model.unet_apply(x, torch.tensor([500.0]), first))


def test_model_as_lora_hook_at_strength_one_is_the_other_model(checkpoint, base):
    model = checkpoint[0]
    other = load_checkpoint(str(base / "models" / "checkpoints" / "b.safetensors"))[0]
    x, first, _ = inputs(model, seed=1)
    hooks = nodes.CreateHookModelAsLoraModelOnly().create_hook_model_only("b.safetensors", 1.0)[0]
    hooked = cond_nodes.ConditioningSetProperties().set_properties([[first, {}]], 1.0, "default", hooks=hooks)[0]
    torch.testing.assert_close(denoise(model, hooked, x, 2.0), denoise(other, [[first, {}]], x, 2.0),
                               rtol=1e-4, atol=1e-4)


def test_strength_zero_equals_no_hook(checkpoint):
    model = checkpoint[0]
    x, first, _ = inputs(model, seed=2)
    plain = denoise(model, [[first, {}]], x, 4.0)
    clip_only = nodes.CreateHookLora().create_hook("l.safetensors", 0.0, 1.0)[0]
    zero_kf = nodes.CreateHookKeyframe().create_hook_keyframe(0.0, 0.0)[0]
    zero = nodes.SetHookKeyframes().set_hook_keyframes(
        nodes.CreateHookLoraModelOnly().create_hook_model_only("l.safetensors", 1.0)[0], zero_kf)[0]
    for hooks in (clip_only, zero):
        hooked = cond_nodes.ConditioningSetProperties().set_properties([[first, {}]], 1.0, "default", hooks=hooks)[0]
        assert torch.equal(denoise(model, hooked, x, 4.0), plain)
    assert len(nodes.CreateHookLora().create_hook("l.safetensors", 0.0, 0.0)[0]) == 0


def test_keyframes_switch_strength_at_the_right_step(checkpoint, base):
    model = checkpoint[0]
    sampling = model.model_sampling
    keyframes = nodes.CreateHookKeyframe().create_hook_keyframe(1.0, 0.0)[0]
    keyframes = nodes.CreateHookKeyframe().create_hook_keyframe(0.25, 0.5, keyframes)[0]
    tracker = KeyframeTracker(sampling.percent_to_sigma)
    switch = float(sampling.percent_to_sigma(0.5))
    sigmas = [14.6, 8.0, 4.0, switch * 1.01, switch, 0.9 * switch, 0.3]
    assert [tracker.strength(keyframes, s) for s in sigmas] == [1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25]
    # guarantee steps: the first of an interpolated series holds one step even when later ones are already due
    series = nodes.CreateHookKeyframesInterpolated().create_hook_keyframes(1.0, 0.0, "linear", 0.0, 0.2, 3)[0]
    assert [k.guarantee_steps for k in series.keyframes] == [1, 0, 0]
    tracker = KeyframeTracker(sampling.percent_to_sigma)
    assert [tracker.strength(series, s) for s in (14.6, 0.5)] == [1.0, 0.0]
    # through the sampler: before 50% the LoRA at full strength, after it at a quarter
    x, first, _ = inputs(model, seed=3)
    hooks = nodes.SetHookKeyframes().set_hook_keyframes(
        nodes.CreateHookLoraModelOnly().create_hook_model_only("l.safetensors", 1.0)[0], keyframes)[0]
    positive = [[first, {"hooks": hooks}]]
    denoiser = cfg_denoiser(model.unet_apply, positive, None, 1.0, model_sampling=sampling)
    early = denoiser.calc_cond_batch([positive], x, torch.tensor([8.0]))[0]
    late = denoiser.calc_cond_batch([positive], x, torch.tensor([0.5]))[0]
    for sigma, strength, result in ((8.0, 1.0, early), (0.5, 0.25, late)):
        lora_model = apply_lora_file(lora_path(base), model, None, strength, 0)[0]
        torch.testing.assert_close(result, denoise(lora_model, [[first, {}]], x, sigma), rtol=1e-4, atol=1e-4)


def test_keyframe_curves_and_floats():
    assert interpolated(0.0, 1.0, 3, "ease_in") == [0.0, 0.25, 1.0]
    assert interpolated(0.0, 1.0, 3, "ease_out") == [0.0, 0.75, 1.0]
    assert interpolated(1.0, 0.0, 3, "ease_in_out")[1] == pytest.approx(0.5)
    group = nodes.CreateHookKeyframesFromFloats().create_hook_keyframes([0.2, 0.4, 0.8], 0.1, 0.5)[0]
    assert [(k.start_percent, k.strength) for k in group.keyframes] == [
        (0.1, 0.2), (pytest.approx(0.3), 0.4), (0.5, 0.8)]
    single = nodes.CreateHookKeyframesFromFloats().create_hook_keyframes(0.7, 0.0, 1.0)[0]
    assert [(k.start_percent, k.strength) for k in single.keyframes] == [(0.0, 0.7)]
    with pytest.raises(ValueError, match="empty"):
        nodes.CreateHookKeyframesFromFloats().create_hook_keyframes([], 0.0, 1.0)
    with pytest.raises(ValueError, match="interpolation"):
        interpolated(0.0, 1.0, 3, "cubic")
    sorted_group = HookKeyframeGroup([HookKeyframe(1.0, 0.6), HookKeyframe(2.0, 0.1)])
    assert [k.start_percent for k in sorted_group.keyframes] == [0.1, 0.6]


@pytest.mark.usefixtures("ctx")
def test_combine_hooks_drops_duplicates_and_none():
    a = nodes.CreateHookLoraModelOnly().create_hook_model_only("l.safetensors", 1.0)[0]
    b = nodes.CreateHookLoraModelOnly().create_hook_model_only("l.safetensors", 0.5)[0]
    assert nodes.CombineHooks().combine_hooks(hooks_A=None, hooks_B=None)[0] is None
    assert nodes.CombineHooksFour().combine_hooks(hooks_B=a)[0] is a
    both = nodes.CombineHooksEight().combine_hooks(hooks_A=a, hooks_C=b, hooks_H=a)[0]
    assert [h.strength_model for h in both.hooks] == [1.0, 0.5]


def test_set_clip_hooks_equals_a_lora_loaded_clip(checkpoint, base):
    clip = checkpoint[1]
    hooks = nodes.CreateHookLora().create_hook("l.safetensors", 1.0, 0.6)[0]
    hooked = nodes.SetClipHooks().apply_hooks(clip, True, False, hooks)[0]
    loaded = apply_lora_file(lora_path(base), None, clip, 0, 0.6)[1]
    cond, pooled = hooked.encode("a red cat")
    torch.testing.assert_close(cond, loaded.encode("a red cat")[0], rtol=1e-5, atol=1e-5)
    assert (cond - clip.encode("a red cat")[0]).abs().max() > 1e-4
    entry = hooked.encode_from_tokens_scheduled(hooked.tokenize("a red cat"))
    assert len(entry) == 1 and entry[0][1]["hooks"] is hooks
    # scheduled: one encoding per keyframe range, the second without the LoRA
    keyframes = nodes.CreateHookKeyframe().create_hook_keyframe(1.0, 0.0)[0]
    keyframes = nodes.CreateHookKeyframe().create_hook_keyframe(0.0, 0.5, keyframes)[0]
    scheduled = nodes.SetClipHooks().apply_hooks(
        clip, False, True, nodes.SetHookKeyframes().set_hook_keyframes(hooks, keyframes)[0])[0]
    parts = scheduled.encode_from_tokens_scheduled(scheduled.tokenize("a red cat"))
    assert [(p[1]["clip_start_percent"], p[1]["clip_end_percent"]) for p in parts] == [(0.0, 0.5), (0.5, 1.0)]
    assert "hooks" not in parts[0][1]
    torch.testing.assert_close(parts[0][0], loaded.encode("a red cat")[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[1][0], clip.encode("a red cat")[0], rtol=1e-5, atol=1e-5)


def fake_unet(x, timesteps, context=None, **_):
    return torch.zeros_like(x) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)  # per batch item


def test_default_conds_fill_what_the_others_leave():
    x = torch.zeros(1, 4, 16, 16)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    first, fallback = torch.full((1, 77, 8), 2.0), torch.full((1, 77, 8), -1.0)
    masked = cond_nodes.ConditioningSetProperties().set_properties([[first, {}]], 1.0, "default", mask=mask)[0]
    positive = cond_nodes.ConditioningSetDefaultAndCombine().set_default_and_combine(masked, [[fallback, {}]])[0]
    assert positive[1][1]["default"] is True
    denoiser = cfg_denoiser(fake_unet, positive, None, 1.0)
    out = denoiser.calc_cond_batch([positive], x, torch.tensor([1.0]))[0]
    # eps-prediction x_0 = x - sigma * eps: the masked half gets the first entry only, the rest the default
    torch.testing.assert_close(out[..., :8], torch.full_like(out[..., :8], -2.0))
    torch.testing.assert_close(out[..., 8:], torch.full_like(out[..., 8:], 1.0))


def test_pair_nodes_and_timesteps_range():
    pos, neg = [[torch.ones(1, 2, 3), {"a": 1}]], [[torch.zeros(1, 2, 3), {}]]
    full, before, after = nodes.ConditioningTimestepsRange().create_range(0.2, 0.7)
    assert (full, before, after) == ((0.2, 0.7), (0.0, 0.2), (0.7, 1.0))
    p, n = cond_nodes.PairConditioningSetProperties().set_properties(pos, neg, 0.5, "mask bounds", timesteps=full)
    assert p[0][1] == {"a": 1, "start_percent": 0.2, "end_percent": 0.7} and "mask_strength" not in n[0][1]
    assert pos[0][1] == {"a": 1}  # inputs untouched
    p, n = cond_nodes.PairConditioningCombine().combine(pos, neg, p, n)
    assert len(p) == 2 and len(n) == 2
    p, n = cond_nodes.PairConditioningSetDefaultAndCombine().set_default_and_combine(pos, neg, pos, neg)
    assert [e[1].get("default") for e in p] == [None, True]


@pytest.mark.usefixtures("ctx")
def test_hooked_conditioning_needs_a_model():
    hooks = nodes.CreateHookLoraModelOnly().create_hook_model_only("l.safetensors", 1.0)[0]
    positive = [[torch.ones(1, 77, 8), {"hooks": hooks}]]
    denoiser = cfg_denoiser(fake_unet, positive, None, 1.0)
    with pytest.raises(TypeError, match="hooks"):
        denoiser.calc_cond_batch([positive], torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))


def test_hooks_example_through_the_server(start_server, tmp_path, base):
    from PIL import Image

    srv = start_server("--force-fp32", base=tmp_path / "srv")
    for folder, name in (("checkpoints", "a.safetensors"), ("loras", "l.safetensors")):
        (srv.base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (srv.base / "models" / folder / name).hardlink_to(base / "models" / folder / name)

    def sample(model, positive, negative, prefix, extra):
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["1", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": model, "positive": positive, "negative": negative, "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
            **extra,
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return Image.open(srv.base / "output" / f"{prefix}_00001_.png").tobytes()

    hooked = sample(["1", 0], ["13", 0], ["13", 1], "hooked", {
        "10": {"class_type": "CreateHookLora", "inputs": {"lora_name": "l.safetensors", "strength_model": 1.0,
                                                           "strength_clip": 1.0}},
        "11": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.5, "start_percent": 0.0}},
        "12": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["10", 0], "hook_kf": ["11", 0]}},
        "13": {"class_type": "PairConditioningSetProperties", "inputs": {
            "positive_NEW": ["6", 0], "negative_NEW": ["7", 0], "strength": 1.0, "set_cond_area": "default",
            "hooks": ["12", 0]}},
    })
    loaded = sample(["20", 0], ["6", 0], ["7", 0], "loaded", {
        "20": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "l.safetensors",
                                                                "strength_model": 0.5}}})
    plain = sample(["1", 0], ["6", 0], ["7", 0], "plain", {})
    assert hooked == loaded and hooked != plain
