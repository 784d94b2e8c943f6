"""Opening, recognising and splitting single-file checkpoints; clear errors for files that are not one."""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import pytest
import torch

from comfy_serverless.models.checkpoint_files import (
    CheckpointError,
    detect_architecture,
    open_checkpoint,
    open_state_dict,
    open_vae,
    read_metadata,
    split_checkpoint,
    split_vae,
)
from comfy_serverless.models.random_checkpoints import (
    ARCHES,
    checkpoint_configs,
    make_test_checkpoint,
    make_test_lora,
    make_test_vae,
    tiny_unet_config,
    tiny_vae_config,
)
from comfy_serverless.networks.build import UNET_PREFIX, build_from_state_dict, build_on_meta
from comfy_serverless.networks.clip import CLIPTextModel, SD1TextEncoder, load_text_model, to_openclip_layout
from comfy_serverless.networks.unet import UNetModel
from comfy_serverless.networks.vae import AutoencoderKL, VAEConfig
from conftest import resident_fraction

FAMILY = {"sd15": "sd15", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for arch in ARCHES:
        paths[arch] = folder / f"{arch}.safetensors"
        make_test_checkpoint(arch, "tiny", paths[arch])
    return paths


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_checkpoint_round_trips_with_strict_loading(files, arch):
    parts = open_checkpoint(files[arch])
    found = parts.architecture
    unet_config, vae_config, text = checkpoint_configs(arch, "tiny")
    assert (found.family, found.size) == (FAMILY[arch], "custom")
    assert found.prediction == ("v_prediction" if arch == "sd2-v" else "eps")
    assert found.unet_config == unet_config
    assert dataclasses.replace(found.vae_config, scaling_factor=vae_config.scaling_factor) == vae_config
    assert {name: (spec.prefix, spec.config) for name, spec in found.text_encoders.items()} == text

    unet = build_from_state_dict(lambda: UNetModel(found.unet_config), parts.unet)
    vae = build_from_state_dict(lambda: AutoencoderKL(found.vae_config), parts.vae)
    encoders = {name: load_text_model(weights, found.text_encoders[name].config)
                for name, weights in parts.text_encoders.items()}
    assert unet.dtype == vae.dtype == torch.float16
    # Real token ids (start/end tokens near the top of the 49408 vocabulary) go through the tiny encoders.
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    for encoder in encoders.values():
        hidden, pooled = encoder.float()(ids)
        assert hidden.shape == (1, 77, encoder.config.width) and torch.isfinite(pooled).all()


def test_tiny_sd15_runs_end_to_end(files):
    parts = open_checkpoint(files["sd15"])
    arch = parts.architecture
    unet = build_from_state_dict(lambda: UNetModel(arch.unet_config), parts.unet, dtype=torch.float32)
    text = SD1TextEncoder(load_text_model(parts.text_encoders["clip_l"], arch.text_encoders["clip_l"].config,
                                          dtype=torch.float32))
    context, _ = text.encode([[(49406, 1.0), (320, 1.0)] + [(49407, 1.0)] * 75])
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 500.0, context)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_split_shares_the_loaded_tensors(files):
    state_dict = open_state_dict(files["sdxl"])
    arch = detect_architecture(state_dict, read_metadata(files["sdxl"]))
    unet, text, vae = split_checkpoint(state_dict, arch)
    assert unet["input_blocks.0.0.weight"] is state_dict[UNET_PREFIX + "input_blocks.0.0.weight"]
    assert vae["decoder.conv_in.weight"] is state_dict["first_stage_model.decoder.conv_in.weight"]
    token_key = "conditioner.embedders.1.model.token_embedding.weight"
    assert text["clip_g"]["token_embedding.weight"] is state_dict[token_key]
    # Extras the models do not have are left out, so strict loading needs no special cases.
    assert "logit_scale" not in text["clip_g"]
    assert "embeddings.position_ids" not in text["clip_l"]


