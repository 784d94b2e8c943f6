"""ControlNet / T2I-Adapter loading, control objects and apply nodes: called directly, and once through the server."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.checkpoint_files import CheckpointError
from comfy_serverless.models.control_objects import ControlNet, broadcast_image_to, resize_hint
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.models.random_controlnets import (
    make_test_control_lora,
    make_test_controlnet,
    make_test_diff_controlnet,
    make_test_t2i_adapter,
    tiny_adapter_config,
    tiny_controlnet_config,
)
from comfy_serverless.models.t2i_adapters import T2IAdapterControl
from comfy_serverless.nodes import controlnet_nodes
from comfy_serverless.nodes.controlnet_nodes import (
    ControlNetApply,
    ControlNetApplyAdvanced,
    ControlNetLoader,
    DiffControlNetLoader,
    SetUnionControlNetType,
)
from conftest import Server, server_context

LAYOUT_FILES = {"cn-original.safetensors": "original", "cn-bare.pth": "original-bare",
                "cn-diffusers.safetensors": "diffusers"}
ADAPTERS = {"t2i-full.safetensors": (tiny_adapter_config("full"), "original"),
            "t2i-full-diffusers.safetensors": (tiny_adapter_config("full"), "diffusers"),
            "t2i-light.pth": (tiny_adapter_config("light"), "original"),
            "t2i-xl-gray.safetensors": (tiny_adapter_config("full", xl=True, in_channels=1), "original")}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base directory with tiny checkpoints, ControlNets in every layout, a diff ControlNet and T2I-Adapters."""
    root = tmp_path_factory.mktemp("controlnet")
    checkpoints, controlnets = root / "models" / "checkpoints", root / "models" / "controlnet"
    checkpoints.mkdir(parents=True)
    controlnets.mkdir(parents=True)
    for family in ("sd15", "sdxl"):
        make_test_checkpoint(family, "tiny", checkpoints / f"tiny-{family}.safetensors", seed=1)
    weights = {}
    for name, layout in LAYOUT_FILES.items():
        weights[name] = make_test_controlnet("sd15", controlnets / name, layout, seed=7)
    weights["cn-sdxl.safetensors"] = make_test_controlnet("sdxl", controlnets / "cn-sdxl.safetensors", "diffusers")
    weights["cn-union.safetensors"] = make_test_controlnet("sdxl", controlnets / "cn-union.safetensors", "diffusers",
                                                           union_types=8)
    weights["cn-diff.safetensors"] = make_test_diff_controlnet(checkpoints / "tiny-sd15.safetensors",
                                                               controlnets / "cn-diff.safetensors", seed=8)
    for family in ("sd15", "sdxl"):
        weights[f"cn-lora-{family}.safetensors"] = make_test_control_lora(
            checkpoints / f"tiny-{family}.safetensors", controlnets / f"cn-lora-{family}.safetensors", seed=10)
    for name, (config, layout) in ADAPTERS.items():
        weights[name] = make_test_t2i_adapter(controlnets / name, config, layout, seed=9)
    (root / "input").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        root / "input" / "hint.png")
    return root, weights


@pytest.fixture(scope="module")
def ctx(base):
    with server_context(base_directory=str(base[0]), force_fp32=True) as server:
        yield server


@pytest.fixture(scope="module")
def sd15(ctx, base):
    from comfy_serverless.models.loading import load_checkpoint

    return load_checkpoint(str(base[0] / "models" / "checkpoints" / "tiny-sd15.safetensors"))


def load(name: str):
    return ControlNetLoader().load_controlnet(name)[0]


def network_state(control) -> dict:
    return control.handle.get().state_dict()


# -- loading -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYOUT_FILES)
def test_every_layout_loads_the_same_network(ctx, base, name):
    control = load(name)
    assert isinstance(control, ControlNet) and control.family == "sd15"
    assert control.config == tiny_controlnet_config("sd15")
    state = network_state(control)
    assert state.keys() == base[1][name].keys()
    assert all(torch.equal(state[k], base[1][name][k]) for k in state)


def test_sdxl_diffusers_controlnet(ctx):
    control = load("cn-sdxl.safetensors")
    assert control.family == "sdxl" and control.config == tiny_controlnet_config("sdxl")


