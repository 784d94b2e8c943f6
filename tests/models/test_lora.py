"""LoRA files: every layout maps onto our parameters, patches equal the hand computation, undo is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from comfy_serverless.models.checkpoint_files import CheckpointError, open_checkpoint, open_state_dict
from comfy_serverless.models.lora import (
    LoraEntry,
    apply_lora,
    apply_loras,
    diffusers_unet_name,
    load_lora,
    parse_lora,
)
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_lora, tiny_unet_config
from comfy_serverless.networks.build import UNET_PREFIX, build_from_state_dict, random_state_dict
from comfy_serverless.networks.clip import load_text_model
from comfy_serverless.networks.unet import UNetModel


def load_models(path) -> dict[str, torch.nn.Module]:
    parts = open_checkpoint(path)
    arch = parts.architecture
    models = {"unet": build_from_state_dict(lambda: UNetModel(arch.unet_config), parts.unet)}
    for name, weights in parts.text_encoders.items():
        models[name] = load_text_model(weights, arch.text_encoders[name].config)
    return models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def checkpoints(folder):
    paths = {}
    for arch in ("sd15", "sd2", "sdxl"):
        paths[arch] = folder / f"{arch}.safetensors"
        make_test_checkpoint(arch, "tiny", paths[arch])
    return paths


def lora_file(folder, arch: str, layout: str):
    path = folder / f"{arch}-{layout}.safetensors"
    if not path.exists():
        make_test_lora(arch, path, layout=layout)
    return path


# Hand-checked diffusers -> LDM names for the tiny SD1 UNet (levels of 32/64/64 channels, attention on the first
# two, one res block per level).
TINY_SD15_NAMES = {
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.2.resnets.0.time_emb_proj": "input_blocks.5.0.emb_layers.1",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0":
        "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.3.2.conv",
    "up_blocks.2.resnets.1.conv_shortcut": "output_blocks.5.0.skip_connection",
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_2": "time_embed.2",
}


def test_diffusers_names_of_tiny_sd15():
    config = tiny_unet_config("sd15")
    assert {diffusers_unet_name(ldm, config): ldm for ldm in TINY_SD15_NAMES.values()} == TINY_SD15_NAMES


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_names_match_the_diffusers_converter(family):
    config = dataclasses.replace(tiny_unet_config(family), num_res_blocks=2)
    weights = random_state_dict(lambda: UNetModel(config), generator=torch.Generator().manual_seed(0), std=1.0,
                                affine_std=1.0)
    converter_config = {"layers_per_block": config.num_res_blocks}
    if config.adm_in_channels:
        converter_config["addition_embed_type"] = "text_time"
    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + key: value for key, value in weights.items()},
                                            converter_config)
    # Every tensor is random, so its values identify it.
    ours_by_value = {(tuple(value.shape), tuple(value.flatten()[:4].tolist())): key for key, value in weights.items()}
    assert len(ours_by_value) == len(weights) == len(converted)
    for theirs, value in converted.items():
        ours = ours_by_value[(tuple(value.shape), tuple(value.flatten()[:4].tolist()))]
        module, _, leaf = ours.rpartition(".")
        assert f"{diffusers_unet_name(module, config)}.{leaf}" == theirs


@pytest.mark.parametrize("layout", ["kohya", "kohya-ldm", "diffusers"])
def test_layouts_map_every_entry_for_sd15(folder, checkpoints, layout):
    models = load_models(checkpoints["sd15"])
    patches = load_lora(lora_file(folder, "sd15", layout), models)
    assert patches.unmapped == []
    unet = patches.targets["unet"]
    assert "input_blocks.1.1.proj_in.weight" in unet  # SD1's 1x1 conv projection
    assert "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight" in unet
    assert "encoder.layers.2.mlp.fc2.weight" in patches.targets["clip_l"]
    if layout.startswith("kohya"):
        assert unet["input_blocks.1.0.in_layers.2.weight"][0].down.shape[2:] == (3, 3)  # LoCon conv


def expected_weight(weight: torch.Tensor, entry: LoraEntry, strength: float) -> torch.Tensor:
    """The update written out by hand: W + strength * alpha / rank * up @ down."""
    up, down = entry.up.float(), entry.down.float()
    rank = down.shape[0]
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    scale = (entry.alpha if entry.alpha is not None else rank) / rank
    return (weight.float() + strength * scale * product.reshape(weight.shape)).to(weight.dtype)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_patched_weights_equal_the_hand_computation_and_undo_restores(folder, checkpoints, layout):
    models = load_models(checkpoints["sd15"])
    patches = load_lora(lora_file(folder, "sd15", layout), models)
    unet = models["unet"]
    before = {name: (param, param.detach().clone()) for name, param in unet.named_parameters()}

    applied = apply_lora(unet, patches.targets["unet"], strength=0.7)
    for name in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.1.1.proj_in.weight",
                 "middle_block.1.transformer_blocks.0.ff.net.2.weight"):
        (entry,) = patches.targets["unet"][name]
        patched = dict(unet.named_parameters())[name]
        assert patched is not before[name][0]
        torch.testing.assert_close(patched, expected_weight(before[name][1], entry, 0.7), rtol=0, atol=2e-3)
    if layout == "kohya":  # a 3x3 conv LoRA: down [r, in, 3, 3], up [out, r, 1, 1]
        name = "input_blocks.1.0.in_layers.2.weight"
        (entry,) = patches.targets["unet"][name]
        torch.testing.assert_close(dict(unet.named_parameters())[name],
                                   expected_weight(before[name][1], entry, 0.7), rtol=0, atol=2e-3)
    # The base tensors (memory-mapped file data) were never written to.
    for name, (original, copy) in before.items():
        assert torch.equal(original, copy)

    applied.undo()
    for name, param in unet.named_parameters():
        assert param is before[name][0]


def test_openclip_qkv_loras_patch_the_split_projections(folder, checkpoints):
    """SD2's OpenCLIP encoder stores q/k/v fused; loaded, they are separate views of it, patched one at a time."""
    models = load_models(checkpoints["sd2"])
    patches = load_lora(lora_file(folder, "sd2", "kohya"), models)
    assert patches.unmapped == []
    model = models["clip_h"]
    names = [f"encoder.layers.1.self_attn.{part}_proj.weight" for part in "qkv"]
    assert all(len(patches.targets["clip_h"][name]) == 1 for name in names)
    originals = {name: model.get_parameter(name).detach().clone() for name in names}
    (entry,) = patches.targets["clip_h"][names[1]]
    applied = apply_lora(model, {names[1]: [entry]}, strength=1.0)
    torch.testing.assert_close(model.get_parameter(names[1]), expected_weight(originals[names[1]], entry, 1.0),
                               rtol=0, atol=2e-3)
    assert torch.equal(model.get_parameter(names[0]), originals[names[0]])
    assert torch.equal(model.get_parameter(names[2]), originals[names[2]])
    applied.undo()
    assert torch.equal(model.get_parameter(names[1]), originals[names[1]])


