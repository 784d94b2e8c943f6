"""GLIGENLoader / GLIGENTextBoxApply: loading tiny random GLIGEN files, the conditioning they write (ComfyUI's
"gligen" option), the middle patch built from it driving a tiny SD 1.5 model, and a workflow through the server."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.gligen import GligenModel, gligen_patches
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.models.random_gligen import make_test_gligen
from comfy_serverless.nodes.gligen_nodes import GLIGENLoader, GLIGENTextBoxApply
from conftest import Server, server_context


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("gligen")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "gligen").mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", root / "models" / "checkpoints" / "tiny.safetensors", seed=2)
    make_test_gligen(root / "models" / "gligen" / "tiny-gligen.safetensors", seed=3)
    make_test_gligen(root / "models" / "gligen" / "tiny-gligen.pth", seed=4)
    torch.save({"something": torch.zeros(3)}, root / "models" / "gligen" / "not-gligen.pth")
    return root


@pytest.fixture(scope="module")
def loaded(base):
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(base_directory=str(base), force_fp32=True):
        model, clip, _ = load_checkpoint(str(base / "models" / "checkpoints" / "tiny.safetensors"), want_vae=False)
        (gligen,) = GLIGENLoader().load_gligen("tiny-gligen.safetensors")
        (other,) = GLIGENLoader().load_gligen("tiny-gligen.pth")
        yield model, clip, gligen, other


def test_loader_reads_both_file_kinds_and_rejects_others(base, loaded):
    _, _, gligen, other = loaded
    assert isinstance(gligen, GligenModel) and len(gligen.model.module_list) == 7
    assert not torch.equal(gligen.model.module_list[0].linear.weight, other.model.module_list[0].linear.weight)
    with server_context(base_directory=str(base), force_fp32=True):
        with pytest.raises(ValueError, match="not-gligen.pth.*position_net"):
            GLIGENLoader().load_gligen("not-gligen.pth")
        with pytest.raises(FileNotFoundError, match="models/gligen"):
            GLIGENLoader().load_gligen("missing.safetensors")


def test_text_box_apply_writes_comfyui_gligen_options(loaded):
    _, clip, gligen, _ = loaded
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    conditioning = [[cond, {"pooled_output": pooled}], [cond, {"strength": 0.5}]]
    (once,) = GLIGENTextBoxApply().append(conditioning, clip, gligen, "a dog", 64, 128, 16, 40)
    (twice,) = GLIGENTextBoxApply().append(once, clip, gligen, "a ball", 32, 32, 0, 0)
    assert "gligen" not in conditioning[0][1]  # the input is not changed
    assert len(twice) == 2 and twice[1][1]["strength"] == 0.5
    kind, model, params = twice[0][1]["gligen"]
    assert kind == "position" and model is gligen and len(params) == 2
    embedding, height, width, y, x = params[0]
    assert (height, width, y, x) == (16, 8, 5, 2)  # latent pixels: 128 // 8, 64 // 8, 40 // 8, 16 // 8
    torch.testing.assert_close(embedding, clip.encode_from_tokens(clip.tokenize("a dog"), return_pooled=True)[1])
    assert params[1][1:] == (4, 4, 0, 0)
    assert once[0][1]["gligen"][2] == params[:1]


def test_other_families_are_refused(loaded):
    class SdxlClip:
        family = "sdxl"

    with pytest.raises(ValueError, match="SD 1.x"):
        GLIGENTextBoxApply().append([], SdxlClip(), loaded[2], "x", 64, 64, 0, 0)


def test_gligen_patches_steer_the_model(loaded):
    model, clip, gligen, _ = loaded
    (conditioning,) = GLIGENTextBoxApply().append([[torch.zeros(1, 77, 32), {}]], clip, gligen, "a dog", 32, 32, 0, 0)
    (moved,) = GLIGENTextBoxApply().append([[torch.zeros(1, 77, 32), {}]], clip, gligen, "a dog", 32, 32, 32, 32)
    assert gligen_patches({}, (1, 4, 8, 8)) is None
    x, context, t = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([400.0])

    def run(options):
        patches = gligen_patches(options, x.shape)
        return model.unet_apply(x, t, context=context,
                                transformer_options={"patches": patches} if patches else {})

    plain = run({})
    here, there = run(conditioning[0][1]), run(moved[0][1])
    assert (here - plain).abs().max() > 1e-3 and (here - there).abs().max() > 1e-4
    empty = gligen_patches({"gligen": ("empty", gligen, [])}, x.shape)
    assert len(empty["middle_patch"]) == 1


def _workflow(box: bool, x: int = 0) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a garden"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "gligen", "images": ["6", 0]}},
        "8": {"class_type": "GLIGENLoader", "inputs": {"gligen_name": "tiny-gligen.safetensors"}},
        "9": {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": ["2", 0], "clip": ["1", 1], "gligen_textbox_model": ["8", 0], "text": "a dog",
            "width": 32, "height": 32, "x": x, "y": 0}},
    }
    prompt["5"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 4, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["9", 0] if box else ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return prompt


def _pixels(srv: Server, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["7"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("gligen-server")
    shutil.copytree(base / "models", root / "models")
    srv = Server(root, args=("--force-fp32",), packs=())
    yield srv
    srv.stop()


def test_gligen_workflow_runs_through_the_server(server):
    image = _pixels(server, server.run(_workflow(True)))
    assert image.shape == (16, 16, 3)
    listed = server.get("/object_info/GLIGENLoader").json()["GLIGENLoader"]["input"]["required"]["gligen_name"][0]
    assert "tiny-gligen.safetensors" in listed


def test_gligen_boxes_steer_the_sampler(server):
    plain = _pixels(server, server.run(_workflow(False)))
    left = _pixels(server, server.run(_workflow(True, x=0)))
    right = _pixels(server, server.run(_workflow(True, x=32)))
    assert np.abs(left - plain).max() > 0 and np.abs(left - right).max() > 0


def test_clip_text_encode_controlnet_sets_the_controlnet_text(loaded):
    from comfy_serverless.nodes.gligen_nodes import CLIPTextEncodeControlnet

    _, clip, _, _ = loaded
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    conditioning = [[cond, {"pooled_output": pooled}], [cond, {"strength": 0.5}]]
    (out,) = CLIPTextEncodeControlnet().encode(clip, conditioning, "edges of a house")
    expected_cond, expected_pooled = clip.encode_from_tokens(clip.tokenize("edges of a house"), return_pooled=True)
    assert len(out) == 2 and out[1][1]["strength"] == 0.5 and out[0][0] is cond
    for _, options in out:
        torch.testing.assert_close(options["cross_attn_controlnet"], expected_cond)
        torch.testing.assert_close(options["pooled_output_controlnet"], expected_pooled)
    assert "cross_attn_controlnet" not in conditioning[0][1]
    assert not torch.equal(out[0][1]["cross_attn_controlnet"], cond)


def test_clip_text_encode_controlnet_through_the_server(server):
    """Without a ControlNet the extra text is carried but changes nothing."""
    plain = _workflow(False)
    with_text = _workflow(False)
    with_text["10"] = {"class_type": "CLIPTextEncodeControlnet", "inputs": {
        "clip": ["1", 1], "conditioning": ["2", 0], "text": "edges"}}
    with_text["5"]["inputs"]["positive"] = ["10", 0]
    assert np.array_equal(_pixels(server, server.run(with_text)), _pixels(server, server.run(plain)))