def test_diff_controlnet_adds_the_models_unet(ctx, base, sd15):
    with pytest.raises(CheckpointError, match="DiffControlNetLoader"):
        load("cn-diff.safetensors")
    control = DiffControlNetLoader().load_controlnet(sd15[0], "cn-diff.safetensors")[0]
    state, real = network_state(control), base[1]["cn-diff.safetensors"]
    assert state.keys() == real.keys()
    for key in state:
        torch.testing.assert_close(state[key], real[key], rtol=0, atol=1e-6)
    # A plain ControlNet through DiffControlNetLoader loads as usual.
    plain = DiffControlNetLoader().load_controlnet(sd15[0], "cn-original.safetensors")[0]
    assert torch.equal(network_state(plain)["zero_convs.0.0.weight"],
                       base[1]["cn-original.safetensors"]["zero_convs.0.0.weight"])


def test_files_that_are_not_controlnets_fail_clearly(ctx, base, tmp_path):
    from safetensors.torch import save_file

    from comfy_serverless.models.controlnets import load_controlnet

    with pytest.raises(CheckpointError, match="not a ControlNet or T2I-Adapter"):
        load_controlnet(str(base[0] / "models" / "checkpoints" / "tiny-sd15.safetensors"))
    partial = tmp_path / "partial.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, str(partial))
    with pytest.raises(CheckpointError, match="without down_blocks"):
        load_controlnet(str(partial))
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in base[1]["cn-bare.pth"].items() if k != "middle_block_out.0.bias"}, str(broken))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_controlnet(str(broken))
    with pytest.raises(FileNotFoundError, match="models/controlnet"):
        load("missing.safetensors")


# -- the control object ----------------------------------------------------------------------------------

def latents_and_context(batch=2, context_dim=32, size=8):
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, size, size, generator=generator) * 5,
            torch.randn(batch, 7, context_dim, generator=generator))


def hint_image(batch=1, height=40, width=56):
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(4))


def conditioning(context):
    return [[context[:1], {}]]


def test_get_control_is_the_network_on_the_scaled_input_times_strength(ctx, sd15):
    model = sd15[0]
    x, context = latents_and_context()
    image = hint_image()
    positive, _ = ControlNetApplyAdvanced().apply_controlnet(conditioning(context), conditioning(context),
                                                             load("cn-original.safetensors"), image, 0.5, 0, 1)
    control = positive[0][1]["control"]
    sampling = model.model_sampling
    control.pre_run(model, sampling.percent_to_sigma)
    sigma = torch.tensor([3.0, 3.0])
    got = control.get_control(x, sigma, {"c_crossattn": context}, 1, {})
    hint = resize_hint(image.movedim(-1, 1), 64, 64)
    with torch.no_grad():
        want = control.handle.get()(sampling.calculate_input(sigma, x), hint, sampling.timestep(sigma), context)
    assert len(got["output"]) == len(want["output"]) == 6 and len(got["middle"]) == 1 and got["input"] == []
    for mine, theirs in zip(got["output"] + got["middle"], want["output"] + want["middle"]):
        torch.testing.assert_close(mine, theirs * 0.5)
        assert theirs.abs().max() > 0.01
    control.cleanup()
    assert control.cond_hint is None and control.timestep_range is None


def test_chained_controls_sum_and_respect_their_range(ctx, sd15):
    model = sd15[0]
    x, context = latents_and_context()
    image, node = hint_image(), ControlNetApplyAdvanced()
    first, _ = node.apply_controlnet(conditioning(context), conditioning(context), load("cn-original.safetensors"),
                                     image, 1.0, 0.0, 1.0)
    # The second is active only in the second half of sampling (low sigmas).
    second, _ = node.apply_controlnet(first, first, load("cn-diffusers.safetensors"), 1 - image, 2.0, 0.5, 1.0)
    outer, inner = second[0][1]["control"], first[0][1]["control"]
    assert outer.previous_controlnet is inner
    sampling = model.model_sampling
    outer.pre_run(model, sampling.percent_to_sigma)
    cond = {"c_crossattn": context}
    for sigma, active in ((sampling.sigma_max, False), (torch.tensor(0.5), True)):
        sigmas = sigma.reshape(1).expand(2).float()
        both = outer.get_control(x, sigmas, cond, 1, {})
        alone = inner.get_control(x, sigmas, cond, 1, {})
        if not active:
            assert all(torch.equal(a, b) for a, b in zip(both["output"], alone["output"]))
            continue
        own = outer.control_merge(outer.handle.get()(sampling.calculate_input(sigmas, x),
                                                     resize_hint(1 - image.movedim(-1, 1), 64, 64),
                                                     sampling.timestep(sigmas), context), None)
        for total, a, b in zip(both["output"], alone["output"], own["output"]):
            torch.testing.assert_close(total, a + b)


