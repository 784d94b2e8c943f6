"""ComfyUI's comfy.lora for packs (issue 9): key maps + load_lora + add_patches give LoraLoader's weights."""

from __future__ import annotations

import logging

import pytest
import torch

from comfy_serverless.catalog import comfy_modules
from comfy_serverless.models.loading import apply_lora_file, load_checkpoint
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_lora

PACK = "comfy_style/lora_stack.py"


@pytest.fixture(scope="module")
def comfy_lora():
    comfy_modules.install()
    import comfy.lora

    return comfy.lora


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    checkpoint = base / f"{request.param}.safetensors"
    make_test_checkpoint(request.param, "tiny", checkpoint, seed=4)
    loras = {}
    for layout in ("kohya", "diffusers"):
        loras[layout] = base / f"{layout}.safetensors"
        make_test_lora(request.param, loras[layout], layout=layout, seed=5)
    return checkpoint, loras


def _unet_weights(model) -> dict:
    return {k: v.clone() for k, v in model.model_state_dict().items()}


def _clip_weights(clip) -> dict:
    return {k: v.clone() for k, v in clip.model_state_dict().items()}


def _pack_way(comfy_lora, model, clip, path, strength_model, strength_clip):
    from safetensors.torch import load_file

    lora = load_file(str(path))
    key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, comfy_lora.model_lora_keys_unet(model.model, {}))
    patches = comfy_lora.load_lora(lora, key_map)
    m, c = model.clone(), clip.clone()
    m.add_patches(patches, strength_model)
    c.add_patches(patches, strength_clip)
    return m, c, patches


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_load_lora_and_add_patches_give_loraloaders_weights(comfy_lora, family, layout):
    checkpoint, loras = family
    model, clip, _ = load_checkpoint(str(checkpoint))
    base_unet = _unet_weights(model)
    theirs_model, theirs_clip, patches = _pack_way(comfy_lora, model, clip, loras[layout], 0.7, -0.4)
    ours_model, ours_clip = apply_lora_file(str(loras[layout]), model, clip, 0.7, -0.4)
    assert all(value[0] == "lora" for value in patches.values())
    theirs, ours = _unet_weights(theirs_model), _unet_weights(ours_model)
    changed = [k for k in ours if not torch.equal(ours[k], base_unet[k])]
    assert len(changed) > 4
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    theirs, ours, base = _clip_weights(theirs_clip), _clip_weights(ours_clip), _clip_weights(clip)
    assert sum(not torch.equal(ours[k], base[k]) for k in ours) >= 6
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_the_patch_is_alpha_over_rank_times_up_down(comfy_lora, family):
    checkpoint, loras = family
    model, clip, _ = load_checkpoint(str(checkpoint))
    from safetensors.torch import load_file

    lora = load_file(str(loras["kohya"]))
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    patches = comfy_lora.load_lora(lora, key_map, log_missing=False)
    key, (_, (up, down, alpha, mid, dora, reshape)) = next(iter(patches.items()))
    assert mid is None and dora is None and reshape is None and alpha == down.shape[0] / 2
    base = model.model_state_dict()[key].float()
    patched = model.clone()
    patched.add_patches({key: patches[key]}, 2.0, 0.5)
    expected = base * 0.5 + 2.0 * (alpha / down.shape[0]) * (up.float().flatten(1) @ down.float().flatten(1)).reshape(
        base.shape)
    got = patched.model_state_dict()[key]
    assert torch.equal(got, expected.to(got.dtype))  # computed in float32, stored in the weight's dtype