def mapped_files() -> list[tuple[int, int, str]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((low, high, fields[-1] if len(fields) >= 6 else ""))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_safetensors_tensors_are_views_of_a_memory_map(files):
    state_dict = open_state_dict(files["sd15"])
    ranges = mapped_files()
    path = os.path.realpath(files["sd15"])
    for name in ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_in.weight",
                 "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        address = state_dict[name].data_ptr()
        owners = [file for low, high, file in ranges if low <= address < high]
        assert owners == [path], f"{name} is not in a map of the checkpoint file"


def test_opening_a_safetensors_file_reads_none_of_its_tensors(tmp_path):
    """safetensors' own loader read the start of every tensor as it opened a file; where the page cache holds the
    file in large folios, each read mapped up to 2 MB of weights nothing had used yet (0.6 GB of SD1.5's)."""
    from safetensors.torch import save_file

    from comfy_serverless.networks.file_pages import in_unwritten_file_mapping

    weights = {"conv.weight": torch.randn(512, 1024), "half.weight": torch.randn(1024, 1024).half(),
               "bias": torch.randn(7), "ids": torch.arange(77).view(1, 77), "empty": torch.zeros(0, 3)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    opened = open_state_dict(tmp_path / "model.safetensors")
    assert resident_fraction(opened["conv.weight"]) == 0 and resident_fraction(opened["half.weight"]) == 0
    assert all(in_unwritten_file_mapping(opened[name]) for name in ("conv.weight", "half.weight", "bias"))
    assert opened.keys() == weights.keys()
    assert all(opened[name].dtype == value.dtype and torch.equal(opened[name], value)
               for name, value in weights.items())


def test_a_safetensors_file_with_unaligned_tensors_or_other_dtypes_opens_too(tmp_path):
    """Tensors that cannot be views of the map (an offset that is not a multiple of the element size; a dtype this
    reader does not name) still load, through safetensors."""
    values = {"bytes": torch.tensor([1, 2, 3], dtype=torch.uint8), "unaligned": torch.tensor([1.5, -2.0]),
              "fp8": torch.tensor([0.5, 1.0]).to(torch.float8_e4m3fn)}
    header, data = {}, b""
    for name, value in values.items():
        raw = value.view(torch.uint8).numpy().tobytes()
        dtype = {torch.uint8: "U8", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}[value.dtype]
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    opened = open_state_dict(tmp_path / "odd.safetensors")
    assert all(opened[name].dtype == value.dtype and torch.equal(opened[name].view(torch.uint8),
                                                                 value.view(torch.uint8))
               for name, value in values.items())


def test_pickle_checkpoint_loads_with_weights_only(files, tmp_path):
    state_dict = open_state_dict(files["sd15"])
    zip_path, legacy_path = tmp_path / "model.ckpt", tmp_path / "legacy.pt"
    torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6}, zip_path)
    torch.save(state_dict, legacy_path, _use_new_zipfile_serialization=False)
    for path in (zip_path, legacy_path):
        parts = open_checkpoint(path)
        assert parts.architecture.family == "sd15" and parts.metadata == {}
        build_from_state_dict(lambda: UNetModel(parts.architecture.unet_config), parts.unet)


def test_sd2_prediction_without_metadata_follows_comfyui_bias_rule(files):
    # Without metadata, ComfyUI's SD2 rule reads the std of the last output transformer's norm1.bias.
    assert detect_architecture(open_state_dict(files["sd2-v"])).prediction == "v_prediction"
    eps = detect_architecture(open_state_dict(files["sd2"]))
    assert eps.prediction == "eps" and eps.prediction_reason.startswith("heuristic")


def test_v_pred_key_and_metadata_mark_v_models(files):
    state_dict = dict(open_state_dict(files["sdxl"]))
    assert detect_architecture(state_dict).prediction == "eps"
    assert detect_architecture(state_dict, {"modelspec.prediction_type": "v"}).prediction == "v_prediction"
    state_dict["v_pred"] = torch.tensor([])
    assert detect_architecture(state_dict).prediction == "v_prediction"