def test_shuffle_controlnets_average_their_residuals_over_the_image(ctx, base, sd15):
    import shutil

    folder = base[0] / "models" / "controlnet"
    shutil.copy(folder / "cn-original.safetensors", folder / "control_v11e_sd15_shuffle.safetensors")
    shuffle, plain = load("control_v11e_sd15_shuffle.safetensors"), load("cn-original.safetensors")
    assert shuffle.global_average_pooling and not plain.global_average_pooling  # ComfyUI tells by the file name
    x, context = latents_and_context()
    outputs = []
    for control in (shuffle, plain):
        control = control.copy().set_cond_hint(hint_image().movedim(-1, 1))
        control.pre_run(sd15[0], sd15[0].model_sampling.percent_to_sigma)
        outputs.append(control.get_control(x, torch.tensor([1.0, 1.0]), {"c_crossattn": context}, 1, {}))
    for pooled, full in zip(outputs[0]["output"], outputs[1]["output"]):
        torch.testing.assert_close(pooled, full.mean(dim=(2, 3), keepdim=True).expand_as(full))


def test_hint_batches_follow_comfyui():
    hints = torch.arange(3.0).reshape(3, 1, 1, 1)
    # Two conditioning chunks of two items: each chunk gets the first two hints.
    assert broadcast_image_to(hints, 4, 2).flatten().tolist() == [0, 1, 0, 1]
    # One chunk of five: hints cycle.
    assert broadcast_image_to(hints, 5, 1).flatten().tolist() == [0, 1, 2, 0, 1]
    assert broadcast_image_to(hints[:1], 6, 2).shape[0] == 1  # a single hint broadcasts
    # Centre crop to the target aspect, then resize.
    image = torch.arange(8.0).reshape(1, 1, 2, 4)
    assert resize_hint(image, 2, 2).flatten().tolist() == [1, 2, 5, 6]


def test_sdxl_controlnet_needs_y_and_fitting_context(ctx):
    control = load("cn-sdxl.safetensors").copy().set_cond_hint(hint_image().movedim(-1, 1))
    from comfy_serverless.sampling.denoising import ModelSampling

    sampling = ModelSampling("eps")
    control.pre_run(type("Model", (), {"model_sampling": sampling})(), sampling.percent_to_sigma)
    x, context = latents_and_context(context_dim=64)
    sigma = torch.tensor([2.0, 2.0])
    with pytest.raises(ValueError, match="needs the conditioning vector y"):
        control.get_control(x, sigma, {"c_crossattn": context}, 1, {})
    with pytest.raises(ValueError, match="expects text conditioning 64 wide, got 32"):
        control.get_control(x, sigma, {"c_crossattn": context[..., :32], "y": torch.zeros(2, 256)}, 1, {})
    out = control.get_control(x, sigma, {"c_crossattn": context, "y": torch.randn(2, 256)}, 1, {})
    assert len(out["output"]) == 6 and out["middle"][0].shape == (2, 64, 2, 2)


def test_union_controlnet_gets_its_type_from_the_node(ctx, caplog):
    from comfy_serverless.sampling.denoising import ModelSampling

    union = load("cn-union.safetensors")
    assert union.config.union_types == 8
    sampling = ModelSampling("eps")
    x, context = latents_and_context(context_dim=64)
    cond = {"c_crossattn": context, "y": torch.randn(2, 256, generator=torch.Generator().manual_seed(2))}
    sigma = torch.tensor([2.0, 2.0])
    image = hint_image()
    results = {}
    for kind in ("auto", "depth", "canny/lineart/anime_lineart/mlsd"):
        (typed,) = SetUnionControlNetType().set_controlnet_type(union, kind)
        assert typed is not union and typed.extra_args["control_type"] == ([] if kind == "auto" else
                                                                           [1 if kind == "depth" else 3])
        control = typed.copy().set_cond_hint(image.movedim(-1, 1))
        control.pre_run(type("Model", (), {"model_sampling": sampling})(), sampling.percent_to_sigma)
        results[kind] = control.get_control(x, sigma, cond, 1, {})["middle"][0]
        with torch.no_grad():
            want = control.handle.get()(sampling.calculate_input(sigma, x), resize_hint(image.movedim(-1, 1), 64, 64),
                                        sampling.timestep(sigma), context, cond["y"],
                                        control_type=control.extra_args["control_type"])
        torch.testing.assert_close(results[kind], want["middle"][0])
    assert not torch.allclose(results["depth"], results["canny/lineart/anime_lineart/mlsd"])
    assert not torch.allclose(results["depth"], results["auto"])
    assert "control_type" not in union.extra_args  # the node copies
    with caplog.at_level("WARNING"):
        SetUnionControlNetType().set_controlnet_type(load("cn-original.safetensors"), "depth")
    assert "not a union ControlNet" in caplog.text