def test_key_maps_use_comfyuis_names(comfy_lora, family):
    checkpoint, _ = family
    model, clip, _ = load_checkpoint(str(checkpoint))
    unet = comfy_lora.model_lora_keys_unet(model.model, {})
    assert unet["lora_unet_input_blocks_1_0_in_layers_2"] == "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert unet["lora_unet_down_blocks_0_resnets_0_conv1"] == "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert unet["diffusion_model.out.2"] == "diffusion_model.out.2.weight"
    assert unet["diffusion_model.out.2.bias"] == "diffusion_model.out.2.bias"
    known = set(model.model_state_dict())
    assert set(unet.values()) <= known
    te = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, {})
    assert set(te.values()) <= set(clip.model_state_dict())
    q = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert te["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == q
    assert te["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == q
    if "clip_g.transformer.text_projection.weight" in known | set(clip.model_state_dict()):
        g = "clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        assert te["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == g
        assert te["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"] == g
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in te  # clip_l's, as ComfyUI maps it


def test_unknown_keys_are_logged_as_comfyui_does(comfy_lora, family, caplog):
    checkpoint, loras = family
    model, _, _ = load_checkpoint(str(checkpoint))
    lora = {"lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2), "lora_unet_nowhere.lora_down.weight":
            torch.zeros(2, 4), "diffusion_model.out.2.diff_b": torch.ones(4)}
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(lora, comfy_lora.model_lora_keys_unet(model.model, {}))
    assert "lora key not loaded: lora_unet_nowhere.lora_up.weight" in caplog.text
    assert "lora key not loaded: lora_unet_nowhere.lora_down.weight" in caplog.text
    assert "diff_b" not in caplog.text
    assert patches == {"diffusion_model.out.2.bias": ("diff", (lora["diffusion_model.out.2.diff_b"],))}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        comfy_lora.load_lora(lora, {}, log_missing=False)
    assert "lora key not loaded" not in caplog.text


def _dora_reference(weight, up, down, alpha, scale, strength):
    """DoRA by its definition (Liu et al. 2024): direction W + dW, magnitude `scale` per output row."""
    delta = (alpha / down.shape[0]) * up @ down
    direction = weight + delta
    norm = weight.norm(dim=1, keepdim=True)  # ComfyUI normalises by the pre-update row norm
    merged = direction * scale / (norm + torch.finfo(torch.float32).eps)
    return weight + strength * (merged - weight)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_scale_rescales_rows(comfy_lora, family, strength):
    checkpoint, _ = family
    model, _, _ = load_checkpoint(str(checkpoint))
    key = next(k for k, v in model.model_state_dict().items() if k.endswith("attn1.to_q.weight"))
    weight = model.model_state_dict()[key].float()
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(weight.shape[0], 2, generator=g), torch.randn(2, weight.shape[1], generator=g)
    scale = torch.rand(weight.shape[0], 1, generator=g) + 0.5
    patched = model.clone()
    patched.add_patches({key: ("lora", (up, down, 1.0, None, scale, None))}, strength)
    got = patched.model_state_dict()[key]
    expected = _dora_reference(weight, up, down, 1.0, scale, strength)
    assert torch.allclose(got.float(), expected.to(got.dtype).float(), rtol=1e-2, atol=1e-3)
    assert not torch.allclose(got.float(), weight, rtol=1e-2, atol=1e-3)


def test_bad_lora_patches_fail_clearly(comfy_lora, family):
    checkpoint, _ = family
    model, _, _ = load_checkpoint(str(checkpoint))
    key = "diffusion_model.out.2.weight"
    m = model.clone()
    m.add_patches({key: ("lora", (torch.zeros(3, 2), torch.zeros(2, 5), None, None, None, None))})
    with pytest.raises(ValueError, match="does not fit"):
        m.model_state_dict()
    with pytest.raises(NotImplementedError, match="reshapes"):
        model.clone().add_patches({key: ("lora", (torch.zeros(4, 1), torch.zeros(1, 4), None, None, None, [4]))})
    with pytest.raises(NotImplementedError, match="loha"):
        model.clone().add_patches({key: ("loha", (torch.zeros(1),))})
    with pytest.raises(TypeError, match="BaseModel"):
        comfy_lora.model_lora_keys_unet(object(), {})


def test_a_pack_stacks_a_lora_through_the_server(start_server, tmp_path, family):
    """The pack's node gives the same image as LoraLoader with the same file and strengths."""
    from PIL import Image

    checkpoint, loras = family
    base = tmp_path / "lora-stack"
    for folder, path in (("checkpoints", checkpoint), ("loras", loras["kohya"])):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / path.name).hardlink_to(path)
    srv = start_server("--force-fp32", packs=(PACK,), base=base)

    def txt2img(loader: str | None, prefix: str):
        source = "10" if loader else "4"
        prompt = {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
            "10": {"class_type": loader, "inputs": {"model": ["4", 0], "clip": ["4", 1], "strength_model": 0.8,
                                                   "lora_name": "kohya.safetensors", "strength_clip": 0.5}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": [source, 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [source, 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": [source, 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        }
        if not loader:
            del prompt["10"]
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return Image.open(srv.base / "output" / f"{prefix}_00001_.png").tobytes()  # pixels (the PNG holds the prompt)

    pack, core = txt2img("ComfyLoraStack", "pack"), txt2img("LoraLoader", "core")
    assert pack == core
    assert pack != txt2img(None, "plain")  # the LoRA shows


def test_text_projection_patch_in_comfyuis_orientation(comfy_lora, family):
    """ComfyUI stores text_projection as a Linear weight [P, width], ours transposed: a LoRA on it must land on the
    same numbers as seen through ComfyUI's state dict."""
    checkpoint, _ = family
    _, clip, _ = load_checkpoint(str(checkpoint))
    keys = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, {})
    name = "lora_te2_text_projection" if "lora_te2_text_projection" in keys else "lora_te1_text_projection"
    if checkpoint.stem == "sd15":  # SD1's CLIP-L has no projection weight, so there is nothing to patch
        assert not any("text_projection" in key for key in keys)
        return
    key = keys[name]
    base = clip.model_state_dict()[key].float()
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(base.shape[0], 2, generator=g), torch.randn(2, base.shape[1], generator=g)
    patches = comfy_lora.load_lora({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}, keys)
    patched = clip.clone()
    assert patched.add_patches(patches, 0.5) == [key]
    got = patched.model_state_dict()[key]
    assert torch.equal(got, (base + 0.5 * (up @ down)).to(got.dtype))


def test_tucker_mid_and_dora_scale_are_read_from_the_file(comfy_lora, family, tmp_path):
    """A LoCon entry with a Tucker core patches as LoraLoader does; a .dora_scale rides along in the patch."""
    from safetensors.torch import save_file

    checkpoint, _ = family
    model, _, _ = load_checkpoint(str(checkpoint))
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    out, inp = model.model_state_dict()[key].shape[:2]
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_input_blocks_1_0_in_layers_2"
    lora = {f"{name}.lora_down.weight": torch.randn(2, inp, 1, 1, generator=g) * 0.1,
            f"{name}.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=g) * 0.1,
            f"{name}.lora_up.weight": torch.randn(out, 2, 1, 1, generator=g) * 0.1, f"{name}.alpha": torch.tensor(1.0)}
    path = tmp_path / "locon.safetensors"
    save_file(lora, str(path))
    patches = comfy_lora.load_lora(lora, comfy_lora.model_lora_keys_unet(model.model, {}))
    assert list(patches) == [key] and patches[key][1][3] is not None
    theirs = model.clone()
    theirs.add_patches(patches, 0.9)
    ours, _ = apply_lora_file(str(path), model, None, 0.9, 0.0)
    assert torch.equal(theirs.model_state_dict()[key], ours.model_state_dict()[key])
    assert not torch.equal(ours.model_state_dict()[key], model.model_state_dict()[key])

    scale = torch.rand(out, 1, 1, 1, generator=g) + 0.5
    with_dora = comfy_lora.load_lora({**lora, f"{name}.dora_scale": scale}, {name: key})
    assert with_dora[key][1][4] is scale
    norms = model.clone()
    norms.add_patches(with_dora, 1.0)
    rows = norms.model_state_dict()[key].float().flatten(1).norm(dim=1)
    base_rows = model.model_state_dict()[key].float().flatten(1).norm(dim=1)
    plain = model.clone()
    plain.add_patches(patches, 1.0)
    direction = plain.model_state_dict()[key].float().flatten(1).norm(dim=1)  # |W + dW|
    # DoRA at strength 1: row norms become dora_scale * |W + dW| / |W| (ComfyUI divides by the pre-update norm).
    assert torch.allclose(rows, scale.flatten() * direction / base_rows, rtol=2e-2)


def test_calculate_weight_matches_add_patches(comfy_lora, family):
    """GGUF-style packs patch weights themselves with comfy.lora.calculate_weight."""
    checkpoint, loras = family
    model, _, _ = load_checkpoint(str(checkpoint))
    from safetensors.torch import load_file

    patches = comfy_lora.load_lora(load_file(str(loras["kohya"])), comfy_lora.model_lora_keys_unet(model.model, {}),
                                   log_missing=False)
    key, value = next(iter(patches.items()))
    base = model.model_state_dict()[key].float()
    extra = torch.full_like(base, 0.01)
    got = comfy_lora.calculate_weight([(0.6, value, 1.0), (2.0, ("diff", (extra,)), 0.5, None, None)], base.clone(),
                                      key)
    patched = model.clone()
    patched.add_patches({key: value}, 0.6)
    lora_only = comfy_lora.calculate_weight([(0.6, value, 1.0)], base.clone(), key)
    assert torch.equal(lora_only.to(patched.model_state_dict()[key].dtype), patched.model_state_dict()[key])
    assert torch.allclose(got, lora_only * 0.5 + 0.02, atol=1e-7)
    with pytest.raises(NotImplementedError, match="offset"):
        comfy_lora.calculate_weight([(1.0, value, 1.0, (0, 0, 4))], base.clone(), key)
    assert comfy_lora.LORA_CLIP_MAP["self_attn.q_proj"] == "self_attn_q_proj"