def test_sdxl_kohya_and_diffusers_cover_both_text_encoders(folder, checkpoints):
    models = load_models(checkpoints["sdxl"])
    for layout in ("kohya", "diffusers"):
        patches = load_lora(lora_file(folder, "sdxl", layout), models)
        assert patches.unmapped == [] and set(patches.targets) == {"unet", "clip_l", "clip_g"}


def test_unmapped_keys_are_reported(folder, checkpoints):
    models = load_models(checkpoints["sd15"])
    lora = dict(open_state_dict(lora_file(folder, "sd15", "kohya")))
    extra = {
        "lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 8),  # unknown module
        "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 4),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),  # SD1 has no te2
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4),  # LoHa: not supported
        "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight": torch.zeros(4, 7),  # wrong shape
        "lora_unet_down_blocks_0_attentions_0_proj_out.lora_up.weight": torch.zeros(32, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_out.alpha": torch.tensor(2.0),
        "lora_unet_mid_block_resnets_0_time_emb_proj.lora_down.weight": torch.zeros(4, 128),  # no up
    }
    lora.pop("lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight")
    patches = parse_lora({**lora, **extra}, models)
    assert sorted(patches.unmapped) == sorted(extra)
    assert "input_blocks.1.1.proj_in.weight" in patches.targets["unet"]