# -- control-LoRAs ------------------------------------------------------------------------------------------

def test_control_lora_is_made_from_the_sampled_unet(ctx, base, sd15):
    from comfy_serverless.models.control_lora import ControlLora
    from comfy_serverless.sampling.denoising import CFGDenoiser

    model = sd15[0]
    control = load("cn-lora-sd15.safetensors")
    assert isinstance(control, ControlLora) and control.handle is None
    x, context = latents_and_context()
    (applied,) = ControlNetApply().apply_controlnet(conditioning(context), control, hint_image(), 0.8)
    control = applied[0][1]["control"]
    # As the sampler calls it: with its denoiser, which reaches the MODEL through its UNet call.
    denoiser = CFGDenoiser(model.unet_apply, applied, [], 1.0, model_sampling=model.model_sampling)
    control.pre_run(denoiser, model.model_sampling.percent_to_sigma)
    assert control.config.unet == model.handle.get().config and control.family == "sd15"
    state, expected = network_state(control), base[1]["cn-lora-sd15.safetensors"]
    assert state.keys() == expected.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-5)
    out = control.get_control(x, torch.tensor([1.0, 1.0]), {"c_crossattn": context}, 1, {})
    assert len(out["output"]) == 6 and out["output"][0].abs().max() > 0


def test_control_lora_for_another_family_fails_clearly(ctx, sd15):
    control = load("cn-lora-sdxl.safetensors").copy().set_cond_hint(hint_image().movedim(-1, 1))
    with pytest.raises(CheckpointError, match="made for this model family"):
        control.pre_run(sd15[0], sd15[0].model_sampling.percent_to_sigma)
        control.handle.get()


# -- T2I-Adapters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ADAPTERS)
def test_t2i_adapters_load_through_controlnetloader(ctx, base, name):
    config, _ = ADAPTERS[name]
    control = load(name)
    assert isinstance(control, T2IAdapterControl) and control.config == config
    state = network_state(control)
    assert all(torch.equal(state[k], base[1][name][k]) for k in base[1][name])
    size = 16 if config.xl else 8
    x, context = latents_and_context(batch=4, size=size)
    image = hint_image(batch=2)
    control = control.copy().set_cond_hint(image.movedim(-1, 1), 0.25)
    out = control.get_control(x, torch.tensor([1.0] * 4), {"c_crossattn": context}, 2, {})
    hint = resize_hint(image.movedim(-1, 1), size * 8, size * 8)
    if config.in_channels == 1:
        hint = hint.mean(dim=1, keepdim=True)  # a one-channel adapter sees the grey image
    with torch.no_grad():
        features = control.handle.get().features(hint)
    placed = [f for f in out["input"][::-1] + out.get("middle", []) if f is not None]
    assert len(placed) == 4
    for got, want in zip(placed, features):
        assert got.shape[0] == 4  # two chunks of two: the two hints per chunk
        torch.testing.assert_close(got, torch.cat([want, want]) * 0.25)


# -- nodes -------------------------------------------------------------------------------------------------

def test_apply_nodes_copy_chain_and_share(ctx):
    controlnet = load("cn-original.safetensors")
    context = torch.zeros(1, 7, 32)
    positive = [[context, {"strength": 1.0}], [context, {}]]
    negative = [[context, {}]]
    image = hint_image()
    node = ControlNetApplyAdvanced()
    assert node.apply_controlnet(positive, negative, controlnet, image, 0.0, 0, 1) == (positive, negative)
    new_pos, new_neg = node.apply_controlnet(positive, negative, controlnet, image, 0.7, 0.2, 0.9)
    control = new_pos[0][1]["control"]
    assert control is not controlnet and control.handle is controlnet.handle
    assert new_pos[1][1]["control"] is control and new_neg[0][1]["control"] is control  # one batchable object
    assert control.strength == 0.7 and control.timestep_percent_range == (0.2, 0.9)
    assert new_pos[0][1]["control_apply_to_uncond"] is False and new_pos[0][1]["strength"] == 1.0
    assert "control" not in positive[0][1]  # the input conditioning is untouched
    assert torch.equal(control.cond_hint_original, image.movedim(-1, 1))

    (old,) = ControlNetApply().apply_controlnet(new_pos, controlnet, image, 0.3)
    assert old[0][1]["control"].previous_controlnet is control and old[0][1]["control_apply_to_uncond"] is True
    assert old[0][1]["control"] is not old[1][1]["control"]  # the old node copies per entry
    assert ControlNetApply().apply_controlnet(positive, controlnet, image, 0.0) == (positive,)
    with pytest.raises(ValueError, match="IMAGE"):
        node.apply_controlnet(positive, negative, controlnet, image[0], 1.0, 0, 1)