def meta_checkpoint(arch: str) -> dict[str, torch.Tensor]:
    """A full-size checkpoint's names and shapes with no data (meta tensors)."""
    unet_config, vae_config, text = checkpoint_configs(arch, "full")
    parts = [(UNET_PREFIX, build_on_meta(lambda: UNetModel(unet_config)).state_dict()),
             ("first_stage_model.", build_on_meta(lambda: AutoencoderKL(vae_config)).state_dict())]
    for prefix, config in text.values():  # the text encoders in their checkpoint layout
        weights = build_on_meta(lambda config=config: CLIPTextModel(config)).state_dict()
        parts.append((prefix, to_openclip_layout(weights) if config.layout == "openclip" else weights))
    return {prefix + key: value for prefix, weights in parts for key, value in weights.items()}


@pytest.mark.parametrize("arch", ["sd15", "sd2-v", "sdxl", "sdxl_refiner"])
def test_full_size_architectures_are_recognised(arch):
    found = detect_architecture(meta_checkpoint(arch), {"modelspec.prediction_type": "v" if arch == "sd2-v" else ""})
    unet_config, vae_config, text = checkpoint_configs(arch, "full")
    assert (found.family, found.size, found.unet_config, found.vae_config) == (FAMILY[arch], "full", unet_config,
                                                                               vae_config)
    assert {name: spec.config for name, spec in found.text_encoders.items()} == {
        name: config for name, (_, config) in text.items()}
    assert found.prediction == ("v_prediction" if arch == "sd2-v" else "eps")


# ---- bad files -------------------------------------------------------------------------------------


def error_for(path) -> str:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    return str(caught.value)