def test_tucker_conv_and_diffusers_processor_keys(checkpoints):
    models = load_models(checkpoints["sd15"])
    generator = torch.Generator().manual_seed(1)
    conv = "mid_block.resnets.0.conv1"  # [64, 64, 3, 3]
    processor = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora"
    lora = {
        f"lora_unet_{conv.replace('.', '_')}.lora_down.weight": torch.randn(2, 64, 1, 1, generator=generator),
        f"lora_unet_{conv.replace('.', '_')}.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=generator),
        f"lora_unet_{conv.replace('.', '_')}.lora_up.weight": torch.randn(64, 2, 1, 1, generator=generator),
        f"lora_unet_{conv.replace('.', '_')}.alpha": torch.tensor(1.0),
        f"{processor}.down.weight": torch.randn(2, 32, generator=generator),
        f"{processor}.up.weight": torch.randn(32, 2, generator=generator),
    }
    patches = parse_lora(lora, models)
    assert patches.unmapped == []
    (entry,) = patches.targets["unet"]["middle_block.0.in_layers.2.weight"]
    unet = models["unet"]
    original = unet.get_parameter("middle_block.0.in_layers.2.weight").detach().clone()
    applied = apply_lora(unet, patches.targets["unet"], strength=1.0)
    # Tucker core by hand: W[o, i, y, x] += alpha / rank * sum_ab up[o, a] mid[a, b, y, x] down[b, i]
    up, mid, down = entry.up.flatten(1), entry.mid, entry.down.flatten(1)
    delta = torch.zeros(64, 64, 3, 3)
    for a in range(2):
        for b in range(2):
            delta += up[:, a, None, None, None] * mid[a, b][None, None] * down[b][None, :, None, None]
    want = (original.float() + 0.5 * delta).half()
    torch.testing.assert_close(unet.get_parameter("middle_block.0.in_layers.2.weight"), want, rtol=0, atol=2e-3)
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight" in patches.targets["unet"]
    applied.undo()


def test_whole_weight_and_bias_differences(checkpoints):
    """ComfyUI's ".diff" / ".diff_b" keys (LoraSave's full_diff and bias_diff) add whole differences."""
    models = load_models(checkpoints["sd15"])
    generator = torch.Generator().manual_seed(2)
    conv = "lora_unet_mid_block_resnets_0_conv1"  # [64, 64, 3, 3] with a bias
    weight_diff = torch.randn(64, 64, 3, 3, generator=generator)
    bias_diff = torch.randn(64, generator=generator)
    lora = {f"{conv}.diff": weight_diff, f"{conv}.diff_b": bias_diff,
            "lora_unet_mid_block_resnets_0_conv2.diff": torch.randn(3, generator=generator)}  # wrong size
    patches = parse_lora(lora, models)
    assert patches.unmapped == ["lora_unet_mid_block_resnets_0_conv2.diff"]
    unet = models["unet"]
    weight, bias = "middle_block.0.in_layers.2.weight", "middle_block.0.in_layers.2.bias"
    originals = [unet.get_parameter(name).detach().clone() for name in (weight, bias)]
    applied = apply_lora(unet, patches.targets["unet"], strength=0.5)
    for name, original, diff in zip((weight, bias), originals, (weight_diff, bias_diff)):
        want = (original.float() + 0.5 * diff).to(original.dtype)
        torch.testing.assert_close(unet.get_parameter(name), want, rtol=0, atol=2e-3)
    applied.undo()
    assert torch.equal(unet.get_parameter(weight), originals[0])


def test_stacked_loras_equal_one_after_the_other(folder, checkpoints):
    models = load_models(checkpoints["sd15"])
    unet = models["unet"]
    first = load_lora(lora_file(folder, "sd15", "kohya"), models).targets["unet"]
    second = load_lora(lora_file(folder, "sd15", "diffusers"), models).targets["unet"]
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    together = apply_loras(unet, [(first, 0.5), (second, -1.0)])
    both = unet.get_parameter(name).detach().clone()
    together.undo()
    one = apply_lora(unet, first, 0.5)
    two = apply_lora(unet, second, -1.0)
    torch.testing.assert_close(unet.get_parameter(name), both, rtol=0, atol=2e-3)
    with pytest.raises(RuntimeError, match="reverse order"):
        one.undo()
    two.undo()
    one.undo()


def test_a_checkpoint_is_not_a_lora(checkpoints):
    models = load_models(checkpoints["sd15"])
    with pytest.raises(CheckpointError, match="not a LoRA"):
        load_lora(checkpoints["sd15"], models)