def test_node_definitions():
    assert ControlNetApply.DEPRECATED is True and not getattr(ControlNetApplyAdvanced, "DEPRECATED", False)
    assert list(ControlNetApplyAdvanced.INPUT_TYPES()["optional"]) == ["vae"]
    assert ControlNetApplyAdvanced.RETURN_NAMES == ("positive", "negative")
    assert list(DiffControlNetLoader.INPUT_TYPES()["required"]) == ["model", "control_net_name"]
    assert controlnet_nodes.NODE_DISPLAY_NAME_MAPPINGS["ControlNetApply"] == "Apply ControlNet (OLD)"
    assert SetUnionControlNetType.INPUT_TYPES()["required"]["type"][0][:2] == ["auto", "openpose"]


# -- through the server ------------------------------------------------------------------------------------

def controlnet_workflow(strength: float | None, controlnet: str = "cn-original.safetensors", family: str = "sd15",
                        union_type: str | None = None) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"tiny-{family}.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}},
        "6": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["5", 0], "image": ["4", 0],
            "strength": strength or 0.0, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["7", 0], "seed": 3,
            "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"cn-{strength}"}},
    }
    if union_type is not None:
        prompt["11"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["5", 0], "type": union_type}}
        prompt["6"]["inputs"]["control_net"] = ["11", 0]
    if strength is None:  # no ControlNet at all
        for node in ("4", "5", "6"):
            del prompt[node]
        prompt["8"]["inputs"].update(positive=["2", 0], negative=["3", 0])
    return prompt


def test_controlnet_through_the_server(base):
    server = Server(base[0], ("--force-fp32",), packs=())
    try:
        def pixels(prompt):
            entry = server.run(prompt)
            assert entry["status"]["status_str"] == "success", entry["status"]
            image = entry["outputs"]["10"]["images"][0]
            return np.asarray(Image.open(io.BytesIO(server.get("/view", params=image).content)), dtype=np.int16)

        plain = pixels(controlnet_workflow(None))
        assert np.array_equal(pixels(controlnet_workflow(0.0)), plain)
        controlled = pixels(controlnet_workflow(1.0))
        assert np.abs(controlled - plain).max() > 2
        assert np.array_equal(pixels(controlnet_workflow(1.0, "cn-diffusers.safetensors")), controlled)
        with_lora = pixels(controlnet_workflow(1.0, "cn-lora-sd15.safetensors"))
        assert np.abs(with_lora - plain).max() > 2 and not np.array_equal(with_lora, controlled)
        # SDXL (the ControlNet gets the conditioning vector y) with a union ControlNet told its hint type.
        sdxl_plain = pixels(controlnet_workflow(None, family="sdxl"))
        depth = pixels(controlnet_workflow(1.0, "cn-union.safetensors", "sdxl", "depth"))
        canny = pixels(controlnet_workflow(1.0, "cn-union.safetensors", "sdxl", "canny/lineart/anime_lineart/mlsd"))
        assert np.abs(depth - sdxl_plain).max() > 2 and not np.array_equal(depth, canny)

        bad = controlnet_workflow(1.0, "t2i-light.pth")
        bad["5"]["inputs"]["control_net_name"] = "nope.safetensors"
        response = server.post("/prompt", {"prompt": bad})
        assert response.status_code == 400 and "control_net_name" in response.text
    finally:
        server.stop()