def test_missing_and_empty_files(tmp_path):
    assert "file not found" in error_for(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "empty" in error_for(tmp_path / "empty.safetensors")


def test_truncated_safetensors(files, tmp_path):
    data = files["sd15"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    message = error_for(tmp_path / "cut.safetensors")
    assert "truncated" in message and str(len(data) // 2) in message
    (tmp_path / "header.safetensors").write_bytes(data[:100])
    assert "truncated" in error_for(tmp_path / "header.safetensors")


def test_random_bytes_and_renamed_image(tmp_path):
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    assert "not a safetensors file" in error_for(tmp_path / "noise.safetensors")
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(200)
    (tmp_path / "picture.safetensors").write_bytes(png)
    assert "PNG image" in error_for(tmp_path / "picture.safetensors")
    (tmp_path / "picture.ckpt").write_bytes(png)
    assert "not a PyTorch checkpoint" in error_for(tmp_path / "picture.ckpt")
    (tmp_path / "noise.ckpt").write_bytes(b"\x80\x02" + os.urandom(300))
    assert "truncated or corrupt" in error_for(tmp_path / "noise.ckpt")
    header = b'{"__metadata__": {"a": "b"}}'
    (tmp_path / "no_tensors.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert "no tensors" in error_for(tmp_path / "no_tensors.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert "unknown model file type" in error_for(tmp_path / "model.onnx")


class NotATensor:
    """Pickled as a reference to this class: weights_only must refuse it."""


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": NotATensor()}, path)
    message = error_for(path)
    assert "refused to unpickle" in message and "NotATensor" in message and ".safetensors" in message
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(path.read_bytes()[:200])
    assert "truncated or corrupt" in error_for(truncated)


def write(path, tensors: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_other_architectures_are_named(files, tmp_path):
    sd3 = write(tmp_path / "sd3.safetensors", {
        "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(6, 2),
        "model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 16, 2, 2)})
    message = error_for(sd3)
    assert "SD3" in message and "joint_blocks" in message and "supported: SD1.x, SD2.x, SDXL base" in message
    flux = write(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
                                                 "single_blocks.0.linear1.weight": torch.zeros(2, 2)})
    assert "Flux" in error_for(flux)

    lora = tmp_path / "lora.safetensors"
    make_test_lora("sd15", lora)
    assert "a LoRA (load it with LoraLoader)" in error_for(lora)
    vae = tmp_path / "vae.safetensors"
    make_test_vae(vae)
    assert "a VAE on its own (load it with VAELoader)" in error_for(vae)


def test_unsupported_unet_variants(files):
    state_dict = open_state_dict(files["sd15"])
    depth = {**state_dict, UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 5, 3, 3)}
    with pytest.raises(CheckpointError, match=r"depth-conditioned model \(5 UNet input, 4 output channels\)"):
        detect_architecture(depth)
    eight_out = {**state_dict, UNET_PREFIX + "out.2.weight": torch.zeros(8, 32, 3, 3)}
    with pytest.raises(CheckpointError, match="4 UNet input, 8 output channels"):
        detect_architecture(eight_out)
    video = {**state_dict, UNET_PREFIX + "input_blocks.1.1.time_stack.0.attn1.to_q.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="video model"):
        detect_architecture(video)
    # An SDXL-shaped UNet whose text is 1024 wide matches no family: the error says what it looks like.
    mismatched = {key: (torch.zeros(value.shape[0], 1024) if key.endswith("attn2.to_k.weight") else value)
                  for key, value in open_state_dict(files["sdxl"]).items()}
    with pytest.raises(CheckpointError, match="SDXL-like UNet with text width 1024"):
        detect_architecture(mismatched)
    distilled = {key: value for key, value in state_dict.items() if ".output_blocks.5." not in key}
    with pytest.raises(CheckpointError, match="distilled or modified"):
        detect_architecture(distilled)


def test_standalone_vae_file(tmp_path, files):
    path = tmp_path / "vae.safetensors"
    make_test_vae(path)
    weights, config = open_vae(path, family="sdxl")
    assert config == dataclasses.replace(tiny_vae_config(), scaling_factor=VAEConfig.sdxl().scaling_factor)
    build_from_state_dict(lambda: AutoencoderKL(config), weights)
    # The VAE inside a checkpoint works for VAELoader too; [C, C] attention weights are viewed as 1x1 convs.
    state_dict = dict(open_state_dict(files["sd15"]))
    key = "first_stage_model.decoder.mid.attn_1.q.weight"
    state_dict[key] = state_dict[key].flatten(1)
    weights, config = split_vae(state_dict)
    assert weights["decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    build_from_state_dict(lambda: AutoencoderKL(config), weights)
    with pytest.raises(CheckpointError, match="expected a VAE"):
        open_vae(write(tmp_path / "other.safetensors", {"something.weight": torch.zeros(2)}))


def test_unet_config_from_shapes_handles_two_res_blocks(files):
    # Real checkpoints have two res blocks per level: build such a UNet's keys and detect them.
    config = dataclasses.replace(tiny_unet_config("sd15"), num_res_blocks=2)
    unet = build_on_meta(lambda: UNetModel(config)).state_dict()
    state_dict = {key: value for key, value in open_state_dict(files["sd15"]).items()
                  if not key.startswith(UNET_PREFIX)}
    state_dict.update({UNET_PREFIX + key: value for key, value in unet.items()})
    found = detect_architecture(state_dict)
    # Shapes do not show the head split: an unknown size gets its family's rule (SD1: 8 heads).
    assert found.size == "custom" and found.unet_config == dataclasses.replace(config, num_heads=8)


def test_checkpoint_without_vae_or_text_encoder_still_loads_its_unet(files):
    state_dict = {key: value for key, value in open_state_dict(files["sd15"]).items()
                  if not key.startswith(("first_stage_model.", "cond_stage_model."))}
    arch = detect_architecture(state_dict)
    assert arch.vae_config is None and arch.text_encoders == {}
    unet, text, vae = split_checkpoint(state_dict, arch)
    assert text == {} and vae == {} and len(unet) == len(state_dict)
    broken = {**state_dict, "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}
    with pytest.raises(CheckpointError, match="VAE is incomplete"):
        detect_architecture(broken)
