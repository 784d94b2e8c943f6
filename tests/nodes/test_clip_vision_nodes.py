"""CLIPVisionLoader/Encode, StyleModelLoader/Apply and unCLIPConditioning: called directly, through a pack's
`comfy.clip_vision`, and in a workflow through the real server (tiny random SD1.5, CLIP vision and style files)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.clip_vision import Output, load_clip_vision, load_style_model
from comfy_serverless.models.random_clip_vision import make_test_clip_vision, make_test_style_model
from comfy_serverless.networks.style_model import StyleModelConfig
from comfy_serverless.nodes import clip_vision_nodes
from comfy_serverless.nodes.clip_vision_nodes import (
    CLIPVisionEncode,
    StyleModelApply,
    unCLIPConditioning,
)
from conftest import Server, server_context

STYLE_CONFIG = StyleModelConfig(width=64, context_dim=32, layers=2, tokens=4)  # tiny SD1.5's context is 32 wide


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    folder = tmp_path_factory.mktemp("clip-vision-files")
    paths = {"vision": folder / "tiny-vision.safetensors", "style": folder / "tiny-style.safetensors",
             "ckpt": folder / "tiny-sd15.safetensors"}
    make_test_clip_vision(paths["vision"], seed=1)
    make_test_style_model(paths["style"], STYLE_CONFIG, seed=2)
    make_test_checkpoint("sd15", "tiny", paths["ckpt"], seed=1)
    return paths


@pytest.fixture(scope="module")
def vision_output(files):
    with server_context(force_fp32=True):
        vision = load_clip_vision(str(files["vision"]))
    image = torch.rand(2, 24, 40, 3, generator=torch.Generator().manual_seed(0))
    return CLIPVisionEncode().encode(vision, image, "center")[0]


def test_definitions():
    assert clip_vision_nodes.NODE_DISPLAY_NAME_MAPPINGS["StyleModelApply"] == "Apply Style Model"
    assert "unCLIPConditioning" not in clip_vision_nodes.NODE_DISPLAY_NAME_MAPPINGS  # ComfyUI shows the class name
    assert "unCLIPCheckpointLoader" not in clip_vision_nodes.NODE_CLASS_MAPPINGS  # not offered: see the module
    assert CLIPVisionEncode.INPUT_TYPES()["required"]["crop"] == (["center", "none"],)
    assert StyleModelApply.CATEGORY == "conditioning/style_model"


def test_encode_crop_center_and_none(files):
    with server_context(force_fp32=True):
        vision = load_clip_vision(str(files["vision"]))
    wide = torch.rand(1, 32, 96, 3, generator=torch.Generator().manual_seed(3))
    centre = CLIPVisionEncode().encode(vision, wide, "center")[0]
    squashed = CLIPVisionEncode().encode(vision, wide, "none")[0]
    # Centre crop of a 32x96 image at 32 px is its middle third, unscaled: the same as encoding that third.
    middle = CLIPVisionEncode().encode(vision, wide[:, :, 32:64], "center")[0]
    torch.testing.assert_close(centre.image_embeds, middle.image_embeds)
    assert not torch.allclose(squashed.image_embeds, centre.image_embeds, atol=1e-4)
    with pytest.raises(RuntimeError, match="clip_vision input is invalid"):
        CLIPVisionEncode().encode(None, wide, "center")


def _conditioning(tokens: int = 5, width: int = 32, **options):
    return [[torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(9)), {"pooled_output": 1,
                                                                                        **options}]]


def test_style_multiply_appends_scaled_tokens(files, vision_output):
    style = load_style_model(str(files["style"]))
    expected = style.get_cond(vision_output).reshape(1, 8, 32)  # two images' 4 tokens side by side
    base = _conditioning()
    (out,) = StyleModelApply().apply_stylemodel(base, style, vision_output, 2.5, "multiply")
    cond, options = out[0]
    assert cond.shape == (1, 5 + 8, 32)
    assert torch.equal(cond[:, :5], base[0][0])
    torch.testing.assert_close(cond[:, 5:], expected * 2.5)
    assert options == {"pooled_output": 1} and options is not base[0][1]


def test_style_attn_bias_keeps_tokens_and_sets_log_strength_bias(files, vision_output):
    style = load_style_model(str(files["style"]))
    (plain,) = StyleModelApply().apply_stylemodel(_conditioning(), style, vision_output, 1.0, "attn_bias")
    assert "attention_mask" not in plain[0][1]  # strength 1: no bias needed
    (out,) = StyleModelApply().apply_stylemodel(_conditioning(), style, vision_output, 0.5, "attn_bias")
    cond, options = out[0]
    torch.testing.assert_close(cond, plain[0][0])  # attn_bias does not scale the tokens
    mask = options["attention_mask"]
    # 5 text tokens + 8 style tokens + 1 reference cell (ComfyUI's default image shape (1, 1)).
    assert mask.shape == (1, 14, 14) and mask.dtype == torch.float16 and options["attention_mask_img_shape"] == (1, 1)
    bias = torch.log(torch.tensor(0.5)).half()
    assert torch.all(mask[:, :5, 5:13] == bias) and torch.all(mask[:, 13:, 5:13] == bias)
    assert torch.all(mask[:, :, :5] == 0) and torch.all(mask[:, 5:13, 5:13] == 0)
    # A second application grows the existing mask (even at strength 1, with multiply).
    (again,) = StyleModelApply().apply_stylemodel(out, style, vision_output, 1.0, "multiply")
    grown = again[0][1]["attention_mask"]
    assert grown.shape == (1, 22, 22) and torch.equal(grown[:, :13, :13], mask[:, :13, :13])
    assert torch.all(grown[:, :13, 13:21] == 0) and torch.equal(grown[:, 21:, :13], mask[:, 13:, :13])


def test_style_width_mismatch_is_an_error(files, vision_output):
    style = load_style_model(str(files["style"]))
    with pytest.raises(ValueError, match="32 wide but the conditioning's are 768"):
        StyleModelApply().apply_stylemodel(_conditioning(width=768), style, vision_output, 1.0, "multiply")


def test_unclip_conditioning_appends_to_each_entry(vision_output):
    base = _conditioning() + _conditioning(unclip_conditioning=[{"strength": 9}])
    (out,) = unCLIPConditioning().apply_adm(base, vision_output, 0.8, 0.1)
    assert out[0][1]["unclip_conditioning"] == [{"clip_vision_output": vision_output, "strength": 0.8,
                                                 "noise_augmentation": 0.1}]
    assert [e["strength"] for e in out[1][1]["unclip_conditioning"]] == [9, 0.8]
    assert base[1][1]["unclip_conditioning"] == [{"strength": 9}]  # the input is not changed
    assert unCLIPConditioning().apply_adm(base, vision_output, 0.0, 0.1)[0] is base


def test_comfy_clip_vision_module_for_packs(files, tmp_path):
    code = f"""
        import torch
        import comfy.clip_vision
        from comfy_serverless.catalog import comfy_modules
        model = comfy.clip_vision.load({str(files["vision"])!r})
        assert isinstance(model, comfy.clip_vision.ClipVisionModel)
        image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
        out = model.encode_image(image)
        assert isinstance(out, comfy.clip_vision.Output)
        pixels = comfy.clip_vision.clip_preprocess(image, size=32)
        print(tuple(out["penultimate_hidden_states"].shape), tuple(pixels.shape), model.image_size)
    """
    prelude = "from comfy_serverless.catalog import comfy_modules\ncomfy_modules.install()\n"
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "(1, 17, 64) (1, 3, 32, 32) 32"
    assert Output is not None


# -- through the server ------------------------------------------------------------------------------------

def _prompt(style_strength: float | None, seed: int = 3) -> dict:
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolour fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "style", "images": ["8", 0]}},
    }
    if style_strength is not None:
        prompt.update({
            "10": {"class_type": "LoadImage", "inputs": {"image": "style.png"}},
            "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-vision.safetensors"}},
            "12": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["11", 0], "image": ["10", 0],
                                                                "crop": "center"}},
            "13": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "tiny-style.safetensors"}},
            "14": {"class_type": "StyleModelApply", "inputs": {
                "conditioning": ["6", 0], "style_model": ["13", 0], "clip_vision_output": ["12", 0],
                "strength": style_strength, "strength_type": "multiply"}},
        })
        prompt["3"]["inputs"]["positive"] = ["14", 0]
    return prompt


def _pixels(srv: Server, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["9"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_style_model_workflow_through_the_server(start_server, tmp_path, files):
    base = tmp_path / "style-server"
    for folder, key in (("checkpoints", "ckpt"), ("clip_vision", "vision"), ("style_models", "style")):
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / files[key].name).hardlink_to(files[key])
    (base / "input").mkdir()
    photo = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(base / "input" / "style.png")
    srv = start_server("--force-fp32", packs=(), base=base)

    info = srv.get("/object_info/CLIPVisionLoader").json()["CLIPVisionLoader"]
    assert info["input"]["required"]["clip_name"][0] == ["tiny-vision.safetensors"]
    plain = _pixels(srv, srv.run(_prompt(None)))
    styled = _pixels(srv, srv.run(_prompt(1.0)))
    stronger = _pixels(srv, srv.run(_prompt(3.0)))
    assert plain.shape == styled.shape and plain.std() > 0
    # Tiny random weights make small but real changes: the style tokens change the picture, more when stronger.
    assert not np.array_equal(styled, plain)
    assert np.abs(stronger - plain).mean() > np.abs(styled - plain).mean()
    again = _pixels(srv, srv.run(_prompt(1.0, seed=3) | {"9": {**_prompt(1.0)["9"], "inputs": {
        "filename_prefix": "again", "images": ["8", 0]}}}))
    assert np.array_equal(again, styled)

    bad = _prompt(1.0)
    bad["13"]["inputs"]["style_model_name"] = "tiny-vision.safetensors"
    (base / "models" / "style_models" / "tiny-vision.safetensors").hardlink_to(files["vision"])
    entry = srv.run(bad)
    assert entry["status"]["status_str"] == "error"
    error = next(data for name, data in entry["status"]["messages"] if name == "execution_error")
    assert error["node_id"] == "13" and "not a T2I-Adapter style model" in error["exception_message"]
