"""PhotoMaker v1: the fuse module's maths, the class word's embedding replaced and nothing else, loading both file
layouts, clear errors, and a run over HTTP with a tiny SDXL checkpoint."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfy_serverless.models.checkpoint_files import CheckpointError  # noqa: E402
from comfy_serverless.models.clip_vision import clip_preprocess  # noqa: E402
from comfy_serverless.models.loading import load_checkpoint  # noqa: E402
from comfy_serverless.models.photomaker import load_photomaker  # noqa: E402
from comfy_serverless.models.random_checkpoints import make_test_checkpoint  # noqa: E402
from comfy_serverless.models.random_clip_vision import make_test_clip_vision  # noqa: E402
from comfy_serverless.models.random_photomaker import make_test_photomaker  # noqa: E402
from comfy_serverless.networks.build import random_state_dict  # noqa: E402
from comfy_serverless.networks.photomaker import FuseModule  # noqa: E402
from conftest import Server, server_context  # noqa: E402

CKPT, PM = "tiny-sdxl.safetensors", "tiny-photomaker.safetensors"


def reference_mlp(x, w, prefix, residual):
    """fc2(gelu(fc1(layernorm(x)))) written out: gelu with erf, layer norm from mean and variance."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-5) * w[prefix + "layernorm.weight"] + w[prefix + "layernorm.bias"]
    hidden = normed @ w[prefix + "fc1.weight"].T + w[prefix + "fc1.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    out = hidden @ w[prefix + "fc2.weight"].T + w[prefix + "fc2.bias"]
    return out + x if residual else out


def reference_fuse(prompt, ident, w):
    hidden = reference_mlp(torch.cat([prompt, ident], -1), w, "mlp1.", False) + prompt
    hidden = reference_mlp(hidden, w, "mlp2.", True)
    return F.layer_norm(hidden, hidden.shape[-1:], w["layer_norm.weight"], w["layer_norm.bias"], 1e-5)


def test_fuse_module_matches_its_maths_and_leaves_other_tokens():
    dim = 16
    weights = random_state_dict(lambda: FuseModule(dim), generator=torch.Generator().manual_seed(3), std=0.2,
                                affine_std=0.1)
    module = FuseModule(dim)
    module.load_state_dict(weights)
    prompt, ident = torch.randn(2, 7, dim), torch.randn(2, 3, dim)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 4] = mask[1, 5] = True  # prompt 0 takes image 0; prompt 1 images 0 and 1
    with torch.no_grad():
        out = module(prompt, ident, mask)
    expected = prompt.clone()
    expected[0, 2] = reference_fuse(prompt[0, 2], ident[0, 0], weights)
    expected[1, 4] = reference_fuse(prompt[1, 4], ident[1, 0], weights)
    expected[1, 5] = reference_fuse(prompt[1, 5], ident[1, 1], weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~mask], prompt[~mask])
    assert (out[mask] - prompt[mask]).abs().max() > 0.1
    with pytest.raises(ValueError, match="class tokens marked but only 1 ID images"):
        module(prompt, ident[:, :1], mask)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photomaker")
    make_test_checkpoint("sdxl", "tiny", folder / CKPT, seed=4)
    with server_context(force_fp32=True):
        clip = load_checkpoint(str(folder / CKPT))[1]
        width = clip.encode("x")[0].shape[-1]
        yield folder, clip, width


@pytest.mark.parametrize("file_name", ["photomaker-v1.bin", "flat.safetensors"])
def test_encode_fuses_the_word_before_the_trigger_only(sdxl, file_name):
    folder, clip, width = sdxl
    weights = make_test_photomaker(folder / file_name, width, seed=5)
    photomaker = load_photomaker(str(folder / file_name))
    image = torch.rand(2, 40, 50, 3, generator=torch.Generator().manual_seed(6))
    [[cond, extra]] = photomaker.encode(image, clip, "a photo of man photomaker in snow")
    plain, pooled = clip.encode("a photo of man in snow")  # the trigger's tokens are dropped
    torch.testing.assert_close(extra["pooled_output"], pooled)
    # word 5 is the trigger: position 4 (after the start token: a, photo, of, man) is fused, the rest unchanged
    others = [i for i in range(cond.shape[1]) if i != 4]
    torch.testing.assert_close(cond[:, others], plain[:, others])
    network = photomaker.handle.get()
    with torch.no_grad():
        ident = network.id_embeds(clip_preprocess(image[:1], 32))[0]  # only the first image is used
    fuse = {key[len("fuse_module."):]: value for key, value in weights.items() if key.startswith("fuse_module.")}
    torch.testing.assert_close(cond[0, 4], reference_fuse(plain[0, 4], ident, fuse), rtol=1e-4, atol=1e-5)
    assert (cond[0, 4] - plain[0, 4]).abs().max() > 1e-2