def test_comfy_controlnet_module_for_packs(base):
    """A pack's view: comfy.controlnet.load_controlnet and isinstance checks, in a process with ComfyUI's names."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        from comfy_serverless.catalog import comfy_modules
        comfy_modules.install()
        import torch
        import comfy.controlnet
        folder = {str(base[0] / "models" / "controlnet")!r}
        cn = comfy.controlnet.load_controlnet(folder + "/cn-original.safetensors")
        assert isinstance(cn, comfy.controlnet.ControlNet) and isinstance(cn, comfy.controlnet.ControlBase)
        copy = cn.copy().set_cond_hint(torch.rand(1, 3, 64, 64), 0.5, (0.1, 0.9)).set_previous_controlnet(None)
        assert copy.strength == 0.5 and copy.timestep_percent_range == (0.1, 0.9) and cn.strength == 1.0
        t2i = comfy.controlnet.load_controlnet(folder + "/t2i-light.pth")
        assert isinstance(t2i, comfy.controlnet.T2IAdapter) and not isinstance(t2i, comfy.controlnet.ControlNet)
        lora = comfy.controlnet.load_controlnet(folder + "/cn-lora-sd15.safetensors")
        assert isinstance(lora, comfy.controlnet.ControlLora) and isinstance(lora, comfy.controlnet.ControlNet)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# -- residuals fit the UNet ---------------------------------------------------------------------------------

def unet_and_inputs(config, seed=0, size=(13, 11)):
    from comfy_serverless.networks.build import build_from_state_dict, random_state_dict
    from comfy_serverless.networks.unet import UNetModel

    unet = build_from_state_dict(lambda: UNetModel(config), random_state_dict(lambda: UNetModel(config), std=0.1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *size, generator=generator)
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    y = None if config.adm_in_channels is None else torch.randn(2, config.adm_in_channels, generator=generator)
    return unet, x, context, y


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_residuals_fit_a_full_structure_unet(family):
    """Real block structure (four / three levels, two res blocks) at an odd latent size: every residual lands on
    a block of its shape, and scaled by 0 the UNet's output is unchanged."""
    import dataclasses

    from comfy_serverless.models.random_controlnets import random_controlnet_weights
    from comfy_serverless.networks.build import build_from_state_dict
    from comfy_serverless.networks.controlnet import ControlNetModel
    from comfy_serverless.networks.unet import UNetConfig

    if family == "sd15":
        config = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0),
                            context_dim=32)
    else:
        config = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 1),
                            context_dim=64, num_heads=None, num_head_channels=32, use_linear_in_transformer=True,
                            adm_in_channels=96)
    cn_config = dataclasses.replace(tiny_controlnet_config(family), unet=config)
    controlnet = build_from_state_dict(lambda: ControlNetModel(cn_config), random_controlnet_weights(cn_config))
    unet, x, context, y = unet_and_inputs(config)
    hint = torch.rand(1, 3, x.shape[2] * 8, x.shape[3] * 8)
    with torch.inference_mode():
        residuals = controlnet(x, hint, torch.tensor([10.0, 500.0]), context, y)
        zero = {key: [r * 0 for r in items] for key, items in residuals.items()}
        plain = unet(x, torch.tensor([10.0, 500.0]), context, y)
        unchanged = unet(x, torch.tensor([10.0, 500.0]), context, y, control=zero)
        changed = unet(x, torch.tensor([10.0, 500.0]), context, y, control=residuals)
    assert torch.equal(plain, unchanged) and not torch.allclose(plain, changed)
    assert residuals["output"] == [] and residuals["middle"] == []  # all consumed by the UNet


@pytest.mark.parametrize("xl", [False, True])
def test_t2i_features_fit_the_unet_blocks(ctx, base, xl):
    from comfy_serverless.networks.unet import UNetConfig

    if xl:
        config = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1), context_dim=32,
                            num_heads=None, num_head_channels=32, use_linear_in_transformer=True)
        name, size = "t2i-xl-gray.safetensors", (16, 12)
    else:
        config = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(1, 1, 1, 0),
                            context_dim=32)
        name, size = "t2i-full.safetensors", (16, 8)
    unet, x, context, _ = unet_and_inputs(config, size=size)
    control = load(name).copy().set_cond_hint(hint_image().movedim(-1, 1), 1.0)
    residuals = control.get_control(x, torch.tensor([1.0, 1.0]), {"c_crossattn": context}, 1, {})
    with torch.inference_mode():
        plain = unet(x, torch.tensor([10.0, 500.0]), context)
        changed = unet(x, torch.tensor([10.0, 500.0]), context, control=residuals)
    assert not torch.allclose(plain, changed)
    assert [r for r in residuals["input"] if r is not None] == [] and residuals.get("middle", []) == []
