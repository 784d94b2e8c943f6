"""ComfyUI's comfy.sd / CLIP / VAE internals packs use (issue 9): cond_stage_model and its members, clip.patcher,
clip_layer, unprojected pooled outputs, get_sd / load_sd, VAE(sd=...), load_clip, load_diffusion_model, checked
against the core nodes' results and hand computations; a pack uses them through the server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfy_serverless.models.checkpoint_files import open_checkpoint
from comfy_serverless.models.clip_surface import diffusion_model_from_state_dict, vae_from_state_dict
from comfy_serverless.models.loading import load_checkpoint, load_unet, load_vae
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_vae

TEXT = "a (red:1.3) cat on a (blue:0.8) mat"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """models/{checkpoints,text_encoders,vae,diffusion_models} with tiny SD1.5 and SDXL files."""
    base = tmp_path_factory.mktemp("sd-surface")
    folder = base / "models"
    for sub in ("checkpoints", "text_encoders", "vae", "diffusion_models"):
        (folder / sub).mkdir(parents=True)
    for arch, seed in (("sd15", 1), ("sdxl", 2)):
        make_test_checkpoint(arch, "tiny", folder / "checkpoints" / f"tiny-{arch}.safetensors", seed=seed)
    make_test_checkpoint("sd15", "tiny", folder / "checkpoints" / "other-sd15.safetensors", seed=7)
    make_test_vae(folder / "vae" / "vae.safetensors", seed=3)
    parts = open_checkpoint(folder / "checkpoints" / "tiny-sd15.safetensors")
    save_file({"text_model." + key: value.contiguous() for key, value in parts.text_encoders["clip_l"].items()},
              folder / "text_encoders" / "clip_l.safetensors",
              metadata={"comfy_serverless.test_checkpoint": "text-encoder-clip_l"})
    save_file({key: value.contiguous() for key, value in parts.unet.items()},
              folder / "diffusion_models" / "unet.safetensors")
    return base


def checkpoint(models, arch):
    return load_checkpoint(str(models / "models" / "checkpoints" / f"tiny-{arch}.safetensors"))


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def clip(request, models):
    return checkpoint(models, request.param)[1]


# -- CLIP -------------------------------------------------------------------------------------------------------

def test_cond_stage_model_encodes_like_encode_from_tokens(clip):
    tokens = clip.tokenize(TEXT, return_word_ids=True)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    stage = clip.cond_stage_model
    assert stage is clip.cond_stage_model  # one per CLIP object: options persist between calls
    got_cond, got_pooled = stage.encode_token_weights(tokens)
    assert torch.equal(got_cond, cond) and torch.equal(got_pooled, pooled)
    if clip.family == "sdxl":
        cond_l, _ = stage.clip_l.encode_token_weights(tokens["l"])
        cond_g, pooled_g = stage.clip_g.encode_token_weights(tokens["g"])
        assert torch.equal(torch.cat([cond_l, cond_g], dim=-1), cond) and torch.equal(pooled_g, pooled)
        assert (stage.clip_l.layer, stage.clip_l.layer_idx, stage.clip_l.layer_norm_hidden_state) == (
            "hidden", -2, False)
    else:
        assert torch.equal(stage.clip_l.encode_token_weights(tokens["l"])[0], cond)
        assert (stage.clip_l.layer, stage.clip_l.layer_idx) == ("last", None)


def test_layer_options_match_clip_layer(clip):
    tokens = clip.tokenize(TEXT)
    default = clip.encode_from_tokens(tokens)
    shallow = clip.clone()
    shallow.clip_layer(-3)
    assert shallow.layer_idx == -3 and clip.layer_idx is None
    want = shallow.encode_from_tokens(tokens)
    assert not torch.equal(want, default)
    stage = clip.cond_stage_model
    stage.set_clip_options({"layer": -3})
    assert torch.equal(stage.encode_token_weights(tokens)[0], want)
    stage.reset_clip_options()
    assert torch.equal(stage.encode_token_weights(tokens)[0], default)
    # A layer beyond the depth is the final, final-normed output, as in ComfyUI.
    member = stage.members[0]
    member.set_clip_options({"layer": -99})
    assert member.layer == "last"
    model = member.transformer
    ids = torch.tensor([[token for token, _ in clip.tokenize("a cat")[stage.clip_name][0]]])
    expected, _ = model(ids, hidden_layer=-1, normalize_hidden=True)
    got, _ = member.encode_token_weights(clip.tokenize("a cat")[stage.clip_name])
    torch.testing.assert_close(got, expected.float())
    stage.reset_clip_options()


def test_unprojected_pooled_is_before_the_text_projection(clip):
    tokens = clip.tokenize(TEXT)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    got_cond, unprojected = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    assert torch.equal(got_cond, cond)
    if clip.family == "sdxl":
        projection = clip.cond_stage_model.clip_g.transformer.text_projection.float()
        assert unprojected.shape[-1] == projection.shape[0] and not torch.equal(unprojected, pooled)
        torch.testing.assert_close(unprojected @ projection, pooled, rtol=2e-2, atol=2e-3)  # bf16 matmul
    else:  # CLIP-L has no projection
        assert torch.equal(unprojected, pooled)
    assert clip.cond_stage_model.members[-1].return_projected_pooled  # options reset afterwards


def test_tokens_of_the_wrong_shape_are_refused(clip):
    stage = clip.cond_stage_model
    with pytest.raises(ValueError, match="tokenize"):
        stage.encode_token_weights({"h": clip.tokenize("a")["l"]})
    with pytest.raises(TypeError, match="list of token windows"):
        stage.members[0].encode_token_weights(clip.tokenize("a"))


def test_patcher_and_load_model(clip):
    patcher = clip.load_model()
    assert clip.handle.is_loaded and patcher.model is clip.cond_stage_model
    assert str(patcher.load_device) == str(patcher.offload_device) == "cpu"
    assert patcher.model_dtype() == clip.dtype and patcher.model_size() > 0


def test_get_sd_and_load_sd(models):
    _, clip, _ = checkpoint(models, "sd15")
    _, other, _ = load_checkpoint(str(models / "models" / "checkpoints" / "other-sd15.safetensors"))
    tokens = clip.tokenize(TEXT)
    sd = other.get_sd()
    assert all(key.startswith("clip_l.transformer.text_model.") for key in sd)
    target = clip.clone()
    missing, unexpected = target.load_sd(dict(sd, **{"clip_l.unknown": torch.zeros(1)}), full_model=True)
    assert missing == [] and unexpected == ["clip_l.unknown"]
    assert torch.equal(target.encode_from_tokens(tokens), other.encode_from_tokens(tokens))
    assert not torch.equal(clip.encode_from_tokens(tokens), other.encode_from_tokens(tokens))  # clip unchanged
    # One tower in transformers' names, as ComfyUI's cond_stage_model.load_sd takes it; one key left out.
    tower = {"text_model." + key[len("clip_l.transformer.text_model."):]: value for key, value in sd.items()}
    dropped = sorted(tower)[0]
    del tower[dropped]
    missing, unexpected = clip.clone().load_sd(tower)
    assert missing == ["clip_l.transformer.text_model." + dropped[len("text_model."):]] and unexpected == []


# -- VAE --------------------------------------------------------------------------------------------------------

def test_vae_from_a_state_dict_decodes_like_the_loader(models):
    from safetensors.torch import load_file

    path = models / "models" / "vae" / "vae.safetensors"
    loader = load_vae(str(path))
    built = vae_from_state_dict(load_file(path))
    latent = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(built.decode(latent), loader.decode(latent))
    again = vae_from_state_dict(loader.get_sd())
    assert torch.equal(again.decode(latent), loader.decode(latent))
    assert loader.first_stage_model is loader.handle.get()
    with pytest.raises(Exception, match="expected a VAE"):
        vae_from_state_dict({"foo": torch.zeros(1)})


def test_vae_process_and_memory_estimates(models):
    _, _, vae = checkpoint(models, "sd15")
    image = torch.tensor([0.0, 0.25, 1.0])
    assert vae.process_input(image).tolist() == [-1.0, -0.5, 1.0]
    assert vae.process_output(torch.tensor([-3.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]
    ratio = vae.downscale_ratio
    assert vae.memory_used_encode((1, 3, 64, 32), torch.float32) == 1767 * 64 * 32 * 4
    assert vae.memory_used_decode((1, 4, 8, 4), torch.float16) == 2178 * 8 * 4 * ratio * ratio * 2


# -- UNet -------------------------------------------------------------------------------------------------------

def test_diffusion_model_from_a_state_dict_is_the_unet_files(models):
    from safetensors.torch import load_file

    path = models / "models" / "diffusion_models" / "unet.safetensors"
    model = diffusion_model_from_state_dict(load_file(path))
    reference = load_unet(str(path))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    want = reference.unet_apply(x, torch.tensor([500.0]), context=context)
    assert want.abs().max() > 0.01
    assert torch.equal(model.unet_apply(x, torch.tensor([500.0]), context=context), want)


# -- through the server ----------------------------------------------------------------------------------------

@pytest.fixture
def surface_server(start_server, tmp_path, models):
    base = tmp_path / "surface"
    for sub in ("checkpoints", "text_encoders", "vae", "diffusion_models"):
        (base / "models" / sub).mkdir(parents=True)
        for file in (models / "models" / sub).iterdir():
            (base / "models" / sub / file.name).hardlink_to(file)
    return start_server(packs=("comfy_style/sd_surface.py",), base=base)


def test_a_pack_uses_the_comfy_sd_surface_through_the_server(surface_server):
    from PIL import Image

    srv = surface_server
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}}
    report = srv.run({"1": loader, "2": {"class_type": "SdSurfaceReport", "inputs": {
        "clip": ["1", 1], "vae": ["1", 2], "text": TEXT, "text_encoder": "clip_l.safetensors",
        "vae_file": "vae.safetensors", "unet_file": "unet.safetensors"}}})
    assert report["status"]["status_str"] == "success", report["status"]
    assert report["outputs"]["2"]["facts"] == [{
        "kinds": [True, False, True, False], "stage_same": True, "unprojected_shape": [1, 32],
        "patcher": ["cpu", True], "load_clip_same": True, "is_clip": True,
        "refusals": ["CLIP type SD3 is not supported by this server",
                     "this node needs ComfyUI's comfy.sd.VAE without a state dict",
                     "model_options dtype torch.float8_e4m3fn"], "vae_sd_same": True, "is_vae": True,
        "vae_sd_keys": True, "process": [1.0, 1.0], "unet_same": True}]

    def txt2img(arch: str, encoder: str, prefix: str) -> Path:
        prompt = {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"tiny-{arch}.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": encoder, "inputs": {"text": TEXT, "clip": ["4", 1]}},
            "7": {"class_type": encoder, "inputs": {"text": "", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return srv.base / "output" / f"{prefix}_00001_.png"

    for arch in ("sd15", "sdxl"):
        ours = txt2img(arch, "SdSurfaceAdvancedEncode", f"pack-{arch}")
        core = txt2img(arch, "CLIPTextEncode", f"core-{arch}")
        assert Image.open(ours).tobytes() == Image.open(core).tobytes(), arch
