"""DiffusersLoader: tiny pipeline folders written by diffusers' own save_pretrained load as MODEL / CLIP / VAE
that compute what diffusers' and transformers' modules compute; the combo lists pipeline folders per request."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import transformers

from comfy_serverless.nodes.loaders_deprecated import NODE_CLASS_MAPPINGS, DiffusersLoader
from conftest import server_context


def _sd15_parts(seed: int = 0):
    """A tiny SD1-style UNet (8 heads, as detection assumes for SD1), VAE and CLIP-L-style text encoder."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407))
    for module in (unet, vae, text):  # non-trivial norms and biases, so a wrong mapping shows
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(torch.randn_like(param) * 0.05)
        module.eval()
    return unet, vae, text


def _save_pipeline(folder, unet, vae, text) -> None:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffusers-base")
    parts = _sd15_parts()
    _save_pipeline(base / "models" / "diffusers" / "tiny-sd15", *parts)
    return base, parts


def test_definition_and_combo(pipeline, tmp_path):
    assert NODE_CLASS_MAPPINGS == {"DiffusersLoader": DiffusersLoader}
    assert DiffusersLoader.CATEGORY == "advanced/loaders/deprecated"
    base, _ = pipeline
    with server_context(base_directory=str(base)):
        combo = DiffusersLoader.INPUT_TYPES()["required"]["model_path"][0]
        assert list(combo) == ["tiny-sd15"] and combo.source == "models:diffusers_pipelines"
    other = tmp_path / "other"
    (other / "models" / "diffusers" / "a" / "nested").mkdir(parents=True)
    (other / "models" / "diffusers" / "a" / "nested" / "model_index.json").write_text("{}")
    (other / "models" / "diffusers" / "not-a-pipeline").mkdir()
    with server_context(base_directory=str(other)) as own:
        assert own.folders.file_list("models:diffusers_pipelines") == ["a/nested"]


def test_loaded_parts_match_diffusers_and_transformers(pipeline):
    base, (unet, vae, text) = pipeline
    with server_context(force_fp32=True, base_directory=str(base)):
        model, clip, our_vae = DiffusersLoader().load_checkpoint("tiny-sd15")
        assert model.family == "sd15" and clip.family == "sd15" and our_vae.downscale_ratio == 2
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 8, 8, generator=generator)
        context = torch.randn(2, 5, 32, generator=generator)
        timesteps = torch.tensor([15.0, 700.0])
        with torch.no_grad():
            got = model.network()(x, timesteps, context)
            want = unet(x, timesteps, encoder_hidden_states=context).sample
        assert want.abs().max() > 0.05
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)

        ids = torch.tensor([[49406, 320, 1125, 539, 49407, 49407]])
        with torch.no_grad():
            hidden, _ = clip.handle.get().clip_l(ids, normalize_hidden=True)
            torch.testing.assert_close(hidden, text(ids).last_hidden_state, atol=1e-5, rtol=1e-5)

        network = our_vae.handle.get()
        pixels = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
        latent = torch.randn(1, 4, 8, 8, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(network.decode(latent), vae.decode(latent).sample, atol=1e-4, rtol=1e-4)
            moments = vae.encode(pixels).latent_dist
            ours = network.encode(pixels)
        assert ours.shape == (1, 4, 8, 8)
        # Our encode returns the distribution's mean or a sample; either way it sits within its spread.
        assert ((ours - moments.mean).abs() <= 6 * moments.std + 1e-4).all()


def test_bad_folders_give_clear_errors(pipeline, tmp_path):
    from comfy_serverless.models.checkpoint_files import CheckpointError

    base, (unet, vae, _) = pipeline
    broken = tmp_path / "broken" / "models" / "diffusers" / "no-text"
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{}")
    unet.save_pretrained(broken / "unet")
    vae.save_pretrained(broken / "vae")
    with server_context(base_directory=str(tmp_path / "broken")):
        with pytest.raises(CheckpointError, match=r"lacks its text encoder weights \(text_encoder/\)"):
            DiffusersLoader().load_checkpoint("no-text")
        with pytest.raises(FileNotFoundError, match="not found"):
            DiffusersLoader().load_checkpoint("../../etc")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with server_context(base_directory=str(tmp_path / "broken")):
        with pytest.raises(CheckpointError, match="no unet/ weights"):
            DiffusersLoader().load_checkpoint("no-text")


def test_pipeline_through_the_server(start_server, pipeline):
    base, _ = pipeline
    srv = start_server("--force-fp32", packs=(), base=base)
    info = srv.get("/object_info/DiffusersLoader").json()["DiffusersLoader"]
    assert info["input"]["required"]["model_path"] == [["tiny-sd15"]]
    prompt = {
        "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "tiny-sd15"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "diffusers", "images": ["5", 0]}},
    }
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["6"]["images"]
    assert srv.get("/view", params=image).status_code == 200
    prompt["1"]["inputs"]["model_path"] = "missing"
    assert srv.post("/prompt", {"prompt": prompt}).status_code == 400  # not in the combo: refused up front