def test_no_trigger_word_is_the_plain_encoding(sdxl):
    folder, clip, width = sdxl
    make_test_photomaker(folder / "plain.safetensors", width)
    photomaker = load_photomaker(str(folder / "plain.safetensors"))
    [[cond, extra]] = photomaker.encode(torch.rand(1, 32, 32, 3), clip, "photograph of photomakers")
    plain, pooled = clip.encode("photograph of photomakers")
    torch.testing.assert_close(cond, plain)
    torch.testing.assert_close(extra["pooled_output"], pooled)


def test_bad_inputs_give_clear_errors(sdxl, tmp_path):
    folder, clip, width = sdxl
    make_test_clip_vision(tmp_path / "vision.safetensors")
    with pytest.raises(CheckpointError, match="not a PhotoMaker v1 model"):
        load_photomaker(str(tmp_path / "vision.safetensors"))
    make_test_photomaker(tmp_path / "narrow.safetensors", width // 2)
    narrow = load_photomaker(str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="needs an SDXL CLIP"):
        narrow.encode(torch.rand(1, 32, 32, 3), clip, "a man photomaker")
    with pytest.raises(CheckpointError, match="file not found"):
        load_photomaker(str(tmp_path / "missing.bin"))


def workflow(encode: dict) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 40, "batch_size": 1, "color": 0xC08060}},
        "3": {"class_type": "PhotoMakerLoader", "inputs": {"photomaker_model_name": PM}},
        "4": encode,
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "pm", "images": ["8", 0]}},
    }


def photomaker_encode(text: str) -> dict:
    return {"class_type": "PhotoMakerEncode", "inputs": {"photomaker": ["3", 0], "image": ["2", 0],
                                                         "clip": ["1", 1], "text": text}}


def render(srv: Server, prompt: dict) -> np.ndarray:
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["9"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_photomaker_over_http(sdxl, tmp_path):
    _, _, width = sdxl
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "photomaker").mkdir(parents=True)
    make_test_checkpoint("sdxl", "tiny", tmp_path / "models" / "checkpoints" / CKPT, seed=4)
    make_test_photomaker(tmp_path / "models" / "photomaker" / PM, width, seed=2)
    make_test_clip_vision(tmp_path / "models" / "photomaker" / "not-photomaker.safetensors")
    srv = Server(tmp_path, args=("--force-fp32",), packs=())
    try:
        info = srv.get("/object_info/PhotoMakerLoader").json()["PhotoMakerLoader"]
        assert PM in info["input"]["required"]["photomaker_model_name"][1]["options"]
        fused = render(srv, workflow(photomaker_encode("a photo of man photomaker")))
        plain = render(srv, workflow({"class_type": "CLIPTextEncode",
                                      "inputs": {"text": "a photo of man", "clip": ["1", 1]}}))
        untriggered = render(srv, workflow(photomaker_encode("a photo of man")))
        assert np.array_equal(untriggered, plain)
        assert np.abs(fused - plain).max() > 0
        bad = workflow(photomaker_encode("a man photomaker"))
        bad["3"]["inputs"]["photomaker_model_name"] = "not-photomaker.safetensors"
        entry = srv.run(bad)
        assert entry["status"]["status_str"] == "error"
        assert "not a PhotoMaker v1 model" in str(entry["status"]["messages"])
    finally:
        srv.stop()


def test_comfy_extras_module_reexports_the_nodes():
    """In a pack-loading process (comfy_modules installed), as packs import it."""
    code = """
from comfy_serverless.catalog import comfy_modules
comfy_modules.install()
from comfy_extras import nodes_photomaker
from comfy_serverless.nodes import photomaker_nodes
assert nodes_photomaker.NODE_CLASS_MAPPINGS == photomaker_nodes.NODE_CLASS_MAPPINGS
assert nodes_photomaker.PhotoMakerEncode.EXPERIMENTAL is True
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
